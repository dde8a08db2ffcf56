//! Weir's integration tests: one test binary (linking wasmtime and rdkafka once), a module per
//! area. Each module's doc says what it covers; `weir_tests` (tests/src) starts the real
//! Apache Kafka and Redis they run against.

/// The `weir` CLI built fresh for these tests.
const WEIR: &str = env!("CARGO_BIN_EXE_weir-under-test");

mod architecture;
mod cli_errors;
mod cluster;
mod deploy;
mod exactly_once;
mod faults;
mod guides;
mod hot_swap;
mod keyed_cluster;
mod keyed_state;
mod lifecycle;
mod memory;
mod observability;
mod pipeline;
mod plugin_api;
mod plugin_test;
mod reconcile;
mod redis_state;
mod security;
mod traces;
mod vectors;
