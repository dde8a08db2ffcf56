//! A pipeline's Kafka clients, made from its [`KafkaPlan`]: wait for the brokers and the
//! topics, make the producer (transactional in exactly-once mode), join the group, and the
//! same again for the retry topic's consumer when there is one.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{KafkaDeadLetters, KafkaProducer, KafkaSink, KafkaSource, Transactions};
use crate::config::KafkaConfig;
use crate::metrics::{Dependency, Metrics};
use crate::record::headers::RETRY_DESTINATION;

/// What a Kafka pipeline reads and writes, checked (the worker's plan holds it).
#[derive(Debug, Clone)]
pub struct KafkaPlan {
    /// Bootstrap, group and the user's librdkafka options.
    pub client: KafkaConfig,
    pub input: String,
    pub output: String,
    pub dlq: String,
    /// Named destinations of outputs: name → topic.
    pub destinations: BTreeMap<String, String>,
    /// Where `retryable` records wait for their next attempt (`retry.topic`).
    pub retry: Option<String>,
    /// Exactly-once mode: this worker slot's `transactional.id`.
    pub transactional_id: Option<String>,
    /// The largest output value the sink accepts.
    pub max_output_bytes: usize,
    /// Exactly-once mode: the changelog topic of a stateful plugin's keyed state.
    pub changelog: Option<String>,
}

/// One consumer with the sinks that write what it consumed.
pub struct Clients {
    pub source: KafkaSource,
    pub sink: KafkaSink,
    pub dlq: KafkaDeadLetters,
}

/// A pipeline's clients, connected.
pub struct Connected {
    pub main: Clients,
    /// The retry topic's consumer (group `<group>.retry`) and sinks, for the retry pipeline.
    pub retry: Option<Clients>,
    /// The transactional producers (exactly-once mode), whose fatal error ends the run.
    pub transactional: Vec<KafkaProducer>,
}

impl KafkaPlan {
    /// Waits for the brokers and the topics (saying what is missing), then joins the group.
    /// `restart` counts the clients made before in this process: in exactly-once mode the
    /// transactional id of a restart is `<id>.<restart>`, a producer id of its own (the
    /// old one is fenced and cannot be used again).
    pub async fn connect(&self, metrics: &Arc<Metrics>, restart: u32) -> anyhow::Result<Connected> {
        let topics: Vec<String> = [&self.input, &self.output, &self.dlq]
            .into_iter()
            .chain(self.destinations.values())
            .chain(&self.retry)
            .cloned()
            .collect();
        super::wait_for_topics(&self.client, &topics).await?;
        if let Some(changelog) = &self.changelog {
            super::changelog::ensure_changelog(&self.client, changelog, &self.input).await?;
        }
        let slot = self.transactional_id.as_ref().map(|id| match restart {
            0 => id.clone(),
            n => format!("{id}.{n}"),
        });
        let (main, transactional) = self
            .clients(&self.client, &self.input, slot.clone(), metrics)
            .await?;
        let mut connected = Connected {
            main,
            retry: None,
            transactional: transactional.into_iter().collect(),
        };
        if let Some(topic) = &self.retry {
            let mut client = self.client.clone();
            client.group = client.group.map(|group| format!("{group}.retry"));
            // Exactly-once: the retry consumer's offsets go into its own transactions.
            let slot = slot.map(|id| format!("{id}-retry"));
            let (retry, transactional) = self.clients(&client, topic, slot, metrics).await?;
            connected.retry = Some(retry);
            connected.transactional.extend(transactional);
        }
        Ok(connected)
    }

    /// A consumer of `input` as `client` says, and the sinks of what it consumed, with their
    /// producer when it is transactional.
    async fn clients(
        &self,
        client: &KafkaConfig,
        input: &str,
        transactional_id: Option<String>,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<(Clients, Option<KafkaProducer>)> {
        let (producer, transactions) = self.producer(metrics, transactional_id).await?;
        let transactional = transactions.is_some().then(|| producer.clone());
        let mut destinations = self.destinations.clone();
        if let Some(retry) = &self.retry {
            destinations.insert(RETRY_DESTINATION.to_owned(), retry.clone());
        }
        let clients = Clients {
            source: KafkaSource::subscribe(client, input, metrics.clone(), transactions)?,
            sink: KafkaSink::new(
                &producer,
                &self.output,
                destinations,
                self.max_output_bytes,
                Some(metrics.circuit(Dependency::Sink)),
            )
            .with_changelog(self.changelog.clone()),
            dlq: KafkaDeadLetters::new(
                &producer,
                &self.dlq,
                Some(metrics.circuit(Dependency::Dlq)),
            ),
        };
        Ok((clients, transactional))
    }

    /// The producer of a pipeline: with a transactional id, a transactional one and its
    /// transactions; else an idempotent one.
    async fn producer(
        &self,
        metrics: &Arc<Metrics>,
        transactional_id: Option<String>,
    ) -> anyhow::Result<(KafkaProducer, Option<Arc<Transactions>>)> {
        let Some(id) = transactional_id else {
            return Ok((KafkaProducer::new(&self.client)?, None));
        };
        eprintln!("weir: exactly-once: batches in transactions, transactional ids {id} and {id}/2");
        let client = self.client.clone();
        let producer =
            tokio::task::spawn_blocking(move || KafkaProducer::transactional(&client, &id))
                .await??;
        let transactions = Transactions::new(&producer, metrics.clone());
        Ok((producer, Some(transactions)))
    }
}
