//! `faulty` with keyed state, for tests: every record first writes `seen/<id>` = `1` and
//! raises `count` (decimal text), then behaves as `faulty` does for its `fault` field (the
//! table in `faulty/src/lib.rs`), so a record that faults after writing shows whether its
//! writes were undone. Three more faults go over the host's state limits after those
//! writes: `big_key` (a 2 KiB key), `big_value` (a 100 KB value), `many_writes` (100
//! writes), and one writes a key the host keeps for itself: `host_key` (first byte 0xff). `expiring` also sets `ttl/<id>` for one second, and passes.

#[path = "../../faulty/src/faults.rs"]
mod faults;

use serde_json::Value;
use weir_sdk::{Output, Record, TransformError, state};

#[weir_sdk::transform]
fn faulty_stateful(record: Record) -> Result<Output, TransformError> {
    let value: Value = serde_json::from_slice(&record.value).unwrap_or(Value::Null);
    let id = value.get("id").and_then(Value::as_str).unwrap_or("?");
    state::set(format!("seen/{id}"), "1");
    state::set_u64("count", state::get_u64("count").unwrap_or(0) + 1);
    match value.get("fault").and_then(Value::as_str) {
        Some("big_key") => state::set(vec![b'k'; 2048], "1"),
        Some("big_value") => state::set("big", vec![b'v'; 100_000]),
        Some("many_writes") => (0..100).for_each(|i| state::set(format!("w/{i}"), "1")),
        Some("host_key") => state::set(vec![0xff, b'x'], "1"),
        Some("expiring") => {
            state::set_expiring(format!("ttl/{id}"), "1", std::time::Duration::from_secs(1));
        }
        _ => {}
    }
    faults::misbehave(record)
}
