//! What the embedded-mode benchmarks share: the events they read, and one timed `weir run`
//! of a plugin over a JSON-lines file with ids from `/id` and done marks in a fresh
//! embedded store.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use weir_tests::measure::cpu_seconds;

/// A timed run: records/s (from the run summary: first record taken to last one done) and
/// the CPU-seconds of the whole process (user + system, start-up included), with what it
/// logged.
pub struct Timed {
    pub rate: f64,
    pub cpu: f64,
    pub stderr: String,
}

/// Runs `binary` (a `weir` build) with `plugin` over `input` into `dir`, with `extra` flags,
/// and checks that it processed all `n` records.
pub fn run(
    binary: &str,
    plugin: &str,
    (input, dir): (&Path, &Path),
    extra: &[&str],
    n: usize,
) -> anyhow::Result<Timed> {
    std::fs::create_dir_all(dir)?;
    let summary = dir.join("summary.json");
    let mut command = Command::new(binary);
    command
        .arg("run")
        .arg("--plugin")
        .arg(weir_tests::plugin(plugin))
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(dir.join("out.jsonl"))
        .arg("--state")
        .arg(dir.join("state"))
        .arg("--summary-json")
        .arg(&summary)
        .args(["--id", "/id", "--quiet"])
        .args(extra);
    let before = cpu_seconds("self", true)?;
    let output = command.stderr(std::process::Stdio::piped()).output()?;
    let cpu = cpu_seconds("self", true)? - before;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let status = output.status;
    anyhow::ensure!(status.success(), "{binary} failed: {status}\n{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary)?)?;
    let processed = summary["processed"].as_u64().unwrap_or(0);
    anyhow::ensure!(
        processed == n as u64,
        "{binary} processed {processed} of {n}"
    );
    let elapsed_ms = summary["elapsed_ms"].as_f64().unwrap_or(0.0).max(1.0);
    Ok(Timed {
        rate: n as f64 / (elapsed_ms / 1000.0),
        cpu,
        stderr,
    })
}

/// The benchmarks' events, one JSON object per line: an id, a user, a time, an action.
/// `line` writes each event's line (e.g. wrapped in an envelope).
pub fn write_events(
    path: &Path,
    n: usize,
    line: impl Fn(usize, &str) -> String,
) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let actions = ["view", "click", "purchase", "add_to_cart", "refund"];
    for i in 0..n {
        let event = format!(
            r#"{{"id":"e{i}","user_id":"u{}","ts":{},"action":"{}"}}"#,
            i % 97,
            1_704_067_200 + i,
            actions[i % actions.len()]
        );
        writeln!(out, "{}", line(i, &event))?;
    }
    Ok(out.flush()?)
}
