//! The WebAssembly side of Weir.
//!
//! - [`Runtime`]: one `wasmtime::Engine` per process (Cranelift, pooling allocator, epoch
//!   interruption) with an epoch ticker thread, and the `Linker` holding WASI (with nothing
//!   behind it) and the host's `log` import.
//! - [`Plugin`] (`plugin.rs`): a validated component compiled once into an `InstancePre`, a
//!   small pool of warm instances, and [`Plugin::transform`], which gives every record
//!   exactly one [`Outcome`] — isolating the culprit when a batch call traps.
//! - `bindings.rs`: the one `bindgen!` site; `limits.rs`: the memory cap; `stdio.rs`: the
//!   bounded buffer that keeps the tail of guest stderr.

mod bindings;
mod limits;
mod plugin;
mod stdio;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub use bindings::{Level, Output, Record, SourceMeta, TransformError, WIT_VERSION};
pub use plugin::{Failure, LoadError, Outcome, Plugin, PluginMeta, World};

use crate::config::LimitsConfig;

/// How often the epoch ticks; deadlines are rounded up to whole ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The process-wide engine, linker and epoch ticker.
pub struct Runtime {
    engine: Engine,
    linker: Linker<StoreState>,
    limits: Arc<LimitsConfig>,
    ticker: Option<JoinHandle<()>>,
    stop_ticker: Arc<AtomicBool>,
}

impl Runtime {
    /// Builds the engine with limits from `limits` (deadline, memory cap, optional fuel).
    pub fn new(limits: &LimitsConfig) -> anyhow::Result<Self> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.consume_fuel(limits.fuel.is_some());

        let instances = limits.max_instances;
        let mut pool = PoolingAllocationConfig::default();
        // Components from componentize-py or componentize-js hold many core instances,
        // memories and tables; leave them room.
        pool.total_component_instances(instances)
            .total_core_instances(instances * 32)
            .total_memories(instances * 8)
            .total_tables(instances * 16)
            .max_memories_per_component(8)
            .max_tables_per_component(16)
            .max_core_instances_per_component(64)
            .max_component_instance_size(1 << 20)
            .max_core_instance_size(4 << 20)
            .table_elements(100_000)
            .max_memory_size(limits.memory_bytes());
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        bindings::weir::transform::host::add_to_linker::<StoreState, HasSelf<StoreState>>(
            &mut linker,
            |state| state,
        )?;

        let stop_ticker = Arc::new(AtomicBool::new(false));
        let ticker = {
            let engine = engine.clone();
            let stop = stop_ticker.clone();
            std::thread::Builder::new()
                .name("weir-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })?
        };
        Ok(Self {
            engine,
            linker,
            limits: Arc::new(limits.clone()),
            ticker: Some(ticker),
            stop_ticker,
        })
    }

    pub fn limits(&self) -> &LimitsConfig {
        &self.limits
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
        if let Some(ticker) = self.ticker.take() {
            let _ = ticker.join();
        }
    }
}

/// What each plugin instance's `Store` holds.
pub struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    memory_cap: limits::MemoryCap,
    meta: Arc<PluginMeta>,
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::weir::transform::host::Host for StoreState {
    fn log(&mut self, level: Level, message: String) {
        let (plugin, version) = (self.meta.name.as_str(), self.meta.version);
        match level {
            Level::Trace => tracing::trace!(plugin, version, "{message}"),
            Level::Debug => tracing::debug!(plugin, version, "{message}"),
            Level::Info => tracing::info!(plugin, version, "{message}"),
            Level::Warn => tracing::warn!(plugin, version, "{message}"),
            Level::Error => tracing::error!(plugin, version, "{message}"),
        }
    }
}
