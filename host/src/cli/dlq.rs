//! `weir dlq list|replay`: dead letters in a file or a topic, counted by class, and fed
//! through a (fixed) plugin again (a file) or re-published to the input topic (a topic).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use super::{kafka_of, key_values, write_summary};
use crate::record::DeadLetterLine;
use crate::worker::{Replay, ReplayReport};

#[derive(Subcommand)]
pub(super) enum DlqCommand {
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
pub(super) struct ReplayArgs {
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

impl DlqCommand {
    pub async fn execute(self) -> anyhow::Result<()> {
        match self {
            DlqCommand::List {
                dlq,
                kafka,
                dlq_topic,
                show,
            } => match (dlq, kafka, dlq_topic) {
                (_, Some(kafka), Some(topic)) => list_topic(&kafka, &topic, show).await,
                (Some(dlq), _, _) => list_file(&dlq, show),
                _ => bail!("pass --dlq <file>, or --kafka and --dlq-topic"),
            },
            DlqCommand::Replay(args) if args.dlq_topic.is_some() => replay_topic(args).await,
            DlqCommand::Replay(args) => replay_file(args).await,
        }
    }
}

/// Counts a DLQ file's dead letters by class and shows the first of each.
fn list_file(path: &Path, show: usize) -> anyhow::Result<()> {
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
        let headers: Vec<(String, Vec<u8>)> = (letter.record.headers.iter())
            .map(|h| (h.name.clone(), h.value.clone().into_bytes()))
            .collect();
        let trace = crate::traces::trace_id(&headers)
            .map(|id| format!(" trace={id}"))
            .unwrap_or_default();
        let entry = format!(
            "    {}:{}:{} id={} attempts={}{trace} message: {}\n      value: {}",
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

async fn list_topic(bootstrap: &str, topic: &str, show: usize) -> anyhow::Result<()> {
    let letters = crate::kafka::read_topic(&kafka_of(bootstrap), topic).await?;
    print!(
        "{}",
        crate::kafka::dlq_topic::render_list(topic, &letters, show)
    );
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
    let letters = crate::kafka::read_topic(&kafka, from).await?;
    let done = crate::kafka::dlq_topic::replay(
        &kafka,
        letters,
        to,
        args.class.as_deref(),
        args.max_replays,
    )
    .await?;
    eprintln!(
        "weir: re-published {} dead letters from {from} to {to}; {} were at the replay cap ({}) and stay in {from}; {} were of another class",
        done.published, done.refused, args.max_replays, done.skipped
    );
    Ok(())
}

async fn replay_file(args: ReplayArgs) -> anyhow::Result<()> {
    let (Some(dlq), Some(plugin), Some(output)) = (args.dlq, args.plugin, args.output) else {
        bail!("a file replay needs --dlq, --plugin and --output");
    };
    let new_dlq = args.new_dlq.unwrap_or_else(|| {
        let stem = dlq
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        dlq.with_file_name(format!("{stem}.replay.jsonl"))
    });
    if new_dlq == dlq {
        bail!("--new-dlq must differ from --dlq ({})", dlq.display());
    }
    let replay = Replay {
        dlq,
        plugin,
        plugin_config: key_values("--plugin-config", &args.plugin_config)?,
        output,
        new_dlq: new_dlq.clone(),
        state: args.state,
        max_replays: args.max_replays,
    };
    let ReplayReport { summary, at_cap } = replay.run().await?;
    write_summary(&summary, args.summary_json.as_deref())?;
    eprintln!(
        "weir: replayed {} dead letters; {} failed again and {} were at the replay cap ({}): both are in {}",
        summary.records_in,
        summary.dead_lettered,
        at_cap,
        args.max_replays,
        new_dlq.display()
    );
    Ok(())
}
