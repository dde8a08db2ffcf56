//! The transform stage: the plugin over a claimed batch, on the versions it is routed to,
//! with retries, leases renewed while it runs, and what is in the plugin noted for the
//! crash guard.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use tokio::sync::mpsc;

use super::claim::{Admitted, Claimed};
use super::fate::{self, Verdict};
use super::keyed::BatchWrites;
use super::parking::Parked;
use super::{PipelineError, Shared};
use crate::clock::now_ms;
use crate::metrics::{PluginCalled, RetriesStarted, StateRestored, StateUsed};
use crate::record::Record;
use crate::runtime::{CallContext, LogLines, Outcome, Plugin, Routing, keeping_log_lines};
use crate::state::StateError;
use crate::state::keyed::{DoneMarks, KeyedRead};
use crate::traces::BatchTrace;

/// A claimed batch after the plugin: a verdict for each record of `work`.
pub(super) struct Transformed {
    pub claimed: Claimed,
    pub verdicts: Vec<Verdict>,
    /// The versions that transformed the batch (outputs and dead letters name theirs).
    pub routing: Routing,
    /// Per record of `work`: whether the canary transformed it (empty without a canary).
    pub on_canary: Vec<bool>,
    /// A stateful plugin's writes of the batch's processed records.
    pub writes: BatchWrites,
}

impl Shared {
    pub(super) async fn transform_stage(
        self: Arc<Self>,
        mut input: mpsc::Receiver<Claimed>,
        out: mpsc::Sender<Transformed>,
    ) -> Result<(), PipelineError> {
        while let Some(mut claimed) = input.recv().await {
            // The plugin takes the records by value and hands them back.
            let work: Vec<Record> = (claimed.to_run.iter_mut())
                .map(|admitted| std::mem::take(&mut admitted.record))
                .collect();
            let partitions = claimed.ack.partitions();
            let running = async {
                // A quarantined plugin with nothing to fall back to: the batch waits (its
                // leases renewed) until an operator activates a version.
                self.plugin.serving().await;
                // The batch runs on these versions to the end, retries included.
                let routing = self.plugin.routing();
                let epochs = self.own_keyed(&routing, &partitions).await?;
                let repeated = self.repeated(&epochs, &claimed.to_run, &claimed.ids, &work)?;
                let (work, admitted): (Vec<Record>, Vec<&Admitted>) = (work.into_iter())
                    .zip(&claimed.to_run)
                    .zip(&repeated)
                    .filter(|(_, repeat)| repeat.is_none())
                    .map(|(runs, _)| runs)
                    .unzip();
                let on_canary: Vec<bool> = match &routing.canary {
                    Some(canary) => (admitted.iter())
                        .map(|admitted| canary.takes(&claimed.ids[admitted.at]))
                        .collect(),
                    None => Vec::new(),
                };
                let ids: Vec<&str> = (admitted.iter())
                    .map(|admitted| claimed.ids[admitted.at].as_str())
                    .collect();
                let (work, verdicts) = self
                    .invoke_guarded(
                        (&routing, claimed.trace.as_ref()),
                        &on_canary,
                        work,
                        &ids,
                        claimed.suspect,
                    )
                    .await?;
                Ok::<_, PipelineError>((work, verdicts, routing, on_canary, epochs, repeated))
            };
            let (work, verdicts, routing, on_canary, epochs, repeated) = self
                .renewing(&claimed.ids, &claimed.to_run, running)
                .await??;
            let refused = claimed.finished.len();
            claimed.skip_repeated(&repeated);
            for (admitted, record) in claimed.to_run.iter_mut().zip(work) {
                admitted.record = record;
            }
            self.mark_done_in_keyed_state(&epochs, &claimed, refused, &verdicts);
            let mut writes =
                (self.keyed.as_ref()).map_or_else(BatchWrites::default, |p| p.take_batch());
            writes.epochs = epochs;
            let transformed = Transformed {
                claimed,
                verdicts,
                routing,
                on_canary,
                writes,
            };
            if out.send(transformed).await.is_err() {
                break;
            }
        }
        Ok(())
    }

    /// When a version the batch runs on is stateful: takes the keyed state of the batch's
    /// `partitions` (with their assignments) over where this worker was assigned them anew,
    /// and returns the epochs it runs under.
    async fn own_keyed(
        &self,
        routing: &Routing,
        partitions: &[(i32, u64)],
    ) -> Result<Vec<(i32, u64)>, PipelineError> {
        let stateful = std::iter::once(&routing.stable)
            .chain(routing.canary.iter().map(|c| &c.plugin))
            .any(|plugin| plugin.meta().stateful);
        let Some(pending) = self.keyed.as_ref().filter(|_| stateful) else {
            return Ok(Vec::new());
        };
        let ownership = self.state.own_keyed(partitions).await?;
        let restored: Vec<i32> = ownership.restored.iter().map(|r| r.partition).collect();
        pending.forget(&restored);
        for restored in &ownership.restored {
            self.metrics.emit(StateRestored(restored));
        }
        Ok(ownership.epochs)
    }

    /// Exactly-once mode, a stateful batch (`epochs` not empty): per record of `to_run`
    /// (whose records are `work`, whose ids are in `ids`), its partition if that partition's
    /// keyed state marks its id done already ([`DoneMarks`]): a repeat of a record committed
    /// before, whose worker died before marking it done in the state store. Otherwise none
    /// is a repeat.
    fn repeated(
        &self,
        epochs: &[(i32, u64)],
        to_run: &[Admitted],
        ids: &[String],
        work: &[Record],
    ) -> Result<Vec<Option<i32>>, PipelineError> {
        let judged = (self.state.done_marks_in_keyed_state())
            .filter(|_| !epochs.is_empty() && !self.settings.bypass_done);
        let (Some(_), Some(pending)) = (judged, &self.keyed) else {
            return Ok(vec![None; work.len()]);
        };
        // The store that keeps these marks holds its state in memory: no blocking read.
        let mut repeated = Vec::with_capacity(work.len());
        for (admitted, record) in to_run.iter().zip(work) {
            let (partition, key) = (record.source.partition, DoneMarks::key(&ids[admitted.at]));
            repeated.push(pending.get(partition, &key)?.map(|_| partition));
        }
        Ok(repeated)
    }

    /// Exactly-once mode, a stateful batch: marks the records that ran and have a fate (all
    /// but the parked), and the first `refused` of `finished` (dead-lettered before the
    /// plugin; the rest are repeats, marked already), done in their partitions' keyed state,
    /// after their writes, so the marks commit with them.
    fn mark_done_in_keyed_state(
        &self,
        epochs: &[(i32, u64)],
        claimed: &Claimed,
        refused: usize,
        verdicts: &[Verdict],
    ) {
        let marks = (self.state.done_marks_in_keyed_state()).filter(|_| !epochs.is_empty());
        let (Some(marks), Some(pending)) = (marks, &self.keyed) else {
            return;
        };
        let now = now_ms() as u64;
        let ran = (claimed.to_run.iter().zip(verdicts))
            .filter(|(_, verdict)| !matches!(verdict, Verdict::Parked { .. }))
            .map(|(admitted, _)| (admitted.record.source.partition, admitted.at));
        let refused = (claimed.finished[..refused].iter()).map(|f| (f.partition, f.at));
        let writes = (ran.chain(refused))
            .map(|(partition, at)| marks.mark(partition, &claimed.ids[at], now))
            .collect();
        pending.accept(writes);
    }

    /// Runs `work` (whose ids are `ids`) on `routing`, noting what is in the plugin for the
    /// crash guard: the whole batch at once, or one record at a time when one of them was in
    /// the plugin when a worker died (`suspect`).
    async fn invoke_guarded(
        &self,
        (routing, trace): (&Routing, Option<&BatchTrace>),
        on_canary: &[bool],
        work: Vec<Record>,
        ids: &[&str],
        suspect: bool,
    ) -> Result<(Vec<Record>, Vec<Verdict>), PipelineError> {
        let Some(guard) = &self.settings.crash_guard else {
            return self.invoke_routed((routing, trace), on_canary, work).await;
        };
        if !suspect {
            guard.enter(ids, false).await?;
            let done = self
                .invoke_routed((routing, trace), on_canary, work)
                .await?;
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
            let (record, verdict) =
                (self.invoke_routed((routing, trace), &canary, vec![record])).await?;
            guard.leave(&[id], true).await?;
            records.extend(record);
            verdicts.extend(verdict);
        }
        Ok((records, verdicts))
    }

    /// Awaits `work`, renewing the leases of the records `to_run` (whose ids are in `ids`)
    /// meanwhile, so a slow batch keeps them.
    async fn renewing<T>(
        &self,
        ids: &[String],
        to_run: &[Admitted],
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
                        leases = (to_run.iter())
                            .map(|admitted| (ids[admitted.at].clone(), admitted.fence))
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

    /// One plugin call off the async reactor, timed, counted and traced.
    async fn call(
        &self,
        plugin: &Arc<Plugin>,
        records: Vec<Record>,
        trace: Option<&BatchTrace>,
    ) -> Result<(Vec<Record>, Vec<Outcome>), PipelineError> {
        if records.is_empty() {
            return Ok((records, Vec::new()));
        }
        let traced = trace.map(|trace| (trace, SystemTime::now()));
        let keep_log_lines = traced.is_some();
        let meta = plugin.meta();
        let plugin = plugin.clone();
        let reads = Arc::new(AtomicU64::new(0));
        let ctx = CallContext {
            check: Some(self.check.clone()),
            state: (self.keyed.clone()).map(|pending| pending as Arc<dyn KeyedRead>),
            reads: reads.clone(),
        };
        let started = Instant::now();
        let (records, outcomes, log_lines) = tokio::task::spawn_blocking(move || {
            let transform = || plugin.transform(&records, &ctx);
            let (outcomes, log_lines) = match keep_log_lines {
                true => keeping_log_lines(transform),
                false => (transform(), LogLines::default()),
            };
            (records, outcomes, log_lines)
        })
        .await?;
        let elapsed = started.elapsed();
        let mut outcomes = outcomes?;
        if let Some((trace, started)) = traced {
            trace.plugin_call(meta, started, (&records, &outcomes), &log_lines);
        }
        let mut used = StateUsed {
            reads: reads.load(Ordering::Relaxed),
            writes: 0,
            bytes: 0,
        };
        for outcome in &mut outcomes {
            let Outcome::Outputs { writes, .. } = outcome else {
                continue;
            };
            if writes.is_empty() {
                continue;
            }
            let Some(pending) = &self.keyed else {
                return Err(StateError::new(format!(
                    "plugin `{}` writes keyed state, which this pipeline's state store does not keep",
                    meta.name
                ))
                .into());
            };
            used.writes += writes.len() as u64;
            used.bytes += writes.iter().map(|w| w.bytes() as u64).sum::<u64>();
            pending.accept(std::mem::take(writes));
        }
        if used.reads > 0 || used.writes > 0 {
            self.metrics.emit(used);
        }
        (self.metrics).emit(PluginCalled {
            elapsed,
            outcomes: &outcomes,
        });
        Ok((records, outcomes))
    }

    /// Runs the batch's records on their versions: the canary's share on the candidate, the
    /// rest on the stable version; verdicts come back in the records' order.
    async fn invoke_routed(
        &self,
        (routing, trace): (&Routing, Option<&BatchTrace>),
        on_canary: &[bool],
        work: Vec<Record>,
    ) -> Result<(Vec<Record>, Vec<Verdict>), PipelineError> {
        let Some(canary) = routing
            .canary
            .as_ref()
            .filter(|_| on_canary.contains(&true))
        else {
            return self.invoke(&routing.stable, work, trace).await;
        };
        if routing.stable.meta().stateful || canary.plugin.meta().stateful {
            return self
                .invoke_in_order((routing, trace), on_canary, work)
                .await;
        }
        let (mut to_stable, mut to_canary) = (Vec::new(), Vec::new());
        for (record, &on) in work.into_iter().zip(on_canary) {
            if on {
                to_canary.push(record);
            } else {
                to_stable.push(record);
            }
        }
        let (records, verdicts) = self.invoke(&routing.stable, to_stable, trace).await?;
        let mut stable = records.into_iter().zip(verdicts);
        let (records, verdicts) = self.invoke(&canary.plugin, to_canary, trace).await?;
        let mut candidate = records.into_iter().zip(verdicts);
        Ok(on_canary
            .iter()
            .filter_map(|&on| if on { candidate.next() } else { stable.next() })
            .unzip())
    }

    /// A stateful plugin with a canary: runs of consecutive records on the same version, in
    /// the batch's order, so every record reads the writes of the records before it.
    async fn invoke_in_order(
        &self,
        (routing, trace): (&Routing, Option<&BatchTrace>),
        on_canary: &[bool],
        work: Vec<Record>,
    ) -> Result<(Vec<Record>, Vec<Verdict>), PipelineError> {
        let (mut records, mut verdicts) = (Vec::new(), Vec::new());
        let mut work = work.into_iter();
        for run in on_canary.chunk_by(|a, b| a == b) {
            let plugin = match (run[0], &routing.canary) {
                (true, Some(canary)) => &canary.plugin,
                _ => &routing.stable,
            };
            let (done, judged) = self
                .invoke(plugin, work.by_ref().take(run.len()).collect(), trace)
                .await?;
            records.extend(done);
            verdicts.extend(judged);
        }
        Ok((records, verdicts))
    }

    /// Runs the plugin over `records` and retries `retryable` ones with backoff (or parks
    /// them in the retry topic), until each has a verdict. Returns the records (in order)
    /// with their verdicts.
    async fn invoke(
        &self,
        plugin: &Arc<Plugin>,
        records: Vec<Record>,
        trace: Option<&BatchTrace>,
    ) -> Result<(Vec<Record>, Vec<Verdict>), PipelineError> {
        let (mut records, outcomes) = self.call(plugin, records, trace).await?;
        let first_failure_ms = now_ms();
        let first_failure = Instant::now();
        let mut verdicts: Vec<Option<Verdict>> = Vec::with_capacity(records.len());
        let mut pending: Vec<(usize, String)> = Vec::new();
        for (i, outcome) in outcomes.into_iter().enumerate() {
            match fate::answered(outcome, 1, first_failure_ms, first_failure_ms) {
                Ok(verdict) => verdicts.push(Some(verdict)),
                Err(reason) => {
                    verdicts.push(None);
                    pending.push((i, reason));
                }
            }
        }
        let backoff = &self.settings.backoff;
        if self.settings.park_retryable {
            for (i, reason) in pending.drain(..) {
                let attempts = records[i].source.attempt;
                let first =
                    Parked::of(&records[i]).map_or(first_failure_ms, |p| p.first_failure_ms);
                let delay = backoff.delay(attempts);
                verdicts[i] = Some(fate::park_or_exhaust(
                    backoff,
                    reason,
                    attempts,
                    first,
                    first_failure_ms,
                    delay,
                ));
            }
        }
        let mut attempts = 1u32;
        let mut last_failure_ms = first_failure_ms;
        while !pending.is_empty() {
            let delay = backoff.delay(attempts);
            if !backoff.allows(attempts, first_failure.elapsed(), delay) {
                for (i, reason) in pending.drain(..) {
                    let verdict =
                        fate::exhausted(reason, attempts, first_failure_ms, last_failure_ms);
                    verdicts[i] = Some(verdict);
                }
                break;
            }
            tokio::time::sleep(delay).await;
            attempts += 1;
            (self.metrics).emit(RetriesStarted {
                count: pending.len() as u64,
            });
            let retry: Vec<Record> = pending
                .iter()
                .map(|&(i, _)| {
                    let mut record = std::mem::take(&mut records[i]);
                    record.source.attempt = attempts;
                    record
                })
                .collect();
            let (retry, outcomes) = self.call(plugin, retry, trace).await?;
            last_failure_ms = now_ms();
            let mut still = Vec::new();
            for (((i, _), record), outcome) in pending.into_iter().zip(retry).zip(outcomes) {
                records[i] = record;
                match fate::answered(outcome, attempts, first_failure_ms, last_failure_ms) {
                    Ok(verdict) => verdicts[i] = Some(verdict),
                    Err(reason) => still.push((i, reason)),
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
