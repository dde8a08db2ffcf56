//! A real Redis for tests: `redis-server` (Debian's) on a free loopback port with AOF on,
//! in its own temporary directory, stopped when dropped; optionally TLS only, with an ACL
//! user and the default user off. With `WEIR_REDIS_URL` set, the tests use that server
//! instead (and never stop it).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Redis that takes TLS connections only (its certificate signed by `ca`) from one ACL
/// user, the default user off.
#[derive(Debug, Clone)]
pub struct Secured {
    pub certificate: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub user: String,
    pub password: String,
}

/// A running Redis.
pub struct RedisServer {
    pub url: String,
    process: Option<Child>,
    port: u16,
    dir: Option<tempfile::TempDir>,
    secured: Option<Secured>,
    /// More `redis-server` arguments (a cluster node's).
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a fresh server (or returns the external one of `WEIR_REDIS_URL`).
    pub fn start() -> Self {
        if let Ok(url) = std::env::var("WEIR_REDIS_URL") {
            return Self {
                url,
                process: None,
                port: 0,
                dir: None,
                secured: None,
                extra: Vec::new(),
            };
        }
        Self::start_local()
    }

    /// Starts a fresh local server, even when `WEIR_REDIS_URL` is set (for tests that pause
    /// or kill it).
    pub fn start_local() -> Self {
        Self::start_on(None, Vec::new())
    }

    /// Starts a fresh local server with more `redis-server` arguments.
    pub fn start_with(extra: Vec<String>) -> Self {
        Self::start_on(None, extra)
    }

    /// Starts a fresh local server that takes only TLS and `secured.user`; its URL is
    /// `rediss://<user>:<password>@127.0.0.1:<port>/`.
    pub fn start_secured(secured: Secured) -> Self {
        Self::start_on(Some(secured), Vec::new())
    }

    fn start_on(secured: Option<Secured>, extra: Vec<String>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = crate::free_port();
        let url = match &secured {
            Some(s) => format!("rediss://{}:{}@127.0.0.1:{port}/", s.user, s.password),
            None => format!("redis://127.0.0.1:{port}/"),
        };
        let mut server = Self {
            url,
            process: None,
            port,
            dir: Some(dir),
            secured,
            extra,
        };
        server.spawn();
        server
    }

    /// Where it is, as the worker's library takes it (with the CA of a secured server).
    pub fn target(&self) -> weir::state::RedisTarget {
        let ca = self.secured.as_ref().map(|s| s.ca.clone());
        weir::state::RedisTarget::new(self.url.clone(), ca)
    }

    /// Whether this server is ours to stop and restart.
    pub fn is_local(&self) -> bool {
        self.dir.is_some()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.as_ref().expect("a local server").path().to_owned()
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut redis = Command::new("redis-server");
        match &self.secured {
            None => redis.args(["--port", &port]),
            Some(s) => redis
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(&s.certificate)
                .arg("--tls-key-file")
                .arg(&s.key)
                .arg("--tls-ca-cert-file")
                .arg(&s.ca)
                .args(["--user", "default", "off"])
                .args(["--user", &s.user, "on"])
                .arg(format!(">{}", s.password))
                .args(["~*", "&*", "+@all"]),
        };
        let child = redis
            .args(["--bind", "127.0.0.1", "--appendonly", "yes", "--save", ""])
            .arg("--dir")
            .arg(self.data_dir())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "start redis-server (installed by scripts/tools.sh; Debian package redis-server)",
            );
        self.process = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not start in 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`, then start again on the same port and data directory.
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// SIGSTOP: the server freezes with its connections open.
    pub fn pause(&self) {
        crate::signal(self.pid(), libc::SIGSTOP);
    }

    /// SIGCONT.
    pub fn resume(&self) {
        crate::signal(self.pid(), libc::SIGCONT);
    }

    /// The port it listens on (a local server's).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `kill -9` (a local server), for good.
    pub fn kill_now(&mut self) {
        self.kill();
    }

    /// The process id of a local server.
    pub fn pid(&self) -> u32 {
        self.process.as_ref().expect("a local server").id()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
