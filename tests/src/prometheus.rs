//! A real Prometheus for tests (Debian's `prometheus` package, which `scripts/tools.sh`
//! installs): scrapes the given targets every second, evaluates the given rule files every
//! second, on a free loopback port with its data in a temporary directory; queried through
//! its HTTP API. Stopped (killed) when dropped.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running Prometheus.
pub struct Prometheus {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts one that scrapes `targets` (`host:port`, `/metrics`) as job `weir` and loads
    /// `rules`; waits until it is ready.
    pub fn start(targets: &[String], rules: &[&Path]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let quoted = |items: Vec<String>| items.join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [{}]\n\
             scrape_configs:\n  - job_name: weir\n    static_configs:\n      - targets: [{}]\n",
            quoted(
                rules
                    .iter()
                    .map(|r| format!("{:?}", r.display().to_string()))
                    .collect()
            ),
            quoted(targets.iter().map(|t| format!("{t:?}")).collect()),
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("config");
        let port = crate::free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("prometheus (apt-get install prometheus; scripts/tools.sh does)");
        let prometheus = Self { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while prometheus
            .get("/-/ready")
            .is_none_or(|(status, _)| status != 200)
        {
            assert!(
                Instant::now() < deadline,
                "Prometheus not ready in 30 s:\n{}",
                prometheus.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        prometheus
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The result of an instant query of `expr` (`data.result`), failing on an error.
    pub fn query(&self, expr: &str) -> Vec<Value> {
        self.query_at(expr, None)
    }

    /// As [`Self::query`], evaluated at `time` (seconds since the epoch) when given.
    pub fn query_at(&self, expr: &str, time: Option<f64>) -> Vec<Value> {
        let at = time.map(|t| format!("&time={t:.3}")).unwrap_or_default();
        let path = format!("/api/v1/query?query={}{at}", percent_encode(expr));
        let (status, body) = self.get(&path).expect("Prometheus answers");
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        assert_eq!(status, 200, "{expr}: {body}");
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The alerts pending or firing now (`/api/v1/alerts`).
    pub fn alerts(&self) -> Vec<Value> {
        let (_, body) = self.get("/api/v1/alerts").expect("Prometheus answers");
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        body["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// `GET path` over HTTP/1.0 (a whole body, never chunked): status and body.
    fn get(&self, path: &str) -> Option<(u16, Vec<u8>)> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).ok()?;
        let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&response[..split]);
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, response[split + 4..].to_vec()))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `text` as a URL query value.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
