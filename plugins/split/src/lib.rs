//! The `split` example plugin: one input, one output per named destination.
//!
//! Config: `to` = a comma-separated list of destination names (required; each must be
//! configured on the host). Every output carries the header `split.index`.

use weir_sdk::{Config, Output, Record, TransformError};

fn check(config: &Config) -> Result<(), String> {
    match config.get("to") {
        Some(to) if to.split(',').all(|d| !d.trim().is_empty()) => Ok(()),
        _ => Err("`to` is required: a comma-separated list of destination names".into()),
    }
}

#[weir_sdk::transform(init = check)]
fn split(record: Record) -> Result<Vec<Output>, TransformError> {
    let to = weir_sdk::config().get("to").unwrap_or_default();
    Ok(to
        .split(',')
        .enumerate()
        .map(|(i, dest)| {
            Output::to(dest.trim(), record.value.clone()).with_header("split.index", i.to_string())
        })
        .collect())
}
