//! Exactly-once mode: batches are written in Kafka transactions of the worker's
//! transactional producer, each holding its batches' outputs, dead letters and the consumer
//! offsets after them (`send_offsets_to_transaction` with the consumer's group metadata).
//! A batch's [`Ack`](super::Ack) joins the open transaction before its outputs are sent, and
//! says when they are delivered; done marks come only after the commit.
//!
//! **Group commit.** One transaction is open at a time, and batches written while it is
//! open join it, until it starts to commit: that happens as soon as every member's records
//! are delivered, and the last member to get there commits for all (the union of their
//! offsets) while the others await the outcome. Under load, the batches written while one
//! transaction commits form the next one, so the round trips of a commit are paid once per
//! group, not once per batch; with a light load a transaction holds one batch.
//!
//! - A member with records of a partition that was revoked, or read again, since it was
//!   taken makes the transaction abort: those records belong to the next owner, or to the
//!   reading again.
//! - A member whose sends or deliveries failed makes it abort too.
//! - An abortable failure aborts the transaction, and its partitions are read again from
//!   the members' first offset; batches of those partitions taken before are aborted in
//!   turn.
//! - A fenced or fatal producer ends the pipeline's run: another worker now has this slot's
//!   transactional id, or the producer cannot go on. The worker then starts its Kafka
//!   clients again, in the same process (`Restarts` in `cli.rs`), where it counts
//!   `weir_transactions_total{result="fenced"}`.
//!
//! On a revoke, the callback waits for the open transaction to end before the partitions
//! go, so the next owner starts after every committed batch.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use rdkafka::Offset;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};
use tokio::sync::watch;

use super::SourceError;
use super::kafka::{Position, SourceContext};
use super::offsets::OffsetTracker;
use crate::kafka::{LogContext, offset_list};
use crate::sink::KafkaProducer;

/// How many ended transactions' outcomes are kept for members that look late.
const OUTCOMES_KEPT: usize = 64;

/// How long a commit or an abort may take.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

/// The open transaction and its members.
struct Group {
    id: u64,
    /// Batches that joined.
    members: usize,
    /// Members whose records are delivered (or failed): waiting for the outcome.
    ready: usize,
    /// Per partition: the offset to commit, and the first offset of the members (where to
    /// read again after an abort).
    after: BTreeMap<i32, i64>,
    first: BTreeMap<i32, i64>,
    /// Why the transaction must abort, when a member says so.
    abort: Option<String>,
    /// No more members: the commit (or abort) is under way.
    closing: bool,
}

/// How a transaction ended, for its members.
#[derive(Clone, Debug)]
enum Outcome {
    Committed,
    Aborted,
    /// The producer cannot go on.
    Failed(String),
}

/// The outcomes of the last transactions to end, oldest first. More than the last one, so
/// that a member whose task runs late still finds its own transaction's outcome after the
/// next one ended too (transactions end one at a time, in id order).
#[derive(Default)]
struct Ended(VecDeque<(u64, Outcome)>);

impl Ended {
    fn record(&mut self, id: u64, outcome: Outcome) {
        if self.0.len() == OUTCOMES_KEPT {
            self.0.pop_front();
        }
        self.0.push_back((id, outcome));
    }

    /// How transaction `id` ended; `None` while it has not.
    fn outcome_of(&self, id: u64) -> Option<Outcome> {
        if let Some((_, outcome)) = self.0.iter().find(|(i, _)| *i == id) {
            return Some(outcome.clone());
        }
        let forgotten = self.0.front().is_some_and(|(oldest, _)| *oldest > id);
        forgotten.then(|| {
            Outcome::Failed(format!(
                "the outcome of transaction {id} is no longer known ({OUTCOMES_KEPT} \
                 transactions ended since)"
            ))
        })
    }
}

/// The worker's transactional producer (shared with its sinks) and its open transaction.
pub struct Transactions {
    producer: FutureProducer<LogContext>,
    open: Mutex<Option<Group>>,
    /// The outcomes of the last transactions to end.
    ended: watch::Sender<Ended>,
    next_id: Mutex<u64>,
    /// `weir_transactions_total{result}`.
    results: IntCounterVec,
}

impl Transactions {
    pub fn new(producer: &KafkaProducer, results: IntCounterVec) -> Arc<Self> {
        for result in ["committed", "aborted", "fenced"] {
            results.with_label_values(&[result]);
        }
        Arc::new(Self {
            producer: producer.inner().clone(),
            open: Mutex::new(None),
            ended: watch::Sender::new(Ended::default()),
            next_id: Mutex::new(0),
            results,
        })
    }

    fn open(&self) -> MutexGuard<'_, Option<Group>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits, up to `limit`, until no transaction is open (a revoke lets the open one end).
    pub(super) fn wait_until_none_open(&self, limit: Duration) -> bool {
        let started = Instant::now();
        while self.open().is_some() {
            if started.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    fn count(&self, result: &str) {
        self.results.with_label_values(&[result]).inc();
    }

    /// Ends transaction `id`: no transaction is open any more, and its members learn how.
    fn end(&self, id: u64, outcome: Outcome) {
        *self.open() = None;
        self.ended.send_modify(|ended| ended.record(id, outcome));
    }
}

/// One batch's part in a transaction.
pub(super) struct BatchTransaction {
    pub(super) transactions: Arc<Transactions>,
    pub(super) consumer: Arc<StreamConsumer<SourceContext>>,
    pub(super) offsets: Arc<Mutex<OffsetTracker>>,
    pub(super) topic: String,
    /// The transaction joined and not yet left.
    joined: Option<u64>,
}

/// Whether a failed commit says another producer has this transactional id, or the
/// consumer is no longer the partitions' owner in the group.
fn fenced(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        e.rdkafka_error_code(),
        Some(
            ProducerFenced
                | InvalidProducerEpoch
                | FencedInstanceId
                | IllegalGeneration
                | UnknownMemberId
                | RebalanceInProgress
        )
    )
}

fn requires_abort(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(rd) if rd.txn_requires_abort())
}

impl BatchTransaction {
    pub(super) fn new(
        transactions: Arc<Transactions>,
        consumer: Arc<StreamConsumer<SourceContext>>,
        offsets: Arc<Mutex<OffsetTracker>>,
        topic: String,
    ) -> Self {
        Self {
            transactions,
            consumer,
            offsets,
            topic,
            joined: None,
        }
    }

    /// Joins the open transaction, or opens one; waits while one is committing.
    pub(super) async fn begin(&mut self) -> Result<(), SourceError> {
        let transactions = &self.transactions;
        loop {
            let mut ended = transactions.ended.subscribe();
            {
                let mut open = transactions.open();
                match open.as_mut() {
                    Some(group) if !group.closing => {
                        group.members += 1;
                        self.joined = Some(group.id);
                        return Ok(());
                    }
                    Some(_) => {}
                    None => {
                        transactions
                            .producer
                            .begin_transaction()
                            .map_err(|e| SourceError::other("begin a transaction", e))?;
                        let id = {
                            let mut next = transactions
                                .next_id
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner);
                            *next += 1;
                            *next
                        };
                        *open = Some(Group {
                            id,
                            members: 1,
                            ready: 0,
                            after: BTreeMap::new(),
                            first: BTreeMap::new(),
                            abort: None,
                            closing: false,
                        });
                        self.joined = Some(id);
                        tracing::debug!(topic = %self.topic, id, "transaction begun");
                        return Ok(());
                    }
                }
            }
            // Committing: wait for it to end.
            let _ = ended.changed().await;
        }
    }

    /// This batch's records at `positions` are delivered (`failed`: they are not, and the
    /// transaction must abort). Returns whether the transaction committed; `false` when it
    /// was aborted (the records are read again, or by their next owner).
    pub(super) async fn commit(
        &mut self,
        positions: &[Position],
        failed: Option<String>,
    ) -> Result<bool, SourceError> {
        let Some(id) = self.joined.take() else {
            return Err(SourceError::other(
                "exactly-once commit",
                "the batch is in no transaction",
            ));
        };
        let mut ended = self.transactions.ended.subscribe();
        let committing = {
            let mut open = self.transactions.open();
            // A joined transaction stays open until all its members are ready.
            let Some(group) = open.as_mut().filter(|g| g.id == id) else {
                return Err(SourceError::other(
                    "exactly-once commit",
                    "the batch's transaction ended without it",
                ));
            };
            let stale = self.span(positions, &mut group.after, &mut group.first);
            if stale && group.abort.is_none() {
                group.abort = Some(
                    "a batch was taken before a revoke or a reading again of its partition".into(),
                );
            }
            if let Some(why) = failed {
                group.abort.get_or_insert(why);
            }
            group.ready += 1;
            if group.ready == group.members {
                group.closing = true;
                Some((
                    std::mem::take(&mut group.after),
                    std::mem::take(&mut group.first),
                    group.abort.take(),
                    group.members,
                ))
            } else {
                None
            }
        };
        let outcome = match committing {
            // The last member to be ready commits (or aborts) for all.
            Some((after, first, abort, members)) => {
                let outcome = self.finish(after, &first, abort, members).await;
                self.transactions.end(id, outcome.clone());
                outcome
            }
            None => loop {
                if let Some(outcome) = ended.borrow_and_update().outcome_of(id) {
                    break outcome;
                }
                if ended.changed().await.is_err() {
                    break Outcome::Failed("the transactions ended".into());
                }
            },
        };
        match outcome {
            Outcome::Committed => Ok(true),
            Outcome::Aborted => Ok(false),
            Outcome::Failed(why) => Err(SourceError::other("exactly-once commit", why)),
        }
    }

    /// Adds the span of `positions` (in partitions still assigned in the same epoch) to
    /// `after` and `first`; says whether a position was stale.
    fn span(
        &self,
        positions: &[Position],
        after: &mut BTreeMap<i32, i64>,
        first: &mut BTreeMap<i32, i64>,
    ) -> bool {
        let mut stale = false;
        let offsets = self.offsets.lock().unwrap_or_else(PoisonError::into_inner);
        for &(partition, offset, epoch) in positions {
            if !offsets.is_current(partition, epoch) {
                stale = true;
                continue;
            }
            let next = after.entry(partition).or_insert(offset + 1);
            *next = (*next).max(offset + 1);
            let from = first.entry(partition).or_insert(offset);
            *from = (*from).min(offset);
        }
        stale
    }

    /// Commits the transaction with the offsets `after`, or aborts it (`abort`) and reads
    /// the partitions again from `first`.
    async fn finish(
        &self,
        after: BTreeMap<i32, i64>,
        first: &BTreeMap<i32, i64>,
        abort: Option<String>,
        members: usize,
    ) -> Outcome {
        if let Some(why) = abort {
            tracing::info!(topic = %self.topic, members, "{why}: the transaction is aborted, its records are read again");
            return self.abort_and_read_again(first).await;
        }
        let points = offset_list(&self.topic, after);
        let Some(group) = self.consumer.group_metadata() else {
            return Outcome::Failed("the consumer has no group metadata".into());
        };
        let producer = self.transactions.producer.clone();
        let committed = tokio::task::spawn_blocking(move || {
            producer.send_offsets_to_transaction(&points, &group, TXN_TIMEOUT)?;
            producer.commit_transaction(TXN_TIMEOUT)
        })
        .await;
        match committed {
            Ok(Ok(())) => {
                tracing::debug!(topic = %self.topic, members, "transaction committed");
                self.transactions.count("committed");
                Outcome::Committed
            }
            Ok(Err(e)) if requires_abort(&e) => {
                tracing::warn!(topic = %self.topic, fenced = fenced(&e), "transaction failed ({e}): aborted, its records are read again");
                if fenced(&e) {
                    self.transactions.count("fenced");
                }
                self.abort_and_read_again(first).await
            }
            Ok(Err(e)) => Outcome::Failed(format!(
                "committing a transaction failed and the producer cannot go on (another \
                 worker with this transactional id fenced it, or a fatal error): {e}"
            )),
            Err(e) => Outcome::Failed(format!("the commit task failed: {e}")),
        }
    }

    /// Aborts the open transaction and reads the partitions in `from` again from there.
    async fn abort_and_read_again(&self, from: &BTreeMap<i32, i64>) -> Outcome {
        let producer = self.transactions.producer.clone();
        match tokio::task::spawn_blocking(move || producer.abort_transaction(TXN_TIMEOUT)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Outcome::Failed(format!("aborting a transaction: {e}")),
            Err(e) => return Outcome::Failed(format!("the abort task failed: {e}")),
        }
        self.transactions.count("aborted");
        let again: Vec<(i32, i64)> = {
            let mut offsets = self.offsets.lock().unwrap_or_else(PoisonError::into_inner);
            let ours = offsets.partitions();
            from.iter()
                .filter(|(p, _)| ours.contains(p))
                .map(|(&p, &o)| {
                    // A new epoch: batches of this partition taken before are stale now.
                    offsets.assign(p, Some(o));
                    (p, o)
                })
                .collect()
        };
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        let sought = tokio::task::spawn_blocking(move || {
            for (partition, offset) in again {
                if let Err(e) = consumer.seek(
                    &topic,
                    partition,
                    Offset::Offset(offset),
                    Duration::from_secs(10),
                ) {
                    tracing::warn!(%topic, partition, offset, "seek back after an abort failed ({e}); the consumer reads on and the gap is read again when seen");
                }
            }
        })
        .await;
        match sought {
            Ok(()) => Outcome::Aborted,
            Err(e) => Outcome::Failed(format!("reading again after an abort: {e}")),
        }
    }
}

impl Drop for BatchTransaction {
    /// A batch dropped inside its transaction (its task ended early) makes it abort, so its
    /// other members are not left waiting.
    fn drop(&mut self) {
        let Some(id) = self.joined.take() else {
            return;
        };
        let first = {
            let mut open = self.transactions.open();
            let Some(group) = open.as_mut().filter(|g| g.id == id) else {
                return;
            };
            group
                .abort
                .get_or_insert_with(|| "a batch of the transaction was dropped".into());
            group.ready += 1;
            if group.ready < group.members {
                return;
            }
            group.closing = true;
            std::mem::take(&mut group.first)
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = Self {
            transactions: self.transactions.clone(),
            consumer: self.consumer.clone(),
            offsets: self.offsets.clone(),
            topic: self.topic.clone(),
            joined: None,
        };
        runtime.spawn(async move {
            let outcome = this.abort_and_read_again(&first).await;
            this.transactions.end(id, outcome);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_that_looks_late_finds_its_transactions_outcome() {
        let mut ended = Ended::default();
        assert!(ended.outcome_of(1).is_none(), "not ended yet");
        ended.record(1, Outcome::Aborted);
        // The next transaction ends before the member of the first one looks.
        ended.record(2, Outcome::Committed);
        assert!(matches!(ended.outcome_of(1), Some(Outcome::Aborted)));
        assert!(matches!(ended.outcome_of(2), Some(Outcome::Committed)));
        assert!(ended.outcome_of(3).is_none(), "not ended yet");
        // Beyond what is kept, the member is told so instead of waiting for ever.
        for id in 3..=(2 + OUTCOMES_KEPT as u64) {
            ended.record(id, Outcome::Committed);
        }
        assert!(
            matches!(ended.outcome_of(1), Some(Outcome::Failed(why)) if why.contains("no longer known"))
        );
        assert!(matches!(ended.outcome_of(3), Some(Outcome::Committed)));
    }
}
