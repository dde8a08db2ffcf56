//! Exactly-once mode: each batch is one Kafka transaction of the worker's transactional
//! producer, holding the batch's outputs, its dead letters and the consumer offsets after
//! it (`send_offsets_to_transaction` with the consumer's group metadata). The batch's
//! [`Ack`](super::Ack) opens it before the outputs are sent and commits it once they are
//! delivered, before any done mark; one transaction is open at a time.
//!
//! - A batch with records of a partition that was revoked, or read again, since it was
//!   taken is aborted: those records belong to the next owner, or to the reading again.
//! - An abortable failure aborts the transaction, and the batch's partitions are read
//!   again from the batch's first offset; later batches of those partitions, taken before,
//!   are aborted in turn.
//! - A fenced or fatal producer ends the pipeline's run: another worker now has this slot's
//!   transactional id, or the producer cannot go on. The worker then starts its Kafka
//!   clients again, in the same process (`Restarts` in `cli.rs`), where it counts
//!   `weir_transactions_total{result="fenced"}`.
//!
//! On a revoke, the callback waits for the open transaction to end before the partitions
//! go, so the next owner starts after every committed batch.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use rdkafka::Offset;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::SourceError;
use super::kafka::{Position, SourceContext};
use super::offsets::OffsetTracker;
use crate::kafka::{LogContext, offset_list};
use crate::sink::KafkaProducer;

/// How long a commit or an abort may take.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

/// The worker's transactional producer (shared with its sinks) and whose turn it is.
pub struct Transactions {
    producer: FutureProducer<LogContext>,
    /// One open transaction at a time.
    turn: Arc<Semaphore>,
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
            turn: Arc::new(Semaphore::new(1)),
            results,
        })
    }

    /// Waits, up to `limit`, until no transaction is open (a revoke lets the open one end).
    pub(super) fn wait_until_none_open(&self, limit: Duration) -> bool {
        let started = Instant::now();
        while self.turn.available_permits() == 0 {
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
}

/// One batch's transaction.
pub(super) struct BatchTransaction {
    pub(super) transactions: Arc<Transactions>,
    pub(super) consumer: Arc<StreamConsumer<SourceContext>>,
    pub(super) offsets: Arc<Mutex<OffsetTracker>>,
    pub(super) topic: String,
    permit: Option<OwnedSemaphorePermit>,
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
            permit: None,
        }
    }

    /// Waits for the previous batch's transaction to end, then opens this one's.
    pub(super) async fn begin(&mut self) -> Result<(), SourceError> {
        let permit = self
            .transactions
            .turn
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        self.transactions
            .producer
            .begin_transaction()
            .map_err(|e| SourceError::other("begin a transaction", e))?;
        self.permit = Some(permit);
        tracing::debug!(topic = %self.topic, "transaction begun");
        Ok(())
    }

    /// Per partition of `positions` still assigned in the same epoch: the first offset and
    /// the offset after the last; and whether any position was stale.
    fn span(&self, positions: &[Position]) -> (BTreeMap<i32, i64>, BTreeMap<i32, i64>, bool) {
        let (mut first, mut after) = (BTreeMap::new(), BTreeMap::new());
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
        (first, after, stale)
    }

    /// Aborts the transaction because sending or delivering its records failed with `why`;
    /// the batch's records are read again.
    pub(super) async fn abort(
        &mut self,
        positions: &[Position],
        why: &crate::sink::SinkError,
    ) -> Result<(), SourceError> {
        let _turn = self.permit.take();
        tracing::warn!(topic = %self.topic, "sending the batch's records failed ({why}): its transaction is aborted and they are read again");
        let (first, _, _) = self.span(positions);
        self.abort_and_read_again(&first).await
    }

    /// Commits what was sent since `begin` with the offsets after `positions`; `false` when
    /// the transaction was aborted (the records are read again, or by their next owner).
    pub(super) async fn commit(&mut self, positions: &[Position]) -> Result<bool, SourceError> {
        // The turn passes on when this returns, whatever the outcome.
        let _turn = self.permit.take();
        let (first, after, stale) = self.span(positions);
        if stale {
            tracing::info!(topic = %self.topic, "batch taken before a revoke or a reading again: aborted, its records are read again");
            self.abort_and_read_again(&first).await?;
            return Ok(false);
        }
        let points = offset_list(&self.topic, after);
        let group = self.consumer.group_metadata().ok_or_else(|| {
            SourceError::other("exactly-once commit", "the consumer has no group metadata")
        })?;
        let producer = self.transactions.producer.clone();
        let committed = tokio::task::spawn_blocking(move || {
            producer.send_offsets_to_transaction(&points, &group, TXN_TIMEOUT)?;
            producer.commit_transaction(TXN_TIMEOUT)
        })
        .await
        .map_err(|e| SourceError::other("exactly-once commit", e))?;
        match committed {
            Ok(()) => {
                tracing::debug!(topic = %self.topic, records = positions.len(), "transaction committed");
                self.transactions.count("committed");
                Ok(true)
            }
            Err(e) if requires_abort(&e) => {
                tracing::warn!(topic = %self.topic, fenced = fenced(&e), "transaction failed ({e}): aborted, its records are read again");
                if fenced(&e) {
                    self.transactions.count("fenced");
                }
                self.abort_and_read_again(&first).await?;
                Ok(false)
            }
            Err(e) => Err(SourceError::other(
                "committing a transaction failed and the producer cannot go on (another \
                 worker with this transactional id fenced it, or a fatal error)",
                e,
            )),
        }
    }

    /// Aborts the open transaction and reads the partitions in `from` again from there.
    async fn abort_and_read_again(&self, from: &BTreeMap<i32, i64>) -> Result<(), SourceError> {
        let producer = self.transactions.producer.clone();
        tokio::task::spawn_blocking(move || producer.abort_transaction(TXN_TIMEOUT))
            .await
            .map_err(|e| SourceError::other("aborting a transaction", e))?
            .map_err(|e| SourceError::other("aborting a transaction", e))?;
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
        tokio::task::spawn_blocking(move || {
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
        .await
        .map_err(|e| SourceError::other("reading again after an abort", e))
    }
}
