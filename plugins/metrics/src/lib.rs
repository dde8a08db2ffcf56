//! The `metrics` example plugin: the pinned spec of `metrics-core`, with its state kept by
//! the host (`weir_sdk::state`).

use weir_sdk::{Output, Record, TransformError, state};

/// The plugin's keyed state, through the host.
struct HostState;

impl metrics_core::State for HostState {
    fn get(&mut self, key: &str) -> Option<String> {
        state::get_string(key)
    }

    fn set(&mut self, key: &str, value: &str) {
        state::set(key, value);
    }
}

#[weir_sdk::transform]
fn metrics(record: Record) -> Result<Vec<Output>, TransformError> {
    metrics_core::metrics(&record.value, &mut HostState)
        .map(|outputs| outputs.into_iter().map(Output::new).collect())
        .map_err(TransformError::Invalid)
}
