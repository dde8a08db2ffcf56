//! Done marks and leases. [`StateStore`] is the seam: `embedded.rs` (a redb database in a
//! local directory) is the default; `redis.rs` is the shared store of cluster mode.
//!
//! Each batch costs at most two calls: [`StateStore::claim`] before the plugin runs and
//! [`StateStore::finish`] once the batch's fates are durable.

mod embedded;
mod redis;

pub use self::redis::{
    DEFAULT_CLUSTER_BUCKETS, RedisConnection, RedisStore, RedisTarget, is_transient,
};
pub use embedded::EmbeddedStore;

use async_trait::async_trait;

/// What [`StateStore::claim`] found for one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Already processed or dead-lettered: skip it (fate `deduplicated`).
    Done,
    /// Ours to process; `fence` is the fencing token to write with its outputs. `crashes`:
    /// how many times a worker died with the record in flight (stores that count them).
    Leased { fence: u64, crashes: u32 },
    /// Another live worker holds the lease: park the record and ask again later.
    HeldElsewhere,
}

/// A state store failure (the run stops rather than lose track of a record): what failed,
/// and the error that caused it, if another one did, as its source.
#[derive(Debug, thiserror::Error)]
#[error("state store: {what}")]
pub struct StateError {
    what: String,
    #[source]
    cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl StateError {
    /// `what` went wrong, with no further cause.
    pub fn new(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            cause: None,
        }
    }

    /// `what` failed because of `cause`.
    pub fn caused_by(
        what: impl Into<String>,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            what: what.into(),
            cause: Some(cause.into()),
        }
    }
}

/// Leases and done marks, keyed by record id.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// For each id: done already, leased to us now, or held by another worker.
    async fn claim(&self, ids: &[String]) -> Result<Vec<Claim>, StateError>;

    /// Marks ids done and releases their leases. Returns, per id, whether the lease with
    /// that fence was still ours (a stale worker learns it lost the record).
    async fn finish(&self, done: &[(String, u64)]) -> Result<Vec<bool>, StateError>;

    /// Extends leases while a slow batch runs; says per id whether the lease was still ours.
    /// A store without expiring leases has nothing to do.
    async fn renew(&self, leases: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        Ok(vec![true; leases.len()])
    }

    /// Gives leases up without marking the records done, so they may be claimed again at
    /// once; says per id whether the lease was still ours.
    async fn release(&self, leases: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        Ok(vec![true; leases.len()])
    }
}

/// Where the records in the plugin are noted, and their crashes counted (crash-loop
/// protection, `pipeline/crash.rs`).
#[async_trait]
pub trait CrashLog: Send + Sync {
    /// Per id, how many times a worker died while it was in the plugin.
    async fn crashes(&self, ids: &[&str]) -> Result<Vec<u32>, StateError>;

    /// Notes that these records are about to enter the plugin (a note that outlives a
    /// `kill -9` of the process).
    async fn enter(&self, ids: &[&str]) -> Result<(), StateError>;

    /// Notes that these records left the plugin alive: their note and crashes are cleared.
    async fn leave(&self, ids: &[&str]) -> Result<(), StateError>;
}
