//! The one configuration tree of a worker, as written: read from TOML (`weir run --config`),
//! overridden by command-line flags, with `${env:…}`/`${file:…}` references to secrets
//! (`secrets.rs`). It imports nothing else of the crate: the worker checks it and turns it
//! into typed values (`worker::Plan`, which names the field at fault).
//!
//! Every field has a safe default, so an empty file is a valid configuration once a plugin,
//! an input and an output are named.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod secrets;

/// A configuration mistake, naming the field and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{}`: {}", .0.field, .0.reason)]
    Secret(secrets::SecretError),
    #[error("config field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

pub fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// The whole configuration of `weir run`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub plugin: PluginConfig,
    pub source: SourceConfig,
    pub sink: SinkConfig,
    pub dlq: DlqConfig,
    pub state: StateConfig,
    pub pipeline: PipelineConfig,
    pub retry: RetryConfig,
    pub limits: LimitsConfig,
    pub metrics: MetricsConfig,
    pub api: ApiConfig,
    pub canary: CanaryConfig,
    pub quarantine: QuarantineConfig,
    pub kafka: KafkaConfig,
    pub tracing: TracingConfig,
}

/// Which plugin to run and how to configure it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginConfig {
    /// Path of the component file (`.wasm`).
    pub path: Option<PathBuf>,
    /// Name used in logs, metrics and DLQ records; defaults to the file name without `.wasm`.
    pub name: Option<String>,
    /// Handed to the plugin's `init` as key/value pairs.
    pub config: BTreeMap<String, String>,
}

/// Where records come from: JSON-lines files (embedded mode) or a Kafka topic.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// A file, a directory of `*.jsonl` files (read in name order), or `-` for stdin.
    pub path: Option<PathBuf>,
    /// The Kafka topic to consume (cluster mode).
    pub topic: Option<String>,
    /// How each line is read.
    pub format: LineFormat,
    /// Keep reading the (last) input file as it grows, until the worker is stopped.
    pub follow: bool,
}

/// How one line of a JSON-lines file maps to a record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineFormat {
    /// The line is the record value; no key, no headers.
    #[default]
    Value,
    /// The line is `{"key", "value", "headers", "timestamp"}` as in the DLQ file.
    Envelope,
}

/// Where outputs go: JSON-lines files or stdout (embedded mode), or Kafka topics.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// Default destination: a file path, or `-` for stdout.
    pub path: Option<PathBuf>,
    /// Default destination in cluster mode: a Kafka topic.
    pub topic: Option<String>,
    /// How each output is written (files only).
    pub format: LineFormat,
    /// Named destinations a plugin may send outputs to: name → file path, or name → topic
    /// in cluster mode.
    pub destinations: BTreeMap<String, PathBuf>,
}

/// Where dead letters go.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DlqConfig {
    /// JSON-lines file; defaults to `<output>.dlq.jsonl` (or `weir.dlq.jsonl` for stdout).
    pub path: Option<PathBuf>,
    /// The dead-letter topic (cluster mode; required there).
    pub topic: Option<String>,
}

/// Done marks (deduplication) and leases: the embedded store, or Redis shared by a cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// Directory of the embedded database (used when `redis_url` is unset).
    pub path: PathBuf,
    /// Redis holding leases and done marks for every worker, e.g. `redis://127.0.0.1:6379`;
    /// `rediss://` for TLS, `user:password@` for AUTH and ACL users, and `${env:NAME}` or
    /// `${file:PATH}` where the password is kept. Run it with AOF on, or fencing tokens go
    /// backwards after a restart.
    pub redis_url: Option<String>,
    /// `redis_url` names nodes of a Redis Cluster (one or more, separated by commas; the
    /// client finds the rest): leases and done marks spread over its masters.
    pub redis_cluster: bool,
    /// On a Redis Cluster, how many buckets (each one slot) a pipeline's ids spread over:
    /// up to this many masters share the work, and each costs a script per batch. Fixed
    /// for a pipeline's life: a new count forgets its done marks.
    pub redis_cluster_buckets: u32,
    /// The CA certificate (PEM) a `rediss://` server's certificate must chain to; unset: the
    /// system's CAs.
    pub redis_ca_file: Option<PathBuf>,
    /// How long a lease outlives a worker that stopped renewing it, in milliseconds.
    pub lease_ttl_ms: u64,
    /// How long a done mark is kept, in seconds; 0 keeps it forever.
    pub done_ttl_secs: u64,
    /// Memory the embedded database may use to cache its pages, in MiB. Its own default
    /// (1 GiB) let a worker's memory grow with its done marks.
    pub cache_mb: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from(".weir/state"),
            redis_url: None,
            redis_cluster: false,
            redis_cluster_buckets: 16,
            redis_ca_file: None,
            lease_ttl_ms: 30_000,
            done_ttl_secs: 0,
            cache_mb: 64,
        }
    }
}

/// The Kafka cluster of cluster mode. Setting `bootstrap` turns cluster mode on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, e.g. `127.0.0.1:9092`.
    pub bootstrap: Option<String>,
    /// Consumer group shared by the workers of one pipeline.
    pub group: Option<String>,
    /// librdkafka properties passed through as they are (consumer and producer alike),
    /// e.g. `"session.timeout.ms" = "10000"`; a value may take its secret from
    /// `${env:NAME}` or `${file:PATH}` (`"sasl.password" = "${env:KAFKA_PASSWORD}"`).
    pub options: BTreeMap<String, String>,
    /// Exactly-once: each batch's outputs, dead letters and consumer offsets in one Kafka
    /// transaction (docs/exactly-once.md).
    pub exactly_once: bool,
    /// The worker slot's `transactional.id` (exactly-once mode): a worker started again
    /// with the same one fences its predecessor's open transaction at once.
    pub transactional_id: Option<String>,
}

/// The record lifecycle.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Names the pipeline in done marks; defaults to the plugin name.
    pub name: Option<String>,
    /// Records per plugin call.
    pub batch_size: usize,
    /// The idempotency key: a JSON pointer into the value (`/id`), `header:<name>`, or `key`.
    /// Records without one (and all records when unset) use their source position.
    pub id: Option<String>,
    /// Seconds between progress lines on stderr; 0 turns them off.
    pub progress_secs: u64,
    /// Batches whose writes are confirmed while the next ones are transformed. More hide
    /// more sink latency; each one adds a batch to what a crashed worker's successor may
    /// process again. Unset: 32, or 128 in exactly-once mode, where a batch stays in flight until its
    /// transaction commits (BENCHMARKS.md).
    pub max_in_flight_batches: Option<usize>,
    /// A record in the plugin this many times when the worker died is dead-lettered as
    /// `crash_loop` instead of run again; 0 turns the guard off.
    pub crash_loop_limit: u32,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            name: None,
            batch_size: 128,
            id: None,
            progress_secs: 2,
            max_in_flight_batches: None,
            crash_loop_limit: 3,
        }
    }
}

/// Retries of records the plugin calls `retryable`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Cap of the first backoff; doubles with each retry (full jitter: a random wait up to it).
    pub initial_backoff_ms: u64,
    /// Cap of any one backoff.
    pub max_backoff_ms: u64,
    /// No retry starts later than this after the first failure.
    pub max_elapsed_ms: u64,
    /// Non-blocking retries (cluster mode): a `retryable` record is parked in this topic
    /// until its next attempt is due, instead of holding its batch (and partition) while it
    /// waits.
    pub topic: Option<String>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff_ms: 50,
            max_backoff_ms: 5_000,
            max_elapsed_ms: 30_000,
            topic: None,
        }
    }
}

/// Sandbox limits of every plugin instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Wall-clock deadline of one plugin call (a whole batch), in milliseconds.
    pub deadline_ms: u64,
    /// Linear memory cap per instance, in MiB.
    pub memory_mb: u64,
    /// Optional fuel (instruction budget) per call; unset means unlimited.
    pub fuel: Option<u64>,
    /// Largest output value (bytes) the host accepts.
    pub max_output_bytes: usize,
    /// Most outputs one record may produce.
    pub max_outputs_per_record: usize,
    /// How much of the end of the guest's stderr joins an error message.
    pub stderr_tail_bytes: usize,
    /// Instances the pooling allocator has room for.
    pub max_instances: u32,
    /// A warm instance is replaced after this many calls, so slow leaks never build up.
    pub max_calls_per_instance: u64,
    /// Largest key (bytes) a stateful plugin may write.
    pub state_key_bytes: usize,
    /// Largest value (bytes) a stateful plugin may write.
    pub state_value_bytes: usize,
    /// Most state writes (sets and deletes) one record may make.
    pub state_writes_per_record: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            deadline_ms: 2_000,
            memory_mb: 256,
            fuel: None,
            max_output_bytes: 1 << 20,
            max_outputs_per_record: 1_000,
            stderr_tail_bytes: 4_096,
            max_instances: 16,
            max_calls_per_instance: 10_000,
            state_key_bytes: 1024,
            state_value_bytes: 64 * 1024,
            state_writes_per_record: 64,
        }
    }
}

impl LimitsConfig {
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }

    pub fn memory_bytes(&self) -> usize {
        usize::try_from(self.memory_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
    }
}

/// The metrics and health server.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address to serve `/metrics`, `/healthz` and `/readyz` on, e.g. `127.0.0.1:9090`.
    pub addr: Option<String>,
}

/// OpenTelemetry traces of batches and records (docs/operations.md), off unless an endpoint
/// is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// Base URL of an OTLP/HTTP receiver (a collector, Jaeger), e.g. `http://127.0.0.1:4318`:
    /// spans go to its `/v1/traces`. Unset: no traces.
    pub otlp_endpoint: Option<String>,
    /// The share of batches traced, from 0 to 1. A record whose `traceparent` header says
    /// sampled or not is traced or not as its producer decided.
    pub sample_ratio: f64,
    /// The `service.name` of the spans.
    pub service_name: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            service_name: "weir".into(),
        }
    }
}

/// The plugin API (`/v1`), served together with `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address to serve on (`--api`), e.g. `127.0.0.1:8080`; unset: no API.
    pub addr: Option<String>,
    /// Let `addr` be beyond loopback. The API has no TLS: put it behind a proxy that has.
    pub allow_non_loopback: bool,
    /// The bearer token of mutating routes (else the `WEIR_ADMIN_TOKEN` environment
    /// variable); with neither, every mutating route answers 401. Never printed.
    #[serde(skip_serializing)]
    pub admin_token: Option<String>,
    /// Whether reading routes answer without the token.
    pub open_reads: bool,
    /// Largest upload in MiB (larger ones get 413).
    pub max_upload_mb: u64,
    /// How long validating (compiling) an upload may take, in seconds.
    pub compile_timeout_secs: u64,
    /// How much memory (resident, MiB) the process that validates an upload may use; 0 runs
    /// the validation inside the worker, bounded in time only.
    pub compile_memory_mb: u64,
    /// The registry's directory; default: `registry` under `state.path`.
    pub registry_path: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            addr: None,
            allow_non_loopback: false,
            admin_token: None,
            open_reads: true,
            max_upload_mb: 64,
            compile_timeout_secs: 60,
            compile_memory_mb: 2048,
            registry_path: None,
        }
    }
}

impl Config {
    /// Reads a TOML file; unknown fields are errors.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// The plugin's name: `plugin.name`, else its file name (see [`plugin_name_of`]).
    pub fn plugin_name(&self) -> String {
        match (&self.plugin.name, &self.plugin.path) {
            (Some(name), _) => name.clone(),
            (None, Some(path)) => plugin_name_of(path),
            (None, None) => "plugin".into(),
        }
    }

    /// The configuration as it may be shown (`--check`): secret options hidden, the Redis
    /// password too; where a secret comes from stays visible.
    pub fn shown(&self) -> Self {
        let mut shown = self.clone();
        for (key, value) in &mut shown.kafka.options {
            *value = secrets::shown(key, value);
        }
        if let Some(url) = &mut shown.state.redis_url {
            *url = secrets::redact_url(url);
        }
        shown
    }

    /// Puts the secrets that `${env:NAME}` and `${file:PATH}` name into the Kafka options
    /// and the Redis URL.
    pub fn resolve_secrets(&mut self) -> Result<(), ConfigError> {
        for (key, value) in &mut self.kafka.options {
            *value = secrets::resolve(&format!("kafka.options.{key}"), value)
                .map_err(ConfigError::Secret)?;
        }
        if let Some(url) = &mut self.state.redis_url {
            *url = secrets::resolve_in_url("state.redis_url", url).map_err(ConfigError::Secret)?;
        }
        Ok(())
    }
}

/// Checks a name of a plugin, a destination or a transactional id.
pub fn check_name(field: &'static str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("`{name}` must be 1-128 characters of A-Z a-z 0-9 - _ ."),
        ))
    }
}

/// A plugin's default name: its file name without `.wasm`, made into a valid plugin name.
pub fn plugin_name_of(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect();
    if name.is_empty() {
        "plugin".into()
    } else {
        name
    }
}

/// `[canary]`: when a canary is rolled back or promoted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CanaryConfig {
    /// How far (as a fraction of records, 0 to 1) the candidate's failure rates may exceed
    /// the stable version's.
    pub margin: f64,
    /// Records the candidate must have had before it is judged.
    pub min_records: u64,
    /// Promote the candidate once it had this many records without failing; 0: only by a
    /// call (activate its version).
    pub promote_after_records: u64,
}

impl Default for CanaryConfig {
    fn default() -> Self {
        Self {
            margin: 0.05,
            min_records: 100,
            promote_after_records: 0,
        }
    }
}

/// `[quarantine]`: when the active version is taken out of service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuarantineConfig {
    /// Quarantine the active version when this fraction of its records (0 to 1) end in a
    /// plugin fault (trap, timeout, oom, bad_output); 0 turns the watch off.
    pub fault_rate: f64,
    /// Records per judgement: the rate is taken over windows of this many records.
    pub min_records: u64,
}

impl Default for QuarantineConfig {
    fn default() -> Self {
        Self {
            fault_rate: 0.5,
            min_records: 100,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_field_is_named() {
        let err = toml::from_str::<Config>("[limits]\ndeadline = 5\n").unwrap_err();
        assert!(
            err.to_string().contains("unknown field `deadline`"),
            "{err}"
        );
    }

    #[test]
    fn the_state_cache_is_set_in_mib() {
        let c = toml::from_str::<Config>("[state]\ncache_mb = 8\n").expect("parses");
        assert_eq!(c.state.cache_mb, 8);
    }
}
