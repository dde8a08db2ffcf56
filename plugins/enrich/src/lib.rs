//! The `enrich` example plugin: the pinned spec of `enrich-core`, as a Weir plugin.

use weir_sdk::{Output, Record, TransformError};

#[weir_sdk::transform]
fn enrich(record: Record) -> Result<Output, TransformError> {
    enrich_core::enrich(&record.value)
        .map(Output::new)
        .map_err(TransformError::Invalid)
}
