//! Where records come from. [`Source`] is the seam: `file.rs` (JSON lines from files, a
//! directory or stdin) is the embedded default; `dlq.rs` re-feeds a DLQ file for replays; a
//! Kafka topic consumed in a consumer group is one too (`crate::kafka`, cluster mode).

mod dlq;
mod file;

pub use dlq::DlqFileSource;
pub use file::FileSource;

use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;

use crate::record::Record;
use crate::sink::{Lane, SinkError};

/// A record as the source read it.
#[derive(Debug)]
pub struct Incoming {
    pub record: Record,
    /// Set when the source could read the bytes but not make a proper record of them: the
    /// pipeline dead-letters such a record as `invalid` with this reason.
    pub rejected: Option<String>,
    /// An id the record already carries (a DLQ replay knows the original record id).
    pub known_id: Option<String>,
}

impl Incoming {
    pub fn new(record: Record) -> Self {
        Self {
            record,
            rejected: None,
            known_id: None,
        }
    }
}

/// A batch of records with the acknowledgement that settles it, handed out together (as
/// Benthos's `ReadBatch`): nothing else ties an acknowledgement to its records.
pub struct Batch {
    pub records: Vec<Incoming>,
    pub ack: Box<dyn Ack>,
}

impl Batch {
    /// Records of a source with nothing to acknowledge ([`NoAck`]).
    pub fn unacknowledged(records: Vec<Incoming>) -> Self {
        Self {
            records,
            ack: Box::new(NoAck),
        }
    }
}

/// A source failure that stops the run (cannot open or read the input).
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct SourceError {
    pub what: String,
    pub source: std::io::Error,
}

impl SourceError {
    /// `what` failed because of `e` (a Kafka error, a task that did not finish, a reason).
    pub fn other(what: &str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self {
            what: what.to_owned(),
            source: std::io::Error::other(e),
        }
    }
}

/// A step of an [`Ack`] that may wait.
pub type AckStep<'a, T> = Pin<Box<dyn Future<Output = Result<T, SourceError>> + Send + 'a>>;

/// Acknowledges one batch once its records' fates are durable.
///
/// A source that commits its position atomically with the batch's outputs (exactly-once
/// mode) also opens a transaction for the batch with `begin`, before the outputs and dead
/// letters are sent, and commits it with `commit` once they are delivered, before any done
/// mark is written.
pub trait Ack: Send {
    /// The batch's records have a durable fate, except those at the positions `unfinished`
    /// (their lease went to another worker): the source may advance past the others, but
    /// never past an unfinished one.
    fn ack(self: Box<Self>, unfinished: &[usize]);

    /// Opens the batch's transaction, or joins the open one; waits while it cannot. Says
    /// which lane of the sinks the batch's outputs and dead letters go to: the producer of
    /// that transaction.
    fn begin(&mut self) -> AckStep<'_, Lane> {
        Box::pin(std::future::ready(Ok(Lane::default())))
    }

    /// Commits what was sent since `begin` with the batch's position. `false`: the
    /// transaction was aborted and the source reads the batch's records again, so they
    /// have no fate yet.
    fn commit(&mut self) -> AckStep<'_, bool> {
        Box::pin(std::future::ready(Ok(true)))
    }

    /// Sending or delivering the batch's outputs or dead letters failed with `why`. A source
    /// whose transaction holds them aborts it and reads the records again (`true`: they have
    /// no fate yet); any other cannot (`false`), and the failure stops the run.
    fn abort<'a>(&'a mut self, why: &'a SinkError) -> AckStep<'a, bool> {
        let _ = why;
        Box::pin(std::future::ready(Ok(false)))
    }

    /// The partitions the batch's records were read from, each with the number of the
    /// assignment it was read under (larger for a later one): a worker takes a partition's
    /// keyed state over when it is assigned the partition anew. A file is partition 0,
    /// assigned once.
    fn partitions(&self) -> Vec<(i32, u64)> {
        vec![(0, 0)]
    }
}

/// The [`Ack`] of a source that re-reads its input on every run (done marks skip what was
/// finished): nothing to advance.
pub struct NoAck;

impl Ack for NoAck {
    fn ack(self: Box<Self>, _unfinished: &[usize]) {}
}

/// A stream of records, consumed in batches.
#[async_trait]
pub trait Source: Send {
    /// Up to `max` records with their [`Ack`]; `None` once the input is exhausted. The ack
    /// may be used later, from another task, after further batches were taken, and batches
    /// may be acknowledged in any order.
    async fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, SourceError>;

    /// The run is over: make the last commit durable.
    async fn close(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// Called while the pipeline has no room for another batch, and dropped when it has:
    /// a source that must be polled to keep its place (a Kafka consumer in its group) does
    /// so, without handing out records.
    async fn keep_alive(&mut self) -> std::convert::Infallible {
        std::future::pending().await
    }
}
