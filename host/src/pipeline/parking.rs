//! Non-blocking retries (`retry.topic`, cluster mode). A record the plugin calls `retryable`
//! is parked: written to the retry topic with `weir.retry.*` headers (its id, the attempts
//! made, when it first failed, when its next attempt is due, the reason), after which its
//! input offset moves on and its lease is released. A second pipeline of the worker reads
//! the retry topic ([`ParkedSource`], consumer group `<group>.retry`), waits until each
//! batch is due, and runs its records again under their original ids: each is processed,
//! dead-lettered (`retries_exhausted` once the retry budget is spent), or parked again.
//!
//! A parked record waits in its retry partition behind those parked before it, so a long
//! wait can hold later ones back by up to `retry.max_backoff_ms`; the input partitions are
//! never held.

use std::time::Duration;

use async_trait::async_trait;

use crate::clock::now_ms;
use crate::record::{Output, Record, headers};
use crate::source::{Batch, Source, SourceError};

/// What a parked record carries in its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    pub id: String,
    /// Attempts made so far.
    pub attempts: u32,
    pub first_failure_ms: i64,
    /// Not to run again before this time.
    pub due_ms: i64,
}

fn header<'a>(record: &'a Record, name: &str) -> Option<&'a str> {
    let (_, value) = record.headers.iter().rev().find(|(n, _)| n == name)?;
    std::str::from_utf8(value).ok()
}

impl Parked {
    /// The parking of a record read back from the retry topic, if it is one.
    pub fn of(record: &Record) -> Option<Self> {
        Some(Self {
            id: header(record, headers::RETRY_ID)?.to_owned(),
            attempts: header(record, headers::RETRY_ATTEMPTS)?.parse().ok()?,
            first_failure_ms: header(record, headers::RETRY_FIRST_FAILURE_MS)?
                .parse()
                .ok()?,
            due_ms: header(record, headers::RETRY_DUE_MS)?.parse().ok()?,
        })
    }

    /// `record` as the output that parks it (its key, value and headers, the earlier
    /// parking's headers replaced by this one's).
    pub fn output(&self, record: Record, reason: &str) -> Output {
        let mut headers: Vec<(String, Vec<u8>)> = record
            .headers
            .into_iter()
            .filter(|(name, _)| !name.starts_with(headers::RETRY_PREFIX))
            .collect();
        headers.extend([
            (headers::RETRY_ID.to_owned(), self.id.clone().into_bytes()),
            (
                headers::RETRY_ATTEMPTS.to_owned(),
                self.attempts.to_string().into_bytes(),
            ),
            (
                headers::RETRY_FIRST_FAILURE_MS.to_owned(),
                self.first_failure_ms.to_string().into_bytes(),
            ),
            (
                headers::RETRY_DUE_MS.to_owned(),
                self.due_ms.to_string().into_bytes(),
            ),
            (headers::RETRY_REASON.to_owned(), reason.as_bytes().to_vec()),
        ]);
        Output {
            destination: Some(headers::RETRY_DESTINATION.to_owned()),
            key: record.key,
            value: record.value,
            headers,
        }
    }
}

/// The retry topic as a source: each record gets its original id and its attempt number,
/// and a batch is handed on only once all its records are due.
pub struct ParkedSource(pub Box<dyn Source>);

#[async_trait]
impl Source for ParkedSource {
    async fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, SourceError> {
        let Some(mut batch) = self.0.next_batch(max).await? else {
            return Ok(None);
        };
        let mut due_ms = 0;
        for incoming in &mut batch.records {
            match Parked::of(&incoming.record) {
                Some(parked) => {
                    incoming.record.source.attempt = parked.attempts + 1;
                    incoming.known_id = Some(parked.id);
                    due_ms = due_ms.max(parked.due_ms);
                }
                None => {
                    incoming.rejected = Some(format!(
                        "a record in the retry topic without valid {}, {}, {} and {} headers",
                        headers::RETRY_ID,
                        headers::RETRY_ATTEMPTS,
                        headers::RETRY_FIRST_FAILURE_MS,
                        headers::RETRY_DUE_MS
                    ));
                }
            }
        }
        let wait = due_ms.saturating_sub(now_ms());
        if wait > 0 {
            // The consumer keeps its place in the group while the batch waits.
            let due = tokio::time::sleep(Duration::from_millis(wait.unsigned_abs()));
            tokio::select! {
                () = due => {}
                never = self.0.keep_alive() => match never {},
            }
        }
        Ok(Some(batch))
    }

    async fn keep_alive(&mut self) -> std::convert::Infallible {
        self.0.keep_alive().await
    }

    async fn close(&mut self) -> Result<(), SourceError> {
        self.0.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SourceMeta;

    #[test]
    fn a_parked_record_reads_back_with_its_parking() {
        let record = Record {
            key: Some(b"k".to_vec()),
            value: b"v".to_vec(),
            headers: vec![
                ("trace".into(), b"t1".to_vec()),
                (headers::RETRY_ATTEMPTS.into(), b"1".to_vec()),
            ],
            timestamp_ms: None,
            source: SourceMeta {
                stream: "in".into(),
                partition: 0,
                offset: 7,
                attempt: 1,
            },
        };
        assert_eq!(Parked::of(&record), None, "not parked: headers missing");
        let parked = Parked {
            id: "in:0:7".into(),
            attempts: 2,
            first_failure_ms: 1_000,
            due_ms: 2_000,
        };
        let out = parked.output(record.clone(), "busy");
        assert_eq!(out.destination.as_deref(), Some(headers::RETRY_DESTINATION));
        assert_eq!(
            (out.key.clone(), out.value.clone()),
            (record.key.clone(), record.value.clone())
        );
        let back = Record {
            headers: out.headers.clone(),
            ..record
        };
        assert_eq!(Parked::of(&back), Some(parked));
        let attempts = out
            .headers
            .iter()
            .filter(|(n, _)| n == headers::RETRY_ATTEMPTS)
            .count();
        assert_eq!(attempts, 1, "the earlier parking's headers are replaced");
        assert!(out.headers.iter().any(|(n, v)| n == "trace" && v == b"t1"));
    }
}
