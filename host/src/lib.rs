//! Weir runs sandboxed WebAssembly transform plugins over streams of records and owns
//! everything around them: consumption, deduplication, retries, dead letters, metrics.
//!
//! Map of the crate, from the bottom up (a module uses only those above it in this list,
//! `tests/tests/all/architecture.rs` checks it):
//! - [`record`]: records and outputs as the WIT contract has them, dead letters, error
//!   classes, ids, every `weir.*` header name; [`clock`]: the wall clock of timestamps;
//!   [`errors`]: how an error and its causes are shown.
//! - [`config`]: the one configuration tree and its validation; [`secrets`]: the
//!   `${env:…}`/`${file:…}` references in it, and hiding secrets when it is shown.
//! - [`metrics`]: every metric, and the run summary read from them.
//! - [`runtime`]: wasmtime engine, plugin loading, limits, per-record fault isolation.
//! - [`source`], [`sink`], [`state`]: the seams to the outside, with the file connectors
//!   and the state stores (redb embedded, Redis in cluster mode).
//! - [`kafka`]: everything Kafka: consumer, producer, offsets, exactly-once transactions,
//!   the dead-letter topic.
//! - [`pipeline`]: the record lifecycle (ids, dedup, retries, dead letters, commit).
//! - [`registry`]: uploaded plugin versions (content-addressed) and the audit log;
//!   [`cluster`]: worker heartbeats in Redis.
//! - [`control`]: hot swap, canary and quarantine while a worker runs.
//! - [`api`]: the HTTP server (`/metrics`, `/healthz`, `/readyz`, the `/v1` plugin API).
//! - [`worker`]: a worker built from the configuration and run until shutdown; [`tasks`]:
//!   the background tasks it stops together.
//! - [`cli`]: the `weir` command line, one file per command.

pub mod api;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod control;
pub mod errors;
pub mod kafka;
pub mod metrics;
pub mod pipeline;
pub mod record;
pub mod registry;
pub mod runtime;
pub mod secrets;
pub mod sink;
pub mod source;
pub mod state;
pub mod tasks;
pub mod worker;
