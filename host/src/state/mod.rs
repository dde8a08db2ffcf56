//! Done marks, leases and plugins' keyed state ([`keyed`]). [`StateStore`] is the seam:
//! `embedded.rs` (a redb database in a local directory) is the default; `redis/` is the
//! shared store of cluster mode.
//!
//! Each batch costs at most two calls: [`StateStore::claim`] before the plugin runs and
//! [`StateStore::finish`] once the batch's fates are durable.

mod embedded;
pub(crate) mod held;
pub mod keyed;
mod redis;

pub use self::redis::{
    DEFAULT_CLUSTER_BUCKETS, RedisConnection, RedisStore, RedisTarget, is_transient,
    read_redis_keyed_state,
};
pub use embedded::{EmbeddedStore, read_keyed_state};

use async_trait::async_trait;

/// What [`StateStore::claim`] found for one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Already processed or dead-lettered: skip it (fate `deduplicated`).
    Done,
    /// Ours to process; `fence` is the fencing token to write with its outputs. `crashes`:
    /// how many times a worker died with the record in flight (stores that count them).
    Leased { fence: u64, crashes: u32 },
    /// Another live worker holds the lease: park the record and ask again later.
    HeldElsewhere,
}

/// A state store failure (the run stops rather than lose track of a record): what failed,
/// and the error that caused it, if another one did, as its source.
#[derive(Debug, thiserror::Error)]
#[error("state store: {what}")]
pub struct StateError {
    what: String,
    #[source]
    cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl StateError {
    /// `what` went wrong, with no further cause.
    pub fn new(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            cause: None,
        }
    }

    /// `what` failed because of `cause`.
    pub fn caused_by(
        what: impl Into<String>,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            what: what.into(),
            cause: Some(cause.into()),
        }
    }
}

/// Leases and done marks, keyed by record id.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// For each id: done already, leased to us now, or held by another worker.
    async fn claim(&self, ids: &[String]) -> Result<Vec<Claim>, StateError>;

    /// Marks ids done and releases their leases. Returns, per id, whether the lease with
    /// that fence was still ours (a stale worker learns it lost the record).
    async fn finish(&self, done: &[(String, u64)]) -> Result<Vec<bool>, StateError>;

    /// Extends leases while a slow batch runs; says per id whether the lease was still ours.
    /// A store without expiring leases has nothing to do.
    async fn renew(&self, leases: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        Ok(vec![true; leases.len()])
    }

    /// Marks ids done as [`finish`](Self::finish) does, and makes `with` durable in the same
    /// step: the keyed-state writes of their records and the lengths of the files their
    /// outputs went to, so after a crash a record finds both its done mark and its writes,
    /// or neither. `turn` orders the batches: the store waits for it before it queues this
    /// batch and passes it on right after.
    async fn finish_with(
        &self,
        done: &[(String, u64)],
        with: Commit,
        mut turn: Turn,
    ) -> Result<Vec<bool>, StateError> {
        if !with.writes.is_empty() {
            return Err(StateError::new(
                "this state store does not keep plugins' keyed state (use the embedded store)",
            ));
        }
        turn.wait().await;
        drop(turn);
        self.finish(done).await
    }

    /// Plugins' keyed state as this store keeps it durably (`None`: it keeps none).
    fn keyed(&self) -> Option<std::sync::Arc<dyn keyed::KeyedRead>> {
        None
    }

    /// Whether a stateful batch's done marks are also kept as keyed state, where its repeats
    /// are judged (exactly-once mode: [`keyed::DoneMarks`]).
    fn done_marks_in_keyed_state(&self) -> Option<keyed::DoneMarks> {
        None
    }

    /// Before a stateful plugin runs a batch: makes sure this worker holds the keyed state
    /// of the batch's `partitions` (each with its assignment number, `Ack::partitions`),
    /// taking a partition's state over, and loading it, when the partition was assigned
    /// anew. A store with one writer holds all of it all along.
    async fn own_keyed(&self, partitions: &[(i32, u64)]) -> Result<Ownership, StateError> {
        Ok(Ownership::all_along(partitions))
    }

    /// Gives leases up without marking the records done, so they may be claimed again at
    /// once; says per id whether the lease was still ours.
    async fn release(&self, leases: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        Ok(vec![true; leases.len()])
    }
}

/// What a batch makes durable together with its done marks.
#[derive(Debug, Default)]
pub struct Commit {
    /// Its records' keyed-state writes, in the order they were accepted.
    pub writes: Vec<keyed::KeyedWrite>,
    /// The lengths of the output and dead-letter files once its lines are written (stores
    /// that keep them cut a file back to its last recorded length on start).
    pub files: Vec<crate::sink::FileLength>,
    /// The input partition of each done mark, in order (a store that several workers share
    /// refuses the records of a partition whose keyed state another worker took over).
    pub partitions: Vec<i32>,
    /// The epochs under which the batch ran ([`Ownership::epochs`]).
    pub epochs: Vec<(i32, u64)>,
}

/// A batch's hold on its partitions' keyed state ([`StateStore::own_keyed`]).
#[derive(Debug, Default, Clone)]
pub struct Ownership {
    /// Per partition, the epoch of this worker's hold on its state: its writes count only
    /// while no other worker has taken the partition's state over since.
    pub epochs: Vec<(i32, u64)>,
    /// The partitions whose state was just taken over and loaded: writes of earlier epochs
    /// not yet durable will never be, and must not be read any more.
    pub restored: Vec<Restored>,
}

impl Ownership {
    /// The hold of a store with one writer, which holds every partition all along (epoch 0).
    pub fn all_along(partitions: &[(i32, u64)]) -> Self {
        Self {
            epochs: partitions.iter().map(|&(p, _)| (p, 0)).collect(),
            restored: Vec::new(),
        }
    }
}

/// A partition's keyed state taken over and loaded.
#[derive(Debug, Clone)]
pub struct Restored {
    pub partition: i32,
    pub epoch: u64,
    /// Live keys loaded.
    pub keys: usize,
    /// How long loading took.
    pub took: std::time::Duration,
}

/// A batch's place in the order in which batches' keyed-state writes reach the store: it
/// waits for the batch before it ([`wait`](Self::wait)) and, when dropped, lets the next
/// one go. A batch whose predecessor failed goes at once (the run is stopping anyway).
#[derive(Debug)]
pub struct Turn {
    previous: Option<tokio::sync::oneshot::Receiver<()>>,
    next: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Turn {
    /// A turn given up without waiting (a batch with nothing to commit) passes on only
    /// after the batch before it: the one after must not overtake that one.
    fn drop(&mut self) {
        if let (Some(previous), Some(next)) = (self.previous.take(), self.next.take())
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = previous.await;
                drop(next);
            });
        }
    }
}

impl Turn {
    /// A turn that never waits (a batch alone, or a store that needs no order).
    pub fn free() -> Self {
        Self {
            previous: None,
            next: None,
        }
    }

    /// Turns for batches in order: each one's `next` is the following one's `previous`.
    pub fn after(
        previous: Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (next, following) = tokio::sync::oneshot::channel();
        (
            Self {
                previous,
                next: Some(next),
            },
            following,
        )
    }

    /// Returns once the batch before this one has had its turn.
    pub async fn wait(&mut self) {
        if let Some(previous) = self.previous.take() {
            let _ = previous.await;
        }
    }
}

/// Where the records in the plugin are noted, and their crashes counted (crash-loop
/// protection, `pipeline/crash.rs`).
#[async_trait]
pub trait CrashLog: Send + Sync {
    /// Per id, how many times a worker died while it was in the plugin.
    async fn crashes(&self, ids: &[&str]) -> Result<Vec<u32>, StateError>;

    /// Notes that these records are about to enter the plugin (a note that outlives a
    /// `kill -9` of the process).
    async fn enter(&self, ids: &[&str]) -> Result<(), StateError>;

    /// Notes that these records left the plugin alive: their note and crashes are cleared.
    async fn leave(&self, ids: &[&str]) -> Result<(), StateError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_turn_given_up_unwaited_passes_on_only_after_the_one_before() {
        let (mut first, next) = Turn::after(None);
        let (skipped, next) = Turn::after(Some(next));
        let (mut third, _) = Turn::after(Some(next));
        drop(skipped);
        let waiting = tokio::spawn(async move { third.wait().await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the third overtook the first");
        first.wait().await;
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the third's turn came")
            .expect("joined");
    }
}
