//! The fate decisions of the lifecycle, as small pure functions: whether a claimed record
//! runs, whether it is refused before the plugin, what its outputs or its retries make of
//! it, and what its outputs and dead letters carry. The stages call them; nothing here
//! waits, reads a clock or touches a store.

use std::time::Duration;

use super::retry::Backoff;
use crate::record::headers;
use crate::record::{DeadLetter, ErrorClass, ErrorInfo, Output, Record};
use crate::runtime::{Failure, Outcome, PluginMeta};
use crate::state::Claim;

/// What became of one record the plugin was asked about.
pub(super) enum Verdict {
    /// Processed, with these outputs (a stateful plugin's writes went to the batch's
    /// pending writes when the plugin returned: `pipeline/keyed.rs`).
    Outputs(Vec<Output>),
    Failed(Failed),
    /// Retryable, to be parked in the retry topic until `due_ms`.
    Parked {
        reason: String,
        attempts: u32,
        first_failure_ms: i64,
        due_ms: i64,
    },
}

/// A failure with the attempts it took and when they failed.
pub(super) struct Failed {
    pub failure: Failure,
    pub attempts: u32,
    pub first_failure_ms: i64,
    pub last_failure_ms: i64,
}

impl Failed {
    /// A failure decided at `now_ms` after `attempts` attempts.
    pub fn at(failure: Failure, attempts: u32, now_ms: i64) -> Self {
        Self {
            failure,
            attempts,
            first_failure_ms: now_ms,
            last_failure_ms: now_ms,
        }
    }
}

/// The fence a claimed record runs with, or `None` when it is a duplicate: done already
/// (unless done marks are bypassed, as a DLQ replay does) or held by another live worker.
/// (An id seen earlier in the same batch is a duplicate too; the claim stage checks that.)
pub(super) fn admit(claim: &Claim, bypass_done: bool) -> Option<u64> {
    match claim {
        Claim::Leased { fence, .. } => Some(*fence),
        Claim::Done if bypass_done => Some(0),
        Claim::Done | Claim::HeldElsewhere => None,
    }
}

/// A plugin's answer on attempt `attempts` as a verdict, or the reason to try again.
pub(super) fn answered(
    outcome: Outcome,
    attempts: u32,
    first_failure_ms: i64,
    last_failure_ms: i64,
) -> Result<Verdict, String> {
    match outcome {
        Outcome::Outputs { outputs, .. } => Ok(Verdict::Outputs(outputs)),
        Outcome::Failed(failure) => Ok(Verdict::Failed(Failed {
            failure,
            attempts,
            first_failure_ms,
            last_failure_ms,
        })),
        Outcome::Retryable(reason) => Err(reason),
    }
}

/// Why a record is dead-lettered before the plugin sees it, with the attempts to report:
/// the source could not read it (`invalid`), or workers died `crashes` times with it in the
/// plugin, at least `crash_limit` (`crash_loop`).
pub(super) fn refusal(
    rejected: Option<String>,
    crashes: u32,
    crash_limit: Option<u32>,
) -> Option<(Failure, u32)> {
    if let Some(reason) = rejected {
        return Some((Failure::new(ErrorClass::Invalid, reason), 0));
    }
    let limit = crash_limit.filter(|&limit| crashes >= limit)?;
    let failure = Failure::new(
        ErrorClass::CrashLoop,
        format!(
            "the worker died {crashes} times while this record was in the plugin \
             (pipeline.crash_loop_limit = {limit}): it is not run again"
        ),
    );
    Some((failure, crashes))
}

/// A record still retryable after `attempts`: parked until its next attempt is due (at
/// `now_ms + delay`) when the backoff allows one, else `retries_exhausted`.
pub(super) fn park_or_exhaust(
    backoff: &Backoff,
    reason: String,
    attempts: u32,
    first_failure_ms: i64,
    now_ms: i64,
    delay: Duration,
) -> Verdict {
    let since_first = Duration::from_millis(now_ms.saturating_sub(first_failure_ms).unsigned_abs());
    if backoff.allows(attempts, since_first, delay) {
        return Verdict::Parked {
            reason,
            attempts,
            first_failure_ms,
            due_ms: now_ms + delay.as_millis() as i64,
        };
    }
    exhausted(reason, attempts, first_failure_ms, now_ms)
}

/// A record that was still retryable when no attempt was left.
pub(super) fn exhausted(
    reason: String,
    attempts: u32,
    first_failure_ms: i64,
    last_failure_ms: i64,
) -> Verdict {
    Verdict::Failed(Failed {
        failure: Failure::new(
            ErrorClass::RetriesExhausted,
            format!("still retryable after {attempts} attempts: {reason}"),
        ),
        attempts,
        first_failure_ms,
        last_failure_ms,
    })
}

/// An output as it is written: with the id of the record it came from, the plugin version
/// that made it and the fence of the record's lease.
pub(super) fn stamp(output: &mut Output, id: &str, version: &str, fence: u64) {
    output.headers.extend([
        (headers::RECORD_ID.to_owned(), id.as_bytes().to_vec()),
        (
            headers::PLUGIN_VERSION.to_owned(),
            version.as_bytes().to_vec(),
        ),
        (headers::FENCE.to_owned(), fence.to_string().into_bytes()),
    ]);
}

/// A dead letter of `record`, naming the plugin version that had it.
pub(super) fn dead_letter(
    meta: &PluginMeta,
    record: Record,
    id: &str,
    failed: Failed,
) -> DeadLetter {
    let error = ErrorInfo {
        class: failed.failure.class,
        message: failed.failure.message,
        plugin: meta.name.clone(),
        plugin_version: meta.version,
        plugin_digest: meta.digest.clone(),
        attempts: failed.attempts,
        first_failure_ms: failed.first_failure_ms,
        last_failure_ms: failed.last_failure_ms,
        source: record.source.stream.clone(),
        partition: record.source.partition,
        offset: record.source.offset,
        backtrace: failed.failure.backtrace,
        record_id: id.to_owned(),
    };
    DeadLetter { record, error }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryConfig;

    fn leased(fence: u64) -> Claim {
        Claim::Leased { fence, crashes: 0 }
    }

    #[test]
    fn a_leased_record_runs_with_its_fence() {
        assert_eq!(admit(&leased(7), false), Some(7));
        assert_eq!(admit(&leased(7), true), Some(7));
    }

    #[test]
    fn done_and_held_elsewhere_are_duplicates_unless_done_is_bypassed() {
        assert_eq!(admit(&Claim::Done, false), None);
        assert_eq!(admit(&Claim::HeldElsewhere, false), None);
        assert_eq!(admit(&Claim::Done, true), Some(0), "a DLQ replay");
        assert_eq!(admit(&Claim::HeldElsewhere, true), None);
    }

    #[test]
    fn a_failure_keeps_its_attempts_and_times_and_retryable_asks_again() {
        let failure = Failure::new(ErrorClass::Trap, "boom");
        let Ok(Verdict::Failed(failed)) = answered(Outcome::Failed(failure), 3, 10, 20) else {
            panic!("a failure is a verdict");
        };
        assert_eq!(failed.failure.class, ErrorClass::Trap);
        assert_eq!(
            (
                failed.attempts,
                failed.first_failure_ms,
                failed.last_failure_ms
            ),
            (3, 10, 20)
        );
        assert!(matches!(
            answered(
                Outcome::Outputs {
                    outputs: Vec::new(),
                    writes: Vec::new()
                },
                1,
                0,
                0
            ),
            Ok(Verdict::Outputs(outs)) if outs.is_empty()
        ));
        assert_eq!(
            answered(Outcome::Retryable("busy".into()), 1, 0, 0)
                .err()
                .as_deref(),
            Some("busy")
        );
    }

    #[test]
    fn an_unreadable_record_is_invalid_before_the_crash_count_is_looked_at() {
        let (failure, attempts) = refusal(Some("not JSON".into()), 9, Some(3)).expect("refused");
        assert_eq!(failure.class, ErrorClass::Invalid);
        assert_eq!(failure.message, "not JSON");
        assert_eq!(attempts, 0);
    }

    #[test]
    fn a_record_is_a_crash_loop_from_the_limit_on() {
        assert!(refusal(None, 2, Some(3)).is_none());
        assert!(refusal(None, 5, None).is_none(), "no crash guard");
        let (failure, attempts) = refusal(None, 3, Some(3)).expect("refused");
        assert_eq!(failure.class, ErrorClass::CrashLoop);
        assert!(
            failure.message.contains("died 3 times"),
            "{}",
            failure.message
        );
        assert!(failure.message.contains("crash_loop_limit = 3"));
        assert_eq!(attempts, 3);
    }

    fn output(value: &str) -> Output {
        Output {
            destination: None,
            key: None,
            value: value.as_bytes().to_vec(),
            headers: Vec::new(),
        }
    }

    fn backoff(max_attempts: u32, max_elapsed_ms: u64) -> Backoff {
        Backoff::new(RetryConfig {
            max_attempts,
            max_elapsed_ms,
            ..RetryConfig::default()
        })
    }

    #[test]
    fn a_retryable_record_is_parked_until_its_next_attempt_is_due() {
        let verdict = park_or_exhaust(
            &backoff(5, 10_000),
            "busy".into(),
            2,
            1_000,
            3_000,
            Duration::from_millis(400),
        );
        let Verdict::Parked {
            reason,
            attempts,
            first_failure_ms,
            due_ms,
        } = verdict
        else {
            panic!("parked");
        };
        assert_eq!((reason.as_str(), attempts), ("busy", 2));
        assert_eq!((first_failure_ms, due_ms), (1_000, 3_400));
    }

    #[test]
    fn retries_end_at_the_attempt_cap_or_the_elapsed_cap() {
        let at_cap = park_or_exhaust(&backoff(2, 10_000), "busy".into(), 2, 0, 10, Duration::ZERO);
        let Verdict::Failed(failed) = at_cap else {
            panic!("no attempt left");
        };
        assert_eq!(failed.failure.class, ErrorClass::RetriesExhausted);
        assert_eq!(
            failed.failure.message,
            "still retryable after 2 attempts: busy"
        );
        assert_eq!((failed.first_failure_ms, failed.last_failure_ms), (0, 10));
        let late = park_or_exhaust(
            &backoff(9, 1_000),
            "busy".into(),
            1,
            0,
            900,
            Duration::from_millis(200),
        );
        assert!(matches!(late, Verdict::Failed(_)), "900 + 200 ms > 1 s");
    }

    #[test]
    fn an_output_names_its_record_version_and_fence() {
        let mut out = output("v");
        out.headers.push(("mine".into(), b"1".to_vec()));
        stamp(&mut out, "r-1", "3", 42);
        let names: Vec<(&str, &[u8])> = (out.headers.iter())
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        assert_eq!(
            names,
            [
                ("mine", &b"1"[..]),
                (headers::RECORD_ID, b"r-1"),
                (headers::PLUGIN_VERSION, b"3"),
                (headers::FENCE, b"42"),
            ]
        );
    }
}
