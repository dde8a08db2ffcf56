//! Where a run reads, writes and keeps state: JSON-lines files and the embedded store, or
//! Kafka topics and Redis.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::kafka::{KafkaDeadLetters, KafkaProducer, KafkaSink, KafkaSource, Transactions};
use crate::metrics::Metrics;
use crate::pipeline::{CrashFiles, CrashGuard, ParkedSource};
use crate::record::headers::RETRY_DESTINATION;
use crate::sink::{DeadLetterSink, FileDeadLetters, FileSink, Sink};
use crate::source::{FileSource, Source};
use crate::state::{EmbeddedStore, RedisStore, StateStore};

/// Where a run reads, writes and keeps state, as configured.
pub(super) struct Endpoints {
    pub(super) source: Box<dyn Source>,
    /// The partitions the source consumes now (cluster mode), for heartbeats.
    pub(super) partitions: Option<Box<dyn Fn() -> Vec<i32> + Send + Sync>>,
    pub(super) sink: Box<dyn Sink>,
    pub(super) dlq: Box<dyn DeadLetterSink>,
    /// Where dead letters are, to say so at the end.
    pub(super) dlq_name: String,
    /// The transactional producers (exactly-once mode), whose fatal error ends the run.
    pub(super) transactional: Vec<KafkaProducer>,
    /// The retry topic's source and sinks (`retry.topic`), for the retry pipeline.
    pub(super) retry: Option<RetryEndpoints>,
}

/// Where the retry pipeline reads (the retry topic, in the group `<group>.retry`) and
/// writes (the same topics as the main pipeline, the retry topic included).
pub(super) struct RetryEndpoints {
    pub(super) source: Box<dyn Source>,
    pub(super) sink: Box<dyn Sink>,
    pub(super) dlq: Box<dyn DeadLetterSink>,
}

impl Endpoints {
    /// Embedded mode: JSON-lines files.
    pub(super) fn files(config: &Config) -> anyhow::Result<Self> {
        let input = config
            .source
            .path
            .clone()
            .context("source.path is required")?;
        let output = config.sink.path.clone().context("sink.path is required")?;
        let dlq_path = config.dlq_file().context("sink.path is required")?;
        Ok(Self {
            source: Box::new(
                FileSource::open(&input, config.source.format)?.follow(config.source.follow),
            ),
            partitions: None,
            sink: Box::new(FileSink::open(
                &output,
                &config.sink.destinations,
                config.sink.format,
            )?),
            dlq: Box::new(FileDeadLetters::open(&dlq_path)?),
            dlq_name: dlq_path.display().to_string(),
            transactional: Vec::new(),
            retry: None,
        })
    }

    /// Waits for the brokers and the topics (saying what is missing), then joins the group.
    /// `restart` counts the clients made before in this process (exactly-once mode: the
    /// transactional id of a restart is `<id>.<restart>`, see `restarts.rs`).
    pub(super) async fn kafka(
        config: &Config,
        metrics: &Metrics,
        restart: u32,
    ) -> anyhow::Result<Self> {
        let input = config
            .source
            .topic
            .clone()
            .context("source.topic is required")?;
        let output = config
            .sink
            .topic
            .clone()
            .context("sink.topic is required")?;
        let dlq = config.dlq.topic.clone().context("dlq.topic is required")?;
        let mut destinations: BTreeMap<String, String> = config
            .sink
            .destinations
            .iter()
            .map(|(name, topic)| (name.clone(), topic.display().to_string()))
            .collect();
        if let Some(retry) = &config.retry.topic {
            destinations.insert(RETRY_DESTINATION.to_owned(), retry.clone());
        }
        let topics: Vec<String> = [&input, &output, &dlq]
            .into_iter()
            .chain(destinations.values())
            .cloned()
            .collect();
        crate::kafka::wait_for_topics(&config.kafka, &topics).await?;
        // Exactly-once: this slot's transactional id (`<id>.<restart>` after a restart).
        let slot = match &config.kafka.transactional_id {
            Some(id) if config.kafka.exactly_once && restart == 0 => Some(id.clone()),
            Some(id) if config.kafka.exactly_once => Some(format!("{id}.{restart}")),
            _ => None,
        };
        let mut transactional = Vec::new();
        let (producer, transactions) = pipeline_producer(config, metrics, slot.clone()).await?;
        transactional.extend(transactions.is_some().then(|| producer.clone()));
        let source = KafkaSource::subscribe(
            &config.kafka,
            &input,
            metrics.consumer_lag.clone(),
            transactions,
        )?;
        let sink = |producer: &KafkaProducer| {
            Box::new(KafkaSink::new(
                producer,
                &output,
                destinations.clone(),
                config.limits.max_output_bytes,
                Some(metrics.circuit_open.with_label_values(&["sink"])),
            ))
        };
        let dead_letters = |producer: &KafkaProducer| {
            Box::new(KafkaDeadLetters::new(
                producer,
                &dlq,
                Some(metrics.circuit_open.with_label_values(&["dlq"])),
            ))
        };
        let retry = match &config.retry.topic {
            Some(topic) => {
                let mut kafka = config.kafka.clone();
                kafka.group = kafka.group.map(|group| format!("{group}.retry"));
                // Exactly-once: the retry consumer's offsets go into its own transactions.
                let slot = slot.map(|id| format!("{id}-retry"));
                let (producer, transactions) = pipeline_producer(config, metrics, slot).await?;
                transactional.extend(transactions.is_some().then(|| producer.clone()));
                let parked = KafkaSource::subscribe(
                    &kafka,
                    topic,
                    metrics.consumer_lag.clone(),
                    transactions,
                )?;
                Some(RetryEndpoints {
                    source: Box::new(ParkedSource(Box::new(parked))),
                    sink: sink(&producer),
                    dlq: dead_letters(&producer),
                })
            }
            None => None,
        };
        Ok(Self {
            partitions: Some(Box::new(source.partitions())),
            source: Box::new(source),
            sink: sink(&producer),
            dlq: dead_letters(&producer),
            dlq_name: format!("topic {dlq}"),
            transactional,
            retry,
        })
    }
}

/// The producer of a pipeline: with a transactional id (exactly-once mode), a transactional
/// one and its transactions; else an idempotent one.
async fn pipeline_producer(
    config: &Config,
    metrics: &Metrics,
    transactional_id: Option<String>,
) -> anyhow::Result<(KafkaProducer, Option<Arc<Transactions>>)> {
    let Some(id) = transactional_id else {
        return Ok((KafkaProducer::new(&config.kafka)?, None));
    };
    eprintln!("weir: exactly-once: batches in transactions, transactional ids {id} and {id}/2");
    let kafka = config.kafka.clone();
    let producer =
        tokio::task::spawn_blocking(move || KafkaProducer::transactional(&kafka, &id)).await??;
    let transactions = Transactions::new(&producer, metrics.transactions.clone());
    Ok((producer, Some(transactions)))
}

/// The state store: Redis when configured (and the store itself, for the crash guard),
/// else the embedded one.
pub(super) async fn state_store(
    config: &Config,
    pipeline_name: &str,
    worker: &str,
    metrics: &Metrics,
) -> anyhow::Result<(Arc<dyn StateStore>, Option<Arc<RedisStore>>)> {
    let done_ttl =
        (config.state.done_ttl_secs > 0).then(|| Duration::from_secs(config.state.done_ttl_secs));
    Ok(match super::redis_target(config) {
        Some(redis) => {
            let store = RedisStore::connect(
                &redis,
                pipeline_name,
                worker,
                Duration::from_millis(config.state.lease_ttl_ms),
                done_ttl,
            )
            .await?
            .with_circuit_gauge(metrics.circuit_open.with_label_values(&["redis"]));
            eprintln!("weir: worker {worker}: leases and done marks in Redis at {redis}");
            let store = Arc::new(store);
            (store.clone(), Some(store))
        }
        None => {
            let store = EmbeddedStore::open(
                &config.state.path,
                pipeline_name,
                done_ttl,
                config.state.cache_bytes(),
            )?;
            (Arc::new(store), None)
        }
    })
}

/// The crash guard of a pipeline: its log is the Redis state store in cluster mode (where
/// the worker that takes over a dead one's records sees its crashes), else files in
/// `<state.path>/crashes/<pipeline>`.
pub(super) fn crash_guard(
    config: &Config,
    pipeline: &str,
    redis: Option<Arc<RedisStore>>,
) -> anyhow::Result<Option<Arc<CrashGuard>>> {
    let limit = config.pipeline.crash_loop_limit;
    if limit == 0 {
        return Ok(None);
    }
    let guard = match redis {
        Some(store) => CrashGuard::new(store, limit, false),
        None => {
            let dir = config.state.path.join("crashes").join(pipeline);
            let files = CrashFiles::open(&dir)
                .with_context(|| format!("crash log in {}", dir.display()))?;
            CrashGuard::new(Arc::new(files), limit, true)
        }
    };
    Ok(Some(Arc::new(guard)))
}
