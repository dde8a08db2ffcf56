//! `weir reconcile` on real runs: a clean run is 100 % complete (dead letters and repeated
//! ids accounted for); an output with records deliberately removed is not, and exactly the
//! removed ids are named — for files, and for topics on a real Kafka broker, where
//! `--replay-missing` re-publishes them and the pipeline processes them again.

use crate::WEIR;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::json;
use weir_tests::{Weir, plugin};

use crate::cluster::{Setup, events};

/// The ids a report lists as missing (`  <id> (partition P, offset O)`).
fn missing_ids(report: &str) -> BTreeSet<String> {
    (report.lines())
        .filter_map(|l| l.strip_prefix("  ")?.split_once(" (partition "))
        .map(|(id, _)| id.to_owned())
        .collect()
}

/// `weir reconcile` with `args`: whether it succeeded, and what it printed.
fn reconcile<S: AsRef<str>>(weir: &Weir, args: &[S]) -> (bool, String) {
    let out = weir
        .command(std::iter::once("reconcile").chain(args.iter().map(AsRef::as_ref)))
        .output()
        .expect("weir reconcile");
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    let errors = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), format!("{printed}{errors}"))
}

#[test]
fn a_file_run_is_complete_and_records_removed_from_its_output_are_named() {
    let weir = Weir::new(WEIR);
    let mut lines: Vec<String> = (0..300)
        .map(|i| {
            let mut e =
                json!({"id": format!("e{i}"), "user_id": format!("u{i}"), "ts": 1_704_067_200});
            if i % 25 == 24 {
                e.as_object_mut().expect("object").remove("user_id"); // invalid: a dead letter
            }
            e.to_string()
        })
        .collect();
    lines.extend(lines[..10].to_vec()); // repeated ids: deduplicated
    let input = weir.write_lines("in.jsonl", &lines);
    let run = weir.run_pipeline(&plugin("enrich"), &input, &["--id", "/id"]);
    assert_eq!((run.outputs.len(), run.dead_letters.len()), (288, 12));
    let files = [
        "--input",
        "in.jsonl",
        "--output",
        "out.jsonl",
        "--dlq",
        "out.dlq.jsonl",
        "--id",
        "/id",
    ];
    let (ok, report) = reconcile(&weir, &files);
    assert!(ok, "{report}");
    assert!(
        report.contains("reconcile: 100.00 % complete: 300 of 300 input ids accounted for (288 in the output, 12 dead-lettered; 10 repeated input records deduplicated) over 310 input records; 0 missing; 0 ids duplicated in the output"),
        "{report}"
    );

    // Doctored: three outputs removed, one written twice.
    let removed: BTreeSet<String> = ["e3", "e150", "e298"].map(str::to_owned).into();
    let kept: Vec<String> = (run.outputs.iter())
        .filter(|o| {
            let v: serde_json::Value = serde_json::from_str(o).expect("JSON");
            !removed.contains(v["id"].as_str().expect("id"))
        })
        .chain(run.outputs.iter().take(1))
        .cloned()
        .collect();
    weir.write_lines("out.jsonl", &kept);
    let (ok, report) = reconcile(&weir, &files);
    assert!(!ok, "a missing id fails the command: {report}");
    assert_eq!(missing_ids(&report), removed, "{report}");
    assert!(
        report.contains("duplicated in the output: 1\n  e0 x2\n"),
        "{report}"
    );
    assert!(report.contains("99.00 % complete: 297 of 300"), "{report}");
    assert!(
        report.contains("weir: error: 3 input ids are missing"),
        "{report}"
    );
}

#[test]
fn a_cluster_run_is_complete_and_missing_records_are_replayed() {
    let s = Setup::new("reconcile", 3);
    let input = events(1_000, 40); // every 40th invalid: 25 dead letters
    s.produce(&input);
    let worker = s.worker("w", &[]);
    worker.wait_metric("weir_records_in_total", 1_000.0, Duration::from_secs(120));
    let weir = Weir::new(WEIR);
    let topics = |output: &str| {
        let c = &s.cluster;
        [
            "--kafka",
            &c.bootstrap,
            "--input-topic",
            &c.input,
            "--output-topic",
            output,
            "--dlq-topic",
            &c.dlq,
            "--id",
            "/id",
        ]
        .map(str::to_owned)
    };
    // Wait for the last batches to be committed.
    let started = Instant::now();
    let (ok, report) = loop {
        let (ok, report) = reconcile(&weir, &topics(&s.cluster.output));
        if ok || started.elapsed() > Duration::from_secs(60) {
            break (ok, report);
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(ok, "{report}\n{}", worker.log());
    assert!(
        report.contains("100.00 % complete: 1000 of 1000 input ids accounted for (975 in the output, 25 dead-lettered"),
        "{report}"
    );

    // Doctored: the output copied to another topic without five records.
    let removed: BTreeSet<String> = ["e1", "e200", "e401", "e602", "e998"]
        .map(str::to_owned)
        .into();
    let doctored = format!("{}-doctored", s.cluster.output);
    let out = s
        .broker
        .read_topic(&s.cluster.output, Duration::from_secs(3), |r| {
            r.len() >= 975
        });
    let copy = (out.into_iter())
        .filter(|r| !removed.contains(&r.header("weir.record-id").expect("record id")))
        .map(|r| {
            let headers = (r.headers.iter())
                .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
                .collect();
            (None, r.value_text(), headers)
        });
    s.rt.block_on(async {
        s.broker.create_topic(&doctored, 3).await;
        s.broker.produce(&doctored, copy).await;
    });
    let mut replaying = topics(&doctored).to_vec();
    replaying.push("--replay-missing".into());
    let (ok, report) = reconcile(&weir, &replaying);
    assert!(!ok, "{report}");
    assert_eq!(missing_ids(&report), removed, "{report}");
    assert!(
        report.contains("re-published 5 missing records"),
        "{report}"
    );

    // The worker processes them again: the output now holds them twice (as `<id>#replay1`),
    // and the real output is complete with exactly those five duplicated.
    let started = Instant::now();
    let report = loop {
        let (ok, report) = reconcile(&weir, &topics(&s.cluster.output));
        if (ok && report.contains("duplicated in the output: 5"))
            || started.elapsed() > Duration::from_secs(60)
        {
            break report;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let duplicated: BTreeSet<String> = (report.lines())
        .filter_map(|l| l.strip_prefix("  ")?.strip_suffix(" x2"))
        .map(str::to_owned)
        .collect();
    assert_eq!(duplicated, removed, "{report}\n{}", worker.log());
    assert!(worker.stop().success());
}
