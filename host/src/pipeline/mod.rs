//! The record lifecycle of DESIGN §3, batch by batch:
//!
//! consume → id → claim (dedup + lease) → invoke the plugin (with retries) → check outputs →
//! write outputs and dead letters → durable → mark done → acknowledge to the source.
//!
//! The steps up to the writes run in order, one batch at a time; from "durable" on, each
//! batch completes in a task of its own ([`InFlight`]), so the next batch is claimed and
//! transformed while the last one's writes are confirmed. At most
//! `Settings::max_in_flight_batches` batches complete at once, and a batch that shares an id
//! with one still completing waits for it, so its claim sees that id's done mark.
//!
//! Every consumed record ends in exactly one fate — processed, dead-lettered or
//! deduplicated — and the counters in [`Metrics`] say which.

pub mod dead_letter;
mod id;
mod retry;

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use id::{IdSpec, record_id};
pub use retry::Backoff;

use self::dead_letter::{DeadLetter, ErrorInfo};
use crate::errors::ErrorClass;
use crate::metrics::{Metrics, Summary};
use crate::runtime::{Failure, LoadError, Outcome, Output, Plugin, Record, SourceMeta};
use crate::sink::{DeadLetterSink, Durable, Sink, SinkError};
use crate::source::{Ack, Incoming, Source, SourceError};
use crate::state::{Claim, StateError, StateStore};

/// Header names the host adds to every output (DESIGN §3.7).
pub const RECORD_ID_HEADER: &str = "weir.record-id";
pub const PLUGIN_VERSION_HEADER: &str = "weir.plugin-version";
pub const FENCE_HEADER: &str = "weir.fence";

/// How long a record whose lease another worker holds waits before it is claimed again.
const PARKED_RECHECK: Duration = Duration::from_millis(200);

/// Why a run stopped early. Records of the batch in flight have no fate yet and are not
/// marked done, so a rerun picks them up again.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("plugin: {0}")]
    Plugin(#[from] LoadError),
    #[error("plugin worker thread failed: {0}")]
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
}

/// A source, a plugin, a sink, a DLQ and a state store, wired together.
pub struct Pipeline {
    pub plugin: Arc<Plugin>,
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
}

struct Failed {
    failure: Failure,
    attempts: u32,
    first_failure_ms: i64,
    last_failure_ms: i64,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
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
    /// Runs until the source is exhausted or `shutdown` completes (the batch in flight is
    /// finished first), and returns the summary.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Summary, PipelineError> {
        let started = Instant::now();
        self.metrics.set_active_plugin(self.plugin.meta());
        tokio::pin!(shutdown);
        let mut last_progress = Instant::now();
        let mut in_flight = InFlight::default();
        loop {
            let batch = tokio::select! {
                biased;
                () = &mut shutdown => break,
                failed = in_flight.failure() => return Err(failed),
                batch = self.source.next_batch(self.settings.batch_size) => batch?,
            };
            let Some(batch) = batch else { break };
            self.process(batch, &mut in_flight).await?;
            if let Some(every) = self.settings.progress
                && last_progress.elapsed() >= every
            {
                last_progress = Instant::now();
                eprintln!("weir: {}", self.metrics.summary(started.elapsed()));
            }
        }
        in_flight.drain().await?;
        self.source.close().await?;
        Ok(self.metrics.summary(started.elapsed()))
    }

    /// One batch, from claim to the writes; its completion joins `in_flight`.
    #[tracing::instrument(level = "debug", skip_all, fields(records = batch.len()))]
    async fn process(
        &mut self,
        batch: Vec<Incoming>,
        in_flight: &mut InFlight,
    ) -> Result<(), PipelineError> {
        let n = batch.len();
        self.metrics.records_in.inc_by(n as u64);
        let ids: Vec<String> = batch
            .iter()
            .map(|inc| {
                inc.known_id
                    .clone()
                    .unwrap_or_else(|| record_id(self.settings.id.as_ref(), &inc.record))
            })
            .collect();
        in_flight.settle(&ids).await?;
        let claims = self.claim(&ids).await?;

        // Decide what the plugin sees: not done, not a repeat within this batch, readable.
        let mut records = Vec::with_capacity(n);
        let mut letters = Vec::new();
        // (id, fence) of every record the plugin saw or that was dead-lettered, and where it
        // sits in the batch.
        let mut finished = Vec::with_capacity(n);
        let mut finished_at = Vec::with_capacity(n);
        let mut to_run = Vec::with_capacity(n);
        let mut seen = HashSet::with_capacity(n);
        let mut deduplicated = 0;
        for (i, (incoming, claim)) in batch.into_iter().zip(&claims).enumerate() {
            records.push(incoming.record);
            let fence = match claim {
                Claim::Leased { fence } => *fence,
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
            match incoming.rejected {
                Some(reason) => {
                    let now = now_ms();
                    let failed = Failed {
                        failure: Failure::new(ErrorClass::Invalid, reason),
                        attempts: 0,
                        first_failure_ms: now,
                        last_failure_ms: now,
                    };
                    let record = std::mem::replace(&mut records[i], placeholder());
                    letters.push(self.dead_letter(record, &ids[i], failed));
                    finished.push((ids[i].clone(), fence));
                    finished_at.push(i);
                }
                None => to_run.push((i, fence)),
            }
        }

        let work: Vec<Record> = to_run
            .iter()
            .map(|&(i, _)| std::mem::replace(&mut records[i], placeholder()))
            .collect();
        let leases: Vec<(String, u64)> = to_run
            .iter()
            .map(|&(i, fence)| (ids[i].clone(), fence))
            .collect();
        let (work, verdicts) = self.renewing(&leases, self.invoke(work)).await??;

        let version = self.plugin.meta().version.to_string();
        let mut outputs = Vec::new();
        let mut processed = 0u64;
        for ((record, verdict), &(i, fence)) in work.into_iter().zip(verdicts).zip(&to_run) {
            let id = &ids[i];
            finished.push((id.clone(), fence));
            finished_at.push(i);
            let verdict = match verdict {
                Verdict::Outputs(outs) => {
                    match outs.iter().find_map(|o| self.sink.check(o).err()) {
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
                    }
                }
                failed => failed,
            };
            match verdict {
                Verdict::Outputs(outs) => {
                    processed += 1;
                    for mut out in outs {
                        out.headers.extend([
                            (RECORD_ID_HEADER.to_owned(), id.as_bytes().to_vec()),
                            (
                                PLUGIN_VERSION_HEADER.to_owned(),
                                version.as_bytes().to_vec(),
                            ),
                            (FENCE_HEADER.to_owned(), fence.to_string().into_bytes()),
                        ]);
                        outputs.push(out);
                    }
                }
                Verdict::Failed(failed) => letters.push(self.dead_letter(record, id, failed)),
            }
        }

        // Durable downstream first, then done marks, then the source.
        let records_out = outputs.len() as u64;
        let dead: Vec<ErrorClass> = letters.iter().map(|l| l.error.class).collect();
        self.sink.send(outputs).await?;
        self.dlq.send(letters).await?;
        let completion = Completion {
            writes: [self.sink.seal().await?, self.dlq.seal().await?],
            finished,
            finished_at,
            ack: self.source.ack_last_batch(),
            state: self.state.clone(),
            metrics: self.metrics.clone(),
            counts: Counts {
                deduplicated,
                processed,
                records_out,
                dead,
            },
        };
        in_flight.push(ids, completion.run());
        in_flight.limit(self.settings.max_in_flight_batches).await
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
                        Claim::Leased { fence } => Some((id.clone(), *fence)),
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

    /// Awaits `work`, renewing `leases` meanwhile so a slow batch keeps its records.
    async fn renewing<T>(
        &self,
        leases: &[(String, u64)],
        work: impl Future<Output = T>,
    ) -> Result<T, PipelineError> {
        let Some(every) = self.settings.lease_renewal.filter(|_| !leases.is_empty()) else {
            return Ok(work.await);
        };
        tokio::pin!(work);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                out = &mut work => return Ok(out),
                _ = tick.tick() => {
                    let held = self.state.renew(leases).await?;
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
        records: Vec<Record>,
    ) -> Result<(Vec<Record>, Vec<Outcome>), PipelineError> {
        if records.is_empty() {
            return Ok((records, Vec::new()));
        }
        let plugin = self.plugin.clone();
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

    /// Runs the plugin over `records` and retries `retryable` ones with backoff, until each
    /// has a verdict. Returns the records (in order) with their verdicts.
    async fn invoke(
        &self,
        records: Vec<Record>,
    ) -> Result<(Vec<Record>, Vec<Verdict>), PipelineError> {
        let (mut records, outcomes) = self.call(records).await?;
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
            let (retry, outcomes) = self.call(retry).await?;
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

    fn dead_letter(&self, record: Record, id: &str, failed: Failed) -> DeadLetter {
        let meta = self.plugin.meta();
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
}

/// What one batch counts towards the metrics once it is complete.
struct Counts {
    deduplicated: u64,
    processed: u64,
    records_out: u64,
    dead: Vec<ErrorClass>,
}

/// The rest of a batch's lifecycle once its writes are sent: durable, marked done,
/// acknowledged, counted.
struct Completion {
    writes: [Durable; 2],
    /// (id, fence) of every record that has a fate, and where it sits in the batch.
    finished: Vec<(String, u64)>,
    finished_at: Vec<usize>,
    ack: Box<dyn Ack>,
    state: Arc<dyn StateStore>,
    metrics: Arc<Metrics>,
    counts: Counts,
}

impl Completion {
    async fn run(self) -> Result<(), PipelineError> {
        for writes in self.writes {
            writes.await?;
        }
        let mut unfinished = Vec::new();
        if !self.finished.is_empty() {
            let held = self.state.finish(&self.finished).await?;
            for ((id, fence), (&i, held)) in
                self.finished.iter().zip(self.finished_at.iter().zip(held))
            {
                if !held {
                    tracing::warn!(
                        record_id = %id,
                        fence,
                        "lease lost: another worker took this record over; its offset is left for that worker"
                    );
                    unfinished.push(i);
                }
            }
            self.metrics.lease_lost.inc_by(unfinished.len() as u64);
        }
        self.ack.ack(&unfinished);

        let (metrics, counts) = (&self.metrics, self.counts);
        metrics.records_deduplicated.inc_by(counts.deduplicated);
        metrics.records_processed.inc_by(counts.processed);
        metrics.records_out.inc_by(counts.records_out);
        for class in counts.dead {
            metrics
                .records_dead_lettered
                .with_label_values(&[class.as_str()])
                .inc();
        }
        Ok(())
    }
}

/// A batch's completion task.
type CompletionTask = tokio::task::JoinHandle<Result<(), PipelineError>>;

/// Batches completing in tasks of their own, oldest first, with the ids each one holds.
#[derive(Default)]
struct InFlight {
    batches: VecDeque<(HashSet<String>, CompletionTask)>,
}

impl InFlight {
    fn push(
        &mut self,
        ids: Vec<String>,
        completion: impl Future<Output = Result<(), PipelineError>> + Send + 'static,
    ) {
        self.batches
            .push_back((ids.into_iter().collect(), tokio::spawn(completion)));
    }

    /// Waits for the oldest batch.
    async fn complete_oldest(&mut self) -> Result<(), PipelineError> {
        match self.batches.pop_front() {
            Some((_, task)) => task.await?,
            None => Ok(()),
        }
    }

    /// Leaves at most `max` batches (at least 1) completing; also reaps finished ones, so a
    /// failure surfaces at once.
    async fn limit(&mut self, max: usize) -> Result<(), PipelineError> {
        while self.batches.len() > max.max(1)
            || self
                .batches
                .front()
                .is_some_and(|(_, task)| task.is_finished())
        {
            self.complete_oldest().await?;
        }
        Ok(())
    }

    /// Waits until no batch still completing holds any of `ids`.
    async fn settle(&mut self, ids: &[String]) -> Result<(), PipelineError> {
        while let Some(last) = self
            .batches
            .iter()
            .rposition(|(held, _)| ids.iter().any(|id| held.contains(id)))
        {
            for _ in 0..=last {
                self.complete_oldest().await?;
            }
        }
        Ok(())
    }

    /// Completes when some batch has failed, with its error; never while all go well.
    async fn failure(&mut self) -> PipelineError {
        loop {
            let failed = self.batches.iter().position(|(_, task)| task.is_finished());
            match failed {
                Some(i) => {
                    let (_, task) = self.batches.remove(i).expect("an index of batches");
                    match task.await {
                        Ok(Ok(())) => continue,
                        Ok(Err(e)) => return e,
                        Err(e) => return e.into(),
                    }
                }
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Waits for every batch.
    async fn drain(&mut self) -> Result<(), PipelineError> {
        while !self.batches.is_empty() {
            self.complete_oldest().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|&s| s.to_owned()).collect()
    }

    /// A completion that finishes when `release` is notified.
    fn gated(
        release: &Arc<tokio::sync::Notify>,
    ) -> impl Future<Output = Result<(), PipelineError>> + Send + 'static {
        let release = release.clone();
        async move {
            release.notified().await;
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_batch_sharing_an_id_waits_for_the_one_completing() {
        let mut in_flight = InFlight::default();
        let (first, second) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(tokio::sync::Notify::new()),
        );
        in_flight.push(ids(&["a", "b"]), gated(&first));
        in_flight.push(ids(&["c"]), gated(&second));

        // No shared id: nothing to wait for.
        in_flight.settle(&ids(&["d"])).await.expect("settle");
        assert_eq!(in_flight.batches.len(), 2);

        // "b" is held by the oldest batch: settle returns once that batch completed.
        let settle = tokio::spawn(async move {
            in_flight.settle(&ids(&["b"])).await.expect("settle");
            in_flight
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !settle.is_finished(),
            "settled before the batch holding b completed"
        );
        first.notify_one();
        let in_flight = settle.await.expect("join");
        assert_eq!(
            in_flight.batches.len(),
            1,
            "the batch holding c still completes"
        );
        second.notify_one();
    }

    #[tokio::test]
    async fn limit_keeps_at_most_max_batches_and_a_failure_surfaces() {
        let mut in_flight = InFlight::default();
        for _ in 0..3 {
            in_flight.push(ids(&[]), async { Ok(()) });
        }
        in_flight.limit(1).await.expect("limit");
        assert!(in_flight.batches.len() <= 1);

        in_flight.push(ids(&["x"]), async {
            Err(PipelineError::Sink(SinkError {
                what: "delivery to topic `out` failed 3 times".into(),
                source: std::io::Error::other("broker gone"),
            }))
        });
        let failed = tokio::time::timeout(Duration::from_secs(5), in_flight.failure())
            .await
            .expect("the failure surfaces");
        assert!(failed.to_string().contains("failed 3 times"), "{failed}");
    }
}
