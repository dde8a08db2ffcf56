//! The one `bindgen!` site: Rust types for the WIT contract in `wit/`, and the host's `log`
//! import. Exports are looked up by name at load time (see `plugin.rs`) because a plugin may
//! implement either world.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "batch",
});

pub use self::weir::transform::host::Level;
pub use self::weir::transform::types::{Output, Record, SourceMeta, TransformError};

/// The WIT package version this host accepts.
pub const WIT_VERSION: &str = "0.1.0";
/// Export name of the batch entry point.
pub const BATCH_EXPORT: &str = "weir:transform/batch-transform@0.1.0";
/// Export name of the per-record entry point.
pub const RECORD_EXPORT: &str = "weir:transform/record-transform@0.1.0";
/// Import name of the host interface.
pub const HOST_IMPORT: &str = "weir:transform/host@0.1.0";
/// Import name of the shared types (an interface with no functions).
pub const TYPES_IMPORT: &str = "weir:transform/types@0.1.0";
