//! A cluster-mode worker's heartbeats into Redis: who it is, its partitions and the plugin
//! version it runs, for `weir cluster status` and `GET /v1/cluster`.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use crate::cluster::WorkerInfo;
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
) -> impl Future<Output = ()> + Send + 'static {
    let (active, partitions) = (plugin.clone(), partitions.clone());
    async move {
        let beats = crate::cluster::heartbeat(redis, move || {
            let running = active.current();
            let partitions = partitions.lock().unwrap_or_else(PoisonError::into_inner);
            WorkerInfo {
                partitions: partitions.as_ref().map(|now| now()).unwrap_or_default(),
                plugin_version: running.meta().version,
                plugin_digest: running.meta().digest.clone(),
                ..info.clone()
            }
        });
        if let Err(e) = beats.await {
            tracing::warn!("heartbeats stopped: {e}");
        }
    }
}
