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
//! | `log`           | logs `record <id> asked to be logged` (warn) through the host, then passes |
//!
//! Every other record passes through unchanged (key and value). Config `faults=off` makes every record pass
//! (the "fixed" version used to test DLQ replay).

mod faults;

use weir_sdk::{Output, Record, TransformError};

#[weir_sdk::transform]
fn faulty(record: Record) -> Result<Output, TransformError> {
    faults::misbehave(record)
}
