//! The `filter` example plugin: drops (or keeps only) JSON records whose field equals a value.
//!
//! Config: `field` (a JSON pointer such as `/action`, required), `equals` (the text to
//! compare with, required), `mode` = `drop` (default) or `keep`. A dropped record is still
//! processed: it just has zero outputs.

use serde_json::Value;
use weir_sdk::{Config, Output, Record, TransformError};

fn check(config: &Config) -> Result<(), String> {
    match config.get("field") {
        Some(f) if f.starts_with('/') => {}
        Some(f) => {
            return Err(format!(
                "`field` must be a JSON pointer such as /action, got `{f}`"
            ));
        }
        None => return Err("`field` is required (a JSON pointer such as /action)".into()),
    }
    if config.get("equals").is_none() {
        return Err("`equals` is required".into());
    }
    match config.get("mode") {
        None | Some("drop" | "keep") => Ok(()),
        Some(other) => Err(format!("`mode` must be drop or keep, got `{other}`")),
    }
}

#[weir_sdk::transform(init = check)]
fn filter(record: Record) -> Result<Option<Output>, TransformError> {
    let config = weir_sdk::config();
    let (field, equals) = (
        config.get("field").unwrap_or("/"),
        config.get("equals").unwrap_or(""),
    );
    let value: Value = serde_json::from_slice(&record.value)
        .map_err(|e| TransformError::Invalid(format!("malformed JSON: {e}")))?;
    let matches = match value.pointer(field) {
        Some(Value::String(s)) => s == equals,
        Some(other) => serde_json::to_string(other).is_ok_and(|text| text == equals),
        None => false,
    };
    let keep = matches == (config.get("mode") == Some("keep"));
    Ok(keep.then(|| Output::new(record.value)))
}
