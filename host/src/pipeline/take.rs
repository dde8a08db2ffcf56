//! The take stage: reads batches from the source and gives each record its id.

use std::future::Future;

use tokio::sync::mpsc;

use super::{PipelineError, Shared};
use crate::metrics::RecordsTaken;
use crate::record::record_id;
use crate::source::{Ack, Batch, Incoming, Source};
use crate::traces::BatchTrace;

/// A batch as read: its records, their ids, the token that acknowledges them, and its
/// trace begun.
pub(super) struct Taken {
    pub batch: Vec<Incoming>,
    pub ids: Vec<String>,
    pub ack: Box<dyn Ack>,
    pub trace: Option<BatchTrace>,
}

impl Shared {
    /// Reads batches and computes their ids until the source is exhausted, `shutdown`
    /// completes or the next stage stops. Returns the source, to be closed once the batches
    /// taken are complete.
    pub(super) async fn take_stage(
        &self,
        mut source: Box<dyn Source>,
        out: mpsc::Sender<Taken>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Box<dyn Source>, PipelineError> {
        tokio::pin!(shutdown);
        loop {
            let batch = tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = out.closed() => break,
                () = self.failed.notified() => break,
                batch = source.next_batch(self.settings.batch_size) => batch?,
            };
            let Some(Batch {
                records: batch,
                ack,
            }) = batch
            else {
                break;
            };
            (self.metrics).emit(RecordsTaken {
                count: batch.len() as u64,
            });
            let ids = batch
                .iter()
                .map(|inc| {
                    inc.known_id
                        .clone()
                        .unwrap_or_else(|| record_id(self.settings.id.as_ref(), &inc.record))
                })
                .collect::<Vec<_>>();
            let trace = (self.settings.traces.as_ref())
                .map(|traces| traces.batch(batch.iter().map(|inc| &inc.record), &ids));
            // Waiting for room (a dependency may be away), the source keeps its place.
            let room = tokio::select! {
                room = out.reserve() => room,
                never = source.keep_alive() => match never {},
            };
            let Ok(room) = room else { break };
            room.send(Taken {
                batch,
                ids,
                ack,
                trace,
            });
        }
        Ok(source)
    }
}
