//! Where a run reads, writes and keeps state: JSON-lines files and the embedded store, or
//! Kafka topics and Redis.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::plan::{FilesPlan, Io, Plan, Store};
use crate::kafka::changelog::{Changelog, ChangelogStore};
use crate::kafka::{Clients, Connected, KafkaPlan, KafkaProducer};
use crate::metrics::{Dependency, Metrics};
use crate::pipeline::{CrashFiles, CrashGuard, ParkedSource};
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
    /// Exactly-once mode: the changelog topic of keyed state.
    pub(super) changelog: Option<Changelog>,
}

/// Where the retry pipeline reads (the retry topic, in the group `<group>.retry`) and
/// writes (the same topics as the main pipeline, the retry topic included).
pub(super) struct RetryEndpoints {
    pub(super) source: Box<dyn Source>,
    pub(super) sink: Box<dyn Sink>,
    pub(super) dlq: Box<dyn DeadLetterSink>,
}

impl Endpoints {
    /// The endpoints of `plan`; `restart` counts the Kafka clients made before in this
    /// process (see `restarts.rs`).
    pub(super) async fn open(
        plan: &Plan,
        metrics: &Arc<Metrics>,
        restart: u32,
    ) -> anyhow::Result<Self> {
        match &plan.io {
            Io::Files(files) => Self::files(files),
            Io::Kafka(kafka) => Self::kafka(kafka, metrics, restart).await,
        }
    }

    /// Embedded mode: JSON-lines files.
    fn files(files: &FilesPlan) -> anyhow::Result<Self> {
        Ok(Self {
            source: Box::new(
                FileSource::open(&files.input, files.input_format)?.follow(files.follow),
            ),
            partitions: None,
            sink: Box::new(FileSink::open(
                &files.output,
                &files.destinations,
                files.output_format,
            )?),
            dlq: Box::new(FileDeadLetters::open(&files.dlq)?),
            dlq_name: files.dlq.display().to_string(),
            transactional: Vec::new(),
            retry: None,
            changelog: None,
        })
    }

    /// The state store of a pipeline on these endpoints: `store`, with keyed state in the
    /// changelog topic in exactly-once mode (a store of its own for each set of clients).
    /// Done marks there are kept for `done_ttl`, as in `store`.
    pub(super) fn state(
        &self,
        store: &Arc<dyn StateStore>,
        done_ttl: Option<Duration>,
    ) -> Arc<dyn StateStore> {
        match &self.changelog {
            Some(changelog) => Arc::new(ChangelogStore::new(
                store.clone(),
                changelog.clone(),
                done_ttl,
            )),
            None => store.clone(),
        }
    }

    /// Cluster mode: Kafka topics; a retry topic's records come back through the retry
    /// pipeline when they are due.
    async fn kafka(
        kafka: &KafkaPlan,
        metrics: &Arc<Metrics>,
        restart: u32,
    ) -> anyhow::Result<Self> {
        let Connected {
            main,
            retry,
            transactional,
        } = kafka.connect(metrics, restart).await?;
        let Clients { source, sink, dlq } = main;
        Ok(Self {
            partitions: Some(Box::new(source.partitions())),
            source: Box::new(source),
            sink: Box::new(sink),
            dlq: Box::new(dlq),
            dlq_name: format!("topic {}", kafka.dlq),
            transactional,
            retry: retry.map(|retry| RetryEndpoints {
                source: Box::new(ParkedSource(Box::new(retry.source))),
                sink: Box::new(retry.sink),
                dlq: Box::new(retry.dlq),
            }),
            changelog: (kafka.changelog.clone()).map(|topic| Changelog {
                kafka: kafka.client.clone(),
                topic,
            }),
        })
    }
}

/// The state store: Redis when configured (and the store itself, for the crash guard),
/// else the embedded one.
pub(super) async fn state_store(
    plan: &Plan,
    worker: &str,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Arc<dyn StateStore>, Option<Arc<RedisStore>>)> {
    let state = &plan.state;
    Ok(match &state.store {
        Store::Redis(redis) => {
            let store = RedisStore::connect(
                redis,
                &plan.pipeline_name,
                worker,
                state.lease_ttl,
                state.done_ttl,
            )
            .await?
            .with_circuit_gauge(metrics.circuit(Dependency::Redis));
            // Where it can be kept, a version activated later may keep state too; in
            // exactly-once mode it is kept in the changelog topic instead.
            let in_changelog = matches!(&plan.io, Io::Kafka(k) if k.changelog.is_some());
            let store = match plan.keyed_state_refusal() {
                None if !in_changelog => store.keep_keyed_state(&plan.plugin.name)?,
                _ => store,
            };
            eprintln!("weir: worker {worker}: leases and done marks in Redis at {redis}");
            let store = Arc::new(store);
            (store.clone(), Some(store))
        }
        Store::Embedded { cache_bytes } => {
            let store = EmbeddedStore::open(
                &state.dir,
                &plan.pipeline_name,
                state.done_ttl,
                *cache_bytes,
            )?
            .keep_keyed_state(&plan.plugin.name);
            if let Io::Files(files) = &plan.io {
                let paths: Vec<PathBuf> = std::iter::once(&files.output)
                    .chain(files.destinations.values())
                    .chain([&files.dlq])
                    .cloned()
                    .collect();
                for (path, bytes) in store.cut_back(&paths)? {
                    eprintln!(
                        "weir: cut {bytes} bytes off the end of {}: lines of batches never marked done (their records run again)",
                        path.display()
                    );
                }
            }
            (Arc::new(store), None)
        }
    })
}

/// The crash guard of a pipeline: its log is the Redis state store in cluster mode (where
/// the worker that takes over a dead one's records sees its crashes), else files in
/// `<state.path>/crashes/<pipeline>`.
pub(super) fn crash_guard(
    plan: &Plan,
    redis: Option<Arc<RedisStore>>,
) -> anyhow::Result<Option<Arc<CrashGuard>>> {
    let Some(limit) = plan.lifecycle.crash_loop_limit else {
        return Ok(None);
    };
    let guard = match redis {
        Some(store) => CrashGuard::new(store, limit, false),
        None => {
            let dir = plan.state.dir.join("crashes").join(&plan.pipeline_name);
            let files = CrashFiles::open(&dir)
                .with_context(|| format!("crash log in {}", dir.display()))?;
            CrashGuard::new(Arc::new(files), limit, true)
        }
    };
    Ok(Some(Arc::new(guard)))
}
