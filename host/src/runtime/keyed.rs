//! A stateful plugin's keyed state during one [`Plugin::transform`](super::Plugin::transform)
//! (the WIT `state` interface): the writes of the record in the plugin, over the accepted
//! writes of the records before it in the same transform, over the pipeline's reader (its
//! writes not yet durable, then the store).
//!
//! The host calls a stateful plugin with one record at a time, so every write belongs to
//! the record in the plugin. After each call the record's writes are accepted (the record
//! is processed) or dropped (anything else); a write over a limit refuses them all, and the
//! record becomes `bad_output`.

use std::collections::HashMap;
use std::sync::Arc;

use super::StoreState;
use super::bindings::weir::transform::state::Host;
use crate::clock::now_ms;
use crate::config::LimitsConfig;
use crate::state::StateError;
use crate::state::keyed::{HOST_KEY_BYTE, KeyedRead, KeyedWrite, Slot, is_host_key};

/// The state the current call sees (empty outside a stateful transform).
#[derive(Default)]
pub(super) struct Session {
    reader: Option<Arc<dyn KeyedRead>>,
    limits: Limits,
    partition: i32,
    /// The latest accepted write of each key by the records before, in this transform.
    accepted: HashMap<Slot, KeyedWrite>,
    /// The writes of the record in the plugin, in order.
    record: Vec<KeyedWrite>,
    /// Why the record's writes are refused, once one went over a limit.
    refused: Option<String>,
    /// A read the store failed: the call traps, and the transform returns this error.
    failed: Option<StateError>,
    /// `get` calls in this transform.
    reads: u64,
}

#[derive(Default, Clone, Copy)]
struct Limits {
    key_bytes: usize,
    value_bytes: usize,
    writes_per_record: usize,
}

/// The trap a failed state read ends a call with (the error itself is kept in the session).
#[derive(Debug, thiserror::Error)]
#[error("the state store failed a read")]
pub(super) struct ReadFailed;

impl Session {
    /// Starts a transform that reads through `reader`.
    pub(super) fn begin(&mut self, reader: Arc<dyn KeyedRead>, limits: &LimitsConfig) {
        *self = Self {
            reader: Some(reader),
            limits: Limits {
                key_bytes: limits.state_key_bytes,
                value_bytes: limits.state_value_bytes,
                writes_per_record: limits.state_writes_per_record,
            },
            ..Self::default()
        };
    }

    /// The record about to enter the plugin is in `partition`.
    pub(super) fn start_record(&mut self, partition: i32) {
        self.partition = partition;
        self.record.clear();
        self.refused = None;
    }

    /// The record in the plugin is done. When `processed`, its writes are accepted and
    /// returned, unless one of them went over a limit (then `Err` says which); otherwise
    /// they are dropped.
    pub(super) fn finish_record(&mut self, processed: bool) -> Result<Vec<KeyedWrite>, String> {
        let writes = std::mem::take(&mut self.record);
        if let Some(reason) = self.refused.take() {
            return Err(reason);
        }
        if !processed {
            return Ok(Vec::new());
        }
        for write in &writes {
            (self.accepted).insert((write.partition, write.key.clone()), write.clone());
        }
        Ok(writes)
    }

    /// `get` calls in this transform.
    pub(super) fn reads(&self) -> u64 {
        self.reads
    }

    /// The store error of a failed read, if the last call had one.
    pub(super) fn take_failure(&mut self) -> Option<StateError> {
        self.failed.take()
    }

    fn get(&mut self, key: &[u8]) -> wasmtime::Result<Option<Vec<u8>>> {
        self.reads += 1;
        if is_host_key(key) {
            return Ok(None);
        }
        let now = now_ms() as u64;
        let partition = self.partition;
        let mine = (self.record.iter().rev()).find(|w| w.partition == partition && w.key == key);
        if let Some(write) = mine.or_else(|| self.accepted.get(&(partition, key.to_vec()))) {
            return Ok(write.live_value(now));
        }
        let Some(reader) = &self.reader else {
            return Ok(None);
        };
        match reader.get(partition, key) {
            Ok(value) => Ok(value),
            Err(e) => {
                self.failed = Some(e);
                Err(ReadFailed.into())
            }
        }
    }

    fn write(&mut self, key: Vec<u8>, value: Option<Vec<u8>>, expires_ms: Option<u64>) {
        if self.refused.is_some() {
            return;
        }
        let limits = self.limits;
        let refused = if is_host_key(&key) {
            Some(format!(
                "a state key beginning with byte 0x{HOST_KEY_BYTE:02x}, which marks the host's keys"
            ))
        } else if key.len() > limits.key_bytes {
            Some(format!(
                "a state key of {} bytes; the limit is {} bytes (limits.state_key_bytes)",
                key.len(),
                limits.key_bytes
            ))
        } else if let Some(big) = value.as_ref().filter(|v| v.len() > limits.value_bytes) {
            Some(format!(
                "a state value of {} bytes; the limit is {} bytes (limits.state_value_bytes)",
                big.len(),
                limits.value_bytes
            ))
        } else if self.record.len() >= limits.writes_per_record {
            Some(format!(
                "more than {} state writes for one record (limits.state_writes_per_record)",
                limits.writes_per_record
            ))
        } else {
            None
        };
        if refused.is_some() {
            self.refused = refused;
            return;
        }
        self.record.push(KeyedWrite {
            partition: self.partition,
            key,
            value,
            expires_ms,
        });
    }
}

impl Host for StoreState {
    fn get(&mut self, key: Vec<u8>) -> wasmtime::Result<Option<Vec<u8>>> {
        self.keyed.get(&key)
    }

    fn set(&mut self, key: Vec<u8>, value: Vec<u8>) -> wasmtime::Result<()> {
        self.keyed.write(key, Some(value), None);
        Ok(())
    }

    fn set_expiring(
        &mut self,
        key: Vec<u8>,
        value: Vec<u8>,
        ttl_secs: u32,
    ) -> wasmtime::Result<()> {
        let expires = now_ms() as u64 + u64::from(ttl_secs) * 1000;
        self.keyed.write(key, Some(value), Some(expires));
        Ok(())
    }

    fn delete(&mut self, key: Vec<u8>) -> wasmtime::Result<()> {
        self.keyed.write(key, None, None);
        Ok(())
    }
}
