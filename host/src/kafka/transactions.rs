//! Exactly-once mode: batches are written in Kafka transactions of the worker's two
//! transactional producers, each transaction holding its batches' outputs, dead letters and
//! the consumer offsets after them (`send_offsets_to_transaction` with the consumer's group
//! metadata). A batch's [`Ack`](super::Ack) joins the open transaction before its outputs
//! are sent (to that transaction's producer), and says when they are delivered; done marks
//! come only after the commit.
//!
//! **Group commit on two producers that take turns.** A producer cannot take records while
//! it commits, so while one transaction commits, the batches written meanwhile join the
//! next one, on the other producer. When the first ends, the next takes no more members
//! and commits as soon as their records are delivered; new batches begin a transaction on
//! the producer just freed. With no transaction before it open, a transaction takes no
//! more members once one of them is delivered, so with a light load it holds one batch.
//! The last member to be ready commits for all (the union of their offsets) while the
//! others await the outcome: the round trips of a commit are paid once per group, and the
//! writing does not wait for a commit. A transaction commits only after the one before it
//! ended, and aborts if that one did not commit, so offsets move in order. A transaction
//! begins only once every record of the open one is delivered: records reach a partition's
//! log in the order they are delivered, and one sent by the other producer while a record
//! read before it is still in flight could overtake it, out of its input partition's order.
//!
//! - A member with records of a partition that was revoked, or read again, since it was
//!   taken makes the transaction abort: those records belong to the next owner, or to the
//!   reading again.
//! - A member whose sends or deliveries failed makes it abort too.
//! - An aborted transaction's partitions are read again from the members' first offset,
//!   unless they were read again since (by the abort of the transaction before); batches of
//!   those partitions taken before are aborted in turn.
//! - A fenced or fatal producer ends the pipeline's run: another worker now has this slot's
//!   transactional ids, or the producer cannot go on. The worker then starts its Kafka
//!   clients again, in the same process (`worker/restarts.rs`), where it counts
//!   `weir_transactions_total{result="fenced"}`.
//!
//! On a revoke, the callback waits for the open transactions to end before the partitions
//! go, so the next owner starts after every committed batch.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::Offset;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};
use tokio::sync::{Notify, watch};

use super::consumer::{Position, SourceContext};
use super::offsets::OffsetTracker;
use super::producer::KafkaProducer;
use super::{LogContext, offset_list};
use crate::metrics::{ExactlyOnceStarted, Metrics, TransactionEnded, TransactionResult};
use crate::sink::Lane;
use crate::source::SourceError;

/// How many ended transactions' outcomes are kept for members that look late.
const OUTCOMES_KEPT: usize = 64;

/// How long a commit or an abort may take.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a commit waits for the messages librdkafka still counts (see
/// [`until_no_message_outstanding`]).
const OUTSTANDING_PATIENCE: Duration = Duration::from_millis(100);

/// Per partition: an offset, and the epoch its records were taken in.
type Points = BTreeMap<i32, (i64, u64)>;

/// An open transaction and its members.
struct Group {
    id: u64,
    /// Which of the two producers it is on.
    producer: usize,
    /// The transaction before it, open when this one began: this one commits only if that
    /// one did.
    after: Option<u64>,
    /// Whether that one is still open: until it ends, this one takes members.
    before_open: bool,
    /// Batches that joined.
    members: usize,
    /// Members whose records are delivered (or failed): waiting for the outcome.
    ready: usize,
    /// The offsets to commit, and the members' first offsets (where to read again after an
    /// abort).
    next: Points,
    first: Points,
    /// Why the transaction must abort, when a member says so.
    abort: Option<String>,
    /// No more members: the commit (or abort) is under way.
    closing: bool,
}

/// What it takes to end a transaction.
struct Closing {
    id: u64,
    producer: usize,
    after: Option<u64>,
    next: Points,
    first: Points,
    abort: Option<String>,
    members: usize,
}

impl Group {
    /// Transaction `id` on `producer`, its first member joined; `after` the one before it,
    /// if that one is still open.
    fn new(id: u64, producer: usize, after: Option<u64>) -> Self {
        Self {
            id,
            producer,
            after,
            before_open: after.is_some(),
            members: 1,
            ready: 0,
            next: Points::new(),
            first: Points::new(),
            abort: None,
            closing: false,
        }
    }

    /// One more member is ready. With the transaction before ended (or none), it takes no
    /// more members, and the last one ready gets it to close.
    fn ready(&mut self) -> Option<Closing> {
        self.ready += 1;
        self.close_when_ready()
    }

    /// The transaction before ended.
    fn before_ended(&mut self) -> Option<Closing> {
        self.before_open = false;
        self.close_when_ready()
    }

    fn close_when_ready(&mut self) -> Option<Closing> {
        if self.before_open {
            return None;
        }
        self.closing = true;
        if self.ready < self.members {
            return None;
        }
        Some(Closing {
            id: self.id,
            producer: self.producer,
            after: self.after,
            next: std::mem::take(&mut self.next),
            first: std::mem::take(&mut self.first),
            abort: self.abort.take(),
            members: self.members,
        })
    }
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

/// The transactions open on each producer, and the last id given.
#[derive(Default)]
struct Open {
    on: [Option<Group>; 2],
    last_id: u64,
    /// Why a producer cannot go on, once one cannot: no transaction begins after that.
    failed: Option<String>,
}

impl Open {
    /// The transaction begun last, if it is still open.
    fn newest(&mut self) -> Option<&mut Group> {
        self.on.iter_mut().flatten().max_by_key(|g| g.id)
    }

    fn with_id(&mut self, id: u64) -> Option<&mut Group> {
        self.on.iter_mut().flatten().find(|g| g.id == id)
    }
}

/// The worker's transactional producers (shared with its sinks) and their open
/// transactions.
pub struct Transactions {
    producer: KafkaProducer,
    open: Mutex<Open>,
    /// The outcomes of the last transactions to end.
    ended: watch::Sender<Ended>,
    /// Told each time a member's records are delivered (or failed).
    delivered: Notify,
    /// Where `weir_transactions_total{result}` is counted.
    metrics: Arc<Metrics>,
}

impl Transactions {
    /// `producer` holds the two transactional producers that take turns.
    pub fn new(producer: &KafkaProducer, metrics: Arc<Metrics>) -> Arc<Self> {
        metrics.emit(ExactlyOnceStarted);
        Arc::new(Self {
            producer: producer.clone(),
            open: Mutex::new(Open::default()),
            ended: watch::Sender::new(Ended::default()),
            delivered: Notify::new(),
            metrics,
        })
    }

    fn open(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits, up to `limit`, until no transaction is open (a revoke lets the open ones end).
    pub(super) fn wait_until_none_open(&self, limit: Duration) -> bool {
        let started = Instant::now();
        while self.open().newest().is_some() {
            if started.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    fn count(&self, result: TransactionResult) {
        self.metrics.emit(TransactionEnded(result));
    }

    /// Ends transaction `id` on `producer`, and its members learn how. The transaction
    /// after it takes no more members: returned when it can close at once.
    fn end(&self, id: u64, producer: usize, outcome: Outcome) -> Option<Closing> {
        let next = {
            let mut open = self.open();
            open.on[producer] = None;
            if let Outcome::Failed(why) = &outcome {
                open.failed.get_or_insert_with(|| why.clone());
            }
            let next = open.on.iter_mut().flatten().find(|g| g.after == Some(id));
            next.and_then(Group::before_ended)
        };
        self.ended.send_modify(|ended| ended.record(id, outcome));
        next
    }

    /// How transaction `id` ended, once it has.
    async fn outcome_of(&self, id: u64) -> Outcome {
        let mut ended = self.ended.subscribe();
        loop {
            if let Some(outcome) = ended.borrow_and_update().outcome_of(id) {
                return outcome;
            }
            if ended.changed().await.is_err() {
                return Outcome::Failed("the transactions ended".into());
            }
        }
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

/// Waits, up to [`OUTSTANDING_PATIENCE`], until `producer` counts no message outstanding.
///
/// rust-rdkafka's `commit_transaction` flushes first: while librdkafka still counts a
/// message (its delivery report is confirmed, but the polling thread has not released it
/// yet), that flush waits in a poll of its own, up to 100 ms, for an event that the polling
/// thread takes. Every delivery of a closing transaction is confirmed already, so the
/// count reaches zero soon (measured: at most 2 ms): waiting for it here spares those
/// 100 ms, which about one commit in a hundred paid (BENCHMARKS.md).
fn until_no_message_outstanding(producer: &FutureProducer<LogContext>) {
    let started = Instant::now();
    while producer.in_flight_count() > 0 && started.elapsed() < OUTSTANDING_PATIENCE {
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn requires_abort(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(rd) if rd.txn_requires_abort())
}

/// Whether librdkafka says the call may be made again (e.g. it timed out: a worker that was
/// frozen finds its requests' time run out at once).
fn retriable(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(rd) if rd.is_retriable())
}

/// How many times a commit that failed with a retriable error is called again.
const COMMIT_TRIES: u32 = 3;

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

    /// Joins the newest open transaction, or begins one on a producer that has none once
    /// every record of the open ones is delivered; waits otherwise. The batch's records go
    /// to that transaction's producer: the lane returned.
    pub(super) async fn begin(&mut self) -> Result<Lane, SourceError> {
        let transactions = &self.transactions;
        loop {
            let mut ended = transactions.ended.subscribe();
            let delivered = transactions.delivered.notified();
            tokio::pin!(delivered);
            delivered.as_mut().enable();
            {
                let mut open = transactions.open();
                if let Some(why) = &open.failed {
                    return Err(SourceError::other("exactly-once", why.clone()));
                }
                if let Some(group) = open.newest().filter(|g| !g.closing) {
                    group.members += 1;
                    self.joined = Some(group.id);
                    return Ok(Lane(group.producer));
                }
                // The other producer's records reach a partition's log in the order they are
                // delivered: a record sent now could land before one of an open transaction
                // still in flight (a record of the same input partition, read earlier), so a
                // new transaction begins only when the open ones' records are all delivered.
                // (A batch dropped in its transaction counts as ready with its records maybe
                // still in flight: that transaction aborts, and so does every one after it.)
                let all_delivered = open.on.iter().flatten().all(|g| g.ready == g.members);
                let free = open.on.iter().position(Option::is_none);
                if let (true, Some(free)) = (all_delivered, free) {
                    transactions.producer.producers()[free]
                        .begin_transaction()
                        .map_err(|e| SourceError::other("begin a transaction", e))?;
                    let after = open.newest().map(|g| g.id);
                    open.last_id += 1;
                    let id = open.last_id;
                    open.on[free] = Some(Group::new(id, free, after));
                    self.joined = Some(id);
                    tracing::debug!(topic = %self.topic, id, producer = free, "transaction begun");
                    return Ok(Lane(free));
                }
            }
            // Both are closing, or records are still in flight: wait for one to end, or for
            // a delivery.
            tokio::select! {
                _ = ended.changed() => {}
                () = &mut delivered => {}
            }
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
        let closing = {
            let mut open = self.transactions.open();
            // A joined transaction stays open until all its members are ready.
            let Some(group) = open.with_id(id) else {
                return Err(SourceError::other(
                    "exactly-once commit",
                    "the batch's transaction ended without it",
                ));
            };
            let stale = self.span(positions, &mut group.next, &mut group.first);
            if stale && group.abort.is_none() {
                group.abort = Some(
                    "a batch was taken before a revoke or a reading again of its partition".into(),
                );
            }
            if let Some(why) = failed {
                group.abort.get_or_insert(why);
            }
            group.ready()
        };
        self.transactions.delivered.notify_waiters();
        let outcome = match closing {
            // The last member to be ready commits (or aborts) for all.
            Some(closing) => self.close(closing).await,
            None => self.transactions.outcome_of(id).await,
        };
        match outcome {
            Outcome::Committed => Ok(true),
            Outcome::Aborted => Ok(false),
            Outcome::Failed(why) => Err(SourceError::other("exactly-once commit", why)),
        }
    }

    /// Adds the span of `positions` (in partitions still assigned in the same epoch) to
    /// `next` and `first`; says whether a position was stale.
    fn span(&self, positions: &[Position], next: &mut Points, first: &mut Points) -> bool {
        let mut stale = false;
        let offsets = self.offsets.lock().unwrap_or_else(PoisonError::into_inner);
        for &(partition, offset, epoch) in positions {
            if !offsets.is_current(partition, epoch) {
                stale = true;
                continue;
            }
            let after = next.entry(partition).or_insert((offset + 1, epoch));
            after.0 = after.0.max(offset + 1);
            let from = first.entry(partition).or_insert((offset, epoch));
            from.0 = from.0.min(offset);
        }
        stale
    }

    /// Ends a transaction (see [`Self::close_one`]), then the next one when it is ready,
    /// and so on, in a task of their own.
    async fn close(&self, closing: Closing) -> Outcome {
        let (outcome, next) = self.close_one(closing).await;
        if let Some(next) = next {
            let this = self.detached();
            tokio::spawn(async move {
                let mut next = Some(next);
                while let Some(closing) = next.take() {
                    next = this.close_one(closing).await.1;
                }
            });
        }
        outcome
    }

    /// Commits the transaction, or aborts it (when a member, or the one before, did not
    /// make it) and reads its partitions again; then its members learn the outcome. Returns
    /// the next transaction too, when it can close now.
    async fn close_one(&self, closing: Closing) -> (Outcome, Option<Closing>) {
        let Closing {
            id,
            producer,
            after,
            next,
            first,
            mut abort,
            members,
        } = closing;
        if let Some(before) = after
            && !matches!(
                self.transactions.outcome_of(before).await,
                Outcome::Committed
            )
        {
            abort.get_or_insert_with(|| "the transaction before it did not commit".into());
        }
        let outcome = match abort {
            Some(why) => {
                tracing::info!(topic = %self.topic, members, "{why}: the transaction is aborted, its records are read again");
                self.abort_and_read_again(producer, &first).await
            }
            None => self.commit_with(producer, next, &first, members).await,
        };
        let next = self.transactions.end(id, producer, outcome.clone());
        (outcome, next)
    }

    /// The same batch's context, in no transaction (for a task of its own).
    fn detached(&self) -> Self {
        Self {
            transactions: self.transactions.clone(),
            consumer: self.consumer.clone(),
            offsets: self.offsets.clone(),
            topic: self.topic.clone(),
            joined: None,
        }
    }

    /// Commits the transaction on `producer` with the offsets `next`; after an abortable
    /// failure aborts it and reads the partitions again from `first`.
    async fn commit_with(
        &self,
        producer: usize,
        next: Points,
        first: &Points,
        members: usize,
    ) -> Outcome {
        let points = offset_list(&self.topic, next.into_iter().map(|(p, (o, _))| (p, o)));
        let Some(group) = self.consumer.group_metadata() else {
            return Outcome::Failed("the consumer has no group metadata".into());
        };
        let on = self.transactions.producer.producers()[producer].clone();
        let committed = tokio::task::spawn_blocking(move || {
            on.send_offsets_to_transaction(&points, &group, TXN_TIMEOUT)?;
            until_no_message_outstanding(&on);
            // A commit that failed with a retriable error may be under way at the
            // coordinator: librdkafka asks for the same call again, not an abort.
            let mut tries = 1;
            loop {
                match on.commit_transaction(TXN_TIMEOUT) {
                    Err(e) if retriable(&e) && tries < COMMIT_TRIES => tries += 1,
                    done => return done,
                }
            }
        })
        .await;
        match committed {
            Ok(Ok(())) => {
                tracing::debug!(topic = %self.topic, members, "transaction committed");
                self.transactions.count(TransactionResult::Committed);
                Outcome::Committed
            }
            // A retriable failure left here came from sending the offsets (nothing is
            // committed), or from a commit tried 3 times: the transaction is aborted (an
            // abort that fails, as after a commit that did go through, ends the run).
            Ok(Err(e)) if requires_abort(&e) || retriable(&e) => {
                tracing::warn!(topic = %self.topic, fenced = fenced(&e), "transaction failed ({e}): aborted, its records are read again");
                if fenced(&e) {
                    self.transactions.count(TransactionResult::Fenced);
                }
                self.abort_and_read_again(producer, first).await
            }
            Ok(Err(e)) => Outcome::Failed(format!(
                "committing a transaction failed and the producer cannot go on (another \
                 worker with this transactional id fenced it, or a fatal error): {e}"
            )),
            Err(e) => Outcome::Failed(format!("the commit task failed: {e}")),
        }
    }

    /// Aborts the transaction on `producer` and reads the partitions in `from` again from
    /// there, those still in the epoch their records were taken in.
    async fn abort_and_read_again(&self, producer: usize, from: &Points) -> Outcome {
        let on = self.transactions.producer.producers()[producer].clone();
        match tokio::task::spawn_blocking(move || on.abort_transaction(TXN_TIMEOUT)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Outcome::Failed(format!("aborting a transaction: {e}")),
            Err(e) => return Outcome::Failed(format!("the abort task failed: {e}")),
        }
        self.transactions.count(TransactionResult::Aborted);
        let again: Vec<(i32, i64)> = {
            let mut offsets = self.offsets.lock().unwrap_or_else(PoisonError::into_inner);
            let again: Vec<(i32, i64)> = from
                .iter()
                .filter(|&(&p, &(_, epoch))| offsets.is_current(p, epoch))
                .map(|(&p, &(o, _))| (p, o))
                .collect();
            for &(p, o) in &again {
                // A new epoch: batches of this partition taken before are stale now.
                offsets.assign(p, Some(o));
            }
            again
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
        let closing = {
            let mut open = self.transactions.open();
            let Some(group) = open.with_id(id) else {
                return;
            };
            group
                .abort
                .get_or_insert_with(|| "a batch of the transaction was dropped".into());
            group.ready()
        };
        self.transactions.delivered.notify_waiters();
        let (Some(closing), Ok(runtime)) = (closing, tokio::runtime::Handle::try_current()) else {
            return;
        };
        let this = self.detached();
        runtime.spawn(async move { this.close(closing).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_takes_members_until_the_one_before_it_ends() {
        // With none before it open: no more members once one is ready; the last one ready
        // closes it.
        let mut alone = Group::new(1, 0, None);
        alone.members = 2;
        assert!(alone.ready().is_none());
        assert!(alone.closing, "takes no more members once one is ready");
        let closing = alone.ready().expect("the last member ready closes it");
        assert_eq!((closing.id, closing.members), (1, 2));

        // With one before it open: its members all ready, it still takes more.
        let mut next = Group::new(2, 0, Some(1));
        assert!(next.ready().is_none());
        assert!(
            !next.closing,
            "takes members while the one before it is open"
        );
        next.members += 1;
        // The one before ends: no more members; it closes once the last one is ready.
        assert!(next.before_ended().is_none());
        assert!(next.closing);
        let closing = next.ready().expect("closes");
        assert_eq!((closing.after, closing.members), (Some(1), 2));

        // Its members all ready when the one before ends: it closes at once.
        let mut ready = Group::new(3, 0, Some(2));
        assert!(ready.ready().is_none());
        assert!(ready.before_ended().is_some());
    }

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
