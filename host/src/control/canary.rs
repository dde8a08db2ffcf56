//! Judging plugin versions: a canary against the active version ([`judge`]), and the active
//! version against a fault threshold ([`quarantine`]).
//!
//! A canary's failure rates are compared with the stable version's over the same period.
//! Plugin faults (trap, timeout, oom, bad_output) and `invalid` are each compared as rates of the records each version had; the candidate fails when either rate
//! exceeds the stable version's by more than the margin. `invalid` is compared against the
//! stable version's own rate rather than against zero, since dirty input is not the
//! candidate's fault.

use crate::config::{CanaryConfig, QuarantineConfig};
use crate::metrics::VersionCounts;
use crate::record::ErrorClass;

/// Why the active version should be quarantined, judging a window of its records; `None`
/// while the window is too small or the version is healthy.
pub fn quarantine(window: &VersionCounts, config: &QuarantineConfig) -> Option<String> {
    let had = records(window);
    if config.fault_rate <= 0.0 || had < config.min_records.max(1) {
        return None;
    }
    let faults = rate(window, ErrorClass::is_plugin_fault);
    (faults >= config.fault_rate).then(|| {
        format!(
            "quarantine: plugin-fault rate {:.1} % over {had} records (threshold {:.1} %)",
            faults * 100.0,
            config.fault_rate * 100.0
        )
    })
}

/// What to do with a canary now.
#[derive(Debug, Clone, PartialEq)]
pub enum Judgement {
    Wait,
    /// Roll back, for this reason.
    RollBack(String),
    Promote,
}

/// Records a version had: processed or dead-lettered.
fn records(counts: &VersionCounts) -> u64 {
    counts.processed + counts.dead_lettered
}

/// The share of `counts`' records dead-lettered in a class that `counted` picks.
fn rate(counts: &VersionCounts, counted: fn(ErrorClass) -> bool) -> f64 {
    let total = records(counts);
    if total == 0 {
        return 0.0;
    }
    let failed: u64 = ErrorClass::ALL
        .into_iter()
        .filter(|&c| counted(c))
        .filter_map(|c| counts.dead_lettered_by_class.get(c.as_str()))
        .sum();
    failed as f64 / total as f64
}

/// Judges a candidate on what both versions did since the canary started.
pub fn judge(
    stable: &VersionCounts,
    candidate: &VersionCounts,
    config: &CanaryConfig,
) -> Judgement {
    let had = records(candidate);
    if had < config.min_records.max(1) {
        return Judgement::Wait;
    }
    for (what, counted) in [
        (
            "plugin-fault",
            ErrorClass::is_plugin_fault as fn(ErrorClass) -> bool,
        ),
        ("invalid", |c| c == ErrorClass::Invalid),
    ] {
        let (theirs, ours) = (rate(candidate, counted), rate(stable, counted));
        if theirs > ours + config.margin {
            return Judgement::RollBack(format!(
                "canary {what} rate {:.1} % over {had} records against {:.1} % for the stable version (margin {:.1} %)",
                theirs * 100.0,
                ours * 100.0,
                config.margin * 100.0
            ));
        }
    }
    if config.promote_after_records > 0 && had >= config.promote_after_records {
        return Judgement::Promote;
    }
    Judgement::Wait
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(processed: u64, dead: &[(ErrorClass, u64)]) -> VersionCounts {
        VersionCounts {
            processed,
            records_out: processed,
            dead_lettered: dead.iter().map(|(_, n)| n).sum(),
            dead_lettered_by_class: dead
                .iter()
                .map(|(c, n)| (c.as_str().to_owned(), *n))
                .collect(),
        }
    }

    #[test]
    fn faults_and_invalid_are_compared_with_the_stable_version() {
        let config = CanaryConfig {
            margin: 0.05,
            min_records: 100,
            promote_after_records: 500,
        };
        let clean = counts(1000, &[]);
        // Too few records to judge.
        assert_eq!(
            judge(&clean, &counts(10, &[(ErrorClass::Trap, 50)]), &config),
            Judgement::Wait
        );
        // 10 % traps against none: rolled back.
        let trapping = counts(180, &[(ErrorClass::Trap, 20)]);
        let Judgement::RollBack(reason) = judge(&clean, &trapping, &config) else {
            panic!("a trapping canary is rolled back")
        };
        assert!(reason.contains("plugin-fault rate 10.0 %"), "{reason}");
        // Within the margin: keeps waiting.
        assert_eq!(
            judge(&clean, &counts(196, &[(ErrorClass::Timeout, 4)]), &config),
            Judgement::Wait
        );
        // Invalid input both versions see equally is not the candidate's fault ...
        let dirty = counts(700, &[(ErrorClass::Invalid, 300)]);
        assert_eq!(
            judge(&dirty, &counts(140, &[(ErrorClass::Invalid, 60)]), &config),
            Judgement::Wait
        );
        // ... but refusing more of it than the stable version does is.
        let Judgement::RollBack(reason) =
            judge(&dirty, &counts(100, &[(ErrorClass::Invalid, 100)]), &config)
        else {
            panic!("a canary refusing more input is rolled back")
        };
        assert!(reason.contains("invalid rate 50.0 %"), "{reason}");
        // Healthy long enough: promoted.
        assert_eq!(
            judge(&clean, &counts(500, &[]), &config),
            Judgement::Promote
        );
    }

    #[test]
    fn quarantine_needs_a_full_window_over_the_threshold() {
        let config = QuarantineConfig {
            fault_rate: 0.5,
            min_records: 100,
        };
        assert_eq!(
            quarantine(&counts(0, &[(ErrorClass::Trap, 99)]), &config),
            None
        );
        assert_eq!(
            quarantine(&counts(51, &[(ErrorClass::Oom, 49)]), &config),
            None
        );
        // Invalid input is not a plugin fault.
        assert_eq!(
            quarantine(&counts(0, &[(ErrorClass::Invalid, 200)]), &config),
            None
        );
        let window = counts(40, &[(ErrorClass::Trap, 30), (ErrorClass::Timeout, 30)]);
        let reason = quarantine(&window, &config).expect("60 % faults");
        assert!(
            reason.contains("plugin-fault rate 60.0 % over 100 records"),
            "{reason}"
        );
        let off = QuarantineConfig {
            fault_rate: 0.0,
            ..config
        };
        assert_eq!(
            quarantine(&counts(0, &[(ErrorClass::Trap, 500)]), &off),
            None
        );
    }
}
