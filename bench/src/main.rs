//! Two tables from one run, over the same generated records:
//!
//! 1. `enrich` as the Rust wasm plugin vs the same Rust code compiled natively, at batch
//!    sizes 1 and 128: records/s, µs per record and the ratios.
//! 2. `enrich` in every language (Rust, C, JavaScript, Python) at batch 128: records/s,
//!    µs per record, component size and instantiation time, each relative to Rust.
//!
//! ```sh
//! bash scripts/build-plugins.sh
//! cargo run --release -p weir-bench -- [--plugins target/wasm32-wasip2/release] [--records 50000]
//! ```
//!
//! Absolute numbers are noise on a shared machine; the ratios, measured side by side, are
//! the result.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use weir::config::LimitsConfig;
use weir::record::{Record, SourceMeta};
use weir::runtime::{CallContext, Outcome, Plugin, Runtime};

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
        let outcomes = (plugin.transform(chunk, &CallContext::default())).expect("plugin instance");
        ok += outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Outputs { .. }))
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
    let mut dir = PathBuf::from("target/wasm32-wasip2/release");
    let mut n = 50_000;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--plugins" => dir = args.next().context("--plugins needs a directory")?.into(),
            "--records" => n = args.next().context("--records needs a number")?.parse()?,
            other => anyhow::bail!("unknown argument `{other}` (use --plugins, --records)"),
        }
    }
    let runtime = Runtime::new(&LimitsConfig::default())?;
    let load = |file: &str| {
        let path = dir.join(file);
        Plugin::load_file(&runtime, &path, "enrich", 1, Vec::new())
            .with_context(|| format!("plugin {}", path.display()))
    };
    let plugin = load("enrich.wasm")?;
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

    // Every language, batch 128; fewer records, since interpreters are slower.
    let m = (n / 5).max(1);
    let sample = &records[..m];
    println!("\nenrich in every language over {m} records, batch 128, best of 3 rounds");
    println!(
        "{:<12} {:>12} {:>12} {:>12} {:>14} {:>12} {:>14}",
        "language",
        "records/s",
        "µs/record",
        "× Rust time",
        "component MiB",
        "× Rust size",
        "instantiate µs"
    );
    let mut rust: Option<(f64, f64)> = None;
    for (language, file) in [
        ("Rust", "enrich.wasm"),
        ("C", "enrich-c.wasm"),
        ("JavaScript", "enrich-js.wasm"),
        ("Python", "enrich-python.wasm"),
    ] {
        let plugin = match load(file) {
            Ok(p) => p,
            Err(e) => {
                println!("{language:<12} skipped: {e:#} (run scripts/build-plugins.sh)");
                continue;
            }
        };
        assert_eq!(wasm(&plugin, sample, 128), m, "{language} agrees");
        let t = best_of(3, || wasm(&plugin, sample, 128));
        let instantiate = (0..5)
            .map(|_| plugin.time_instantiation().expect("instantiate"))
            .min()
            .unwrap_or_default();
        let us = t.as_secs_f64() * 1e6 / m as f64;
        let size = plugin.meta().size_bytes as f64 / (1024.0 * 1024.0);
        let (rust_us, rust_size) = *rust.get_or_insert((us, size));
        println!(
            "{language:<12} {:>12.0} {:>12.2} {:>12.1} {:>14.2} {:>12.1} {:>14.0}",
            m as f64 / t.as_secs_f64(),
            us,
            us / rust_us,
            size,
            size / rust_size,
            instantiate.as_secs_f64() * 1e6
        );
    }
    Ok(())
}
