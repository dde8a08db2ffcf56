//! `weir state dump|get`: a stateful plugin's keyed state, read-only, from the embedded
//! store, from a cluster's Redis (`--redis`), or from a changelog topic (`--kafka`). One
//! JSON object per key: `{"partition":P,"key":K,"value":V}`, key and value as
//! UTF-8 text when they are, else (or with `--base64`) as base64 with `"key_base64":true` /
//! `"value_base64":true` beside them (as in dead letters).

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};

use crate::config::KafkaConfig;
use crate::kafka::changelog::{changelog_topic, read_changelog_state};
use crate::state::{RedisTarget, read_keyed_state, read_redis_keyed_state};

#[derive(Subcommand)]
pub(super) enum StateCommand {
    /// Print every key of a plugin's state.
    Dump(Scope),
    /// Print the given keys (those that are set).
    Get {
        #[command(flatten)]
        scope: Scope,
        /// The keys, as UTF-8 text.
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

/// Whose state, where.
#[derive(Args)]
pub(super) struct Scope {
    /// The plugin's name (`--plugin-name` of its run; by default its file name without `.wasm`).
    #[arg(long = "plugin-name")]
    plugin: String,
    /// The pipeline's name [default: the plugin's name].
    #[arg(long)]
    pipeline: Option<String>,
    /// The state directory of the run.
    #[arg(long, default_value = ".weir/state", conflicts_with_all = ["redis", "kafka"])]
    state: PathBuf,
    /// Read the state of a cluster from its Redis instead (`rediss://` for TLS;
    /// `user:password@` for AUTH).
    #[arg(long)]
    redis: Option<String>,
    /// The CA certificate (PEM) a `rediss://` server's certificate must chain to.
    #[arg(long, requires = "redis")]
    redis_ca_file: Option<PathBuf>,
    /// Read the state from its changelog topic on these Kafka brokers instead (what
    /// committed transactions wrote).
    #[arg(long, conflicts_with = "redis")]
    kafka: Option<String>,
    /// The changelog topic [default: weir-<pipeline>-<plugin name>-changelog].
    #[arg(long, requires = "kafka")]
    changelog_topic: Option<String>,
    /// A librdkafka property for `--kafka` (`key=value`; repeatable), e.g. for TLS or SASL.
    #[arg(long = "kafka-option", value_name = "KEY=VALUE", requires = "kafka")]
    kafka_options: Vec<String>,
    /// Only this partition.
    #[arg(long)]
    partition: Option<i32>,
    /// Keys and values always as base64.
    #[arg(long)]
    base64: bool,
}

impl StateCommand {
    pub async fn execute(self) -> anyhow::Result<()> {
        let (scope, keys) = match self {
            StateCommand::Dump(scope) => (scope, None),
            StateCommand::Get { scope, keys } => (scope, Some(keys)),
        };
        let pipeline = scope.pipeline.as_deref().unwrap_or(&scope.plugin);
        let entries = match &scope.redis {
            Some(url) => {
                let url = crate::config::secrets::resolve_in_url("--redis", url)?;
                let target = RedisTarget::new(url, scope.redis_ca_file.clone());
                read_redis_keyed_state(&target, pipeline, &scope.plugin).await?
            }
            None => match &scope.kafka {
                Some(bootstrap) => {
                    let kafka = KafkaConfig {
                        bootstrap: Some(bootstrap.clone()),
                        options: super::key_values("--kafka-option", &scope.kafka_options)?
                            .into_iter()
                            .collect(),
                        ..KafkaConfig::default()
                    };
                    let topic = (scope.changelog_topic.clone())
                        .unwrap_or_else(|| changelog_topic(pipeline, &scope.plugin));
                    tokio::task::spawn_blocking(move || read_changelog_state(&kafka, &topic))
                        .await??
                }
                None => read_keyed_state(&scope.state, pipeline, &scope.plugin)?,
            },
        };
        let mut shown = 0usize;
        for entry in entries {
            if scope.partition.is_some_and(|p| p != entry.partition) {
                continue;
            }
            if keys
                .as_ref()
                .is_some_and(|keys| !keys.iter().any(|k| k.as_bytes() == entry.key))
            {
                continue;
            }
            println!("{}", entry.json_line(scope.base64));
            shown += 1;
        }
        if keys.is_some() && shown == 0 {
            bail!("none of those keys is set");
        }
        Ok(())
    }
}
