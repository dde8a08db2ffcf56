//! The watches of a worker that serves the plugin API: a canary judged against the active
//! version until it is rolled back or promoted, and the active version judged against the
//! quarantine threshold for the worker's lifetime (`canary.rs` holds the judgements).

use std::sync::Arc;
use std::time::Duration;

use super::Control;
use super::canary::{self, Judgement};
use crate::errors::chain;
use crate::metrics::{RetiredBy, VersionCounts, VersionRetired};
use crate::registry::AuditEntry;

/// How often a canary, and the active version, are judged.
const WATCH_EVERY: Duration = Duration::from_millis(200);

/// Guards the running plugin's active version for the worker's lifetime: over each window
/// of `quarantine.min_records` records, a plugin-fault rate at or over
/// `quarantine.fault_rate` quarantines it. It is rolled back to the previous version when
/// there is one; otherwise records wait (none are lost) until an operator activates a
/// version. The audit log and `weir_rollbacks_total{reason="quarantine"}` say why.
pub async fn watch_active(control: Arc<Control>) {
    let Some(running) = control.running.as_ref() else {
        return;
    };
    // The window being judged: the version and its counts when the window started. A
    // version's first window starts at zero, so records it had before the first look count;
    // a version active again later starts from its counts then.
    let mut window: Option<(u64, VersionCounts)> = None;
    let mut seen = std::collections::HashSet::new();
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let version = running.active.current().meta().version;
        let now = running.metrics.by_version();
        if window.as_ref().is_some_and(|(v, _)| *v != version) {
            window = None;
        }
        let (_, start) = window.get_or_insert_with(|| {
            let start = if seen.insert(version) {
                VersionCounts::default()
            } else {
                now.get(&version).cloned().unwrap_or_default()
            };
            (version, start)
        });
        if running.active.is_paused() {
            continue;
        }
        let counts = VersionCounts::since(now.get(&version), Some(start));
        let Some(reason) = canary::quarantine(&counts, &control.quarantine) else {
            if counts.processed + counts.dead_lettered >= control.quarantine.min_records {
                window = None;
            }
            continue;
        };
        window = None;
        let mut entry = AuditEntry::new("weir", "rollback", &running.name);
        entry.version = Some(version);
        let rolled_back = control
            .registry
            .rollback(&running.name, Some(version))
            .await;
        if let Ok(None) = rolled_back {
            continue; // another worker of the cluster rolled it back first
        }
        (running.metrics).emit(VersionRetired(RetiredBy::Quarantine));
        match rolled_back {
            Ok(plugin) => {
                let to = plugin.and_then(|p| p.active);
                tracing::warn!(plugin = %running.name, from = version, ?to, "{reason}: rolled back");
                entry.decision = format!("accepted: automatic: {reason}");
            }
            Err(e) => {
                let e = chain(&e);
                running.active.pause();
                tracing::error!(plugin = %running.name, version, "{reason}; cannot roll back ({e}): records wait until a version is activated");
                entry.decision = format!(
                    "paused: automatic: {reason}; cannot roll back ({e}); records wait until a version is activated"
                );
            }
        }
        if let Err(e) = control.registry.audit(&entry).await {
            tracing::error!(plugin = %running.name, "recording the quarantine failed: {}", chain(&e));
        }
    }
}

/// Watches a canary until it ends: rolls it back when it fails more than the stable version
/// does over the same records, promotes it after `canary.promote_after_records` records.
/// Either way the registry (so every worker, `follow.rs`), the audit log and the metrics
/// say so.
pub(super) async fn watch_canary(control: Arc<Control>, stable: u64, candidate: u64) {
    let Some(running) = control.running.as_ref() else {
        return;
    };
    let name = &running.name;
    let before = running.metrics.by_version();
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let routing = running.active.routing();
        let canary = routing.canary.as_ref().map(|c| c.plugin.meta().version);
        if canary != Some(candidate) || routing.stable.meta().version != stable {
            return; // ended, replaced or promoted by a call or another worker
        }
        let now = running.metrics.by_version();
        let since = |v: u64| VersionCounts::since(now.get(&v), before.get(&v));
        let judgement = canary::judge(&since(stable), &since(candidate), &control.canary);
        let mut entry = AuditEntry::new("weir", "rollback", name);
        entry.version = Some(candidate);
        let changed = match judgement {
            Judgement::Wait => continue,
            Judgement::RollBack(reason) => {
                (running.metrics).emit(VersionRetired(RetiredBy::Canary));
                tracing::warn!(plugin = %name, candidate, "canary rolled back: {reason}");
                entry.decision = format!("accepted: automatic: {reason}");
                control
                    .registry
                    .end_canary(name, Some(candidate))
                    .await
                    .map(|_| true)
            }
            Judgement::Promote => {
                tracing::info!(plugin = %name, candidate, "canary promoted");
                entry.action = "activate".into();
                entry.decision = format!(
                    "accepted: automatic: canary healthy after {} records",
                    control.canary.promote_after_records
                );
                control
                    .registry
                    .promote(name, candidate)
                    .await
                    .map(|p| p.is_some())
            }
        };
        let recorded = match changed {
            Ok(true) => control.registry.audit(&entry).await,
            Ok(false) => Ok(()), // another worker decided first
            Err(e) => Err(e),
        };
        if let Err(e) = recorded {
            tracing::error!(plugin = %name, "recording the canary's end failed: {}", chain(&e));
        }
        return;
    }
}
