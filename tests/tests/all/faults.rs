//! Plugin faults never crash or stall the host: each faulty record gets its own class in the
//! DLQ and every other record is output.

use crate::WEIR;
use std::collections::BTreeSet;

use serde_json::json;
use weir_tests::{Weir, error_field, event, faulty_events, plugin};

#[test]
fn one_percent_traps_dead_letter_exactly_the_culprits() {
    let weir = Weir::new(WEIR);
    // 20 culprits in 2000 records; the first batch of 64 holds three of them.
    let mut culprits: BTreeSet<usize> = [3, 7, 40].into();
    culprits.extend((1..=17).map(|k| 100 + k * 109));
    assert_eq!(culprits.len(), 20);
    let lines = faulty_events(2000, |i| culprits.contains(&i).then_some("trap"));
    let input = weir.write_lines("in.jsonl", lines);
    let run = weir.run_pipeline(
        &plugin("faulty"),
        &input,
        &["--id", "/id", "--batch-size", "64"],
    );

    let dead: BTreeSet<String> = run
        .dead_classes()
        .into_iter()
        .map(|(id, class)| {
            assert_eq!(class, "trap");
            id
        })
        .collect();
    let want: BTreeSet<String> = culprits.iter().map(|i| format!("e{i}")).collect();
    assert_eq!(dead, want);
    assert_eq!(run.outputs.len(), 1980);
    assert!(run.outputs.iter().all(|o| !o.contains("fault")));
    assert_eq!(run.count("records_in"), 2000);
    assert_eq!(run.count("processed"), 1980);
    assert_eq!(run.count("dead_lettered"), 20);
    // One host process handled every batch: the run exited normally, not by a signal.
    assert_eq!(run.finished.output.status.code(), Some(0));
    for d in &run.dead_letters {
        assert!(error_field(d, "message").contains("unreachable"), "{d}");
        assert!(
            error_field(d, "backtrace").contains("wasm backtrace"),
            "{d}"
        );
        assert_eq!(error_field(d, "plugin"), "faulty");
        assert!(error_field(d, "plugin_digest").starts_with("sha256:"));
    }
}

#[test]
fn infinite_loop_times_out_within_the_bound_and_the_run_continues() {
    let weir = Weir::new(WEIR);
    let batch = 64;
    let deadline_ms = 500;
    let input = weir.write_lines(
        "in.jsonl",
        faulty_events(200, |i| (i == 70).then_some("loop")),
    );
    let run = weir.run_pipeline(
        &plugin("faulty"),
        &input,
        &["--id", "/id", "--batch-size", "64", "--deadline-ms", "500"],
    );
    assert_eq!(
        run.dead_classes(),
        vec![("e70".to_owned(), "timeout".to_owned())]
    );
    assert_eq!(run.outputs.len(), 199);
    // The whole run (start-up and 200 records included) stays inside the bound the issue
    // sets for isolating one looping record: (ceil(log2 batch) + 2) x deadline + 1 s.
    let bound_ms = ((batch as f64).log2().ceil() as u64 + 2) * deadline_ms + 1000;
    let took = run.finished.elapsed.as_millis() as u64;
    println!("loop isolated in a run of {took} ms (bound {bound_ms} ms)");
    assert!(took <= bound_ms, "run took {took} ms, bound {bound_ms} ms");
}

#[test]
fn panic_is_a_trap_with_the_panic_message() {
    let weir = Weir::new(WEIR);
    let input = weir.write_lines(
        "in.jsonl",
        [
            event("ok1", json!({})),
            event("boom", json!({"fault": "panic"})),
            event("ok2", json!({})),
        ],
    );
    let run = weir.run_pipeline(&plugin("faulty"), &input, &["--id", "/id"]);
    assert_eq!(
        run.dead_classes(),
        vec![("boom".to_owned(), "trap".to_owned())]
    );
    let message = error_field(&run.dead_letters[0], "message");
    assert!(
        message.contains("faulty plugin panicked on record boom"),
        "{message}"
    );
    assert_eq!(run.outputs.len(), 2);
}

#[test]
fn output_the_host_cannot_accept_is_bad_output() {
    let weir = Weir::new(WEIR);
    let input = weir.write_lines(
        "in.jsonl",
        [
            event("dest", json!({"fault": "bad_destination"})),
            event("big", json!({"fault": "oversize"})),
            event("fine", json!({})),
        ],
    );
    let run = weir.run_pipeline(&plugin("faulty"), &input, &["--id", "/id"]);
    assert_eq!(
        run.dead_classes(),
        vec![
            ("dest".to_owned(), "bad_output".to_owned()),
            ("big".to_owned(), "bad_output".to_owned())
        ]
    );
    assert!(error_field(&run.dead_letters[0], "message").contains("nowhere"));
    assert!(error_field(&run.dead_letters[1], "message").contains("limit"));
    assert_eq!(run.outputs.len(), 1);
}

#[test]
fn retryable_then_ok_is_output_after_k_retries() {
    let weir = Weir::new(WEIR);
    let input = weir.write_lines(
        "in.jsonl",
        [
            event("flaky", json!({"fault": "retry"})),
            event("fine", json!({})),
        ],
    );
    let run = weir.run_pipeline(
        &plugin("faulty"),
        &input,
        &[
            "--id",
            "/id",
            "--plugin-config",
            "retry_attempts=3",
            "--max-attempts",
            "5",
        ],
    );
    assert!(run.dead_letters.is_empty(), "{:?}", run.dead_letters);
    assert_eq!(run.outputs.len(), 2);
    assert_eq!(run.count("retried"), 3);
    assert_eq!(run.count("processed"), 2);
}

#[test]
fn retryable_forever_is_retries_exhausted_after_the_bound() {
    let weir = Weir::new(WEIR);
    let input = weir.write_lines(
        "in.jsonl",
        [event("never", json!({"fault": "retry_forever"}))],
    );
    let run = weir.run_pipeline(
        &plugin("faulty"),
        &input,
        &["--id", "/id", "--max-attempts", "3"],
    );
    assert_eq!(
        run.dead_classes(),
        vec![("never".to_owned(), "retries_exhausted".to_owned())]
    );
    let d = &run.dead_letters[0];
    assert_eq!(error_field(d, "attempts"), "3");
    let (first, last): (i64, i64) = (
        error_field(d, "first_failure_ms").parse().expect("ms"),
        error_field(d, "last_failure_ms").parse().expect("ms"),
    );
    assert!(first <= last);
    assert_eq!(run.count("retried"), 2);
}

#[test]
fn invalid_goes_straight_to_the_dlq_without_retries() {
    let weir = Weir::new(WEIR);
    let input = weir.write_lines("in.jsonl", [event("bad", json!({"fault": "invalid"}))]);
    let run = weir.run_pipeline(&plugin("faulty"), &input, &["--id", "/id"]);
    assert_eq!(
        run.dead_classes(),
        vec![("bad".to_owned(), "invalid".to_owned())]
    );
    assert_eq!(run.count("retried"), 0);
    assert_eq!(error_field(&run.dead_letters[0], "attempts"), "1");
}

/// A record that takes the worker down is retried alone, and after
/// `pipeline.crash_loop_limit` deaths (3) it is dead-lettered as `crash_loop`; every other
/// record is output. The worker dies through the test hook `WEIR_TEST_ABORT_ON_ID`, which
/// aborts the process when that record enters the plugin.
#[test]
fn a_record_that_crashes_the_worker_three_times_is_dead_lettered_as_crash_loop() {
    let weir = Weir::new(WEIR);
    weir.write_lines(
        "in.jsonl",
        (0..20).map(|i| {
            let fields = json!({ "user_id": "u1", "ts": 1704067200, "action": "view" });
            event(&format!("e{i}"), fields)
        }),
    );
    let args = |weir: &Weir| {
        let mut cmd = weir.command([
            "run",
            "--input",
            "in.jsonl",
            "--output",
            "out.jsonl",
            "--state",
            "state",
            "--id",
            "/id",
            "--quiet",
            "--plugin",
        ]);
        cmd.arg(plugin("enrich"))
            .env(weir::pipeline::ABORT_ON_ID_ENV, "e7");
        cmd
    };
    let mut died = 0;
    for run in 1..=4 {
        let out = args(&weir).output().expect("weir run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        if run <= 3 {
            assert!(
                !out.status.success(),
                "run {run} should die on e7: {stderr}"
            );
            died += 1;
            if run > 1 {
                assert!(stderr.contains("the last run died with"), "{stderr}");
            }
        } else {
            assert!(out.status.success(), "run {run}: {stderr}");
        }
    }
    assert_eq!(died, 3);
    let outputs = weir_tests::read_json_lines(&weir.path("out.jsonl"));
    let output_ids: BTreeSet<String> = outputs
        .iter()
        .map(|o| o["id"].as_str().expect("id").to_owned())
        .collect();
    let expected: BTreeSet<String> = (0..20)
        .filter(|&i| i != 7)
        .map(|i| format!("e{i}"))
        .collect();
    assert_eq!(output_ids, expected, "every other record is output");
    let dead = weir_tests::read_json_lines(&weir.path("out.dlq.jsonl"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(error_field(&dead[0], "class"), "crash_loop");
    assert_eq!(error_field(&dead[0], "record_id"), "e7");
    assert_eq!(error_field(&dead[0], "attempts"), "3");
    assert!(
        error_field(&dead[0], "message").contains("died 3 times"),
        "{dead:?}"
    );
}
