//! JSON-lines input: one record per line, from a file, every `*.jsonl` file of a directory
//! (in name order), or stdin (`-`). Blank lines are skipped but still counted, so a record's
//! offset is always its 1-based line number.
//!
//! A batch is handed over when it is full, or — for a live stream such as stdin — when no
//! further line arrives within a short linger, so records never wait for a batch to fill.
//!
//! Following (`--follow`), the last file is read as it grows, like `tail -f`: at its end the
//! source waits for more lines instead of ending (a line is taken once its newline is
//! there), until the worker is stopped.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use super::{Batch, Incoming, Source, SourceError};
use crate::config::LineFormat;
use crate::record::json::RecordJson;
use crate::record::{Record, SourceMeta};

enum Input {
    Stdin,
    File(PathBuf),
}

/// How long a partly filled batch waits for the next line of a live stream.
const LINGER: Duration = Duration::from_millis(20);
/// How often a followed file is looked at again once its end is reached.
const FOLLOW_POLL: Duration = Duration::from_millis(50);

struct OpenInput {
    stream: String,
    reader: BufReader<Box<dyn AsyncRead + Unpin + Send>>,
    line: i64,
}

/// Reads JSON lines from files or stdin.
pub struct FileSource {
    pending: VecDeque<Input>,
    current: Option<OpenInput>,
    format: LineFormat,
    buf: Vec<u8>,
    /// Keep reading the last file as it grows.
    follow: bool,
}

impl FileSource {
    /// `path` is a file, a directory of `*.jsonl` files, or `-` for stdin.
    pub fn open(path: &Path, format: LineFormat) -> Result<Self, SourceError> {
        let err = |what: String| move |source| SourceError { what, source };
        let pending = if path == Path::new("-") {
            VecDeque::from([Input::Stdin])
        } else if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(err(format!(
                    "cannot list input directory {}",
                    path.display()
                )))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|ext| ext == "jsonl") && p.is_file())
                .collect();
            files.sort();
            files.into_iter().map(Input::File).collect()
        } else {
            // Fail now, with the path, rather than at the first read.
            std::fs::metadata(path)
                .map_err(err(format!("cannot open input {}", path.display())))?;
            VecDeque::from([Input::File(path.to_owned())])
        };
        Ok(Self {
            pending,
            current: None,
            format,
            buf: Vec::new(),
            follow: false,
        })
    }

    /// Reads the last file as it grows instead of ending at its end (see the module docs).
    pub fn follow(mut self, follow: bool) -> Self {
        self.follow = follow;
        self
    }

    async fn open_next(&mut self) -> Result<bool, SourceError> {
        let Some(input) = self.pending.pop_front() else {
            return Ok(false);
        };
        self.current = Some(match input {
            Input::Stdin => OpenInput {
                stream: "-".into(),
                reader: BufReader::new(Box::new(tokio::io::stdin())),
                line: 0,
            },
            Input::File(path) => {
                let file = tokio::fs::File::open(&path)
                    .await
                    .map_err(|source| SourceError {
                        what: format!("cannot open input {}", path.display()),
                        source,
                    })?;
                // The absolute path names the stream, so position ids do not depend on the
                // directory the worker was started from.
                let stream = std::fs::canonicalize(&path)
                    .unwrap_or(path)
                    .display()
                    .to_string();
                OpenInput {
                    stream,
                    reader: BufReader::with_capacity(256 * 1024, Box::new(file)),
                    line: 0,
                }
            }
        });
        Ok(true)
    }

    fn to_incoming(&self, stream: &str, line: i64, bytes: &[u8]) -> Incoming {
        let source = SourceMeta {
            stream: stream.to_owned(),
            partition: 0,
            offset: line,
            attempt: 1,
        };
        let raw = |source| Record {
            key: None,
            value: bytes.to_vec(),
            headers: Vec::new(),
            timestamp_ms: None,
            source,
        };
        match self.format {
            LineFormat::Value => Incoming::new(raw(source)),
            LineFormat::Envelope => {
                let parsed = serde_json::from_slice::<RecordJson>(bytes)
                    .map_err(|e| e.to_string())
                    .and_then(RecordJson::decode);
                match parsed {
                    Ok(parts) => Incoming::new(Record {
                        key: parts.key,
                        value: parts.value,
                        headers: parts.headers,
                        timestamp_ms: parts.timestamp,
                        source,
                    }),
                    Err(reason) => Incoming {
                        rejected: Some(format!("line is not a record envelope: {reason}")),
                        ..Incoming::new(raw(source))
                    },
                }
            }
        }
    }
}

#[async_trait]
impl Source for FileSource {
    async fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, SourceError> {
        let mut batch = Vec::with_capacity(max.min(4096));
        while batch.len() < max {
            if self.current.is_none() && !self.open_next().await? {
                break;
            }
            let Some(input) = self.current.as_mut() else {
                break;
            };
            // `self.buf` keeps a partly read line across a linger timeout (read_until appends).
            let wait = !batch.is_empty() && input.reader.buffer().is_empty();
            let read = input.reader.read_until(b'\n', &mut self.buf);
            let n = if wait {
                match tokio::time::timeout(LINGER, read).await {
                    Ok(n) => n,
                    Err(_) => break, // nothing more right now: hand over what we have
                }
            } else {
                read.await
            };
            let n = n.map_err(|source| SourceError {
                what: format!("cannot read input {}", input.stream),
                source,
            })?;
            // The end of a followed file, or a line still being written: wait for more.
            if self.follow && self.pending.is_empty() && self.buf.last() != Some(&b'\n') {
                if !batch.is_empty() {
                    break;
                }
                tokio::time::sleep(FOLLOW_POLL).await;
                continue;
            }
            if n == 0 && self.buf.is_empty() {
                self.current = None;
                continue;
            }
            input.line += 1;
            let mut line: &[u8] = &self.buf;
            while let [rest @ .., b'\n' | b'\r'] = line {
                line = rest;
            }
            if !line.iter().all(u8::is_ascii_whitespace) {
                let (stream, number) = (input.stream.clone(), input.line);
                batch.push(self.to_incoming(&stream, number, line));
            }
            self.buf.clear();
        }
        Ok((!batch.is_empty()).then(|| Batch::unacknowledged(batch)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The records of the next batch, which must come.
    async fn records(source: &mut FileSource, max: usize) -> Vec<Incoming> {
        let batch = source.next_batch(max).await.expect("read");
        batch.expect("a batch").records
    }

    #[tokio::test]
    async fn a_followed_file_is_read_as_it_grows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("in.jsonl");
        std::fs::write(&path, "{\"a\":1}\n{\"a\":").expect("write");
        let mut source = FileSource::open(&path, LineFormat::Value)
            .expect("open")
            .follow(true);
        let batch = records(&mut source, 10).await;
        assert_eq!(batch.len(), 1, "the unfinished line waits");
        // At the end, the source waits instead of ending.
        let waiting = tokio::time::timeout(Duration::from_millis(300), source.next_batch(10));
        assert!(waiting.await.is_err(), "a followed file does not end");
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("append");
        file.write_all(b"2}\n{\"a\":3}\n").expect("append");
        let batch = records(&mut source, 10).await;
        let values: Vec<&[u8]> = batch.iter().map(|i| i.record.value.as_slice()).collect();
        assert_eq!(values, [&b"{\"a\":2}"[..], b"{\"a\":3}"]);
        let lines: Vec<i64> = batch.iter().map(|i| i.record.source.offset).collect();
        assert_eq!(lines, [2, 3]);
    }

    #[tokio::test]
    async fn reads_lines_with_line_numbers_and_skips_blanks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("in.jsonl");
        std::fs::write(&path, "{\"a\":1}\n\n{\"a\":2}\r\n{\"a\":3}").expect("write");
        let mut source = FileSource::open(&path, LineFormat::Value).expect("open");
        let batch = records(&mut source, 2).await;
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[1].record.value, b"{\"a\":2}");
        assert_eq!(batch[1].record.source.offset, 3);
        let batch = records(&mut source, 10).await;
        assert_eq!(batch[0].record.source.offset, 4);
        assert!(source.next_batch(10).await.expect("read").is_none());
    }

    #[tokio::test]
    async fn bad_envelope_is_rejected_not_lost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("in.jsonl");
        std::fs::write(&path, "not json\n{\"value\":\"v\",\"key\":\"k\"}\n").expect("write");
        let mut source = FileSource::open(&path, LineFormat::Envelope).expect("open");
        let batch = records(&mut source, 10).await;
        assert!(
            batch[0]
                .rejected
                .as_deref()
                .is_some_and(|r| r.contains("envelope"))
        );
        assert_eq!(batch[0].record.value, b"not json");
        assert_eq!(batch[1].record.key.as_deref(), Some(&b"k"[..]));
    }

    #[tokio::test]
    async fn a_directory_is_read_file_by_file_in_name_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("b.jsonl"), "3\n").expect("write");
        std::fs::write(dir.path().join("a.jsonl"), "1\n2\n").expect("write");
        std::fs::write(dir.path().join("notes.txt"), "not input\n").expect("write");
        let mut source = FileSource::open(dir.path(), LineFormat::Value).expect("open");
        let batch = records(&mut source, 10).await;
        let values: Vec<&[u8]> = batch.iter().map(|i| i.record.value.as_slice()).collect();
        assert_eq!(values, vec![&b"1"[..], b"2", b"3"]);
        assert!(batch[2].record.source.stream.ends_with("b.jsonl"));
        assert_eq!(batch[2].record.source.offset, 1);
    }

    #[test]
    fn missing_input_names_the_path() {
        let err = FileSource::open(Path::new("/no/such/file.jsonl"), LineFormat::Value)
            .err()
            .expect("error");
        assert!(err.to_string().contains("/no/such/file.jsonl"), "{err}");
    }
}
