//! Every metric Weir exports, defined in this one place (names: docs/architecture.md,
//! "Public names"), and counted only through the typed events of `events.rs`, as Vector's
//! internal events: a caller says what happened ([`Metrics::emit`]), never which metric or
//! label that touches.
//!
//! The run summary is read from these same counters (`summary.rs`), so `/metrics` and
//! `--summary-json` can never disagree.

mod events;
mod summary;

pub use events::{
    CanaryRouted, ClusterSeen, ConsumerLag, DeadLettersReplayed, Dependency, Event,
    ExactlyOnceStarted, HotSwapped, LeasesAcquired, LeasesContended, LeasesLost, PartitionRevoked,
    PluginActivated, PluginCalled, RecordsDeduplicated, RecordsTaken, RetiredBy, RetriesStarted,
    StateRestored, StateUsed, TransactionEnded, TransactionResult, UploadAnswered, UploadResult,
    VersionFates, VersionRetired, WorkerStarted,
};
pub use summary::{Summary, VersionCounts};

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::record::ErrorClass;

/// A metric's name and help text.
type Def = (&'static str, &'static str);

const RECORDS_IN: Def = ("weir_records_in_total", "Records consumed from the source");
const RECORDS_OUT: Def = (
    "weir_records_out_total",
    "Output records written to the sink",
);
const RECORDS_PROCESSED: Def = (
    "weir_records_processed_total",
    "Records the plugin transformed successfully (fate: processed)",
);
const RECORDS_DEDUPLICATED: Def = (
    "weir_records_deduplicated_total",
    "Records skipped because their id was already done (fate: deduplicated)",
);
const RECORDS_DEAD_LETTERED: Def = (
    "weir_records_dead_lettered_total",
    "Records written to the dead-letter queue, by error class (fate: dead_lettered)",
);
const RECORDS_PARKED: Def = (
    "weir_records_parked_total",
    "Records the plugin called retryable, parked in the retry topic until their next attempt \
     (each is read again from there and counted in again)",
);
const RETRIES: Def = (
    "weir_retries_total",
    "Retry attempts of records the plugin called retryable",
);
const PLUGIN_INVOCATION_DURATION: Def = (
    "weir_plugin_invocation_duration_seconds",
    "Wall time of one plugin call (a whole batch, or one record in the per-record world)",
);
const PLUGIN_TRAPS: Def = (
    "weir_plugin_traps_total",
    "Plugin calls that did not return, by class (trap, timeout, oom, bad_output)",
);
const PLUGIN_ACTIVE_INFO: Def = (
    "weir_plugin_active_info",
    "The plugin version this worker runs (value 1)",
);
const DLQ_REPLAYED: Def = (
    "weir_dlq_replayed_total",
    "Dead-lettered records fed again by a replay",
);
const HOT_SWAPS: Def = (
    "weir_hot_swaps_total",
    "Plugin versions swapped in while the pipeline ran (activations and rollbacks)",
);
const ROLLBACKS: Def = (
    "weir_rollbacks_total",
    "Versions taken out of service by the host, by reason (canary: a failing canary; \
     quarantine: an active version over the plugin-fault threshold)",
);
const PLUGIN_UPLOADS: Def = (
    "weir_plugin_uploads_total",
    "Plugin uploads to this worker's API, by result: created, already_stored, or the reason \
     it was refused",
);
const LEASE_ACQUIRED: Def = (
    "weir_lease_acquired_total",
    "Record leases taken by this worker",
);
const LEASE_CONTENDED: Def = (
    "weir_lease_contended_total",
    "Claims that found a record leased by another live worker (the record waits)",
);
const LEASE_LOST: Def = (
    "weir_lease_lost_total",
    "Records whose lease another worker took over before this one finished (their offsets \
     are not committed by this worker)",
);
const CIRCUIT_OPEN: Def = (
    "weir_circuit_open",
    "1 while a dependency does not answer and consumption is paused",
);
const CONSUMER_LAG: Def = (
    "weir_consumer_lag",
    "Records behind the end of each assigned partition (cluster mode)",
);
const TRANSACTIONS: Def = (
    "weir_transactions_total",
    "Exactly-once mode: batch transactions committed, aborted (the batch is read again), or \
     fenced (another producer took over this worker's transactional id, or its consumer was \
     no longer in the group)",
);

const WORKER_INFO: Def = (
    "weir_worker_info",
    "Where this worker reads and writes (value 1): its input, output and dead-letter queue \
     (topics, or files)",
);
const CLUSTER_WORKERS: Def = (
    "weir_cluster_workers",
    "Live workers of this pipeline, as this worker's last heartbeat found them in Redis \
     (cluster mode)",
);
const HEARTBEATS_MISSED: Def = (
    "weir_heartbeats_missed_total",
    "Workers of this pipeline whose heartbeat this worker found out of date in Redis, without \
     a sign-off: killed, hung or cut off (cluster mode; the log names each)",
);
const CANARY_SHARE: Def = (
    "weir_canary_share",
    "The share of records (0 to 1) routed to a canary version; 0 without a canary",
);
const CANARY_VERSION: Def = (
    "weir_canary_version",
    "The version a canary runs; 0 without a canary",
);

const STATE_READS: Def = (
    "weir_state_reads_total",
    "Keyed-state reads (get) by stateful plugins",
);
const STATE_WRITES: Def = (
    "weir_state_writes_total",
    "Keyed-state writes (set, delete) of processed records, accepted to be made durable with \
     their done marks",
);
const STATE_WRITE_BYTES: Def = (
    "weir_state_write_bytes_total",
    "Bytes of keys and values in the accepted keyed-state writes",
);

const STATE_RESTORE_SECONDS: Def = (
    "weir_state_restore_seconds",
    "How long the last takeover of a partition's keyed state took to load it (cluster mode)",
);
const STATE_RESTORED_KEYS: Def = (
    "weir_state_restored_keys",
    "Live keys loaded by the last takeover of a partition's keyed state (cluster mode)",
);

/// The registry and every metric in it.
pub struct Metrics {
    registry: Registry,
    records_in: IntCounter,
    records_out: IntCounter,
    records_processed: IntCounter,
    records_deduplicated: IntCounter,
    records_dead_lettered: IntCounterVec,
    records_parked: IntCounter,
    retries: IntCounter,
    plugin_invocation_duration: Histogram,
    plugin_traps: IntCounterVec,
    plugin_active_info: IntGaugeVec,
    dlq_replayed: IntCounter,
    hot_swaps: IntCounter,
    rollbacks: IntCounterVec,
    plugin_uploads: IntCounterVec,
    lease_acquired: IntCounter,
    lease_contended: IntCounter,
    lease_lost: IntCounter,
    circuit_open: IntGaugeVec,
    consumer_lag: IntGaugeVec,
    transactions: IntCounterVec,
    state_reads: IntCounter,
    state_writes: IntCounter,
    state_write_bytes: IntCounter,
    state_restore_seconds: prometheus::GaugeVec,
    state_restored_keys: IntGaugeVec,
    worker_info: IntGaugeVec,
    cluster_workers: IntGauge,
    heartbeats_missed: IntCounter,
    canary_share: prometheus::Gauge,
    canary_version: IntGauge,
    /// Fates per plugin version, for `/v1/status` (and canary decisions).
    by_version: Mutex<BTreeMap<u64, VersionCounts>>,
}

/// `metric`, registered in `registry`. The definitions are static: neither can fail.
fn registered<M: Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.expect("static metric definition");
    (registry.register(Box::new(metric.clone()))).expect("unique metric name");
    metric
}

impl Metrics {
    /// Metrics without labels of their own (a replay, `weir test`, tests).
    pub fn new() -> Self {
        Self::in_registry(Registry::new())
    }

    /// A worker's metrics: every series carries its `pipeline` and `worker`, so dashboards
    /// and alerts tell pipelines and workers apart whatever the scrape configuration.
    pub fn of_worker(pipeline: &str, worker: &str) -> Self {
        let labels = [("pipeline", pipeline), ("worker", worker)]
            .map(|(name, value)| (name.to_owned(), value.to_owned()));
        let registry = Registry::new_custom(None, Some(labels.into_iter().collect()));
        Self::in_registry(registry.expect("static label names"))
    }

    fn in_registry(registry: Registry) -> Self {
        let counter = |(name, help): Def| registered(&registry, IntCounter::new(name, help));
        let counter_vec = |(name, help): Def, label| {
            registered(
                &registry,
                IntCounterVec::new(Opts::new(name, help), &[label]),
            )
        };
        let gauge_vec = |(name, help): Def, labels: &[&str]| {
            registered(&registry, IntGaugeVec::new(Opts::new(name, help), labels))
        };
        let (name, help) = PLUGIN_INVOCATION_DURATION;
        let buckets = prometheus::exponential_buckets(0.000_05, 4.0, 10);
        let histogram = HistogramOpts::new(name, help).buckets(buckets.expect("static buckets"));
        let metrics = Self {
            records_in: counter(RECORDS_IN),
            records_out: counter(RECORDS_OUT),
            records_processed: counter(RECORDS_PROCESSED),
            records_deduplicated: counter(RECORDS_DEDUPLICATED),
            records_dead_lettered: counter_vec(RECORDS_DEAD_LETTERED, "class"),
            records_parked: counter(RECORDS_PARKED),
            retries: counter(RETRIES),
            plugin_invocation_duration: registered(&registry, Histogram::with_opts(histogram)),
            plugin_traps: counter_vec(PLUGIN_TRAPS, "class"),
            plugin_active_info: gauge_vec(PLUGIN_ACTIVE_INFO, &["plugin", "version", "digest"]),
            dlq_replayed: counter(DLQ_REPLAYED),
            hot_swaps: counter(HOT_SWAPS),
            rollbacks: counter_vec(ROLLBACKS, "reason"),
            plugin_uploads: counter_vec(PLUGIN_UPLOADS, "result"),
            lease_acquired: counter(LEASE_ACQUIRED),
            lease_contended: counter(LEASE_CONTENDED),
            lease_lost: counter(LEASE_LOST),
            circuit_open: gauge_vec(CIRCUIT_OPEN, &["dependency"]),
            consumer_lag: gauge_vec(CONSUMER_LAG, &["topic", "partition"]),
            transactions: counter_vec(TRANSACTIONS, "result"),
            state_reads: counter(STATE_READS),
            state_writes: counter(STATE_WRITES),
            state_write_bytes: counter(STATE_WRITE_BYTES),
            state_restore_seconds: registered(
                &registry,
                prometheus::GaugeVec::new(
                    Opts::new(STATE_RESTORE_SECONDS.0, STATE_RESTORE_SECONDS.1),
                    &["partition"],
                ),
            ),
            state_restored_keys: gauge_vec(STATE_RESTORED_KEYS, &["partition"]),
            worker_info: gauge_vec(WORKER_INFO, &["input", "output", "dlq"]),
            cluster_workers: registered(
                &registry,
                IntGauge::new(CLUSTER_WORKERS.0, CLUSTER_WORKERS.1),
            ),
            heartbeats_missed: counter(HEARTBEATS_MISSED),
            canary_share: registered(
                &registry,
                prometheus::Gauge::new(CANARY_SHARE.0, CANARY_SHARE.1),
            ),
            canary_version: registered(
                &registry,
                IntGauge::new(CANARY_VERSION.0, CANARY_VERSION.1),
            ),
            by_version: Mutex::default(),
            registry,
        };
        // Show every class and result from the start, so rates work before the first one.
        for class in ErrorClass::ALL {
            (metrics.records_dead_lettered).with_label_values(&[class.as_str()]);
        }
        for result in UploadResult::ALL {
            metrics.plugin_uploads.with_label_values(&[result.as_str()]);
        }
        for class in ErrorClass::ALL.into_iter().filter(|c| c.is_plugin_fault()) {
            metrics.plugin_traps.with_label_values(&[class.as_str()]);
        }
        for reason in RetiredBy::ALL {
            metrics.rollbacks.with_label_values(&[reason.as_str()]);
        }
        metrics
    }

    /// Counts what `event` says happened.
    pub fn emit(&self, event: impl Event) {
        event.count(self);
    }

    /// The gauge that is 1 while `dependency` does not answer, for the client that watches it.
    pub fn circuit(&self, dependency: Dependency) -> IntGauge {
        self.circuit_open.with_label_values(&[dependency.as_str()])
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The run summary, read from the counters.
    pub fn summary(&self, elapsed: Duration) -> Summary {
        let mut by_class = BTreeMap::new();
        let mut dead_lettered = 0;
        for class in ErrorClass::ALL {
            let n = self
                .records_dead_lettered
                .with_label_values(&[class.as_str()])
                .get();
            if n > 0 {
                by_class.insert(class.as_str().to_owned(), n);
            }
            dead_lettered += n;
        }
        let records_in = self.records_in.get();
        let secs = elapsed.as_secs_f64();
        Summary {
            records_in,
            processed: self.records_processed.get(),
            records_out: self.records_out.get(),
            deduplicated: self.records_deduplicated.get(),
            retried: self.retries.get(),
            dead_lettered,
            dead_lettered_by_class: by_class,
            parked: self.records_parked.get(),
            elapsed_ms: elapsed.as_millis() as u64,
            records_per_sec: if secs > 0.0 {
                (records_in as f64 / secs).round()
            } else {
                0.0
            },
        }
    }

    /// Fates per plugin version since the worker started.
    pub fn by_version(&self) -> BTreeMap<u64, VersionCounts> {
        (self.by_version.lock())
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_the_counters() {
        let m = Metrics::new();
        m.emit(RecordsTaken { count: 10 });
        m.emit(VersionFates {
            version: 1,
            processed: 7,
            records_out: 7,
            parked: 0,
            dead: &[ErrorClass::Trap, ErrorClass::Trap],
        });
        m.emit(RecordsDeduplicated { count: 1 });
        let s = m.summary(Duration::from_secs(2));
        assert_eq!(s.records_in, 10);
        assert_eq!(s.dead_lettered, 2);
        assert_eq!(s.dead_lettered_by_class.get("trap"), Some(&2));
        assert_eq!(
            m.by_version()[&1].dead_lettered_by_class.get("trap"),
            Some(&2)
        );
        assert_eq!(s.records_per_sec, 5.0);
        assert!(m.render().contains("weir_records_in_total 10"));
        assert!(!s.to_string().contains("parked"), "{s}");
        m.emit(VersionFates {
            version: 1,
            processed: 0,
            records_out: 0,
            parked: 1,
            dead: &[],
        });
        let s = m.summary(Duration::from_secs(2));
        assert_eq!(s.parked, 1);
        assert!(s.to_string().contains("| parked 1 |"), "{s}");
        let json = serde_json::to_value(&s).expect("json");
        assert_eq!(json["parked"], 1);
    }
}
