//! The write stage: a transformed batch's outputs checked and sent with their record's id,
//! version and fence, its dead letters sent, and the rest of its lifecycle handed to
//! [`in_flight`](super::in_flight).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::mpsc;

use super::claim::{Admitted, Claimed};
use super::fate::{self, Verdict};
use super::in_flight::{Completion, Counts, Finished, InFlight, Tally};
use super::keyed::Pending;
use super::parking::Parked;
use super::transform::Transformed;
use super::{PipelineError, Shared};
use crate::record::{DeadLetter, Output};
use crate::sink::{DeadLetterSink, Durable, Sink, SinkError};
use crate::source::Ack;
use crate::state::keyed::KeyedWrite;
use crate::state::{Commit, Turn};
use crate::traces::{Fate, Stage};

impl Shared {
    pub(super) async fn write_stage(
        self: Arc<Self>,
        mut input: mpsc::Receiver<Transformed>,
        mut sink: Box<dyn Sink>,
        mut dlq: Box<dyn DeadLetterSink>,
        started: Instant,
    ) -> Result<(), PipelineError> {
        let mut in_flight = InFlight::default();
        let mut last_progress = Instant::now();
        // With keyed state (the embedded store), batches reach the store in order (`Turn`):
        // keyed-state writes and file lengths must not go back.
        let mut previous_turn = None;
        loop {
            let batch = tokio::select! {
                biased;
                failed = in_flight.failure() => return Err(failed),
                batch = input.recv() => batch,
            };
            let Some(batch) = batch else { break };
            // Only keyed state needs the order; other batches finish in any order.
            let turn = match self.keyed {
                Some(_) => {
                    let (turn, next) = Turn::after(previous_turn.take());
                    previous_turn = Some(next);
                    turn
                }
                None => Turn::free(),
            };
            let completion = self.write(batch, sink.as_mut(), dlq.as_mut(), turn).await?;
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

    /// Checks a transformed batch's outputs, sends its outputs and dead letters, and returns
    /// the rest of its lifecycle.
    async fn write(
        &self,
        batch: Transformed,
        sink: &mut dyn Sink,
        dlq: &mut dyn DeadLetterSink,
        turn: Turn,
    ) -> Result<Completion, PipelineError> {
        let Transformed {
            mut claimed,
            verdicts,
            routing,
            on_canary,
            writes: keyed_writes,
        } = batch;
        let started = SystemTime::now();
        let to_run = std::mem::take(&mut claimed.to_run);
        let mut trace = claimed.trace.take();
        let ids = &mut claimed.ids;
        let stable = routing.stable.meta();
        let candidate = routing.canary.as_ref().map(|c| c.plugin.meta());
        let versions = [stable, candidate.unwrap_or(stable)].map(|m| m.version.to_string());
        let mut outputs = Vec::new();
        let mut released = Vec::new();
        let mut tallies: BTreeMap<u64, Tally> = BTreeMap::new();
        for (k, (admitted, verdict)) in to_run.into_iter().zip(verdicts).enumerate() {
            let Admitted { record, at, fence } = admitted;
            let partition = record.source.partition;
            let on_canary = on_canary.get(k).copied().unwrap_or(false);
            let meta = candidate.filter(|_| on_canary).unwrap_or(stable);
            let id = &ids[at];
            let tally = tallies.entry(meta.version).or_default();
            let version = meta.version;
            match verdict {
                Verdict::Outputs(outs) => {
                    tally.processed += 1;
                    tally.records_out += outs.len() as u64;
                    for mut out in outs {
                        fate::stamp(&mut out, id, &versions[usize::from(on_canary)], fence);
                        if let Some(trace) = &trace {
                            trace.stamp(at, &mut out.headers);
                        }
                        outputs.push(out);
                    }
                    if let Some(trace) = &mut trace {
                        trace.fate(at, Fate::Processed { version });
                    }
                }
                Verdict::Failed(failed) => {
                    let mut letter = fate::dead_letter(meta, record, id, failed);
                    if let Some(trace) = &mut trace {
                        trace.dead_lettered(at, &mut letter);
                    }
                    claimed.letters.push(letter);
                }
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
                    let mut output = parked.output(record, &reason);
                    if let Some(trace) = &mut trace {
                        trace.stamp(at, &mut output.headers);
                        trace.fate(at, Fate::Parked { version });
                    }
                    outputs.push(output);
                    tally.parked += 1;
                    // No fate yet: no done mark, and the lease goes for the next attempt.
                    released.push((parked.id, fence));
                    continue;
                }
            }
            // The id is not needed here any more: it moves on to its done mark.
            claimed.finished.push(Finished {
                id: std::mem::take(&mut ids[at]),
                fence,
                at,
                partition,
            });
        }
        for letter in &claimed.letters {
            let tally = tallies.entry(letter.error.plugin_version).or_default();
            tally.dead.push(letter.error.class);
        }
        let letters = std::mem::take(&mut claimed.letters);
        let counts = [
            ("weir.outputs", outputs.len() as u64),
            ("weir.dead_letters", letters.len() as u64),
        ];
        let writes = send(
            &mut claimed.ack,
            (sink, dlq),
            outputs,
            letters,
            &keyed_writes.writes,
        )
        .await?;
        let commit = Commit {
            writes: keyed_writes.writes,
            files: [sink.lengths(), dlq.lengths()].concat(),
            partitions: Vec::new(),
            epochs: keyed_writes.epochs,
        };
        let keyed = (self.keyed.clone()).map(|pending| (pending, keyed_writes.last));
        if let Some(trace) = &trace {
            trace.stage(Stage::Write, started, &counts);
        }
        claimed.trace = trace;
        Ok(self.completion(claimed, writes, released, tallies, (commit, turn, keyed)))
    }

    /// The rest of a batch's lifecycle, once its writes are sent.
    fn completion(
        &self,
        claimed: Claimed,
        writes: [Durable; 2],
        released: Vec<(String, u64)>,
        by_version: BTreeMap<u64, Tally>,
        (commit, turn, keyed): (Commit, Turn, Option<(Arc<Pending>, u64)>),
    ) -> Completion {
        Completion {
            writes,
            commit,
            turn,
            keyed,
            finished: claimed.finished,
            released,
            ack: claimed.ack,
            hold: claimed.hold,
            state: self.state.clone(),
            metrics: self.metrics.clone(),
            trace: claimed.trace,
            counts: Counts {
                deduplicated: claimed.deduplicated,
                by_version,
            },
        }
    }
}

/// Sends a batch's outputs, keyed-state writes (to a sink that carries them) and dead
/// letters once its acknowledgement has begun (in exactly-once mode: joined a transaction,
/// so they commit with the source's position), and
/// returns what says when each is durable. Durable downstream first, then done marks, then
/// the source. A failure to send is handled as one to deliver (`Completion::run`).
async fn send(
    ack: &mut Box<dyn Ack>,
    (sink, dlq): (&mut dyn Sink, &mut dyn DeadLetterSink),
    outputs: Vec<Output>,
    letters: Vec<DeadLetter>,
    keyed: &[KeyedWrite],
) -> Result<[Durable; 2], PipelineError> {
    let lane = ack.begin().await?;
    let sent = async {
        sink.send(outputs, lane).await?;
        sink.send_keyed(keyed, lane).await?;
        dlq.send(letters, lane).await?;
        Ok::<_, SinkError>([sink.seal().await?, dlq.seal().await?])
    };
    Ok(sent.await.unwrap_or_else(|failed| {
        let failed: Durable = Box::pin(std::future::ready(Err(failed)));
        [failed, Box::pin(std::future::ready(Ok(())))]
    }))
}
