//! Everything Kafka, in one module:
//!
//! - `connect.rs`: a pipeline's clients made from its [`KafkaPlan`] (topics, group,
//!   exactly-once slot, retry topic);
//! - `consumer.rs`: [`KafkaSource`], a topic consumed as one worker of a consumer group,
//!   committing offsets only over finished records (`offsets.rs` tracks them);
//! - `producer.rs`: [`KafkaProducer`], and the topic sinks of outputs ([`KafkaSink`]) and
//!   dead letters ([`KafkaDeadLetters`]);
//! - `transactions.rs`: exactly-once mode, each batch's outputs, dead letters and offsets
//!   in one transaction ([`Transactions`]);
//! - `dlq_topic.rs`: `weir dlq list|replay` of a dead-letter topic;
//! - `changelog.rs`: exactly-once mode's keyed state, in a compacted changelog topic written
//!   in the transactions and read back when a partition is assigned ([`changelog::ChangelogStore`]).
//!
//! This file holds what they share: the librdkafka properties (our defaults, then the
//! user's `kafka.options` as they are), the client context that routes librdkafka's logs
//! and errors into `tracing`, and the start-up reachability check.

pub mod changelog;
mod connect;
mod consumer;
pub mod dlq_topic;
mod offsets;
mod producer;
mod transactions;

pub use connect::{Clients, Connected, KafkaPlan};
pub use consumer::KafkaSource;
pub use producer::{DELIVERY_ATTEMPTS, KafkaDeadLetters, KafkaProducer, KafkaSink};
pub use transactions::Transactions;

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;

/// The librdkafka configuration: bootstrap, then `defaults`, then the user's options (which
/// win, so any default can be overridden).
pub fn client_config(kafka: &KafkaConfig, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    if let Some(bootstrap) = &kafka.bootstrap {
        config.set("bootstrap.servers", bootstrap);
    }
    for (key, value) in defaults {
        config.set(*key, *value);
    }
    for (key, value) in &kafka.options {
        config.set(key, value);
    }
    config
}

/// Routes librdkafka's logs and errors into `tracing`.
#[derive(Clone, Default)]
pub struct LogContext;

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        log_error(&error, reason);
    }
}

impl ConsumerContext for LogContext {}

/// A librdkafka log line as a `tracing` event.
pub fn log(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error
        | RDKafkaLogLevel::Warning => tracing::warn!(target: "kafka", "{facility}: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "kafka", "{facility}: {message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "kafka", "{facility}: {message}"),
    }
}

/// A message's headers as `(name, bytes)` pairs (a header without a value becomes empty).
pub fn headers_of(message: &impl Message) -> Vec<(String, Vec<u8>)> {
    message
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default()
}

/// A record as read back from a topic, owned.
#[derive(Debug, Clone)]
pub struct TopicRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Its timestamp, in ms since the epoch, when it has one.
    pub timestamp_ms: Option<i64>,
}

impl TopicRecord {
    pub fn of(message: &impl Message) -> Self {
        Self {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().unwrap_or_default().to_vec(),
            headers: headers_of(message),
            timestamp_ms: message.timestamp().to_millis(),
        }
    }

    /// The last header of that name, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    pub fn value_text(&self) -> String {
        String::from_utf8_lossy(&self.value).into_owned()
    }
}

/// How long a topic must stay quiet before [`read_topic`] counts it as read to its end.
const QUIET: Duration = Duration::from_secs(2);

/// Every record of `topic` a `read_committed` consumer sees, from the start until it stays
/// quiet for two seconds (`weir dlq`, `weir reconcile`).
pub async fn read_topic(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<Vec<TopicRecord>> {
    let kafka = kafka.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_topic_blocking(&kafka, &topic)).await?
}

fn read_topic_blocking(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<Vec<TopicRecord>> {
    let consumer: BaseConsumer<LogContext> = client_config(
        kafka,
        &[
            ("group.id", "weir-topic-reader"),
            ("enable.auto.commit", "false"),
            ("isolation.level", "read_committed"),
        ],
    )
    .create_with_context(LogContext)
    .map_err(|e| anyhow!("kafka client: {}", creation_error(e)))?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("topic `{topic}`"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        bail!("topic `{topic}` does not exist");
    }
    // Read from the start of every partition until the topic stays quiet for QUIET (the
    // high watermarks are not a reliable end on every Kafka-protocol broker: some lag).
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut letters = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < QUIET {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = message.with_context(|| format!("topic `{topic}`"))?;
        last = Instant::now();
        letters.push(TopicRecord::of(&m));
    }
    Ok(letters)
}

/// `(name, bytes)` pairs as headers to produce.
pub fn owned_headers<V: AsRef<[u8]>>(headers: &[(String, V)]) -> OwnedHeaders {
    headers.iter().fold(
        OwnedHeaders::new_with_capacity(headers.len()),
        |hs, (name, value)| {
            hs.insert(Header {
                key: name,
                value: Some(value.as_ref()),
            })
        },
    )
}

/// Offsets of `topic`'s partitions, to store or commit.
pub fn offset_list(
    topic: &str,
    points: impl IntoIterator<Item = (i32, i64)>,
) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (partition, offset) in points {
        // Fails only for an invalid offset value, which a commit point never is.
        let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(offset));
    }
    tpl
}

/// A client's creation error as it may be shown: librdkafka's own names the value of the
/// property it refuses, which may be a secret (or a misspelt secret's key), so the value is
/// left out.
pub fn creation_error(error: KafkaError) -> String {
    match error {
        KafkaError::ClientConfig(_, description, key, _) => {
            format!("Kafka option `{key}`: {description}")
        }
        other => other.to_string(),
    }
}

/// A librdkafka client error (librdkafka keeps retrying by itself; we say what is wrong).
pub fn log_error(error: &KafkaError, reason: &str) {
    tracing::warn!(target: "kafka", "{error}: {reason}");
}

/// The start-up check's client context: logs as [`LogContext`] does, and keeps the first
/// error that waiting cannot fix: the cluster refused our credentials, or TLS failed (a
/// certificate we do not trust, or TLS against a listener without it).
#[derive(Default)]
struct StartContext {
    refused: std::sync::Mutex<Option<String>>,
}

impl ClientContext for StartContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode::{Authentication, SSL, SaslAuthenticationFailed};
        match error.rdkafka_error_code() {
            Some(Authentication | SSL | SaslAuthenticationFailed) => {
                let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
                refused.get_or_insert_with(|| reason.to_owned());
            }
            _ => log_error(&error, reason),
        }
    }
}

impl ConsumerContext for StartContext {}

/// Waits until the cluster answers a metadata request and has every one of `topics`, saying
/// on each attempt what is wrong (broker unreachable, topic missing), with backoff up to
/// 10 s. Fails when the client cannot be made (bad options), and at once when the cluster
/// refuses our credentials or TLS fails: waiting would not mend those.
pub async fn wait_for_topics(kafka: &KafkaConfig, topics: &[String]) -> anyhow::Result<()> {
    let config = client_config(kafka, &[]);
    let consumer: BaseConsumer<StartContext> = config
        .create_with_context(StartContext::default())
        .map_err(|e| anyhow::anyhow!("kafka client: {}", creation_error(e)))?;
    let consumer = std::sync::Arc::new(consumer);
    let bootstrap = kafka.bootstrap.clone().unwrap_or_default();
    let mut delay = Duration::from_millis(500);
    loop {
        let c = consumer.clone();
        let wanted = topics.to_vec();
        let answer = tokio::task::spawn_blocking(move || {
            let metadata = c.fetch_metadata(None, Duration::from_secs(5));
            // Error events (a refused login, a failed TLS handshake) reach the context only
            // when the client is polled, and a poll returns at the first of them: poll until
            // a poll finds none (the client subscribes to nothing: no message comes).
            for _ in 0..32 {
                if c.poll(Duration::from_millis(50)).is_none() {
                    break;
                }
            }
            let m = metadata.map_err(|e| e.to_string())?;
            for t in &wanted {
                let Some(found) = m.topics().iter().find(|x| x.name() == t) else {
                    return Err(format!("topic `{t}` does not exist"));
                };
                if let Some(err) = found.error() {
                    let err = rdkafka::error::RDKafkaErrorCode::from(err);
                    return Err(format!("topic `{t}`: {err}"));
                }
                if found.partitions().is_empty() {
                    return Err(format!("topic `{t}` does not exist (no partitions)"));
                }
            }
            Ok(())
        })
        .await?;
        // A refusal ends the wait only when the cluster did not answer: a TLS handshake cut
        // short while a broker restarts is no reason to stop.
        let refused = consumer.context().refused.lock().map(|mut r| r.take());
        if let (Err(_), Ok(Some(reason))) = (&answer, refused) {
            anyhow::bail!("Kafka at {bootstrap} refused the connection: {reason}");
        }
        match answer {
            Ok(()) => return Ok(()),
            Err(reason) => {
                eprintln!(
                    "weir: waiting for Kafka at {bootstrap}: {reason}; retrying in {:.1} s",
                    delay.as_secs_f64()
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}
