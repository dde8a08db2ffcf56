//! Every metric Weir exports, defined in this one place (names: docs/architecture.md, "Public names").
//!
//! The run summary is read from these same counters, so `/metrics` and `--summary-json`
//! can never disagree.

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use serde::Serialize;

use crate::record::ErrorClass;
use crate::runtime::PluginMeta;

/// The `result` label values of `weir_plugin_uploads_total`.
pub const UPLOAD_RESULTS: [&str; 10] = [
    "created",
    "already_stored",
    "unauthorized",
    "bad_name",
    "too_large",
    "not_a_component",
    "unsupported",
    "compile_timeout",
    "compile_memory",
    "error",
];

/// The registry and every metric in it.
pub struct Metrics {
    registry: Registry,
    pub records_in: IntCounter,
    pub records_out: IntCounter,
    pub records_processed: IntCounter,
    pub records_deduplicated: IntCounter,
    pub records_dead_lettered: IntCounterVec,
    pub records_parked: IntCounter,
    pub retries: IntCounter,
    pub plugin_invocation_duration: Histogram,
    pub plugin_traps: IntCounterVec,
    pub plugin_active_info: IntGaugeVec,
    pub dlq_replayed: IntCounter,
    pub hot_swaps: IntCounter,
    pub rollbacks: IntCounterVec,
    pub plugin_uploads: IntCounterVec,
    /// Fates per plugin version, for `/v1/status` (and canary decisions).
    by_version: std::sync::Mutex<BTreeMap<u64, VersionCounts>>,
    pub lease_acquired: IntCounter,
    pub lease_contended: IntCounter,
    pub lease_lost: IntCounter,
    pub circuit_open: IntGaugeVec,
    pub consumer_lag: IntGaugeVec,
    /// Exactly-once mode: batch transactions by `result` (committed, aborted, fenced).
    pub transactions: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
            let c = IntCounter::new(name, help).expect("static metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric name");
            c
        }
        fn counter_vec(
            registry: &Registry,
            name: &str,
            help: &str,
            labels: &[&str],
        ) -> IntCounterVec {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("static metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric name");
            c
        }
        let plugin_invocation_duration = Histogram::with_opts(
            HistogramOpts::new(
                "weir_plugin_invocation_duration_seconds",
                "Wall time of one plugin call (a whole batch, or one record in the per-record world)",
            )
            .buckets(prometheus::exponential_buckets(0.000_05, 4.0, 10).expect("static buckets")),
        )
        .expect("static metric definition");
        registry
            .register(Box::new(plugin_invocation_duration.clone()))
            .expect("unique metric name");
        let plugin_active_info = IntGaugeVec::new(
            Opts::new(
                "weir_plugin_active_info",
                "The plugin version this worker runs (value 1)",
            ),
            &["plugin", "version", "digest"],
        )
        .expect("static metric definition");
        registry
            .register(Box::new(plugin_active_info.clone()))
            .expect("unique metric name");
        let circuit_open = IntGaugeVec::new(
            Opts::new(
                "weir_circuit_open",
                "1 while a dependency does not answer and consumption is paused",
            ),
            &["dependency"],
        )
        .expect("static metric definition");
        registry
            .register(Box::new(circuit_open.clone()))
            .expect("unique metric name");
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "weir_consumer_lag",
                "Records behind the end of each assigned partition (cluster mode)",
            ),
            &["topic", "partition"],
        )
        .expect("static metric definition");
        registry
            .register(Box::new(consumer_lag.clone()))
            .expect("unique metric name");
        let metrics = Self {
            records_in: counter(
                &registry,
                "weir_records_in_total",
                "Records consumed from the source",
            ),
            records_out: counter(
                &registry,
                "weir_records_out_total",
                "Output records written to the sink",
            ),
            records_processed: counter(
                &registry,
                "weir_records_processed_total",
                "Records the plugin transformed successfully (fate: processed)",
            ),
            records_deduplicated: counter(
                &registry,
                "weir_records_deduplicated_total",
                "Records skipped because their id was already done (fate: deduplicated)",
            ),
            records_dead_lettered: counter_vec(
                &registry,
                "weir_records_dead_lettered_total",
                "Records written to the dead-letter queue, by error class (fate: dead_lettered)",
                &["class"],
            ),
            records_parked: counter(
                &registry,
                "weir_records_parked_total",
                "Records the plugin called retryable, parked in the retry topic until their next \
                 attempt (each is read again from there and counted in again)",
            ),
            retries: counter(
                &registry,
                "weir_retries_total",
                "Retry attempts of records the plugin called retryable",
            ),
            plugin_invocation_duration,
            plugin_traps: counter_vec(
                &registry,
                "weir_plugin_traps_total",
                "Plugin calls that did not return, by class (trap, timeout, oom, bad_output)",
                &["class"],
            ),
            plugin_active_info,
            dlq_replayed: counter(
                &registry,
                "weir_dlq_replayed_total",
                "Dead-lettered records fed again by a replay",
            ),
            hot_swaps: counter(
                &registry,
                "weir_hot_swaps_total",
                "Plugin versions swapped in while the pipeline ran (activations and rollbacks)",
            ),
            rollbacks: counter_vec(
                &registry,
                "weir_rollbacks_total",
                "Versions taken out of service by the host, by reason (canary: a failing canary; \
                 quarantine: an active version over the plugin-fault threshold)",
                &["reason"],
            ),
            plugin_uploads: counter_vec(
                &registry,
                "weir_plugin_uploads_total",
                "Plugin uploads to this worker's API, by result: created, already_stored, or \
                 the reason it was refused",
                &["result"],
            ),
            lease_acquired: counter(
                &registry,
                "weir_lease_acquired_total",
                "Record leases taken by this worker",
            ),
            lease_contended: counter(
                &registry,
                "weir_lease_contended_total",
                "Claims that found a record leased by another live worker (the record waits)",
            ),
            lease_lost: counter(
                &registry,
                "weir_lease_lost_total",
                "Records whose lease another worker took over before this one finished \
                 (their offsets are not committed by this worker)",
            ),
            circuit_open,
            consumer_lag,
            transactions: counter_vec(
                &registry,
                "weir_transactions_total",
                "Exactly-once mode: batch transactions committed, aborted (the batch is read \
                 again), or fenced (another producer took over this worker's transactional id, \
                 or its consumer was no longer in the group)",
                &["result"],
            ),
            by_version: std::sync::Mutex::default(),
            registry,
        };
        // Show every class and result from the start, so rates work before the first one.
        for class in ErrorClass::ALL {
            metrics
                .records_dead_lettered
                .with_label_values(&[class.as_str()]);
        }
        for result in UPLOAD_RESULTS {
            metrics.plugin_uploads.with_label_values(&[result]);
        }
        metrics
    }

    /// Marks `meta` as the active plugin version.
    pub fn set_active_plugin(&self, meta: &PluginMeta) {
        self.plugin_active_info.reset();
        self.plugin_active_info
            .with_label_values(&[
                meta.name.as_str(),
                &meta.version.to_string(),
                meta.digest.as_str(),
            ])
            .set(1);
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
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The fates of the records one plugin version had.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct VersionCounts {
    pub processed: u64,
    pub records_out: u64,
    pub dead_lettered: u64,
    pub dead_lettered_by_class: BTreeMap<String, u64>,
}

impl VersionCounts {
    /// What happened between `before` and `now` (either may be missing: nothing yet).
    pub fn since(now: Option<&Self>, before: Option<&Self>) -> Self {
        let (now, before) = (
            now.cloned().unwrap_or_default(),
            before.cloned().unwrap_or_default(),
        );
        let mut by_class = now.dead_lettered_by_class;
        for (class, n) in &before.dead_lettered_by_class {
            if let Some(count) = by_class.get_mut(class) {
                *count = count.saturating_sub(*n);
            }
        }
        Self {
            processed: now.processed.saturating_sub(before.processed),
            records_out: now.records_out.saturating_sub(before.records_out),
            dead_lettered: now.dead_lettered.saturating_sub(before.dead_lettered),
            dead_lettered_by_class: by_class,
        }
    }
}

impl Metrics {
    /// Counts a batch's fates against the version that transformed it.
    pub fn count_version(
        &self,
        version: u64,
        processed: u64,
        records_out: u64,
        dead: &[ErrorClass],
    ) {
        let mut by_version = self
            .by_version
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let counts = by_version.entry(version).or_default();
        counts.processed += processed;
        counts.records_out += records_out;
        counts.dead_lettered += dead.len() as u64;
        for class in dead {
            *counts
                .dead_lettered_by_class
                .entry(class.as_str().to_owned())
                .or_default() += 1;
        }
    }

    /// Fates per plugin version since the worker started.
    pub fn by_version(&self) -> BTreeMap<u64, VersionCounts> {
        self.by_version
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// What a run did (`--summary-json`).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Summary {
    pub records_in: u64,
    pub processed: u64,
    pub records_out: u64,
    pub deduplicated: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub dead_lettered_by_class: BTreeMap<String, u64>,
    /// Parked in the retry topic (`retry.topic`); each comes back as one more record in.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub parked: u64,
    pub elapsed_ms: u64,
    pub records_per_sec: f64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "records in {} | processed {} | out {} | dead-lettered {}",
            self.records_in, self.processed, self.records_out, self.dead_lettered
        )?;
        if !self.dead_lettered_by_class.is_empty() {
            let classes: Vec<String> = self
                .dead_lettered_by_class
                .iter()
                .map(|(class, n)| format!("{class} {n}"))
                .collect();
            write!(f, " ({})", classes.join(", "))?;
        }
        if self.parked > 0 {
            write!(f, " | parked {}", self.parked)?;
        }
        write!(
            f,
            " | deduplicated {} | retried {} | {:.1}s, {} records/s",
            self.deduplicated,
            self.retried,
            self.elapsed_ms as f64 / 1000.0,
            self.records_per_sec
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_the_counters() {
        let m = Metrics::new();
        m.records_in.inc_by(10);
        m.records_processed.inc_by(7);
        m.records_dead_lettered
            .with_label_values(&["trap"])
            .inc_by(2);
        m.records_deduplicated.inc();
        let s = m.summary(Duration::from_secs(2));
        assert_eq!(s.records_in, 10);
        assert_eq!(s.dead_lettered, 2);
        assert_eq!(s.dead_lettered_by_class.get("trap"), Some(&2));
        assert_eq!(s.records_per_sec, 5.0);
        assert!(m.render().contains("weir_records_in_total 10"));
        assert!(!s.to_string().contains("parked"), "{s}");
        m.records_parked.inc();
        let s = m.summary(Duration::from_secs(2));
        assert_eq!(s.parked, 1);
        assert!(s.to_string().contains("| parked 1 |"), "{s}");
        let json = serde_json::to_value(&s).expect("json");
        assert_eq!(json["parked"], 1);
    }
}
