//! Traces in a real Jaeger (docs/operations.md): a worker on a real Kafka and Redis sends
//! its spans over OTLP/HTTP; a producer's trace, handed over in the records' `traceparent`
//! header, continues through Weir into what the records became; and the trace of any
//! record, found from the `traceparent` of its output or dead letter (or from `weir dlq
//! list`), holds its stages.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weir::kafka::TopicRecord;
use weir_tests::jaeger::Jaeger;

use crate::cluster::Setup;

/// A tag of a span as the query API gives it, as text.
fn tag(span: &Value, key: &str) -> Option<String> {
    (span["tags"].as_array()?.iter())
        .find(|t| t["key"] == key)
        .map(|t| match &t["value"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
}

/// The one span named `name` among `spans` (whose `references` name `parent`, if given).
fn span<'a>(spans: &'a [Value], name: &str, parent: Option<&str>) -> &'a Value {
    let found: Vec<&Value> = (spans.iter())
        .filter(|s| s["operationName"] == name)
        .filter(|s| parent.is_none_or(|p| parent_of(s).as_deref() == Some(p)))
        .collect();
    let [one] = found[..] else {
        panic!(
            "{} spans `{name}` under {parent:?} in {spans:#?}",
            found.len()
        )
    };
    one
}

fn parent_of(span: &Value) -> Option<String> {
    (span["references"].as_array()?.iter())
        .find(|r| r["refType"] == "CHILD_OF")
        .and_then(|r| r["spanID"].as_str().map(str::to_owned))
}

/// The names of the spans whose parent is `parent`.
fn children(spans: &[Value], parent: &Value) -> BTreeSet<String> {
    let id = parent["spanID"].as_str().expect("spanID");
    (spans.iter())
        .filter(|s| parent_of(s).as_deref() == Some(id))
        .map(|s| s["operationName"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// The log lines (span events) of a span.
fn events(span: &Value) -> Vec<String> {
    (span["logs"].as_array().into_iter().flatten())
        .filter_map(|log| {
            (log["fields"].as_array()?.iter())
                .find(|f| f["key"] == "event")
                .and_then(|f| f["value"].as_str().map(str::to_owned))
        })
        .collect()
}

/// (trace id, span id) of a record's `traceparent`.
fn traceparent(record: &TopicRecord) -> (String, String) {
    let header = record
        .header("traceparent")
        .unwrap_or_else(|| panic!("no traceparent: {record:?}"));
    let parts: Vec<&str> = header.split('-').collect();
    let [_, trace, span, _] = parts[..] else {
        panic!("not a traceparent: {header}")
    };
    (trace.to_owned(), span.to_owned())
}

/// `words` random 64-bit words in hex (a trace id is two, a span id one).
fn hex(words: u64) -> String {
    let random = |i| std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), i);
    (0..words).map(|i| format!("{:016x}", random(i))).collect()
}

/// The producer's own span, sent to Jaeger as the producer's SDK would.
fn producer_span(trace: &str, span: &str, id: &str) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    json!({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "shop"}}]},
        "scopeSpans": [{"spans": [{
            "traceId": trace, "spanId": span, "name": format!("send {id}"), "kind": 4,
            "startTimeUnixNano": (now - 1_000_000).to_string(), "endTimeUnixNano": now.to_string(),
        }]}]
    }]})
}

/// A worker runs `faulty` with `--otlp-endpoint` at a real Jaeger. Two records arrive with
/// their producer's trace context, one logs and passes, the other traps; fifty arrive
/// without. Each producer's trace continues: its `weir.record` span (id, partition, offset,
/// fate) holds the claim, plugin, write and commit stages, the plugin's log line is an event
/// of the plugin stage, and the output or dead letter carries `weir.record` on. A record
/// without a context is found from its output's `traceparent`: the batch trace with its
/// stages and the record's id.
#[test]
fn a_producers_trace_continues_through_weir_and_every_record_has_its_stages_in_jaeger() {
    let jaeger = Jaeger::start();
    let s = Setup::new("traces", 2);
    let otlp = jaeger.otlp_endpoint();
    let worker = s.worker_of("faulty", "traced", &["--otlp-endpoint", &otlp]);

    let traced = [("logs", "log"), ("traps", "trap")].map(|(id, fault)| {
        let (trace, span) = (hex(2), hex(1));
        jaeger.send(&producer_span(&trace, &span, id));
        (id, fault, trace, span)
    });
    let with_context = traced.iter().map(|(id, fault, trace, span)| {
        let header = ("traceparent".to_owned(), format!("00-{trace}-{span}-01"));
        let event = json!({"id": id, "fault": fault}).to_string();
        (Some((*id).to_owned()), event, vec![header])
    });
    let without = (0..50).map(|i| {
        let id = format!("e{i}");
        (Some(id.clone()), json!({"id": id}).to_string(), Vec::new())
    });
    s.rt.block_on(
        s.broker
            .produce(&s.cluster.input, with_context.chain(without)),
    );

    let started = Instant::now();
    let (outputs, letters) = loop {
        let read = |topic: &str, n: usize| {
            s.broker
                .read_topic(topic, Duration::from_secs(2), |r| r.len() >= n)
        };
        let (outputs, letters) = (read(&s.cluster.output, 51), read(&s.cluster.dlq, 1));
        if outputs.len() >= 51 && !letters.is_empty() {
            break (outputs, letters);
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "{} outputs and {} dead letters of 51 and 1; worker log:\n{}",
            outputs.len(),
            letters.len(),
            worker.log()
        );
    };
    let output_of = |id: &str| {
        (outputs.iter())
            .find(|r| r.header("weir.record-id").as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no output of {id}"))
    };
    let stages: BTreeSet<String> = ["weir.claim", "weir.plugin", "weir.write", "weir.commit"]
        .map(String::from)
        .into();

    // The producers' traces go on through Weir.
    for (id, _, trace, producer) in &traced {
        let spans = jaeger.trace(trace, 6, Duration::from_secs(60));
        let record = span(&spans, "weir.record", Some(producer));
        assert_eq!(tag(record, "weir.record.id").as_deref(), Some(*id));
        assert!(tag(record, "weir.partition").is_some() && tag(record, "weir.offset").is_some());
        assert_eq!(children(&spans, record), stages, "{id}: {spans:#?}");
        let plugin = span(&spans, "weir.plugin", record["spanID"].as_str());
        assert_eq!(tag(plugin, "weir.plugin.name").as_deref(), Some("faulty"));
        assert_eq!(tag(plugin, "weir.plugin.version").as_deref(), Some("1"));
        let carried = match *id {
            "logs" => {
                assert_eq!(tag(record, "weir.fate").as_deref(), Some("processed"));
                assert!(
                    events(plugin).contains(&"record logs asked to be logged".to_owned()),
                    "{plugin:#}"
                );
                output_of(id)
            }
            _ => {
                assert_eq!(tag(record, "weir.fate").as_deref(), Some("dead_lettered"));
                assert_eq!(tag(record, "weir.error.class").as_deref(), Some("trap"));
                assert_eq!(tag(plugin, "error").as_deref(), Some("true"), "{plugin:#}");
                let letter = letters
                    .iter()
                    .find(|r| r.header("weir.error.record_id").as_deref() == Some(*id));
                letter.unwrap_or_else(|| panic!("no dead letter of {id}"))
            }
        };
        assert_eq!(
            traceparent(carried),
            (
                trace.clone(),
                record["spanID"].as_str().unwrap_or("?").to_owned()
            )
        );
    }

    // `weir dlq list` names the trace of each dead letter.
    let listed = weir_tests::stdout_of(std::process::Command::new(crate::WEIR).args([
        "dlq",
        "list",
        "--kafka",
        &s.cluster.bootstrap,
        "--dlq-topic",
        &s.cluster.dlq,
    ]));
    let trapped = &traced[1].2;
    assert!(
        listed.contains(&format!("id=traps attempts=1 replays=0 trace={trapped}")),
        "{listed}"
    );

    // A record without a context: its output's traceparent names its batch's trace.
    let (trace, batch_span) = traceparent(output_of("e7"));
    let spans = jaeger.trace(&trace, 5, Duration::from_secs(60));
    let batch = span(&spans, "weir.batch", None);
    assert_eq!(batch["spanID"].as_str(), Some(batch_span.as_str()));
    assert!(
        tag(batch, "weir.record.ids").is_some_and(|ids| ids.contains("\"e7\"")),
        "{batch:#}"
    );
    assert!(tag(batch, "weir.offsets").is_some(), "{batch:#}");
    assert_eq!(children(&spans, batch), stages, "{spans:#?}");
    println!(
        "Jaeger holds the producers' traces through Weir and e7's batch trace ({} spans)",
        spans.len()
    );
    worker.stop();
}
