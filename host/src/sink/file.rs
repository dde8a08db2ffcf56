//! JSON-lines output: the default destination and each named destination is a file (or
//! stdout for `-`); dead letters are one JSON object per line (docs/architecture.md,
//! "Public names").
//! `flush` syncs files to disk, so a fate is durable before its id is marked done.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{DeadLetterSink, Lane, Sink, SinkError, check_destination};
use crate::config::LineFormat;
use crate::record::Output;
use crate::record::json::RecordJson;
use crate::record::{DeadLetter, DeadLetterLine};

/// One JSON-lines file or stdout.
struct LineWriter {
    path: PathBuf,
    out: BufWriter<Box<dyn Write + Send>>,
    file: Option<File>,
}

impl LineWriter {
    fn open(path: &Path) -> Result<Self, SinkError> {
        if path == Path::new("-") {
            return Ok(Self {
                path: path.to_owned(),
                out: BufWriter::new(Box::new(std::io::stdout())),
                file: None,
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
        Ok(Self {
            path: path.to_owned(),
            out: BufWriter::with_capacity(256 * 1024, Box::new(file.try_clone().map_err(err)?)),
            file: Some(file),
        })
    }

    fn write_line(&mut self, line: &[u8]) -> Result<(), SinkError> {
        self.out
            .write_all(line)
            .and_then(|()| self.out.write_all(b"\n"))
            .map_err(|source| self.error("cannot write", source))
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.out
            .flush()
            .map_err(|source| self.error("cannot write", source))?;
        if let Some(file) = &self.file {
            file.sync_data()
                .map_err(|source| self.error("cannot sync", source))?;
        }
        Ok(())
    }

    fn error(&self, what: &str, source: std::io::Error) -> SinkError {
        SinkError {
            what: format!("{what} {}", self.path.display()),
            source,
        }
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
    fn check(&self, output: &Output) -> Result<(), String> {
        check_destination(output, &self.destinations)?;
        if self.format == LineFormat::Value && output.value.contains(&b'\n') {
            return Err("output value contains a newline, which the value-per-line output format cannot hold \
                        (use the envelope format)"
                .into());
        }
        Ok(())
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
        self.default.flush()?;
        for writer in self.destinations.values_mut() {
            writer.flush()?;
        }
        Ok(())
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
        self.writer.flush()
    }
}
