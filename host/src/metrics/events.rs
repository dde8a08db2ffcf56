//! What happens in a worker that a metric counts: one type per event, and the metrics each
//! one moves (`Metrics::emit`). Label values are typed here, so no caller spells one.

use std::time::Duration;

use super::Metrics;
use crate::record::ErrorClass;
use crate::runtime::{Outcome, PluginMeta};

/// Something that happened, counted by the metrics it concerns.
pub trait Event {
    fn count(self, metrics: &Metrics);
}

/// An event that adds its `count` to one counter.
macro_rules! counted {
    ($(#[$doc:meta])* $event:ident => $counter:ident) => {
        $(#[$doc])*
        pub struct $event {
            pub count: u64,
        }

        impl Event for $event {
            fn count(self, m: &Metrics) {
                m.$counter.inc_by(self.count);
            }
        }
    };
}

counted! {
    /// A batch was taken from the source.
    RecordsTaken => records_in
}

counted! {
    /// Records were skipped: their ids were done already (or repeated within their batch).
    RecordsDeduplicated => records_deduplicated
}

/// The fates of a batch's records that one plugin version had, once they are durable.
pub struct VersionFates<'a> {
    pub version: u64,
    pub processed: u64,
    pub records_out: u64,
    /// Parked in the retry topic (no fate yet).
    pub parked: u64,
    /// The class of each record dead-lettered.
    pub dead: &'a [ErrorClass],
}

impl Event for VersionFates<'_> {
    fn count(self, m: &Metrics) {
        m.records_processed.inc_by(self.processed);
        m.records_parked.inc_by(self.parked);
        m.records_out.inc_by(self.records_out);
        for class in self.dead {
            (m.records_dead_lettered.with_label_values(&[class.as_str()])).inc();
        }
        let mut by_version = (m.by_version.lock()).unwrap_or_else(|e| e.into_inner());
        let counts = by_version.entry(self.version).or_default();
        counts.processed += self.processed;
        counts.records_out += self.records_out;
        counts.dead_lettered += self.dead.len() as u64;
        for class in self.dead {
            let class = class.as_str().to_owned();
            *counts.dead_lettered_by_class.entry(class).or_default() += 1;
        }
    }
}

/// A plugin call returned (or trapped) after `elapsed`, with these outcomes.
pub struct PluginCalled<'a> {
    pub elapsed: Duration,
    pub outcomes: &'a [Outcome],
}

impl Event for PluginCalled<'_> {
    fn count(self, m: &Metrics) {
        m.plugin_invocation_duration
            .observe(self.elapsed.as_secs_f64());
        for outcome in self.outcomes {
            if let Outcome::Failed(f) = outcome
                && f.class.is_plugin_fault()
            {
                (m.plugin_traps.with_label_values(&[f.class.as_str()])).inc();
            }
        }
    }
}

/// A stateful plugin's call read keyed state `reads` times and had `writes` writes of
/// `bytes` bytes (keys and values) accepted.
pub struct StateUsed {
    pub reads: u64,
    pub writes: u64,
    pub bytes: u64,
}

impl Event for StateUsed {
    fn count(self, m: &Metrics) {
        m.state_reads.inc_by(self.reads);
        m.state_writes.inc_by(self.writes);
        m.state_write_bytes.inc_by(self.bytes);
    }
}

/// A partition's keyed state taken over and loaded.
pub struct StateRestored<'a>(pub &'a crate::state::Restored);

impl Event for StateRestored<'_> {
    fn count(self, m: &Metrics) {
        let restored = self.0;
        tracing::info!(
            partition = restored.partition,
            epoch = restored.epoch,
            keys = restored.keys,
            "took the partition's keyed state over: loaded {} keys in {:.3} s",
            restored.keys,
            restored.took.as_secs_f64()
        );
        let partition = restored.partition.to_string();
        (m.state_restore_seconds.with_label_values(&[&partition])).set(restored.took.as_secs_f64());
        (m.state_restored_keys.with_label_values(&[&partition])).set(restored.keys as i64);
    }
}

counted! {
    /// Records the plugin called retryable are tried again.
    RetriesStarted => retries
}

counted! {
    /// Leases were taken by this worker.
    LeasesAcquired => lease_acquired
}

counted! {
    /// A claim found records leased by another live worker: they wait.
    LeasesContended => lease_contended
}

counted! {
    /// Another worker took these records' leases over before this one marked them done.
    LeasesLost => lease_lost
}

/// How an exactly-once transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionResult {
    Committed,
    /// Its batches are read again.
    Aborted,
    /// Another producer has this worker's transactional id, or its consumer left the group.
    Fenced,
}

impl TransactionResult {
    const ALL: [Self; 3] = [Self::Committed, Self::Aborted, Self::Fenced];

    fn as_str(self) -> &'static str {
        match self {
            Self::Committed => "committed",
            Self::Aborted => "aborted",
            Self::Fenced => "fenced",
        }
    }
}

/// An exactly-once transaction ended.
pub struct TransactionEnded(pub TransactionResult);

impl Event for TransactionEnded {
    fn count(self, m: &Metrics) {
        m.transactions.with_label_values(&[self.0.as_str()]).inc();
    }
}

/// The consumer learnt how far behind the end of a partition it is.
pub struct ConsumerLag<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub lag: i64,
}

impl Event for ConsumerLag<'_> {
    fn count(self, m: &Metrics) {
        let partition = self.partition.to_string();
        (m.consumer_lag.with_label_values(&[self.topic, &partition])).set(self.lag);
    }
}

/// A dependency whose circuit is watched (`weir_circuit_open{dependency}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    /// The outputs' Kafka topics.
    Sink,
    /// The dead-letter topic.
    Dlq,
    Redis,
}

impl Dependency {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Sink => "sink",
            Self::Dlq => "dlq",
            Self::Redis => "redis",
        }
    }
}

/// How the API answered an upload (`weir_plugin_uploads_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadResult {
    Created,
    AlreadyStored,
    Unauthorized,
    BadName,
    TooLarge,
    NotAComponent,
    Unsupported,
    CompileTimeout,
    CompileMemory,
    Error,
}

impl UploadResult {
    pub(super) const ALL: [Self; 10] = [
        Self::Created,
        Self::AlreadyStored,
        Self::Unauthorized,
        Self::BadName,
        Self::TooLarge,
        Self::NotAComponent,
        Self::Unsupported,
        Self::CompileTimeout,
        Self::CompileMemory,
        Self::Error,
    ];

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::AlreadyStored => "already_stored",
            Self::Unauthorized => "unauthorized",
            Self::BadName => "bad_name",
            Self::TooLarge => "too_large",
            Self::NotAComponent => "not_a_component",
            Self::Unsupported => "unsupported",
            Self::CompileTimeout => "compile_timeout",
            Self::CompileMemory => "compile_memory",
            Self::Error => "error",
        }
    }
}

/// The API answered an upload.
pub struct UploadAnswered(pub UploadResult);

impl Event for UploadAnswered {
    fn count(self, m: &Metrics) {
        m.plugin_uploads.with_label_values(&[self.0.as_str()]).inc();
    }
}

/// This version is the one the worker runs now.
pub struct PluginActivated<'a>(pub &'a PluginMeta);

impl Event for PluginActivated<'_> {
    fn count(self, m: &Metrics) {
        let meta = self.0;
        m.plugin_active_info.reset();
        let version = meta.version.to_string();
        let labels = [meta.name.as_str(), &version, meta.digest.as_str()];
        m.plugin_active_info.with_label_values(&labels).set(1);
    }
}

/// A version was swapped in while the pipeline ran (an activation or a rollback).
pub struct HotSwapped;

impl Event for HotSwapped {
    fn count(self, m: &Metrics) {
        m.hot_swaps.inc();
    }
}

/// Why the host took a version out of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetiredBy {
    /// A canary failed more than the stable version.
    Canary,
    /// The active version went over the plugin-fault threshold.
    Quarantine,
}

/// The host took a version out of service.
pub struct VersionRetired(pub RetiredBy);

impl RetiredBy {
    pub const ALL: [RetiredBy; 2] = [RetiredBy::Canary, RetiredBy::Quarantine];

    /// Its `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            RetiredBy::Canary => "canary",
            RetiredBy::Quarantine => "quarantine",
        }
    }
}

impl Event for VersionRetired {
    fn count(self, m: &Metrics) {
        m.rollbacks.with_label_values(&[self.0.as_str()]).inc();
    }
}

/// A worker started: where it reads and writes (topic names, or file paths).
pub struct WorkerStarted<'a> {
    pub input: &'a str,
    pub output: &'a str,
    pub dlq: &'a str,
}

impl Event for WorkerStarted<'_> {
    fn count(self, m: &Metrics) {
        m.worker_info.reset();
        let labels = [self.input, self.output, self.dlq];
        m.worker_info.with_label_values(&labels).set(1);
    }
}

/// A heartbeat found `live` workers of this worker's pipeline in Redis, and the heartbeats of
/// `missed` more out of date (each named in the log, once, by the worker that removed it).
pub struct ClusterSeen<'a> {
    pub live: usize,
    pub missed: &'a [String],
}

impl Event for ClusterSeen<'_> {
    fn count(self, m: &Metrics) {
        m.cluster_workers.set(self.live as i64);
        for worker in self.missed {
            tracing::warn!(%worker, "a worker of this pipeline stopped beating without signing off (killed, hung, or cut off from Redis)");
        }
        m.heartbeats_missed.inc_by(self.missed.len() as u64);
    }
}

/// The canary now: `version` gets `percent` of the records (`None`: no canary).
pub struct CanaryRouted(pub Option<(u64, f64)>);

impl Event for CanaryRouted {
    fn count(self, m: &Metrics) {
        let (version, percent) = self.0.unwrap_or_default();
        m.canary_version.set(version as i64);
        m.canary_share.set(percent / 100.0);
    }
}

counted! {
    /// Dead letters were fed through a plugin again.
    DeadLettersReplayed => dlq_replayed
}

/// Exactly-once mode began: its transactions' results are shown from zero.
pub struct ExactlyOnceStarted;

impl Event for ExactlyOnceStarted {
    fn count(self, m: &Metrics) {
        for result in TransactionResult::ALL {
            m.transactions.with_label_values(&[result.as_str()]);
        }
    }
}

/// A partition was revoked from this consumer: its lag is another's to report.
pub struct PartitionRevoked<'a> {
    pub topic: &'a str,
    pub partition: i32,
}

impl Event for PartitionRevoked<'_> {
    fn count(self, m: &Metrics) {
        let partition = self.partition.to_string();
        let _ = m
            .consumer_lag
            .remove_label_values(&[self.topic, &partition]);
    }
}
