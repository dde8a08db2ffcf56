//! Weir runs sandboxed WebAssembly transform plugins over streams of records and owns
//! everything around them: consumption, deduplication, retries, dead letters, metrics.
//!
//! Map of the crate:
//! - [`config`]: the one configuration tree and its validation; [`secrets`]: the
//!   `${env:…}`/`${file:…}` references in it, and hiding secrets when it is shown.
//! - [`runtime`]: wasmtime engine, plugin loading, limits, per-record fault isolation.
//! - [`pipeline`]: the record lifecycle (ids, dedup, retries, dead letters, commit).
//! - [`source`], [`sink`], [`state`]: the seams to the outside (files and redb embedded;
//!   Kafka topics and Redis in cluster mode, with [`kafka`] holding the shared client set-up).
//! - [`metrics`]: every metric, and the run summary read from them.
//! - [`cluster`]: worker heartbeats in Redis and `weir cluster status`.
//! - [`dlq_topic`]: `weir dlq list|replay` for a DLQ topic.
//! - [`registry`]: uploaded plugin versions (content-addressed) and the audit log.
//! - [`canary`]: judging a canary version against the stable one.
//! - [`api`]: the HTTP server (`/metrics`, `/healthz`, `/readyz`, the `/v1` plugin API).
//! - [`plugin_test`]: `weir test`, trying a plugin on a sample file.
//! - [`plugin_client`]: `weir plugin push|list|activate|rollback`, through the API.
//! - [`cli`]: the `weir` command line.

pub mod api;
pub mod canary;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod dlq_topic;
pub mod kafka;
pub mod metrics;
pub mod pipeline;
pub mod plugin_client;
pub mod plugin_test;
pub mod record;
pub mod registry;
pub mod runtime;
pub mod secrets;
pub mod sink;
pub mod source;
pub mod state;
