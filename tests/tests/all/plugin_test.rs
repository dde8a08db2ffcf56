//! `weir test`, the plugin author's harness: exit 0 when a plugin matches its expectations,
//! non-zero with a readable diff when not, and the right classes for faulty plugins.

use crate::WEIR;
use weir_tests::{Weir, faulty_events, plugin, repo_root};

fn vectors(name: &str) -> String {
    repo_root()
        .join("tests/vectors/enrich")
        .join(name)
        .display()
        .to_string()
}

fn test_vectors(plugin_name: &str) {
    let weir = Weir::new(WEIR);
    let plugin = plugin(plugin_name);
    let out = weir
        .run([
            "test",
            plugin.to_str().expect("utf-8"),
            "--input",
            &vectors("input.jsonl"),
            "--expect",
            &vectors("expected.jsonl"),
        ])
        .success()
        .stdout();
    assert!(out.contains("every record matches"), "{out}");
    assert!(out.contains("36 records: 17 ok, 19 dead-lettered"), "{out}");
    assert!(
        out.contains("µs/record") && out.contains("peak memory"),
        "{out}"
    );
}

#[test]
fn every_language_matches_the_vectors() {
    for plugin in ["enrich", "enrich-python", "enrich-js", "enrich-c"] {
        test_vectors(plugin);
    }
}

#[test]
fn a_difference_fails_with_a_readable_diff() {
    let weir = Weir::new(WEIR);
    let expected = std::fs::read_to_string(vectors("expected.jsonl")).expect("read");
    let wrong = expected.replacen("seg-9", "seg-3", 1).replacen(
        r#""reason_contains": "JSON""#,
        r#""reason_contains": "YAML""#,
        1,
    );
    std::fs::write(weir.path("wrong.jsonl"), wrong).expect("write");
    let enrich = plugin("enrich");
    let run = weir.run([
        "test",
        enrich.to_str().expect("utf-8"),
        "--input",
        &vectors("input.jsonl"),
        "--expect",
        "wrong.jsonl",
    ]);
    assert!(!run.output.status.success());
    let out = run.stdout();
    assert!(out.contains("2 difference(s)"), "{out}");
    assert!(
        out.contains("line 1: expected output") && out.contains("\"segment\":\"seg-3\""),
        "{out}"
    );
    assert!(
        out.contains("got output") && out.contains("\"segment\":\"seg-9\""),
        "{out}"
    );
    assert!(
        out.contains("line 18: expected dead letter invalid with a reason containing `YAML`"),
        "{out}"
    );
    assert!(
        run.stderr().contains("2 of 36 records differ"),
        "{}",
        run.stderr()
    );
}

#[test]
fn faulty_plugins_show_their_classes() {
    let weir = Weir::new(WEIR);
    let faults = ["trap", "panic", "loop", "memory", "oversize", "invalid"];
    weir.write_lines("in.jsonl", faulty_events(7, |i| faults.get(i).copied()));
    let faulty = plugin("faulty");
    let out = weir
        .run([
            "test",
            faulty.to_str().expect("utf-8"),
            "--input",
            "in.jsonl",
            "--deadline-ms",
            "300",
            "--memory-mb",
            "32",
        ])
        .success()
        .stdout();
    let class_of = |line: usize| {
        out.lines()
            .find(|l| l.starts_with(&format!("line {line} ")))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or_else(|| panic!("no line {line} in:\n{out}"))
            .to_owned()
    };
    let classes: Vec<String> = (1..=7).map(class_of).collect();
    assert_eq!(
        classes,
        [
            "trap",
            "trap",
            "timeout",
            "oom",
            "bad_output",
            "invalid",
            "ok"
        ],
        "{out}"
    );
    assert!(out.contains("faulty plugin panicked on record e1"), "{out}");
}
