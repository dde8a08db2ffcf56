//! A live stream through a worker that follows a growing file (`weir run --follow`), for the
//! hot-swap test and benchmark: a [`Feeder`] appends events at a steady rate, each stamped
//! with when it was written, and a [`Watcher`] tails the output file (envelopes) and notes
//! when each output appeared and which plugin versions it names.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A worker process, stopped with SIGTERM (and waited for) when dropped.
pub struct Running(Child);

impl Running {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        crate::signal(self.0.id(), libc::SIGTERM);
        let _ = self.0.wait();
    }
}

/// Starts `bin run` as a worker with the API on `port` (`token` its admin token) following
/// `in.jsonl` in `dir` into `out.jsonl` (envelopes), running `plugin` as version 1 of `p`;
/// its stderr goes to `dir/worker.log`.
pub fn start_worker(
    bin: &str,
    dir: &Path,
    port: u16,
    token: &str,
    plugin: &Path,
    extra: &[&str],
) -> Running {
    let child = Command::new(bin)
        .current_dir(dir)
        .args(["run", "--plugin"])
        .arg(plugin)
        .args(["--plugin-name", "p"])
        .args(["--input", "in.jsonl", "--follow", "--output", "out.jsonl"])
        .args(["--output-format", "envelope", "--state", "state", "--quiet"])
        .args(["--api", &format!("127.0.0.1:{port}")])
        .args(extra)
        .env("WEIR_ADMIN_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("worker.log")).expect("log"))
        .spawn()
        .expect("start weir");
    Running(child)
}

/// Appends events `e0, e1, ...` to a file, `per_tick` of them every `tick`, until stopped.
pub struct Feeder {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<usize>,
}

impl Feeder {
    pub fn start(path: PathBuf, per_tick: usize, tick: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .expect("input file");
            let mut n = 0;
            let mut next = Instant::now();
            while !stopping.load(Ordering::Relaxed) {
                let sent_us = now_us();
                let mut chunk = String::new();
                for i in n..n + per_tick {
                    chunk.push_str(&format!(
                        "{{\"id\":\"e{i}\",\"user_id\":\"u{i}\",\"ts\":1704067200,\"action\":\"view\",\"sent_us\":{sent_us}}}\n"
                    ));
                }
                file.write_all(chunk.as_bytes()).expect("append");
                n += per_tick;
                next += tick;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            n
        });
        Self { stop, handle }
    }

    /// Stops; how many events were written.
    pub fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("feeder")
    }
}

/// One output as the watcher saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// When the watcher read it (polled every millisecond).
    pub at: Instant,
    /// Microseconds from its event being written to the output being read.
    pub latency_us: u64,
    pub id: String,
    /// Every `weir.plugin-version` header value.
    pub versions: Vec<String>,
}

/// Tails an output file of envelopes until stopped.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    count: Arc<AtomicUsize>,
    handle: JoinHandle<()>,
}

impl Watcher {
    pub fn start(path: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let count = Arc::new(AtomicUsize::new(0));
        let (stopping, list, counter) = (stop.clone(), seen.clone(), count.clone());
        let handle = std::thread::spawn(move || {
            let file = loop {
                match std::fs::File::open(&path) {
                    Ok(file) => break file,
                    Err(_) if !stopping.load(Ordering::Relaxed) => {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(_) => return,
                }
            };
            let mut reader = std::io::BufReader::new(file);
            let mut line = String::new();
            loop {
                let before = line.len();
                let read = reader.read_line(&mut line).expect("read output");
                if read == 0 || !line.ends_with('\n') {
                    if stopping.load(Ordering::Relaxed) && line.len() == before {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                let output = parse(&line, Instant::now(), now_us());
                line.clear();
                list.lock().expect("outputs").push(output);
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        Self {
            stop,
            seen,
            count,
            handle,
        }
    }

    /// Outputs seen so far.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Waits until `n` outputs were seen (failing after `timeout`).
    pub fn wait_for(&self, n: usize, timeout: Duration, log: impl Fn() -> String) {
        let started = Instant::now();
        while self.count() < n {
            assert!(
                started.elapsed() < timeout,
                "{} of {n} outputs after {timeout:?}; log:\n{}",
                self.count(),
                log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A copy of what was seen from the `from`-th output on, in file order.
    pub fn seen_from(&self, from: usize) -> Vec<Seen> {
        let seen = self.seen.lock().expect("outputs");
        seen.get(from..).unwrap_or_default().to_vec()
    }

    /// Stops after reading what is there; everything seen, in file order.
    pub fn stop(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("watcher");
        Arc::try_unwrap(self.seen)
            .map(|m| m.into_inner().expect("outputs"))
            .unwrap_or_else(|seen| seen.lock().expect("outputs").clone())
    }
}

fn parse(line: &str, at: Instant, at_us: u64) -> Seen {
    let envelope: Value = serde_json::from_str(line).expect("envelope");
    let value: Value =
        serde_json::from_str(envelope["value"].as_str().expect("value")).expect("JSON value");
    let versions = envelope["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h["name"] == "weir.plugin-version")
        .map(|h| h["value"].as_str().unwrap_or_default().to_owned())
        .collect();
    Seen {
        at,
        latency_us: at_us.saturating_sub(value["sent_us"].as_u64().expect("sent_us")),
        id: value["id"].as_str().expect("id").to_owned(),
        versions,
    }
}

/// The longest time between two consecutive outputs appearing, over `seen`.
pub fn longest_gap(seen: &[Seen]) -> Duration {
    seen.windows(2)
        .map(|w| w[1].at.saturating_duration_since(w[0].at))
        .max()
        .unwrap_or_default()
}

/// The `q` quantile (0 to 1) of `values`, sorted in place.
pub fn quantile(values: &mut [u64], q: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    let at = ((values.len() - 1) as f64 * q).round() as usize;
    values[at]
}
