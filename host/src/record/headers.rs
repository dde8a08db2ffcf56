//! Every `weir.*` name the host writes into records, in one place. They are public: sinks
//! downstream, `weir dlq` and users' own tools read them (docs/configuration.md lists them).

/// On every output: the id of the input record it came from.
pub const RECORD_ID: &str = "weir.record-id";
/// On every output: the plugin version that produced it.
pub const PLUGIN_VERSION: &str = "weir.plugin-version";
/// On every output: the fencing token of the lease its record was claimed under.
pub const FENCE: &str = "weir.fence";

/// Prefix of the headers that say why a record was dead-lettered (`weir.error.class`, ...).
pub const ERROR_PREFIX: &str = "weir.error.";
/// How often a record was replayed from a DLQ.
pub const REPLAY_COUNT: &str = "weir.replay.count";

/// The sink destination that names the retry topic (reserved: plugins cannot use it).
pub const RETRY_DESTINATION: &str = "weir.retry";
/// Prefix of the headers a record parked in the retry topic carries.
pub const RETRY_PREFIX: &str = "weir.retry.";
pub const RETRY_ID: &str = "weir.retry.id";
pub const RETRY_ATTEMPTS: &str = "weir.retry.attempts";
pub const RETRY_FIRST_FAILURE_MS: &str = "weir.retry.first_failure_ms";
pub const RETRY_DUE_MS: &str = "weir.retry.due_ms";
pub const RETRY_REASON: &str = "weir.retry.reason";

/// The header of one dead-letter field: `error("class")` is `weir.error.class`.
pub fn error(field: &str) -> String {
    format!("{ERROR_PREFIX}{field}")
}
