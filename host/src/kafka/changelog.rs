//! Keyed state in a changelog topic, Kafka Streams' way (the store of exactly-once mode,
//! docs/state.md): a compacted topic with the input topic's partitions, where state
//! partition P's writes go to partition P — key: the state key; value: the stored value
//! with its expiry (`state::keyed`'s form); a delete is a tombstone. Written in the batches'
//! transactions, read back (restored) with `read_committed` from the start of a partition
//! to its end, which for such a consumer is the last stable offset: only what committed
//! transactions wrote.
//!
//! This file: the topic's name, its creation, reading a partition back, and the state
//! store of exactly-once mode over it ([`ChangelogStore`]).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::{LogContext, client_config, creation_error};
use crate::config::KafkaConfig;
use crate::state::held::{HeldPartitions, Need, Values};
use crate::state::keyed::{
    DoneMarks, KeyedEntry, KeyedRead, KeyedWrite, decode_value, is_host_key,
};
use crate::state::{Claim, Commit, Ownership, Restored, StateError, StateStore, Turn};

/// How long reading a partition back may go without a message or its end.
const RESTORE_STALL: Duration = Duration::from_secs(30);

/// The changelog topic of `plugin`'s keyed state in `pipeline`.
pub fn changelog_topic(pipeline: &str, plugin: &str) -> String {
    format!("weir-{pipeline}-{plugin}-changelog")
}

/// Creates `topic` compacted, with as many partitions as the `input` topic, unless it
/// exists; refuses one that exists with another number of partitions (state partition P
/// lives in partition P).
pub async fn ensure_changelog(kafka: &KafkaConfig, topic: &str, input: &str) -> anyhow::Result<()> {
    let partitions = tokio::task::spawn_blocking({
        let (config, input) = (client_config(kafka, &[]), input.to_owned());
        move || partitions_of(&config, &input)
    })
    .await??;
    if partitions == 0 {
        bail!("topic `{input}` does not exist");
    }
    let admin: AdminClient<DefaultClientContext> = (client_config(kafka, &[]).create())
        .map_err(|e| anyhow::anyhow!("kafka admin client: {}", creation_error(e)))?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1))
        .set("cleanup.policy", "compact");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let created = admin
        .create_topics([&new], &options)
        .await
        .with_context(|| format!("cannot create the changelog topic `{topic}`"))?;
    for result in created {
        match result {
            Ok(_) => tracing::info!(%topic, partitions, "created the changelog topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => bail!("cannot create the changelog topic `{topic}`: {code}"),
        }
    }
    let found = tokio::task::spawn_blocking({
        let (config, topic) = (client_config(kafka, &[]), topic.to_owned());
        move || partitions_of(&config, &topic)
    })
    .await??;
    if found != partitions {
        bail!(
            "the changelog topic `{topic}` has {found} partitions, the input topic {partitions}: \
             state partition P lives in changelog partition P, so they must match"
        );
    }
    Ok(())
}

/// How many partitions `topic` has (0: it does not exist).
fn partitions_of(config: &rdkafka::ClientConfig, topic: &str) -> anyhow::Result<i32> {
    let consumer: BaseConsumer<LogContext> = config
        .create_with_context(LogContext)
        .map_err(|e| anyhow::anyhow!("kafka client: {}", creation_error(e)))?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok((metadata.topics().iter())
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len() as i32))
}

/// Reads partition `partition` of the changelog `topic` back, from its start to the end a
/// `read_committed` consumer sees, handing each record to `apply` (key, and the stored
/// value or `None` for a tombstone) in order; returns how many records it read. Blocking.
pub fn read_changelog(
    kafka: &KafkaConfig,
    topic: &str,
    partition: i32,
    mut apply: impl FnMut(Vec<u8>, Option<Vec<u8>>),
) -> anyhow::Result<u64> {
    let consumer: BaseConsumer<LogContext> = client_config(
        kafka,
        &[
            ("group.id", "weir-restore"),
            ("enable.auto.commit", "false"),
            ("isolation.level", "read_committed"),
            ("enable.partition.eof", "true"),
        ],
    )
    .create_with_context(LogContext)
    .map_err(|e| anyhow::anyhow!("kafka client: {}", creation_error(e)))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let mut read = 0;
    let mut last = std::time::Instant::now();
    loop {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            if last.elapsed() > RESTORE_STALL {
                bail!(
                    "reading changelog `{topic}` partition {partition} back stalled for {} s after {read} records",
                    RESTORE_STALL.as_secs()
                );
            }
            continue;
        };
        match message {
            Ok(m) => {
                last = std::time::Instant::now();
                read += 1;
                let key = m.key().unwrap_or_default().to_vec();
                apply(key, m.payload().map(<[u8]>::to_vec));
            }
            Err(KafkaError::PartitionEOF(_)) => return Ok(read),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("changelog `{topic}` partition {partition}"));
            }
        }
    }
}

/// The live entries of every partition of the changelog `topic` (`weir state`), in key
/// order, one partition after another; not the host's done marks. Blocking.
pub fn read_changelog_state(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<Vec<KeyedEntry>> {
    let partitions = partitions_of(&client_config(kafka, &[]), topic)?;
    if partitions == 0 {
        bail!("the changelog topic `{topic}` does not exist");
    }
    let now = crate::clock::now_ms() as u64;
    let mut entries = Vec::new();
    for partition in 0..partitions {
        let mut state = std::collections::BTreeMap::new();
        read_changelog(kafka, topic, partition, |key, stored| match stored {
            Some(stored) => {
                state.insert(key, stored);
            }
            None => {
                state.remove(&key);
            }
        })?;
        entries.extend(
            (state.into_iter())
                .filter(|(key, _)| !is_host_key(key))
                .filter_map(|(key, stored)| KeyedEntry::live(partition, key, &stored, now)),
        );
    }
    Ok(entries)
}

/// Where exactly-once mode keeps a stateful plugin's keyed state: a changelog topic, read
/// with these client settings.
#[derive(Debug, Clone)]
pub struct Changelog {
    pub kafka: KafkaConfig,
    pub topic: String,
}

/// Exactly-once mode's state store: the done marks and leases of `inner`, and the keyed
/// state of the partitions this worker holds, in memory: restored from the changelog when
/// a partition is assigned anew, or read again after an aborted transaction (the source
/// gives it a new assignment number then, and the pending writes of the aborted batches are
/// forgotten), and brought up to date by each committed batch's writes, which the sink sent
/// to the changelog in the batch's transaction. A stateful batch's done marks go to the
/// changelog with its writes ([`DoneMarks`]), so a repeated id is judged with the state.
/// Made anew with each set of Kafka clients.
pub struct ChangelogStore {
    inner: Arc<dyn StateStore>,
    changelog: Changelog,
    held: Arc<HeldPartitions>,
    done: DoneMarks,
}

impl ChangelogStore {
    /// Over `inner`'s leases and done marks, whose marks are kept for `done_ttl`.
    pub fn new(
        inner: Arc<dyn StateStore>,
        changelog: Changelog,
        done_ttl: Option<Duration>,
    ) -> Self {
        Self {
            inner,
            changelog,
            held: Arc::default(),
            done: DoneMarks { ttl: done_ttl },
        }
    }

    /// Reads `partition`'s state back from the changelog.
    async fn restore(&self, partition: i32) -> Result<Values, StateError> {
        let Changelog { kafka, topic } = self.changelog.clone();
        let restored = tokio::task::spawn_blocking(move || {
            let mut values = Values::default();
            read_changelog(&kafka, &topic, partition, |key, stored| match stored {
                Some(stored) => {
                    values.insert(key, stored);
                }
                None => {
                    values.remove(&key);
                }
            })
            .map(|_| values)
        })
        .await
        .map_err(|e| StateError::caused_by("restoring keyed state", e))?;
        let mut values = restored.map_err(|e| {
            StateError::new(format!(
                "cannot restore partition {partition}'s keyed state from `{}`: {e:#}",
                self.changelog.topic
            ))
        })?;
        let now = crate::clock::now_ms() as u64;
        values.retain(|_, stored| decode_value(stored, now).is_some());
        Ok(values)
    }
}

#[async_trait]
impl StateStore for ChangelogStore {
    async fn claim(&self, ids: &[String]) -> Result<Vec<Claim>, StateError> {
        self.inner.claim(ids).await
    }

    async fn finish(&self, done: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        self.inner.finish(done).await
    }

    async fn renew(&self, leases: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        self.inner.renew(leases).await
    }

    async fn release(&self, leases: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        self.inner.release(leases).await
    }

    /// The batch committed, its writes in the changelog: they join the state held here, in
    /// the batches' order; then its records are marked done.
    async fn finish_with(
        &self,
        done: &[(String, u64)],
        with: Commit,
        mut turn: Turn,
    ) -> Result<Vec<bool>, StateError> {
        if with.epochs.is_empty() {
            // A batch of a plugin that keeps no state: nothing to order.
            drop(turn);
            return self.inner.finish(done).await;
        }
        turn.wait().await;
        for &(partition, epoch) in &with.epochs {
            let writes: Vec<&KeyedWrite> = (with.writes.iter())
                .filter(|w| w.partition == partition)
                .collect();
            self.held.apply(partition, epoch, &writes);
        }
        drop(turn);
        self.inner.finish(done).await
    }

    fn keyed(&self) -> Option<Arc<dyn KeyedRead>> {
        Some(self.held.clone())
    }

    fn done_marks_in_keyed_state(&self) -> Option<DoneMarks> {
        Some(self.done)
    }

    async fn own_keyed(&self, partitions: &[(i32, u64)]) -> Result<Ownership, StateError> {
        let mut ownership = Ownership::default();
        for &(partition, assignment) in partitions {
            if let Need::Runs(epoch) = self.held.need(partition, assignment) {
                ownership.epochs.push((partition, epoch));
                continue;
            }
            let started = std::time::Instant::now();
            let values = self.restore(partition).await?;
            let keys = values.len();
            // The assignment is the epoch: a new one for each assignment and reading again.
            self.held.install(partition, assignment, assignment, values);
            ownership.epochs.push((partition, assignment));
            ownership.restored.push(Restored {
                partition,
                epoch: assignment,
                keys,
                took: started.elapsed(),
            });
        }
        Ok(ownership)
    }
}
