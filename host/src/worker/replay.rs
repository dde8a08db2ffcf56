//! `weir dlq replay` of a file: the dead letters fed through a (fixed) plugin again, past
//! their done marks, with the records that fail again (or are at the replay cap) written to
//! a new dead-letter file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError};

use anyhow::Context;

use super::plan::{Plan, Store};
use crate::config::{Config, LineFormat};
use crate::metrics::{DeadLettersReplayed, Metrics, Summary};
use crate::pipeline::{Backoff, Pipeline, Settings};
use crate::runtime::{ActivePlugin, Plugin, Runtime};
use crate::sink::{DeadLetterSink, FileDeadLetters, FileSink, Lane};
use crate::source::DlqFileSource;
use crate::state::EmbeddedStore;

/// What to replay, and where to.
pub struct Replay {
    pub dlq: PathBuf,
    pub plugin: PathBuf,
    pub plugin_config: Vec<(String, String)>,
    /// Outputs, appended to (`-`: stdout).
    pub output: PathBuf,
    /// Where records that fail again, or are at the replay cap, go.
    pub new_dlq: PathBuf,
    /// The state directory whose done marks the replayed records get.
    pub state: Option<PathBuf>,
    /// A record replayed this often already is not fed again.
    pub max_replays: u32,
}

/// What a replay did.
pub struct ReplayReport {
    pub summary: Summary,
    /// Records not fed again: at the replay cap.
    pub at_cap: usize,
}

impl Replay {
    pub async fn run(self) -> anyhow::Result<ReplayReport> {
        let mut config = Config::default();
        config.plugin.path = Some(self.plugin.clone());
        config.source.path = Some(self.dlq.clone());
        config.sink.path = Some(self.output.clone());
        config.dlq.path = Some(self.new_dlq.clone());
        config.state.path = self.state.unwrap_or(config.state.path);
        let plan = Plan::new(config)?;
        let runtime = Runtime::new(&plan.limits)?;
        let name = &plan.plugin.name;
        let plugin = Plugin::load_file(&runtime, &self.plugin, name, 1, self.plugin_config)
            .with_context(|| format!("plugin {}", self.plugin.display()))?;
        let source = DlqFileSource::open(&self.dlq, self.max_replays)?;
        let refused = source.refused();
        let metrics = Arc::new(Metrics::new());
        let Store::Embedded { cache_bytes } = plan.state.store else {
            anyhow::bail!("a replay keeps its done marks in the embedded store, not Redis");
        };
        let mut dlq = FileDeadLetters::open(&self.new_dlq)?;
        let pipeline = Pipeline {
            plugin: Arc::new(ActivePlugin::new(plugin)),
            source: Box::new(source),
            sink: Box::new(FileSink::open(
                &self.output,
                &BTreeMap::new(),
                LineFormat::Value,
            )?),
            dlq: Box::new(FileDeadLetters::open(&self.new_dlq)?),
            state: Arc::new(
                EmbeddedStore::open(&plan.state.dir, name, None, cache_bytes)?
                    .keep_keyed_state(name),
            ),
            metrics: metrics.clone(),
            settings: Settings {
                batch_size: plan.lifecycle.batch_size,
                id: None,
                backoff: Backoff::new(plan.retry.clone()),
                bypass_done: true,
                progress: None,
                lease_renewal: None,
                max_in_flight_batches: plan.lifecycle.max_in_flight_batches,
                park_retryable: false,
                crash_guard: None,
                traces: None,
            },
        };
        let summary = pipeline.run(std::future::pending()).await?;
        metrics.emit(DeadLettersReplayed {
            count: summary.records_in,
        });
        let refused = std::mem::take(&mut *refused.lock().unwrap_or_else(PoisonError::into_inner));
        let at_cap = refused.len();
        dlq.send(refused, Lane::default()).await?;
        dlq.flush().await?;
        Ok(ReplayReport { summary, at_cap })
    }
}
