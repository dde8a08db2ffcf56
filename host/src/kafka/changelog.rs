//! Keyed state in a changelog topic, Kafka Streams' way (the store of exactly-once mode,
//! docs/state.md): a compacted topic with the input topic's partitions, where state
//! partition P's writes go to partition P — key: the state key; value: the stored value
//! with its expiry (`state::keyed`'s form); a delete is a tombstone. Written in the batches'
//! transactions, read back (restored) with `read_committed` from the start of a partition
//! to its end, which for such a consumer is the last stable offset: only what committed
//! transactions wrote.
//!
//! This file: the topic's name, its creation, and reading a partition back.

use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::{LogContext, client_config, creation_error};
use crate::config::KafkaConfig;
use crate::state::keyed::KeyedEntry;

/// How long reading a partition back may go without a message or its end.
const RESTORE_STALL: Duration = Duration::from_secs(30);

/// The changelog topic of `plugin`'s keyed state in `pipeline`.
pub fn changelog_topic(pipeline: &str, plugin: &str) -> String {
    format!("weir-{pipeline}-{plugin}-changelog")
}

/// Creates `topic` compacted, with `partitions` partitions, unless it exists; refuses one
/// that exists with another number of partitions (state partition P lives in partition P).
pub async fn ensure_changelog(
    kafka: &KafkaConfig,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<()> {
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
/// order, one partition after another. Blocking.
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
                .filter_map(|(key, stored)| KeyedEntry::live(partition, key, &stored, now)),
        );
    }
    Ok(entries)
}
