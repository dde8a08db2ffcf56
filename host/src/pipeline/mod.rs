//! The record lifecycle (docs/architecture.md), batch by batch:
//!
//! consume → id → claim (dedup + lease) → invoke the plugin (with retries) → check outputs →
//! write outputs and dead letters → durable → mark done → acknowledge to the source.
//!
//! Four stages run at once, each in a task of its own and a file of its own, handing
//! batches on in order through channels that hold one batch each: **take** (read a batch,
//! compute its ids), **claim** (dedup and leases), **transform** (the plugin, with retries)
//! and **write** (check outputs, send outputs and dead letters). What becomes of each
//! record is decided by the pure functions of [`fate`], unit-tested there. From "durable" on, each batch completes in a
//! task of its own ([`in_flight`]); at most `Settings::max_in_flight_batches` do at once.
//! So while one batch is in the plugin, the next ones are being claimed (up to
//! `CONCURRENT_CLAIMS` at once) and the one before written. A batch that shares an id with
//! one still under way (claimed, not yet marked done) waits before its claim, so the claim
//! sees that id's done mark. A stage that fails or panics stops the take stage; the others
//! drain, and the run returns that stage's error.
//!
//! A stateful plugin's writes ([`keyed`]) are accepted as the plugin returns each processed
//! record, read by the records after it, and made durable with the batch's done marks.
//!
//! With traces on, a batch carries its [`BatchTrace`](crate::traces::BatchTrace) through
//! the stages, each of which ends its span in it.
//!
//! Every consumed record ends in exactly one fate — processed, dead-lettered or
//! deduplicated — and the counters in [`Metrics`] say which.

mod claim;
mod crash;
mod fate;
mod in_flight;
mod keyed;
mod parking;
mod retry;
mod take;
mod transform;
mod write;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use crash::{ABORT_ON_ID_ENV, CrashFiles, CrashGuard};
pub use parking::ParkedSource;
pub use retry::Backoff;

use self::in_flight::Holds;
use self::keyed::Pending;
use crate::metrics::{Metrics, PluginActivated, Summary};
use crate::record::IdSpec;
use crate::runtime::{ActivePlugin, LoadError};
use crate::sink::{DeadLetterSink, OutputCheck, Sink, SinkError};
use crate::source::{Source, SourceError};
use crate::state::{StateError, StateStore};
use crate::traces::Traces;

/// Why a run stopped early. Records of the batches under way have no fate yet and are not
/// marked done, so a rerun picks them up again.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("plugin")]
    Plugin(#[from] LoadError),
    #[error("a pipeline task failed")]
    Join(#[from] tokio::task::JoinError),
}

/// Knobs of the lifecycle.
#[derive(Debug, Clone)]
pub struct Settings {
    pub batch_size: usize,
    pub id: Option<IdSpec>,
    pub backoff: Backoff,
    /// Ignore done marks (a DLQ replay re-feeds records that are marked done on purpose).
    pub bypass_done: bool,
    /// Print a progress line to stderr this often.
    pub progress: Option<Duration>,
    /// Renew the leases of a batch this often while the plugin runs (stores whose leases
    /// expire; a third of the lease TTL).
    pub lease_renewal: Option<Duration>,
    /// Batches whose writes may be awaited at once (at least 1).
    pub max_in_flight_batches: usize,
    /// Park `retryable` records in the retry topic (the sink's [`RETRY_DESTINATION`])
    /// instead of retrying them in the batch.
    pub park_retryable: bool,
    /// Crash-loop protection.
    pub crash_guard: Option<Arc<CrashGuard>>,
    /// Trace batches and records (`traces`).
    pub traces: Option<Traces>,
}

/// A source, a plugin, a sink, a DLQ and a state store, wired together.
pub struct Pipeline {
    /// The plugin version to run; it may be swapped while the pipeline runs.
    pub plugin: Arc<ActivePlugin>,
    pub source: Box<dyn Source>,
    pub sink: Box<dyn Sink>,
    pub dlq: Box<dyn DeadLetterSink>,
    pub state: Arc<dyn StateStore>,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
}

impl Pipeline {
    /// Runs until the source is exhausted or `shutdown` completes (the batches already read
    /// are finished first), and returns the summary.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<Summary, PipelineError> {
        let started = Instant::now();
        (self.metrics).emit(PluginActivated(self.plugin.current().meta()));
        let Pipeline {
            plugin,
            source,
            sink,
            dlq,
            state,
            metrics,
            settings,
        } = self;
        let keyed = state.keyed().map(|durable| Arc::new(Pending::new(durable)));
        let shared = Arc::new(Shared {
            plugin,
            check: sink.checker(),
            keyed,
            state,
            metrics,
            settings,
            holds: Holds::default(),
            failed: tokio::sync::Notify::new(),
        });
        let (taken, to_claim) = mpsc::channel(1);
        let (claimed, to_transform) = mpsc::channel(1);
        let (transformed, to_write) = mpsc::channel(1);
        let claim = shared.spawn(shared.clone().claim_stage(to_claim, claimed));
        let transform = shared.spawn(shared.clone().transform_stage(to_transform, transformed));
        let write = shared.spawn(shared.clone().write_stage(to_write, sink, dlq, started));
        // A stage that stops closes its channels, and the stages next to it stop too; one
        // that fails also stops the take stage at once (the input may be idle). The one that
        // failed says why.
        let taken = shared.take_stage(source, taken, shutdown).await;
        write.await??;
        transform.await??;
        claim.await??;
        let mut source = taken?;
        source.close().await?;
        Ok(shared.metrics.summary(started.elapsed()))
    }
}

/// What the stages share.
struct Shared {
    plugin: Arc<ActivePlugin>,
    /// What the sink takes (checked as the plugin returns outputs).
    check: Arc<dyn OutputCheck>,
    /// Stateful plugins' writes not yet durable (when the store keeps keyed state).
    keyed: Option<Arc<Pending>>,
    state: Arc<dyn StateStore>,
    metrics: Arc<Metrics>,
    settings: Settings,
    holds: Holds,
    /// Notified when a stage fails: no more batches are read.
    failed: tokio::sync::Notify,
}

/// Stops the take stage when dropped armed: a stage ended in an error or a panic.
struct StopTaking(Option<Arc<Shared>>);

impl StopTaking {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for StopTaking {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            shared.failed.notify_one();
        }
    }
}

impl Shared {
    /// Spawns a stage; if it fails or panics, the take stage stops.
    fn spawn(
        self: &Arc<Self>,
        stage: impl Future<Output = Result<(), PipelineError>> + Send + 'static,
    ) -> JoinHandle<Result<(), PipelineError>> {
        let unless_ok = StopTaking(Some(self.clone()));
        tokio::spawn(async move {
            let result = stage.await;
            if result.is_ok() {
                unless_ok.disarm();
            }
            result
        })
    }
}
