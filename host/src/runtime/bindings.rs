//! The one `bindgen!` site: Rust types for the WIT contract in `wit/`, and the host's
//! imports (`log`, and `state` for stateful plugins). Exports are looked up by name at load time (see `plugin.rs`) because a plugin may
//! implement either world.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "stateful",
    // A state read that fails in the store ends the call (a trap the host recognises).
    imports: { default: trappable },
    // The data types live in the record model, at the bottom of the crate.
    with: { "weir:transform/types": types },
});

/// The WIT `types` interface: the record model's types, plus the (empty) host side that
/// `bindgen!` expects of every imported interface. Only the world's own `add_to_linker`,
/// which Weir does not call (it links `host` alone), refers to that host side.
#[allow(dead_code)]
pub mod types {
    pub use crate::record::wit::*;
    use wasmtime::component::{HasData, Linker};

    pub trait HostWithStore<T>: HasData {}
    impl<H: ?Sized + HasData, T> HostWithStore<T> for H {}

    /// The interface has no functions, so there is nothing to implement.
    pub trait Host {}

    pub fn add_to_linker<T: 'static, D>(
        linker: &mut Linker<T>,
        _host_getter: fn(&mut T) -> D::Data<'_>,
    ) -> wasmtime::Result<()>
    where
        D: HostWithStore<T>,
        for<'a> D::Data<'a>: Host,
    {
        linker.instance(super::TYPES_IMPORT)?;
        Ok(())
    }
}

pub use self::weir::transform::host::Level;

/// The WIT package version this host accepts.
pub const WIT_VERSION: &str = "0.1.0";
/// Export name of the batch entry point.
pub const BATCH_EXPORT: &str = "weir:transform/batch-transform@0.1.0";
/// Export name of the per-record entry point.
pub const RECORD_EXPORT: &str = "weir:transform/record-transform@0.1.0";
/// Import name of the host interface.
pub const HOST_IMPORT: &str = "weir:transform/host@0.1.0";
/// Import name of the keyed-state interface (stateful plugins).
pub const STATE_IMPORT: &str = "weir:transform/state@0.1.0";
/// Import name of the shared types (an interface with no functions).
pub const TYPES_IMPORT: &str = "weir:transform/types@0.1.0";
