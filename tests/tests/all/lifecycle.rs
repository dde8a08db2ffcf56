//! The record lifecycle end to end: dedup across runs, DLQ replay, metrics = summary.

use crate::WEIR;
use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use weir_tests::{
    Weir, error_field, event, faulty_events, plugin, read_json, read_json_lines, read_lines,
};

#[test]
fn running_the_same_input_twice_outputs_nothing_new() {
    let weir = Weir::new(WEIR);
    let mut lines: Vec<String> = (0..300)
        .map(|i| format!(r#"{{"id":"e{i}","user_id":"u{}","ts":1700000000}}"#, i % 7))
        .collect();
    lines.push("not json".into()); // dead-lettered, and marked done too
    lines.push(lines[5].clone()); // a duplicate within the run
    let input = weir.write_lines("in.jsonl", &lines);
    let first = weir.run_pipeline(&plugin("enrich"), &input, &["--id", "/id"]);
    assert_eq!(first.outputs.len(), 300);
    assert_eq!(first.count("deduplicated"), 1);
    assert_eq!(first.count("dead_lettered"), 1);

    let second = weir.run_pipeline(&plugin("enrich"), &input, &["--id", "/id"]);
    assert_eq!(second.outputs.len(), 300, "the second run wrote outputs");
    assert_eq!(
        second.dead_letters.len(),
        1,
        "the second run wrote dead letters"
    );
    assert_eq!(second.count("records_in"), 302);
    assert_eq!(second.count("deduplicated"), 302);
    assert_eq!(second.count("processed"), 0);
    assert!(
        second.finished.stderr().contains("already done"),
        "{}",
        second.finished.stderr()
    );
}

/// Batches complete in the background; a batch repeating an id of one still completing must
/// wait for it and see its done mark (batch size 1: every repeat is in a later batch).
#[test]
fn a_repeat_in_the_next_batches_is_deduplicated() {
    let weir = Weir::new(WEIR);
    let lines: Vec<String> = (0..200)
        .map(|i| format!(r#"{{"id":"e{}","user_id":"u1","ts":1700000000}}"#, i / 2))
        .collect();
    let input = weir.write_lines("in.jsonl", &lines);
    let run = weir.run_pipeline(
        &plugin("enrich"),
        &input,
        &["--id", "/id", "--batch-size", "1"],
    );
    assert_eq!(run.outputs.len(), 100);
    assert_eq!(run.count("deduplicated"), 100);
}

#[test]
fn outputs_carry_record_id_version_and_fence() {
    let weir = Weir::new(WEIR);
    let input = weir.write_lines("in.jsonl", [event("a", json!({}))]);
    let run = weir.run_pipeline(
        &plugin("faulty"),
        &input,
        &["--id", "/id", "--output-format", "envelope"],
    );
    let out: serde_json::Value = serde_json::from_str(&run.outputs[0]).expect("envelope");
    let headers: Vec<(String, String)> = out["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .map(|h| {
            (
                h["name"].as_str().expect("name").into(),
                h["value"].as_str().expect("value").into(),
            )
        })
        .collect();
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    assert_eq!(get("weir.record-id").as_deref(), Some("a"));
    assert_eq!(get("weir.plugin-version").as_deref(), Some("1"));
    assert!(get("weir.fence").is_some_and(|f| f.parse::<u64>().expect("number") >= 1));
}

#[test]
fn dlq_replay_with_a_fixed_plugin_outputs_and_the_cap_holds() {
    let weir = Weir::new(WEIR);
    let input = weir.write_lines(
        "in.jsonl",
        faulty_events(20, |i| (i % 5 == 0).then_some("invalid")),
    );
    let run = weir.run_pipeline(&plugin("faulty"), &input, &["--id", "/id"]);
    assert_eq!(run.dead_letters.len(), 4);

    let faulty = plugin("faulty");
    let replay = |dlq: &str, new_dlq: &str, output: &str, config: &str, max: &str| {
        weir.run([
            "dlq",
            "replay",
            "--dlq",
            dlq,
            "--plugin",
            faulty.to_str().expect("utf-8"),
            "--output",
            output,
            "--new-dlq",
            new_dlq,
            "--state",
            "state",
            "--plugin-config",
            config,
            "--max-replays",
            max,
        ])
        .success()
    };
    // Still broken: everything fails again, now with replay count 1.
    replay("out.dlq.jsonl", "again.jsonl", "r1.jsonl", "faults=on", "1");
    let again = read_json_lines(&weir.path("again.jsonl"));
    assert_eq!(again.len(), 4);
    for d in &again {
        assert_eq!(error_field(d, "class"), "invalid");
        let count = d["record"]["headers"]
            .as_array()
            .expect("headers")
            .iter()
            .find(|h| h["name"] == "weir.replay.count")
            .map(|h| h["value"].clone());
        assert_eq!(count, Some(json!("1")), "{d}");
    }
    assert!(read_lines(&weir.path("r1.jsonl")).is_empty());

    // Fixed, but at the cap of 1 replay: refused, carried over unchanged, nothing output.
    let capped = replay("again.jsonl", "capped.jsonl", "r2.jsonl", "faults=off", "1");
    assert!(
        capped.stderr().contains("4 were at the replay cap"),
        "{}",
        capped.stderr()
    );
    assert!(read_lines(&weir.path("r2.jsonl")).is_empty());
    assert_eq!(read_json_lines(&weir.path("capped.jsonl")).len(), 4);

    // Fixed, with room under the cap: every dead letter becomes an output, despite done marks.
    replay("again.jsonl", "none.jsonl", "r3.jsonl", "faults=off", "3");
    let outputs = read_lines(&weir.path("r3.jsonl"));
    assert_eq!(outputs.len(), 4);
    assert!(outputs.iter().all(|o| o.contains("\"fault\":\"invalid\"")));
    assert!(read_lines(&weir.path("none.jsonl")).is_empty());
}

#[test]
fn dlq_list_counts_by_class() {
    let weir = Weir::new(WEIR);
    let input = weir.write_lines(
        "in.jsonl",
        [
            event("a", json!({"fault": "invalid"})),
            event("b", json!({"fault": "trap"})),
            event("c", json!({"fault": "trap"})),
        ],
    );
    weir.run_pipeline(&plugin("faulty"), &input, &["--id", "/id"]);
    let listed = weir
        .run(["dlq", "list", "--dlq", "out.dlq.jsonl"])
        .success()
        .stdout();
    assert!(listed.contains("3 dead letters"), "{listed}");
    assert!(listed.contains("invalid: 1"), "{listed}");
    assert!(listed.contains("trap: 2"), "{listed}");
    assert!(listed.contains("id=b"), "{listed}");
}

/// A free loopback port (bound and released; fine for a test).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

#[test]
fn metrics_after_a_run_equal_the_summary() {
    let weir = Weir::new(WEIR);
    let port = free_port();
    let mut child = weir
        .command([
            "run",
            "--plugin",
            plugin("faulty").to_str().expect("utf-8"),
            "--input",
            "-",
            "--output",
            "out.jsonl",
            "--state",
            "state",
            "--id",
            "/id",
            "--summary-json",
            "summary.json",
            "--quiet",
            "--metrics",
            &format!("127.0.0.1:{port}"),
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    for i in 0..50 {
        let fault = match i % 10 {
            1 => json!({"fault": "trap"}),
            2 => json!({"fault": "invalid"}),
            3 => json!({"fault": "retry"}),
            _ => json!({}),
        };
        writeln!(stdin, "{}", event(&format!("e{}", i % 45), fault)).expect("write");
    }
    stdin.flush().expect("flush");

    // Scrape until every record has a fate, then parse the exposition.
    let started = Instant::now();
    let scrape = loop {
        let response = if started.elapsed() < Duration::from_secs(60) {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| http_get(port, "/metrics"))
        } else {
            panic!("weir did not finish 50 records in 60 s")
        };
        if let Some(body) = response
            .as_ref()
            .and_then(|r| r.split_once("\r\n\r\n"))
            .map(|(_, b)| b.to_owned())
        {
            let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
                .expect("Prometheus text");
            let value = |name: &str| weir_tests::metric_sum(&body, name, &[]);
            let fated = value("weir_records_processed_total")
                + value("weir_records_dead_lettered_total")
                + value("weir_records_deduplicated_total");
            if value("weir_records_in_total") == 50.0 && fated == 50.0 {
                break parsed;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(http_get(port, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http_get(port, "/readyz").starts_with("HTTP/1.1 200"));
    drop(stdin);
    let status = child.wait().expect("wait");
    assert!(status.success());

    let summary = read_json(&weir.path("summary.json"));
    let metric = |name: &str, label: Option<(&str, &str)>| -> u64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => {
                    v as u64
                }
                _ => 0,
            })
            .sum()
    };
    assert_eq!(
        metric("weir_records_in_total", None),
        summary["records_in"].as_u64().expect("n")
    );
    assert_eq!(
        metric("weir_records_processed_total", None),
        summary["processed"].as_u64().expect("n")
    );
    assert_eq!(
        metric("weir_records_out_total", None),
        summary["records_out"].as_u64().expect("n")
    );
    assert_eq!(
        metric("weir_records_deduplicated_total", None),
        summary["deduplicated"].as_u64().expect("n")
    );
    assert_eq!(
        metric("weir_retries_total", None),
        summary["retried"].as_u64().expect("n")
    );
    assert_eq!(
        metric("weir_records_dead_lettered_total", None),
        summary["dead_lettered"].as_u64().expect("n")
    );
    for class in ["trap", "invalid"] {
        assert_eq!(
            metric("weir_records_dead_lettered_total", Some(("class", class))),
            summary["dead_lettered_by_class"][class]
                .as_u64()
                .expect("n"),
            "class {class}"
        );
    }
    assert_eq!(
        metric("weir_plugin_traps_total", Some(("class", "trap"))),
        5
    );
    assert_eq!(summary["records_in"], 50);
    assert_eq!(summary["deduplicated"], 5);
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "weir_plugin_active_info"
                && s.labels.get("plugin") == Some("faulty"))
    );
    assert!(scrape.samples.iter().any(|s| {
        s.metric
            .starts_with("weir_plugin_invocation_duration_seconds")
    }));
}

#[test]
fn filter_drops_records_as_processed_with_no_output() {
    let weir = Weir::new(WEIR);
    let input = weir.write_lines(
        "in.jsonl",
        [
            r#"{"id":"1","action":"view"}"#,
            r#"{"id":"2","action":"click"}"#,
            r#"{"id":"3","action":"view"}"#,
        ],
    );
    let run = weir.run_pipeline(
        &plugin("filter"),
        &input,
        &[
            "--plugin-config",
            "field=/action",
            "--plugin-config",
            "equals=view",
        ],
    );
    assert_eq!(
        run.outputs,
        vec![r#"{"id":"2","action":"click"}"#.to_owned()]
    );
    assert_eq!(run.count("processed"), 3);
    assert_eq!(run.count("records_out"), 1);
    assert_eq!(run.count("dead_lettered"), 0);
}

#[test]
fn split_fans_out_to_named_destinations() {
    let weir = Weir::new(WEIR);
    let input = weir.write_lines("in.jsonl", [r#"{"id":"1"}"#, r#"{"id":"2"}"#]);
    let run = weir.run_pipeline(
        &plugin("split"),
        &input,
        &[
            "--plugin-config",
            "to=audit,archive",
            "--destination",
            "audit=audit.jsonl",
            "--destination",
            "archive=archive.jsonl",
        ],
    );
    assert_eq!(run.count("records_out"), 4);
    assert!(run.outputs.is_empty(), "nothing goes to the default output");
    assert_eq!(
        read_lines(&weir.path("audit.jsonl")),
        vec![r#"{"id":"1"}"#, r#"{"id":"2"}"#]
    );
    assert_eq!(read_lines(&weir.path("archive.jsonl")).len(), 2);
}

#[test]
fn a_config_file_runs_and_flags_override_it() {
    let weir = Weir::new(WEIR);
    let input = weir.write_lines(
        "in.jsonl",
        [r#"{"id":"a","user_id":"u","ts":1}"#, r#"{"id":"b"}"#],
    );
    std::fs::write(
        weir.path("weir.toml"),
        format!(
            "[plugin]\npath = {:?}\n[source]\npath = {:?}\n[sink]\npath = \"from-file.jsonl\"\n\
             [pipeline]\nid = \"/id\"\nbatch_size = 1\n[state]\npath = \"st\"\n",
            plugin("enrich").to_str().expect("utf-8"),
            input.to_str().expect("utf-8"),
        ),
    )
    .expect("write");
    weir.run([
        "run",
        "--config",
        "weir.toml",
        "--output",
        "flag.jsonl",
        "--quiet",
    ])
    .success();
    assert_eq!(read_lines(&weir.path("flag.jsonl")).len(), 1);
    assert_eq!(read_json_lines(&weir.path("flag.dlq.jsonl")).len(), 1);
    assert!(!weir.path("from-file.jsonl").exists());
}

/// `WEIR_WASM_PERFMAP` (docs/plugins/rust.md) writes the perf map that names a plugin's
/// functions in a profile.
#[test]
fn the_perf_map_names_the_plugins_functions() {
    let weir = Weir::new(WEIR);
    let input = weir.write_lines(
        "in.jsonl",
        [event("e1", json!({"user_id": "u1", "ts": 1_700_000_000}))],
    );
    let child = weir
        .command([
            "run".as_ref(),
            "--plugin".as_ref(),
            plugin("enrich").as_os_str(),
            "--input".as_ref(),
            input.as_os_str(),
            "--output".as_ref(),
            "out.jsonl".as_ref(),
            "--quiet".as_ref(),
        ])
        .env("WEIR_WASM_PERFMAP", "1")
        .spawn()
        .expect("spawn weir");
    let map = std::path::PathBuf::from(format!("/tmp/perf-{}.map", child.id()));
    let finished = child.wait_with_output().expect("weir ran");
    assert!(finished.status.success(), "{finished:?}");
    let text = std::fs::read_to_string(&map).unwrap_or_default();
    let _ = std::fs::remove_file(&map);
    assert!(
        text.contains("enrich_core") && text.contains("transform-batch"),
        "{} does not name enrich's functions:\n{}",
        map.display(),
        &text[..text.len().min(500)]
    );
}
