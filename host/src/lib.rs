//! Weir runs sandboxed WebAssembly transform plugins over streams of records and owns
//! everything around them: consumption, deduplication, retries, dead letters, metrics.
//!
//! Map of the crate, from the bottom up (a module uses only those on its line or above it,
//! `tests/tests/all/architecture.rs` checks it):
//! - [`record`]: records and outputs as the WIT contract has them, keyed-state writes, dead
//!   letters, error classes, ids, every `weir.*` header name; [`clock`]: the wall clock of
//!   timestamps; [`errors`]: how an error and its causes are shown; [`tasks`]: background
//!   tasks stopped together.
//! - [`config`]: the one configuration tree as written, with the `${env:…}`/`${file:…}`
//!   references to secrets in it and how it is shown with secrets hidden.
//! - [`sink`], [`source`], [`state`]: the seams to the outside, with the file connectors
//!   and the state stores (redb embedded, Redis in cluster mode; done marks, leases and
//!   plugins' keyed state).
//! - [`runtime`]: wasmtime engine, plugin loading, limits, per-record fault isolation, the
//!   keyed state a stateful plugin reads and writes in a call.
//! - [`metrics`]: every metric, counted through typed events, and the run summary read
//!   from them; [`traces`]: OpenTelemetry spans of batches and records, and the W3C trace
//!   context in records' headers.
//! - [`kafka`]: everything Kafka: the clients a pipeline's plan asks for, consumer,
//!   producer, offsets, exactly-once transactions, the dead-letter topic.
//! - [`pipeline`]: the record lifecycle (ids, dedup, retries, dead letters, commit).
//! - [`registry`]: uploaded plugin versions (content-addressed) and the audit log;
//!   [`cluster`]: worker heartbeats in Redis.
//! - [`control`]: hot swap, canary and quarantine while a worker runs.
//! - [`api`]: the HTTP server (`/metrics`, `/healthz`, `/readyz`, the `/v1` plugin API).
//! - [`worker`]: the configuration checked into a typed plan, and a worker built from it
//!   and run until shutdown.
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
pub mod sink;
pub mod source;
pub mod state;
pub mod tasks;
pub mod traces;
pub mod worker;
