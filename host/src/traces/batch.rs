//! The spans of one batch.
//!
//! `weir.batch` covers the batch from its take to its commit, with a span per stage under
//! it: `weir.claim`, `weir.plugin` (one per plugin call, retries included, with the
//! plugin's log lines as events), `weir.write` and `weir.commit`. A record whose headers
//! carry its producer's trace context also gets a `weir.record` span in that trace, with the
//! stages it went through under it, so the producer's trace continues through Weir. What a
//! record becomes (outputs, a dead letter, a parked retry) carries the context of its
//! `weir.record`, or else of `weir.batch`.

use std::collections::BTreeSet;
use std::time::SystemTime;

use opentelemetry::trace::{
    Event, Link, Span as _, SpanBuilder, SpanContext, SpanKind, Status, TraceContextExt, Tracer,
};
use opentelemetry::{Array, Context, KeyValue, StringValue, Value};
use opentelemetry_sdk::trace::{SdkTracer, Span};

use super::{Traces, context_headers, producer_context, replace_context};
use crate::record::wit::Header;
use crate::record::{DeadLetter, ErrorClass, Record};
use crate::runtime::{LogLines, Outcome, PluginMeta};

/// Most record ids a `weir.batch` span lists.
const MAX_IDS: usize = 1024;

/// A stage every record of a batch goes through together.
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    /// Dedup and leases.
    Claim,
    /// Outputs and dead letters handed to their sinks.
    Write,
    /// Durable, done marks, the source's position.
    Commit,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Claim => "weir.claim",
            Stage::Write => "weir.write",
            Stage::Commit => "weir.commit",
        }
    }
}

/// What became of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Skipped: done before, or a repeat within the batch (a record given no other fate).
    Deduplicated,
    Processed {
        version: u64,
    },
    DeadLettered {
        version: u64,
        class: ErrorClass,
    },
    /// Sent to the retry topic for a later attempt.
    Parked {
        version: u64,
    },
    /// Its lease went to another worker before its done mark.
    LeaseLost,
}

impl Fate {
    fn name(self) -> &'static str {
        match self {
            Fate::Deduplicated => "deduplicated",
            Fate::Processed { .. } => "processed",
            Fate::DeadLettered { .. } => "dead_lettered",
            Fate::Parked { .. } => "parked",
            Fate::LeaseLost => "lease_lost",
        }
    }

    fn version(self) -> Option<u64> {
        match self {
            Fate::Processed { version }
            | Fate::DeadLettered { version, .. }
            | Fate::Parked { version } => Some(version),
            Fate::Deduplicated | Fate::LeaseLost => None,
        }
    }
}

/// How a batch ended.
#[derive(Debug)]
pub enum Ending {
    /// Committed; the records at these positions lost their leases.
    Committed { lease_lost: Vec<usize> },
    /// Its transaction was aborted: the source reads its records again.
    Aborted,
    /// The run stopped on this error.
    Failed(String),
}

/// The spans of one batch; see the module's documentation.
pub struct BatchTrace {
    tracer: SdkTracer,
    batch: Spanned,
    /// The records that carry their producer's context, by position.
    records: Vec<TracedRecord>,
    fates: Vec<Fate>,
}

/// A span with what its children and downstream records need of it.
struct Spanned {
    span: Span,
    /// The parent of its children.
    cx: Context,
    /// `traceparent` (and `tracestate`) naming it.
    headers: Vec<Header>,
}

impl Spanned {
    fn new(span: Span) -> Self {
        let context = span.span_context().clone();
        Self {
            headers: context_headers(&context),
            cx: Context::new().with_remote_span_context(context),
            span,
        }
    }

    fn context(&self) -> &SpanContext {
        self.span.span_context()
    }
}

struct TracedRecord {
    at: usize,
    stream: String,
    partition: i32,
    offset: i64,
    spanned: Spanned,
}

impl Traces {
    /// Begins the trace of a batch of `records`, whose ids are `ids`.
    pub fn batch<'a>(
        &self,
        records: impl ExactSizeIterator<Item = &'a Record>,
        ids: &[String],
    ) -> BatchTrace {
        let tracer = &self.tracer;
        let n = records.len();
        let mut offsets: Vec<(i32, i64, i64)> = Vec::new();
        let mut stream = None;
        let mut producers = Vec::new();
        for (at, record) in records.enumerate() {
            let source = &record.source;
            stream.get_or_insert_with(|| source.stream.clone());
            match offsets.iter_mut().find(|(p, ..)| *p == source.partition) {
                Some((_, first, last)) => {
                    *first = (*first).min(source.offset);
                    *last = (*last).max(source.offset);
                }
                None => offsets.push((source.partition, source.offset, source.offset)),
            }
            if let Some(producer) = producer_context(&record.headers) {
                producers.push((at, record, producer));
            }
        }
        let offsets: Vec<StringValue> = (offsets.into_iter())
            .map(|(p, first, last)| format!("{p}:{first}-{last}").into())
            .collect();
        let listed: Vec<StringValue> = ids
            .iter()
            .take(MAX_IDS)
            .map(|id| id.clone().into())
            .collect();
        let batch = SpanBuilder::from_name("weir.batch")
            .with_kind(SpanKind::Consumer)
            .with_attributes([
                KeyValue::new("weir.stream", stream.unwrap_or_default()),
                KeyValue::new("weir.records", n as i64),
                KeyValue::new("weir.record.ids", Value::Array(Array::String(listed))),
                KeyValue::new("weir.offsets", Value::Array(Array::String(offsets))),
            ])
            .start_with_context(tracer, &Context::new());
        let mut batch = Spanned::new(batch);
        let records = (producers.into_iter())
            .map(|(at, record, producer)| {
                let id = KeyValue::new("weir.record.id", ids[at].clone());
                batch.span.add_link(producer.clone(), vec![id.clone()]);
                let source = &record.source;
                let span = SpanBuilder::from_name("weir.record")
                    .with_kind(SpanKind::Consumer)
                    .with_attributes([
                        id,
                        KeyValue::new("weir.stream", source.stream.clone()),
                        KeyValue::new("weir.partition", i64::from(source.partition)),
                        KeyValue::new("weir.offset", source.offset),
                        KeyValue::new("weir.attempt", i64::from(source.attempt)),
                    ])
                    .with_links(vec![Link::with_context(batch.context().clone())])
                    .start_with_context(tracer, &Context::new().with_remote_span_context(producer));
                TracedRecord {
                    at,
                    stream: source.stream.clone(),
                    partition: source.partition,
                    offset: source.offset,
                    spanned: Spanned::new(span),
                }
            })
            .collect();
        BatchTrace {
            tracer: tracer.clone(),
            batch,
            records,
            fates: vec![Fate::Deduplicated; n],
        }
    }
}

impl BatchTrace {
    /// Ends `stage`, begun at `started`, for the batch (with the batch's `counts`) and each
    /// of its traced records.
    pub fn stage(&self, stage: Stage, started: SystemTime, counts: &[(&'static str, u64)]) {
        let times = (started, SystemTime::now());
        let counts: Vec<KeyValue> = (counts.iter())
            .map(|&(name, n)| KeyValue::new(name, n as i64))
            .collect();
        self.child(&self.batch, stage.name(), times, counts, Vec::new());
        for record in &self.records {
            self.child(&record.spanned, stage.name(), times, Vec::new(), Vec::new());
        }
    }

    /// Ends the span of a plugin call, begun at `started`, that gave `records` their
    /// `outcomes`, with the lines the plugin logged as events; and the same under each traced
    /// record it had, with that record's outcome.
    pub fn plugin_call(
        &self,
        meta: &PluginMeta,
        started: SystemTime,
        (records, outcomes): (&[Record], &[Outcome]),
        logs: &LogLines,
    ) {
        let ended = SystemTime::now();
        let events: Vec<Event> = (logs.lines.iter())
            .map(|line| {
                let level = KeyValue::new("level", line.level);
                Event::new(line.message.clone(), line.at, vec![level], 0)
            })
            .collect();
        let mut attributes = vec![
            KeyValue::new("weir.plugin.name", meta.name.clone()),
            KeyValue::new("weir.plugin.version", meta.version as i64),
        ];
        if logs.dropped > 0 {
            attributes.push(KeyValue::new("weir.log.dropped", logs.dropped as i64));
        }
        let failed = (outcomes.iter())
            .filter(|o| !matches!(o, Outcome::Outputs { .. }))
            .count();
        let mut call = attributes.clone();
        call.extend([
            KeyValue::new("weir.records", records.len() as i64),
            KeyValue::new("weir.failed", failed as i64),
        ]);
        if let Some(first) = records.first() {
            call.push(KeyValue::new(
                "weir.attempt",
                i64::from(first.source.attempt),
            ));
        }
        let times = (started, ended);
        let span = self.child(&self.batch, "weir.plugin", times, call, events.clone());
        if let Some(mut span) = span.filter(|_| failed > 0) {
            span.set_status(Status::error(format!("{failed} records failed")));
        }
        if self.records.is_empty() {
            return;
        }
        for (record, outcome) in records.iter().zip(outcomes) {
            let Some(traced) = self.traced(record) else {
                continue;
            };
            let mut attributes = attributes.clone();
            attributes.push(KeyValue::new(
                "weir.attempt",
                i64::from(record.source.attempt),
            ));
            let (status, failure) = match outcome {
                Outcome::Outputs { outputs, .. } => {
                    let n = outputs.len() as i64;
                    (Status::Ok, KeyValue::new("weir.outputs", n))
                }
                Outcome::Retryable(reason) => (
                    Status::Unset,
                    KeyValue::new("weir.retryable", reason.clone()),
                ),
                Outcome::Failed(failure) => (
                    Status::error(failure.message.clone()),
                    KeyValue::new("weir.error.class", failure.class.as_str()),
                ),
            };
            attributes.push(failure);
            let parent = &traced.spanned;
            let span = self.child(parent, "weir.plugin", times, attributes, events.clone());
            if let Some(mut span) = span {
                span.set_status(status);
            }
        }
    }

    /// The traced record that `record` is (by its place in its source).
    fn traced(&self, record: &Record) -> Option<&TracedRecord> {
        let source = &record.source;
        self.records.iter().find(|r| {
            (r.partition, r.offset) == (source.partition, source.offset)
                && r.stream == source.stream
        })
    }

    /// A span under `parent` from `times.0` to `times.1`; the span returned ends when dropped.
    fn child(
        &self,
        parent: &Spanned,
        name: &'static str,
        (started, ended): (SystemTime, SystemTime),
        attributes: Vec<KeyValue>,
        events: Vec<Event>,
    ) -> Option<EndsAt> {
        if !parent.span.is_recording() {
            return None;
        }
        let span = SpanBuilder::from_name(name)
            .with_start_time(started)
            .with_attributes(attributes)
            .with_events(events);
        Some(EndsAt {
            span: self.tracer.build_with_context(span, &parent.cx),
            at: ended,
        })
    }

    /// Writes the trace context of the record at `at` into `headers` (of an output, a dead
    /// letter or a parked retry of it), in place of any there.
    pub fn stamp(&self, at: usize, headers: &mut Vec<Header>) {
        let context = match self.records.binary_search_by_key(&at, |r| r.at) {
            Ok(i) => &self.records[i].spanned.headers,
            Err(_) => &self.batch.headers,
        };
        replace_context(headers, context);
    }

    /// Stamps the dead letter of the record at `at` and notes its fate (class and version
    /// from the letter).
    pub fn dead_lettered(&mut self, at: usize, letter: &mut DeadLetter) {
        self.stamp(at, &mut letter.record.headers);
        let (version, class) = (letter.error.plugin_version, letter.error.class);
        self.fate(at, Fate::DeadLettered { version, class });
    }

    /// Notes the fate of the record at `at`.
    pub fn fate(&mut self, at: usize, fate: Fate) {
        if let Some(slot) = self.fates.get_mut(at) {
            *slot = fate;
        }
    }

    /// Ends the commit stage (begun at `started`) and the batch as `ending` says.
    pub fn finish(mut self, started: SystemTime, ending: Ending) {
        self.stage(Stage::Commit, started, &[]);
        let failed = match ending {
            Ending::Committed { lease_lost } => {
                for at in lease_lost {
                    self.fate(at, Fate::LeaseLost);
                }
                None
            }
            Ending::Aborted => Some("aborted: its records are read again".to_owned()),
            Ending::Failed(error) => Some(error),
        };
        for traced in &mut self.records {
            let fate = self.fates[traced.at];
            let span = &mut traced.spanned.span;
            span.set_attribute(KeyValue::new("weir.fate", fate.name()));
            if let Some(version) = fate.version() {
                span.set_attribute(KeyValue::new("weir.plugin.version", version as i64));
            }
            if let Fate::DeadLettered { class, .. } = fate {
                span.set_attribute(KeyValue::new("weir.error.class", class.as_str()));
                span.set_status(Status::error(format!("dead-lettered: {}", class.as_str())));
            }
            if let Some(failed) = &failed {
                span.set_status(Status::error(failed.clone()));
            }
            span.end();
        }
        let count = |name: &str| self.fates.iter().filter(|f| f.name() == name).count() as i64;
        let versions: BTreeSet<i64> = (self.fates.iter())
            .filter_map(|f| f.version())
            .map(|v| v as i64)
            .collect();
        let batch = &mut self.batch.span;
        batch.set_attributes([
            KeyValue::new("weir.processed", count("processed")),
            KeyValue::new("weir.dead_lettered", count("dead_lettered")),
            KeyValue::new("weir.deduplicated", count("deduplicated")),
            KeyValue::new("weir.parked", count("parked")),
            KeyValue::new("weir.lease_lost", count("lease_lost")),
            KeyValue::new(
                "weir.plugin.versions",
                Value::Array(Array::I64(versions.into_iter().collect())),
            ),
        ]);
        if let Some(failed) = failed {
            batch.set_status(Status::error(failed));
        }
        batch.end();
    }
}

/// A span that ends at a given time when dropped.
struct EndsAt {
    span: Span,
    at: SystemTime,
}

impl EndsAt {
    fn set_status(&mut self, status: Status) {
        self.span.set_status(status);
    }
}

impl Drop for EndsAt {
    fn drop(&mut self) {
        self.span.end_with_timestamp(self.at);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::SpanId;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SpanData, SpanExporter};

    use super::*;
    use crate::record::SourceMeta;
    use crate::runtime::{Failure, LogLine, World};

    const PRODUCER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    const PRODUCER_SPAN: &str = "b7ad6b7169203331";

    /// Keeps what it is given.
    #[derive(Debug, Clone, Default)]
    struct Kept(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Kept {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().expect("spans").extend(batch);
            Ok(())
        }
    }

    fn record(offset: i64, headers: Vec<Header>) -> Record {
        Record {
            headers,
            source: SourceMeta {
                stream: "in".into(),
                partition: 2,
                offset,
                attempt: 1,
            },
            ..Record::default()
        }
    }

    fn attribute(span: &SpanData, key: &str) -> Option<String> {
        (span.attributes.iter())
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    }

    /// Runs a batch of three records through every stage: `a` deduplicated, `b` (carrying
    /// its producer's context) processed, `c` dead-lettered. Returns the spans and the
    /// headers stamped for `b` and `c`.
    fn traced_batch(sample_ratio: f64) -> (Vec<SpanData>, [Vec<Header>; 2]) {
        let kept = Kept::default();
        let traces = Traces::with_exporter(kept.clone(), "weir-test", sample_ratio, Vec::new());
        let producer = format!("00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01");
        let records = [
            record(10, Vec::new()),
            record(11, vec![("traceparent".into(), producer.into_bytes())]),
            record(12, Vec::new()),
        ];
        let ids = ["a", "b", "c"].map(String::from);
        let mut trace = traces.batch(records.iter(), &ids);
        let started = SystemTime::now();
        trace.stage(Stage::Claim, started, &[("weir.deduplicated", 1)]);
        let meta = PluginMeta {
            name: "enrich".into(),
            version: 3,
            digest: String::new(),
            world: World::Batch,
            stateful: false,
            size_bytes: 0,
        };
        let outcomes = [
            Outcome::Outputs {
                outputs: Vec::new(),
                writes: Vec::new(),
            },
            Outcome::Failed(Failure::new(ErrorClass::Trap, "unreachable")),
        ];
        let logs = LogLines {
            lines: vec![LogLine {
                at: SystemTime::now(),
                level: "info",
                message: "hello from the plugin".into(),
            }],
            dropped: 0,
        };
        trace.plugin_call(&meta, started, (&records[1..], &outcomes), &logs);
        let mut stamped = [Vec::new(), vec![("traceparent".into(), b"old".to_vec())]];
        trace.stamp(1, &mut stamped[0]);
        trace.stamp(2, &mut stamped[1]);
        trace.fate(1, Fate::Processed { version: 3 });
        let class = ErrorClass::Trap;
        trace.fate(2, Fate::DeadLettered { version: 3, class });
        trace.stage(Stage::Write, started, &[]);
        let lease_lost = Vec::new();
        trace.finish(started, Ending::Committed { lease_lost });
        traces.shut_down();
        let spans = kept.0.lock().expect("spans").clone();
        (spans, stamped)
    }

    #[test]
    fn a_producers_record_continues_its_trace_with_its_stages_beside_the_batchs() {
        let (spans, [b, c]) = traced_batch(1.0);
        let named =
            |name: &str| -> Vec<&SpanData> { spans.iter().filter(|s| s.name == name).collect() };
        let children = |parent: &SpanData| -> Vec<&str> {
            let mut names: Vec<&str> = (spans.iter())
                .filter(|s| s.parent_span_id == parent.span_context.span_id())
                .map(|s| s.name.as_ref())
                .collect();
            names.sort_unstable();
            names
        };
        let stages = ["weir.claim", "weir.commit", "weir.plugin", "weir.write"];

        let [record] = named("weir.record")[..] else {
            panic!("one weir.record: {spans:#?}")
        };
        assert_eq!(record.span_context.trace_id().to_string(), PRODUCER_TRACE);
        assert_eq!(record.parent_span_id.to_string(), PRODUCER_SPAN);
        assert_eq!(attribute(record, "weir.record.id").as_deref(), Some("b"));
        assert_eq!(attribute(record, "weir.offset").as_deref(), Some("11"));
        assert_eq!(attribute(record, "weir.fate").as_deref(), Some("processed"));
        assert_eq!(
            attribute(record, "weir.plugin.version").as_deref(),
            Some("3")
        );
        assert_eq!(children(record), stages);

        let [batch] = named("weir.batch")[..] else {
            panic!("one weir.batch: {spans:#?}")
        };
        assert_ne!(
            batch.span_context.trace_id(),
            record.span_context.trace_id()
        );
        assert_eq!(batch.parent_span_id, SpanId::INVALID);
        assert_eq!(children(batch), stages);
        for (key, value) in [
            ("weir.records", "3"),
            ("weir.offsets", "[\"2:10-12\"]"),
            ("weir.processed", "1"),
            ("weir.dead_lettered", "1"),
            ("weir.deduplicated", "1"),
        ] {
            assert_eq!(attribute(batch, key).as_deref(), Some(value), "{key}");
        }
        assert!(attribute(batch, "weir.record.ids").is_some_and(|ids| ids.contains("\"c\"")));
        assert_eq!(
            batch.links.links[0].span_context.span_id().to_string(),
            PRODUCER_SPAN
        );
        assert_eq!(record.links.links[0].span_context, batch.span_context);

        // The plugin's log line is an event of its call, in both traces; the record's call
        // says how it went.
        for plugin in named("weir.plugin") {
            let events: Vec<&str> = plugin.events.iter().map(|e| e.name.as_ref()).collect();
            assert_eq!(events, ["hello from the plugin"]);
            assert_eq!(
                attribute(plugin, "weir.plugin.version").as_deref(),
                Some("3")
            );
        }

        // Downstream, `b` carries its weir.record span; `c` the batch's, in place of the old.
        let traceparent = |span: &SpanData| {
            let cx = &span.span_context;
            format!("00-{}-{}-01", cx.trace_id(), cx.span_id())
        };
        assert_eq!(
            b,
            [("traceparent".into(), traceparent(record).into_bytes())]
        );
        assert_eq!(c, [("traceparent".into(), traceparent(batch).into_bytes())]);
    }

    #[test]
    fn a_batch_out_of_the_sample_sends_nothing_but_the_producers_record_still_goes() {
        let (spans, [b, c]) = traced_batch(0.0);
        let mut names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "weir.claim",
                "weir.commit",
                "weir.plugin",
                "weir.record",
                "weir.write"
            ]
        );
        assert!(String::from_utf8_lossy(&b[0].1).ends_with("-01"));
        // Not sampled, but its context still goes downstream.
        assert!(String::from_utf8_lossy(&c[0].1).ends_with("-00"));
    }
}
