//! JSON-lines output: the default destination and each named destination is a file (or
//! stdout for `-`); dead letters are one JSON object per line (docs/architecture.md,
//! "Public names").
//!
//! A fate is durable before its id is marked done: `seal` hands what was written to the
//! operating system and returns a future that completes once a syncer thread has synced it
//! to disk. The syncer takes every request that came while it was syncing in one `fsync`
//! (group commit), so the writing stage never waits for the disk and batches share syncs.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};

use async_trait::async_trait;
use tokio::sync::watch;

use super::{
    DeadLetterSink, Durable, FileLength, Lane, OutputCheck, Sink, SinkError, already_durable,
    check_destination,
};
use crate::config::LineFormat;
use crate::record::Output;
use crate::record::json::RecordJson;
use crate::record::{DeadLetter, DeadLetterLine};

/// One JSON-lines file or stdout.
struct LineWriter {
    path: PathBuf,
    out: BufWriter<Box<dyn Write + Send>>,
    /// The file's length once everything written is handed over (a file; not stdout).
    length: Option<u64>,
    /// A file's syncer (stdout has none).
    syncer: Option<Syncer>,
    /// Whether lines were written since the last seal.
    written: bool,
}

/// How far a file is synced: seals are numbered, and `up_to` is the last one on disk.
#[derive(Clone, Default)]
struct Synced {
    up_to: u64,
    /// A failed `fsync`: the file's later seals fail too.
    failed: Option<String>,
}

/// The background thread that syncs one file, and the seals asked of it.
struct Syncer {
    requests: mpsc::Sender<u64>,
    synced: watch::Receiver<Synced>,
    /// The number of the last seal asked for.
    requested: u64,
}

impl Syncer {
    fn start(file: File) -> std::io::Result<Self> {
        let (requests, asked) = mpsc::channel::<u64>();
        let (done, synced) = watch::channel(Synced::default());
        std::thread::Builder::new()
            .name("weir-sync".into())
            .spawn(move || {
                while let Ok(mut up_to) = asked.recv() {
                    // Everything asked for while the last sync ran is covered by this one.
                    while let Ok(later) = asked.try_recv() {
                        up_to = later;
                    }
                    let result = file.sync_data();
                    done.send_modify(|synced| match result {
                        Ok(()) => synced.up_to = up_to,
                        Err(e) => synced.failed = Some(e.to_string()),
                    });
                }
            })?;
        Ok(Self {
            requests,
            synced,
            requested: 0,
        })
    }

    /// Durable once everything written before the last seal asked for is on disk.
    fn durable(&self, path: &Path) -> Durable {
        let (seal, mut synced) = (self.requested, self.synced.clone());
        let what = format!("cannot sync {}", path.display());
        Box::pin(async move {
            let failed = |reason: String| SinkError {
                what: what.clone(),
                source: std::io::Error::other(reason),
            };
            let state = (synced
                .wait_for(|s| s.up_to >= seal || s.failed.is_some())
                .await)
                .map_err(|_| failed("its syncer thread stopped".into()))?;
            match &state.failed {
                Some(reason) => Err(failed(reason.clone())),
                None => Ok(()),
            }
        })
    }
}

impl LineWriter {
    fn open(path: &Path) -> Result<Self, SinkError> {
        if path == Path::new("-") {
            return Ok(Self {
                path: path.to_owned(),
                out: BufWriter::new(Box::new(std::io::stdout())),
                length: None,
                syncer: None,
                written: false,
            });
        }
        let err = |source| SinkError {
            what: format!("cannot open output {}", path.display()),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        let length = file.metadata().map_err(err)?.len();
        Ok(Self {
            path: path.to_owned(),
            length: Some(length),
            out: BufWriter::with_capacity(256 * 1024, Box::new(file.try_clone().map_err(err)?)),
            syncer: Some(Syncer::start(file).map_err(err)?),
            written: false,
        })
    }

    fn write_line(&mut self, line: &[u8]) -> Result<(), SinkError> {
        self.written = true;
        if let Some(length) = &mut self.length {
            *length += line.len() as u64 + 1;
        }
        self.out
            .write_all(line)
            .and_then(|()| self.out.write_all(b"\n"))
            .map_err(|source| self.error("cannot write", source))
    }

    /// Hands what was written to the operating system; durable once it is synced.
    fn seal(&mut self) -> Result<Durable, SinkError> {
        self.out
            .flush()
            .map_err(|source| self.error("cannot write", source))?;
        let Some(syncer) = &mut self.syncer else {
            return Ok(already_durable());
        };
        if std::mem::take(&mut self.written) {
            syncer.requested += 1;
            // A thread that stopped shows as a closed channel to the durable future.
            let _ = syncer.requests.send(syncer.requested);
        }
        Ok(syncer.durable(&self.path))
    }

    fn error(&self, what: &str, source: std::io::Error) -> SinkError {
        SinkError {
            what: format!("{what} {}", self.path.display()),
            source,
        }
    }

    /// The file's length as of everything written so far (stdout: none).
    fn length(&self) -> Option<FileLength> {
        Some(FileLength {
            path: self.path.clone(),
            length: self.length?,
        })
    }
}

/// What a [`FileSink`] can take.
struct FileCheck {
    destinations: BTreeSet<String>,
    format: LineFormat,
}

impl OutputCheck for FileCheck {
    fn check(&self, output: &Output) -> Result<(), String> {
        check_destination(output, &self.destinations)?;
        if self.format == LineFormat::Value && output.value.contains(&b'\n') {
            return Err("output value contains a newline, which the value-per-line output format cannot hold \
                        (use the envelope format)"
                .into());
        }
        Ok(())
    }
}

/// Writes outputs to the default file and to named destination files.
pub struct FileSink {
    default: LineWriter,
    destinations: BTreeMap<String, LineWriter>,
    format: LineFormat,
}

impl FileSink {
    pub fn open(
        default: &Path,
        destinations: &BTreeMap<String, PathBuf>,
        format: LineFormat,
    ) -> Result<Self, SinkError> {
        Ok(Self {
            default: LineWriter::open(default)?,
            destinations: destinations
                .iter()
                .map(|(name, path)| Ok((name.clone(), LineWriter::open(path)?)))
                .collect::<Result<_, SinkError>>()?,
            format,
        })
    }
}

#[async_trait]
impl Sink for FileSink {
    fn checker(&self) -> Arc<dyn OutputCheck> {
        Arc::new(FileCheck {
            destinations: self.destinations.keys().cloned().collect(),
            format: self.format,
        })
    }

    async fn send(&mut self, outputs: Vec<Output>, _lane: Lane) -> Result<(), SinkError> {
        for output in outputs {
            let writer = match &output.destination {
                Some(dest) => self.destinations.get_mut(dest).unwrap_or(&mut self.default),
                None => &mut self.default,
            };
            match self.format {
                LineFormat::Value => writer.write_line(&output.value)?,
                LineFormat::Envelope => {
                    let json = RecordJson::encode(
                        output.key.as_deref(),
                        &output.value,
                        &output.headers,
                        None,
                    );
                    writer.write_line(&serde_json::to_vec(&json).unwrap_or_default())?;
                }
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        self.seal().await?.await
    }

    fn lengths(&self) -> Vec<FileLength> {
        std::iter::once(&self.default)
            .chain(self.destinations.values())
            .filter_map(LineWriter::length)
            .collect()
    }

    async fn seal(&mut self) -> Result<Durable, SinkError> {
        let mut all = vec![self.default.seal()?];
        for writer in self.destinations.values_mut() {
            all.push(writer.seal()?);
        }
        Ok(Box::pin(async move {
            for durable in all {
                durable.await?;
            }
            Ok(())
        }))
    }
}

/// Writes dead letters as JSON lines.
pub struct FileDeadLetters {
    writer: LineWriter,
}

impl FileDeadLetters {
    pub fn open(path: &Path) -> Result<Self, SinkError> {
        Ok(Self {
            writer: LineWriter::open(path)?,
        })
    }
}

#[async_trait]
impl DeadLetterSink for FileDeadLetters {
    async fn send(&mut self, letters: Vec<DeadLetter>, _lane: Lane) -> Result<(), SinkError> {
        for letter in &letters {
            let line = serde_json::to_vec(&DeadLetterLine::from_letter(letter)).unwrap_or_default();
            self.writer.write_line(&line)?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        self.writer.seal()?.await
    }

    async fn seal(&mut self) -> Result<Durable, SinkError> {
        self.writer.seal()
    }

    fn lengths(&self) -> Vec<FileLength> {
        self.writer.length().into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(value: &str) -> Output {
        Output {
            destination: None,
            key: None,
            value: value.as_bytes().to_vec(),
            headers: Vec::new(),
        }
    }

    /// Seals answered out of order still each wait for their own writes, and a seal with
    /// nothing new written waits for the last one asked.
    #[tokio::test]
    async fn every_seal_is_durable_once_its_writes_are_synced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.jsonl");
        let mut sink = FileSink::open(&path, &BTreeMap::new(), LineFormat::Value).expect("open");
        let mut seals = Vec::new();
        for batch in 0..50 {
            let outputs = (0..10).map(|i| output(&format!("{batch}-{i}"))).collect();
            sink.send(outputs, Lane::default()).await.expect("send");
            seals.push(sink.seal().await.expect("seal"));
        }
        seals.push(sink.seal().await.expect("an empty seal"));
        for durable in seals.into_iter().rev() {
            durable.await.expect("durable");
        }
        let written = std::fs::read_to_string(&path).expect("read");
        assert_eq!(written.lines().count(), 500);
        assert_eq!(written.lines().last(), Some("49-9"));
        let syncer = sink.default.syncer.as_ref().expect("a file has a syncer");
        assert_eq!(syncer.requested, 50, "the empty seal asked for no sync");
        assert!(syncer.synced.borrow().up_to >= 50);
    }
}
