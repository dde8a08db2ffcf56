//! `weir reconcile`: audits a pipeline against the log itself. It reads the input (a file or
//! a topic, optionally a range of offsets or of record times), the output and the DLQ, and
//! matches them by record id: every input id must be in the output or the DLQ (a repeated
//! input id is accounted for by its first record: deduplicated). It prints every id missing
//! and every id the output holds more than once (up to `--show`, then a count), the input's
//! offsets per partition, and a summary line; it fails when an id is missing. With
//! `--replay-missing` (topics) it re-publishes the missing input records to the input topic
//! by the DLQ replay's rules (`weir.replay.count` raised, up to `--max-replays`).
//!
//! Ids: an input record's as the workers compute them (`--id`, else its source position); an
//! output's from its `weir.record-id` header (Kafka, or a file written as envelopes), else
//! `--id` applied to the output; a dead letter's from its error's `record_id`. A replayed
//! record's id (`<id>#replay<n>`) counts for `<id>`.
//!
//! A plugin that emits nothing for some records (a filter) leaves those ids out of the
//! output: they show as missing here, though processed (the metrics count them).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;

use super::kafka_of;
use super::run::Format;
use crate::config::LineFormat;
use crate::kafka::TopicRecord;
use crate::record::headers;
use crate::record::{DeadLetterLine, IdSpec, Record, SourceMeta, record_id};
use crate::source::{FileSource, Source};

#[derive(Args)]
pub(super) struct ReconcileArgs {
    /// The input file (files).
    #[arg(
        long,
        required_unless_present = "input_topic",
        conflicts_with = "input_topic"
    )]
    input: Option<PathBuf>,
    /// The output file (files).
    #[arg(long, required_unless_present = "output_topic")]
    output: Option<PathBuf>,
    /// The dead-letter file (files).
    #[arg(long, required_unless_present = "dlq_topic")]
    dlq: Option<PathBuf>,
    /// How input and output files are written: value (one value per line) or envelope.
    #[arg(long, value_enum, default_value = "value")]
    format: Format,
    /// Kafka bootstrap servers (topics).
    #[arg(long, value_name = "BOOTSTRAP", requires_all = ["input_topic", "output_topic", "dlq_topic"])]
    kafka: Option<String>,
    /// The input topic.
    #[arg(long, requires = "kafka")]
    input_topic: Option<String>,
    /// The output topic.
    #[arg(long, requires = "kafka")]
    output_topic: Option<String>,
    /// The DLQ topic.
    #[arg(long, requires = "kafka")]
    dlq_topic: Option<String>,
    /// Where a record's id is, as the workers were told (`/id`, `header:<name>`, `key`);
    /// without it, ids are source positions.
    #[arg(long)]
    id: Option<String>,
    /// Only input records at or after this offset (in every partition; a file's line number).
    #[arg(long)]
    from_offset: Option<i64>,
    /// Only input records before this offset.
    #[arg(long)]
    to_offset: Option<i64>,
    /// Only input records with a timestamp at or after this (ms since the epoch).
    #[arg(long)]
    since_ms: Option<i64>,
    /// Only input records with a timestamp before this (ms since the epoch).
    #[arg(long)]
    until_ms: Option<i64>,
    /// Ids printed per list (missing, duplicated); the rest are counted.
    #[arg(long, default_value_t = 20)]
    show: usize,
    /// Re-publish the missing input records to the input topic (topics only).
    #[arg(long, requires = "kafka")]
    replay_missing: bool,
    /// With --replay-missing: a record replayed this often already is not published again.
    #[arg(long, default_value_t = 3)]
    max_replays: u32,
}

/// An input record, by where it is.
struct Input {
    id: String,
    partition: i32,
    offset: i64,
    timestamp_ms: Option<i64>,
    /// Kept to re-publish it (topics).
    record: Option<TopicRecord>,
}

/// What the log says of a pipeline's records.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Audit {
    pub inputs: u64,
    pub distinct: u64,
    pub output: u64,
    pub dead_lettered: u64,
    pub deduplicated: u64,
    /// Input ids in neither the output nor the DLQ, in input order, with partition and offset.
    pub missing: Vec<(String, i32, i64)>,
    /// Ids the output holds more than once, with how often.
    pub duplicated: Vec<(String, u64)>,
    /// Per partition: the first and last input offset, and the records.
    pub partitions: BTreeMap<i32, (i64, i64, u64)>,
}

/// The id a replayed record's id (`<id>#replay<n>`) stands for.
fn original(id: &str) -> &str {
    match id.rsplit_once("#replay") {
        Some((original, n)) if n.parse::<u32>().is_ok() => original,
        _ => id,
    }
}

impl Audit {
    /// Matches `inputs` (in order) against the ids of the output's records and of the dead
    /// letters.
    fn of(inputs: &[Input], output_ids: &[String], dlq_ids: &[String]) -> Self {
        let mut in_output: HashMap<&str, u64> = HashMap::new();
        for id in output_ids {
            *in_output.entry(original(id)).or_default() += 1;
        }
        let dead: HashSet<&str> = dlq_ids.iter().map(|id| original(id)).collect();
        let mut audit = Self::default();
        let mut seen = HashSet::new();
        for input in inputs {
            audit.inputs += 1;
            let span = (audit.partitions).entry(input.partition).or_insert((
                input.offset,
                input.offset,
                0,
            ));
            span.0 = span.0.min(input.offset);
            span.1 = span.1.max(input.offset);
            span.2 += 1;
            if !seen.insert(input.id.as_str()) {
                audit.deduplicated += 1;
                continue;
            }
            audit.distinct += 1;
            if in_output.contains_key(input.id.as_str()) {
                audit.output += 1;
            } else if dead.contains(input.id.as_str()) {
                audit.dead_lettered += 1;
            } else {
                (audit.missing).push((input.id.clone(), input.partition, input.offset));
            }
        }
        audit.duplicated = (in_output.into_iter())
            .filter(|(id, n)| *n > 1 && seen.contains(id))
            .map(|(id, n)| (id.to_owned(), n))
            .collect();
        audit.duplicated.sort();
        audit
    }

    /// The report: partitions, every missing and duplicated id up to `show`, a summary line.
    pub(crate) fn render(&self, show: usize) -> String {
        let mut out = String::new();
        for (partition, (first, last, n)) in &self.partitions {
            out.push_str(&format!(
                "partition {partition}: offsets {first}..={last}, {n} records\n"
            ));
        }
        out.push_str(&format!(
            "missing (in neither the output nor the DLQ): {}\n",
            self.missing.len()
        ));
        for (id, partition, offset) in self.missing.iter().take(show) {
            out.push_str(&format!(
                "  {id} (partition {partition}, offset {offset})\n"
            ));
        }
        if self.missing.len() > show {
            out.push_str(&format!("  ... and {} more\n", self.missing.len() - show));
        }
        out.push_str(&format!(
            "duplicated in the output: {}\n",
            self.duplicated.len()
        ));
        for (id, n) in self.duplicated.iter().take(show) {
            out.push_str(&format!("  {id} x{n}\n"));
        }
        if self.duplicated.len() > show {
            out.push_str(&format!(
                "  ... and {} more\n",
                self.duplicated.len() - show
            ));
        }
        let accounted = self.distinct - self.missing.len() as u64;
        let share = match self.distinct {
            0 => 100.0,
            n => accounted as f64 * 100.0 / n as f64,
        };
        out.push_str(&format!(
            "reconcile: {share:.2} % complete: {accounted} of {} input ids accounted for \
             ({} in the output, {} dead-lettered; {} repeated input records deduplicated) \
             over {} input records; {} missing; {} ids duplicated in the output\n",
            self.distinct,
            self.output,
            self.dead_lettered,
            self.deduplicated,
            self.inputs,
            self.missing.len(),
            self.duplicated.len()
        ));
        out
    }
}

impl ReconcileArgs {
    pub(super) async fn execute(self) -> anyhow::Result<()> {
        let spec = (self.id.as_deref())
            .map(IdSpec::parse)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--id: {e}"))?;
        let (inputs, output_ids, dlq_ids) = match &self.kafka {
            Some(bootstrap) => self.read_topics(bootstrap, spec.as_ref()).await?,
            None => self.read_files(spec.as_ref()).await?,
        };
        let inputs: Vec<Input> = inputs.into_iter().filter(|i| self.in_range(i)).collect();
        let audit = Audit::of(&inputs, &output_ids, &dlq_ids);
        print!("{}", audit.render(self.show));
        if self.replay_missing && !audit.missing.is_empty() {
            self.replay(&audit, inputs).await?;
        }
        if !audit.missing.is_empty() {
            bail!("{} input ids are missing", audit.missing.len());
        }
        Ok(())
    }

    fn in_range(&self, input: &Input) -> bool {
        let offset = self.from_offset.is_none_or(|from| input.offset >= from)
            && self.to_offset.is_none_or(|to| input.offset < to);
        let time = |bound: Option<i64>, ok: fn(i64, i64) -> bool| {
            bound.is_none_or(|b| input.timestamp_ms.is_some_and(|t| ok(t, b)))
        };
        offset && time(self.since_ms, |t, b| t >= b) && time(self.until_ms, |t, b| t < b)
    }

    /// The input records, the output's ids and the DLQ's ids, from files.
    async fn read_files(
        &self,
        spec: Option<&IdSpec>,
    ) -> anyhow::Result<(Vec<Input>, Vec<String>, Vec<String>)> {
        let (Some(input), Some(output), Some(dlq)) = (&self.input, &self.output, &self.dlq) else {
            bail!("files need --input, --output and --dlq (or give --kafka and the topics)");
        };
        if self.replay_missing {
            bail!(
                "--replay-missing re-publishes to the input topic: topics only (the missing ids are listed above)"
            );
        }
        let inputs = (read_file(input, self.format.into()).await?.into_iter())
            .map(|record| Input {
                id: record_id(spec, &record),
                partition: record.source.partition,
                offset: record.source.offset,
                timestamp_ms: record.timestamp_ms,
                record: None,
            })
            .collect();
        let outputs = (read_file(output, self.format.into()).await?.iter())
            .filter_map(|record| output_id(spec, &record.headers, record))
            .collect();
        let text = std::fs::read_to_string(dlq)
            .with_context(|| format!("cannot read the DLQ file {}", dlq.display()))?;
        let mut letters = Vec::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let letter: DeadLetterLine = serde_json::from_str(line)
                .with_context(|| format!("{} line {}: not a dead letter", dlq.display(), n + 1))?;
            letters.extend(letter.error.get("record_id").cloned());
        }
        Ok((inputs, outputs, letters))
    }

    /// The same from topics (read to their ends, `read_committed`).
    async fn read_topics(
        &self,
        bootstrap: &str,
        spec: Option<&IdSpec>,
    ) -> anyhow::Result<(Vec<Input>, Vec<String>, Vec<String>)> {
        let (Some(input), Some(output), Some(dlq)) =
            (&self.input_topic, &self.output_topic, &self.dlq_topic)
        else {
            bail!("topics need --input-topic, --output-topic and --dlq-topic");
        };
        let kafka = kafka_of(bootstrap);
        let (inputs, outputs, letters) = tokio::try_join!(
            crate::kafka::read_topic(&kafka, input),
            crate::kafka::read_topic(&kafka, output),
            crate::kafka::read_topic(&kafka, dlq),
        )?;
        let inputs = (inputs.into_iter())
            .map(|r| {
                let record = r.as_record(input);
                Input {
                    id: record_id(spec, &record),
                    partition: r.partition,
                    offset: r.offset,
                    timestamp_ms: r.timestamp_ms,
                    record: Some(r),
                }
            })
            .collect();
        let outputs = (outputs.iter())
            .filter_map(|r| output_id(spec, &r.headers, &r.as_record(output)))
            .collect();
        let letters = (letters.iter())
            .filter_map(|l| l.error("record_id"))
            .collect();
        Ok((inputs, outputs, letters))
    }

    /// `--replay-missing`: the missing input records to the input topic.
    async fn replay(&self, audit: &Audit, inputs: Vec<Input>) -> anyhow::Result<()> {
        let (Some(bootstrap), Some(topic)) = (&self.kafka, &self.input_topic) else {
            bail!("--replay-missing needs --kafka and --input-topic");
        };
        let missing: HashSet<(i32, i64)> = (audit.missing.iter()).map(|m| (m.1, m.2)).collect();
        let records: Vec<TopicRecord> = (inputs.into_iter())
            .filter(|i| missing.contains(&(i.partition, i.offset)))
            .filter_map(|i| i.record)
            .collect();
        let kafka = kafka_of(bootstrap);
        let done =
            crate::kafka::dlq_topic::replay(&kafka, records, topic, None, self.max_replays).await?;
        eprintln!(
            "weir: re-published {} missing records to {topic}; {} were at the replay cap ({})",
            done.published, done.refused, self.max_replays
        );
        Ok(())
    }
}

/// An output's record id: its `weir.record-id` header, else `spec` applied to it.
fn output_id(
    spec: Option<&IdSpec>,
    headers: &[(String, Vec<u8>)],
    record: &Record,
) -> Option<String> {
    let header = (headers.iter().rev()).find(|(name, _)| name == headers::RECORD_ID);
    match header {
        Some((_, id)) => Some(String::from_utf8_lossy(id).into_owned()),
        None => spec?.extract(record),
    }
}

/// Every record of a JSON-lines file, as a worker's file source reads it.
async fn read_file(path: &Path, format: LineFormat) -> anyhow::Result<Vec<Record>> {
    let mut source = FileSource::open(path, format)?;
    let mut records = Vec::new();
    while let Some(batch) = source.next_batch(4096).await? {
        records.extend(batch.records.into_iter().map(|incoming| incoming.record));
    }
    Ok(records)
}

impl TopicRecord {
    /// This record as a worker consuming `topic` sees it (for its id).
    fn as_record(&self, topic: &str) -> Record {
        Record {
            key: self.key.clone(),
            value: self.value.clone(),
            headers: self.headers.clone(),
            timestamp_ms: self.timestamp_ms,
            source: SourceMeta {
                stream: topic.to_owned(),
                partition: self.partition,
                offset: self.offset,
                attempt: 1,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(id: &str, offset: i64) -> Input {
        Input {
            id: id.into(),
            partition: (offset % 2) as i32,
            offset,
            timestamp_ms: None,
            record: None,
        }
    }

    #[test]
    fn ids_are_accounted_for_by_output_dlq_or_an_earlier_record() {
        let inputs = [
            input("a", 0),
            input("b", 1),
            input("c", 2),
            input("a", 3),
            input("d", 4),
        ];
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let audit = Audit::of(&inputs, &ids(&["a", "c#replay1", "a", "x"]), &ids(&["b"]));
        assert_eq!(
            (audit.inputs, audit.distinct, audit.deduplicated),
            (5, 4, 1)
        );
        assert_eq!((audit.output, audit.dead_lettered), (2, 1));
        assert_eq!(audit.missing, [("d".to_string(), 0, 4)]);
        assert_eq!(audit.duplicated, [("a".to_string(), 2)]);
        assert_eq!(audit.partitions[&0], (0, 4, 3));
        let report = audit.render(0);
        assert!(report.contains("  ... and 1 more\n"), "{report}");
        assert!(
            report.ends_with("reconcile: 75.00 % complete: 3 of 4 input ids accounted for (2 in the output, 1 dead-lettered; 1 repeated input records deduplicated) over 5 input records; 1 missing; 1 ids duplicated in the output\n"),
            "{report}"
        );
    }
}
