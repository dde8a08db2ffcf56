//! The restart policy of the Kafka clients (exactly-once mode).

use std::time::{Duration, Instant};

use rdkafka::types::RDKafkaErrorCode;

use crate::errors::chain;
use crate::kafka::KafkaProducer;
use crate::metrics::{Metrics, Summary, TransactionEnded, TransactionResult};
use crate::pipeline::PipelineError;

/// In-process restarts of the Kafka clients after the transactional producer was fenced or
/// failed (exactly-once mode): a fenced worker gives up the partitions it had, and joins
/// the group again with a new producer. Its transactional id is `<id>.<restart>`, so it does
/// not fence in turn the worker that fenced it (a worker started again with this slot's
/// id, which now has the partitions). More than [`Restarts::MAX`] within
/// [`Restarts::WINDOW`] stop the worker: something is wrong beyond one fencing.
#[derive(Default)]
pub(super) struct Restarts {
    total: u32,
    recent: Vec<Instant>,
}

impl Restarts {
    const MAX: usize = 5;
    const WINDOW: Duration = Duration::from_secs(600);

    /// After a run of the pipelines ended: the number of the restart to make when it ended
    /// because a transactional producer cannot go on, and there were not too many lately.
    pub(super) fn after(
        &mut self,
        summary: &Result<Summary, PipelineError>,
        transactional: &[KafkaProducer],
        metrics: &Metrics,
    ) -> Option<u32> {
        let fatal = transactional.iter().find_map(KafkaProducer::fatal_error);
        let (Err(error), Some((code, reason))) = (summary, fatal) else {
            return None;
        };
        if code == RDKafkaErrorCode::Fenced {
            metrics.emit(TransactionEnded(TransactionResult::Fenced));
        }
        let restart = self.next()?;
        eprintln!(
            "weir: the transactional producer cannot go on ({reason}), so the batches in flight \
             were not committed ({}); starting the Kafka clients again (restart {restart}), \
             which read on from the committed offsets",
            chain(error)
        );
        Some(restart)
    }

    /// The number of the next restart, or `None` when there were too many lately.
    fn next(&mut self) -> Option<u32> {
        self.recent.retain(|at| at.elapsed() < Self::WINDOW);
        if self.recent.len() >= Self::MAX {
            eprintln!(
                "weir: {} restarts of the Kafka clients in {} s; stopping",
                self.recent.len(),
                Self::WINDOW.as_secs()
            );
            return None;
        }
        self.recent.push(Instant::now());
        self.total += 1;
        Some(self.total)
    }
}
