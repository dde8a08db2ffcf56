//! Plugin versions while a worker runs: hot swap, canary and quarantine. The HTTP routes
//! (`crate::api`) and the registry's change notifications both go through [`Control`].
//!
//! - `follow.rs`: the running plugin made to match the registry (active version, canary) on
//!   every change, whichever worker of the cluster made it;
//! - `watch.rs`: a canary judged until it is rolled back or promoted, and the active version
//!   judged against the quarantine threshold;
//! - `canary.rs`: the judgements themselves, pure functions of per-version counts.

mod canary;
mod follow;
mod watch;

use std::sync::Arc;

pub use self::canary::{Judgement, judge, quarantine};
pub use self::follow::follow;
pub use self::watch::watch_active;
use crate::config::{CanaryConfig, QuarantineConfig};
use crate::metrics::Metrics;
use crate::registry::{Registry, RegistryError};
use crate::runtime::{ActivePlugin, LoadError, Plugin, Runtime};
use crate::state::RedisTarget;
use crate::tasks::Tasks;

/// The registry, and the plugin this worker runs when it runs one.
pub struct Control {
    pub registry: Registry,
    pub runtime: Arc<Runtime>,
    /// The plugin the worker runs; `None`: activations change the registry only.
    pub running: Option<Running>,
    /// The Redis of a cluster-mode worker, where every worker's heartbeat is.
    pub redis: Option<RedisTarget>,
    /// When a canary is rolled back or promoted.
    pub canary: CanaryConfig,
    /// When the active version is quarantined.
    pub quarantine: QuarantineConfig,
    /// Where the canary watchers run: the worker's tasks, stopped with it.
    pub tasks: Tasks,
}

/// The plugin this worker runs: activating or rolling back a version of its name loads that
/// version with the worker's plugin configuration and swaps it in.
pub struct Running {
    pub name: String,
    /// When the worker started (for the rates of `/v1/status`).
    pub started: std::time::Instant,
    pub active: Arc<ActivePlugin>,
    pub config: Vec<(String, String)>,
    pub metrics: Arc<Metrics>,
    /// The registry's active version and activation count last swapped in.
    pub applied: tokio::sync::Mutex<(u64, u64)>,
    /// The version swapped out last, kept loaded for a rollback (`follow.rs`).
    pub reserve: std::sync::Mutex<Option<Arc<Plugin>>>,
    /// Why the worker cannot keep a stateful version's keyed state, if it cannot (such
    /// versions are refused).
    pub keyed_state_refusal: Option<&'static str>,
}

/// Why a stateful plugin cannot run on a worker that cannot keep its state (`why`).
pub fn no_keyed_state(why: &str) -> String {
    format!(
        "keeps keyed state (it imports weir:transform/state), which this worker cannot keep: {why} (docs/state.md)"
    )
}

/// Why a version could not be made to run.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("`{0}` is not the plugin this worker runs")]
    NotRunning(String),
    /// Its `init` refused, or it does not fit this worker's limits.
    #[error("version {version} cannot run here")]
    CannotRun { version: u64, source: LoadError },
    #[error("loading version {version} failed")]
    Loading {
        version: u64,
        source: tokio::task::JoinError,
    },
}
