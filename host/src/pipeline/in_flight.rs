//! What happens to a batch after its writes are sent, and what keeps two batches with the
//! same id apart while the first is still under way.
//!
//! - [`Holds`]: the ids of every batch between its claim and its done marks. A batch that
//!   shares an id with one of them waits before it is claimed, so its claim sees that id's
//!   done mark.
//! - [`Completion`]: a batch's writes made durable, done marks, the source's `Ack`, counters.
//! - [`InFlight`]: batches being worked on in tasks of their own (claims, completions),
//!   handed on oldest first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::PipelineError;
use super::keyed::Pending;
use crate::metrics::{LeasesLost, Metrics, RecordsDeduplicated, VersionFates};
use crate::record::ErrorClass;
use crate::sink::Durable;
use crate::source::Ack;
use crate::state::{Commit, StateStore, Turn};
use crate::traces::{BatchTrace, Ending};

/// Ids held by the batches under way, each with how many times it is held. Ids are kept as
/// 64-bit hashes: two ids that collide only make a batch wait for nothing.
#[derive(Clone, Default)]
pub(super) struct Holds {
    inner: Arc<HoldsInner>,
}

#[derive(Default)]
struct HoldsInner {
    held: Mutex<HashMap<u64, u32, BuildHasherDefault<AlreadyHashed>>>,
    hasher: RandomState,
    released: Notify,
}

impl Holds {
    /// Returns once no batch under way holds any of `keys`.
    pub(super) async fn wait_free(&self, keys: &[u64]) {
        loop {
            // Registered before the check, so a release between the two is not missed.
            let released = self.inner.released.notified();
            if !self.any_held(keys) {
                return;
            }
            released.await;
        }
    }

    /// The keys of `ids` in the holds (computed once per batch).
    pub(super) fn keys(&self, ids: &[String]) -> Vec<u64> {
        ids.iter()
            .map(|id| self.inner.hasher.hash_one(id))
            .collect()
    }

    pub(super) fn any_held(&self, keys: &[u64]) -> bool {
        let held = self
            .inner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        !held.is_empty() && keys.iter().any(|k| held.contains_key(k))
    }

    /// Holds `keys` until the returned [`Hold`] is dropped.
    pub(super) fn hold(&self, keys: Vec<u64>) -> Hold {
        let mut held = self
            .inner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for &k in &keys {
            *held.entry(k).or_default() += 1;
        }
        Hold {
            holds: self.clone(),
            keys,
        }
    }
}

/// The hasher of a map whose keys are hashes already: it keeps them as they are.
#[derive(Default)]
struct AlreadyHashed(u64);

impl Hasher for AlreadyHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // The holds only put `u64`s in (`write_u64`); this is here to be a whole `Hasher`.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }
}

/// A batch's hold on its ids; released on drop (the batch is complete, or the run stops).
pub(super) struct Hold {
    holds: Holds,
    keys: Vec<u64>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        {
            let mut held = self
                .holds
                .inner
                .held
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for k in &self.keys {
                if let Some(count) = held.get_mut(k) {
                    *count -= 1;
                    if *count == 0 {
                        held.remove(k);
                    }
                }
            }
        }
        self.holds.inner.released.notify_waiters();
    }
}

/// What one batch counts towards the metrics once it is complete.
pub(super) struct Counts {
    pub deduplicated: u64,
    /// The fates of the batch's records, by the plugin version that had them.
    pub by_version: BTreeMap<u64, Tally>,
}

/// What one plugin version did with some records.
#[derive(Default)]
pub(super) struct Tally {
    pub processed: u64,
    pub records_out: u64,
    pub dead: Vec<ErrorClass>,
    /// Parked in the retry topic.
    pub parked: u64,
}

/// A record with a fate, waiting for its done mark.
pub(super) struct Finished {
    pub id: String,
    /// Its lease's fencing token: the done mark is written only while the lease is ours.
    pub fence: u64,
    /// Where it sits in the batch, for the source's acknowledgement.
    pub at: usize,
    /// The input partition it was read from (its keyed state's).
    pub partition: i32,
}

/// The rest of a batch's lifecycle once its writes are sent: durable, marked done,
/// acknowledged, counted.
pub(super) struct Completion {
    pub writes: [Durable; 2],
    /// What becomes durable with the done marks: keyed-state writes, file lengths.
    pub commit: Commit,
    /// The batch's turn to commit (batches commit in order when that matters).
    pub turn: Turn,
    /// The pending keyed-state writes, and the number of this batch's last one.
    pub keyed: Option<(Arc<Pending>, u64)>,
    pub finished: Vec<Finished>,
    /// (id, fence) of the records parked in the retry topic: their leases are released.
    pub released: Vec<(String, u64)>,
    pub ack: Box<dyn Ack>,
    pub hold: Hold,
    pub state: Arc<dyn StateStore>,
    pub metrics: Arc<Metrics>,
    pub counts: Counts,
    pub trace: Option<BatchTrace>,
}

impl Completion {
    pub(super) async fn run(mut self) -> Result<(), PipelineError> {
        let Some(trace) = self.trace.take() else {
            return self.complete().await.map(drop);
        };
        let started = SystemTime::now();
        let ending = self.complete().await;
        let (result, ending) = match ending {
            Ok(ending) => (Ok(()), ending),
            Err(e) => {
                let failed = Ending::Failed(crate::errors::chain(&e));
                (Err(e), failed)
            }
        };
        trace.finish(started, ending);
        result
    }

    async fn complete(self) -> Result<Ending, PipelineError> {
        let mut ack = self.ack;
        for writes in self.writes {
            if let Err(failed) = writes.await {
                // Exactly-once: the transaction is aborted, the records are read again.
                if ack.abort(&failed).await? {
                    return Ok(Ending::Aborted);
                }
                return Err(failed.into());
            }
        }
        if !ack.commit().await? {
            // Aborted: the source reads these records again; they have no fate yet.
            return Ok(Ending::Aborted);
        }
        let mut unfinished = Vec::new();
        if !self.finished.is_empty() {
            let mut commit = self.commit;
            let (marks, at): (Vec<(String, u64)>, Vec<usize>) = (self.finished.into_iter())
                .map(|f| {
                    commit.partitions.push(f.partition);
                    ((f.id, f.fence), f.at)
                })
                .unzip();
            let held = (self.state).finish_with(&marks, commit, self.turn).await?;
            if let Some((pending, last)) = self.keyed {
                pending.durable_up_to(last);
            }
            for ((id, fence), (i, held)) in marks.iter().zip(at.into_iter().zip(held)) {
                if !held {
                    tracing::warn!(
                        record_id = %id,
                        fence,
                        "lease lost: another worker took this record over; its offset is left for that worker"
                    );
                    unfinished.push(i);
                }
            }
            (self.metrics).emit(LeasesLost {
                count: unfinished.len() as u64,
            });
        }
        self.state.release(&self.released).await?;
        ack.ack(&unfinished);
        let ending = Ending::Committed {
            lease_lost: unfinished,
        };
        drop(self.hold);

        let (metrics, counts) = (&self.metrics, self.counts);
        metrics.emit(RecordsDeduplicated {
            count: counts.deduplicated,
        });
        for (version, tally) in counts.by_version {
            metrics.emit(VersionFates {
                version,
                processed: tally.processed,
                records_out: tally.records_out,
                parked: tally.parked,
                dead: &tally.dead,
            });
        }
        Ok(ending)
    }
}

/// Batches being worked on in tasks of their own (claims, completions), oldest first.
pub(super) struct InFlight<T = ()> {
    batches: VecDeque<JoinHandle<Result<T, PipelineError>>>,
}

impl<T> Default for InFlight<T> {
    fn default() -> Self {
        Self {
            batches: VecDeque::new(),
        }
    }
}

impl<T: Send + 'static> InFlight<T> {
    pub(super) fn push(
        &mut self,
        work: impl Future<Output = Result<T, PipelineError>> + Send + 'static,
    ) {
        self.batches.push_back(tokio::spawn(work));
    }

    pub(super) fn len(&self) -> usize {
        self.batches.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// The oldest batch's result, once it is done; never if there is none. Cancel-safe: the
    /// batch stays queued until its result is returned.
    pub(super) async fn oldest(&mut self) -> Result<T, PipelineError> {
        match self.batches.front_mut() {
            Some(task) => {
                let result = task.await;
                self.batches.pop_front();
                result?
            }
            None => std::future::pending().await,
        }
    }
}

impl InFlight {
    /// Leaves at most `max` batches (at least 1) completing; also reaps finished ones, so a
    /// failure surfaces at once.
    pub(super) async fn limit(&mut self, max: usize) -> Result<(), PipelineError> {
        while self.batches.len() > max.max(1)
            || self.batches.front().is_some_and(|task| task.is_finished())
        {
            self.oldest().await?;
        }
        Ok(())
    }

    /// Completes when some batch has failed, with its error; never while all go well.
    pub(super) async fn failure(&mut self) -> PipelineError {
        loop {
            let failed = self.batches.iter().position(|task| task.is_finished());
            match failed {
                Some(i) => {
                    let task = self.batches.remove(i).expect("an index of batches");
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
    pub(super) async fn drain(&mut self) -> Result<(), PipelineError> {
        while !self.batches.is_empty() {
            self.oldest().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::SinkError;

    fn ids(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|&s| s.to_owned()).collect()
    }

    #[tokio::test]
    async fn a_batch_sharing_an_id_waits_until_the_holder_is_released() {
        let holds = Holds::default();
        let keys = |of: &[&str]| holds.keys(&ids(of));
        let first = holds.hold(keys(&["a", "b"]));
        let second = holds.hold(keys(&["c", "b"]));

        // No shared id: nothing to wait for.
        holds.wait_free(&keys(&["d"])).await;

        // "b" is held twice: free only once both holders are gone.
        let waiting = tokio::spawn({
            let (holds, b) = (holds.clone(), keys(&["b"]));
            async move { holds.wait_free(&b).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(first);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "free while a batch still held b");
        drop(second);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("free once released")
            .expect("join");
        assert!(holds.inner.held.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn limit_keeps_at_most_max_batches_and_a_failure_surfaces() {
        let mut in_flight = InFlight::default();
        for _ in 0..3 {
            in_flight.push(async { Ok(()) });
        }
        in_flight.limit(1).await.expect("limit");
        assert!(in_flight.batches.len() <= 1);

        in_flight.push(async {
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
