//! A Kafka topic as a source: one consumer in a consumer group (cooperative-sticky by
//! default), offsets stored only over the contiguous prefix of records whose fate is durable
//! (see `offsets.rs`) and committed by librdkafka's auto-commit from that store.
//!
//! In exactly-once mode (`transactions.rs`) the offsets go into each batch's transaction
//! instead, and nothing is auto-committed.
//!
//! Rebalances: on a graceful revoke the revoked partitions' prefix is committed synchronously
//! in the callback and their unfinished records are abandoned (dropped from the batch being
//! built; the next owner reads them again); a *lost* partition commits nothing.
//!
//! Back-pressure: when the pipeline takes no batch for a while (a dependency is away and its
//! circuit open), [`Source::keep_alive`] pauses the assigned partitions and goes on polling,
//! so the consumer stays in its group past `max.poll.interval.ms`; what arrives meanwhile is
//! kept for the next batch, and the next batch resumes the partitions.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::Statistics;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::offsets::{Admission, OffsetTracker};
use super::transactions::{BatchTransaction, Transactions};
use super::{headers_of, offset_list};
use crate::config::KafkaConfig;
use crate::metrics::{ConsumerLag, Metrics, PartitionRevoked};
use crate::record::{Record, SourceMeta};
use crate::sink::Lane;
use crate::source::{Ack, AckStep, Batch, Incoming, Source, SourceError};

/// How long a batch waits for more records once its first record is in.
const BATCH_LINGER: Duration = Duration::from_millis(20);
/// How long the pipeline may take no batch before the partitions are paused.
const PAUSE_AFTER: Duration = Duration::from_secs(5);
/// How often a paused consumer polls (well within any `max.poll.interval.ms`).
const PAUSED_POLL: Duration = Duration::from_secs(1);

/// The consumer's callbacks: logs into `tracing`, rebalances into the offset tracker.
pub(super) struct SourceContext {
    topic: String,
    /// Whether a partition without a committed offset starts at the earliest record.
    earliest: bool,
    offsets: Arc<Mutex<OffsetTracker>>,
    /// Where `weir_consumer_lag{topic,partition}` is set, from librdkafka's statistics.
    metrics: Arc<Metrics>,
    /// Exactly-once mode.
    transactions: Option<Arc<Transactions>>,
}

impl SourceContext {
    fn offsets(&self) -> MutexGuard<'_, OffsetTracker> {
        self.offsets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl SourceContext {
    /// Where consumption of newly assigned partitions resumes: the committed offset, else
    /// the earliest one (`auto.offset.reset=earliest`). Unknown ones are left out.
    fn starts(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
    ) -> std::collections::HashMap<i32, i64> {
        let mut starts = std::collections::HashMap::new();
        let Ok(committed) = consumer.committed_offsets(tpl.clone(), Duration::from_secs(5)) else {
            return starts;
        };
        let earliest = self.earliest;
        for e in committed.elements_for_topic(&self.topic) {
            let start = match e.offset() {
                Offset::Offset(o) => Some(o),
                Offset::Invalid if earliest => consumer
                    .fetch_watermarks(&self.topic, e.partition(), Duration::from_secs(5))
                    .ok()
                    .map(|(low, _)| low),
                _ => None,
            };
            if let Some(start) = start {
                starts.insert(e.partition(), start);
            }
        }
        starts
    }
}

impl ClientContext for SourceContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        crate::kafka::log(level, facility, message);
    }

    /// Consumer lag per assigned partition: behind the committed offset, as librdkafka
    /// reports it. In exactly-once mode offsets are committed in the producer's transactions,
    /// which the consumer does not see (its lag stays unknown, -1): there, behind the last
    /// record read.
    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let assigned = self.offsets().partitions();
        for (partition, p) in &topic.partitions {
            if *partition < 0 || !assigned.contains(partition) {
                continue;
            }
            // The end a read_committed consumer sees, else the high watermark.
            let end = if p.ls_offset >= 0 {
                p.ls_offset
            } else {
                p.hi_offset
            };
            let lag = match p.consumer_lag {
                lag if lag >= 0 => lag,
                _ if p.app_offset >= 0 && end >= 0 => (end - p.app_offset).max(0),
                _ => continue,
            };
            self.metrics.emit(ConsumerLag {
                topic: &self.topic,
                partition: *partition,
                lag,
            });
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        crate::kafka::log_error(&error, reason);
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let starts = self.starts(consumer, tpl);
                let mut offsets = self.offsets();
                let mut assigned = Vec::new();
                for e in tpl.elements_for_topic(&self.topic) {
                    offsets.assign(e.partition(), starts.get(&e.partition()).copied());
                    assigned.push(e.partition());
                }
                let starts: std::collections::BTreeMap<i32, i64> = starts.into_iter().collect();
                tracing::info!(topic = %self.topic, partitions = ?assigned, ?starts, cooperative = matches!(consumer.rebalance_protocol(), rdkafka::consumer::RebalanceProtocol::Cooperative), "partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                let lost = consumer.assignment_lost();
                if let Some(transactions) = &self.transactions {
                    // Offsets are committed in transactions: let the open one end, so the
                    // next owner starts after it.
                    if !transactions.wait_until_none_open(Duration::from_secs(30)) {
                        tracing::warn!(topic = %self.topic, "a transaction still open 30 s into a revoke: it is aborted when it ends, and the next owner reads its records");
                    }
                }
                let mut points = Vec::new();
                let mut revoked = Vec::new();
                {
                    let mut offsets = self.offsets();
                    for e in tpl.elements_for_topic(&self.topic) {
                        revoked.push(e.partition());
                        self.metrics.emit(PartitionRevoked {
                            topic: &self.topic,
                            partition: e.partition(),
                        });
                        if let Some(point) = offsets.revoke(e.partition())
                            && !lost
                        {
                            points.push((e.partition(), point));
                        }
                    }
                }
                let commit = offset_list(&self.topic, points);
                if self.transactions.is_some() {
                    tracing::info!(topic = %self.topic, partitions = ?revoked, lost, "partitions revoked (exactly-once: offsets are in the committed transactions)");
                } else if lost {
                    tracing::warn!(topic = %self.topic, partitions = ?revoked, "partitions lost: nothing committed, their records go to the next owner");
                } else if commit.count() == 0 {
                    tracing::info!(topic = %self.topic, partitions = ?revoked, "partitions revoked (nothing to commit)");
                } else {
                    match consumer.commit(&commit, CommitMode::Sync) {
                        Ok(()) => {
                            tracing::info!(topic = %self.topic, partitions = ?revoked, "partitions revoked: finished prefix committed")
                        }
                        Err(e) => {
                            tracing::warn!(topic = %self.topic, partitions = ?revoked, "partitions revoked: commit failed ({e}); the next owner re-reads from the last commit")
                        }
                    }
                }
            }
            Rebalance::Error(e) => {
                tracing::warn!(topic = %self.topic, "rebalance failed: {e}");
            }
        }
    }
}

/// Where a record of a batch came from: partition, offset, assignment epoch.
pub(super) type Position = (i32, i64, u64);

/// Consumes one topic in a consumer group.
pub struct KafkaSource {
    consumer: Arc<StreamConsumer<SourceContext>>,
    offsets: Arc<Mutex<OffsetTracker>>,
    topic: String,
    transactions: Option<Arc<Transactions>>,
    /// Records that arrived while paused, for the next batch.
    kept: Vec<(Incoming, Position)>,
    paused: bool,
}

impl KafkaSource {
    /// The acknowledgement of a batch of records at `positions`.
    fn ack(&self, positions: Vec<Position>) -> Box<dyn Ack> {
        Box::new(KafkaAck {
            consumer: self.consumer.clone(),
            offsets: self.offsets.clone(),
            topic: self.topic.clone(),
            positions,
            transaction: self.transactions.as_ref().map(|transactions| {
                BatchTransaction::new(
                    transactions.clone(),
                    self.consumer.clone(),
                    self.offsets.clone(),
                    self.topic.clone(),
                )
            }),
        })
    }

    /// Joins `kafka.group` and subscribes to `topic`; reports consumer lag to `metrics`. With
    /// `transactions` (exactly-once mode) offsets are committed in each batch's transaction.
    pub fn subscribe(
        kafka: &KafkaConfig,
        topic: &str,
        metrics: Arc<Metrics>,
        transactions: Option<Arc<Transactions>>,
    ) -> Result<Self, SourceError> {
        let group = kafka.group.as_deref().unwrap_or("weir");
        let auto_commit = if transactions.is_some() {
            "false"
        } else {
            "true"
        };
        let mut defaults = vec![
            ("enable.auto.commit", auto_commit),
            ("group.id", group),
            ("auto.offset.reset", "earliest"),
            // Offsets are stored by us once fates are durable, and committed from the store.
            ("enable.auto.offset.store", "false"),
            ("auto.commit.interval.ms", "1000"),
            ("statistics.interval.ms", "5000"),
            // Once its prefetch queue is full, librdkafka stops fetching a partition for
            // this long (default 1 s): a consumer slower than the broker then ran dry
            // for part of every second (BENCHMARKS.md, cluster mode).
            ("fetch.queue.backoff.ms", "20"),
        ];
        // Under KIP-848's `consumer` group protocol the broker assigns partitions
        // (incrementally), and a client that sets an assignment strategy is refused.
        let consumer_protocol = kafka
            .options
            .get("group.protocol")
            .is_some_and(|p| p.eq_ignore_ascii_case("consumer"));
        if !consumer_protocol {
            defaults.push(("partition.assignment.strategy", "cooperative-sticky"));
        }
        let config = crate::kafka::client_config(kafka, &defaults);
        let offsets = Arc::new(Mutex::new(OffsetTracker::default()));
        let context = SourceContext {
            topic: topic.to_owned(),
            earliest: kafka
                .options
                .get("auto.offset.reset")
                .is_none_or(|v| matches!(v.as_str(), "earliest" | "smallest" | "beginning")),
            offsets: offsets.clone(),
            metrics,
            transactions: transactions.clone(),
        };
        let consumer: StreamConsumer<SourceContext> = config
            .create_with_context(context)
            .map_err(|e| SourceError::other("kafka consumer", crate::kafka::creation_error(e)))?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| SourceError::other(&format!("cannot subscribe to topic `{topic}`"), e))?;
        Ok(Self {
            consumer: Arc::new(consumer),
            offsets,
            topic: topic.to_owned(),
            transactions,
            kept: Vec::new(),
            paused: false,
        })
    }

    fn offsets(&self) -> MutexGuard<'_, OffsetTracker> {
        self.offsets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A view of the partitions assigned to this consumer, for heartbeats.
    pub fn partitions(&self) -> impl Fn() -> Vec<i32> + Send + Sync + 'static {
        let offsets = self.offsets.clone();
        move || {
            offsets
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .partitions()
        }
    }

    /// The next message, waiting as long as it takes; errors are logged, not fatal
    /// (librdkafka reconnects by itself).
    async fn next_message(&self) -> BorrowedMessage<'_> {
        loop {
            match self.consumer.recv().await {
                Ok(message) => return message,
                Err(e) => {
                    tracing::warn!(topic = %self.topic, "consume: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Takes a message in and records its position; `None` when it is dropped (a repeat, or
    /// a jump past records the consumer skipped, which are then read again).
    fn take(&self, message: &BorrowedMessage<'_>) -> Option<(Incoming, Position)> {
        let (partition, offset) = (message.partition(), message.offset());
        let admission = self.offsets().admit(partition, offset);
        let epoch = match admission {
            Admission::Take(epoch) => epoch,
            Admission::Seen => {
                tracing::debug!(topic = %self.topic, partition, offset, "dropped: read before");
                return None;
            }
            Admission::ReadAgainFrom(expected) => {
                tracing::warn!(topic = %self.topic, partition, expected, offset, "records skipped by the consumer: reading again from the expected offset");
                if let Err(e) = self.consumer.seek(
                    &self.topic,
                    partition,
                    Offset::Offset(expected),
                    Duration::from_secs(10),
                ) {
                    tracing::warn!(topic = %self.topic, partition, "seek back failed ({e}); the commit point stays before the gap");
                }
                return None;
            }
        };
        let headers = headers_of(message);
        let record = Record {
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().unwrap_or_default().to_vec(),
            headers,
            timestamp_ms: message.timestamp().to_millis(),
            source: SourceMeta {
                // The one topic subscribed to (cheaper than reading the message's C string).
                stream: self.topic.clone(),
                partition,
                offset,
                attempt: 1,
            },
        };
        Some((Incoming::new(record), (partition, offset, epoch)))
    }
}

/// Acknowledges one batch: its finished records move their partitions' commit points, which
/// are stored for the next auto-commit.
struct KafkaAck {
    consumer: Arc<StreamConsumer<SourceContext>>,
    offsets: Arc<Mutex<OffsetTracker>>,
    topic: String,
    positions: Vec<Position>,
    /// Exactly-once mode: the batch's transaction, which commits its offsets.
    transaction: Option<BatchTransaction>,
}

impl Ack for KafkaAck {
    fn begin(&mut self) -> AckStep<'_, Lane> {
        Box::pin(async move {
            match &mut self.transaction {
                Some(transaction) => transaction.begin().await,
                None => Ok(Lane::default()),
            }
        })
    }

    fn commit(&mut self) -> AckStep<'_, bool> {
        Box::pin(async move {
            match &mut self.transaction {
                Some(transaction) => transaction.commit(&self.positions, None).await,
                None => Ok(true),
            }
        })
    }

    fn abort<'a>(&'a mut self, why: &'a crate::sink::SinkError) -> AckStep<'a, bool> {
        Box::pin(async move {
            match &mut self.transaction {
                Some(transaction) => {
                    let failed = format!("sending the batch's records failed ({why})");
                    let committed = transaction.commit(&self.positions, Some(failed)).await?;
                    Ok(!committed)
                }
                None => Ok(false),
            }
        })
    }

    fn partitions(&self) -> Vec<(i32, u64)> {
        let mut partitions: Vec<(i32, u64)> = (self.positions.iter())
            .map(|&(partition, _, epoch)| (partition, epoch))
            .collect();
        partitions.sort_unstable();
        partitions.dedup();
        partitions
    }

    fn ack(self: Box<Self>, unfinished: &[usize]) {
        // Stored under the lock, so acknowledgements from several tasks store in order.
        let mut offsets = self.offsets.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, &(partition, offset, epoch)) in self.positions.iter().enumerate() {
            if !unfinished.contains(&i) {
                offsets.finish(partition, offset, epoch);
            }
        }
        if self.transaction.is_some() {
            // The offsets went into the committed transaction; finishing the records above
            // only keeps the tracker from holding every offset ever read.
            return;
        }
        let points = offsets.take_commit_points();
        if points.is_empty() {
            return;
        }
        if let Err(e) = self
            .consumer
            .store_offsets(&offset_list(&self.topic, points))
        {
            // A partition revoked since: its next owner starts from the last commit.
            tracing::debug!(topic = %self.topic, "store offsets: {e}");
        }
    }
}

impl KafkaSource {
    /// Pauses the assigned partitions (again: a rebalance may have added some).
    fn pause(&mut self) {
        let assigned = match self.consumer.assignment() {
            Ok(assigned) => assigned,
            Err(e) => {
                tracing::warn!(topic = %self.topic, "pause: no assignment ({e})");
                return;
            }
        };
        if let Err(e) = self.consumer.pause(&assigned) {
            tracing::warn!(topic = %self.topic, "pause: {e}");
        }
        if !self.paused {
            tracing::warn!(topic = %self.topic, "the pipeline takes no records (a dependency is away): consumption paused, the consumer stays in its group");
            self.paused = true;
        }
    }

    fn resume(&mut self) {
        if !std::mem::take(&mut self.paused) {
            return;
        }
        match self.consumer.assignment() {
            Ok(assigned) => {
                if let Err(e) = self.consumer.resume(&assigned) {
                    tracing::warn!(topic = %self.topic, "resume: {e}");
                }
            }
            Err(e) => tracing::warn!(topic = %self.topic, "resume: no assignment ({e})"),
        }
        tracing::info!(topic = %self.topic, kept = self.kept.len(), "consumption resumed");
    }
}

#[async_trait]
impl Source for KafkaSource {
    async fn keep_alive(&mut self) -> std::convert::Infallible {
        tokio::time::sleep(PAUSE_AFTER).await;
        self.pause();
        let consumer = self.consumer.clone();
        loop {
            // Each call polls, which tells the group the consumer is alive.
            match tokio::time::timeout(PAUSED_POLL, consumer.recv()).await {
                Err(_) => {}
                Ok(Ok(message)) => {
                    // Fetched before the pause, or of a partition assigned since.
                    let kept = self.take(&message);
                    drop(message);
                    self.kept.extend(kept);
                    self.pause();
                }
                Ok(Err(e)) => {
                    tracing::warn!(topic = %self.topic, "consume while paused: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, SourceError> {
        self.resume();
        loop {
            let mut taken = std::mem::take(&mut self.kept);
            if taken.len() > max {
                self.kept = taken.split_off(max);
            }
            if taken.is_empty() {
                let first = self.next_message().await;
                taken.extend(self.take(&first));
                drop(first);
            }
            let linger = tokio::time::sleep(BATCH_LINGER);
            tokio::pin!(linger);
            while taken.len() < max {
                let message = tokio::select! {
                    biased;
                    message = self.consumer.recv() => message,
                    () = &mut linger => break,
                };
                let Ok(message) = message else { break };
                taken.extend(self.take(&message));
            }
            // A rebalance while the batch filled: drop what is no longer ours.
            {
                let offsets = self.offsets();
                let before = taken.len();
                taken.retain(|(_, (p, _, epoch))| offsets.is_current(*p, *epoch));
                if taken.len() < before {
                    tracing::info!(topic = %self.topic, dropped = before - taken.len(), "records of revoked partitions left to their next owner");
                }
            }
            if !taken.is_empty() {
                let (records, positions) = taken.into_iter().unzip();
                let ack = self.ack(positions);
                return Ok(Some(Batch { records, ack }));
            }
        }
    }

    async fn close(&mut self) -> Result<(), SourceError> {
        if self.transactions.is_some() {
            return Ok(()); // committed with each batch
        }
        let points = self.offsets().commit_points();
        if points.is_empty() {
            return Ok(());
        }
        self.consumer
            .commit(&offset_list(&self.topic, points), CommitMode::Sync)
            .map_err(|e| SourceError::other("final offset commit", e))
    }
}
