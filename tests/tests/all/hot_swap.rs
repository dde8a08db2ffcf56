//! Hot swap on a running worker: `weir run --api ... --follow` reads a growing file; a new
//! version uploaded and activated over HTTP takes the next records without a restart, a
//! rollback brings the old one back, and every output names exactly the version that made it.

use crate::WEIR;
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use weir_tests::live::{self, Feeder, Running, Watcher};
use weir_tests::{Weir, free_port, plugin};

const TOKEN: &str = "swap-test-token";

fn http(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    weir_tests::http::request(port, TOKEN, method, path, body)
}

fn json(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    weir_tests::http::json(port, TOKEN, method, path, body)
}

fn events(from: usize, to: usize) -> Vec<String> {
    (from..to)
        .map(|i| format!(r#"{{"id":"e{i}","user_id":"u{i}","ts":1704067200,"action":"view"}}"#))
        .collect()
}

fn append(weir: &Weir, lines: &[String]) {
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(weir.path("in.jsonl"))
        .expect("input");
    for line in lines {
        writeln!(file, "{line}").expect("append");
    }
}

/// The output envelopes once there are `n` of them.
fn outputs(weir: &Weir, n: usize, log: &std::path::Path) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(weir.path("out.jsonl")).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("envelope"))
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} outputs after 60 s; log:\n{}",
            lines.len(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `n` output envelopes, newest first.
fn last_outputs(weir: &Weir, n: usize) -> Vec<Value> {
    let text = std::fs::read_to_string(weir.path("out.jsonl")).expect("out");
    text.lines()
        .rev()
        .take(n)
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

/// Every value of the `weir.plugin-version` header of one output.
fn versions(output: &Value) -> Vec<String> {
    output["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .filter(|h| h["name"] == "weir.plugin-version")
        .map(|h| h["value"].as_str().expect("text").to_owned())
        .collect()
}

/// A worker running the identity plugin (`faulty` with `faults=off`) as version 1 of `p`,
/// following `in.jsonl` into `out.jsonl` (envelopes, so headers show), with the API on
/// `port`; its stderr goes to `worker.log`.
fn start(weir: &Weir, port: u16, extra: &[&str]) -> Running {
    let mut args = vec!["--plugin-config", "faults=off"];
    args.extend(extra);
    start_with(weir, port, "faulty", &args)
}

/// As [`start`], with `first` as version 1 and no plugin configuration but `extra`.
fn start_with(weir: &Weir, port: u16, first: &str, extra: &[&str]) -> Running {
    let dir = weir.path(".");
    live::start_worker(WEIR, &dir, port, TOKEN, &plugin(first), extra)
}

/// Polls `GET path` until `done` says yes (30 s at most); the last answer.
fn poll(port: u16, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = json(port, "GET", path, b"");
        assert_eq!(status, 200, "{path}: {body}");
        if done(&body) || Instant::now() > deadline {
            return body;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Uploads the `plugin` component as a new version of `p` (201) and posts `activation` to
/// its activate route (200); the plugin as the activation left it.
fn push_and_activate(port: u16, plugin_name: &str, activation: &[u8]) -> Value {
    let bytes = std::fs::read(plugin(plugin_name)).expect("plugin built");
    let (status, version) = json(port, "POST", "/v1/plugins/p", &bytes);
    assert_eq!(status, 201, "{version}");
    let (status, body) = json(port, "POST", "/v1/plugins/p/activate", activation);
    assert_eq!(status, 200, "{body}");
    body
}

/// Events `enrich` takes and `faulty` (faults on) traps on.
fn trapping_events(from: usize, to: usize) -> Vec<String> {
    (from..to)
        .map(|i| format!(r#"{{"id":"e{i}","user_id":"u{i}","ts":1704067200,"fault":"trap"}}"#))
        .collect()
}

/// Waits until every record read has a fate; the status then.
fn all_accounted(port: u16, records_in: u64) -> Value {
    poll(port, "/v1/status", |s| {
        let t = &s["totals"];
        t["records_in"] == records_in
            && t["processed"].as_u64().unwrap_or(0) + t["dead_lettered"].as_u64().unwrap_or(0)
                == records_in
    })
}

fn quarantine_config(weir: &Weir) -> String {
    let path = weir.path("quarantine.toml");
    std::fs::write(&path, "[quarantine]\nmin_records = 5\n").expect("config");
    path.display().to_string()
}

#[test]
fn a_faulting_version_is_quarantined_back_to_the_previous_one() {
    let weir = Weir::new(WEIR);
    weir.write_lines("in.jsonl", trapping_events(0, 5));
    let port = free_port();
    let log = weir.path("worker.log");
    let config = quarantine_config(&weir);
    let _worker = start_with(&weir, port, "enrich", &["--config", &config]);
    outputs(&weir, 5, &log);
    push_and_activate(port, "faulty", br#"{"version":2}"#);
    append(&weir, &trapping_events(5, 25));
    let p = poll(port, "/v1/plugins/p", |p| p["active"] == 1);
    assert_eq!(p["active"], 1, "quarantined back to version 1: {p}");
    append(&weir, &trapping_events(25, 35));
    let status = all_accounted(port, 35);
    assert!(
        status["by_version"]["2"]["dead_lettered_by_class"]["trap"]
            .as_u64()
            .is_some_and(|n| n >= 5),
        "{status}"
    );
    // Version 1 took everything after the quarantine.
    let last = last_outputs(&weir, 10);
    assert!(last.iter().all(|o| versions(o) == ["1"]), "{last:?}");
    let (_, metrics) = http(port, "GET", "/metrics", b"");
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        weir_tests::metric_sum(
            &metrics,
            "weir_rollbacks_total",
            &[("reason", "quarantine")]
        ) == 1.0,
        "{metrics}"
    );
    let audit = std::fs::read_to_string(weir.path("state/registry/audit.jsonl")).expect("audit");
    assert!(
        audit.contains("accepted: automatic: quarantine: plugin-fault rate"),
        "{audit}"
    );
}

#[test]
fn a_faulting_version_with_nothing_to_fall_back_to_pauses_until_one_is_activated() {
    let weir = Weir::new(WEIR);
    weir.write_lines("in.jsonl", trapping_events(0, 5));
    let port = free_port();
    let config = quarantine_config(&weir);
    let _worker = start_with(&weir, port, "faulty", &["--config", &config]);
    all_accounted(port, 5);
    let audit_path = weir.path("state/registry/audit.jsonl");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&audit_path)
        .unwrap_or_default()
        .contains("paused: automatic: quarantine")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Paused: new records are read but wait.
    append(&weir, &trapping_events(5, 15));
    let waiting = poll(port, "/v1/status", |s| s["totals"]["records_in"] == 15);
    std::thread::sleep(Duration::from_millis(500));
    let (_, waiting_now) = json(port, "GET", "/v1/status", b"");
    assert_eq!(waiting["totals"]["records_in"], 15, "{waiting}");
    assert_eq!(
        waiting_now["totals"]["dead_lettered"], 5,
        "nothing ran while paused: {waiting_now}"
    );
    assert_eq!(waiting_now["totals"]["processed"], 0, "{waiting_now}");
    // An operator activates a version that works: the waiting records run on it.
    push_and_activate(port, "enrich", br#"{"version":2}"#);
    let status = all_accounted(port, 15);
    assert_eq!(status["by_version"]["2"]["processed"], 10, "{status}");
    assert_eq!(status["totals"]["dead_lettered"], 5, "{status}");
}

fn canary_config(weir: &Weir, min_records: u64, promote_after: u64) -> String {
    let path = weir.path("canary.toml");
    std::fs::write(
        &path,
        format!("[canary]\nmin_records = {min_records}\npromote_after_records = {promote_after}\n"),
    )
    .expect("config");
    path.display().to_string()
}

#[test]
fn a_healthy_canary_takes_its_share_then_is_promoted() {
    let weir = Weir::new(WEIR);
    weir.write_lines("in.jsonl", events(0, 5));
    let port = free_port();
    let log = weir.path("worker.log");
    let config = canary_config(&weir, 5, 10);
    let _worker = start(&weir, port, &["--config", &config]);
    outputs(&weir, 5, &log);
    // Started from the command line this time.
    let bytes = std::fs::read(plugin("enrich")).expect("plugin built");
    assert_eq!(json(port, "POST", "/v1/plugins/p", &bytes).0, 201);
    let activate = Command::new(WEIR)
        .args(["plugin", "activate", "p", "2", "--canary", "50"])
        .args(["--api", &format!("http://127.0.0.1:{port}")])
        .env("WEIR_ADMIN_TOKEN", TOKEN)
        .output()
        .expect("weir plugin activate");
    let printed = String::from_utf8_lossy(&activate.stdout);
    assert!(
        printed.contains("version 1 is active; version 2 is a canary with 50.0 % of the records"),
        "{printed}{}",
        String::from_utf8_lossy(&activate.stderr)
    );
    let (_, status) = json(port, "GET", "/v1/status", b"");
    assert_eq!(
        (
            &status["plugin"]["version"],
            &status["canary"]["version"],
            &status["canary"]["percent"]
        ),
        (&Value::from(1), &Value::from(2), &Value::from(50.0)),
        "{status}"
    );
    append(&weir, &events(5, 45));
    let split = outputs(&weir, 45, &log);
    let mut by_version = [0, 0];
    for output in &split[5..] {
        let version = versions(output);
        let enriched = output["value"].as_str().expect("value").contains("segment");
        match version.as_slice() {
            [v] if v == "1" && !enriched => by_version[0] += 1,
            [v] if v == "2" && enriched => by_version[1] += 1,
            _ => panic!("{output}"),
        }
    }
    assert!(
        by_version[0] > 0 && by_version[1] > 0,
        "both versions had records: {by_version:?}"
    );
    // Healthy after 10 records: promoted, by the worker itself.
    let p = poll(port, "/v1/plugins/p", |p| p["active"] == 2);
    assert_eq!(
        (&p["active"], &p["canary"]),
        (&Value::from(2), &Value::Null),
        "{p}"
    );
    append(&weir, &events(45, 55));
    let after = outputs(&weir, 55, &log);
    assert!(
        after[45..].iter().all(|o| versions(o) == ["2"]),
        "{:?}",
        &after[45..]
    );
    let status = poll(port, "/v1/status", |s| s["totals"]["processed"] == 55);
    assert_eq!(status["plugin"]["version"], 2, "{status}");
    let audit = std::fs::read_to_string(weir.path("state/registry/audit.jsonl")).expect("audit");
    assert!(
        audit.contains("automatic: canary healthy after 10 records"),
        "{audit}"
    );
}

#[test]
fn a_failing_canary_is_rolled_back_by_the_worker() {
    let weir = Weir::new(WEIR);
    weir.write_lines("in.jsonl", events(0, 5));
    let port = free_port();
    let log = weir.path("worker.log");
    let config = canary_config(&weir, 5, 0);
    let _worker = start(&weir, port, &["--config", &config]);
    outputs(&weir, 5, &log);
    push_and_activate(port, "enrich", br#"{"version":2,"canary_percent":50}"#);
    // Events without `user_id`: the identity passes them, the candidate (enrich) refuses them.
    let unenrichable: Vec<String> = (5..45)
        .map(|i| format!(r#"{{"id":"e{i}","ts":1}}"#))
        .collect();
    append(&weir, &unenrichable);
    let p = poll(port, "/v1/plugins/p", |p| p["canary"].is_null());
    assert_eq!(
        (&p["active"], &p["canary"]),
        (&Value::from(1), &Value::Null),
        "{p}"
    );
    let (_, metrics) = http(port, "GET", "/metrics", b"");
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        weir_tests::metric_sum(&metrics, "weir_rollbacks_total", &[("reason", "canary")]) == 1.0,
        "{metrics}"
    );
    let audit = std::fs::read_to_string(weir.path("state/registry/audit.jsonl")).expect("audit");
    assert!(
        audit.contains("automatic: canary invalid rate 100.0 %"),
        "{audit}"
    );
    // After the rollback every record runs on version 1 again.
    append(
        &weir,
        &(45..55)
            .map(|i| format!(r#"{{"id":"e{i}","ts":1}}"#))
            .collect::<Vec<_>>(),
    );
    let status = poll(port, "/v1/status", |s| {
        s["totals"]["records_in"] == 55
            && s["totals"]["processed"].as_u64().unwrap_or(0)
                + s["totals"]["dead_lettered"].as_u64().unwrap_or(0)
                == 55
    });
    let v2 = &status["by_version"]["2"];
    assert_eq!(v2["processed"], 0, "{status}");
    assert!(
        v2["dead_lettered_by_class"]["invalid"]
            .as_u64()
            .is_some_and(|n| n >= 5),
        "{status}"
    );
    let last = last_outputs(&weir, 10);
    assert!(last.iter().all(|o| versions(o) == ["1"]), "{last:?}");
}

#[test]
fn activation_and_rollback_swap_the_running_plugin() {
    let weir = Weir::new(WEIR);
    weir.write_lines("in.jsonl", events(0, 5));
    let port = free_port();
    let log = weir.path("worker.log");
    let worker = start(&weir, port, &[]);

    // Version 1 is the --plugin file, uploaded and activated at start.
    let first = outputs(&weir, 5, &log);
    assert!(first.iter().all(|o| versions(o) == ["1"]), "{first:?}");
    let (status, p) = json(port, "GET", "/v1/plugins/p", b"");
    assert_eq!((status, &p["active"]), (200, &Value::from(1)), "{p}");

    // Upload enrich as version 2 and activate it, with `weir plugin`: the next records go
    // through it.
    let cli = |args: &[&str]| {
        let api = format!("http://127.0.0.1:{port}");
        let out = Command::new(WEIR)
            .args(["plugin", "--api", &api])
            .args(args)
            .env("WEIR_ADMIN_TOKEN", TOKEN)
            .output()
            .expect("weir plugin");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let enrich = plugin("enrich");
    let (ok, stdout, stderr) = cli(&["push", enrich.to_str().expect("utf-8"), "--name", "p"]);
    assert!(ok && stdout.starts_with("p v2 "), "{stdout}{stderr}");
    let (ok, stdout, stderr) = cli(&["activate", "p", "9"]);
    assert!(
        !ok && stderr.contains("404") && stderr.contains("no version 9"),
        "{stdout}{stderr}"
    );
    let (ok, stdout, stderr) = cli(&["activate", "p", "2"]);
    assert!(
        ok && stdout.contains("version 2 is active"),
        "{stdout}{stderr}"
    );
    let (ok, stdout, _) = cli(&["list"]);
    assert!(
        ok && stdout
            .lines()
            .any(|l| l.starts_with("p v2 ") && l.ends_with("(active)")),
        "{stdout}"
    );
    append(&weir, &events(5, 10));
    let second = outputs(&weir, 10, &log);
    for output in &second[5..] {
        assert_eq!(versions(output), ["2"], "{output}");
        let value: Value =
            serde_json::from_str(output["value"].as_str().expect("value")).expect("JSON value");
        assert!(value.get("segment").is_some(), "not enriched: {value}");
    }

    // Roll back: version 1 (identity) again, no restart.
    let (status, body) = json(port, "POST", "/v1/plugins/p/rollback", b"");
    assert_eq!((status, &body["active"]), (200, &Value::from(1)), "{body}");
    append(&weir, &events(10, 15));
    let third = outputs(&weir, 15, &log);
    for output in &third[10..] {
        assert_eq!(versions(output), ["1"], "{output}");
        assert!(!output["value"].as_str().expect("value").contains("segment"));
    }
    assert_eq!(third.len(), 15, "one output per record: {third:?}");

    // /v1/status counts each version's records (counted once their fates are durable).
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let (code, status) = json(port, "GET", "/v1/status", b"");
        assert_eq!(code, 200, "{status}");
        if status["totals"]["processed"] == 15 || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status["ready"], true, "{status}");
    assert_eq!(status["plugin"]["version"], 1, "{status}");
    assert_eq!(status["totals"]["records_in"], 15, "{status}");
    assert_eq!(status["totals"]["processed"], 15, "{status}");
    assert_eq!(status["by_version"]["1"]["processed"], 10, "{status}");
    assert_eq!(status["by_version"]["2"]["processed"], 5, "{status}");
    assert_eq!(status["by_version"]["2"]["dead_lettered"], 0, "{status}");

    // `weir pipeline status` prints the same.
    let pipeline = Command::new(WEIR)
        .args([
            "pipeline",
            "status",
            "--api",
            &format!("http://127.0.0.1:{port}"),
        ])
        .env("WEIR_ADMIN_TOKEN", TOKEN)
        .output()
        .expect("weir pipeline status");
    let printed = String::from_utf8_lossy(&pipeline.stdout);
    assert!(pipeline.status.success(), "{printed}");
    assert!(
        printed.starts_with("p v1  sha256:") && printed.contains("ready"),
        "{printed}"
    );
    assert!(
        printed.contains("records: 15 in, 15 processed, 0 dead-lettered"),
        "{printed}"
    );
    assert!(
        printed.contains("  v2: 5 processed, 0 dead-lettered\n"),
        "{printed}"
    );

    // `/metrics` parses as Prometheus text, with the control plane's counts.
    let (_, metrics) = http(port, "GET", "/metrics", b"");
    let metrics = String::from_utf8_lossy(&metrics);
    let value = |name: &str, label: Option<(&str, &str)>| {
        weir_tests::metric_sum(&metrics, name, label.as_slice())
    };
    assert_eq!(value("weir_hot_swaps_total", None), 2.0, "{metrics}");
    assert_eq!(
        value("weir_plugin_uploads_total", Some(("result", "created"))),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        value("weir_plugin_active_info", Some(("version", "1"))),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        value("weir_plugin_active_info", None),
        1.0,
        "one active version: {metrics}"
    );
    assert_eq!(
        value("weir_rollbacks_total", None),
        0.0,
        "none automatic: {metrics}"
    );
    assert_eq!(value("weir_records_in_total", None), 15.0, "{metrics}");
    assert_eq!(
        value("weir_records_processed_total", None),
        15.0,
        "{metrics}"
    );
    drop(worker);
    // The same worker did all of it: the log shows both swaps.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        text.matches("plugin version swapped in").count(),
        2,
        "{text}"
    );
}

/// A live stream: a version activated, then rolled back, while records flow at a steady
/// rate. No record is lost or repeated, every output names exactly one version, and in the
/// output file the versions run 1, then 2, then 1 again, each switch once. Prints how long
/// each switch took to show in the output and the longest gap between outputs.
#[test]
fn a_live_stream_swaps_and_rolls_back_without_losing_or_repeating_a_record() {
    let weir = Weir::new(WEIR);
    weir.write_lines("in.jsonl", Vec::<String>::new());
    let port = free_port();
    let log = weir.path("worker.log");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let worker = start(&weir, port, &[]);
    let watcher = Watcher::start(weir.path("out.jsonl"));
    // 50 records every 10 ms: 5,000 records/s.
    let feeder = Feeder::start(weir.path("in.jsonl"), 50, Duration::from_millis(10));
    watcher.wait_for(2_000, Duration::from_secs(60), read_log);

    let enrich = std::fs::read(plugin("enrich")).expect("plugin built");
    assert_eq!(json(port, "POST", "/v1/plugins/p", &enrich).0, 201);
    // Asks for a switch to version `to`; how long the answer took, and the first output of
    // `to` (after the request) took to show.
    let switch = |path: &str, body: &[u8], to: &str| {
        let (asked, before) = (Instant::now(), watcher.count());
        let (status, answer) = json(port, "POST", path, body);
        assert_eq!(status, 200, "{answer}");
        let answered = asked.elapsed();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(first) = watcher
                .seen_from(before)
                .iter()
                .find(|s| s.versions == [to])
            {
                return (answered, first.at.saturating_duration_since(asked));
            }
            assert!(
                Instant::now() < deadline,
                "no version {to} output; log:\n{}",
                read_log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let (answered, shown) = switch("/v1/plugins/p/activate", br#"{"version":2}"#, "2");
    println!(
        "activation: answered in {} ms, first version-2 output {} ms after the request",
        answered.as_millis(),
        shown.as_millis()
    );
    std::thread::sleep(Duration::from_secs(1));
    let (answered, shown) = switch("/v1/plugins/p/rollback", b"", "1");
    println!(
        "rollback: answered in {} ms, first version-1 output {} ms after the request",
        answered.as_millis(),
        shown.as_millis()
    );
    std::thread::sleep(Duration::from_secs(1));
    let fed = feeder.stop();
    watcher.wait_for(fed, Duration::from_secs(60), read_log);
    drop(worker);
    let seen = watcher.stop();

    assert_eq!(seen.len(), fed, "one output per record");
    let ids: std::collections::BTreeSet<&str> = seen.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids.len(), fed, "no record repeated");
    assert!(
        (0..fed).all(|i| ids.contains(format!("e{i}").as_str())),
        "none lost"
    );
    assert!(
        seen.iter().all(|s| s.versions.len() == 1),
        "one version each"
    );
    let mut runs: Vec<&str> = Vec::new();
    for s in &seen {
        if runs.last() != Some(&s.versions[0].as_str()) {
            runs.push(&s.versions[0]);
        }
    }
    assert_eq!(runs, ["1", "2", "1"], "versions in output order");
    let mut latencies: Vec<u64> = seen.iter().map(|s| s.latency_us).collect();
    println!(
        "{fed} records at 5,000/s: longest gap between outputs {} ms; latency p50 {} ms, p99 {} ms",
        live::longest_gap(&seen).as_millis(),
        live::quantile(&mut latencies, 0.5) / 1000,
        live::quantile(&mut latencies, 0.99) / 1000
    );
}

/// Uploads are compiled in a child process whose resident memory is capped: under a cap
/// smaller than any compilation needs, an upload is refused (422), counted and audited, and
/// nothing is stored.
#[test]
fn an_upload_compiling_over_the_memory_cap_is_refused() {
    let weir = Weir::new(WEIR);
    weir.write_lines("in.jsonl", events(0, 1));
    let port = free_port();
    let config = weir.path("tight.toml");
    std::fs::write(&config, "[api]\ncompile_memory_mb = 1\n").expect("config");
    let _worker = start(&weir, port, &["--config", config.to_str().expect("utf-8")]);
    let bytes = std::fs::read(plugin("enrich")).expect("plugin built");
    let (status, body) = json(port, "POST", "/v1/plugins/p", &bytes);
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("more than api.compile_memory_mb = 1 MiB")),
        "{body}"
    );
    let (_, p) = json(port, "GET", "/v1/plugins/p", b"");
    assert_eq!(p["versions"].as_array().map(Vec::len), Some(1), "{p}");
    let (_, metrics) = http(port, "GET", "/metrics", b"");
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        weir_tests::metric_sum(
            &metrics,
            "weir_plugin_uploads_total",
            &[("result", "compile_memory")]
        ) == 1.0,
        "{metrics}"
    );
    let audit = std::fs::read_to_string(weir.path("state/registry/audit.jsonl")).expect("audit");
    assert!(
        audit.contains("refused: compiling the upload took more than"),
        "{audit}"
    );
}
