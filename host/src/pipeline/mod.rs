//! The record lifecycle (docs/architecture.md), batch by batch:
//!
//! consume → id → claim (dedup + lease) → invoke the plugin (with retries) → check outputs →
//! write outputs and dead letters → durable → mark done → acknowledge to the source.
//!
//! Four stages run at once, each in a task of its own, handing batches on in order through
//! channels that hold one batch each: **take** (read a batch, compute its ids), **claim**
//! (dedup and leases), **transform** (the plugin, with retries) and **write** (check
//! outputs, send outputs and dead letters). From "durable" on, each batch completes in a
//! task of its own ([`in_flight`]); at most `Settings::max_in_flight_batches` do at once.
//! So while one batch is in the plugin, the next ones are being claimed (up to
//! `CONCURRENT_CLAIMS` at once) and the one before written. A batch that shares an id with
//! one still under way (claimed, not yet marked done) waits before its claim, so the claim
//! sees that id's done mark. A stage that fails or panics stops the take stage; the others
//! drain, and the run returns that stage's error.
//!
//! Every consumed record ends in exactly one fate — processed, dead-lettered or
//! deduplicated — and the counters in [`Metrics`] say which.

mod crash;
mod parking;

pub use crash::{ABORT_ON_ID_ENV, CrashFiles, CrashGuard};
use parking::Parked;
pub use parking::ParkedSource;
mod in_flight;
mod retry;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use retry::Backoff;

use self::in_flight::{Completion, Counts, Hold, Holds, InFlight, Tally};
use crate::clock::now_ms;
use crate::metrics::{Metrics, Summary};
use crate::record::headers;
use crate::record::{
    DeadLetter, ErrorClass, ErrorInfo, IdSpec, Output, Record, SourceMeta, record_id,
};
use crate::runtime::{ActivePlugin, Failure, LoadError, Outcome, Plugin, PluginMeta, Routing};
use crate::sink::{DeadLetterSink, Durable, Sink, SinkError};
use crate::source::{Ack, Incoming, Source, SourceError};
use crate::state::{Claim, StateError, StateStore};

/// How long a record whose lease another worker holds waits before it is claimed again.
const PARKED_RECHECK: Duration = Duration::from_millis(200);

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

/// What became of one record the plugin was asked about.
enum Verdict {
    Outputs(Vec<Output>),
    Failed(Failed),
    /// Retryable, to be parked in the retry topic until `due_ms`.
    Parked {
        reason: String,
        attempts: u32,
        first_failure_ms: i64,
        due_ms: i64,
    },
}

struct Failed {
    failure: Failure,
    attempts: u32,
    first_failure_ms: i64,
    last_failure_ms: i64,
}

fn placeholder() -> Record {
    Record {
        key: None,
        value: Vec::new(),
        headers: Vec::new(),
        timestamp_ms: None,
        source: SourceMeta {
            stream: String::new(),
            partition: 0,
            offset: 0,
            attempt: 0,
        },
    }
}

impl Pipeline {
    /// Runs until the source is exhausted or `shutdown` completes (the batches already read
    /// are finished first), and returns the summary.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<Summary, PipelineError> {
        let started = Instant::now();
        self.metrics.set_active_plugin(self.plugin.current().meta());
        let Pipeline {
            plugin,
            source,
            sink,
            dlq,
            state,
            metrics,
            settings,
        } = self;
        let shared = Arc::new(Shared {
            plugin,
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

/// Batches whose claims may be under way at once.
const CONCURRENT_CLAIMS: usize = 4;

/// What the stages share.
struct Shared {
    plugin: Arc<ActivePlugin>,
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

/// A batch as read: its records, their ids and the token that acknowledges them.
struct Taken {
    batch: Vec<Incoming>,
    ids: Vec<String>,
    ack: Box<dyn Ack>,
}

/// What the claim decided for a batch. Records without a fate yet are in `work`.
struct Claimed {
    ids: Vec<String>,
    hold: Hold,
    ack: Box<dyn Ack>,
    /// The records the plugin is to see, and (index in the batch, fence) of each.
    work: Vec<Record>,
    to_run: Vec<(usize, u64)>,
    /// Dead letters decided before the plugin (records the source could not read).
    letters: Vec<DeadLetter>,
    /// (id, fence) of every record with a fate, and where it sits in the batch.
    finished: Vec<(String, u64)>,
    finished_at: Vec<usize>,
    deduplicated: u64,
    /// Whether a record of `work` was in the plugin when a worker died (they run alone).
    suspect: bool,
}

/// A claimed batch after the plugin: a verdict for each record of `work`.
struct Transformed {
    claimed: Claimed,
    verdicts: Vec<Verdict>,
    /// The versions that transformed the batch (outputs and dead letters name theirs).
    routing: Routing,
    /// Per record of `work`: whether the canary transformed it (empty without a canary).
    on_canary: Vec<bool>,
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

    /// Reads batches and computes their ids until the source is exhausted, `shutdown`
    /// completes or the next stage stops. Returns the source, to be closed once the batches
    /// taken are complete.
    async fn take_stage(
        &self,
        mut source: Box<dyn Source>,
        out: mpsc::Sender<Taken>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Box<dyn Source>, PipelineError> {
        tokio::pin!(shutdown);
        loop {
            let batch = tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = out.closed() => break,
                () = self.failed.notified() => break,
                batch = source.next_batch(self.settings.batch_size) => batch?,
            };
            let Some(batch) = batch else { break };
            self.metrics.records_in.inc_by(batch.len() as u64);
            let ids = batch
                .iter()
                .map(|inc| {
                    inc.known_id
                        .clone()
                        .unwrap_or_else(|| record_id(self.settings.id.as_ref(), &inc.record))
                })
                .collect();
            let ack = source.ack_last_batch();
            // Waiting for room (a dependency may be away), the source keeps its place.
            let room = tokio::select! {
                room = out.reserve() => room,
                never = source.keep_alive() => match never {},
            };
            let Ok(room) = room else { break };
            room.send(Taken { batch, ids, ack });
        }
        Ok(source)
    }

    /// Claims up to [`CONCURRENT_CLAIMS`] batches at once (a state store round trip each),
    /// handing them on in the order they were taken.
    async fn claim_stage(
        self: Arc<Self>,
        mut input: mpsc::Receiver<Taken>,
        out: mpsc::Sender<Claimed>,
    ) -> Result<(), PipelineError> {
        let mut claiming: InFlight<Claimed> = InFlight::default();
        let mut open = true;
        loop {
            let busy = !claiming.is_empty();
            let room = open && claiming.len() < CONCURRENT_CLAIMS;
            tokio::select! {
                biased;
                claimed = claiming.oldest(), if busy => {
                    if out.send(claimed?).await.is_err() {
                        break;
                    }
                }
                taken = input.recv(), if room => {
                    let Some(taken) = taken else {
                        open = false;
                        continue;
                    };
                    let keys = self.holds.keys(&taken.ids);
                    if self.holds.any_held(&keys) {
                        // An earlier batch holds one of these ids: hand on the batches being
                        // claimed (their completion releases the ids), then wait.
                        while !claiming.is_empty() {
                            if out.send(claiming.oldest().await?).await.is_err() {
                                return Ok(());
                            }
                        }
                        self.holds.wait_free(&keys).await;
                    }
                    let hold = self.holds.hold(keys);
                    claiming.push(self.clone().decide(taken, hold));
                }
                else => break,
            }
        }
        Ok(())
    }

    async fn transform_stage(
        self: Arc<Self>,
        mut input: mpsc::Receiver<Claimed>,
        out: mpsc::Sender<Transformed>,
    ) -> Result<(), PipelineError> {
        while let Some(mut claimed) = input.recv().await {
            let work = std::mem::take(&mut claimed.work);
            let running = async {
                // A quarantined plugin with nothing to fall back to: the batch waits (its
                // leases renewed) until an operator activates a version.
                self.plugin.serving().await;
                // The batch runs on these versions to the end, retries included.
                let routing = self.plugin.routing();
                let on_canary: Vec<bool> = match &routing.canary {
                    Some(canary) => claimed
                        .to_run
                        .iter()
                        .map(|&(i, _)| canary.takes(&claimed.ids[i]))
                        .collect(),
                    None => Vec::new(),
                };
                let ids: Vec<&str> = claimed
                    .to_run
                    .iter()
                    .map(|&(i, _)| claimed.ids[i].as_str())
                    .collect();
                let (work, verdicts) = self
                    .invoke_guarded(&routing, &on_canary, work, &ids, claimed.suspect)
                    .await?;
                Ok::<_, PipelineError>((work, verdicts, routing, on_canary))
            };
            let (work, verdicts, routing, on_canary) = self
                .renewing(&claimed.ids, &claimed.to_run, running)
                .await??;
            claimed.work = work;
            let transformed = Transformed {
                claimed,
                verdicts,
                routing,
                on_canary,
            };
            if out.send(transformed).await.is_err() {
                break;
            }
        }
        Ok(())
    }

    async fn write_stage(
        self: Arc<Self>,
        mut input: mpsc::Receiver<Transformed>,
        mut sink: Box<dyn Sink>,
        mut dlq: Box<dyn DeadLetterSink>,
        started: Instant,
    ) -> Result<(), PipelineError> {
        let mut in_flight = InFlight::default();
        let mut last_progress = Instant::now();
        loop {
            let batch = tokio::select! {
                biased;
                failed = in_flight.failure() => return Err(failed),
                batch = input.recv() => batch,
            };
            let Some(batch) = batch else { break };
            let completion = self.write(batch, sink.as_mut(), dlq.as_mut()).await?;
            in_flight.push(completion.run());
            in_flight.limit(self.settings.max_in_flight_batches).await?;
            if let Some(every) = self.settings.progress
                && last_progress.elapsed() >= every
            {
                last_progress = Instant::now();
                eprintln!("weir: {}", self.metrics.summary(started.elapsed()));
            }
        }
        in_flight.drain().await
    }

    /// Runs `work` (whose ids are `ids`) on `routing`, noting what is in the plugin for the
    /// crash guard: the whole batch at once, or one record at a time when one of them was in
    /// the plugin when a worker died (`suspect`).
    async fn invoke_guarded(
        &self,
        routing: &Routing,
        on_canary: &[bool],
        work: Vec<Record>,
        ids: &[&str],
        suspect: bool,
    ) -> Result<(Vec<Record>, Vec<Verdict>), PipelineError> {
        let Some(guard) = &self.settings.crash_guard else {
            return self.invoke_routed(routing, on_canary, work).await;
        };
        if !suspect {
            guard.enter(ids, false).await?;
            let done = self.invoke_routed(routing, on_canary, work).await?;
            guard.leave(ids, false).await?;
            return Ok(done);
        }
        tracing::warn!(
            "a record of this batch was in a worker that died: its {} records run one by one",
            ids.len()
        );
        let (mut records, mut verdicts) = (Vec::new(), Vec::new());
        for (k, (record, id)) in work.into_iter().zip(ids).enumerate() {
            let canary = on_canary.get(k).map(|&c| vec![c]).unwrap_or_default();
            guard.enter(&[id], true).await?;
            let (record, verdict) = self.invoke_routed(routing, &canary, vec![record]).await?;
            guard.leave(&[id], true).await?;
            records.extend(record);
            verdicts.extend(verdict);
        }
        Ok((records, verdicts))
    }

    /// Claims a batch and decides what the plugin sees: not done, not a repeat within this
    /// batch, readable.
    async fn decide(self: Arc<Self>, taken: Taken, hold: Hold) -> Result<Claimed, PipelineError> {
        let Taken { batch, ids, ack } = taken;
        let claims = self.claim(&ids).await?;
        let crashes = match &self.settings.crash_guard {
            Some(guard) => {
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                let in_flight: Vec<u32> = claims
                    .iter()
                    .map(|claim| match claim {
                        Claim::Leased { crashes, .. } => *crashes,
                        _ => 0,
                    })
                    .collect();
                guard.crashes(&ids, &in_flight).await?
            }
            None => Vec::new(),
        };
        let mut suspect = false;
        let n = batch.len();
        let mut work = Vec::with_capacity(n);
        let mut to_run = Vec::with_capacity(n);
        let mut letters = Vec::new();
        let mut finished = Vec::with_capacity(n);
        let mut finished_at = Vec::with_capacity(n);
        let mut seen = HashSet::with_capacity(n);
        let mut deduplicated = 0;
        for (i, (incoming, claim)) in batch.into_iter().zip(&claims).enumerate() {
            let fence = match claim {
                Claim::Leased { fence, .. } => *fence,
                Claim::Done if self.settings.bypass_done => 0,
                Claim::Done | Claim::HeldElsewhere => {
                    deduplicated += 1;
                    continue;
                }
            };
            if !seen.insert(ids[i].as_str()) {
                deduplicated += 1;
                continue;
            }
            let crashes = crashes.get(i).copied().unwrap_or(0);
            let crash_loop = self.settings.crash_guard.as_ref().and_then(|guard| {
                if crashes < guard.limit() {
                    return None;
                }
                let failure = Failure::new(
                    ErrorClass::CrashLoop,
                    format!(
                        "the worker died {crashes} times while this record was in the plugin \
                         (pipeline.crash_loop_limit = {}): it is not run again",
                        guard.limit()
                    ),
                );
                Some((failure, crashes))
            });
            let refused = match (incoming.rejected, crash_loop) {
                (Some(reason), _) => Some((Failure::new(ErrorClass::Invalid, reason), 0)),
                (None, crash_loop) => crash_loop,
            };
            match refused {
                Some((failure, attempts)) => {
                    let now = now_ms();
                    let failed = Failed {
                        failure,
                        attempts,
                        first_failure_ms: now,
                        last_failure_ms: now,
                    };
                    let stable = self.plugin.current();
                    letters.push(dead_letter(stable.meta(), incoming.record, &ids[i], failed));
                    finished.push((ids[i].clone(), fence));
                    finished_at.push(i);
                }
                None => {
                    suspect |= crashes > 0;
                    work.push(incoming.record);
                    to_run.push((i, fence));
                }
            }
        }
        Ok(Claimed {
            ids,
            hold,
            ack,
            work,
            to_run,
            letters,
            finished,
            finished_at,
            deduplicated,
            suspect,
        })
    }

    /// Checks a transformed batch's outputs, sends its outputs and dead letters, and returns
    /// the rest of its lifecycle.
    async fn write(
        &self,
        batch: Transformed,
        sink: &mut dyn Sink,
        dlq: &mut dyn DeadLetterSink,
    ) -> Result<Completion, PipelineError> {
        let Transformed {
            claimed,
            verdicts,
            routing,
            on_canary,
        } = batch;
        let Claimed {
            mut ids,
            hold,
            mut ack,
            work,
            to_run,
            mut letters,
            mut finished,
            mut finished_at,
            deduplicated,
            suspect: _,
        } = claimed;
        let stable = routing.stable.meta();
        let candidate = routing.canary.as_ref().map(|c| c.plugin.meta());
        let versions = [stable, candidate.unwrap_or(stable)].map(|m| m.version.to_string());
        let mut outputs = Vec::new();
        let mut released = Vec::new();
        let mut tallies: BTreeMap<u64, Tally> = BTreeMap::new();
        let records = work.into_iter().zip(verdicts).zip(&to_run);
        for (k, ((record, verdict), &(i, fence))) in records.enumerate() {
            let on_canary = on_canary.get(k).copied().unwrap_or(false);
            let meta = candidate.filter(|_| on_canary).unwrap_or(stable);
            let version = &versions[usize::from(on_canary)];
            let id = &ids[i];
            let verdict = match verdict {
                Verdict::Outputs(outs) => match outs.iter().find_map(|o| sink.check(o).err()) {
                    None => Verdict::Outputs(outs),
                    Some(reason) => {
                        let now = now_ms();
                        Verdict::Failed(Failed {
                            failure: Failure::new(ErrorClass::BadOutput, reason),
                            attempts: record.source.attempt,
                            first_failure_ms: now,
                            last_failure_ms: now,
                        })
                    }
                },
                failed => failed,
            };
            match verdict {
                Verdict::Outputs(outs) => {
                    let tally = tallies.entry(meta.version).or_default();
                    tally.processed += 1;
                    tally.records_out += outs.len() as u64;
                    for mut out in outs {
                        out.headers.extend([
                            (headers::RECORD_ID.to_owned(), id.as_bytes().to_vec()),
                            (
                                headers::PLUGIN_VERSION.to_owned(),
                                version.as_bytes().to_vec(),
                            ),
                            (headers::FENCE.to_owned(), fence.to_string().into_bytes()),
                        ]);
                        outputs.push(out);
                    }
                }
                Verdict::Failed(failed) => letters.push(dead_letter(meta, record, id, failed)),
                Verdict::Parked {
                    reason,
                    attempts,
                    first_failure_ms,
                    due_ms,
                } => {
                    let parked = Parked {
                        id: id.clone(),
                        attempts,
                        first_failure_ms,
                        due_ms,
                    };
                    outputs.push(parked.output(record, &reason));
                    tallies.entry(meta.version).or_default().parked += 1;
                    // No fate yet: no done mark, and the lease goes for the next attempt.
                    released.push((parked.id, fence));
                    continue;
                }
            }
            // The id is not needed here any more: it moves on to its done mark.
            finished.push((std::mem::take(&mut ids[i]), fence));
            finished_at.push(i);
        }

        // Durable downstream first (committed with the source's position, in exactly-once
        // mode), then done marks, then the source.
        for letter in &letters {
            let tally = tallies.entry(letter.error.plugin_version).or_default();
            tally.dead.push(letter.error.class);
        }
        ack.begin().await?;
        let sent = async {
            sink.send(outputs).await?;
            dlq.send(letters).await?;
            Ok::<_, SinkError>([sink.seal().await?, dlq.seal().await?])
        };
        // A failure to send is handled as one to deliver (`Completion::run`).
        let writes = sent.await.unwrap_or_else(|failed| {
            let failed: Durable = Box::pin(std::future::ready(Err(failed)));
            [failed, Box::pin(std::future::ready(Ok(())))]
        });
        Ok(Completion {
            writes,
            finished,
            finished_at,
            released,
            ack,
            hold,
            state: self.state.clone(),
            metrics: self.metrics.clone(),
            counts: Counts {
                deduplicated,
                by_version: tallies,
            },
        })
    }

    /// Claims ids; records whose lease another worker holds are re-claimed until they are
    /// done or ours (never skipped).
    async fn claim(&self, ids: &[String]) -> Result<Vec<Claim>, PipelineError> {
        let mut claims = self.state.claim(ids).await?;
        let acquired = |claims: &[Claim]| {
            claims
                .iter()
                .filter(|c| matches!(c, Claim::Leased { .. }))
                .count() as u64
        };
        self.metrics.lease_acquired.inc_by(acquired(&claims));
        let mut last_renewal = Instant::now();
        loop {
            let parked: Vec<usize> = (0..ids.len())
                .filter(|&i| claims[i] == Claim::HeldElsewhere)
                .collect();
            if parked.is_empty() {
                return Ok(claims);
            }
            self.metrics.lease_contended.inc_by(parked.len() as u64);
            tokio::time::sleep(PARKED_RECHECK).await;
            // Keep the leases already taken while the parked records wait.
            if let Some(every) = self.settings.lease_renewal
                && last_renewal.elapsed() >= every
            {
                let held: Vec<(String, u64)> = ids
                    .iter()
                    .zip(&claims)
                    .filter_map(|(id, c)| match c {
                        Claim::Leased { fence, .. } => Some((id.clone(), *fence)),
                        _ => None,
                    })
                    .collect();
                self.state.renew(&held).await?;
                last_renewal = Instant::now();
            }
            let again: Vec<String> = parked.iter().map(|&i| ids[i].clone()).collect();
            let reclaimed = self.state.claim(&again).await?;
            self.metrics.lease_acquired.inc_by(acquired(&reclaimed));
            for (i, claim) in parked.into_iter().zip(reclaimed) {
                claims[i] = claim;
            }
        }
    }

    /// Awaits `work`, renewing the leases of the records at `to_run` (index in `ids`, fence)
    /// meanwhile, so a slow batch keeps them.
    async fn renewing<T>(
        &self,
        ids: &[String],
        to_run: &[(usize, u64)],
        work: impl Future<Output = T>,
    ) -> Result<T, PipelineError> {
        let Some(every) = self.settings.lease_renewal.filter(|_| !to_run.is_empty()) else {
            return Ok(work.await);
        };
        tokio::pin!(work);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        // Built on the first renewal: most batches finish before one is due.
        let mut leases: Vec<(String, u64)> = Vec::new();
        loop {
            tokio::select! {
                out = &mut work => return Ok(out),
                _ = tick.tick() => {
                    if leases.is_empty() {
                        leases = to_run
                            .iter()
                            .map(|&(i, fence)| (ids[i].clone(), fence))
                            .collect();
                    }
                    let held = self.state.renew(&leases).await?;
                    let lost = held.iter().filter(|h| !**h).count();
                    if lost > 0 {
                        tracing::warn!(lost, "leases expired while the plugin ran; another worker may take those records over");
                    }
                }
            }
        }
    }

    /// One plugin call off the async reactor, timed and counted.
    async fn call(
        &self,
        plugin: &Arc<Plugin>,
        records: Vec<Record>,
    ) -> Result<(Vec<Record>, Vec<Outcome>), PipelineError> {
        if records.is_empty() {
            return Ok((records, Vec::new()));
        }
        let plugin = plugin.clone();
        let started = Instant::now();
        let (records, outcomes) = tokio::task::spawn_blocking(move || {
            let outcomes = plugin.transform(&records);
            (records, outcomes)
        })
        .await?;
        self.metrics
            .plugin_invocation_duration
            .observe(started.elapsed().as_secs_f64());
        let outcomes = outcomes?;
        for outcome in &outcomes {
            if let Outcome::Failed(f) = outcome
                && f.class.is_plugin_fault()
            {
                self.metrics
                    .plugin_traps
                    .with_label_values(&[f.class.as_str()])
                    .inc();
            }
        }
        Ok((records, outcomes))
    }

    /// Runs the batch's records on their versions: the canary's share on the candidate, the
    /// rest on the stable version; verdicts come back in the records' order.
    async fn invoke_routed(
        &self,
        routing: &Routing,
        on_canary: &[bool],
        work: Vec<Record>,
    ) -> Result<(Vec<Record>, Vec<Verdict>), PipelineError> {
        let Some(canary) = routing
            .canary
            .as_ref()
            .filter(|_| on_canary.contains(&true))
        else {
            return self.invoke(&routing.stable, work).await;
        };
        let (mut to_stable, mut to_canary) = (Vec::new(), Vec::new());
        for (record, &on) in work.into_iter().zip(on_canary) {
            if on {
                to_canary.push(record);
            } else {
                to_stable.push(record);
            }
        }
        let (records, verdicts) = self.invoke(&routing.stable, to_stable).await?;
        let mut stable = records.into_iter().zip(verdicts);
        let (records, verdicts) = self.invoke(&canary.plugin, to_canary).await?;
        let mut candidate = records.into_iter().zip(verdicts);
        Ok(on_canary
            .iter()
            .filter_map(|&on| if on { candidate.next() } else { stable.next() })
            .unzip())
    }

    /// Runs the plugin over `records` and retries `retryable` ones with backoff, until each
    /// has a verdict. Returns the records (in order) with their verdicts.
    async fn invoke(
        &self,
        plugin: &Arc<Plugin>,
        records: Vec<Record>,
    ) -> Result<(Vec<Record>, Vec<Verdict>), PipelineError> {
        let (mut records, outcomes) = self.call(plugin, records).await?;
        let first_failure_ms = now_ms();
        let mut last_failure_ms = first_failure_ms;
        let first_failure = Instant::now();
        let mut verdicts: Vec<Option<Verdict>> = Vec::with_capacity(records.len());
        let mut pending: Vec<(usize, String)> = Vec::new();
        for (i, outcome) in outcomes.into_iter().enumerate() {
            verdicts.push(match outcome {
                Outcome::Outputs(outs) => Some(Verdict::Outputs(outs)),
                Outcome::Failed(failure) => Some(Verdict::Failed(Failed {
                    failure,
                    attempts: 1,
                    first_failure_ms,
                    last_failure_ms,
                })),
                Outcome::Retryable(reason) => {
                    pending.push((i, reason));
                    None
                }
            });
        }

        let backoff = &self.settings.backoff;
        if self.settings.park_retryable {
            for (i, reason) in pending.drain(..) {
                let attempts = records[i].source.attempt;
                let first =
                    Parked::of(&records[i]).map_or(first_failure_ms, |p| p.first_failure_ms);
                let delay = backoff.delay(attempts);
                let since_first =
                    Duration::from_millis(last_failure_ms.saturating_sub(first).unsigned_abs());
                verdicts[i] = Some(if backoff.allows(attempts, since_first, delay) {
                    Verdict::Parked {
                        reason,
                        attempts,
                        first_failure_ms: first,
                        due_ms: last_failure_ms + delay.as_millis() as i64,
                    }
                } else {
                    Verdict::Failed(Failed {
                        failure: Failure::new(
                            ErrorClass::RetriesExhausted,
                            format!("still retryable after {attempts} attempts: {reason}"),
                        ),
                        attempts,
                        first_failure_ms: first,
                        last_failure_ms,
                    })
                });
            }
        }
        let mut attempts = 1u32;
        while !pending.is_empty() {
            let delay = backoff.delay(attempts);
            if !backoff.allows(attempts, first_failure.elapsed(), delay) {
                for (i, reason) in pending.drain(..) {
                    verdicts[i] = Some(Verdict::Failed(Failed {
                        failure: Failure::new(
                            ErrorClass::RetriesExhausted,
                            format!("still retryable after {attempts} attempts: {reason}"),
                        ),
                        attempts,
                        first_failure_ms,
                        last_failure_ms,
                    }));
                }
                break;
            }
            tokio::time::sleep(delay).await;
            attempts += 1;
            self.metrics.retries.inc_by(pending.len() as u64);
            let retry: Vec<Record> = pending
                .iter()
                .map(|&(i, _)| {
                    let mut record = std::mem::replace(&mut records[i], placeholder());
                    record.source.attempt = attempts;
                    record
                })
                .collect();
            let (retry, outcomes) = self.call(plugin, retry).await?;
            last_failure_ms = now_ms();
            let mut still = Vec::new();
            for (((i, _), record), outcome) in pending.into_iter().zip(retry).zip(outcomes) {
                records[i] = record;
                match outcome {
                    Outcome::Outputs(outs) => verdicts[i] = Some(Verdict::Outputs(outs)),
                    Outcome::Failed(failure) => {
                        verdicts[i] = Some(Verdict::Failed(Failed {
                            failure,
                            attempts,
                            first_failure_ms,
                            last_failure_ms,
                        }))
                    }
                    Outcome::Retryable(reason) => still.push((i, reason)),
                }
            }
            pending = still;
        }
        let verdicts = verdicts
            .into_iter()
            .map(|v| v.unwrap_or_else(|| unreachable!("every pending record gets a verdict")))
            .collect();
        Ok((records, verdicts))
    }
}

/// A dead letter of `record`, naming the plugin version that had it.
fn dead_letter(meta: &PluginMeta, record: Record, id: &str, failed: Failed) -> DeadLetter {
    let error = ErrorInfo {
        class: failed.failure.class,
        message: failed.failure.message,
        plugin: meta.name.clone(),
        plugin_version: meta.version,
        plugin_digest: meta.digest.clone(),
        attempts: failed.attempts,
        first_failure_ms: failed.first_failure_ms,
        last_failure_ms: failed.last_failure_ms,
        source: record.source.stream.clone(),
        partition: record.source.partition,
        offset: record.source.offset,
        backtrace: failed.failure.backtrace,
        record_id: id.to_owned(),
    };
    DeadLetter { record, error }
}
