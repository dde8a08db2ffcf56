//! Hot swap under load (issue 5's benchmark): a release `weir` worker with the plugin API
//! follows a file fed at a steady rate (embedded mode). After a steady phase, 100
//! activations in a row alternate two versions (identity `faulty` as 1, `enrich` as 2),
//! each waiting for the API's answer, then the stream runs steady again. Alternating, every
//! activation but the first finds the version it wants in reserve (the version swapped out
//! last stays loaded); `WEIR_BENCH_VERSIONS=3` cycles three versions (`enrich-c` as 3), so
//! that every activation loads its version from the registry.
//!
//! Prints the longest gap between outputs, the p99 record latency (event written → its
//! output read back, so it includes batching) during the swaps ÷ the p99 of the steady
//! phase (target ≤ 2), the worker's RSS after 100 swaps vs after 1 (target ≤ +5 %; each the
//! median of ten readings over the second after the swap, while records flow on the new
//! version; that second after the first swap counts as swap phase), and checks that no
//! record was lost or repeated.
//!
//! ```sh
//! bash scripts/build-plugins.sh
//! cargo bench -p weir-bench --bench hot_swap     # WEIR_BENCH_RATE=20000 records/s
//! WEIR_BENCH_CONTROL=1 cargo bench -p weir-bench --bench hot_swap   # no swaps: a read instead
//! WEIR_BENCH_VERSIONS=3 cargo bench -p weir-bench --bench hot_swap  # every swap a load
//! ```

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use weir_tests::live::{self, Feeder, Seen, Watcher};

const WEIR: &str = env!("CARGO_BIN_EXE_weir-bench-worker");
const TOKEN: &str = "bench-token";
/// Activations in the measured run (`WEIR_BENCH_SWAPS` for more, to see whether memory
/// levels off), one every `SWAP_EVERY`.
const SWAPS: usize = 100;
const SWAP_EVERY: Duration = Duration::from_millis(20);
/// How long the worker's RSS is read for (ten readings) once records flow on a version.
const SETTLE: Duration = Duration::from_secs(1);
const STEADY: Duration = Duration::from_secs(15);
const STATE_CACHE_MB: u64 = 8;

fn main() -> anyhow::Result<()> {
    let env = weir_tests::measure::env_usize;
    let (rate, swaps_wanted, versions) = (
        env("WEIR_BENCH_RATE", 20_000)?,
        env("WEIR_BENCH_SWAPS", SWAPS)?,
        env("WEIR_BENCH_VERSIONS", 2)?,
    );
    anyhow::ensure!((2..=3).contains(&versions), "WEIR_BENCH_VERSIONS is 2 or 3");
    // The control experiment: the same calls and readings, but reads instead of activations.
    let control_run = env("WEIR_BENCH_CONTROL", 0)? == 1;
    if control_run {
        println!("control run: GET /v1/plugins/p instead of each activation");
    }
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("in.jsonl"), "")?;
    // The embedded store caches its pages up to `state.cache_mb`: here 8 MiB, reached in the
    // first seconds, so that the worker's memory stops growing with its done marks before
    // the swaps (the control run shows it flat) and what moves is the swaps' doing.
    std::fs::write(
        dir.path().join("weir.toml"),
        format!("[state]\ncache_mb = {STATE_CACHE_MB}\n"),
    )?;
    let port = weir_tests::free_port();
    let identity = weir_tests::plugin("faulty");
    let worker = live::start_worker(
        WEIR,
        dir.path(),
        port,
        TOKEN,
        &identity,
        &["--plugin-config", "faults=off", "--config", "weir.toml"],
    );
    let log = || std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default();
    let watcher = Watcher::start(dir.path().join("out.jsonl"));
    // A batch of records every 10 ms.
    let feeder = Feeder::start(
        dir.path().join("in.jsonl"),
        rate / 100,
        Duration::from_millis(10),
    );
    watcher.wait_for(rate, Duration::from_secs(60), log);
    for plugin in ["enrich", "enrich-c"].into_iter().take(versions - 1) {
        let bytes = std::fs::read(weir_tests::plugin(plugin))?;
        let (status, body) = weir_tests::http::json(port, TOKEN, "POST", "/v1/plugins/p", &bytes);
        anyhow::ensure!(status == 201, "upload of {plugin}: {status} {body}");
    }

    let steady = (Instant::now(), {
        std::thread::sleep(STEADY - SETTLE);
        Instant::now()
    });
    let rss_steady = settled_rss_kib(worker.pid())?;
    let swaps_started = Instant::now();
    let mut rss = Vec::new();
    let mut answers = Vec::with_capacity(swaps_wanted);
    for i in 0..swaps_wanted {
        // 2, 1, 2, 1, ... or 2, 3, 1, 2, 3, 1, ...
        let version = (i + 1) % versions + 1;
        let body = format!("{{\"version\":{version}}}");
        let asked = Instant::now();
        let (status, answer) = if control_run {
            weir_tests::http::json(port, TOKEN, "GET", "/v1/plugins/p", b"")
        } else {
            weir_tests::http::json(
                port,
                TOKEN,
                "POST",
                "/v1/plugins/p/activate",
                body.as_bytes(),
            )
        };
        anyhow::ensure!(status == 200, "activation {i}: {status} {answer}");
        answers.push(asked.elapsed().as_micros() as u64);
        let done = i + 1;
        if done % 10 == 0 {
            rss.push((done, rss_kib(worker.pid())?));
        }
        if done == 1 {
            // Measured once the new version took records for a while, as after the last.
            rss.push((done, settled_rss_kib(worker.pid())?));
        }
        std::thread::sleep(SWAP_EVERY.saturating_sub(asked.elapsed()));
    }
    let swaps = (swaps_started, Instant::now());
    rss.push((swaps_wanted, settled_rss_kib(worker.pid())?));
    let rss_at = |n: usize| rss.iter().rfind(|(done, _)| *done == n).map_or(0, |r| r.1);
    let (rss_after_one, rss_after_all) = (rss_at(1), rss_at(SWAPS.min(swaps_wanted)));
    std::thread::sleep(Duration::from_secs(1));
    let fed = feeder.stop();
    watcher.wait_for(fed, Duration::from_secs(120), log);
    drop(worker);
    let seen = watcher.stop();

    let ids: BTreeSet<&str> = seen.iter().map(|s| s.id.as_str()).collect();
    let lost = (0..fed)
        .filter(|i| !ids.contains(format!("e{i}").as_str()))
        .count();
    let repeated = seen.len() - ids.len();
    let during = |(from, to): (Instant, Instant)| -> Vec<Seen> {
        seen.iter()
            .filter(|s| s.at >= from && s.at <= to)
            .cloned()
            .collect()
    };
    let p99 = |outputs: &[Seen]| {
        let mut latencies: Vec<u64> = outputs.iter().map(|s| s.latency_us).collect();
        live::quantile(&mut latencies, 0.99)
    };
    let (steady_outputs, swap_outputs) = (during(steady), during(swaps));
    let (steady_p99, swap_p99) = (p99(&steady_outputs), p99(&swap_outputs));
    println!(
        "\nHot swap under load: {fed} records at {rate}/s, {swaps_wanted} activations in a row \
         cycling {versions} versions, one every {} ms ({:.2} s, answered in p50 {:.1} ms, max {:.1} ms)\n",
        SWAP_EVERY.as_millis(),
        (swaps.1 - swaps.0).as_secs_f64(),
        live::quantile(&mut answers.clone(), 0.5) as f64 / 1000.0,
        answers.iter().max().copied().unwrap_or(0) as f64 / 1000.0,
    );
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| longest gap between outputs, whole run | {} ms |",
        live::longest_gap(&seen).as_millis()
    );
    println!(
        "| longest gap between outputs, during the swaps | {} ms |",
        live::longest_gap(&swap_outputs).as_millis()
    );
    println!(
        "| p99 record latency, steady ({} outputs) | {:.1} ms |",
        steady_outputs.len(),
        steady_p99 as f64 / 1000.0
    );
    println!(
        "| p99 record latency, during the swaps ({} outputs) | {:.1} ms |",
        swap_outputs.len(),
        swap_p99 as f64 / 1000.0
    );
    println!(
        "| worker RSS before swaps / after 1 swap / after {SWAPS} (medians of 10 readings) | {:.1} / {:.1} / {:.1} MiB |",
        rss_steady as f64 / 1024.0,
        rss_after_one as f64 / 1024.0,
        rss_after_all as f64 / 1024.0
    );
    println!("| records lost / repeated | {lost} / {repeated} |");
    let series: Vec<String> = rss
        .iter()
        .map(|(n, kib)| format!("{n}: {:.1}", *kib as f64 / 1024.0))
        .collect();
    println!("\nworker RSS (MiB) after n swaps: {}", series.join(", "));
    println!(
        "\np99 during swaps ÷ steady p99 = {:.2} (target ≤ 2); RSS after {SWAPS} swaps ÷ after 1 = {:.3} (target ≤ 1.05)",
        swap_p99 as f64 / steady_p99.max(1) as f64,
        rss_after_all as f64 / rss_after_one.max(1) as f64
    );
    anyhow::ensure!(lost == 0 && repeated == 0, "records lost or repeated");
    Ok(())
}

/// The median of ten readings of a process's RSS, 100 ms apart (`SETTLE`): in-flight
/// records alone move it by ±20 % from one reading to the next.
fn settled_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let mut readings = Vec::new();
    for _ in 0..10 {
        std::thread::sleep(SETTLE / 10);
        readings.push(rss_kib(pid)?);
    }
    Ok(live::quantile(&mut readings, 0.5))
}

/// The resident set of a process, in KiB (`VmRSS` of `/proc/<pid>/status`).
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for process {pid}"))
}
