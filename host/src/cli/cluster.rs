//! `weir cluster status`: the live workers of a cluster, from their heartbeats in Redis.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use crate::state::RedisTarget;

#[derive(Subcommand)]
pub(super) enum ClusterCommand {
    /// List the live workers (those that sent a heartbeat in the last 10 s).
    Status {
        /// The Redis the workers use (`rediss://` for TLS; `user:password@` for AUTH).
        #[arg(long, value_name = "URL")]
        redis: String,
        /// `--redis` names nodes of a Redis Cluster (comma-separated).
        #[arg(long)]
        redis_cluster: bool,
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

impl ClusterCommand {
    pub async fn execute(self) -> anyhow::Result<()> {
        let ClusterCommand::Status {
            redis,
            redis_cluster,
            redis_ca_file,
            pipeline,
            json,
        } = self;
        let url = crate::config::secrets::resolve_in_url("--redis", &redis)?;
        let redis = if redis_cluster {
            RedisTarget::cluster(url, 1)
        } else {
            RedisTarget::new(url, redis_ca_file)
        };
        cluster_status(&redis, pipeline.as_deref(), json).await
    }
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
