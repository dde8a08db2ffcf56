//! The faults of the `faulty` plugins (the table in `faulty/src/lib.rs`).

use serde_json::Value;
use weir_sdk::{Output, Record, TransformError};

/// The record unchanged: its key and its value.
fn pass(record: Record) -> Output {
    let output = Output::new(record.value);
    match record.key {
        Some(key) => output.with_key(key),
        None => output,
    }
}

/// What `faulty` does with a record (see the crate docs).
pub fn misbehave(record: Record) -> Result<Output, TransformError> {
    let config = weir_sdk::config();
    if config.get("faults") == Some("off") {
        return Ok(pass(record));
    }
    let value: Value = serde_json::from_slice(&record.value).unwrap_or(Value::Null);
    let id = value
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_owned();
    match value.get("fault").and_then(Value::as_str) {
        Some("trap") => std::arch::wasm32::unreachable(),
        Some("loop") => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        Some("memory") => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 8 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        Some("panic") => panic!("faulty plugin panicked on record {id}"),
        Some("bad_destination") => Ok(Output::to("nowhere", record.value)),
        Some("oversize") => Ok(Output::new(vec![b'x'; 2 << 20])),
        Some("retry") => {
            let k: u32 = config
                .get("retry_attempts")
                .and_then(|k| k.parse().ok())
                .unwrap_or(2);
            if record.source.attempt <= k {
                Err(TransformError::Retryable(format!(
                    "attempt {} of record {id}",
                    record.source.attempt
                )))
            } else {
                Ok(pass(record))
            }
        }
        Some("retry_forever") => Err(TransformError::Retryable(format!(
            "record {id} is never ready"
        ))),
        Some("retry_until") => {
            let until = value.get("until_ms").and_then(Value::as_u64).unwrap_or(0);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            if now < until {
                Err(TransformError::Retryable(format!(
                    "record {id} is not ready for another {} ms",
                    until - now
                )))
            } else {
                Ok(pass(record))
            }
        }
        Some("slow") => {
            let ms = value.get("slow_ms").and_then(Value::as_u64).unwrap_or(1000);
            let started = std::time::Instant::now();
            while started.elapsed() < std::time::Duration::from_millis(ms) {
                std::hint::spin_loop();
            }
            Ok(pass(record))
        }
        Some("invalid") => Err(TransformError::Invalid(format!(
            "record {id} is marked invalid"
        ))),
        Some("log") => {
            weir_sdk::log(
                weir_sdk::Level::Warn,
                &format!("record {id} asked to be logged"),
            );
            Ok(pass(record))
        }
        _ => Ok(pass(record)),
    }
}
