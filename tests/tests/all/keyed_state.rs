//! Stateful plugins in embedded mode (docs/state.md): the `metrics` example's state and
//! outputs against the truth computed here from the input, a record's writes undone by
//! every way it can fail, and state that lasts across runs, scoped by the plugin's name.

use crate::WEIR;
use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde_json::{Value, json};
use weir_tests::{Weir, event, metric_sum, plugin};

/// `n` events of 37 users over 5 UTC days, with actions of every kind, some invalid
/// (empty `user_id`) and some repeated (the same id again).
pub(crate) fn events(n: usize) -> Vec<String> {
    let actions = ["view", "click", "add_to_cart", "purchase", "share", "view"];
    let mut lines: Vec<String> = Vec::new();
    for i in 0..n {
        if i % 23 == 7 {
            lines.push(lines[i / 2].clone()); // a duplicate by id
            continue;
        }
        let user = if i % 31 == 5 {
            String::new()
        } else {
            format!("user-{}", (i * 7) % 37)
        };
        let ts = 1_767_225_600 + (i as i64) * 211; // 2026-01-01, ~5 days in all
        lines.push(event(
            &format!("e{i}"),
            json!({"user_id": user, "ts": ts, "action": actions[(i * 5) % actions.len()]}),
        ));
    }
    lines
}

/// What `metrics` must make of `lines`, computed from its spec: (outputs in order, state).
pub(crate) fn truth(lines: &[String]) -> (Vec<Value>, BTreeMap<String, String>) {
    let rank = |a: &str| {
        ["view", "add_to_cart", "purchase"]
            .iter()
            .position(|s| *s == a)
    };
    let mut seen_ids = HashSet::new();
    let (mut outputs, mut state) = (Vec::new(), BTreeMap::new());
    for line in lines {
        let e: Value = serde_json::from_str(line).expect("JSON");
        let (id, user, ts) = (
            e["id"].as_str().expect("id"),
            e["user_id"].as_str().expect("user_id"),
            e["ts"].as_i64().expect("ts"),
        );
        if !seen_ids.insert(id.to_owned()) || user.is_empty() {
            continue; // a duplicate never runs; an invalid event writes nothing
        }
        let count = state
            .get(&format!("count/{user}"))
            .map_or(0, |c: &String| c.parse::<u64>().expect("a count"));
        state.insert(format!("count/{user}"), (count + 1).to_string());
        let day = chrono_day(ts);
        if state
            .insert(format!("seen/{user}/{day}"), "1".into())
            .is_none()
        {
            outputs.push(json!({"type": "active_user", "user_id": user, "day": day, "id": id}));
        }
        let action = e["action"].as_str().expect("action");
        if let Some(r) = rank(action) {
            let previous = state.get(&format!("stage/{user}")).cloned();
            if previous.as_deref().and_then(rank).is_none_or(|was| r > was) {
                state.insert(format!("stage/{user}"), action.into());
                outputs.push(json!({"type": "funnel", "user_id": user, "stage": action, "from": previous, "id": id}));
            }
        }
    }
    (outputs, state)
}

/// `YYYY-MM-DD` of a timestamp in 2026 (the events' year), counted here by hand.
fn chrono_day(ts: i64) -> String {
    let days_in = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let mut day = (ts - 1_767_225_600).div_euclid(86_400); // days since 2026-01-01
    let mut month = 0;
    while day >= days_in[month] {
        day -= days_in[month];
        month += 1;
    }
    format!("2026-{:02}-{:02}", month + 1, day + 1)
}

#[test]
fn metrics_state_and_outputs_are_what_the_input_makes_and_a_rerun_changes_nothing() {
    let weir = Weir::new(WEIR);
    let lines = events(3000);
    let input = weir.write_lines("in.jsonl", &lines);
    let (want_outputs, want_state) = truth(&lines);
    let run = weir.run_pipeline(
        &plugin("metrics"),
        &input,
        &["--id", "/id", "--batch-size", "64"],
    );
    let outputs: Vec<Value> = (run.outputs.iter())
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert_eq!(outputs.len(), want_outputs.len());
    assert!(outputs == want_outputs, "outputs differ from the spec's");
    let state = weir.keyed_state("metrics");
    assert_eq!(state.len(), want_state.len());
    assert!(state == want_state, "state differs from the spec's");
    let invalid: HashSet<&String> = (lines.iter())
        .filter(|l| l.contains(r#""user_id":"""#))
        .collect();
    assert_eq!(
        run.count("dead_lettered"),
        invalid.len() as u64,
        "one dead letter per invalid id"
    );
    assert!(run.count("deduplicated") > 0);

    let again = weir.run_pipeline(&plugin("metrics"), &input, &["--id", "/id"]);
    assert_eq!(again.count("processed"), 0);
    assert_eq!(again.outputs.len(), outputs.len(), "no new outputs");
    assert!(
        weir.keyed_state("metrics") == want_state,
        "a rerun changed state"
    );
}

#[test]
fn a_record_that_fails_after_writing_leaves_no_trace_in_state() {
    let weir = Weir::new(WEIR);
    // Every record writes `seen/<id>` and raises `count`, then (maybe) fails.
    let failing = [
        ("t", "trap"),
        ("p", "panic"),
        ("i", "invalid"),
        ("r", "retry_forever"),
        ("l", "loop"),
        ("m", "memory"),
        ("d", "bad_destination"),
        ("o", "oversize"),
        ("k", "big_key"),
        ("v", "big_value"),
        ("w", "many_writes"),
        ("h", "host_key"),
    ];
    let mut lines = vec![event("ok1", json!({}))];
    lines.extend(
        failing
            .iter()
            .map(|(id, fault)| event(id, json!({"fault": fault}))),
    );
    lines.push(event("flaky", json!({"fault": "retry"}))); // retryable twice, then passes
    lines.push(event("ok2", json!({})));
    let input = weir.write_lines("in.jsonl", &lines);
    let run = weir.run_pipeline(
        &plugin("faulty_stateful"),
        &input,
        &[
            "--id",
            "/id",
            "--max-attempts",
            "3",
            "--deadline-ms",
            "300",
            "--memory-mb",
            "64",
        ],
    );
    let classes: BTreeMap<String, String> = run.dead_classes().into_iter().collect();
    let want: BTreeMap<String, String> = [
        ("t", "trap"),
        ("p", "trap"),
        ("i", "invalid"),
        ("r", "retries_exhausted"),
        ("l", "timeout"),
        ("m", "oom"),
        ("d", "bad_output"),
        ("o", "bad_output"),
        ("k", "bad_output"),
        ("v", "bad_output"),
        ("w", "bad_output"),
        ("h", "bad_output"),
    ]
    .into_iter()
    .map(|(id, class)| (id.to_owned(), class.to_owned()))
    .collect();
    assert_eq!(classes, want);
    let reason = |id: &str| {
        let d = run
            .dead_letters
            .iter()
            .find(|d| d["error"]["record_id"] == id)
            .expect(id);
        d["error"]["message"].as_str().expect("message").to_owned()
    };
    assert!(
        reason("k").contains("state key of 2048 bytes"),
        "{}",
        reason("k")
    );
    assert!(
        reason("v").contains("state value of 100000 bytes"),
        "{}",
        reason("v")
    );
    assert!(
        reason("w").contains("state writes for one record"),
        "{}",
        reason("w")
    );

    assert!(reason("h").contains("byte 0xff"), "{}", reason("h"));

    let state = weir.keyed_state("faulty_stateful");
    let keys: BTreeSet<&str> = state.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        BTreeSet::from(["count", "seen/flaky", "seen/ok1", "seen/ok2"])
    );
    assert_eq!(
        state["count"], "3",
        "three records processed, each counted once"
    );
}

#[test]
fn state_lasts_across_runs_and_belongs_to_the_plugins_name() {
    let weir = Weir::new(WEIR);
    let run = |name: &str, ids: &[&str]| {
        let lines: Vec<String> = ids.iter().map(|id| event(id, json!({}))).collect();
        let input = weir.write_lines(&format!("{name}-{}.jsonl", ids[0]), &lines);
        weir.run_pipeline(
            &plugin("faulty_stateful"),
            &input,
            &["--id", "/id", "--plugin-name", name],
        );
        weir.keyed_state(name)
    };
    assert_eq!(run("counter", &["a", "b"])["count"], "2");
    assert_eq!(
        run("counter", &["c", "d", "e"])["count"],
        "5",
        "the second run read the first's"
    );
    assert_eq!(
        run("other", &["f"])["count"],
        "1",
        "another name, another state"
    );
}

#[test]
fn a_run_killed_half_way_and_run_again_leaves_the_state_and_outputs_of_one_clean_run() {
    let weir = Weir::new(WEIR);
    let lines = events(40_000);
    let input = weir.write_lines("in.jsonl", &lines);
    let (want_outputs, want_state) = truth(&lines);
    let plugin_path = plugin("metrics").display().to_string();
    let input_path = input.display().to_string();
    let run_args = [
        "run",
        "--plugin",
        &plugin_path,
        "--input",
        &input_path,
        "--output",
        "out.jsonl",
        "--state",
        "state",
        "--id",
        "/id",
        "--batch-size",
        "32",
        "--quiet",
    ];
    let mut child = weir.command(run_args).spawn().expect("spawn weir");
    let out = weir.path("out.jsonl");
    let started = std::time::Instant::now();
    while weir_tests::read_lines(&out).len() < want_outputs.len() / 3 {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the run ended before the kill"
        );
        assert!(started.elapsed().as_secs() < 120, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    weir_tests::signal(child.id(), libc::SIGKILL);
    let _ = child.wait();
    let at_kill = weir_tests::read_lines(&out).len();

    let rerun = weir.run(run_args).success();
    eprintln!(
        "killed at {at_kill} output lines of {}; the rerun said: {}",
        want_outputs.len(),
        rerun
            .stderr()
            .lines()
            .find(|l| l.contains("cut"))
            .unwrap_or("(nothing cut)")
    );
    let written = weir_tests::read_lines(&out);
    let outputs: Vec<Value> = (written.iter())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a torn line {l:?}: {e}")))
        .collect();
    assert_eq!(
        outputs.len(),
        want_outputs.len(),
        "outputs lost or repeated"
    );
    assert!(
        outputs == want_outputs,
        "outputs differ from one clean run's"
    );
    let dead_letters = weir_tests::read_lines(&weir.path("out.dlq.jsonl"));
    let invalid: HashSet<&String> = (lines.iter())
        .filter(|l| l.contains(r#""user_id":"""#))
        .collect();
    assert_eq!(
        dead_letters.len(),
        invalid.len(),
        "dead letters lost or repeated"
    );
    assert!(
        weir.keyed_state("metrics") == want_state,
        "state after the kill and the rerun differs from one clean run's"
    );
}

#[test]
fn state_reads_writes_and_bytes_are_counted() {
    use std::io::Write;
    let weir = Weir::new(WEIR);
    let port = weir_tests::free_port();
    let plugin_path = plugin("faulty_stateful").display().to_string();
    let metrics_addr = format!("127.0.0.1:{port}");
    let mut child = weir
        .command([
            "run",
            "--plugin",
            &plugin_path,
            "--input",
            "-",
            "--output",
            "out.jsonl",
            "--state",
            "state",
            "--id",
            "/id",
            "--quiet",
            "--metrics",
            &metrics_addr,
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    // Each record reads `count` once and writes `seen/<id>` = 1 and `count`; the invalid
    // one's two writes are undone, its read still counted.
    for line in [
        event("a", json!({})),
        event("b", json!({})),
        event("c", json!({"fault": "invalid"})),
    ] {
        writeln!(stdin, "{line}").expect("write");
    }
    stdin.flush().expect("flush");
    let started = std::time::Instant::now();
    let exposition = loop {
        let (_, body) = weir_tests::http::request(port, "", "GET", "/metrics", b"");
        let text = String::from_utf8(body).expect("UTF-8");
        let fated = metric_sum(&text, "weir_records_processed_total", &[])
            + metric_sum(
                &text,
                "weir_records_dead_lettered_total",
                &[("class", "invalid")],
            );
        if fated >= 3.0 {
            break text;
        }
        assert!(
            started.elapsed().as_secs() < 60,
            "3 records not done in 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    drop(stdin);
    let _ = child.wait();
    assert_eq!(metric_sum(&exposition, "weir_state_reads_total", &[]), 3.0);
    assert_eq!(metric_sum(&exposition, "weir_state_writes_total", &[]), 4.0);
    // "seen/a" + "1", "count" + "1"; "seen/b" + "1", "count" + "2".
    assert_eq!(
        metric_sum(&exposition, "weir_state_write_bytes_total", &[]),
        26.0
    );
}

#[test]
fn a_value_set_to_expire_is_gone_after_its_time() {
    let weir = Weir::new(WEIR);
    let input = weir.write_lines("in.jsonl", [event("x", json!({"fault": "expiring"}))]);
    weir.run_pipeline(&plugin("faulty_stateful"), &input, &["--id", "/id"]);
    assert_eq!(
        weir.keyed_state("faulty_stateful")
            .get("ttl/x")
            .map(String::as_str),
        Some("1")
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let state = weir.keyed_state("faulty_stateful");
    assert!(
        !state.contains_key("ttl/x"),
        "expired, still shown: {state:?}"
    );
    assert_eq!(state["seen/x"], "1", "what does not expire stays");
}
