//! `weir run`: a worker, from the config file with the flags laid over it, until it is
//! stopped (SIGINT, SIGTERM) or a finite input ends.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::{key_values, write_summary};
use crate::config::{Config, LineFormat};
use crate::worker::{Io, Plan, Report, Store, Worker};

#[derive(Args)]
pub(super) struct RunArgs {
    /// TOML config file; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The plugin component (.wasm).
    #[arg(long)]
    plugin: Option<PathBuf>,
    /// Name of the plugin in logs, metrics and DLQ records (default: the file name).
    #[arg(long)]
    plugin_name: Option<String>,
    /// Input: a JSON-lines file, a directory of *.jsonl files, or - for stdin.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Output: a JSON-lines file (appended to), or - for stdout.
    #[arg(long)]
    output: Option<PathBuf>,
    /// A named destination for plugin outputs: NAME=PATH (repeatable).
    #[arg(long = "destination", value_name = "NAME=PATH")]
    destinations: Vec<String>,
    /// Dead-letter file (default: <output>.dlq.jsonl, or weir.dlq.jsonl for stdout).
    #[arg(long)]
    dlq: Option<PathBuf>,
    /// Directory of the embedded state store (done marks) [default: .weir/state].
    #[arg(long)]
    state: Option<PathBuf>,
    /// Idempotency key: a JSON pointer (/id), header:<name>, or key [default: source position].
    #[arg(long)]
    id: Option<String>,
    /// Configuration handed to the plugin's init: KEY=VALUE (repeatable).
    #[arg(long = "plugin-config", value_name = "KEY=VALUE")]
    plugin_config: Vec<String>,
    /// Write the run summary as JSON to this file.
    #[arg(long)]
    summary_json: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz on this address (e.g. 127.0.0.1:9090).
    #[arg(long)]
    metrics: Option<String>,
    /// Send traces of batches and records to this OTLP/HTTP receiver (its /v1/traces),
    /// e.g. http://127.0.0.1:4318 (tracing.otlp_endpoint) [default: no traces].
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// Keep reading the input file as it grows (like tail -f), until stopped.
    #[arg(long)]
    follow: bool,
    /// Serve the plugin API (/v1) with /metrics, /healthz and /readyz on this address
    /// (loopback only unless the config allows more, e.g. 127.0.0.1:8080).
    #[arg(long)]
    api: Option<String>,
    /// Records per plugin call [default: 128].
    #[arg(long)]
    batch_size: Option<usize>,
    /// How input lines are read: value (the line is the value) or envelope.
    #[arg(long, value_enum)]
    input_format: Option<Format>,
    /// How outputs are written: value (one value per line) or envelope.
    #[arg(long, value_enum)]
    output_format: Option<Format>,
    /// Deadline of one plugin call in milliseconds [default: 2000].
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Memory cap of one plugin instance in MiB [default: 256].
    #[arg(long)]
    memory_mb: Option<u64>,
    /// Attempts in all for records the plugin calls retryable [default: 5].
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Cluster mode: park records the plugin calls retryable in this topic until their next
    /// attempt is due, so they do not hold up their partition (retry.topic).
    #[arg(long, value_name = "TOPIC")]
    retry_topic: Option<String>,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
    /// Cluster mode: Kafka bootstrap servers (e.g. 127.0.0.1:9092).
    #[arg(long, value_name = "BOOTSTRAP")]
    kafka: Option<String>,
    /// Cluster mode: the consumer group shared by the pipeline's workers.
    #[arg(long)]
    group: Option<String>,
    /// Cluster mode: outputs, dead letters and consumer offsets of each batch in one Kafka
    /// transaction (needs --transactional-id).
    #[arg(long)]
    exactly_once: bool,
    /// Exactly-once mode: this worker slot's transactional.id; start a replacement of a
    /// dead worker with the same one.
    #[arg(long, value_name = "ID")]
    transactional_id: Option<String>,
    /// Cluster mode: the topic to consume.
    #[arg(long)]
    input_topic: Option<String>,
    /// Cluster mode: the default topic for outputs.
    #[arg(long)]
    output_topic: Option<String>,
    /// Cluster mode: the dead-letter topic.
    #[arg(long)]
    dlq_topic: Option<String>,
    /// A librdkafka property passed through as is: KEY=VALUE (repeatable).
    #[arg(long = "kafka-option", value_name = "KEY=VALUE")]
    kafka_options: Vec<String>,
    /// Redis for leases and done marks shared by all workers (e.g. redis://127.0.0.1:6379;
    /// rediss:// for TLS, user:password@ for AUTH, ${env:NAME} for a password).
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// --redis names nodes of a Redis Cluster (comma-separated; the client finds the rest).
    #[arg(long)]
    redis_cluster: bool,
    /// On a Redis Cluster: how many buckets the ids spread over [default: 16].
    #[arg(long, value_name = "N")]
    redis_cluster_buckets: Option<u32>,
    /// The CA certificate (PEM) a rediss:// server's certificate must chain to [default: the
    /// system's CAs].
    #[arg(long, value_name = "FILE")]
    redis_ca_file: Option<PathBuf>,
    /// How long a lease outlives a worker that stopped renewing it, in ms [default: 30000].
    #[arg(long)]
    lease_ttl_ms: Option<u64>,
    /// Validate the configuration, print it (file and flags merged) as TOML and exit, without
    /// loading the plugin or connecting.
    #[arg(long)]
    check: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum Format {
    Value,
    Envelope,
}

impl From<Format> for LineFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::Value => LineFormat::Value,
            Format::Envelope => LineFormat::Envelope,
        }
    }
}

impl RunArgs {
    pub async fn execute(self) -> anyhow::Result<()> {
        let (mut config, summary_json, check_only) = self.into_config()?;
        if check_only {
            let plan = Plan::new(config.clone())?;
            // The effective configuration (file and flags merged), for people and for tools;
            // secrets hidden.
            print!("{}", toml::to_string(&config.shown())?);
            eprintln!("weir: configuration is valid ({} mode)", plan.mode());
            return Ok(());
        }
        config.resolve_secrets()?;
        let plan = Plan::new(config)?;
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        let worker = tokio::select! {
            built = Worker::build(plan.clone()) => built?,
            () = &mut shutdown => return Ok(()),
        };
        let Report {
            summary,
            dead_letters,
        } = worker.run(shutdown).await?;
        write_summary(&summary, summary_json.as_deref())?;
        if summary.dead_lettered > 0 {
            eprintln!("weir: dead letters are in {dead_letters} (see `weir dlq list`)");
        }
        if let (Io::Files(_), Store::Embedded { .. }) = (&plan.io, &plan.state.store)
            && summary.deduplicated > 0
            && summary.deduplicated == summary.records_in
        {
            eprintln!(
                "weir: every record was already done according to {}; use another --state directory to process them again",
                plan.state.dir.display()
            );
        }
        Ok(())
    }

    /// The config file (if any) with the flags laid over it.
    fn into_config(self) -> anyhow::Result<(Config, Option<PathBuf>, bool)> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($flag:expr => $field:expr) => {
                if let Some(v) = $flag {
                    $field = v.into();
                }
            };
        }
        set!(self.plugin => c.plugin.path);
        set!(self.plugin_name => c.plugin.name);
        set!(self.input => c.source.path);
        set!(self.output => c.sink.path);
        set!(self.dlq => c.dlq.path);
        set!(self.state => c.state.path);
        set!(self.id => c.pipeline.id);
        set!(self.metrics => c.metrics.addr);
        set!(self.otlp_endpoint => c.tracing.otlp_endpoint);
        set!(self.api => c.api.addr);
        if self.follow {
            c.source.follow = true;
        }
        set!(self.batch_size => c.pipeline.batch_size);
        set!(self.input_format => c.source.format);
        set!(self.output_format => c.sink.format);
        set!(self.deadline_ms => c.limits.deadline_ms);
        set!(self.memory_mb => c.limits.memory_mb);
        set!(self.max_attempts => c.retry.max_attempts);
        set!(self.retry_topic => c.retry.topic);
        set!(self.kafka => c.kafka.bootstrap);
        set!(self.group => c.kafka.group);
        set!(self.transactional_id => c.kafka.transactional_id);
        c.kafka.exactly_once |= self.exactly_once;
        set!(self.input_topic => c.source.topic);
        set!(self.output_topic => c.sink.topic);
        set!(self.dlq_topic => c.dlq.topic);
        set!(self.redis => c.state.redis_url);
        c.state.redis_cluster |= self.redis_cluster;
        set!(self.redis_cluster_buckets => c.state.redis_cluster_buckets);
        set!(self.redis_ca_file => c.state.redis_ca_file);
        set!(self.lease_ttl_ms => c.state.lease_ttl_ms);
        c.kafka
            .options
            .extend(key_values("--kafka-option", &self.kafka_options)?);
        for (name, path) in key_values("--destination", &self.destinations)? {
            c.sink.destinations.insert(name, path.into());
        }
        c.plugin
            .config
            .extend(key_values("--plugin-config", &self.plugin_config)?);
        if self.quiet {
            c.pipeline.progress_secs = 0;
        }
        Ok((c, self.summary_json, self.check))
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    eprintln!("weir: stopping after the batch in flight");
}
