//! Who is alive in a cluster: every worker writes a heartbeat into Redis every
//! [`HEARTBEAT_EVERY`] (its id, host, pipeline, partitions, plugin version, last seen), kept
//! for [`HEARTBEAT_TTL`], so a dead worker drops out by itself. `weir cluster status` (and
//! later the API) lists them.
//!
//! Key: `weir:<pipeline>:worker:<worker id>`, a JSON [`WorkerInfo`].

use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::state::RedisTarget;

/// How often a worker says it is alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// How long a heartbeat counts.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(10);

/// One worker, as its last heartbeat said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: String,
    pub host: String,
    pub pipeline: String,
    /// The input topic and the partitions this worker consumes.
    pub topic: String,
    pub partitions: Vec<i32>,
    pub plugin: String,
    pub plugin_version: u64,
    pub plugin_digest: String,
    pub last_seen_ms: u64,
}

fn key(pipeline: &str, id: &str) -> String {
    format!("weir:{pipeline}:worker:{id}")
}

/// Writes `info()` every [`HEARTBEAT_EVERY`] until the task is dropped or aborted; failures
/// are logged (the pipeline itself pauses on a Redis outage).
pub async fn heartbeat(
    redis: RedisTarget,
    info: impl Fn() -> WorkerInfo + Send + 'static,
) -> Result<(), redis::RedisError> {
    let client = redis.client()?;
    let mut conn = client.get_connection_manager().await?;
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    loop {
        tick.tick().await;
        let mut me = info();
        me.last_seen_ms = now_ms() as u64;
        let json = serde_json::to_string(&me).unwrap_or_default();
        let set: Result<(), _> = conn
            .pset_ex(
                key(&me.pipeline, &me.id),
                json,
                HEARTBEAT_TTL.as_millis() as u64,
            )
            .await;
        if let Err(e) = set {
            tracing::warn!("heartbeat to Redis failed: {e}");
        }
    }
}

/// Removes a worker's heartbeat (on a graceful stop).
pub async fn sign_off(
    redis: &RedisTarget,
    pipeline: &str,
    id: &str,
) -> Result<(), redis::RedisError> {
    let client = redis.client()?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    conn.del(key(pipeline, id)).await
}

/// Live workers of every pipeline (or of `pipeline`), ordered by pipeline and id.
pub async fn live_workers(
    redis: &RedisTarget,
    pipeline: Option<&str>,
) -> Result<Vec<WorkerInfo>, redis::RedisError> {
    let client = redis.client()?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let pattern = key(pipeline.unwrap_or("*"), "*");
    let mut keys: Vec<String> = Vec::new();
    {
        let mut iter = conn.scan_match::<_, String>(&pattern).await?;
        while let Some(k) = iter.next_item().await {
            keys.push(k?);
        }
    }
    let mut workers = Vec::new();
    for k in keys {
        let json: Option<String> = conn.get(&k).await?;
        if let Some(info) = json.and_then(|j| serde_json::from_str::<WorkerInfo>(&j).ok()) {
            workers.push(info);
        }
    }
    workers.sort_by(|a, b| (&a.pipeline, &a.id).cmp(&(&b.pipeline, &b.id)));
    Ok(workers)
}

/// `weir cluster status`: one line per live worker.
pub fn render(workers: &[WorkerInfo]) -> String {
    if workers.is_empty() {
        return "no live workers (none has sent a heartbeat in the last 10 s)\n".into();
    }
    let now = now_ms() as u64;
    let mut out = format!(
        "{:<32} {:<16} {:<20} {:<16} {:<24} {}\n",
        "WORKER", "HOST", "PIPELINE", "PARTITIONS", "PLUGIN", "LAST SEEN"
    );
    for w in workers {
        let partitions: Vec<String> = w.partitions.iter().map(i32::to_string).collect();
        out.push_str(&format!(
            "{:<32} {:<16} {:<20} {:<16} {:<24} {:.1} s ago\n",
            w.id,
            w.host,
            w.pipeline,
            format!("{}[{}]", w.topic, partitions.join(",")),
            format!("{} v{}", w.plugin, w.plugin_version),
            now.saturating_sub(w.last_seen_ms) as f64 / 1000.0
        ));
    }
    out
}
