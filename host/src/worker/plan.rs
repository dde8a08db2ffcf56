//! The plan of a worker: the configuration checked and turned into typed values — files or
//! Kafka topics, the embedded store or Redis, the parsed id, durations and byte sizes — so
//! nothing after it parses, converts or unwraps a setting again. The first problem found is
//! named with its field.
//!
//! The plan lives beside the worker, not in `config/`, because it holds types of the layers
//! above the configuration (the record model's [`IdSpec`], the state store's
//! [`RedisTarget`], Kafka's [`KafkaPlan`]), while the configuration tree imports nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{
    ApiConfig, CanaryConfig, Config, ConfigError, LimitsConfig, LineFormat, QuarantineConfig,
    RetryConfig, check_name, invalid, plugin_name_of,
};
use crate::kafka::KafkaPlan;
use crate::record::IdSpec;
use crate::state::RedisTarget;

/// Everything a worker is built from.
#[derive(Debug, Clone)]
pub struct Plan {
    pub plugin: PluginPlan,
    /// The pipeline's name in leases, done marks and heartbeats (`pipeline.name`, else the
    /// plugin's name).
    pub pipeline_name: String,
    pub io: Io,
    pub state: StatePlan,
    pub lifecycle: Lifecycle,
    pub retry: RetryConfig,
    pub limits: LimitsConfig,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: Option<SocketAddr>,
    /// The plugin API, when served.
    pub api: Option<ApiPlan>,
    pub canary: CanaryConfig,
    pub quarantine: QuarantineConfig,
    /// Where traces go, when they are on.
    pub tracing: Option<TracingPlan>,
}

/// Traces sent over OTLP/HTTP.
#[derive(Debug, Clone)]
pub struct TracingPlan {
    /// The receiver's URL of traces (`…/v1/traces`).
    pub endpoint: String,
    pub sample_ratio: f64,
    pub service_name: String,
}

/// The plugin a worker starts with.
#[derive(Debug, Clone)]
pub struct PluginPlan {
    pub path: PathBuf,
    pub name: String,
    /// Handed to its `init`.
    pub config: Vec<(String, String)>,
}

/// Where a worker reads and writes.
#[derive(Debug, Clone)]
pub enum Io {
    /// Embedded mode: JSON-lines files.
    Files(FilesPlan),
    /// Cluster mode: Kafka topics.
    Kafka(KafkaPlan),
}

/// The files of embedded mode.
#[derive(Debug, Clone)]
pub struct FilesPlan {
    /// A file, a directory of `*.jsonl` files, or `-` for stdin.
    pub input: PathBuf,
    pub input_format: LineFormat,
    /// Keep reading the (last) input file as it grows.
    pub follow: bool,
    /// A file, or `-` for stdout.
    pub output: PathBuf,
    pub output_format: LineFormat,
    /// Named destinations: name → file.
    pub destinations: BTreeMap<String, PathBuf>,
    /// The dead-letter file: `dlq.path`, else `<output>.dlq.jsonl` beside the output
    /// (`weir.dlq.jsonl` when the output is stdout).
    pub dlq: PathBuf,
}

/// Done marks and leases.
#[derive(Debug, Clone)]
pub struct StatePlan {
    pub store: Store,
    /// How long a lease outlives a worker that stopped renewing it.
    pub lease_ttl: Duration,
    /// How long a done mark is kept; `None`: forever.
    pub done_ttl: Option<Duration>,
    /// Where crash logs (embedded mode) and the embedded registry are kept.
    pub dir: PathBuf,
}

/// Which state store.
#[derive(Debug, Clone)]
pub enum Store {
    /// The embedded database in `StatePlan::dir`, with this much page cache.
    Embedded { cache_bytes: usize },
    /// Redis, shared by every worker of a cluster.
    Redis(RedisTarget),
}

/// The record lifecycle's settings.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    pub batch_size: usize,
    /// The idempotency key; `None`: the source position.
    pub id: Option<IdSpec>,
    /// How often a progress line is printed; `None`: never.
    pub progress: Option<Duration>,
    pub max_in_flight_batches: usize,
    /// Crashes in the plugin after which a record is dead-lettered; `None`: no guard.
    pub crash_loop_limit: Option<u32>,
}

/// The plugin API.
#[derive(Debug, Clone)]
pub struct ApiPlan {
    pub addr: SocketAddr,
    /// The bearer token of mutating routes (`api.admin_token`); the worker falls back on the
    /// environment.
    pub admin_token: Option<String>,
    pub open_reads: bool,
    pub max_upload_bytes: usize,
    pub compile_timeout: Duration,
    /// The memory cap of the process that validates an upload; `None`: validate inside the
    /// worker.
    pub compile_memory_bytes: Option<u64>,
    /// The embedded registry's directory (a cluster's registry is in its Redis).
    pub registry_dir: PathBuf,
}

impl Plan {
    /// Checks `config` and turns it into a plan. Its secrets are taken as they are: resolve
    /// them first ([`Config::resolve_secrets`]) for a plan to run, not to check.
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        let path = (config.plugin.path.clone())
            .ok_or_else(|| invalid("plugin.path", "is required (or pass --plugin)"))?;
        if let Some(name) = &config.plugin.name {
            check_name("plugin.name", name)?;
        }
        for name in config.sink.destinations.keys() {
            check_name("sink.destinations", name)?;
        }
        let io = match config.kafka.bootstrap.is_some() {
            false => Io::Files(files(&config)?),
            true => Io::Kafka(kafka(&config)?),
        };
        let name = match &config.plugin.name {
            Some(name) => name.clone(),
            None => plugin_name_of(&path),
        };
        check_retry(&config.retry)?;
        check_limits(&config.limits)?;
        check_canary(&config.canary, &config.quarantine)?;
        Ok(Self {
            pipeline_name: (config.pipeline.name.clone()).unwrap_or_else(|| name.clone()),
            lifecycle: lifecycle(&config)?,
            state: state(&config)?,
            metrics_addr: (config.metrics.addr.as_deref())
                .map(|addr| socket_address("metrics.addr", addr, "127.0.0.1:9090"))
                .transpose()?,
            api: api(&config)?,
            tracing: tracing(&config)?,
            plugin: PluginPlan {
                path,
                name,
                config: config.plugin.config.into_iter().collect(),
            },
            io,
            retry: config.retry,
            limits: config.limits,
            canary: config.canary,
            quarantine: config.quarantine,
        }
        .with_changelog())
    }

    /// Exactly-once mode keeps stateful plugins' keyed state in a changelog topic
    /// (`kafka/changelog.rs`), made at start where state can be kept.
    fn with_changelog(mut self) -> Self {
        let topic =
            crate::kafka::changelog::changelog_topic(&self.pipeline_name, &self.plugin.name);
        let keeps = self.keyed_state_refusal().is_none();
        if let Io::Kafka(kafka) = &mut self.io
            && kafka.transactional_id.is_some()
            && keeps
        {
            kafka.changelog = Some(topic);
        }
        self
    }

    /// The Redis of a cluster, when the state is kept there.
    pub fn redis(&self) -> Option<&RedisTarget> {
        match &self.state.store {
            Store::Redis(target) => Some(target),
            Store::Embedded { .. } => None,
        }
    }

    /// Why this worker cannot keep a stateful plugin's keyed state, if it cannot
    /// (docs/state.md).
    pub fn keyed_state_refusal(&self) -> Option<&'static str> {
        if self.redis().is_some_and(RedisTarget::is_cluster) {
            return Some(
                "a Redis Cluster cannot keep it with the done marks in one step (their slots \
                 differ): use one Redis server",
            );
        }
        if self.retry.topic.is_some() {
            return Some(
                "records parked in a retry topic (retry.topic) would run where their \
                 partition's state is not held: leave retry.topic unset, and the records \
                 retry in place",
            );
        }
        None
    }

    /// Which mode, in words.
    pub fn mode(&self) -> &'static str {
        match self.io {
            Io::Files(_) => "embedded",
            Io::Kafka(_) => "cluster",
        }
    }
}

fn files(config: &Config) -> Result<FilesPlan, ConfigError> {
    let input = (config.source.path.clone()).ok_or_else(|| {
        invalid(
            "source.path",
            "is required (or pass --input; or --kafka and --input-topic for cluster mode)",
        )
    })?;
    let output = (config.sink.path.clone())
        .ok_or_else(|| invalid("sink.path", "is required (or pass --output)"))?;
    for (field, set) in [
        ("source.topic", config.source.topic.is_some()),
        ("sink.topic", config.sink.topic.is_some()),
        ("dlq.topic", config.dlq.topic.is_some()),
        ("kafka.group", config.kafka.group.is_some()),
        ("kafka.exactly_once", config.kafka.exactly_once),
        ("retry.topic", config.retry.topic.is_some()),
    ] {
        if set {
            return Err(invalid(
                field,
                "is a cluster-mode setting: pass --kafka <bootstrap> (kafka.bootstrap) too",
            ));
        }
    }
    Ok(FilesPlan {
        dlq: (config.dlq.path.clone()).unwrap_or_else(|| default_dlq_path(&output)),
        input,
        input_format: config.source.format,
        follow: config.source.follow,
        output,
        output_format: config.sink.format,
        destinations: config.sink.destinations.clone(),
    })
}

fn kafka(config: &Config) -> Result<KafkaPlan, ConfigError> {
    let required = |field, value: &Option<String>, flag| match value.as_deref() {
        None => Err(invalid(
            field,
            format!("is required in cluster mode (or pass {flag})"),
        )),
        Some(v) if v.trim().is_empty() => Err(invalid(field, "must not be empty")),
        Some(v) => Ok(v.to_owned()),
    };
    required("kafka.bootstrap", &config.kafka.bootstrap, "--kafka")?;
    required("kafka.group", &config.kafka.group, "--group")?;
    let input = required("source.topic", &config.source.topic, "--input-topic")?;
    let output = required("sink.topic", &config.sink.topic, "--output-topic")?;
    let dlq = required("dlq.topic", &config.dlq.topic, "--dlq-topic")?;
    for (field, set) in [
        ("source.path", config.source.path.is_some()),
        ("sink.path", config.sink.path.is_some()),
        ("dlq.path", config.dlq.path.is_some()),
    ] {
        if set {
            return Err(invalid(
                field,
                "is a file setting, but cluster mode (kafka.bootstrap) reads and writes topics",
            ));
        }
    }
    if input == output || input == dlq {
        return Err(invalid(
            "source.topic",
            "must differ from sink.topic and dlq.topic (a worker would consume its own output)",
        ));
    }
    let transactional_id = match (config.kafka.exactly_once, &config.kafka.transactional_id) {
        (false, _) => None,
        (true, None) => {
            return Err(invalid(
                "kafka.transactional_id",
                "is required in exactly-once mode (or pass --transactional-id): one per \
                 worker slot, the same when that worker is started again",
            ));
        }
        (true, Some(id)) => {
            check_name("kafka.transactional_id", id)?;
            Some(id.clone())
        }
    };
    let retry = config.retry.topic.clone();
    match &retry {
        Some(topic) if [&input, &output, &dlq].contains(&topic) => {
            return Err(invalid(
                "retry.topic",
                "must differ from source.topic, sink.topic and dlq.topic",
            ));
        }
        // Retries do not run inline: nothing holds a batch while they wait.
        Some(_) => {}
        None => check_inline_retries(config)?,
    }
    Ok(KafkaPlan {
        client: config.kafka.clone(),
        input,
        output,
        dlq,
        destinations: (config.sink.destinations.iter())
            .map(|(name, topic)| (name.clone(), topic.display().to_string()))
            .collect(),
        retry,
        transactional_id,
        max_output_bytes: config.limits.max_output_bytes,
        changelog: None,
    })
}

/// Retries run inline: they must end well before the group gives up on this consumer.
fn check_inline_retries(config: &Config) -> Result<(), ConfigError> {
    let max_poll_ms = match config.kafka.options.get("max.poll.interval.ms") {
        Some(v) => v.parse::<u64>().map_err(|_| {
            invalid(
                "kafka.options",
                format!("max.poll.interval.ms `{v}` is not a number of milliseconds"),
            )
        })?,
        None => 300_000,
    };
    if config.retry.max_elapsed_ms.saturating_mul(2) > max_poll_ms {
        return Err(invalid(
            "retry.max_elapsed_ms",
            format!(
                "{} ms is more than half of max.poll.interval.ms ({max_poll_ms} ms): a retried batch \
                 would get this worker thrown out of its consumer group",
                config.retry.max_elapsed_ms
            ),
        ));
    }
    Ok(())
}

fn lifecycle(config: &Config) -> Result<Lifecycle, ConfigError> {
    let p = &config.pipeline;
    let max_in_flight_batches = match p.max_in_flight_batches {
        Some(n) if !(1..=1024).contains(&n) => {
            return Err(invalid(
                "pipeline.max_in_flight_batches",
                format!("must be between 1 and 1024, got {n}"),
            ));
        }
        Some(n) => n,
        // A batch stays in flight until its transaction commits (BENCHMARKS.md).
        None if config.kafka.exactly_once => 128,
        None => 32,
    };
    if p.batch_size == 0 || p.batch_size > 65_536 {
        return Err(invalid(
            "pipeline.batch_size",
            format!("must be between 1 and 65536, got {}", p.batch_size),
        ));
    }
    Ok(Lifecycle {
        batch_size: p.batch_size,
        id: (p.id.as_deref())
            .map(IdSpec::parse)
            .transpose()
            .map_err(|reason| invalid("pipeline.id", reason))?,
        progress: (p.progress_secs > 0).then(|| Duration::from_secs(p.progress_secs)),
        max_in_flight_batches,
        crash_loop_limit: (p.crash_loop_limit > 0).then_some(p.crash_loop_limit),
    })
}

fn check_retry(r: &RetryConfig) -> Result<(), ConfigError> {
    if r.max_attempts == 0 {
        return Err(invalid("retry.max_attempts", "must be at least 1"));
    }
    if r.initial_backoff_ms > r.max_backoff_ms {
        return Err(invalid(
            "retry.initial_backoff_ms",
            format!(
                "{} is more than retry.max_backoff_ms ({})",
                r.initial_backoff_ms, r.max_backoff_ms
            ),
        ));
    }
    Ok(())
}

fn check_limits(l: &LimitsConfig) -> Result<(), ConfigError> {
    if l.deadline_ms == 0 {
        return Err(invalid(
            "limits.deadline_ms",
            "must be more than 0 (the deadline cannot be turned off)",
        ));
    }
    if l.memory_mb == 0 || l.memory_mb > 4096 {
        return Err(invalid(
            "limits.memory_mb",
            format!("must be between 1 and 4096, got {}", l.memory_mb),
        ));
    }
    if l.max_instances == 0 {
        return Err(invalid("limits.max_instances", "must be at least 1"));
    }
    if l.max_calls_per_instance == 0 {
        return Err(invalid(
            "limits.max_calls_per_instance",
            "must be at least 1",
        ));
    }
    Ok(())
}

fn check_canary(canary: &CanaryConfig, quarantine: &QuarantineConfig) -> Result<(), ConfigError> {
    for (field, fraction, meaning) in [
        ("quarantine.fault_rate", quarantine.fault_rate, " (0: off)"),
        ("canary.margin", canary.margin, ""),
    ] {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(invalid(
                field,
                format!("must be a fraction of records from 0 to 1{meaning}, got {fraction}"),
            ));
        }
    }
    Ok(())
}

fn state(config: &Config) -> Result<StatePlan, ConfigError> {
    let s = &config.state;
    if s.lease_ttl_ms < 1_000 {
        return Err(invalid(
            "state.lease_ttl_ms",
            format!("must be at least 1000, got {}", s.lease_ttl_ms),
        ));
    }
    // A URL that is a reference alone is checked once resolved, by the Redis client.
    let is_reference = |url: &str| url.starts_with("${");
    let store = match &s.redis_url {
        Some(urls)
            if crate::config::secrets::url_list(urls).iter().any(|url| {
                !(url.starts_with("redis://") || url.starts_with("rediss://") || is_reference(url))
            }) =>
        {
            return Err(invalid(
                "state.redis_url",
                format!(
                    "`{}` is not a Redis URL like redis://127.0.0.1:6379",
                    crate::config::secrets::redact_url(urls)
                ),
            ));
        }
        Some(url) if s.redis_cluster => Store::Redis(RedisTarget::cluster(
            url.clone(),
            s.redis_cluster_buckets as usize,
        )),
        Some(url) => Store::Redis(RedisTarget::new(url.clone(), s.redis_ca_file.clone())),
        None => Store::Embedded {
            cache_bytes: mib(s.cache_mb),
        },
    };
    if !(1..=1024).contains(&s.redis_cluster_buckets) {
        return Err(invalid(
            "state.redis_cluster_buckets",
            format!("must be 1 to 1024, got {}", s.redis_cluster_buckets),
        ));
    }
    if s.redis_cluster && s.redis_url.is_none() {
        return Err(invalid(
            "state.redis_cluster",
            "needs state.redis_url: one or more nodes of the cluster",
        ));
    }
    if s.redis_cluster && s.redis_ca_file.is_some() {
        return Err(invalid(
            "state.redis_ca_file",
            "is not supported with state.redis_cluster: use a Redis server, or the system's CAs",
        ));
    }
    if s.redis_ca_file.is_some()
        && !(s.redis_url.as_deref())
            .is_some_and(|url| url.starts_with("rediss://") || is_reference(url))
    {
        return Err(invalid(
            "state.redis_ca_file",
            "is only for a TLS Redis: state.redis_url must begin with rediss://",
        ));
    }
    Ok(StatePlan {
        store,
        lease_ttl: Duration::from_millis(s.lease_ttl_ms),
        done_ttl: (s.done_ttl_secs > 0).then(|| Duration::from_secs(s.done_ttl_secs)),
        dir: s.path.clone(),
    })
}

fn api(config: &Config) -> Result<Option<ApiPlan>, ConfigError> {
    let ApiConfig {
        addr,
        allow_non_loopback,
        admin_token,
        open_reads,
        max_upload_mb,
        compile_timeout_secs,
        compile_memory_mb,
        registry_path,
    } = &config.api;
    if *max_upload_mb == 0 || *compile_timeout_secs == 0 {
        return Err(invalid(
            "api",
            "max_upload_mb and compile_timeout_secs must be at least 1",
        ));
    }
    let Some(addr) = addr else {
        return Ok(None);
    };
    let parsed = socket_address("api.addr", addr, "127.0.0.1:8080")?;
    if !parsed.ip().is_loopback() && !allow_non_loopback {
        return Err(invalid(
            "api.addr",
            format!(
                "`{addr}` is not a loopback address; the API has no TLS, so set \
                 api.allow_non_loopback = true to serve it beyond this machine"
            ),
        ));
    }
    Ok(Some(ApiPlan {
        addr: parsed,
        admin_token: admin_token.clone(),
        open_reads: *open_reads,
        max_upload_bytes: mib(*max_upload_mb),
        compile_timeout: Duration::from_secs(*compile_timeout_secs),
        compile_memory_bytes: (*compile_memory_mb > 0)
            .then(|| compile_memory_mb.saturating_mul(1 << 20)),
        registry_dir: (registry_path.clone()).unwrap_or_else(|| config.state.path.join("registry")),
    }))
}

fn socket_address(
    field: &'static str,
    addr: &str,
    example: &str,
) -> Result<SocketAddr, ConfigError> {
    addr.parse().map_err(|e| {
        invalid(
            field,
            format!("`{addr}` is not a socket address like {example} ({e})"),
        )
    })
}

fn tracing(config: &Config) -> Result<Option<TracingPlan>, ConfigError> {
    let tracing = &config.tracing;
    let Some(base) = tracing.otlp_endpoint.as_deref() else {
        return Ok(None);
    };
    let example = "like http://127.0.0.1:4318";
    let Some(rest) = (base.strip_prefix("http://")).or_else(|| base.strip_prefix("https://"))
    else {
        let reason = format!("`{base}` is not an http:// or https:// URL {example}");
        return Err(invalid("tracing.otlp_endpoint", reason));
    };
    if rest.is_empty() || rest.starts_with('/') || rest.contains(char::is_whitespace) {
        let reason = format!("`{base}` names no host: give a URL {example}");
        return Err(invalid("tracing.otlp_endpoint", reason));
    }
    if !(0.0..=1.0).contains(&tracing.sample_ratio) {
        let reason = format!("{} is not between 0 and 1", tracing.sample_ratio);
        return Err(invalid("tracing.sample_ratio", reason));
    }
    if tracing.service_name.is_empty() {
        return Err(invalid("tracing.service_name", "is empty"));
    }
    // As OTEL_EXPORTER_OTLP_ENDPOINT: the base URL, traces at its /v1/traces.
    let endpoint = match base.trim_end_matches('/') {
        full if full.ends_with("/v1/traces") => full.to_owned(),
        base => format!("{base}/v1/traces"),
    };
    Ok(Some(TracingPlan {
        endpoint,
        sample_ratio: tracing.sample_ratio,
        service_name: tracing.service_name.clone(),
    }))
}

/// `mb` MiB in bytes.
fn mib(mb: u64) -> usize {
    usize::try_from(mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> Config {
        let mut c = Config::default();
        c.plugin.path = Some("p.wasm".into());
        c.source.path = Some("in.jsonl".into());
        c.sink.path = Some("out.jsonl".into());
        c
    }

    fn fails(c: &Config) -> String {
        Plan::new(c.clone()).unwrap_err().to_string()
    }

    #[test]
    fn a_minimal_config_is_a_plan_of_files() {
        let plan = Plan::new(minimal()).expect("valid");
        let Io::Files(files) = &plan.io else {
            panic!("files expected")
        };
        assert_eq!(files.dlq, Path::new("out.dlq.jsonl"));
        assert_eq!(plan.pipeline_name, "p");
        assert!(matches!(
            plan.state.store,
            Store::Embedded {
                cache_bytes: 0x400_0000
            }
        ));
        assert_eq!(plan.lifecycle.progress, Some(Duration::from_secs(2)));
    }

    #[test]
    fn the_dead_letters_of_stdout_go_to_a_file_of_their_own() {
        let mut c = minimal();
        c.sink.path = Some("-".into());
        let Io::Files(files) = Plan::new(c).expect("valid").io else {
            panic!("files expected")
        };
        assert_eq!(files.dlq, Path::new("weir.dlq.jsonl"));
    }

    #[test]
    fn zero_batch_size_names_the_field() {
        let mut c = minimal();
        c.pipeline.batch_size = 0;
        let err = fails(&c);
        assert!(err.contains("pipeline.batch_size"), "{err}");
    }

    #[test]
    fn the_id_is_parsed_once_and_a_bad_one_names_the_field() {
        let mut c = minimal();
        c.pipeline.id = Some("/id".into());
        assert!(Plan::new(c.clone()).expect("valid").lifecycle.id.is_some());
        c.pipeline.id = Some("id".into());
        let err = fails(&c);
        assert!(err.contains("pipeline.id"), "{err}");
    }

    fn cluster() -> Config {
        let mut c = Config::default();
        c.plugin.path = Some("p.wasm".into());
        c.kafka.bootstrap = Some("127.0.0.1:9092".into());
        c.kafka.group = Some("g".into());
        c.source.topic = Some("in".into());
        c.sink.topic = Some("out".into());
        c.dlq.topic = Some("dlq".into());
        c
    }

    #[test]
    fn exactly_once_keeps_more_batches_in_flight_unless_told() {
        let in_flight = |c: &Config| {
            let plan = Plan::new(c.clone()).expect("valid");
            plan.lifecycle.max_in_flight_batches
        };
        let mut c = cluster();
        assert_eq!(in_flight(&c), 32);
        c.kafka.exactly_once = true;
        c.kafka.transactional_id = Some("slot-1".into());
        assert_eq!(in_flight(&c), 128);
        c.pipeline.max_in_flight_batches = Some(8);
        assert_eq!(in_flight(&c), 8);
        c.pipeline.max_in_flight_batches = Some(0);
        let err = fails(&c);
        assert!(err.contains("pipeline.max_in_flight_batches"), "{err}");
    }

    #[test]
    fn exactly_once_needs_a_valid_transactional_id() {
        let mut c = cluster();
        c.kafka.exactly_once = true;
        let err = fails(&c);
        assert!(err.contains("kafka.transactional_id"), "{err}");
        c.kafka.transactional_id = Some("slot 1".into());
        let err = fails(&c);
        assert!(err.contains("kafka.transactional_id"), "{err}");
        c.kafka.transactional_id = Some("enrich-1".into());
        let Io::Kafka(kafka) = Plan::new(c).expect("valid").io else {
            panic!("kafka expected")
        };
        assert_eq!(kafka.transactional_id.as_deref(), Some("enrich-1"));
        let mut embedded = minimal();
        embedded.kafka.exactly_once = true;
        let err = fails(&embedded);
        assert!(err.contains("kafka.exactly_once"), "{err}");
    }

    #[test]
    fn a_retry_topic_is_a_topic_of_its_own_in_cluster_mode() {
        let mut c = cluster();
        c.retry.topic = Some("in".into());
        let err = fails(&c);
        assert!(
            err.contains("retry.topic") && err.contains("differ"),
            "{err}"
        );
        c.retry.topic = Some("in-retry".into());
        // Retries do not run inline: their budget may pass max.poll.interval.ms.
        c.retry.max_elapsed_ms = 3_600_000;
        Plan::new(c).expect("valid");
        let mut embedded = minimal();
        embedded.retry.topic = Some("in-retry".into());
        let err = fails(&embedded);
        assert!(err.contains("retry.topic"), "{err}");
    }

    #[test]
    fn a_cluster_config_is_a_plan_of_topics_and_redis() {
        let mut c = cluster();
        c.state.redis_url = Some("redis://127.0.0.1:6379".into());
        let plan = Plan::new(c).expect("valid");
        assert_eq!(plan.mode(), "cluster");
        assert!(plan.redis().is_some());
    }

    #[test]
    fn a_redis_cluster_is_seeds_and_a_bucket_count() {
        let mut c = cluster();
        c.state.redis_url = Some("redis://a:7000,redis://:pw@b:7000".into());
        c.state.redis_cluster = true;
        c.state.redis_cluster_buckets = 6;
        let plan = Plan::new(c.clone()).expect("valid");
        let redis = plan.redis().expect("redis");
        assert!(redis.is_cluster());
        assert_eq!(redis.buckets(), 6);
        assert_eq!(
            redis.to_string(),
            "the Redis Cluster of redis://a:7000,redis://:***@b:7000"
        );
        c.state.redis_cluster_buckets = 0;
        assert!(
            fails(&c).contains("state.redis_cluster_buckets"),
            "{}",
            fails(&c)
        );
        c.state.redis_cluster_buckets = 16;
        c.state.redis_url = Some("http://a:7000,redis://b:7000".into());
        assert!(fails(&c).contains("not a Redis URL"), "{}", fails(&c));
        c.state.redis_url = None;
        assert!(fails(&c).contains("state.redis_cluster"), "{}", fails(&c));
    }

    #[test]
    fn cluster_mode_names_the_missing_flag() {
        let mut c = cluster();
        c.dlq.topic = None;
        let err = fails(&c);
        assert!(
            err.contains("dlq.topic") && err.contains("--dlq-topic"),
            "{err}"
        );
    }

    #[test]
    fn topic_without_kafka_is_refused() {
        let mut c = minimal();
        c.source.topic = Some("in".into());
        let err = fails(&c);
        assert!(
            err.contains("source.topic") && err.contains("--kafka"),
            "{err}"
        );
    }

    #[test]
    fn traces_go_to_the_endpoints_v1_traces_and_a_bad_setting_is_named() {
        let mut c = minimal();
        assert!(Plan::new(c.clone()).expect("valid").tracing.is_none());
        let endpoint = |c: &Config| Plan::new(c.clone()).expect("valid").tracing.expect("on");
        for (given, used) in [
            ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
            (
                "https://otel.example:4318/",
                "https://otel.example:4318/v1/traces",
            ),
            ("http://c:4318/v1/traces", "http://c:4318/v1/traces"),
        ] {
            c.tracing.otlp_endpoint = Some(given.into());
            assert_eq!(endpoint(&c).endpoint, used);
        }
        for bad in ["127.0.0.1:4318", "http://", "grpc://c:4317"] {
            c.tracing.otlp_endpoint = Some(bad.into());
            let err = fails(&c);
            assert!(
                err.contains("tracing.otlp_endpoint") && err.contains(bad),
                "{err}"
            );
        }
        c.tracing.otlp_endpoint = Some("http://c:4318".into());
        c.tracing.sample_ratio = 1.5;
        assert!(fails(&c).contains("tracing.sample_ratio"), "{}", fails(&c));
    }

    #[test]
    fn retries_must_fit_in_the_poll_interval() {
        let mut c = cluster();
        c.kafka
            .options
            .insert("max.poll.interval.ms".into(), "20000".into());
        let err = fails(&c);
        assert!(err.contains("retry.max_elapsed_ms"), "{err}");
        c.retry.max_elapsed_ms = 5_000;
        Plan::new(c).expect("valid");
    }

    #[test]
    fn missing_plugin_names_the_flag() {
        let mut c = minimal();
        c.plugin.path = None;
        let err = fails(&c);
        assert!(
            err.contains("plugin.path") && err.contains("--plugin"),
            "{err}"
        );
    }

    #[test]
    fn addresses_are_parsed_and_the_api_stays_on_loopback() {
        let mut c = minimal();
        c.metrics.addr = Some("127.0.0.1:9090".into());
        c.api.addr = Some("0.0.0.0:8080".into());
        let err = fails(&c);
        assert!(
            err.contains("api.addr") && err.contains("loopback"),
            "{err}"
        );
        c.api.addr = Some("127.0.0.1:8080".into());
        let plan = Plan::new(c.clone()).expect("valid");
        let api = plan.api.expect("api");
        assert_eq!(api.registry_dir, Path::new(".weir/state/registry"));
        assert_eq!(api.max_upload_bytes, 64 << 20);
        c.metrics.addr = Some("localhost".into());
        let err = fails(&c);
        assert!(err.contains("metrics.addr"), "{err}");
    }
}
