//! Kafka topics as sinks: outputs to the default topic or a plugin-named destination topic,
//! dead letters to the DLQ topic with the original key, value and headers plus the
//! `weir.error.*` headers. One idempotent producer serves both (two
//! transactional ones in exactly-once mode).
//!
//! `send` only enqueues; `seal` hands over the deliveries so far as one future (`flush` awaits
//! it). A failed delivery (librdkafka has already retried it within `message.timeout.ms`) is
//! sent again, from the copy librdkafka hands back:
//!
//! - while the broker is away or busy (timeouts, transport errors, no leader, too few
//!   replicas) the circuit is open: `weir_circuit_open{dependency="sink"}` (or `"dlq"`) is 1,
//!   the message is sent again with a growing backoff (up to 5 s) for as long as it takes,
//!   and the worker takes no new records once its batches in flight are full;
//! - any other failure is sent again up to [`DELIVERY_ATTEMPTS`] times in all; after that
//!   `flush` fails and the worker stops consuming rather than drop the record.
//!
//! A transactional producer (exactly-once mode) sends nothing again: a failed delivery
//! fails its transaction, which the batch aborts, and its records are read again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::state::keyed::{KeyedWrite, encode_value};
use async_trait::async_trait;
use prometheus::IntGauge;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use super::{LogContext, owned_headers};
use crate::config::KafkaConfig;
use crate::record::DeadLetter;
use crate::record::Output;
use crate::sink::{DeadLetterSink, Durable, Lane, OutputCheck, Sink, SinkError, check_destination};

/// Sends of one message, in all, before the worker gives up and stops (for failures that
/// are not the broker being away).
pub const DELIVERY_ATTEMPTS: u32 = 3;
/// The longest wait between two sends while the circuit is open.
const MAX_PROBE_DELAY: Duration = Duration::from_secs(5);

/// Whether a delivery failure says the broker is away or busy, not that the record cannot
/// be written: those are sent again for as long as it takes.
fn broker_away(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        e.rdkafka_error_code(),
        Some(
            MessageTimedOut
                | BrokerTransportFailure
                | AllBrokersDown
                | RequestTimedOut
                | NetworkException
                | NotEnoughReplicas
                | NotEnoughReplicasAfterAppend
                | LeaderNotAvailable
                | NotLeaderForPartition
                | QueueFull
        )
    )
}

fn sink_error(what: String, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> SinkError {
    SinkError {
        what,
        source: std::io::Error::other(e),
    }
}

/// The producer both sinks share. In exactly-once mode it is two transactional producers
/// that take turns (`transactions.rs`): a batch's sends go to the one whose transaction it
/// joined, the [`Lane`] its acknowledgement's `begin` returned.
#[derive(Clone)]
pub struct KafkaProducer {
    producers: Arc<[FutureProducer<LogContext>]>,
    transactional: bool,
}

impl KafkaProducer {
    pub fn new(kafka: &KafkaConfig) -> Result<Self, SinkError> {
        let config = crate::kafka::client_config(kafka, &[("enable.idempotence", "true")]);
        let producer = config
            .create_with_context(LogContext)
            .map_err(|e| sink_error("kafka producer".into(), crate::kafka::creation_error(e)))?;
        Ok(Self {
            producers: Arc::new([producer]),
            transactional: false,
        })
    }

    /// Two transactional producers (exactly-once mode) for the worker slot `id`, with the
    /// transactional ids `<id>` and `<id>/2`, ready for their first transactions:
    /// registering an id fences any producer that had it before and aborts that producer's
    /// open transaction. Blocks up to a minute for each.
    pub fn transactional(kafka: &KafkaConfig, id: &str) -> Result<Self, SinkError> {
        let producers = [id.to_owned(), format!("{id}/2")]
            .iter()
            .map(|id| {
                let config = crate::kafka::client_config(
                    kafka,
                    &[
                        ("transactional.id", id),
                        // A dead worker's open transaction holds back read_committed
                        // consumers of its outputs until this runs out, unless its slot
                        // starts again first.
                        ("transaction.timeout.ms", "10000"),
                    ],
                );
                let producer: FutureProducer<LogContext> =
                    config.create_with_context(LogContext).map_err(|e| {
                        let e = crate::kafka::creation_error(e);
                        sink_error("kafka transactional producer".into(), e)
                    })?;
                rdkafka::producer::Producer::init_transactions(&producer, Duration::from_secs(60))
                    .map_err(|e| sink_error(format!("init_transactions for `{id}`"), e))?;
                Ok(producer)
            })
            .collect::<Result<Arc<[_]>, SinkError>>()?;
        Ok(Self {
            producers,
            transactional: true,
        })
    }

    /// The producers themselves, for the source's transactions.
    pub fn producers(&self) -> &[FutureProducer<LogContext>] {
        &self.producers
    }

    /// The producer of `lane`.
    fn of(&self, lane: Lane) -> &FutureProducer<LogContext> {
        &self.producers[lane.0]
    }

    /// The error that ended a producer, if one did (a transactional producer that was
    /// fenced, or failed fatally): it cannot be used again.
    pub fn fatal_error(&self) -> Option<(RDKafkaErrorCode, String)> {
        self.producers
            .iter()
            .find_map(|p| rdkafka::producer::Producer::client(p).fatal_error())
    }
}

/// Deliveries not confirmed yet, each with the number of times its message has been sent.
/// The messages themselves are not kept: librdkafka hands a failed one back for sending again.
type Pending = Vec<(DeliveryFuture, u32)>;

/// Messages sent and not yet confirmed.
struct Deliveries {
    producer: KafkaProducer,
    pending: Pending,
    /// 1 while deliveries fail because the broker is away.
    circuit: Option<IntGauge>,
    /// Whether a failed delivery is sent again (not in a transaction).
    resend: bool,
}

impl Deliveries {
    fn new(producer: &KafkaProducer, circuit: Option<IntGauge>) -> Self {
        Self {
            producer: producer.clone(),
            pending: Vec::new(),
            circuit,
            resend: !producer.transactional,
        }
    }

    /// Enqueues a message to the producer of `lane`; waits while librdkafka's queue is full.
    async fn send(
        &mut self,
        lane: Lane,
        record: FutureRecord<'_, [u8], [u8]>,
    ) -> Result<(), SinkError> {
        let delivery = enqueue(self.producer.of(lane), record).await?;
        self.pending.push((delivery, 1));
        Ok(())
    }

    /// The deliveries so far, confirmed (or failed for good) when the future completes.
    fn seal(&mut self) -> Durable {
        let pending = std::mem::take(&mut self.pending);
        if !self.resend {
            return Box::pin(confirm_once(pending));
        }
        // Not in a transaction: one producer sends again what failed.
        let producer = self.producer.of(Lane::default()).clone();
        Box::pin(confirm(producer, pending, self.circuit.clone()))
    }
}

fn record<'a>(
    topic: &'a str,
    key: Option<&'a [u8]>,
    value: &'a [u8],
    headers: OwnedHeaders,
) -> FutureRecord<'a, [u8], [u8]> {
    let record = FutureRecord::to(topic).payload(value).headers(headers);
    match key {
        Some(key) => record.key(key),
        None => record,
    }
}

/// Enqueues `record`; waits while librdkafka's queue is full.
async fn enqueue(
    producer: &FutureProducer<LogContext>,
    mut record: FutureRecord<'_, [u8], [u8]>,
) -> Result<DeliveryFuture, SinkError> {
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, back)) => {
                return Err(sink_error(
                    format!("cannot produce to topic `{}`", back.topic),
                    e,
                ));
            }
        }
    }
}

/// Waits for every delivery; the first failure fails them all (a transaction's).
async fn confirm_once(pending: Pending) -> Result<(), SinkError> {
    for (delivery, _) in pending {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((error, message))) => {
                return Err(sink_error(
                    format!("delivery to topic `{}` failed", message.topic()),
                    error,
                ));
            }
            Err(_) => {
                return Err(sink_error(
                    "the producer dropped a message without reporting its delivery".into(),
                    KafkaError::Canceled,
                ));
            }
        }
    }
    Ok(())
}

/// Waits for every delivery; re-sends failed ones: while the broker is away for as long as
/// it takes, with backoff; otherwise up to [`DELIVERY_ATTEMPTS`] in all.
async fn confirm(
    producer: FutureProducer<LogContext>,
    mut pending: Pending,
    circuit: Option<IntGauge>,
) -> Result<(), SinkError> {
    let mut probe_delay = Duration::from_millis(100);
    while !pending.is_empty() {
        let mut failed = Vec::new();
        let mut away = false;
        for (delivery, attempt) in std::mem::take(&mut pending) {
            let (error, message) = match delivery.await {
                Ok(Ok(_)) => continue,
                Ok(Err(failure)) => failure,
                Err(_) => {
                    return Err(sink_error(
                        "the producer dropped a message without reporting its delivery; stopping rather than risk the record".into(),
                        KafkaError::Canceled,
                    ));
                }
            };
            if broker_away(&error) {
                if !away {
                    tracing::warn!(topic = %message.topic(), "the broker does not take deliveries ({error}); sending again in {} ms, for as long as it takes", probe_delay.as_millis());
                }
                away = true;
                failed.push((message, attempt));
                continue;
            }
            if attempt >= DELIVERY_ATTEMPTS {
                return Err(sink_error(
                    format!(
                        "delivery to topic `{}` failed {attempt} times; stopping rather than drop the record",
                        message.topic()
                    ),
                    error,
                ));
            }
            tracing::warn!(topic = %message.topic(), attempt, "delivery failed, sending again: {error}");
            failed.push((message, attempt + 1));
        }
        if let Some(gauge) = &circuit {
            gauge.set(i64::from(away));
        }
        if away {
            tokio::time::sleep(probe_delay).await;
            probe_delay = (probe_delay * 2).min(MAX_PROBE_DELAY);
        }
        for (message, attempt) in failed {
            let headers = message
                .headers()
                .cloned()
                .unwrap_or_else(|| OwnedHeaders::new_with_capacity(0));
            let again = record(
                message.topic(),
                message.key(),
                message.payload().unwrap_or_default(),
                headers,
            );
            let delivery = enqueue(&producer, again).await?;
            pending.push((delivery, attempt));
        }
    }
    Ok(())
}

/// Outputs to the default topic or a named destination topic.
pub struct KafkaSink {
    deliveries: Deliveries,
    topic: String,
    destinations: BTreeMap<String, String>,
    max_value_bytes: usize,
    /// Exactly-once mode: the changelog topic keyed-state writes go to.
    changelog: Option<String>,
}

impl KafkaSink {
    /// `circuit` is set to 1 while the broker does not take deliveries.
    pub fn new(
        producer: &KafkaProducer,
        topic: &str,
        destinations: BTreeMap<String, String>,
        max_value_bytes: usize,
        circuit: Option<IntGauge>,
    ) -> Self {
        Self {
            deliveries: Deliveries::new(producer, circuit),
            topic: topic.to_owned(),
            destinations,
            max_value_bytes,
            changelog: None,
        }
    }

    /// Sends keyed-state writes to `changelog` (`kafka/changelog.rs`), when there is one.
    pub fn with_changelog(mut self, changelog: Option<String>) -> Self {
        self.changelog = changelog;
        self
    }
}

/// What a [`KafkaSink`] can take.
struct KafkaCheck {
    destinations: BTreeSet<String>,
    max_value_bytes: usize,
}

impl OutputCheck for KafkaCheck {
    fn check(&self, output: &Output) -> Result<(), String> {
        check_destination(output, &self.destinations)?;
        if output.value.len() > self.max_value_bytes {
            return Err(format!(
                "output value is {} bytes, more than the {} the Kafka sink accepts",
                output.value.len(),
                self.max_value_bytes
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Sink for KafkaSink {
    fn checker(&self) -> Arc<dyn OutputCheck> {
        Arc::new(KafkaCheck {
            destinations: self.destinations.keys().cloned().collect(),
            max_value_bytes: self.max_value_bytes,
        })
    }

    async fn send(&mut self, outputs: Vec<Output>, lane: Lane) -> Result<(), SinkError> {
        for output in outputs {
            let topic = match &output.destination {
                Some(dest) => self.destinations.get(dest).unwrap_or(&self.topic),
                None => &self.topic,
            };
            let headers = owned_headers(&output.headers);
            let record = record(topic, output.key.as_deref(), &output.value, headers);
            self.deliveries.send(lane, record).await?;
        }
        Ok(())
    }

    /// Each write to the changelog partition of its input partition: the key, and the
    /// stored value (with its expiry), or none to delete it.
    async fn send_keyed(&mut self, writes: &[KeyedWrite], lane: Lane) -> Result<(), SinkError> {
        let Some(topic) = &self.changelog else {
            return Ok(());
        };
        for write in writes {
            let stored = (write.value.as_ref()).map(|v| encode_value(v, write.expires_ms));
            let record = FutureRecord::to(topic)
                .partition(write.partition)
                .key(&write.key[..]);
            let record = match &stored {
                Some(stored) => record.payload(&stored[..]),
                None => record,
            };
            self.deliveries.send(lane, record).await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        self.deliveries.seal().await
    }

    async fn seal(&mut self) -> Result<Durable, SinkError> {
        Ok(self.deliveries.seal())
    }
}

/// Dead letters to the DLQ topic.
pub struct KafkaDeadLetters {
    deliveries: Deliveries,
    topic: String,
}

impl KafkaDeadLetters {
    /// As [`KafkaSink::new`].
    pub fn new(producer: &KafkaProducer, topic: &str, circuit: Option<IntGauge>) -> Self {
        Self {
            deliveries: Deliveries::new(producer, circuit),
            topic: topic.to_owned(),
        }
    }
}

#[async_trait]
impl DeadLetterSink for KafkaDeadLetters {
    async fn send(&mut self, letters: Vec<DeadLetter>, lane: Lane) -> Result<(), SinkError> {
        for letter in letters {
            let headers = owned_headers(&letter.headers());
            let dead = &letter.record;
            let message = record(&self.topic, dead.key.as_deref(), &dead.value, headers);
            self.deliveries.send(lane, message).await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        self.deliveries.seal().await
    }

    async fn seal(&mut self) -> Result<Durable, SinkError> {
        Ok(self.deliveries.seal())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing listens at the bootstrap address, so every delivery times out: the broker is
    /// away, so the sink keeps sending (the flush does not end) and its circuit is open.
    #[tokio::test]
    async fn while_no_broker_answers_the_sink_keeps_probing_with_its_circuit_open() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let kafka = KafkaConfig {
            bootstrap: Some(format!("127.0.0.1:{port}")),
            options: [("message.timeout.ms".to_owned(), "200".to_owned())].into(),
            ..KafkaConfig::default()
        };
        let producer = KafkaProducer::new(&kafka).expect("producer");
        let circuit = IntGauge::new("circuit", "test").expect("gauge");
        let mut sink = KafkaSink::new(
            &producer,
            "out",
            BTreeMap::new(),
            1 << 20,
            Some(circuit.clone()),
        );
        let output = Output {
            destination: None,
            key: Some(b"k".to_vec()),
            value: b"v".to_vec(),
            headers: vec![("h".into(), b"1".to_vec())],
        };
        sink.send(vec![output], Lane::default())
            .await
            .expect("enqueued");
        let flushing = tokio::time::timeout(Duration::from_secs(2), sink.flush()).await;
        assert!(flushing.is_err(), "no broker: still probing, not failed");
        assert_eq!(circuit.get(), 1);
    }
}
