//! Re-feeds the records of a DLQ file (`weir dlq replay`). Each record keeps its original
//! id and source position and gets its `weir.replay.count` raised by one; records already at
//! the replay cap are handed back to the caller instead.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;

use super::{Batch, FileSource, Incoming, Source, SourceError};
use crate::config::LineFormat;
use crate::record::{DeadLetter, DeadLetterLine, ErrorInfo, replay_count, set_replay_count};
use crate::record::{Record, SourceMeta};

/// A DLQ file as a source.
pub struct DlqFileSource {
    lines: FileSource,
    max_replays: u32,
    refused: Arc<Mutex<Vec<DeadLetter>>>,
}

impl DlqFileSource {
    pub fn open(path: &Path, max_replays: u32) -> Result<Self, SourceError> {
        Ok(Self {
            lines: FileSource::open(path, LineFormat::Value)?,
            max_replays,
            refused: Arc::default(),
        })
    }

    /// Where the records already at the replay cap collect: they are not fed again, and the
    /// caller writes them to the new DLQ unchanged.
    pub fn refused(&self) -> Arc<Mutex<Vec<DeadLetter>>> {
        self.refused.clone()
    }
}

/// Parses one DLQ line back into the record and its error.
pub fn parse_dead_letter(line: &[u8]) -> Result<DeadLetter, String> {
    let parsed: DeadLetterLine =
        serde_json::from_slice(line).map_err(|e| format!("not a DLQ line: {e}"))?;
    let error = ErrorInfo::from_fields(&parsed.error)?;
    let parts = parsed.record.decode()?;
    Ok(DeadLetter {
        record: Record {
            key: parts.key,
            value: parts.value,
            headers: parts.headers,
            timestamp_ms: parts.timestamp,
            source: SourceMeta {
                stream: error.source.clone(),
                partition: error.partition,
                offset: error.offset,
                attempt: 1,
            },
        },
        error,
    })
}

#[async_trait]
impl Source for DlqFileSource {
    async fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, SourceError> {
        loop {
            let Some(lines) = self.lines.next_batch(max).await? else {
                return Ok(None);
            };
            let mut batch = Vec::with_capacity(lines.records.len());
            for line in lines.records {
                match parse_dead_letter(&line.record.value) {
                    Ok(mut letter) => {
                        let count = replay_count(&letter.record);
                        if count >= self.max_replays {
                            self.refused
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(letter);
                            continue;
                        }
                        set_replay_count(&mut letter.record, count + 1);
                        batch.push(Incoming {
                            known_id: Some(letter.error.record_id),
                            ..Incoming::new(letter.record)
                        });
                    }
                    Err(reason) => batch.push(Incoming {
                        rejected: Some(format!("DLQ line {}: {reason}", line.record.source.offset)),
                        ..line
                    }),
                }
            }
            if !batch.is_empty() {
                return Ok(Some(Batch::unacknowledged(batch)));
            }
        }
    }
}
