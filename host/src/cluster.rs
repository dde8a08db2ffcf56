//! Who is alive in a cluster: every worker writes a heartbeat into Redis every
//! [`HEARTBEAT_EVERY`] (its id, host, pipeline, partitions, plugin version, last seen); one
//! older than [`HEARTBEAT_TTL`] no longer counts, so a dead worker drops out by itself.
//! `weir cluster status` (and the API) lists them.
//!
//! Key: the hash `weir:workers`, field `<pipeline>/<worker id>`, a JSON [`WorkerInfo`] (one
//! key, so one slot of a Redis Cluster); the workers of a pipeline delete its heartbeats that
//! ran out (and count them: `weir_heartbeats_missed_total`), and the whole hash goes once no
//! worker has beaten for a [`HEARTBEAT_TTL`].

use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::state::{RedisConnection, RedisTarget};

/// How often a worker says it is alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// How long a heartbeat counts.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(10);

/// The hash of every worker's heartbeat.
const WORKERS: &str = "weir:workers";

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

fn field(pipeline: &str, id: &str) -> String {
    format!("{pipeline}/{id}")
}

/// Writes `info()` every [`HEARTBEAT_EVERY`] until the task is dropped or aborted, and after
/// each beat tells `seen` who of its pipeline is alive and whose heartbeats it found out of
/// date ([`roll_call`]); failures are logged (the pipeline itself pauses on a Redis outage).
pub async fn heartbeat(
    redis: RedisTarget,
    info: impl Fn() -> WorkerInfo + Send + 'static,
    seen: impl Fn(&[WorkerInfo], &[WorkerInfo]) + Send + 'static,
) -> Result<(), redis::RedisError> {
    let mut conn = redis.connect().await?;
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    loop {
        tick.tick().await;
        let mut me = info();
        me.last_seen_ms = now_ms() as u64;
        let json = serde_json::to_string(&me).unwrap_or_default();
        let beat: Result<(), _> = redis::pipe()
            .hset(WORKERS, field(&me.pipeline, &me.id), json)
            .ignore()
            .pexpire(WORKERS, HEARTBEAT_TTL.as_millis() as i64)
            .ignore()
            .query_async(&mut conn)
            .await;
        match beat {
            Ok(()) => match roll_call(&mut conn, Some(&me.pipeline), true).await {
                Ok((live, missed)) => seen(&live, &missed),
                Err(e) => tracing::warn!("reading heartbeats from Redis failed: {e}"),
            },
            Err(e) => tracing::warn!("heartbeat to Redis failed: {e}"),
        }
    }
}

/// Removes a worker's heartbeat (on a graceful stop).
pub async fn sign_off(
    redis: &RedisTarget,
    pipeline: &str,
    id: &str,
) -> Result<(), redis::RedisError> {
    redis
        .connect()
        .await?
        .hdel(WORKERS, field(pipeline, id))
        .await
}

/// Live workers of every pipeline (or of `pipeline`), ordered by pipeline and id.
pub async fn live_workers(
    redis: &RedisTarget,
    pipeline: Option<&str>,
) -> Result<Vec<WorkerInfo>, redis::RedisError> {
    let mut conn = redis.connect().await?;
    Ok(roll_call(&mut conn, pipeline, false).await?.0)
}

/// The workers of every pipeline (or of `pipeline`) whose heartbeat counts, ordered by
/// pipeline and id; and, when `remove`, those of them whose heartbeat this call found out of
/// date and removed (a worker that signs off removes its own, so these stopped without:
/// killed, hung, cut off). Only the workers of a pipeline remove its heartbeats, and each is
/// removed, and returned, by one of them.
async fn roll_call(
    conn: &mut RedisConnection,
    pipeline: Option<&str>,
    remove: bool,
) -> Result<(Vec<WorkerInfo>, Vec<WorkerInfo>), redis::RedisError> {
    let beats: Vec<(String, String)> = conn.hgetall(WORKERS).await?;
    let now = now_ms() as u64;
    let (mut live, mut missed) = (Vec::new(), Vec::new());
    for (field, json) in beats {
        let Ok(info) = serde_json::from_str::<WorkerInfo>(&json) else {
            continue;
        };
        if pipeline.is_some_and(|p| p != info.pipeline) {
            continue;
        }
        if now.saturating_sub(info.last_seen_ms) <= HEARTBEAT_TTL.as_millis() as u64 {
            live.push(info);
        } else if remove {
            let removed: u64 = conn.hdel(WORKERS, field).await?;
            if removed == 1 {
                missed.push(info);
            }
        }
    }
    live.sort_by(|a, b| (&a.pipeline, &a.id).cmp(&(&b.pipeline, &b.id)));
    Ok((live, missed))
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
