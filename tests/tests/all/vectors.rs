//! Every language's `enrich` plugin passes every committed vector (tests/vectors/enrich), and
//! the Rust and Python `metrics` plugins theirs (tests/vectors/metrics, state included)
//! through the host: outputs equal as RFC 8785 canonical JSON, DLQ classes and reasons.

use crate::WEIR;
use weir_tests::{Weir, canonical, error_field, plugin, read_lines, repo_root};

/// Runs `plugin_file` over the vectors and checks outputs canonically and DLQ classes and reasons.
fn check_vectors(plugin_file: &std::path::Path) {
    let dir = repo_root().join("tests/vectors/enrich");
    let expected: Vec<serde_json::Value> = read_lines(&dir.join("expected.jsonl"))
        .iter()
        .map(|l| {
            if l.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_str(l).expect("expected line")
            }
        })
        .collect();
    let weir = Weir::new(WEIR);
    let run = weir.run_pipeline(
        plugin_file,
        &dir.join("input.jsonl"),
        &["--batch-size", "7"],
    );

    let mut outputs = run.outputs.iter();
    let mut dead = run.dead_letters.iter();
    let mut checked = 0;
    for (i, want) in expected.iter().enumerate() {
        let line = i + 1;
        if let Some(want_out) = want.get("output") {
            let got = outputs
                .next()
                .unwrap_or_else(|| panic!("line {line}: no output left"));
            let got: serde_json::Value = serde_json::from_str(got).expect("output is JSON");
            assert_eq!(
                canonical(&got),
                canonical(want_out),
                "line {line}: output differs"
            );
            checked += 1;
        } else if let Some(want_dead) = want.get("dead_letter") {
            let got = dead
                .next()
                .unwrap_or_else(|| panic!("line {line}: no dead letter left"));
            assert_eq!(
                error_field(got, "offset"),
                line.to_string(),
                "line {line}: dead letters out of order"
            );
            assert_eq!(
                error_field(got, "class"),
                want_dead["class"].as_str().expect("class"),
                "line {line}"
            );
            let reason = error_field(got, "message");
            let needle = want_dead["reason_contains"]
                .as_str()
                .expect("reason_contains");
            assert!(
                reason.contains(needle),
                "line {line}: reason `{reason}` lacks `{needle}`"
            );
            checked += 1;
        }
    }
    assert!(outputs.next().is_none(), "more outputs than expected");
    assert!(dead.next().is_none(), "more dead letters than expected");
    assert!(checked >= 30, "only {checked} vectors checked");
    assert_eq!(run.count("records_in"), checked as u64);
}

#[test]
fn rust_enrich_passes_every_vector() {
    check_vectors(&plugin("enrich"));
}

#[test]
fn python_enrich_passes_every_vector() {
    check_vectors(&plugin("enrich-python"));
}

#[test]
fn javascript_enrich_passes_every_vector() {
    check_vectors(&plugin("enrich-js"));
}

#[test]
fn c_enrich_passes_every_vector() {
    check_vectors(&plugin("enrich-c"));
}

/// `weir test` of a `metrics` plugin against tests/vectors/metrics: outputs, dead letters and
/// the keyed state after the last record.
fn check_metrics_vectors(plugin_file: &std::path::Path) {
    let dir = repo_root().join("tests/vectors/metrics");
    let path = |name: &str| dir.join(name).display().to_string();
    let weir = Weir::new(WEIR);
    let plugin_path = plugin_file.display().to_string();
    let (input, expected, state) = (
        path("input.jsonl"),
        path("expected.jsonl"),
        path("expected_state.jsonl"),
    );
    let finished = weir.run([
        "test",
        plugin_path.as_str(),
        "--input",
        &input,
        "--expect",
        &expected,
        "--expect-state",
        &state,
    ]);
    let stdout = finished.stdout();
    assert!(
        finished.output.status.success(),
        "{stdout}\n{}",
        finished.stderr()
    );
    assert!(stdout.contains("every record matches"), "{stdout}");
    assert!(stdout.contains("the state matches"), "{stdout}");
    assert!(
        stdout.contains("20 records: 14 ok, 6 dead-lettered"),
        "{stdout}"
    );
}

#[test]
fn rust_metrics_passes_every_vector() {
    check_metrics_vectors(&plugin("metrics"));
}

#[test]
fn python_metrics_passes_every_vector() {
    check_metrics_vectors(&plugin("metrics-python"));
}
