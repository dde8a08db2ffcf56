//! The claim stage: dedup and leases for a batch, and what the plugin is to see of it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use super::fate::{self, Failed};
use super::in_flight::{Finished, Hold, InFlight};
use super::take::Taken;
use super::{PipelineError, Shared};
use crate::clock::now_ms;
use crate::metrics::{LeasesAcquired, LeasesContended};
use crate::record::{DeadLetter, Record};
use crate::source::Ack;
use crate::state::Claim;
use crate::traces::{BatchTrace, Stage};

/// Batches whose claims may be under way at once.
const CONCURRENT_CLAIMS: usize = 4;

/// How long a record whose lease another worker holds waits before it is claimed again.
const PARKED_RECHECK: Duration = Duration::from_millis(200);

/// What the claim decided for a batch: the records the plugin is to see, and those that
/// have a fate already.
pub(super) struct Claimed {
    /// The batch's ids, by position.
    pub ids: Vec<String>,
    pub hold: Hold,
    pub ack: Box<dyn Ack>,
    pub to_run: Vec<Admitted>,
    /// Dead letters decided before the plugin (records the source could not read).
    pub letters: Vec<DeadLetter>,
    pub finished: Vec<Finished>,
    pub deduplicated: u64,
    /// Whether a record of `to_run` was in the plugin when a worker died (they run alone).
    pub suspect: bool,
    pub trace: Option<BatchTrace>,
}

/// A record the claim lets through to the plugin.
pub(super) struct Admitted {
    pub record: Record,
    /// Where it sits in the batch: its id is `ids[at]`.
    pub at: usize,
    /// Its lease's fencing token.
    pub fence: u64,
}

impl Claimed {
    /// Takes the records of `to_run` that are repeats (per record: its partition, when it
    /// is one) out: marked done as they are, not run (fate `deduplicated`).
    pub(super) fn skip_repeated(&mut self, repeated: &[Option<i32>]) {
        if repeated.iter().all(Option::is_none) {
            return;
        }
        let mut repeats = repeated.iter();
        let to_run = std::mem::take(&mut self.to_run);
        for admitted in to_run {
            let Some(&Some(partition)) = repeats.next() else {
                self.to_run.push(admitted);
                continue;
            };
            self.deduplicated += 1;
            self.finished.push(Finished {
                id: self.ids[admitted.at].clone(),
                fence: admitted.fence,
                at: admitted.at,
                partition,
            });
        }
    }
}

impl Shared {
    /// Claims up to [`CONCURRENT_CLAIMS`] batches at once (a state store round trip each),
    /// handing them on in the order they were taken.
    pub(super) async fn claim_stage(
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

    /// Claims a batch and decides what the plugin sees: not done, not a repeat within this
    /// batch, readable, not a crash loop.
    async fn decide(self: Arc<Self>, taken: Taken, hold: Hold) -> Result<Claimed, PipelineError> {
        let started = SystemTime::now();
        let Taken {
            batch,
            ids,
            ack,
            mut trace,
        } = taken;
        let claims = self.claim(&ids).await?;
        let crashes = self.crashes(&ids, &claims).await?;
        let crash_limit = self
            .settings
            .crash_guard
            .as_ref()
            .map(|guard| guard.limit());
        let n = batch.len();
        let mut claimed = Claimed {
            ids: Vec::new(),
            hold,
            ack,
            to_run: Vec::with_capacity(n),
            letters: Vec::new(),
            finished: Vec::with_capacity(n),
            deduplicated: 0,
            suspect: false,
            trace: None,
        };
        let mut seen = HashSet::with_capacity(n);
        for (i, (incoming, claim)) in batch.into_iter().zip(&claims).enumerate() {
            let admitted = fate::admit(claim, self.settings.bypass_done);
            let Some(fence) = admitted.filter(|_| seen.insert(ids[i].as_str())) else {
                claimed.deduplicated += 1;
                continue;
            };
            let crashes = crashes.get(i).copied().unwrap_or(0);
            match fate::refusal(incoming.rejected, crashes, crash_limit) {
                Some((failure, attempts)) => {
                    let failed = Failed::at(failure, attempts, now_ms());
                    let stable = self.plugin.current();
                    let partition = incoming.record.source.partition;
                    let mut letter =
                        fate::dead_letter(stable.meta(), incoming.record, &ids[i], failed);
                    if let Some(trace) = &mut trace {
                        trace.dead_lettered(i, &mut letter);
                    }
                    claimed.letters.push(letter);
                    claimed.finished.push(Finished {
                        id: ids[i].clone(),
                        fence,
                        at: i,
                        partition,
                    });
                }
                None => {
                    claimed.suspect |= crashes > 0;
                    claimed.to_run.push(Admitted {
                        record: incoming.record,
                        at: i,
                        fence,
                    });
                }
            }
        }
        claimed.ids = ids;
        if let Some(trace) = &trace {
            let counts = [
                ("weir.deduplicated", claimed.deduplicated),
                ("weir.to_run", claimed.to_run.len() as u64),
            ];
            trace.stage(Stage::Claim, started, &counts);
        }
        claimed.trace = trace;
        Ok(claimed)
    }

    /// How many times workers died with each record in the plugin (none without a crash
    /// guard).
    async fn crashes(&self, ids: &[String], claims: &[Claim]) -> Result<Vec<u32>, PipelineError> {
        let Some(guard) = &self.settings.crash_guard else {
            return Ok(Vec::new());
        };
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let in_flight: Vec<u32> = claims
            .iter()
            .map(|claim| match claim {
                Claim::Leased { crashes, .. } => *crashes,
                _ => 0,
            })
            .collect();
        Ok(guard.crashes(&ids, &in_flight).await?)
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
        (self.metrics).emit(LeasesAcquired {
            count: acquired(&claims),
        });
        let mut last_renewal = Instant::now();
        loop {
            let parked: Vec<usize> = (0..ids.len())
                .filter(|&i| claims[i] == Claim::HeldElsewhere)
                .collect();
            if parked.is_empty() {
                return Ok(claims);
            }
            (self.metrics).emit(LeasesContended {
                count: parked.len() as u64,
            });
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
            (self.metrics).emit(LeasesAcquired {
                count: acquired(&reclaimed),
            });
            for (i, claim) in parked.into_iter().zip(reclaimed) {
                claims[i] = claim;
            }
        }
    }
}
