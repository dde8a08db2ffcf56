//! The `weir` command line: argument structs and dispatch only, one file per command, each
//! with an `execute`. The work itself is elsewhere: a worker in [`crate::worker`], the
//! plugin API in [`crate::api`], dead-letter topics in [`crate::kafka`].
//!
//! - `run.rs`: `weir run`, a worker (flags laid over the config file);
//! - `test.rs`: `weir test`, a plugin tried on a sample file;
//! - `dlq.rs`: `weir dlq list|replay`; `cluster.rs`: `weir cluster status`;
//! - `plugin.rs`, `pipeline.rs`: `weir plugin ...` and `weir pipeline status`, through the
//!   API with the HTTP client in `client.rs`.
//!
//! Every user mistake becomes one line naming what is wrong (exit 1), never a panic.

mod client;
mod cluster;
mod dlq;
mod pipeline;
mod plugin;
mod reconcile;
mod run;
mod state;
mod test;

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use crate::metrics::Summary;

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
    Run(Box<run::RunArgs>),
    /// Try a plugin on a sample file: outputs or dead-letter reasons, time and memory per record.
    Test(test::TestArgs),
    /// Inspect or replay a dead-letter file.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Inspect a cluster.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Audit a pipeline against the log: every input id in the output or the DLQ, ids
    /// missing or repeated in the output (files, or topics).
    Reconcile(reconcile::ReconcileArgs),
    /// Read a stateful plugin's keyed state (embedded store).
    #[command(subcommand)]
    State(state::StateCommand),
    /// Upload, list, activate and roll back plugin versions through a worker's API (--api).
    Plugin(plugin::PluginArgs),
    /// A running pipeline, through a worker's API (--api).
    Pipeline(pipeline::PipelineArgs),
    /// Inspect a component read from stdin and print the verdict as JSON: the child process
    /// in which the API validates an upload, so its memory can be capped.
    #[command(hide = true)]
    ValidateUpload,
}

/// Client settings for the Kafka at `bootstrap` (`weir dlq`, `weir reconcile`).
fn kafka_of(bootstrap: &str) -> crate::config::KafkaConfig {
    crate::config::KafkaConfig {
        bootstrap: Some(bootstrap.to_owned()),
        ..Default::default()
    }
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
            Command::Run(args) => args.execute().await,
            Command::Test(args) => args.execute().await,
            Command::Dlq(command) => command.execute().await,
            Command::Cluster(command) => command.execute().await,
            Command::Reconcile(args) => args.execute().await,
            Command::State(command) => command.execute().await,
            Command::Plugin(args) => args.execute().await,
            Command::Pipeline(args) => args.execute().await,
            Command::ValidateUpload => {
                tokio::task::spawn_blocking(crate::api::validate_upload_child).await?
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir: error: {e:#}");
            ExitCode::FAILURE
        }
    }
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

fn write_summary(summary: &Summary, path: Option<&Path>) -> anyhow::Result<()> {
    eprintln!("weir: done: {summary}");
    if let Some(path) = path {
        let json = serde_json::to_vec_pretty(summary)?;
        std::fs::write(path, json)
            .with_context(|| format!("cannot write summary {}", path.display()))?;
    }
    Ok(())
}
