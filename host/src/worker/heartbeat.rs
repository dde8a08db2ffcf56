//! A cluster-mode worker's heartbeats into Redis: who it is, its partitions and the plugin
//! version it runs, for `weir cluster status` and `GET /v1/cluster`.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use crate::cluster::WorkerInfo;
use crate::metrics::{ClusterSeen, Metrics};
use crate::runtime::ActivePlugin;
use crate::state::RedisTarget;

/// The partitions the source consumes now.
pub(super) type Partitions = Arc<Mutex<Option<Box<dyn Fn() -> Vec<i32> + Send + Sync>>>>;

/// Beats until stopped; each beat reports the version running then (it changes with hot
/// swaps) and the partitions then (they change with rebalances).
pub(super) fn beat(
    info: WorkerInfo,
    redis: RedisTarget,
    plugin: &Arc<ActivePlugin>,
    partitions: &Partitions,
    metrics: &Arc<Metrics>,
) -> impl Future<Output = ()> + Send + 'static {
    let (active, partitions, metrics) = (plugin.clone(), partitions.clone(), metrics.clone());
    async move {
        let me = move || {
            let running = active.current();
            let partitions = partitions.lock().unwrap_or_else(PoisonError::into_inner);
            WorkerInfo {
                partitions: partitions.as_ref().map(|now| now()).unwrap_or_default(),
                plugin_version: running.meta().version,
                plugin_digest: running.meta().digest.clone(),
                ..info.clone()
            }
        };
        let seen = move |live: &[WorkerInfo], missed: &[WorkerInfo]| {
            let missed: Vec<String> = missed
                .iter()
                .map(|w| format!("{} on {}", w.id, w.host))
                .collect();
            metrics.emit(ClusterSeen {
                live: live.len(),
                missed: &missed,
            });
        };
        let beats = crate::cluster::heartbeat(redis, me, seen);
        if let Err(e) = beats.await {
            tracing::warn!("heartbeats stopped: {e}");
        }
    }
}
