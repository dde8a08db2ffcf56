//! A deliberately faulty plugin for tests. A JSON record with a `fault` field misbehaves:
//!
//! | `fault`         | behaviour                                                     |
//! |-----------------|---------------------------------------------------------------|
//! | `trap`          | executes `unreachable`                                        |
//! | `loop`          | loops forever                                                 |
//! | `memory`        | allocates without bound                                       |
//! | `panic`         | panics with a message naming the record's `id`                |
//! | `bad_destination` | outputs to a destination nobody configured                  |
//! | `oversize`      | outputs a 2 MiB value                                         |
//! | `retry`         | `retryable` on attempts 1..=K (config `retry_attempts`, default 2), then passes |
//! | `retry_forever` | always `retryable`                                            |
//! | `retry_until`   | `retryable` until the wall-clock time `until_ms` (field, ms since the epoch), then passes |
//! | `invalid`       | `invalid`                                                     |
//! | `slow`          | busy for `slow_ms` milliseconds (field; default 1000), then passes |
//!
//! Every other record passes through unchanged (key and value). Config `faults=off` makes every record pass
//! (the "fixed" version used to test DLQ replay).

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

#[weir_sdk::transform]
fn faulty(record: Record) -> Result<Output, TransformError> {
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
        _ => Ok(pass(record)),
    }
}
