//! `weir dlq replay` of a file: the dead letters fed through a (fixed) plugin again, past
//! their done marks, with the records that fail again (or are at the replay cap) written to
//! a new dead-letter file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError};

use anyhow::Context;

use crate::config::{Config, LineFormat, plugin_name_of};
use crate::metrics::{Metrics, Summary};
use crate::pipeline::{Backoff, Pipeline, Settings};
use crate::runtime::{ActivePlugin, Plugin, Runtime};
use crate::sink::{DeadLetterSink, FileDeadLetters, FileSink};
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
        let config = Config::default();
        let runtime = Runtime::new(&config.limits)?;
        let name = plugin_name_of(&self.plugin);
        let plugin = Plugin::load_file(&runtime, &self.plugin, &name, 1, self.plugin_config)
            .with_context(|| format!("plugin {}", self.plugin.display()))?;
        let source = DlqFileSource::open(&self.dlq, self.max_replays)?;
        let refused = source.refused();
        let metrics = Arc::new(Metrics::new());
        let state_dir = self.state.unwrap_or(config.state.path.clone());
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
            state: Arc::new(EmbeddedStore::open(
                &state_dir,
                &name,
                None,
                config.state.cache_bytes(),
            )?),
            metrics: metrics.clone(),
            settings: Settings {
                batch_size: config.pipeline.batch_size,
                id: None,
                backoff: Backoff::new(config.retry.clone()),
                bypass_done: true,
                progress: None,
                lease_renewal: None,
                max_in_flight_batches: config.max_in_flight_batches(),
                park_retryable: false,
                crash_guard: None,
            },
        };
        let summary = pipeline.run(std::future::pending()).await?;
        metrics.dlq_replayed.inc_by(summary.records_in);
        let refused = std::mem::take(&mut *refused.lock().unwrap_or_else(PoisonError::into_inner));
        let at_cap = refused.len();
        dlq.send(refused).await?;
        dlq.flush().await?;
        Ok(ReplayReport { summary, at_cap })
    }
}
