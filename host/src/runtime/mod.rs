//! The WebAssembly side of Weir.
//!
//! - [`Runtime`]: one `wasmtime::Engine` per process (Cranelift, pooling allocator, epoch
//!   interruption) with an epoch ticker thread, and the `Linker` holding WASI (with nothing
//!   behind it) and the host's `log` import.
//! - [`Plugin`] (`plugin.rs`): a validated component compiled once into an `InstancePre`, a
//!   small pool of warm instances, and [`Plugin::transform`], which gives every record
//!   exactly one [`Outcome`] — isolating the culprit when a batch call traps.
//! - `bindings.rs`: the one `bindgen!` site; `limits.rs`: the memory cap; `stdio.rs`: the
//!   bounded buffer that keeps the tail of guest stderr; `log_lines.rs`: plugin log lines
//!   kept for the trace of their call.

mod active;
mod bindings;
mod keyed;
mod limits;
mod log_lines;
mod plugin;
mod stdio;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub use active::{ActivePlugin, Canary, Routing};
pub use bindings::{Level, WIT_VERSION};
pub use log_lines::{LogLine, LogLines, keeping_log_lines};
pub use plugin::{CallContext, Failure, Inspection, LoadError, Outcome, Plugin, PluginMeta, World};

use crate::config::LimitsConfig;

/// Set (to anything) to write `/tmp/perf-<pid>.map`, so `perf report` names the functions
/// of plugins' compiled code.
pub const PERFMAP_ENV: &str = "WEIR_WASM_PERFMAP";

/// How often the epoch ticks; deadlines are rounded up to whole ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The process-wide engine, linker and epoch ticker.
pub struct Runtime {
    engine: Engine,
    linker: Linker<StoreState>,
    limits: Arc<LimitsConfig>,
    /// Held by every plugin loaded here too: deadlines need it while any plugin lives.
    ticker: Arc<EpochTicker>,
    compile_cache: Option<PathBuf>,
}

impl Runtime {
    /// Builds the engine with limits from `limits` (deadline, memory cap, optional fuel).
    pub fn new(limits: &LimitsConfig) -> anyhow::Result<Self> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.consume_fuel(limits.fuel.is_some());
        if std::env::var_os(PERFMAP_ENV).is_some() {
            // Names plugin functions for `perf` (wasm[0]::function[N]::<name>).
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }

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
        bindings::weir::transform::state::add_to_linker::<StoreState, HasSelf<StoreState>>(
            &mut linker,
            |state| state,
        )?;

        let ticker = Arc::new(EpochTicker::start(&engine)?);
        Ok(Self {
            engine,
            linker,
            limits: Arc::new(limits.clone()),
            ticker,
            compile_cache: default_compile_cache(),
        })
    }

    /// Keeps compiled components in `dir` (`None`: compile every time).
    pub fn with_compile_cache(mut self, dir: Option<PathBuf>) -> Self {
        self.compile_cache = dir;
        self
    }

    /// Compiles component bytes, or loads the artefact compiled earlier for the same bytes
    /// (`digest`) and the same engine settings.
    fn compile(&self, bytes: &[u8], digest: &str) -> wasmtime::Result<Component> {
        let Some(dir) = &self.compile_cache else {
            return Component::new(&self.engine, bytes);
        };
        let mut engine_hash = DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut engine_hash);
        let path = dir.join(format!("{digest}-{:016x}.cwasm", engine_hash.finish()));
        if path.is_file() {
            // SAFETY: the file was written by `Component::serialize` below, by an engine with
            // the same compatibility hash, into this user's cache directory; wasmtime checks
            // its header and engine settings again when loading it.
            #[allow(unsafe_code)]
            match unsafe { Component::deserialize_file(&self.engine, &path) } {
                Ok(component) => return Ok(component),
                Err(e) => tracing::warn!("ignoring cached artefact {}: {e:#}", path.display()),
            }
        }
        let component = Component::new(&self.engine, bytes)?;
        if let Err(e) = store_artefact(&path, &component) {
            tracing::warn!(
                "cannot cache the compiled plugin in {}: {e:#}",
                path.display()
            );
        }
        Ok(component)
    }

    pub fn limits(&self) -> &LimitsConfig {
        &self.limits
    }
}

/// `$WEIR_COMPILE_CACHE` (`off` disables it), else `$XDG_CACHE_HOME/weir/compiled`, else
/// `~/.cache/weir/compiled`.
fn default_compile_cache() -> Option<PathBuf> {
    match std::env::var_os("WEIR_COMPILE_CACHE") {
        Some(dir) if dir == "off" => None,
        Some(dir) => Some(dir.into()),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
            .map(|base| base.join("weir/compiled")),
    }
}

/// Writes atomically (temp file + rename), so a concurrent reader never sees half a file.
fn store_artefact(path: &Path, component: &Component) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, component.serialize()?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The thread that advances the engine's epoch every [`EPOCH_TICK`], which is what ends a
/// plugin call at its deadline. It stops when the runtime and every plugin loaded by it are
/// gone (a plugin may outlive the runtime that loaded it).
pub(crate) struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: &Engine) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let engine = engine.clone();
            let stop = stop.clone();
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
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What each plugin instance's `Store` holds.
pub struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    memory_cap: limits::MemoryCap,
    meta: Arc<PluginMeta>,
    /// The keyed state a stateful plugin's current call reads and writes.
    keyed: keyed::Session,
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The `types` interface has no functions.
impl bindings::types::Host for StoreState {}

impl bindings::weir::transform::host::Host for StoreState {
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let (plugin, version) = (self.meta.name.as_str(), self.meta.version);
        log_lines::keep(level, &message);
        match level {
            Level::Trace => tracing::trace!(plugin, version, "{message}"),
            Level::Debug => tracing::debug!(plugin, version, "{message}"),
            Level::Info => tracing::info!(plugin, version, "{message}"),
            Level::Warn => tracing::warn!(plugin, version, "{message}"),
            Level::Error => tracing::error!(plugin, version, "{message}"),
        }
        Ok(())
    }
}
