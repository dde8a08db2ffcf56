//! What traces cost: embedded mode, file → file, `weir run` of `enrich` with ids from `/id`
//! (the embedded benchmark's run), with and without `--otlp-endpoint` at a real Jaeger
//! (`weir_tests::jaeger`, its in-memory store). The input is in the envelope format, twice:
//!
//! - *plain*: no trace context: traces on, each batch gets `weir.batch` and its stages;
//! - *traced*: every record carries its own producer's `traceparent`: traces on, each
//!   record gets `weir.record` and its stages besides.
//!
//! Each round runs the four, off and on over each input (the order turns around every
//! round), `WEIR_BENCH_ROUNDS` times (default 3), and prints records/s and the worker's
//! CPU-seconds per million records; then, per round, what traces on cost per record in
//! worker CPU (on − off) and in records/s (on ÷ off). The spans must reach Jaeger: the
//! trace of the last record of the traced run is looked up there, and a worker that
//! dropped spans (its queue full) says so on stderr, which is shown.
//!
//! `WEIR_BENCH_BASELINE=<path of another build's weir-bench-worker>` also runs that build
//! over the plain input in each round (traces did not exist there): this build with traces
//! off against it says whether traces off cost anything.
//!
//! ```sh
//! bash scripts/build-plugins.sh && bash scripts/tools.sh   # plugins, Jaeger
//! cargo bench -p weir-bench --bench traces                 # WEIR_BENCH_RECORDS=200000
//! ```

use std::path::Path;
use std::time::Duration;

use weir_tests::jaeger::Jaeger;

mod embedded_run;

use embedded_run::Timed;

const WEIR: &str = env!("CARGO_BIN_EXE_weir-bench-worker");

/// The record at `i`'s producer context: trace `i`, span `i`, sampled.
fn traceparent(i: usize) -> String {
    format!(
        "00-{:032x}-{:016x}-01",
        0x7eed_0000_0000 + i as u128,
        1 + i as u64
    )
}

fn envelope(value: &str, traceparent: Option<String>) -> String {
    let headers: Vec<serde_json::Value> = (traceparent.into_iter())
        .map(|tp| serde_json::json!({"name": "traceparent", "value": tp}))
        .collect();
    serde_json::json!({"value": value, "headers": headers}).to_string()
}

fn main() -> anyhow::Result<()> {
    let env = weir_tests::measure::env_usize;
    let n = env("WEIR_BENCH_RECORDS", 200_000)?;
    let rounds = env("WEIR_BENCH_ROUNDS", 3)?.max(1);
    let baseline = std::env::var("WEIR_BENCH_BASELINE").ok();
    let dir = tempfile::tempdir()?;
    let plain = dir.path().join("plain.jsonl");
    let traced = dir.path().join("traced.jsonl");
    embedded_run::write_events(&plain, n, |_, event| envelope(event, None))?;
    embedded_run::write_events(&traced, n, |i, event| envelope(event, Some(traceparent(i))))?;
    // (label, build, input, traces on)
    let mut runs: Vec<(&str, &str, &Path, bool)> = vec![
        ("off, plain", WEIR, &plain, false),
        ("on, plain", WEIR, &plain, true),
        ("off, traced", WEIR, &traced, false),
        ("on, traced", WEIR, &traced, true),
    ];
    if let Some(baseline) = &baseline {
        runs.push(("baseline, plain", baseline, &plain, false));
    }
    println!("\nembedded mode, enrich, {n} records in envelopes, {rounds} rounds:\n");
    println!(
        "| run | round | records/s | worker CPU-s per 1M | spans dropped | last record's spans in Jaeger |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let last_trace = traceparent(n - 1)[3..35].to_owned();
    let mut rounds_measured = Vec::new();
    for round in 1..=rounds {
        let mut order: Vec<usize> = (0..runs.len()).collect();
        if round % 2 == 0 {
            order.reverse();
        }
        let mut measured: Vec<Option<Timed>> = (0..runs.len()).map(|_| None).collect();
        for k in order {
            let (label, binary, input, on) = runs[k];
            let run_dir = dir.path().join(format!("run-{round}-{k}"));
            // A fresh Jaeger beside every run, traced or not, so the machine is the same for
            // each and no Jaeger works through an earlier run's spans meanwhile.
            let jaeger = Jaeger::start();
            let endpoint = on.then(|| jaeger.otlp_endpoint());
            let mut flags = vec!["--input-format", "envelope"];
            flags.extend(
                endpoint
                    .iter()
                    .flat_map(|e| ["--otlp-endpoint", e.as_str()]),
            );
            let timed = embedded_run::run(binary, "enrich", (input, &run_dir), &flags, n)?;
            let dropped = (timed.stderr.split("dropped_span_count=").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or("0");
            // The last record's spans (its own when it carried a context), once exported.
            let found = match on && input == traced.as_path() {
                true => {
                    std::thread::sleep(Duration::from_secs(2));
                    jaeger.spans_now(&last_trace).len().to_string()
                }
                false => "-".to_owned(),
            };
            println!(
                "| {label} | {round} | {:.0} | {:.2} | {dropped} | {found} |",
                timed.rate,
                timed.cpu * 1e6 / n as f64
            );
            measured[k] = Some(timed);
        }
        rounds_measured.push(measured);
    }

    let per_record = |on: &Timed, off: &Timed| (on.cpu - off.cpu) * 1e6 / n as f64;
    let mut lines = Vec::new();
    for (name, off, on) in [("batches (plain)", 0, 1), ("records (traced)", 2, 3)] {
        let each: Vec<String> = (rounds_measured.iter())
            .filter_map(|m| Some((m[off].as_ref()?, m[on].as_ref()?)))
            .map(|(off, on)| {
                format!(
                    "{:+.2} µs, × {:.2}",
                    per_record(on, off),
                    on.rate / off.rate
                )
            })
            .collect();
        lines.push(format!(
            "traces on, {name}: worker CPU per record, records/s on ÷ off, round by round: {}",
            each.join("; ")
        ));
    }
    if baseline.is_some() {
        let each: Vec<String> = (rounds_measured.iter())
            .filter_map(|m| Some((m[0].as_ref()?, m[4].as_ref()?)))
            .map(|(this, base)| {
                format!(
                    "{:+.2} µs, × {:.2}",
                    per_record(this, base),
                    this.rate / base.rate
                )
            })
            .collect();
        lines.push(format!(
            "traces off against the baseline: worker CPU per record, records/s this ÷ \
             baseline, round by round: {}",
            each.join("; ")
        ));
    }
    println!("\n{}", lines.join("\n"));
    Ok(())
}
