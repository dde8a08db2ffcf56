//! `weir test`: for plugin authors. Runs a plugin over a sample file through the real runtime
//! (the same limits and fault isolation as `weir run`), one record per call, and shows what
//! became of each record — outputs, or the dead-letter class and reason — with its time and
//! the plugin's peak memory. With an expectations file it prints a readable diff and fails
//! when anything differs.
//!
//! Expectations are JSON lines, line *n* for input line *n* (the format of
//! `tests/vectors/*/expected.jsonl`): `{"output": <json>}`, `{"outputs": [<json>, ...]}`,
//! `{"dead_letter": {"class": "invalid", "reason_contains": "user_id"}}`, or an empty line
//! for a blank input line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;
use serde_json::Value;

use super::key_values;
use crate::config::{Config, LineFormat};
use crate::runtime::{CallContext, Outcome, Plugin, Runtime};
use crate::source::{FileSource, Source};
use crate::state::keyed::{KeyedEntry, KeyedRead, MemoryState};
use crate::worker::Plan;

#[derive(Args)]
pub(super) struct TestArgs {
    /// The plugin component (.wasm).
    plugin: PathBuf,
    /// JSON-lines sample: one record value per line.
    #[arg(long)]
    input: PathBuf,
    /// Expectations, line n for input line n: {"output": ...}, {"outputs": [...]} or
    /// {"dead_letter": {"class": ..., "reason_contains": ...}}. Exit 1 on any difference.
    #[arg(long)]
    expect: Option<PathBuf>,
    /// A stateful plugin's expected state after the run, JSON lines
    /// {"partition": P, "key": K, "value": V} as `weir state dump` prints them (partition 0
    /// when left out). Exit 1 on any difference.
    #[arg(long)]
    expect_state: Option<PathBuf>,
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

impl TestArgs {
    pub async fn execute(self) -> anyhow::Result<()> {
        let args = self;
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
        let plan = Plan::new(config)?;
        let runtime = Runtime::new(&plan.limits)?;
        let config = key_values("--plugin-config", &args.plugin_config)?;
        let plugin = Plugin::load_file(&runtime, &args.plugin, &plan.plugin.name, 1, config)
            .with_context(|| format!("plugin {}", args.plugin.display()))?;
        let meta = plugin.meta();
        println!(
            "{} ({:?} world{}, {:.1} MiB, {}) over {}\n",
            args.plugin.display(),
            meta.world,
            if meta.stateful { ", stateful" } else { "" },
            meta.size_bytes as f64 / (1024.0 * 1024.0),
            meta.digest,
            args.input.display()
        );
        let state = run(&plugin, &args.input, args.expect.as_deref()).await?;
        if meta.stateful {
            let entries = state.entries()?;
            println!("\nstate after the run ({} keys):", entries.len());
            for entry in &entries {
                println!("  {}", entry.json_line(false));
            }
        }
        if let Some(want) = &args.expect_state {
            let differences = state_differences(want, &state.entries()?)?;
            if !differences.is_empty() {
                println!(
                    "\n{} difference(s) from {}:",
                    differences.len(),
                    want.display()
                );
                for d in &differences {
                    println!("  {d}");
                }
                bail!("the state differs from {}", want.display());
            }
            println!("the state matches {}", want.display());
        }
        Ok(())
    }
}

/// What an expectations line says.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expectation {
    output: Option<Value>,
    outputs: Option<Vec<Value>>,
    dead_letter: Option<ExpectedDeadLetter>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectedDeadLetter {
    class: String,
    reason_contains: Option<String>,
}

/// What became of one record.
enum Seen {
    Outputs(Vec<Vec<u8>>),
    Failed { class: String, reason: String },
}

fn canonical(value: &Value) -> String {
    serde_json_canonicalizer::to_string(value).unwrap_or_else(|_| value.to_string())
}

/// An output as canonical JSON when it is JSON, else as (lossy) text.
fn show(bytes: &[u8]) -> String {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => canonical(&v),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

fn read_expectations(path: &Path) -> anyhow::Result<Vec<Option<Expectation>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read expectations {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            if line.trim().is_empty() {
                return Ok(None);
            }
            let e: Expectation = serde_json::from_str(line).with_context(|| {
                format!("{} line {}: not an expectation", path.display(), i + 1)
            })?;
            if [
                e.output.is_some(),
                e.outputs.is_some(),
                e.dead_letter.is_some(),
            ]
            .iter()
            .filter(|x| **x)
            .count()
                != 1
            {
                bail!(
                    "{} line {}: say exactly one of `output`, `outputs`, `dead_letter`",
                    path.display(),
                    i + 1
                );
            }
            Ok(Some(e))
        })
        .collect()
}

/// Describes the difference between what was expected and what was seen, if any.
fn differs(expected: Option<&Expectation>, seen: &Seen) -> Option<String> {
    let Some(expected) = expected else {
        return Some("no expectation for this line".into());
    };
    let shown = |seen: &Seen| match seen {
        Seen::Outputs(outs) if outs.is_empty() => "no output".to_owned(),
        Seen::Outputs(outs) => outs
            .iter()
            .map(|o| format!("output {}", show(o)))
            .collect::<Vec<_>>()
            .join("\n      "),
        Seen::Failed { class, reason } => format!("dead letter {class}: {reason}"),
    };
    if let Some(want) = &expected.dead_letter {
        let ok = matches!(seen, Seen::Failed { class, reason }
            if *class == want.class && want.reason_contains.as_ref().is_none_or(|r| reason.contains(r.as_str())));
        let reason = want
            .reason_contains
            .as_deref()
            .map(|r| format!(" with a reason containing `{r}`"))
            .unwrap_or_default();
        return (!ok).then(|| {
            format!(
                "expected dead letter {}{reason}\n    got {}",
                want.class,
                shown(seen)
            )
        });
    }
    let want: Vec<&Value> = match (&expected.output, &expected.outputs) {
        (Some(one), _) => vec![one],
        (None, Some(many)) => many.iter().collect(),
        (None, None) => Vec::new(),
    };
    let ok = match seen {
        Seen::Outputs(outs) => {
            outs.len() == want.len()
                && outs
                    .iter()
                    .zip(&want)
                    .all(|(got, want)| show(got) == canonical(want))
        }
        Seen::Failed { .. } => false,
    };
    let want_text: Vec<String> = want
        .iter()
        .map(|w| format!("output {}", canonical(w)))
        .collect();
    (!ok).then(|| {
        format!(
            "expected {}\n    got {}",
            want_text.join("\n      "),
            shown(seen)
        )
    })
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Runs the test; `Err` when a record differs from its expectation (or on bad input).
impl From<Outcome> for Seen {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Outputs { outputs, .. } => {
                Seen::Outputs(outputs.into_iter().map(|o| o.value).collect())
            }
            Outcome::Retryable(reason) => Seen::Failed {
                class: "retryable".into(),
                reason,
            },
            Outcome::Failed(f) => Seen::Failed {
                class: f.class.as_str().into(),
                reason: f.message,
            },
        }
    }
}

impl Seen {
    /// One line for the record at `line` (outputs on the lines after it).
    fn print(&self, line: i64, took: Duration, memory: usize) {
        let stats = format!(
            "{:>9.1} µs {:>7.1} MiB",
            took.as_secs_f64() * 1e6,
            mib(memory)
        );
        match self {
            Seen::Outputs(outs) => {
                println!("line {line:<5} ok        {stats}  {} output(s)", outs.len());
                for out in outs {
                    let text: String = show(out).chars().take(300).collect();
                    println!("      → {text}");
                }
            }
            Seen::Failed { class, reason } => {
                println!("line {line:<5} {class:<9} {stats}  {reason}");
            }
        }
    }
}

/// The differences between the expected state in `want` (JSON lines) and `got`.
fn state_differences(want: &Path, got: &[KeyedEntry]) -> anyhow::Result<Vec<String>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        #[serde(default)]
        partition: i32,
        key: String,
        value: String,
    }
    let text =
        std::fs::read_to_string(want).with_context(|| format!("cannot read {}", want.display()))?;
    let mut expected = BTreeMap::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let e: Entry = serde_json::from_str(line)
            .with_context(|| format!("{} line {}", want.display(), n + 1))?;
        expected.insert((e.partition, e.key.into_bytes()), e.value.into_bytes());
    }
    let actual: BTreeMap<(i32, Vec<u8>), Vec<u8>> = (got.iter())
        .map(|e| ((e.partition, e.key.clone()), e.value.clone()))
        .collect();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let mut differences = Vec::new();
    for ((partition, key), value) in &expected {
        match actual.get(&(*partition, key.clone())) {
            Some(v) if v == value => {}
            Some(v) => differences.push(format!(
                "partition {partition} key {:?}: expected {:?}, got {:?}",
                text(key),
                text(value),
                text(v)
            )),
            None => differences.push(format!(
                "partition {partition} key {:?}: expected {:?}, not set",
                text(key),
                text(value)
            )),
        }
    }
    for ((partition, key), value) in &actual {
        if !expected.contains_key(&(*partition, key.clone())) {
            differences.push(format!(
                "partition {partition} key {:?}: not expected, set to {:?}",
                text(key),
                text(value)
            ));
        }
    }
    Ok(differences)
}

/// Runs the sample through the plugin; returns the state it left (a stateful plugin's).
async fn run(
    plugin: &Plugin,
    input: &Path,
    expect: Option<&Path>,
) -> anyhow::Result<Arc<MemoryState>> {
    let expectations = expect.map(read_expectations).transpose()?;
    // A stateful plugin's state lives for the whole test, from nothing.
    let state = Arc::new(MemoryState::default());
    let ctx = CallContext {
        state: Some(state.clone()),
        ..CallContext::default()
    };
    let mut source = FileSource::open(input, LineFormat::Value)?;
    let (mut count, mut ok, mut failed, mut mismatches) = (0usize, 0usize, 0usize, Vec::new());
    let (mut total_time, mut peak) = (Duration::ZERO, 0usize);
    while let Some(batch) = source.next_batch(256).await? {
        for incoming in batch.records {
            let record = incoming.record;
            let line = record.source.offset;
            plugin.take_peak_memory();
            let started = Instant::now();
            let mut outcome = tokio::task::block_in_place(|| {
                plugin.transform(std::slice::from_ref(&record), &ctx)
            })?
            .pop()
            .context("the runtime returned no outcome")?;
            if let Outcome::Outputs { writes, .. } = &mut outcome {
                state.apply(std::mem::take(writes));
            }
            let took = started.elapsed();
            let memory = plugin.take_peak_memory();
            total_time += took;
            peak = peak.max(memory);
            count += 1;
            let seen = Seen::from(outcome);
            seen.print(line, took, memory);
            match &seen {
                Seen::Outputs(_) => ok += 1,
                Seen::Failed { .. } => failed += 1,
            }
            if let Some(expectations) = &expectations {
                let expected = usize::try_from(line - 1)
                    .ok()
                    .and_then(|i| expectations.get(i))
                    .and_then(Option::as_ref);
                if let Some(diff) = differs(expected, &seen) {
                    mismatches.push(format!("line {line}: {diff}"));
                }
            }
        }
    }
    let mean = if count > 0 {
        total_time.as_secs_f64() * 1e6 / count as f64
    } else {
        0.0
    };
    println!(
        "\n{count} records: {ok} ok, {failed} dead-lettered | {mean:.1} µs/record | peak memory {:.1} MiB",
        mib(peak)
    );
    if let (Some(expect), Some(expectations)) = (expect, &expectations) {
        let expected_records = expectations.iter().filter(|e| e.is_some()).count();
        if expected_records != count {
            mismatches.push(format!(
                "{} expects {expected_records} records, the input has {count}",
                expect.display()
            ));
        }
        if !mismatches.is_empty() {
            println!(
                "\n{} difference(s) from {}:",
                mismatches.len(),
                expect.display()
            );
            for m in &mismatches {
                println!("  {m}");
            }
            bail!(
                "{} of {count} records differ from {}",
                mismatches.len(),
                expect.display()
            );
        }
        println!("every record matches {}", expect.display());
    }
    Ok(state)
}
