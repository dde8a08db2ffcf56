//! `weir` worker processes in cluster mode, for tests: started with the cluster flags,
//! their stderr kept in a file, their `/metrics` read over loopback, and stopped gracefully
//! (SIGTERM), killed (`kill -9`), paused (SIGSTOP) or resumed (SIGCONT). Workers log at
//! `info`; `WEIR_WORKER_LOG` sets another `RUST_LOG` (e.g. `info,kafka=debug`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Where a cluster worker reads, writes and keeps state.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub bootstrap: String,
    pub redis: Option<String>,
    pub group: String,
    pub input: String,
    pub output: String,
    pub dlq: String,
}

/// A running worker.
pub struct Worker {
    pub name: String,
    child: Option<Child>,
    metrics_port: u16,
    log: PathBuf,
}

impl Worker {
    /// Starts `bin` (`weir-under-test`) as a worker of `cluster` running `plugin`, with
    /// `extra` flags, its log in `dir/<name>.log`.
    pub fn start(
        bin: &str,
        dir: &Path,
        name: &str,
        cluster: &Cluster,
        plugin: &Path,
        extra: &[&str],
    ) -> Self {
        Self::start_with_env(bin, dir, name, cluster, plugin, extra, &[])
    }

    /// As [`Self::start`], with these environment variables set.
    pub fn start_with_env(
        bin: &str,
        dir: &Path,
        name: &str,
        cluster: &Cluster,
        plugin: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let metrics_port = crate::free_port();
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("worker log");
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--plugin")
            .arg(plugin)
            .args(["--kafka", &cluster.bootstrap])
            .args(["--group", &cluster.group])
            .args(["--input-topic", &cluster.input])
            .args(["--output-topic", &cluster.output])
            .args(["--dlq-topic", &cluster.dlq])
            .args(["--metrics", &format!("127.0.0.1:{metrics_port}")])
            .args(["--summary-json"])
            .arg(dir.join(format!("{name}.summary.json")))
            .args(extra)
            .current_dir(dir)
            .env(
                "RUST_LOG",
                std::env::var("WEIR_WORKER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file);
        if let Some(redis) = &cluster.redis {
            cmd.args(["--redis", redis]);
        }
        let child = cmd.spawn().expect("spawn weir worker");
        Self {
            name: name.to_owned(),
            child: Some(child),
            metrics_port,
            log,
        }
    }

    /// The port of its `/metrics`.
    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// What the worker printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A counter or gauge from `/metrics` (summed over its labels); `None` while the worker
    /// does not answer.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metric_where(name, "")
    }

    /// As [`Self::metric`], summed over the series whose labels contain `labels` (e.g.
    /// `result="committed"`).
    pub fn metric_where(&self, name: &str, labels: &str) -> Option<f64> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).ok()?;
        let (_, body) = body.split_once("\r\n\r\n")?;
        let mut total = None;
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let metric = series.split('{').next().unwrap_or(series);
            if metric == name && series.contains(labels) {
                *total.get_or_insert(0.0) += value.parse::<f64>().ok()?;
            }
        }
        total
    }

    /// Waits until `metric` reaches `at_least`, failing (with the log) after `timeout`.
    pub fn wait_metric(&self, name: &str, at_least: f64, timeout: Duration) {
        let started = Instant::now();
        loop {
            if self.metric(name).is_some_and(|v| v >= at_least) {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "{}: {name} did not reach {at_least} in {timeout:?} (now {:?}); log:\n{}",
                self.name,
                self.metric(name),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then waits for the exit (the worker drains and commits first).
    pub fn stop(mut self) -> ExitStatus {
        crate::signal(self.pid(), libc::SIGTERM);
        self.wait_exit(Duration::from_secs(60))
    }

    /// Waits for the process to end, failing (with the log) after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                panic!(
                    "{} did not end within {timeout:?}; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9` (its log stays readable).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process freezes (no heartbeats, no lease renewals).
    pub fn pause(&self) {
        crate::signal(self.pid(), libc::SIGSTOP);
    }

    /// SIGCONT.
    pub fn resume(&self) {
        crate::signal(self.pid(), libc::SIGCONT);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
