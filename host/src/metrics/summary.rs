//! What a run did, read from the counters: the run summary (`--summary-json`, progress
//! lines, `/v1/status`) and the fates per plugin version (canary and quarantine decisions).

use std::collections::BTreeMap;

use serde::Serialize;

/// The fates of the records one plugin version had.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct VersionCounts {
    pub processed: u64,
    pub records_out: u64,
    pub dead_lettered: u64,
    pub dead_lettered_by_class: BTreeMap<String, u64>,
}

impl VersionCounts {
    /// What happened between `before` and `now` (either may be missing: nothing yet).
    pub fn since(now: Option<&Self>, before: Option<&Self>) -> Self {
        let (now, before) = (
            now.cloned().unwrap_or_default(),
            before.cloned().unwrap_or_default(),
        );
        let mut by_class = now.dead_lettered_by_class;
        for (class, n) in &before.dead_lettered_by_class {
            if let Some(count) = by_class.get_mut(class) {
                *count = count.saturating_sub(*n);
            }
        }
        Self {
            processed: now.processed.saturating_sub(before.processed),
            records_out: now.records_out.saturating_sub(before.records_out),
            dead_lettered: now.dead_lettered.saturating_sub(before.dead_lettered),
            dead_lettered_by_class: by_class,
        }
    }
}

/// What a run did (`--summary-json`).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Summary {
    pub records_in: u64,
    pub processed: u64,
    pub records_out: u64,
    pub deduplicated: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub dead_lettered_by_class: BTreeMap<String, u64>,
    /// Parked in the retry topic (`retry.topic`); each comes back as one more record in.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub parked: u64,
    pub elapsed_ms: u64,
    pub records_per_sec: f64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "records in {} | processed {} | out {} | dead-lettered {}",
            self.records_in, self.processed, self.records_out, self.dead_lettered
        )?;
        if !self.dead_lettered_by_class.is_empty() {
            let classes: Vec<String> = self
                .dead_lettered_by_class
                .iter()
                .map(|(class, n)| format!("{class} {n}"))
                .collect();
            write!(f, " ({})", classes.join(", "))?;
        }
        if self.parked > 0 {
            write!(f, " | parked {}", self.parked)?;
        }
        write!(
            f,
            " | deduplicated {} | retried {} | {:.1}s, {} records/s",
            self.deduplicated,
            self.retried,
            self.elapsed_ms as f64 / 1000.0,
            self.records_per_sec
        )
    }
}
