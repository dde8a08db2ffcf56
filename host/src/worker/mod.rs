//! A worker: built from its plan (the checked configuration, `plan.rs`), then run until
//! shutdown.
//!
//! [`Worker::build`] takes every fallible step of start-up first (as Spin's trigger
//! builder does): the runtime, the plugin (the registry's active version when the API is
//! on), the HTTP servers, the source, sinks and state store (waiting for Kafka's topics),
//! the crash guard. [`Worker::run`] then runs the pipeline, and the retry pipeline beside
//! it, until the shutdown future completes; restarts the Kafka clients after the
//! transactional producer was fenced (`restarts.rs`); sends heartbeats (`heartbeat.rs`);
//! and stops every task it spawned before it returns.
//!
//! - `plan.rs`: the configuration checked and turned into typed values;
//! - `endpoints.rs`: where a run reads, writes and keeps state: files and the embedded
//!   store, or Kafka topics and Redis;
//! - `plugin.rs`: the plugin a worker starts with, and the hot-swap control behind its API;
//! - `http.rs`: the metrics and API servers;
//! - `replay.rs`: a dead-letter file fed through a plugin again (`weir dlq replay`).

mod endpoints;
mod heartbeat;
mod http;
mod plan;
mod plugin;
mod replay;
mod restarts;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use self::endpoints::{Endpoints, crash_guard, state_store};
pub use self::plan::{
    ApiPlan, FilesPlan, Io, Lifecycle, Plan, PluginPlan, StatePlan, Store, TracingPlan,
};
pub use self::replay::{Replay, ReplayReport};
use self::restarts::Restarts;
use crate::cluster::WorkerInfo;
use crate::metrics::{Metrics, Summary, WorkerStarted};
use crate::pipeline::{Backoff, Pipeline, PipelineError, Settings};
use crate::runtime::{ActivePlugin, Runtime};
use crate::state::StateStore;
use crate::tasks::Tasks;
use crate::traces::Traces;

/// A worker ready to run: everything that can fail at start-up has been done.
pub struct Worker {
    plan: Plan,
    plugin: Arc<ActivePlugin>,
    metrics: Arc<Metrics>,
    /// What `/readyz` answers.
    ready: Arc<AtomicBool>,
    endpoints: Endpoints,
    state: Arc<dyn StateStore>,
    settings: Settings,
    /// This worker's name in leases and heartbeats.
    id: String,
    tasks: Tasks,
}

/// Refuses a stateful plugin where its state cannot be kept as promised.
fn check_keyed_state(plan: &Plan, plugin: &crate::runtime::Plugin) -> anyhow::Result<()> {
    if let Some(why) = plan
        .keyed_state_refusal()
        .filter(|_| plugin.meta().stateful)
    {
        anyhow::bail!(
            "plugin `{}` {}",
            plugin.meta().name,
            crate::control::no_keyed_state(why)
        );
    }
    Ok(())
}

/// How a run ended.
pub struct Report {
    pub summary: Summary,
    /// Where the dead letters are, to say so.
    pub dead_letters: String,
}

impl Worker {
    /// Sets up a worker from its plan, whose secrets are resolved.
    pub async fn build(plan: Plan) -> anyhow::Result<Self> {
        let runtime = Arc::new(Runtime::new(&plan.limits)?);
        let id = worker_id();
        let metrics = Arc::new(Metrics::of_worker(&plan.pipeline_name, &id));
        let (input, output, dlq) = match &plan.io {
            Io::Kafka(kafka) => (kafka.input.clone(), kafka.output.clone(), kafka.dlq.clone()),
            Io::Files(files) => [&files.input, &files.output, &files.dlq]
                .map(|path| path.display().to_string())
                .into(),
        };
        metrics.emit(WorkerStarted {
            input: &input,
            output: &output,
            dlq: &dlq,
        });
        let tasks = Tasks::default();
        let (plugin, control) = plugin::start(&plan, runtime, &metrics, &tasks).await?;
        check_keyed_state(&plan, &plugin.current())?;
        // The state store before the files: it cuts output files back before they are opened.
        let (state, redis) = state_store(&plan, &id, &metrics).await?;
        // In exactly-once mode keyed state is in the changelog topic (`weir state --kafka`).
        let keyed = match &plan.io {
            Io::Kafka(kafka) if kafka.changelog.is_some() => None,
            _ => state.keyed(),
        };
        let ready = http::serve(&plan, &metrics, control, keyed, &tasks).await?;
        let endpoints = Endpoints::open(&plan, &metrics, 0).await?;
        let lifecycle = &plan.lifecycle;
        let settings = Settings {
            batch_size: lifecycle.batch_size,
            id: lifecycle.id.clone(),
            backoff: Backoff::new(plan.retry.clone()),
            bypass_done: false,
            progress: lifecycle.progress,
            lease_renewal: redis.is_some().then(|| plan.state.lease_ttl / 3),
            max_in_flight_batches: lifecycle.max_in_flight_batches,
            park_retryable: plan.retry.topic.is_some(),
            crash_guard: crash_guard(&plan, redis)?,
            traces: (plan.tracing.as_ref())
                .map(|t| {
                    let of = (plan.pipeline_name.as_str(), id.as_str());
                    Traces::start(&t.endpoint, &t.service_name, t.sample_ratio, of)
                })
                .transpose()?,
        };
        Ok(Self {
            plan,
            plugin,
            metrics,
            ready,
            endpoints,
            state,
            settings,
            id,
            tasks,
        })
    }

    /// Runs until `shutdown` completes or the pipeline ends (a finite input, a fatal
    /// error), then stops every task the worker spawned.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<Report> {
        tokio::pin!(shutdown);
        let info = self.info();
        let Self {
            plan,
            plugin,
            metrics,
            ready,
            mut endpoints,
            state,
            settings,
            id,
            tasks,
        } = self;
        let dead_letters = endpoints.dlq_name.clone();
        // The source's partitions, for heartbeats; a new source after a restart has its own.
        let partitions = Arc::new(Mutex::new(endpoints.partitions.take()));
        // Heartbeats say which worker holds which partitions: cluster mode only.
        let redis = (plan.redis().cloned()).filter(|_| matches!(plan.io, Io::Kafka(_)));
        if let Some(redis) = &redis {
            tasks.spawn(heartbeat::beat(
                info,
                redis.clone(),
                &plugin,
                &partitions,
                &metrics,
            ));
        }
        let pipeline = |source, sink, dlq, state| Pipeline {
            plugin: plugin.clone(),
            source,
            sink,
            dlq,
            state,
            metrics: metrics.clone(),
            settings: settings.clone(),
        };
        let mut restarts = Restarts::default();
        let summary = loop {
            let transactional = std::mem::take(&mut endpoints.transactional);
            let store = endpoints.state(&state, plan.state.done_ttl);
            let retry =
                (endpoints.retry.take()).map(|r| pipeline(r.source, r.sink, r.dlq, store.clone()));
            let main = pipeline(endpoints.source, endpoints.sink, endpoints.dlq, store);
            ready.store(true, Ordering::Relaxed);
            let summary = run_pipelines(main, retry, &mut shutdown).await;
            ready.store(false, Ordering::Relaxed);
            let Some(restart) = restarts.after(&summary, &transactional, &metrics) else {
                break summary;
            };
            drop(transactional);
            endpoints = tokio::select! {
                connected = Endpoints::open(&plan, &metrics, restart) => connected?,
                () = &mut shutdown => break Ok(metrics.summary(Duration::ZERO)),
            };
            *partitions.lock().unwrap_or_else(PoisonError::into_inner) =
                endpoints.partitions.take();
        };
        tasks.stop().await;
        if let Some(traces) = settings.traces {
            let _ = tokio::task::spawn_blocking(move || traces.shut_down()).await;
        }
        if let Some(redis) = &redis {
            let _ = crate::cluster::sign_off(redis, &plan.pipeline_name, &id).await;
        }
        Ok(Report {
            summary: summary?,
            dead_letters,
        })
    }

    /// What this worker's heartbeats say besides the running version and partitions.
    fn info(&self) -> WorkerInfo {
        WorkerInfo {
            id: self.id.clone(),
            host: worker_host(),
            pipeline: self.plan.pipeline_name.clone(),
            topic: match &self.plan.io {
                Io::Kafka(kafka) => kafka.input.clone(),
                Io::Files(_) => String::new(),
            },
            partitions: Vec::new(),
            plugin: self.plan.plugin.name.clone(),
            plugin_version: 0,
            plugin_digest: String::new(),
            last_seen_ms: 0,
        }
    }
}

/// Runs the pipeline and, with a retry topic, the retry pipeline beside it, until the
/// shutdown or until one of them ends, which stops the other.
async fn run_pipelines(
    main: Pipeline,
    retry: Option<Pipeline>,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, PipelineError> {
    let Some(retry) = retry else {
        return main.run(shutdown).await;
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|&stop| stop).await;
        }
    };
    let stopping = |summary| {
        let _ = stop.send(true);
        summary
    };
    let both = async {
        tokio::join!(async { stopping(main.run(until_stopped()).await) }, async {
            stopping(retry.run(until_stopped()).await)
        },)
    };
    tokio::pin!(both);
    let (main, retry) = tokio::select! {
        both = &mut both => both,
        () = shutdown => {
            let _ = stop.send(true);
            both.await
        }
    };
    let summary = main?;
    retry?;
    Ok(summary)
}

/// The machine's host name.
fn worker_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().replace('|', "-"))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}

/// This worker's name in leases and heartbeats: host, process id and a random suffix.
fn worker_id() -> String {
    format!(
        "{}-{}-{:04x}",
        worker_host(),
        std::process::id(),
        rand::random::<u16>()
    )
}
