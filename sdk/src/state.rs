//! Keyed state kept by the host (the WIT `state` interface): bytes keys and values, scoped
//! to the pipeline, the plugin's name and the input partition of the record.
//!
//! ```no_run
//! use weir_sdk::{state, Output, Record, TransformError};
//!
//! /// Counts events per user and emits the running count.
//! #[weir_sdk::transform]
//! fn count(record: Record) -> Result<Output, TransformError> {
//!     let user = String::from_utf8_lossy(&record.value).into_owned();
//!     let key = format!("count/{user}");
//!     let n = state::get_u64(&key).unwrap_or(0) + 1;
//!     state::set_u64(&key, n);
//!     Ok(Output::new(format!("{user} {n}")))
//! }
//! ```
//!
//! A record sees the writes of every record before it. Its own writes take effect only if
//! the record is processed: returning an error, panicking or running out of time leaves
//! state as the record found it. A plugin that calls these functions is handed one record
//! per call by the host, so each write belongs to one record.

use crate::bindings::weir::transform::state as wit;

/// The value of `key`: none when never set, deleted or expired.
pub fn get(key: impl AsRef<[u8]>) -> Option<Vec<u8>> {
    wit::get(key.as_ref())
}

/// Sets `key` to `value`.
pub fn set(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
    wit::set(key.as_ref(), value.as_ref());
}

/// Sets `key` to `value` for `ttl` (whole seconds, at least 1); afterwards [`get`] sees none.
pub fn set_expiring(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>, ttl: std::time::Duration) {
    let secs = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX).max(1);
    wit::set_expiring(key.as_ref(), value.as_ref(), secs);
}

/// Removes `key`.
pub fn delete(key: impl AsRef<[u8]>) {
    wit::delete(key.as_ref());
}

/// The value of `key` as UTF-8 text (none when absent or not UTF-8).
pub fn get_string(key: impl AsRef<[u8]>) -> Option<String> {
    get(key).and_then(|v| String::from_utf8(v).ok())
}

/// The value of `key` as a decimal integer (none when absent or not one).
pub fn get_u64(key: impl AsRef<[u8]>) -> Option<u64> {
    get_string(key).and_then(|s| s.parse().ok())
}

/// Sets `key` to `n` as decimal text (what [`get_u64`] reads).
pub fn set_u64(key: impl AsRef<[u8]>, n: u64) {
    set(key, n.to_string());
}
