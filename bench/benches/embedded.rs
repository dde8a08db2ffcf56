//! Embedded mode, file → file: `weir run` of the `enrich` plugin over a JSON-lines file of
//! small events, with ids (`--id /id`) and done marks in the embedded store, as the
//! README's first command runs it. Each run starts from an empty state directory and a new
//! output file, one process at a time, `WEIR_BENCH_ROUNDS` times (default 3). Prints
//! records/s (from the run summary: first record taken to last one done) and the worker's
//! CPU-seconds per million records (user + system of the whole process, start-up included).
//!
//! Beside it, in each round, a plain native Rust loop does the same work without Weir: reads
//! the lines, applies `enrich_core::enrich` (the plugin's own code) and writes the results
//! to a file, no ids, no dedup, no sandbox. `weir ÷ native` is the ratio issue 19 targets
//! (≥ 0.5).
//!
//! `WEIR_BENCH_PLUGIN=metrics` runs the stateful `metrics` plugin instead (keyed state in
//! the embedded store, committed with the done marks), against the same logic natively
//! (`metrics_core::metrics` over a `HashMap`); it also prints the state writes per record
//! and the worker's CPU-seconds per million state writes (issue 20's target: ≥ 0.5).
//!
//! `WEIR_BENCH_BASELINE=<path of another build's weir-bench-worker>` runs that build too,
//! right before or after this one in each round (the order turns around every round), and
//! prints this build's rate and CPU against it.
//!
//! ```sh
//! bash scripts/build-plugins.sh
//! cargo bench -p weir-bench --bench embedded       # WEIR_BENCH_RECORDS=200000
//! ```

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Instant;

use weir_tests::measure::cpu_seconds;

mod embedded_run;

const WEIR: &str = env!("CARGO_BIN_EXE_weir-bench-worker");

fn main() -> anyhow::Result<()> {
    let env = weir_tests::measure::env_usize;
    let n = env("WEIR_BENCH_RECORDS", 200_000)?;
    let rounds = env("WEIR_BENCH_ROUNDS", 3)?.max(1);
    let baseline = std::env::var("WEIR_BENCH_BASELINE").ok();
    let transform = match std::env::var("WEIR_BENCH_PLUGIN").as_deref() {
        Ok("metrics") => Transform::Metrics,
        Ok("enrich") | Err(_) => Transform::Enrich,
        Ok(other) => anyhow::bail!("WEIR_BENCH_PLUGIN: `{other}` (use enrich or metrics)"),
    };
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("events.jsonl");
    embedded_run::write_events(&input, n, |_, event| event.to_owned())?;
    let mut builds = vec![("this build", WEIR.to_owned())];
    builds.extend(baseline.map(|path| ("baseline", path)));
    println!(
        "\nembedded mode, {}, {n} records, {rounds} rounds:\n",
        transform.plugin()
    );
    println!("| build | round | records/s | worker CPU-s per 1M |");
    println!("|---|---:|---:|---:|");
    let mut ratios: Vec<(f64, f64)> = Vec::new();
    let mut against_native: Vec<(f64, f64)> = Vec::new();
    let mut state_writes = 0u64;
    let mut cpu_per_write = Vec::new();
    for round in 1..=rounds {
        let native_dir = dir.path().join(format!("native-{round}"));
        let (native_rate, native_cpu, writes) = native(transform, &input, &native_dir, n)?;
        if transform == Transform::Metrics && round == 1 {
            println!(
                "| (state writes: {writes}, {:.2} per record) | | | |",
                writes as f64 / n as f64
            );
            state_writes = writes;
        }
        println!(
            "| native loop | {round} | {native_rate:.0} | {:.2} |",
            native_cpu * 1e6 / n as f64
        );
        let mut order: Vec<&(&str, String)> = builds.iter().collect();
        if round % 2 == 0 {
            order.reverse();
        }
        let mut measured = Vec::new();
        for (k, (label, binary)) in order.into_iter().enumerate() {
            let run_dir = dir.path().join(format!("run-{round}-{k}"));
            let plugin = transform.plugin();
            let timed = embedded_run::run(binary, plugin, (&input, &run_dir), &[], n)?;
            eprint!("{}", timed.stderr);
            let (rate, cpu) = (timed.rate, timed.cpu);
            if state_writes > 0 && *label == "this build" {
                cpu_per_write.push(cpu * 1e6 / state_writes as f64);
            }
            println!(
                "| {label} | {round} | {rate:.0} | {:.2} |",
                cpu * 1e6 / n as f64
            );
            measured.push((*label, rate, cpu));
        }
        let of = |label: &str| measured.iter().find(|m| m.0 == label).map(|m| (m.1, m.2));
        if let (Some(this), Some(base)) = (of("this build"), of("baseline")) {
            ratios.push((this.0 / base.0, this.1 / base.1));
        }
        if let Some(this) = of("this build") {
            against_native.push((this.0 / native_rate, this.1 / native_cpu));
        }
    }
    let each: Vec<String> = (against_native.iter())
        .map(|(rate, cpu)| format!("{rate:.2} (CPU × {cpu:.1})"))
        .collect();
    against_native.sort_by(|a, b| a.0.total_cmp(&b.0));
    println!(
        "\nweir ÷ native loop records/s round by round: {}; median {:.2} (target ≥ 0.5)",
        each.join(", "),
        against_native[against_native.len() / 2].0
    );
    if !cpu_per_write.is_empty() {
        let each: Vec<String> = cpu_per_write.iter().map(|c| format!("{c:.2}")).collect();
        println!(
            "\nweir's CPU-s per million state writes, round by round: {}",
            each.join(", ")
        );
    }
    if !ratios.is_empty() {
        let each: Vec<String> = (ratios.iter())
            .map(|(rate, cpu)| format!("{rate:.2} (CPU {cpu:.2})"))
            .collect();
        ratios.sort_by(|a, b| a.0.total_cmp(&b.0));
        println!(
            "\nthis ÷ baseline records/s round by round: {}; median {:.2}",
            each.join(", "),
            ratios[ratios.len() / 2].0
        );
    }
    Ok(())
}

/// Which transform the benchmark runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Transform {
    Enrich,
    Metrics,
}

impl Transform {
    fn plugin(self) -> &'static str {
        match self {
            Transform::Enrich => "enrich",
            Transform::Metrics => "metrics",
        }
    }
}

/// `metrics`' state in memory, counting writes.
#[derive(Default)]
struct CountedState {
    map: std::collections::HashMap<String, String>,
    writes: u64,
}

impl metrics_core::State for CountedState {
    fn get(&mut self, key: &str) -> Option<String> {
        self.map.get(key).cloned()
    }

    fn set(&mut self, key: &str, value: &str) {
        self.writes += 1;
        self.map.insert(key.to_owned(), value.to_owned());
    }
}

/// The native loop over `input` into a file in `dir`: its records/s, CPU-seconds and state
/// writes.
fn native(
    transform: Transform,
    input: &Path,
    dir: &Path,
    n: usize,
) -> anyhow::Result<(f64, f64, u64)> {
    std::fs::create_dir_all(dir)?;
    let before = cpu_seconds("self", false)?;
    let started = Instant::now();
    let reader = std::io::BufReader::new(std::fs::File::open(input)?);
    let mut out = std::io::BufWriter::new(std::fs::File::create(dir.join("out.jsonl"))?);
    let mut done = 0;
    let mut state = CountedState::default();
    for line in reader.split(b'\n') {
        let line = line?;
        let outputs = match transform {
            Transform::Enrich => vec![enrich_core::enrich(&line).map_err(anyhow::Error::msg)?],
            Transform::Metrics => {
                metrics_core::metrics(&line, &mut state).map_err(anyhow::Error::msg)?
            }
        };
        for output in outputs {
            out.write_all(&output)?;
            out.write_all(b"\n")?;
        }
        done += 1;
    }
    out.into_inner()?.sync_all()?;
    anyhow::ensure!(done == n, "the native loop transformed {done} of {n}");
    let cpu = cpu_seconds("self", false)? - before;
    Ok((
        n as f64 / started.elapsed().as_secs_f64(),
        cpu,
        state.writes,
    ))
}
