//! A plugin version: validated, compiled once into an `InstancePre`, run on warm instances.
//!
//! [`Plugin::transform`] gives every record exactly one [`Outcome`]. When a call traps, runs
//! past its deadline or exceeds its memory cap, the instance is thrown away (a trapped
//! instance is never re-entered) and the batch is re-run one record at a time, so only the
//! culprits fail and healthy neighbours still succeed.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest, Sha256};
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{
    Component, ComponentExportIndex, Func, InstancePre, ResourceTable, TypedFunc,
};
use wasmtime::{Store, Trap, WasmBacktrace};
use wasmtime_wasi::WasiCtxBuilder;

use super::bindings::{
    BATCH_EXPORT, HOST_IMPORT, RECORD_EXPORT, STATE_IMPORT, TYPES_IMPORT, WIT_VERSION,
};
use super::keyed::Session;
use super::stdio::TailBuffer;
use super::{EPOCH_TICK, EpochTicker, Runtime, StoreState, limits::MemoryCap};
use crate::config::LimitsConfig;
use crate::record::ErrorClass;
use crate::record::{Output, Record, TransformError};
use crate::sink::OutputCheck;
use crate::state::StateError;
use crate::state::keyed::{KeyedRead, KeyedWrite, NoState};

/// Largest backtrace kept with a failure (`weir.error.backtrace` ≤ 8 KiB).
const MAX_BACKTRACE_BYTES: usize = 8 * 1024;

type BatchResults = Vec<Result<Vec<Output>, TransformError>>;
type RecordResult = Result<Vec<Output>, TransformError>;

/// Which world a component implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum World {
    Batch,
    PerRecord,
}

/// Identity of a loaded plugin version.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginMeta {
    pub name: String,
    pub version: u64,
    /// `sha256:<hex>` of the component bytes.
    pub digest: String,
    pub world: World,
    /// Whether it keeps keyed state (imports the WIT `state` interface).
    pub stateful: bool,
    pub size_bytes: usize,
}

/// What a transform needs besides its records.
#[derive(Clone, Default)]
pub struct CallContext {
    /// What the sink takes: an output it refuses makes its record `bad_output`.
    pub check: Option<Arc<dyn OutputCheck>>,
    /// The keyed state a stateful plugin reads (none: it starts from nothing).
    pub state: Option<Arc<dyn KeyedRead>>,
    /// Counts a stateful plugin's reads (`get` calls).
    pub reads: Arc<std::sync::atomic::AtomicU64>,
}

/// Why a component cannot be used as a plugin.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("is not a WebAssembly file (it does not start with the `\\0asm` magic bytes)")]
    NotWasm,
    #[error(
        "is a core WebAssembly module, not a component: build it for the wasm32-wasip2 target, \
         or wrap it with `wasm-tools component new`"
    )]
    CoreModule,
    #[error("does not compile: {0}")]
    Compile(String),
    #[error("{0}")]
    Contract(String),
    #[error(
        "imports {0}, which this host does not provide (it provides WASI, {HOST_IMPORT} and {STATE_IMPORT})"
    )]
    ForbiddenImport(String),
    #[error("init refused the configuration: {0}")]
    Init(String),
    #[error("cannot be instantiated: {0}")]
    Instantiate(String),
    #[error("keyed state: {0}")]
    State(#[from] StateError),
}

/// The fate a plugin call gave one record.
#[derive(Debug)]
pub enum Outcome {
    /// Success: zero, one or many outputs, and (stateful plugins) the record's state writes.
    Outputs {
        outputs: Vec<Output>,
        writes: Vec<KeyedWrite>,
    },
    /// The plugin asked for a retry.
    Retryable(String),
    /// Dead-letter this record.
    Failed(Failure),
}

/// A classified failure of one record.
#[derive(Debug, Clone)]
pub struct Failure {
    pub class: ErrorClass,
    pub message: String,
    pub backtrace: Option<String>,
}

impl Failure {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
            backtrace: None,
        }
    }
}

/// The entry points found in the component, looked up once at load.
#[derive(Clone, Copy)]
struct Entry {
    world: World,
    stateful: bool,
    init: ComponentExportIndex,
    call: ComponentExportIndex,
}

/// A live instance with its own store, ready for calls.
struct Warm {
    store: Store<StoreState>,
    call: Func,
    stdio: TailBuffer,
    calls: u64,
}

/// A compiled, validated plugin version.
pub struct Plugin {
    meta: Arc<PluginMeta>,
    entry: Entry,
    pre: InstancePre<StoreState>,
    config: Vec<(String, String)>,
    limits: Arc<LimitsConfig>,
    idle: Mutex<Vec<Warm>>,
    /// How many instances `idle` keeps (fewer while the version is in reserve).
    most_idle: AtomicUsize,
    /// Largest linear memory of any instance since the last `take_peak_memory`.
    peak_memory: AtomicUsize,
    /// Keeps deadlines working for as long as this plugin lives.
    _ticker: Arc<EpochTicker>,
}

impl Plugin {
    /// Reads, validates, compiles and instantiates (running `init`) a component file.
    pub fn load_file(
        runtime: &Runtime,
        path: &Path,
        name: &str,
        version: u64,
        config: Vec<(String, String)>,
    ) -> Result<Self, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::load(runtime, &bytes, name, version, config)
    }

    /// Validates, compiles and instantiates (running `init`) component bytes.
    pub fn load(
        runtime: &Runtime,
        bytes: &[u8],
        name: &str,
        version: u64,
        config: Vec<(String, String)>,
    ) -> Result<Self, LoadError> {
        let (inspection, entry, pre) = validate(runtime, bytes)?;
        let meta = Arc::new(PluginMeta {
            name: name.to_owned(),
            version,
            digest: inspection.digest,
            world: entry.world,
            stateful: entry.stateful,
            size_bytes: bytes.len(),
        });
        let plugin = Self {
            meta,
            entry,
            pre,
            config,
            limits: runtime.limits.clone(),
            idle: Mutex::new(Vec::new()),
            most_idle: AtomicUsize::new(runtime.limits.max_instances as usize),
            peak_memory: AtomicUsize::new(0),
            _ticker: runtime.ticker.clone(),
        };
        // Instantiate once now, so type mismatches and a refused config surface at load.
        let warm = plugin.instantiate()?;
        plugin.check_in(warm);
        Ok(plugin)
    }

    /// Validates and compiles component bytes without running them (the checks of an
    /// upload): a component, of a supported world and WIT version, importing only what the
    /// host provides, that links.
    pub fn inspect(runtime: &Runtime, bytes: &[u8]) -> Result<Inspection, LoadError> {
        validate(runtime, bytes).map(|(inspection, _, _)| inspection)
    }

    pub fn meta(&self) -> &PluginMeta {
        &self.meta
    }

    /// How long creating a fresh instance (instantiation and `init`) takes now.
    pub fn time_instantiation(&self) -> Result<std::time::Duration, LoadError> {
        let started = std::time::Instant::now();
        drop(self.instantiate()?);
        Ok(started.elapsed())
    }

    /// The largest linear memory (bytes) of an instance that ran a call since the last
    /// time this was asked.
    pub fn take_peak_memory(&self) -> usize {
        self.peak_memory.swap(0, Ordering::Relaxed)
    }

    /// Runs the plugin over `records`, returning exactly one outcome per record, in order.
    /// Errors only when no instance can be created at all (an infrastructure problem).
    /// A stateful plugin is called one record at a time (see `runtime/keyed.rs`); errors
    /// also when its state cannot be read.
    pub fn transform(
        &self,
        records: &[Record],
        ctx: &CallContext,
    ) -> Result<Vec<Outcome>, LoadError> {
        let mut outcomes = Vec::with_capacity(records.len());
        match self.entry.world {
            _ if self.entry.stateful => self.transform_stateful(records, ctx, &mut outcomes)?,
            World::Batch => self.transform_isolating(records, ctx, &mut outcomes)?,
            World::PerRecord => self.transform_one_by_one(records, ctx, &mut outcomes)?,
        }
        Ok(outcomes)
    }

    /// Stateful plugins: one call per record, each record's writes accepted only when it is
    /// processed; a fault costs only that record's instance.
    fn transform_stateful(
        &self,
        records: &[Record],
        ctx: &CallContext,
        out: &mut Vec<Outcome>,
    ) -> Result<(), LoadError> {
        let reader = ctx.state.clone().unwrap_or_else(|| Arc::new(NoState));
        let mut session = Session::default();
        session.begin(reader, &self.limits);
        let mut warm = None;
        for record in records {
            let mut instance = match warm.take() {
                Some(w) => w,
                None => self.check_out()?,
            };
            session.start_record(record.source.partition);
            instance.store.data_mut().keyed = std::mem::take(&mut session);
            let result = self.call_one(&mut instance, record);
            session = std::mem::take(&mut instance.store.data_mut().keyed);
            self.note_memory(&instance);
            if let Some(failed) = session.take_failure() {
                return Err(failed.into());
            }
            let outcome = match result {
                Ok(result) => {
                    warm = Some(instance);
                    self.judge(result, ctx)
                }
                Err(failure) => Outcome::Failed(failure),
            };
            out.push(match outcome {
                Outcome::Outputs { outputs, .. } => match session.finish_record(true) {
                    Ok(writes) => Outcome::Outputs { outputs, writes },
                    Err(reason) => Outcome::Failed(Failure::new(ErrorClass::BadOutput, reason)),
                },
                other => {
                    let _dropped = session.finish_record(false);
                    other
                }
            });
        }
        if let Some(w) = warm {
            self.check_in(w);
        }
        ctx.reads.fetch_add(session.reads(), Ordering::Relaxed);
        Ok(())
    }

    /// One record through either world's entry point.
    fn call_one(&self, warm: &mut Warm, record: &Record) -> Result<RecordResult, Failure> {
        match self.entry.world {
            World::PerRecord => warm
                .call::<(&Record,), (RecordResult,)>(&self.limits, (record,))
                .map(|(result,)| result),
            World::Batch => {
                let one = std::slice::from_ref(record);
                let (results,) =
                    warm.call::<(&[Record],), (BatchResults,)>(&self.limits, (one,))?;
                let n = results.len();
                match results.into_iter().next() {
                    Some(result) if n == 1 => Ok(result),
                    _ => Err(Failure::new(
                        ErrorClass::BadOutput,
                        format!(
                            "transform-batch returned {n} results for 1 record (it must return one per record)"
                        ),
                    )),
                }
            }
        }
    }

    /// Batch world: one call for the whole batch. When it faults (or returns the wrong
    /// number of results), the instance is dropped and each record is run alone, so only the
    /// culprits fail and a record that loops costs one more deadline, not one per halving.
    fn transform_isolating(
        &self,
        records: &[Record],
        ctx: &CallContext,
        out: &mut Vec<Outcome>,
    ) -> Result<(), LoadError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut warm = self.check_out()?;
        let result = warm.call::<(&[Record],), (BatchResults,)>(&self.limits, (records,));
        self.note_memory(&warm);
        match result {
            Ok((results,)) if results.len() == records.len() => {
                self.check_in(warm);
                out.extend(results.into_iter().map(|r| self.judge(r, ctx)));
                return Ok(());
            }
            Ok((results,)) if records.len() == 1 => {
                self.check_in(warm);
                out.push(Outcome::Failed(Failure::new(
                    ErrorClass::BadOutput,
                    format!(
                        "transform-batch returned {} results for 1 record (it must return one per record)",
                        results.len()
                    ),
                )));
                return Ok(());
            }
            Ok(_) => self.check_in(warm),
            Err(failure) if records.len() == 1 => {
                out.push(Outcome::Failed(failure));
                return Ok(());
            }
            Err(_) => {} // `warm` is dropped: a faulted instance is never re-entered
        }
        for record in records {
            self.transform_isolating(std::slice::from_ref(record), ctx, out)?;
        }
        Ok(())
    }

    /// Per-record world: one call per record; a fault costs only that record's instance.
    fn transform_one_by_one(
        &self,
        records: &[Record],
        ctx: &CallContext,
        out: &mut Vec<Outcome>,
    ) -> Result<(), LoadError> {
        let mut warm = None;
        for record in records {
            let mut instance = match warm.take() {
                Some(w) => w,
                None => self.check_out()?,
            };
            let result = instance.call::<(&Record,), (RecordResult,)>(&self.limits, (record,));
            self.note_memory(&instance);
            match result {
                Ok((result,)) => {
                    out.push(self.judge(result, ctx));
                    warm = Some(instance);
                }
                Err(failure) => out.push(Outcome::Failed(failure)),
            }
        }
        if let Some(w) = warm {
            self.check_in(w);
        }
        Ok(())
    }

    /// Turns one returned result into an outcome, enforcing the output limits and what the
    /// sink takes.
    fn judge(&self, result: Result<Vec<Output>, TransformError>, ctx: &CallContext) -> Outcome {
        match result {
            Ok(outputs) => {
                let limits = &self.limits;
                if outputs.len() > limits.max_outputs_per_record {
                    return Outcome::Failed(Failure::new(
                        ErrorClass::BadOutput,
                        format!(
                            "{} outputs for one record; the limit is {}",
                            outputs.len(),
                            limits.max_outputs_per_record
                        ),
                    ));
                }
                if let Some(big) = outputs
                    .iter()
                    .find(|o| o.value.len() > limits.max_output_bytes)
                {
                    return Outcome::Failed(Failure::new(
                        ErrorClass::BadOutput,
                        format!(
                            "an output value of {} bytes; the limit is {} bytes",
                            big.value.len(),
                            limits.max_output_bytes
                        ),
                    ));
                }
                let refused = (ctx.check.as_ref())
                    .and_then(|check| outputs.iter().find_map(|o| check.check(o).err()));
                if let Some(reason) = refused {
                    return Outcome::Failed(Failure::new(ErrorClass::BadOutput, reason));
                }
                Outcome::Outputs {
                    outputs,
                    writes: Vec::new(),
                }
            }
            Err(TransformError::Retryable(reason)) => Outcome::Retryable(reason),
            Err(TransformError::Invalid(reason)) => {
                Outcome::Failed(Failure::new(ErrorClass::Invalid, reason))
            }
        }
    }

    /// Puts this version in reserve (swapped out, kept for a rollback) or back in service.
    /// In reserve it keeps one instance warm, enough for the next batch, and none when the
    /// pool holds fewer than 4: the versions in service must have room, and an instance of
    /// a large plugin (Python, JavaScript) holds tens of MiB.
    pub fn set_in_reserve(&self, in_reserve: bool) {
        let pool = self.limits.max_instances as usize;
        let most = if in_reserve { (pool / 4).min(1) } else { pool };
        self.most_idle.store(most, Ordering::Relaxed);
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.truncate(most);
    }

    fn note_memory(&self, warm: &Warm) {
        let peak = warm.store.data().memory_cap.peak_bytes();
        self.peak_memory.fetch_max(peak, Ordering::Relaxed);
    }

    fn check_out(&self) -> Result<Warm, LoadError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match idle {
            Some(warm) => Ok(warm),
            None => self.instantiate(),
        }
    }

    fn check_in(&self, warm: Warm) {
        if warm.calls >= self.limits.max_calls_per_instance {
            return; // retire it: a fresh instance next time
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.most_idle.load(Ordering::Relaxed) {
            idle.push(warm);
        }
    }

    /// A fresh instance in a fresh store, with `init` already called.
    fn instantiate(&self) -> Result<Warm, LoadError> {
        let stdio = TailBuffer::new(self.limits.stderr_tail_bytes.max(1));
        // WASI with nothing behind it: no preopens, no environment, no arguments, no network.
        let wasi = WasiCtxBuilder::new()
            .stdout(stdio.clone())
            .stderr(stdio.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = StoreState {
            wasi,
            table: ResourceTable::new(),
            memory_cap: MemoryCap::new(self.limits.memory_bytes()),
            meta: self.meta.clone(),
            keyed: Session::default(),
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|state| &mut state.memory_cap);
        store.epoch_deadline_trap();
        arm(&mut store, &self.limits);

        let failed = |e: wasmtime::Error, stdio: &TailBuffer| {
            let tail = stdio.take();
            let mut message = format!("{e:#}");
            if !tail.trim().is_empty() {
                message.push_str("; stderr: ");
                message.push_str(tail.trim_end());
            }
            message
        };
        let instance = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| LoadError::Instantiate(failed(e, &stdio)))?;
        let lookup = |store: &mut Store<StoreState>, index: &ComponentExportIndex| {
            instance.get_func(store, index).ok_or_else(|| {
                LoadError::Contract("an entry point vanished after instantiation".into())
            })
        };
        let init = lookup(&mut store, &self.entry.init)?
            .typed::<(&[(String, String)],), (Result<(), String>,)>(&store)
            .map_err(|e| LoadError::Contract(format!("`init` has the wrong type: {e:#}")))?;
        match init.call(&mut store, (&self.config,)) {
            Ok((Ok(()),)) => {}
            Ok((Err(reason),)) => return Err(LoadError::Init(reason)),
            Err(e) => {
                return Err(LoadError::Init(format!(
                    "init trapped: {}",
                    failed(e, &stdio)
                )));
            }
        }
        let call = lookup(&mut store, &self.entry.call)?;
        let checked = match self.entry.world {
            World::Batch => call
                .typed::<(&[Record],), (BatchResults,)>(&store)
                .map(drop),
            World::PerRecord => call.typed::<(&Record,), (RecordResult,)>(&store).map(drop),
        };
        checked.map_err(|e| {
            LoadError::Contract(format!("the transform function has the wrong type: {e:#}"))
        })?;
        stdio.clear();
        Ok(Warm {
            store,
            call,
            stdio,
            calls: 0,
        })
    }
}

impl Warm {
    /// Calls the entry point with a fresh deadline, fuel and memory-denial flag.
    ///
    /// `P` and `R` must be the types `instantiate` checked `self.call` against for this
    /// plugin's world: `transform_isolating` and `transform_one_by_one` are the only callers.
    fn call<P, R>(&mut self, limits: &LimitsConfig, params: P) -> Result<R, Failure>
    where
        P: wasmtime::component::ComponentNamedList + wasmtime::component::Lower,
        R: wasmtime::component::ComponentNamedList + wasmtime::component::Lift,
    {
        self.calls += 1;
        arm(&mut self.store, limits);
        self.store.data_mut().memory_cap.reset();
        // SAFETY: `instantiate` type-checked `self.call` against these exact parameter and
        // result types (see the contract above); `new_unchecked` only skips repeating that
        // check on every call.
        #[allow(unsafe_code)]
        let func = unsafe { TypedFunc::<P, R>::new_unchecked(self.call) };
        match func.call(&mut self.store, params) {
            Ok(results) => {
                self.stdio.clear();
                Ok(results)
            }
            Err(error) => Err(self.classify(&error, limits)),
        }
    }

    /// Names what went wrong in a call that did not return.
    fn classify(&mut self, error: &wasmtime::Error, limits: &LimitsConfig) -> Failure {
        let (class, mut message) = if self.store.data().memory_cap.denied() {
            (
                ErrorClass::Oom,
                format!(
                    "plugin asked for more memory than its cap of {} MiB ({})",
                    limits.memory_mb,
                    error.root_cause()
                ),
            )
        } else {
            match error.downcast_ref::<Trap>() {
                Some(Trap::Interrupt) => (
                    ErrorClass::Timeout,
                    format!("plugin ran past its deadline of {} ms", limits.deadline_ms),
                ),
                Some(Trap::OutOfFuel) => (
                    ErrorClass::Timeout,
                    format!(
                        "plugin ran out of fuel ({} units)",
                        limits.fuel.unwrap_or(0)
                    ),
                ),
                Some(trap) => (ErrorClass::Trap, format!("plugin trapped: {trap}")),
                None => match error.downcast_ref::<wasmtime_wasi::I32Exit>() {
                    Some(exit) => (ErrorClass::Trap, format!("plugin called exit({})", exit.0)),
                    None => (
                        ErrorClass::BadOutput,
                        format!(
                            "plugin returned output the host cannot read: {}",
                            error.root_cause()
                        ),
                    ),
                },
            }
        };
        let stderr = self.stdio.take();
        if !stderr.trim().is_empty() {
            message.push_str("; stderr: ");
            message.push_str(stderr.trim_end());
        }
        let backtrace = error
            .downcast_ref::<WasmBacktrace>()
            .map(|bt| truncate(bt.to_string(), MAX_BACKTRACE_BYTES));
        Failure {
            class,
            message,
            backtrace,
        }
    }
}

/// Sets the deadline (and fuel) of the next call.
fn arm(store: &mut Store<StoreState>, limits: &LimitsConfig) {
    let tick = EPOCH_TICK.as_millis().max(1) as u64;
    // +1: the current tick may end at any moment.
    store.set_epoch_deadline(limits.deadline_ms.div_ceil(tick) + 1);
    if let Some(fuel) = limits.fuel {
        // Cannot fail: fuel is enabled on the engine whenever `limits.fuel` is set.
        let _ = store.set_fuel(fuel);
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// What a component is, found by [`Plugin::inspect`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Inspection {
    /// `sha256:<hex>` of the component bytes.
    pub digest: String,
    pub world: World,
    /// Whether it keeps keyed state (imports the WIT `state` interface).
    pub stateful: bool,
    pub size_bytes: usize,
    /// The WIT version of the contract it was built against (the one this host supports).
    pub wit_version: &'static str,
    /// Names of the component's exports and imports.
    pub exports: Vec<String>,
    pub imports: Vec<String>,
}

/// The checks every component passes before it runs, and what they found.
fn validate(
    runtime: &Runtime,
    bytes: &[u8],
) -> Result<(Inspection, Entry, InstancePre<StoreState>), LoadError> {
    check_header(bytes)?;
    let digest = hex::encode(Sha256::digest(bytes));
    let component = runtime
        .compile(bytes, &digest)
        .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
    check_imports(runtime, &component)?;
    let entry = find_entry(runtime, &component)?;
    let pre = runtime
        .linker
        .instantiate_pre(&component)
        .map_err(|e| LoadError::Instantiate(format!("{e:#}")))?;
    let ty = component.component_type();
    let inspection = Inspection {
        digest: format!("sha256:{digest}"),
        world: entry.world,
        stateful: entry.stateful,
        size_bytes: bytes.len(),
        wit_version: WIT_VERSION,
        exports: ty
            .exports(&runtime.engine)
            .map(|(n, _)| n.to_owned())
            .collect(),
        imports: ty
            .imports(&runtime.engine)
            .map(|(n, _)| n.to_owned())
            .collect(),
    };
    Ok((inspection, entry, pre))
}

fn check_header(bytes: &[u8]) -> Result<(), LoadError> {
    match bytes {
        [0, b'a', b's', b'm', 1, 0, 0, 0, ..] => Err(LoadError::CoreModule),
        [0, b'a', b's', b'm', ..] => Ok(()),
        _ => Err(LoadError::NotWasm),
    }
}

fn check_imports(runtime: &Runtime, component: &Component) -> Result<(), LoadError> {
    let ty = component.component_type();
    let mut foreign = Vec::new();
    for (name, _) in ty.imports(&runtime.engine) {
        if name.starts_with("wasi:")
            || name == HOST_IMPORT
            || name == TYPES_IMPORT
            || name == STATE_IMPORT
        {
            continue;
        }
        if name.starts_with("weir:transform/") {
            return Err(LoadError::Contract(format!(
                "imports `{name}`; this host supports weir:transform@{WIT_VERSION}"
            )));
        }
        foreign.push(format!("`{name}`"));
    }
    if foreign.is_empty() {
        Ok(())
    } else {
        Err(LoadError::ForbiddenImport(foreign.join(", ")))
    }
}

fn find_entry(runtime: &Runtime, component: &Component) -> Result<Entry, LoadError> {
    for (world, export, func) in [
        (World::Batch, BATCH_EXPORT, "transform-batch"),
        (World::PerRecord, RECORD_EXPORT, "transform"),
    ] {
        let Some(interface) = component.get_export_index(None, export) else {
            continue;
        };
        let function = |name: &str| {
            component
                .get_export_index(Some(&interface), name)
                .ok_or_else(|| {
                    LoadError::Contract(format!("exports `{export}` without the function `{name}`"))
                })
        };
        let stateful = (component.component_type().imports(&runtime.engine))
            .any(|(name, _)| name == STATE_IMPORT);
        return Ok(Entry {
            world,
            stateful,
            init: function("init")?,
            call: function(func)?,
        });
    }
    let exports: Vec<String> = component
        .component_type()
        .exports(&runtime.engine)
        .filter(|(_, item)| matches!(item.ty, ComponentItem::ComponentInstance(_)))
        .map(|(name, _)| name.to_owned())
        .collect();
    let other_version = exports.iter().find(|name| {
        name.starts_with("weir:transform/batch-transform@")
            || name.starts_with("weir:transform/record-transform@")
    });
    Err(LoadError::Contract(match other_version {
        Some(name) => format!("exports `{name}`; this host supports weir:transform@{WIT_VERSION}"),
        None => format!(
            "exports nothing named `transform-batch` (world `batch`) or `transform` (world `per-record`) \
             from weir:transform@{WIT_VERSION}; its exports are: [{}]",
            exports.join(", ")
        ),
    }))
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_check_tells_modules_from_components() {
        assert!(matches!(
            check_header(b"hello world"),
            Err(LoadError::NotWasm)
        ));
        assert!(matches!(
            check_header(b"\0asm\x01\0\0\0rest"),
            Err(LoadError::CoreModule)
        ));
        assert!(check_header(b"\0asm\x0d\0\x01\0rest").is_ok());
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo".into(), 2), "h");
        assert_eq!(truncate("abc".into(), 10), "abc");
    }
}
