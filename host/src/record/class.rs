//! The error classes of dead letters; their names are public (docs/configuration.md).

use serde::{Deserialize, Serialize};

/// Why a record was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The plugin said the record can never succeed.
    Invalid,
    /// The plugin said `retryable` until the retry budget ran out.
    RetriesExhausted,
    /// The plugin trapped (panic, abort, `unreachable`, out-of-bounds access, ...).
    Trap,
    /// The plugin ran past its deadline (or its fuel).
    Timeout,
    /// The plugin asked for more memory than its cap.
    Oom,
    /// The plugin returned output the host cannot accept.
    BadOutput,
    /// The record took a worker down repeatedly.
    CrashLoop,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 7] = [
        Self::Invalid,
        Self::RetriesExhausted,
        Self::Trap,
        Self::Timeout,
        Self::Oom,
        Self::BadOutput,
        Self::CrashLoop,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::RetriesExhausted => "retries_exhausted",
            Self::Trap => "trap",
            Self::Timeout => "timeout",
            Self::Oom => "oom",
            Self::BadOutput => "bad_output",
            Self::CrashLoop => "crash_loop",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Faults of the plugin itself (as opposed to verdicts it returned).
    pub fn is_plugin_fault(self) -> bool {
        matches!(
            self,
            Self::Trap | Self::Timeout | Self::Oom | Self::BadOutput
        )
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for class in ErrorClass::ALL {
            assert_eq!(ErrorClass::parse(class.as_str()), Some(class));
            let json = serde_json::to_string(&class).expect("serialize");
            assert_eq!(json, format!("\"{}\"", class.as_str()));
        }
    }
}
