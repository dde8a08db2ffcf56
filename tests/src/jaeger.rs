//! A real Jaeger for tests (v1.75.0, built from the Go module proxy into `.tools/jaeger` by
//! `scripts/tools.sh`): the Jaeger v2 binary with an OTLP/HTTP receiver and its in-memory
//! trace store, on free loopback ports, its query API read for traces. Stopped (killed)
//! when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Jaeger v2's configuration: OTLP/HTTP in, traces kept in memory, the query API out.
const CONFIG: &str = r#"
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces: {receivers: [otlp], processors: [batch], exporters: [jaeger_storage_exporter]}
  telemetry: {metrics: {level: none}, traces: {level: none}}
extensions:
  jaeger_query:
    storage: {traces: memstore}
    http: {endpoint: "127.0.0.1:${env:QUERY_PORT}"}
    grpc: {endpoint: "127.0.0.1:${env:QUERY_GRPC_PORT}"}
  jaeger_storage:
    backends: {memstore: {memory: {max_traces: 100000}}}
receivers:
  otlp:
    protocols: {http: {endpoint: "127.0.0.1:${env:OTLP_PORT}"}}
processors:
  batch:
exporters:
  jaeger_storage_exporter: {trace_storage: memstore}
"#;

/// A running Jaeger.
pub struct Jaeger {
    /// The OTLP/HTTP receiver's port.
    pub otlp_port: u16,
    query_port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

/// The binary: `WEIR_JAEGER`, else `.tools/jaeger/jaeger`.
fn binary() -> PathBuf {
    let path = std::env::var_os("WEIR_JAEGER")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join(".tools/jaeger/jaeger"));
    assert!(
        path.is_file(),
        "Jaeger is missing from {}: run `bash scripts/tools.sh` (it builds it from the Go \
         module proxy), or set WEIR_JAEGER",
        path.display()
    );
    path
}

impl Jaeger {
    /// Starts one and waits until its receiver and query API answer.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("jaeger.yaml");
        std::fs::write(&config, CONFIG).expect("config");
        let [otlp_port, query_port, grpc_port] = [(); 3].map(|()| crate::free_port());
        let log = std::fs::File::create(dir.path().join("jaeger.log")).expect("log");
        let child = Command::new(binary())
            .arg("--config")
            .arg(&config)
            .env("OTLP_PORT", otlp_port.to_string())
            .env("QUERY_PORT", query_port.to_string())
            .env("QUERY_GRPC_PORT", grpc_port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start jaeger");
        let jaeger = Self {
            otlp_port,
            query_port,
            child,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let answers = |port| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        while !(answers(otlp_port) && answers(query_port)) {
            assert!(
                Instant::now() < deadline,
                "Jaeger not ready in 60 s:\n{}",
                jaeger.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        jaeger
    }

    /// The base URL of its OTLP/HTTP receiver (what `--otlp-endpoint` takes).
    pub fn otlp_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.otlp_port)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("jaeger.log")).unwrap_or_default()
    }

    /// Sends spans as OTLP/HTTP JSON (`{"resourceSpans": ...}`), as a producer would.
    pub fn send(&self, spans: &Value) {
        let body = spans.to_string();
        let (status, answer) =
            crate::http::request(self.otlp_port, "", "POST", "/v1/traces", body.as_bytes());
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(status, 200, "OTLP receiver: {answer}");
    }

    /// The spans of trace `trace_id` (32 hex digits) as the query API has them, once it
    /// holds at least `min_spans` of them (`data[0].spans`, each with `operationName`,
    /// `references`, `tags`, `logs`); fails after `timeout`.
    pub fn trace(&self, trace_id: &str, min_spans: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans_now(trace_id);
            if spans.len() >= min_spans {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "trace {trace_id}: {} spans in {timeout:?}, not {min_spans}: {spans:#?}\n\
                 Jaeger's log:\n{}",
                spans.len(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The spans of trace `trace_id` it holds now (none when it holds none).
    pub fn spans_now(&self, trace_id: &str) -> Vec<Value> {
        let path = format!("/api/traces/{trace_id}");
        let (_, body) = crate::http::json(self.query_port, "", "GET", &path, b"");
        (body["data"][0]["spans"].as_array().cloned()).unwrap_or_default()
    }
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
