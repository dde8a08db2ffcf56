//! Harness for Weir's integration tests: runs the real `weir` binary (built in this package
//! as `weir-under-test`, so it is always fresh) over files in a temporary directory, and
//! reads back outputs, dead letters and the run summary. For cluster mode: `redis_server`,
//! `redis_cluster` and `kafka_broker` start a real Redis, a real Redis Cluster and a real
//! Apache Kafka, `worker` runs `weir` worker processes; `prometheus` and `jaeger` start a
//! real Prometheus and a real Jaeger.
//!
//! The plugins come from `scripts/build-plugins.sh` (`target/wasm32-wasip2/release/`).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod http;
pub mod jaeger;
pub mod kafka_broker;
pub mod live;
pub mod measure;
pub mod prometheus;
pub mod redis_cluster;
pub mod redis_server;
pub mod tls;
pub mod worker;

use serde_json::Value;

/// The Apache Kafka the tests run (`tools/kafka/pom.xml` pins the same version).
pub const KAFKA_VERSION: &str = "4.4.0";

/// The sum of the samples of `name` in a Prometheus text `exposition` whose labels include
/// `labels` (a worker's series carry its `pipeline` and `worker` besides).
pub fn metric_sum(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let lines = exposition.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    (scrape.samples.iter())
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(n)
            | prometheus_parse::Value::Gauge(n)
            | prometheus_parse::Value::Untyped(n) => n,
            _ => 0.0,
        })
        .sum()
}

/// What `command` prints, once it succeeded (else the test fails with its stderr).
pub fn stdout_of(command: &mut std::process::Command) -> String {
    let out = command.output().expect("spawn");
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The first ten keys whose value in `got` is not the one in `want`, each with both.
pub fn differences(
    want: &std::collections::BTreeMap<String, String>,
    got: &std::collections::BTreeMap<String, String>,
) -> Vec<String> {
    (want.iter())
        .filter(|(k, v)| got.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: {:?}, want {v}", got.get(k)))
        .take(10)
        .collect()
}

/// A free loopback port (for a server a test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Sends `sig` to a process this harness started.
pub fn signal(pid: u32, sig: libc::c_int) {
    #[allow(unsafe_code)]
    // SAFETY: kill(2) with a pid of a child this harness started; no memory is shared.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// A plugin built by `scripts/build-plugins.sh`; fails the test with the fix if missing.
pub fn plugin(name: &str) -> PathBuf {
    let dir = std::env::var_os("WEIR_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/wasm32-wasip2/release"));
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "plugin {} is missing: run scripts/build-plugins.sh (or scripts/test.sh) first",
        path.display()
    );
    path
}

/// What one `weir` process did.
#[derive(Debug)]
pub struct Finished {
    pub output: Output,
    pub elapsed: Duration,
}

impl Finished {
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    /// Asserts exit code 0, showing stderr otherwise.
    pub fn success(self) -> Self {
        assert!(
            self.output.status.success(),
            "weir failed ({}):\n{}",
            self.output.status,
            self.stderr()
        );
        self
    }

    /// Asserts a non-zero exit with a one-line error (no panic, no backtrace) containing all of `needles`.
    pub fn fails_with(self, needles: &[&str]) -> Self {
        let stderr = self.stderr();
        assert!(
            !self.output.status.success(),
            "weir should have failed:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "weir panicked:\n{stderr}");
        assert!(
            !stderr.contains("stack backtrace"),
            "weir printed a backtrace:\n{stderr}"
        );
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "stderr lacks `{needle}`:\n{stderr}"
            );
        }
        for line in stderr.lines().filter(|l| l.starts_with("weir: error: ")) {
            let causes: Vec<&str> = line.split(": ").skip(2).collect();
            for (i, cause) in causes.iter().enumerate() {
                assert!(
                    cause.len() < 8 || !causes[i + 1..].contains(cause),
                    "the error line says `{cause}` twice:\n{line}"
                );
            }
        }
        self
    }
}

/// A scratch directory and the `weir` binary.
pub struct Weir {
    bin: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Weir {
    /// `bin` is `env!("CARGO_BIN_EXE_weir-under-test")` of the calling test.
    pub fn new(bin: &str) -> Self {
        Self {
            bin: PathBuf::from(bin),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes lines to a file in the scratch directory.
    pub fn write_lines<S: AsRef<str>>(
        &self,
        name: &str,
        lines: impl IntoIterator<Item = S>,
    ) -> PathBuf {
        let mut text = String::new();
        for line in lines {
            text.push_str(line.as_ref());
            text.push('\n');
        }
        let path = self.path(name);
        std::fs::write(&path, text).expect("write input");
        path
    }

    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `weir` with `args` to completion.
    pub fn run<I, S>(&self, args: I) -> Finished
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let started = Instant::now();
        let output = self.command(args).output().expect("spawn weir");
        Finished {
            output,
            elapsed: started.elapsed(),
        }
    }

    /// `weir run` of `plugin` over `input` into `out.jsonl` / `out.dlq.jsonl` with state in
    /// `state/` and the summary in `summary.json`, plus `extra` flags. Must succeed.
    pub fn run_pipeline(&self, plugin: &Path, input: &Path, extra: &[&str]) -> Run {
        let mut args: Vec<&OsStr> = vec![
            "run".as_ref(),
            "--plugin".as_ref(),
            plugin.as_os_str(),
            "--input".as_ref(),
            input.as_os_str(),
            "--output".as_ref(),
            "out.jsonl".as_ref(),
            "--state".as_ref(),
            "state".as_ref(),
            "--summary-json".as_ref(),
            "summary.json".as_ref(),
            "--quiet".as_ref(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        let finished = self.run(args).success();
        Run {
            outputs: read_lines(&self.path("out.jsonl")),
            dead_letters: read_json_lines(&self.path("out.dlq.jsonl")),
            summary: read_json(&self.path("summary.json")),
            finished,
        }
    }
}

impl Weir {
    /// `weir state dump` of `plugin_name`'s keyed state in `state/` (partition 0, as file
    /// input has): key → value, both UTF-8.
    pub fn keyed_state(&self, plugin_name: &str) -> std::collections::BTreeMap<String, String> {
        let dump = self
            .run([
                "state",
                "dump",
                "--state",
                "state",
                "--plugin-name",
                plugin_name,
            ])
            .success();
        (dump.stdout().lines())
            .map(|line| {
                let entry: Value = serde_json::from_str(line).expect("a JSON line");
                assert_eq!(entry["partition"], 0, "{line}");
                let text = |field: &str| entry[field].as_str().expect(field).to_owned();
                (text("key"), text("value"))
            })
            .collect()
    }
}

/// The results of [`Weir::run_pipeline`] (outputs and dead letters accumulate across runs).
#[derive(Debug)]
pub struct Run {
    pub outputs: Vec<String>,
    pub dead_letters: Vec<Value>,
    pub summary: Value,
    pub finished: Finished,
}

impl Run {
    /// `(record_id, class)` of every dead letter.
    pub fn dead_classes(&self) -> Vec<(String, String)> {
        self.dead_letters
            .iter()
            .map(|d| (error_field(d, "record_id"), error_field(d, "class")))
            .collect()
    }

    pub fn count(&self, field: &str) -> u64 {
        self.summary[field]
            .as_u64()
            .unwrap_or_else(|| panic!("summary lacks `{field}`: {}", self.summary))
    }
}

/// A `weir.error.*` field of a DLQ line.
pub fn error_field(dead_letter: &Value, name: &str) -> String {
    dead_letter["error"][name]
        .as_str()
        .unwrap_or_else(|| panic!("dead letter lacks error.{name}: {dead_letter}"))
        .to_owned()
}

/// Lines of a file; none when it does not exist.
pub fn read_lines(path: &Path) -> Vec<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.lines().map(str::to_owned).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("cannot read {}: {e}", path.display()),
    }
}

pub fn read_json_lines(path: &Path) -> Vec<Value> {
    read_lines(path)
        .iter()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {l}", path.display()))
        })
        .collect()
}

pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON ({e})", path.display()))
}

/// RFC 8785 canonical JSON text of a value.
pub fn canonical(value: &Value) -> String {
    serde_json_canonicalizer::to_string(value).expect("canonicalize")
}

/// `{"id": "<id>", ...extra}` as one JSON line.
pub fn event(id: &str, extra: Value) -> String {
    let mut object = serde_json::Map::new();
    object.insert("id".into(), Value::String(id.into()));
    if let Value::Object(extra) = extra {
        object.extend(extra);
    }
    Value::Object(object).to_string()
}

/// `n` events `{"id": "e<i>"}` for the `faulty` plugin, with `"fault": f` where `fault(i)`
/// names a fault.
pub fn faulty_events(n: usize, fault: impl Fn(usize) -> Option<&'static str>) -> Vec<String> {
    (0..n)
        .map(|i| {
            let extra = match fault(i) {
                Some(f) => serde_json::json!({ "fault": f }),
                None => serde_json::json!({}),
            };
            event(&format!("e{i}"), extra)
        })
        .collect()
}
