//! The pipeline as a library, with a source and a sink written here: how a run stops when
//! a stage fails while the input is idle.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use weir::config::{LimitsConfig, RetryConfig};
use weir::metrics::Metrics;
use weir::pipeline::{Backoff, Pipeline, Settings};
use weir::record::{DeadLetter, Output, Record, SourceMeta};
use weir::runtime::{ActivePlugin, Plugin, Runtime};
use weir::sink::{DeadLetterSink, Durable, Lane, OutputCheck, Sink, SinkError};
use weir::source::{Batch, Incoming, Source, SourceError};
use weir::state::EmbeddedStore;

/// One record, then nothing more, ever (an idle topic).
struct OneThenIdle {
    sent: bool,
}

#[async_trait]
impl Source for OneThenIdle {
    async fn next_batch(&mut self, _max: usize) -> Result<Option<Batch>, SourceError> {
        if self.sent {
            return std::future::pending().await;
        }
        self.sent = true;
        Ok(Some(Batch::unacknowledged(vec![Incoming::new(Record {
            key: None,
            value: br#"{"id":"a"}"#.to_vec(),
            headers: Vec::new(),
            timestamp_ms: None,
            source: SourceMeta {
                stream: "idle".into(),
                partition: 0,
                offset: 0,
                attempt: 1,
            },
        })])))
    }
}

/// A sink that can take any output.
struct TakesEverything;

impl OutputCheck for TakesEverything {
    fn check(&self, _output: &Output) -> Result<(), String> {
        Ok(())
    }
}

/// Takes outputs, but they never become durable.
struct NeverDurable;

fn broker_gone() -> SinkError {
    SinkError {
        what: "delivery to topic `out` failed".into(),
        source: std::io::Error::other("broker gone"),
    }
}

#[async_trait]
impl Sink for NeverDurable {
    fn checker(&self) -> Arc<dyn OutputCheck> {
        Arc::new(TakesEverything)
    }

    async fn send(&mut self, _outputs: Vec<Output>, _lane: Lane) -> Result<(), SinkError> {
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        Err(broker_gone())
    }

    async fn seal(&mut self) -> Result<Durable, SinkError> {
        Ok(Box::pin(async { Err(broker_gone()) }))
    }
}

struct NoDeadLetters;

#[async_trait]
impl DeadLetterSink for NoDeadLetters {
    async fn send(&mut self, _letters: Vec<DeadLetter>, _lane: Lane) -> Result<(), SinkError> {
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Panics when given outputs (a bug in a sink).
struct Panicking;

#[async_trait]
impl Sink for Panicking {
    fn checker(&self) -> Arc<dyn OutputCheck> {
        Arc::new(TakesEverything)
    }

    async fn send(&mut self, _outputs: Vec<Output>, _lane: Lane) -> Result<(), SinkError> {
        panic!("a bug in the sink");
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Runs `sink` behind a source that gives one record and then idles; the run's result, or
/// `None` if it did not stop within 30 s.
fn run_until_stopped(sink: Box<dyn Sink>) -> Option<Result<(), String>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = Runtime::new(&LimitsConfig::default()).expect("runtime");
    let plugin = Plugin::load_file(
        &runtime,
        &weir_tests::plugin("faulty"),
        "faulty",
        1,
        vec![("faults".into(), "off".into())],
    )
    .expect("plugin");
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let result = rt.block_on(async {
        let pipeline = Pipeline {
            plugin: Arc::new(ActivePlugin::new(plugin)),
            source: Box::new(OneThenIdle { sent: false }),
            sink,
            dlq: Box::new(NoDeadLetters),
            state: Arc::new(EmbeddedStore::open(dir.path(), "idle", None, 1 << 20).expect("state")),
            metrics: Arc::new(Metrics::new()),
            settings: Settings {
                batch_size: 8,
                id: None,
                backoff: Backoff::new(RetryConfig::default()),
                bypass_done: false,
                progress: None,
                lease_renewal: None,
                max_in_flight_batches: 4,
                park_retryable: false,
                crash_guard: None,
                traces: None,
            },
        };
        tokio::time::timeout(
            Duration::from_secs(30),
            pipeline.run(std::future::pending()),
        )
        .await
    });
    result
        .ok()
        .map(|run| run.map(|_summary| ()).map_err(|e| weir::errors::chain(&e)))
}

#[test]
fn a_write_that_fails_stops_the_run_while_the_input_is_idle() {
    let error = run_until_stopped(Box::new(NeverDurable))
        .expect("the run stops although the source has nothing more to give")
        .expect_err("the failed write is the run's error");
    assert!(error.contains("broker gone"), "{error}");
}

#[test]
fn a_stage_that_panics_stops_the_run_while_the_input_is_idle() {
    let error = run_until_stopped(Box::new(Panicking))
        .expect("the run stops although the source has nothing more to give")
        .expect_err("the panic is the run's error");
    assert!(error.contains("a pipeline task failed"), "{error}");
}
