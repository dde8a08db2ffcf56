//! `enrich` as a wasm plugin vs the same Rust code compiled natively, over the same records
//! in one run, at batch sizes 1 and 128. Prints records/s, µs per record and the ratios.
//!
//! ```sh
//! bash scripts/build-plugins.sh
//! cargo run --release -p weir-bench -- [--plugin target/wasm32-wasip2/release/enrich.wasm] [--records 50000]
//! ```
//!
//! Absolute numbers are noise on a shared machine; the ratios, measured side by side, are
//! the result.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use weir::config::LimitsConfig;
use weir::runtime::{Outcome, Plugin, Record, Runtime, SourceMeta};

fn records(n: usize) -> Vec<Record> {
    let actions = ["view", "click", "purchase", "add_to_cart", "share"];
    (0..n)
        .map(|i| {
            let value = format!(
                r#"{{"id":"evt-{i}","user_id":"user-{}","ts":{},"action":"{}","metadata":{{"page":"/p/{}","ms":{}}}}}"#,
                i % 997,
                1_767_225_600 + (i as i64) * 37,
                actions[i % actions.len()],
                i % 50,
                i % 2000
            );
            Record {
                key: None,
                value: value.into_bytes(),
                headers: Vec::new(),
                timestamp_ms: None,
                source: SourceMeta {
                    stream: "bench".into(),
                    partition: 0,
                    offset: i as i64,
                    attempt: 1,
                },
            }
        })
        .collect()
}

/// Best of `rounds` timings of `f` (the least disturbed by the rest of the machine).
fn best_of(rounds: usize, mut f: impl FnMut() -> usize) -> Duration {
    (0..rounds)
        .map(|_| {
            let started = Instant::now();
            black_box(f());
            started.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn wasm(plugin: &Plugin, records: &[Record], batch: usize) -> usize {
    let mut ok = 0;
    for chunk in records.chunks(batch) {
        let outcomes = plugin.transform(chunk).expect("plugin instance");
        ok += outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Outputs(_)))
            .count();
    }
    ok
}

fn native(records: &[Record]) -> usize {
    records
        .iter()
        .filter(|r| enrich_core::enrich(&r.value).is_ok())
        .count()
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut plugin_path = PathBuf::from("target/wasm32-wasip2/release/enrich.wasm");
    let mut n = 50_000;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--plugin" => plugin_path = args.next().context("--plugin needs a path")?.into(),
            "--records" => n = args.next().context("--records needs a number")?.parse()?,
            other => anyhow::bail!("unknown argument `{other}` (use --plugin, --records)"),
        }
    }
    let runtime = Runtime::new(&LimitsConfig::default())?;
    let plugin = Plugin::load_file(&runtime, &plugin_path, "enrich", 1, Vec::new())
        .with_context(|| format!("plugin {}", plugin_path.display()))?;
    let records = records(n);
    assert_eq!(native(&records), n, "every bench record is valid");
    assert_eq!(wasm(&plugin, &records, 128), n, "the plugin agrees");

    let rounds = 5;
    let t_native = best_of(rounds, || native(&records));
    let t_b1 = best_of(rounds, || wasm(&plugin, &records, 1));
    let t_b128 = best_of(rounds, || wasm(&plugin, &records, 128));
    let per = |t: Duration| t.as_secs_f64() * 1e6 / n as f64;
    let rate = |t: Duration| n as f64 / t.as_secs_f64();

    println!("enrich over {n} records, best of {rounds} rounds");
    println!(
        "{:<22} {:>14} {:>12} {:>16}",
        "", "records/s", "µs/record", "wasm ÷ native"
    );
    println!(
        "{:<22} {:>14.0} {:>12.3} {:>16}",
        "native Rust",
        rate(t_native),
        per(t_native),
        "1.00"
    );
    for (label, t) in [("wasm, batch 1", t_b1), ("wasm, batch 128", t_b128)] {
        println!(
            "{:<22} {:>14.0} {:>12.3} {:>16.2}",
            label,
            rate(t),
            per(t),
            rate(t) / rate(t_native)
        );
    }
    println!(
        "host-side overhead per call at batch 1 (µs/record at batch 1 − at batch 128): {:.3}",
        per(t_b1) - per(t_b128)
    );
    Ok(())
}
