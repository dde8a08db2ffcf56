//! The `weir` command line: `run` (a worker), `dlq list` and `dlq replay`.
//!
//! Flags override the config file; the merged tree is validated before anything starts, and
//! every user mistake becomes one line naming what is wrong (exit 1), never a panic.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::api::{self, AppState};
use crate::cluster::WorkerInfo;
use crate::config::{Config, LineFormat, Mode};
use crate::metrics::{Metrics, Summary};
use crate::pipeline::{Backoff, ParkedSource, Pipeline, Settings};
use crate::record::DeadLetterLine;
use crate::record::IdSpec;
use crate::record::headers::RETRY_DESTINATION;
use crate::runtime::{ActivePlugin, Plugin, Runtime};
use crate::sink::{
    DeadLetterSink, FileDeadLetters, FileSink, KafkaDeadLetters, KafkaProducer, KafkaSink, Sink,
};
use crate::source::{DlqFileSource, FileSource, KafkaSource, Source, Transactions};
use crate::state::{EmbeddedStore, RedisStore, RedisTarget, StateStore};

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "Run sandboxed WebAssembly transforms over streams of records"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a plugin over a stream of records: JSON-lines files or stdin (embedded), or a
    /// Kafka topic as one worker of a consumer group (cluster mode, with --kafka).
    Run(Box<RunArgs>),
    /// Try a plugin on a sample file: outputs or dead-letter reasons, time and memory per record.
    Test(TestArgs),
    /// Inspect or replay a dead-letter file.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Inspect a cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Upload, list, activate and roll back plugin versions through a worker's API (--api).
    Plugin(PluginArgs),
    /// A running pipeline, through a worker's API (--api).
    Pipeline(PipelineArgs),
    /// Inspect a component read from stdin and print the verdict as JSON: the child process
    /// in which the API validates an upload, so its memory can be capped.
    #[command(hide = true)]
    ValidateUpload,
}

/// Where a worker's API is, and the token to send.
#[derive(Args)]
struct ApiArgs {
    /// The worker's API.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:8080",
        env = "WEIR_API"
    )]
    api: String,
    /// The admin token [default: the WEIR_ADMIN_TOKEN environment variable].
    #[arg(long, global = true)]
    token: Option<String>,
}

#[derive(Args)]
struct PluginArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: PluginCommand,
}

#[derive(Args)]
struct PipelineArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: PipelineCommand,
}

#[derive(Subcommand)]
enum PipelineCommand {
    /// The running plugin version, any canary, and record fates per version.
    Status {
        /// Print the API's JSON instead.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Upload a component as the next version of a plugin.
    Push {
        /// The component (.wasm).
        file: PathBuf,
        /// The plugin's name [default: the file name without .wasm].
        #[arg(long)]
        name: Option<String>,
    },
    /// List every plugin and version.
    List,
    /// Make a version the active one (every worker running the plugin swaps it in), or with
    /// --canary, give it a share of the records while it is watched.
    Activate {
        name: String,
        version: u64,
        /// Percent of the records (by a stable hash of their ids) for the version, as a
        /// canary rolled back automatically when it fails more than the active one.
        #[arg(long, value_name = "PERCENT")]
        canary: Option<f64>,
    },
    /// Make the previously active version active again.
    Rollback { name: String },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// List the live workers (those that sent a heartbeat in the last 10 s).
    Status {
        /// The Redis the workers use (`rediss://` for TLS; `user:password@` for AUTH).
        #[arg(long, value_name = "URL")]
        redis: String,
        /// The CA certificate (PEM) a `rediss://` server's certificate must chain to.
        #[arg(long, value_name = "FILE")]
        redis_ca_file: Option<PathBuf>,
        /// Only this pipeline's workers.
        #[arg(long)]
        pipeline: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct TestArgs {
    /// The plugin component (.wasm).
    plugin: PathBuf,
    /// JSON-lines sample: one record value per line.
    #[arg(long)]
    input: PathBuf,
    /// Expectations, line n for input line n: {"output": ...}, {"outputs": [...]} or
    /// {"dead_letter": {"class": ..., "reason_contains": ...}}. Exit 1 on any difference.
    #[arg(long)]
    expect: Option<PathBuf>,
    /// Configuration handed to the plugin's init: KEY=VALUE (repeatable).
    #[arg(long = "plugin-config", value_name = "KEY=VALUE")]
    plugin_config: Vec<String>,
    /// Deadline of one plugin call in milliseconds [default: 2000].
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Memory cap of one plugin instance in MiB [default: 256].
    #[arg(long)]
    memory_mb: Option<u64>,
}

#[derive(Args)]
struct RunArgs {
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

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
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

#[derive(Subcommand)]
enum DlqCommand {
    /// Count dead letters by class and show the first records of each (a file, or a topic).
    List {
        /// The dead-letter file.
        #[arg(long, required_unless_present = "dlq_topic")]
        dlq: Option<PathBuf>,
        /// Kafka bootstrap servers (with --dlq-topic).
        #[arg(long, value_name = "BOOTSTRAP", requires = "dlq_topic")]
        kafka: Option<String>,
        /// The DLQ topic.
        #[arg(long, requires = "kafka", conflicts_with = "dlq")]
        dlq_topic: Option<String>,
        /// Records shown per class.
        #[arg(long, default_value_t = 3)]
        show: usize,
    },
    /// Feed dead-lettered records through a (fixed) plugin again.
    Replay(ReplayArgs),
}

#[derive(Args)]
struct ReplayArgs {
    /// The dead-letter file to replay.
    #[arg(
        long,
        required_unless_present = "dlq_topic",
        conflicts_with = "dlq_topic"
    )]
    dlq: Option<PathBuf>,
    /// The plugin to run them through (file replay).
    #[arg(long, required_unless_present = "dlq_topic")]
    plugin: Option<PathBuf>,
    /// Where outputs go (appended to), or - for stdout (file replay).
    #[arg(long, required_unless_present = "dlq_topic")]
    output: Option<PathBuf>,
    /// Kafka bootstrap servers (topic replay).
    #[arg(long, value_name = "BOOTSTRAP", requires = "dlq_topic")]
    kafka: Option<String>,
    /// Topic replay: the DLQ topic to read.
    #[arg(long, requires_all = ["kafka", "to_topic"])]
    dlq_topic: Option<String>,
    /// Topic replay: where to re-publish (usually the pipeline's input topic).
    #[arg(long, requires = "dlq_topic")]
    to_topic: Option<String>,
    /// Topic replay: only dead letters of this class (e.g. retries_exhausted).
    #[arg(long, requires = "dlq_topic")]
    class: Option<String>,
    /// Where records that fail again, or are at the replay cap, go [default: <dlq>.replay.jsonl].
    #[arg(long)]
    new_dlq: Option<PathBuf>,
    /// State directory, so replayed records are marked done [default: .weir/state].
    #[arg(long)]
    state: Option<PathBuf>,
    /// A record replayed this often already is not fed again.
    #[arg(long, default_value_t = 3)]
    max_replays: u32,
    /// Configuration handed to the plugin's init: KEY=VALUE (repeatable).
    #[arg(long = "plugin-config", value_name = "KEY=VALUE")]
    plugin_config: Vec<String>,
    /// Write the replay summary as JSON to this file.
    #[arg(long)]
    summary_json: Option<PathBuf>,
}

/// Entry point of the `weir` binary.
/// Turns transparent huge pages off for this process. mimalloc asks for them for its heap,
/// which doubled a worker's resident memory (55 vs 27 MiB in the hot-swap benchmark) and
/// moved it in 2 MiB steps, for no throughput we could measure (BENCHMARKS.md).
#[allow(unsafe_code)]
fn without_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE sets a flag of this process; no memory is touched.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

pub fn main() -> ExitCode {
    without_huge_pages();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weir: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(*args).await,
            Command::Test(args) => test(args).await,
            Command::Dlq(DlqCommand::List {
                dlq,
                kafka,
                dlq_topic,
                show,
            }) => match (dlq, kafka, dlq_topic) {
                (_, Some(kafka), Some(topic)) => dlq_topic_list(&kafka, &topic, show).await,
                (Some(dlq), _, _) => dlq_list(&dlq, show),
                _ => Err(anyhow::anyhow!(
                    "pass --dlq <file>, or --kafka and --dlq-topic"
                )),
            },
            Command::Dlq(DlqCommand::Replay(args)) => replay(args).await,
            Command::Cluster(ClusterCommand::Status {
                redis,
                redis_ca_file,
                pipeline,
                json,
            }) => {
                let redis = RedisTarget::new(
                    crate::secrets::resolve_in_url("--redis", &redis)?,
                    redis_ca_file,
                );
                cluster_status(&redis, pipeline.as_deref(), json).await
            }
            Command::Plugin(args) => plugin_command(args).await,
            Command::Pipeline(args) => pipeline_command(args).await,
            Command::ValidateUpload => {
                tokio::task::spawn_blocking(api::validate_upload_child).await?
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir: error: {}", said_once(&e));
            ExitCode::FAILURE
        }
    }
}

/// `e` and its causes, joined with ": ", each said once: many errors already end with their
/// cause (`cannot open input x: No such file`), which the chain would repeat.
fn said_once(e: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

/// `weir plugin ...`: blocking HTTP calls, off the async runtime.
async fn plugin_command(args: PluginArgs) -> anyhow::Result<()> {
    use crate::plugin_client::{self, Client};
    tokio::task::spawn_blocking(move || {
        let client = Client::new(&args.api.api, args.api.token)?;
        match args.command {
            PluginCommand::Push { file, name } => {
                let name = name.unwrap_or_else(|| default_plugin_name(&file));
                plugin_client::push(&client, &file, &name)
            }
            PluginCommand::List => plugin_client::list(&client),
            PluginCommand::Activate {
                name,
                version,
                canary,
            } => plugin_client::activate(&client, &name, version, canary),
            PluginCommand::Rollback { name } => plugin_client::rollback(&client, &name),
        }
    })
    .await?
}

/// `weir pipeline ...`: as `weir plugin`.
async fn pipeline_command(args: PipelineArgs) -> anyhow::Result<()> {
    use crate::plugin_client::{self, Client};
    tokio::task::spawn_blocking(move || {
        let client = Client::new(&args.api.api, args.api.token)?;
        match args.command {
            PipelineCommand::Status { json } => plugin_client::status(&client, json),
        }
    })
    .await?
}

fn key_values(flag: &str, pairs: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => bail!("{flag} `{pair}` must look like KEY=VALUE"),
        })
        .collect()
}

impl RunArgs {
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
        c.validate()?;
        Ok((c, self.summary_json, self.check))
    }
}

/// The file name without `.wasm`, made into a valid plugin name.
fn default_plugin_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect();
    if name.is_empty() {
        "plugin".into()
    } else {
        name
    }
}

fn default_dlq_path(output: &Path) -> PathBuf {
    if output == Path::new("-") {
        return PathBuf::from("weir.dlq.jsonl");
    }
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    output.with_file_name(format!("{stem}.dlq.jsonl"))
}

fn load_plugin(
    runtime: &Runtime,
    path: &Path,
    name: &str,
    config: Vec<(String, String)>,
) -> anyhow::Result<Plugin> {
    Plugin::load_file(runtime, path, name, 1, config)
        .with_context(|| format!("plugin {}", path.display()))
}

/// Serves metrics, and the plugin API, where addresses are configured; returns the flag
/// `/readyz` reads.
async fn start_http_servers(
    config: &Config,
    metrics: &Arc<Metrics>,
    control: Option<api::Control>,
) -> anyhow::Result<Arc<AtomicBool>> {
    let ready = Arc::new(AtomicBool::new(false));
    let state = |control| AppState {
        metrics: metrics.clone(),
        ready: ready.clone(),
        control,
    };
    if let Some(addr) = &config.metrics.addr {
        let bound = serve_http(addr, state(None)).await?;
        eprintln!("weir: serving /metrics, /healthz, /readyz on http://{bound}");
    }
    if let (Some(addr), Some(control)) = (&config.api.addr, control) {
        let control = Arc::new(control);
        tokio::spawn(api::follow(control.clone()));
        tokio::spawn(api::watch_active(control.clone()));
        let bound = serve_http(addr, state(Some(control))).await?;
        eprintln!(
            "weir: serving the plugin API on http://{bound}/v1 (and /metrics, /healthz, /readyz)"
        );
    }
    Ok(ready)
}

async fn serve_http(addr: &str, state: AppState) -> anyhow::Result<SocketAddr> {
    let parsed: SocketAddr = addr
        .parse()
        .with_context(|| format!("`{addr}` is not a socket address"))?;
    api::serve(parsed, state)
        .await
        .with_context(|| format!("cannot serve on {addr}"))
}

/// The plugin API's registry, token and limits from the config. A cluster's workers share
/// one registry in their Redis; an embedded worker keeps its own in a directory.
async fn api_control(config: &Config, runtime: Arc<Runtime>) -> anyhow::Result<api::Control> {
    use crate::registry::Registry;
    let registry = match redis_target(config) {
        Some(redis) => Registry::connect(&redis)
            .await
            .with_context(|| format!("plugin registry in the Redis at {redis}"))?,
        None => {
            let dir = config
                .api
                .registry_path
                .clone()
                .unwrap_or_else(|| config.state.path.join("registry"));
            Registry::open(&dir).with_context(|| format!("plugin registry in {}", dir.display()))?
        }
    };
    let admin_token = config
        .api
        .admin_token
        .clone()
        .or_else(|| std::env::var(api::ADMIN_TOKEN_ENV).ok())
        .filter(|t| !t.is_empty());
    if admin_token.is_none() {
        eprintln!(
            "weir: no admin token (api.admin_token or {}): the API's mutating routes answer 401",
            api::ADMIN_TOKEN_ENV
        );
    }
    Ok(api::Control {
        registry,
        runtime,
        admin_token,
        open_reads: config.api.open_reads,
        compile_timeout: Duration::from_secs(config.api.compile_timeout_secs),
        compile_memory_bytes: (config.api.compile_memory_mb > 0)
            .then(|| config.api.compile_memory_mb.saturating_mul(1 << 20)),
        max_upload_bytes: usize::try_from(config.api.max_upload_mb.saturating_mul(1 << 20))
            .unwrap_or(usize::MAX),
        running: None,
        redis: redis_target(config),
        canary: config.canary.clone(),
        quarantine: config.quarantine.clone(),
    })
}

/// The registry's active version of `name`, loaded, with the activation count it is from;
/// when the registry has none, the `--plugin` file is uploaded (if new) and activated first.
async fn active_version(
    control: &api::Control,
    path: &Path,
    name: &str,
    config: Vec<(String, String)>,
) -> anyhow::Result<(Plugin, u64)> {
    use crate::registry::AuditEntry;
    let registry = &control.registry;
    let index = registry.plugin(name).await?;
    let (version, activations) = match index
        .as_ref()
        .and_then(|p| Some((p.active?, p.activations)))
    {
        Some(active) => active,
        None => {
            let bytes =
                std::fs::read(path).with_context(|| format!("plugin {}", path.display()))?;
            let inspection = Plugin::inspect(&control.runtime, &bytes)
                .with_context(|| format!("plugin {}", path.display()))?;
            let (info, _) = registry.upload(name, &bytes, inspection, "worker").await?;
            let index = registry.activate(name, info.version).await?;
            for action in ["upload", "activate"] {
                let mut entry = AuditEntry::new("worker", action, name);
                entry.version = Some(info.version);
                entry.digest = Some(info.digest.clone());
                registry.audit(&entry).await?;
            }
            eprintln!(
                "weir: registry had no active version of `{name}`: {} is version {}",
                path.display(),
                info.version
            );
            (info.version, index.activations)
        }
    };
    let bytes = registry.wasm(name, version).await?;
    let plugin = Plugin::load(&control.runtime, &bytes, name, version, config)
        .with_context(|| format!("plugin `{name}` version {version} from the registry"))?;
    Ok((plugin, activations))
}

/// The crash guard of a pipeline: its log is the Redis state store in cluster mode (where
/// the worker that takes over a dead one's records sees its crashes), else files in
/// `<state.path>/crashes/<pipeline>`.
fn crash_guard(
    config: &Config,
    pipeline: &str,
    redis: Option<Arc<RedisStore>>,
) -> anyhow::Result<Option<Arc<crate::pipeline::CrashGuard>>> {
    let limit = config.pipeline.crash_loop_limit;
    if limit == 0 {
        return Ok(None);
    }
    let guard = match redis {
        Some(store) => crate::pipeline::CrashGuard::new(store, limit, false),
        None => {
            let dir = config.state.path.join("crashes").join(pipeline);
            let files = crate::pipeline::CrashFiles::open(&dir)
                .with_context(|| format!("crash log in {}", dir.display()))?;
            crate::pipeline::CrashGuard::new(Arc::new(files), limit, true)
        }
    };
    Ok(Some(Arc::new(guard)))
}

/// Runs the pipeline and, with a retry topic, the retry pipeline beside it, until the
/// shutdown or until one of them ends, which stops the other.
async fn run_pipelines(
    main: Pipeline,
    retry: Option<Pipeline>,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, crate::pipeline::PipelineError> {
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

/// In-process restarts of the Kafka clients after the transactional producer was fenced or
/// failed (exactly-once mode): a fenced worker gives up the partitions it had, and joins
/// the group again with a new producer. Its transactional id is `<id>.<restart>`, so it does
/// not fence in turn the worker that fenced it (a worker started again with this slot's
/// id, which now has the partitions). More than [`Restarts::MAX`] within
/// [`Restarts::WINDOW`] stop the worker: something is wrong beyond one fencing.
#[derive(Default)]
struct Restarts {
    total: u32,
    recent: Vec<std::time::Instant>,
}

impl Restarts {
    const MAX: usize = 5;
    const WINDOW: Duration = Duration::from_secs(600);

    /// The number of the next restart, or `None` when there were too many lately.
    fn next(&mut self) -> Option<u32> {
        self.recent.retain(|at| at.elapsed() < Self::WINDOW);
        if self.recent.len() >= Self::MAX {
            eprintln!(
                "weir: {} restarts of the Kafka clients in {} s; stopping",
                self.recent.len(),
                Self::WINDOW.as_secs()
            );
            return None;
        }
        self.recent.push(std::time::Instant::now());
        self.total += 1;
        Some(self.total)
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

fn write_summary(summary: &Summary, path: Option<&Path>) -> anyhow::Result<()> {
    eprintln!("weir: done: {summary}");
    if let Some(path) = path {
        let json = serde_json::to_vec_pretty(summary)?;
        std::fs::write(path, json)
            .with_context(|| format!("cannot write summary {}", path.display()))?;
    }
    Ok(())
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

/// The Redis of cluster mode, as configured.
fn redis_target(config: &Config) -> Option<RedisTarget> {
    let url = config.state.redis_url.clone()?;
    Some(RedisTarget::new(url, config.state.redis_ca_file.clone()))
}

async fn cluster_status(
    redis: &RedisTarget,
    pipeline: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let workers = crate::cluster::live_workers(redis, pipeline)
        .await
        .with_context(|| format!("cannot read heartbeats from Redis at {redis}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&workers)?);
    } else {
        print!("{}", crate::cluster::render(&workers));
    }
    Ok(())
}

/// Where a run reads, writes and keeps state, as configured.
struct Endpoints {
    source: Box<dyn Source>,
    /// The partitions the source consumes now (cluster mode), for heartbeats.
    partitions: Option<Box<dyn Fn() -> Vec<i32> + Send + Sync>>,
    sink: Box<dyn Sink>,
    dlq: Box<dyn DeadLetterSink>,
    /// Where dead letters are, to say so at the end.
    dlq_name: String,
    /// The transactional producers (exactly-once mode), whose fatal error ends the run.
    transactional: Vec<KafkaProducer>,
    /// The retry topic's source and sinks (`retry.topic`), for the retry pipeline.
    retry: Option<RetryEndpoints>,
}

/// Where the retry pipeline reads (the retry topic, in the group `<group>.retry`) and
/// writes (the same topics as the main pipeline, the retry topic included).
struct RetryEndpoints {
    source: Box<dyn Source>,
    sink: Box<dyn Sink>,
    dlq: Box<dyn DeadLetterSink>,
}

fn embedded_endpoints(config: &Config) -> anyhow::Result<Endpoints> {
    let input = config
        .source
        .path
        .clone()
        .context("source.path is required")?;
    let output = config.sink.path.clone().context("sink.path is required")?;
    let dlq_path = config
        .dlq
        .path
        .clone()
        .unwrap_or_else(|| default_dlq_path(&output));
    Ok(Endpoints {
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
/// transactional id of a restart is `<id>.<restart>`, see `Restarts`).
async fn kafka_endpoints(
    config: &Config,
    metrics: &Metrics,
    restart: u32,
) -> anyhow::Result<Endpoints> {
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
    crate::kafka::wait_for_topics(&config.kafka, &topics)
        .await
        .map_err(anyhow::Error::msg)?;
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
            let parked =
                KafkaSource::subscribe(&kafka, topic, metrics.consumer_lag.clone(), transactions)?;
            Some(RetryEndpoints {
                source: Box::new(ParkedSource(Box::new(parked))),
                sink: sink(&producer),
                dlq: dead_letters(&producer),
            })
        }
        None => None,
    };
    Ok(Endpoints {
        partitions: Some(Box::new(source.partitions())),
        source: Box::new(source),
        sink: sink(&producer),
        dlq: dead_letters(&producer),
        dlq_name: format!("topic {dlq}"),
        transactional,
        retry,
    })
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

async fn state_store(
    config: &Config,
    pipeline_name: &str,
    worker: &str,
    metrics: &Metrics,
) -> anyhow::Result<(Arc<dyn StateStore>, Option<Arc<RedisStore>>)> {
    let done_ttl =
        (config.state.done_ttl_secs > 0).then(|| Duration::from_secs(config.state.done_ttl_secs));
    Ok(match redis_target(config) {
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

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let (mut config, summary_json, check_only) = args.into_config()?;
    if check_only {
        // The effective configuration (file and flags merged), for people and for tools;
        // secrets hidden.
        print!("{}", toml::to_string(&config.shown())?);
        eprintln!("weir: configuration is valid ({:?} mode)", config.mode());
        return Ok(());
    }
    config.resolve_secrets()?;
    let plugin_path = config
        .plugin
        .path
        .clone()
        .context("plugin.path is required")?;
    let name = config
        .plugin
        .name
        .clone()
        .unwrap_or_else(|| default_plugin_name(&plugin_path));

    let runtime = Arc::new(Runtime::new(&config.limits)?);
    let plugin_config: Vec<(String, String)> = config.plugin.config.clone().into_iter().collect();
    let metrics = Arc::new(Metrics::new());
    let mut control = match &config.api.addr {
        Some(_) => Some(api_control(&config, runtime.clone()).await?),
        None => None,
    };
    let (plugin, activations) = match &control {
        // With the API, the worker runs the registry's active version of its plugin.
        Some(control) => {
            active_version(control, &plugin_path, &name, plugin_config.clone()).await?
        }
        None => (
            load_plugin(&runtime, &plugin_path, &name, plugin_config.clone())?,
            0,
        ),
    };
    let version = plugin.meta().version;
    let plugin = Arc::new(ActivePlugin::new(plugin));
    if let Some(control) = &mut control {
        control.running = Some(api::Running {
            name: name.clone(),
            started: std::time::Instant::now(),
            active: plugin.clone(),
            config: plugin_config,
            metrics: metrics.clone(),
            applied: tokio::sync::Mutex::new((version, activations)),
            reserve: std::sync::Mutex::new(None),
        });
    }
    let ready = start_http_servers(&config, &metrics, control).await?;

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let pipeline_name = config.pipeline.name.clone().unwrap_or_else(|| name.clone());
    let worker = worker_id();
    let connect = async {
        let endpoints = match config.mode() {
            Mode::Embedded => embedded_endpoints(&config)?,
            Mode::Kafka => kafka_endpoints(&config, &metrics, 0).await?,
        };
        let state = state_store(&config, &pipeline_name, &worker, &metrics).await?;
        anyhow::Ok((endpoints, state))
    };
    let (mut endpoints, (state, redis)) = tokio::select! {
        connected = connect => connected?,
        () = &mut shutdown => return Ok(()),
    };
    let lease_renewal = config
        .state
        .redis_url
        .is_some()
        .then(|| Duration::from_millis(config.state.lease_ttl_ms / 3));
    let dlq_name = endpoints.dlq_name.clone();
    // The source's partitions, for heartbeats; a new source after a restart has its own.
    let partitions = Arc::new(std::sync::Mutex::new(endpoints.partitions.take()));
    let heartbeat = match (redis_target(&config), config.mode()) {
        (Some(redis), Mode::Kafka) => {
            let info = WorkerInfo {
                id: worker.clone(),
                host: worker_host(),
                pipeline: pipeline_name.clone(),
                topic: config.source.topic.clone().unwrap_or_default(),
                partitions: Vec::new(),
                plugin: name.clone(),
                plugin_version: 0,
                plugin_digest: String::new(),
                last_seen_ms: 0,
            };
            let active = plugin.clone();
            let partitions = partitions.clone();
            Some(tokio::spawn(async move {
                // Each beat reports the version running then (it changes with hot swaps).
                let beat = crate::cluster::heartbeat(redis, move || {
                    let running = active.current();
                    let partitions = partitions.lock().unwrap_or_else(PoisonError::into_inner);
                    WorkerInfo {
                        partitions: partitions.as_ref().map(|now| now()).unwrap_or_default(),
                        plugin_version: running.meta().version,
                        plugin_digest: running.meta().digest.clone(),
                        ..info.clone()
                    }
                });
                if let Err(e) = beat.await {
                    tracing::warn!("heartbeats stopped: {e}");
                }
            }))
        }
        _ => None,
    };
    let settings = Settings {
        batch_size: config.pipeline.batch_size,
        id: config
            .pipeline
            .id
            .as_deref()
            .map(IdSpec::parse)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        backoff: Backoff::new(config.retry.clone()),
        bypass_done: false,
        progress: (config.pipeline.progress_secs > 0)
            .then(|| Duration::from_secs(config.pipeline.progress_secs)),
        lease_renewal,
        max_in_flight_batches: config.max_in_flight_batches(),
        park_retryable: config.retry.topic.is_some(),
        crash_guard: crash_guard(&config, &pipeline_name, redis)?,
    };
    let mut restarts = Restarts::default();
    let summary = loop {
        let transactional = std::mem::take(&mut endpoints.transactional);
        let pipeline = Pipeline {
            plugin: plugin.clone(),
            source: endpoints.source,
            sink: endpoints.sink,
            dlq: endpoints.dlq,
            state: state.clone(),
            metrics: metrics.clone(),
            settings: settings.clone(),
        };
        let retry = endpoints.retry.take().map(|retry| Pipeline {
            plugin: plugin.clone(),
            source: retry.source,
            sink: retry.sink,
            dlq: retry.dlq,
            state: state.clone(),
            metrics: metrics.clone(),
            settings: settings.clone(),
        });
        ready.store(true, Ordering::Relaxed);
        let summary = run_pipelines(pipeline, retry, &mut shutdown).await;
        ready.store(false, Ordering::Relaxed);
        let fatal = transactional.iter().find_map(KafkaProducer::fatal_error);
        let (Err(error), Some((code, reason))) = (&summary, fatal) else {
            break summary;
        };
        if code == rdkafka::types::RDKafkaErrorCode::Fenced {
            metrics.transactions.with_label_values(&["fenced"]).inc();
        }
        let Some(restart) = restarts.next() else {
            break summary;
        };
        eprintln!(
            "weir: the transactional producer cannot go on ({reason}), so the batches in flight \
             were not committed ({error}); starting the Kafka clients again (restart {restart}), \
             which read on from the committed offsets"
        );
        drop(transactional);
        endpoints = tokio::select! {
            connected = kafka_endpoints(&config, &metrics, restart) => connected?,
            () = &mut shutdown => break Ok(metrics.summary(Duration::ZERO)),
        };
        *partitions.lock().unwrap_or_else(PoisonError::into_inner) = endpoints.partitions.take();
    };
    if let Some(beat) = heartbeat {
        beat.abort();
        if let Some(redis) = redis_target(&config) {
            let _ = crate::cluster::sign_off(&redis, &pipeline_name, &worker).await;
        }
    }
    let summary = summary?;
    write_summary(&summary, summary_json.as_deref())?;
    if summary.dead_lettered > 0 {
        eprintln!("weir: dead letters are in {dlq_name} (see `weir dlq list`)");
    }
    if config.mode() == Mode::Embedded
        && config.state.redis_url.is_none()
        && summary.deduplicated > 0
        && summary.deduplicated == summary.records_in
    {
        eprintln!(
            "weir: every record was already done according to {}; use another --state directory to process them again",
            config.state.path.display()
        );
    }
    Ok(())
}

async fn test(args: TestArgs) -> anyhow::Result<()> {
    let mut config = Config::default();
    if let Some(ms) = args.deadline_ms {
        config.limits.deadline_ms = ms;
    }
    if let Some(mb) = args.memory_mb {
        config.limits.memory_mb = mb;
    }
    config.plugin.path = Some(args.plugin.clone());
    config.source.path = Some(args.input.clone());
    config.sink.path = Some("-".into());
    config.validate()?;
    let runtime = Runtime::new(&config.limits)?;
    let name = default_plugin_name(&args.plugin);
    let plugin = load_plugin(
        &runtime,
        &args.plugin,
        &name,
        key_values("--plugin-config", &args.plugin_config)?,
    )?;
    let meta = plugin.meta();
    println!(
        "{} ({:?} world, {:.1} MiB, {}) over {}\n",
        args.plugin.display(),
        meta.world,
        meta.size_bytes as f64 / (1024.0 * 1024.0),
        meta.digest,
        args.input.display()
    );
    crate::plugin_test::run(&plugin, &args.input, args.expect.as_deref()).await
}

fn dlq_list(path: &Path, show: usize) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read DLQ {}", path.display()))?;
    let mut by_class: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut unreadable = 0;
    let mut total = 0;
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        total += 1;
        let Ok(letter) = serde_json::from_str::<DeadLetterLine>(line) else {
            unreadable += 1;
            eprintln!(
                "weir: {} line {} is not a DLQ record",
                path.display(),
                n + 1
            );
            continue;
        };
        let get = |k: &str| letter.error.get(k).map(String::as_str).unwrap_or("?");
        let mut value: String = letter.record.value.chars().take(80).collect();
        if letter.record.value_base64 {
            value = format!("(base64) {value}");
        }
        let entry = format!(
            "    {}:{}:{} id={} attempts={} message: {}\n      value: {}",
            get("source"),
            get("partition"),
            get("offset"),
            get("record_id"),
            get("attempts"),
            get("message").chars().take(200).collect::<String>(),
            value
        );
        by_class
            .entry(get("class").to_owned())
            .or_default()
            .push(entry);
    }
    println!("{total} dead letters in {}", path.display());
    for (class, entries) in &by_class {
        println!("  {class}: {}", entries.len());
        for entry in entries.iter().take(show) {
            println!("{entry}");
        }
    }
    if unreadable > 0 {
        println!("  (unreadable lines: {unreadable})");
    }
    Ok(())
}

fn kafka_of(bootstrap: &str) -> crate::config::KafkaConfig {
    crate::config::KafkaConfig {
        bootstrap: Some(bootstrap.to_owned()),
        ..Default::default()
    }
}

async fn dlq_topic_list(bootstrap: &str, topic: &str, show: usize) -> anyhow::Result<()> {
    let letters = crate::dlq_topic::read_all(&kafka_of(bootstrap), topic)
        .await
        .map_err(anyhow::Error::msg)?;
    print!("{}", crate::dlq_topic::render_list(topic, &letters, show));
    Ok(())
}

async fn replay_topic(args: ReplayArgs) -> anyhow::Result<()> {
    let (Some(bootstrap), Some(from), Some(to)) = (&args.kafka, &args.dlq_topic, &args.to_topic)
    else {
        bail!("a topic replay needs --kafka, --dlq-topic and --to-topic");
    };
    if from == to {
        bail!("--to-topic must differ from --dlq-topic ({from})");
    }
    let kafka = kafka_of(bootstrap);
    let letters = crate::dlq_topic::read_all(&kafka, from)
        .await
        .map_err(anyhow::Error::msg)?;
    let done =
        crate::dlq_topic::replay(&kafka, letters, to, args.class.as_deref(), args.max_replays)
            .await
            .map_err(anyhow::Error::msg)?;
    eprintln!(
        "weir: re-published {} dead letters from {from} to {to}; {} were at the replay cap ({}) and stay in {from}; {} were of another class",
        done.published, done.refused, args.max_replays, done.skipped
    );
    Ok(())
}

async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    if args.dlq_topic.is_some() {
        return replay_topic(args).await;
    }
    let (Some(dlq), Some(plugin), Some(output)) =
        (args.dlq.clone(), args.plugin.clone(), args.output.clone())
    else {
        bail!("a file replay needs --dlq, --plugin and --output");
    };
    let new_dlq = args.new_dlq.clone().unwrap_or_else(|| {
        let stem = dlq
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        dlq.with_file_name(format!("{stem}.replay.jsonl"))
    });
    if new_dlq == dlq {
        bail!("--new-dlq must differ from --dlq ({})", dlq.display());
    }
    let config = Config::default();
    let runtime = Runtime::new(&config.limits)?;
    let name = default_plugin_name(&plugin);
    let plugin = Arc::new(ActivePlugin::new(load_plugin(
        &runtime,
        &plugin,
        &name,
        key_values("--plugin-config", &args.plugin_config)?,
    )?));
    let source = DlqFileSource::open(&dlq, args.max_replays)?;
    let refused = source.refused();
    let metrics = Arc::new(Metrics::new());
    let state_dir = args.state.clone().unwrap_or(config.state.path.clone());
    let mut dlq = FileDeadLetters::open(&new_dlq)?;
    let pipeline = Pipeline {
        plugin,
        source: Box::new(source) as Box<dyn Source>,
        sink: Box::new(FileSink::open(
            &output,
            &BTreeMap::new(),
            LineFormat::Value,
        )?),
        dlq: Box::new(FileDeadLetters::open(&new_dlq)?),
        state: Arc::new(EmbeddedStore::open(
            &state_dir,
            &name,
            None,
            config.state.cache_bytes(),
        )?),
        metrics: metrics.clone(),
        settings: Settings {
            batch_size: config.pipeline.batch_size,
            id: None,
            backoff: Backoff::new(config.retry.clone()),
            bypass_done: true,
            progress: None,
            lease_renewal: None,
            max_in_flight_batches: config.max_in_flight_batches(),
            park_retryable: false,
            crash_guard: None,
        },
    };
    let summary = pipeline.run(std::future::pending()).await?;
    metrics.dlq_replayed.inc_by(summary.records_in);
    let refused: Vec<_> = std::mem::take(
        &mut *refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let refused_count = refused.len();
    dlq.send(refused).await?;
    dlq.flush().await?;
    write_summary(&summary, args.summary_json.as_deref())?;
    eprintln!(
        "weir: replayed {} dead letters; {} failed again and {} were at the replay cap ({}): both are in {}",
        summary.records_in,
        summary.dead_lettered,
        refused_count,
        args.max_replays,
        new_dlq.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_and_its_causes_are_each_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let source = crate::source::SourceError {
            what: "cannot open input x".into(),
            source: io,
        };
        let e = anyhow::Error::from(source).context("the run stopped");
        assert_eq!(
            said_once(&e),
            "the run stopped: cannot open input x: no such file"
        );
        assert_eq!(
            format!("{e:#}"),
            "the run stopped: cannot open input x: no such file: no such file",
            "what the chain alone says"
        );
    }
}
