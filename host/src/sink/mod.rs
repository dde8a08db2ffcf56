//! Where outputs and dead letters go. [`Sink`] and [`DeadLetterSink`] are the seams;
//! `file.rs` writes JSON lines to files or stdout (the embedded default); Kafka topics are
//! sinks too (`crate::kafka`, cluster mode).

mod file;

pub use file::{FileDeadLetters, FileSink};

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;

use crate::record::DeadLetter;
use crate::record::Output;

/// What a sink can take at all (a known destination, a value the format can hold), checked
/// for each output when the plugin returns it: a refusal dead-letters the record as
/// `bad_output` with the reason, so a record that counts as processed has outputs its sink
/// takes (and a stateful plugin's writes are accepted only then).
pub trait OutputCheck: Send + Sync {
    fn check(&self, output: &Output) -> Result<(), String>;
}

/// Refuses an output that names a destination the sink was not configured with.
pub(crate) fn check_destination(
    output: &Output,
    destinations: &BTreeSet<String>,
) -> Result<(), String> {
    match &output.destination {
        Some(dest) if dest == crate::record::headers::RETRY_DESTINATION => Err(format!(
            "output names the destination `{dest}`, which is reserved for the retry topic"
        )),
        Some(dest) if !destinations.contains(dest) => {
            let known: Vec<&str> = destinations.iter().map(String::as_str).collect();
            Err(format!(
                "output names the destination `{dest}`, which is not configured (configured: [{}])",
                known.join(", ")
            ))
        }
        _ => Ok(()),
    }
}

/// Which of a sink's writers a batch's records go to. In exactly-once mode the Kafka sinks
/// write through two transactional producers that take turns, and the transaction the batch
/// joined says which ([`Ack::begin`](crate::source::Ack::begin)); every other sink has one
/// writer, `Lane::default()`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lane(pub usize);

/// A sink failure that stops the run (cannot write or sync).
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct SinkError {
    pub what: String,
    pub source: std::io::Error,
}

/// Everything a sink was sent up to a point, as a future that completes once it is durable.
/// It no longer borrows the sink, so later batches can be sent while it is awaited.
pub type Durable = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send>>;

/// A [`Durable`] for writes that are already durable.
pub(crate) fn already_durable() -> Durable {
    Box::pin(std::future::ready(Ok(())))
}

/// Receives output records.
#[async_trait]
pub trait Sink: Send {
    /// What this sink can take (see [`OutputCheck`]).
    fn checker(&self) -> Arc<dyn OutputCheck>;

    /// Queues outputs for writing through `lane`.
    async fn send(&mut self, outputs: Vec<Output>, lane: Lane) -> Result<(), SinkError>;

    /// Queues a batch's keyed-state writes with its outputs, where the sink carries keyed
    /// state (exactly-once mode: the changelog topic, in the batch's transaction). A sink
    /// that does not leaves them to the state store, which keeps them with the done marks.
    async fn send_keyed(
        &mut self,
        writes: &[crate::record::KeyedWrite],
        lane: Lane,
    ) -> Result<(), SinkError> {
        let _ = (writes, lane);
        Ok(())
    }

    /// Returns once everything sent is durable.
    async fn flush(&mut self) -> Result<(), SinkError>;

    /// Everything sent so far, durable once the returned future completes. By default the
    /// sink flushes now.
    async fn seal(&mut self) -> Result<Durable, SinkError> {
        self.flush().await?;
        Ok(already_durable())
    }

    /// The lengths of the files this sink writes, as of everything sent (none for topics
    /// and stdout).
    fn lengths(&self) -> Vec<FileLength> {
        Vec::new()
    }
}

/// Receives dead letters.
#[async_trait]
pub trait DeadLetterSink: Send {
    /// Queues dead letters for writing through `lane`.
    async fn send(&mut self, letters: Vec<DeadLetter>, lane: Lane) -> Result<(), SinkError>;

    /// Returns once everything sent is durable.
    async fn flush(&mut self) -> Result<(), SinkError>;

    /// As [`Sink::seal`].
    async fn seal(&mut self) -> Result<Durable, SinkError> {
        self.flush().await?;
        Ok(already_durable())
    }

    /// As [`Sink::lengths`].
    fn lengths(&self) -> Vec<FileLength> {
        Vec::new()
    }
}

/// How long a file a sink writes is once everything sent to it so far is written: recorded
/// with a batch's done marks, so a restart cuts off what later batches wrote but never
/// marked done (`state::EmbeddedStore::cut_back`), and a rerun writes each line once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileLength {
    pub path: std::path::PathBuf,
    pub length: u64,
}
