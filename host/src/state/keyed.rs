//! Plugins' keyed state (the WIT `state` interface), as the stores keep it: one record's
//! write ([`KeyedWrite`]), how a plugin's calls read state ([`KeyedRead`]), and the stored
//! form of a value with its expiry, and the keys that are the host's ([`DoneMarks`]).
//!
//! State is scoped to the pipeline, the plugin's name and the input partition; a store
//! keeps one scope's state per pipeline (the scope is fixed when the store is opened).

use super::StateError;

pub use crate::record::KeyedWrite;

/// Reads keyed state as it stands now.
pub trait KeyedRead: Send + Sync {
    /// The value of `key` in `partition`; none when absent, deleted or expired. Called from
    /// a blocking thread (inside a plugin call), never from the async reactor.
    fn get(&self, partition: i32, key: &[u8]) -> Result<Option<Vec<u8>>, StateError>;

    /// Whether the values read here change only through this process (so they may be
    /// cached): true of the embedded store, which one process holds.
    fn sole_writer(&self) -> bool {
        false
    }

    /// Every live entry, in key order (for inspection: `weir state`, `GET /v1/state`).
    fn entries(&self) -> Result<Vec<KeyedEntry>, StateError> {
        Err(StateError::new("this state store cannot list keyed state"))
    }
}

/// Keys beginning with this byte are the host's: it is never part of UTF-8 text, so no text
/// key collides. A plugin's writes of such keys are refused and its reads see none.
pub const HOST_KEY_BYTE: u8 = 0xff;

/// Whether `key` is the host's ([`HOST_KEY_BYTE`]).
pub fn is_host_key(key: &[u8]) -> bool {
    key.first() == Some(&HOST_KEY_BYTE)
}

/// Done marks kept as keyed state entries of the record's partition (exactly-once mode's
/// changelog store): written with the record's own writes, in the same transaction as its
/// outputs and offsets, and restored with the partition's state, so a repeat of a record in
/// its partition is skipped even when the worker that ran it died before marking it done
/// in the state store.
#[derive(Debug, Clone, Copy, Default)]
pub struct DoneMarks {
    /// How long a mark is kept (`None`: forever), as the state store's done marks.
    pub ttl: Option<std::time::Duration>,
}

impl DoneMarks {
    /// The key of record `id`'s done mark.
    pub fn key(id: &str) -> Vec<u8> {
        let mut key = Vec::with_capacity(6 + id.len());
        key.push(HOST_KEY_BYTE);
        key.extend_from_slice(b"done:");
        key.extend_from_slice(id.as_bytes());
        key
    }

    /// The write that marks record `id` of `partition` done at `now_ms`.
    pub fn mark(&self, partition: i32, id: &str, now_ms: u64) -> KeyedWrite {
        KeyedWrite {
            partition,
            key: Self::key(id),
            value: Some(b"1".to_vec()),
            expires_ms: (self.ttl).map(|ttl| now_ms.saturating_add(ttl.as_millis() as u64)),
        }
    }
}

/// No state at all (a plugin tried out alone, e.g. by `weir test`, starts from nothing).
pub struct NoState;

impl KeyedRead for NoState {
    fn get(&self, _partition: i32, _key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        Ok(None)
    }
}

/// A key in its partition.
pub(crate) type Slot = (i32, Vec<u8>);

/// Keyed state in memory: what `weir test` runs a stateful plugin against.
#[derive(Default)]
pub struct MemoryState {
    entries: std::sync::Mutex<std::collections::BTreeMap<Slot, Vec<u8>>>,
}

impl MemoryState {
    /// Applies a processed record's writes.
    pub fn apply(&self, writes: Vec<KeyedWrite>) {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for write in writes {
            let key = (write.partition, write.key);
            match write.value {
                Some(value) => entries.insert(key, encode_value(&value, write.expires_ms)),
                None => entries.remove(&key),
            };
        }
    }
}

impl KeyedRead for MemoryState {
    fn get(&self, partition: i32, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        let entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = crate::clock::now_ms() as u64;
        Ok((entries.get(&(partition, key.to_vec())))
            .and_then(|s| decode_value(s, now).map(<[u8]>::to_vec)))
    }

    fn entries(&self) -> Result<Vec<KeyedEntry>, StateError> {
        let now_ms = crate::clock::now_ms() as u64;
        let entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok((entries.iter())
            .filter_map(|((partition, key), stored)| {
                KeyedEntry::live(*partition, key.clone(), stored, now_ms)
            })
            .collect())
    }
}

/// A stored value: its expiry (ms since the epoch, 0 = never; 8 bytes, big-endian), then
/// its bytes.
pub(crate) fn encode_value(value: &[u8], expires_ms: Option<u64>) -> Vec<u8> {
    let mut stored = Vec::with_capacity(8 + value.len());
    stored.extend_from_slice(&expires_ms.unwrap_or(0).to_be_bytes());
    stored.extend_from_slice(value);
    stored
}

/// The bytes of a stored value, unless it has expired by `now_ms` or is malformed.
pub(crate) fn decode_value(stored: &[u8], now_ms: u64) -> Option<&[u8]> {
    let (expiry, value) = stored.split_first_chunk::<8>()?;
    match u64::from_be_bytes(*expiry) {
        0 => Some(value),
        expiry if expiry > now_ms => Some(value),
        _ => None,
    }
}

/// The stored key of `key` in `partition`: the partition (4 bytes, big-endian, so a
/// partition's keys sort together), then the key's bytes.
pub(crate) fn partition_key(partition: i32, key: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(4 + key.len());
    stored.extend_from_slice(&partition.to_be_bytes());
    stored.extend_from_slice(key);
    stored
}

/// The partition and key of a stored key (see [`partition_key`]).
pub(crate) fn split_partition_key(stored: &[u8]) -> Option<(i32, &[u8])> {
    let (partition, key) = stored.split_first_chunk::<4>()?;
    Some((i32::from_be_bytes(*partition), key))
}

/// One live entry of a plugin's keyed state, as `weir state` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedEntry {
    pub partition: i32,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

impl KeyedEntry {
    /// The entry of `key` in `partition` with the value `stored` (its stored form), unless
    /// that has expired by `now_ms`.
    pub(crate) fn live(partition: i32, key: Vec<u8>, stored: &[u8], now_ms: u64) -> Option<Self> {
        Some(Self {
            partition,
            key,
            value: decode_value(stored, now_ms)?.to_vec(),
        })
    }

    /// One JSON line, `{"partition":P,"key":K,"value":V}`: key and value as UTF-8 text when
    /// they are, else (all, with `base64`) as base64 with `"key_base64":true` /
    /// `"value_base64":true` beside them, as in dead letters.
    pub fn json_line(&self, base64: bool) -> String {
        use base64::Engine;
        let mut line = format!(r#"{{"partition":{}"#, self.partition);
        for (name, bytes) in [("key", &self.key), ("value", &self.value)] {
            let (text, is_base64) = match base64 {
                true => (
                    base64::engine::general_purpose::STANDARD.encode(bytes),
                    true,
                ),
                false => crate::record::json::encode(bytes),
            };
            line.push_str(&format!(r#","{name}":{}"#, serde_json::Value::from(text)));
            if is_base64 {
                line.push_str(&format!(r#","{name}_base64":true"#));
            }
        }
        line.push('}');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_carry_their_expiry() {
        let forever = encode_value(b"v", None);
        assert_eq!(decode_value(&forever, u64::MAX), Some(&b"v"[..]));
        let until_10 = encode_value(b"w", Some(10));
        assert_eq!(decode_value(&until_10, 9), Some(&b"w"[..]));
        assert_eq!(decode_value(&until_10, 10), None);
        assert_eq!(decode_value(b"short", 0), None);
    }

    #[test]
    fn text_stays_text_and_bytes_become_base64() {
        let entry = KeyedEntry {
            partition: 2,
            key: b"count/u1".to_vec(),
            value: vec![0xff, 0x00],
        };
        assert_eq!(
            entry.json_line(false),
            r#"{"partition":2,"key":"count/u1","value":"/wA=","value_base64":true}"#
        );
        assert_eq!(
            entry.json_line(true),
            r#"{"partition":2,"key":"Y291bnQvdTE=","key_base64":true,"value":"/wA=","value_base64":true}"#
        );
    }

    #[test]
    fn keys_carry_their_partition() {
        assert_eq!(partition_key(-1, b"k"), [0xff, 0xff, 0xff, 0xff, b'k']);
        let stored = partition_key(7, b"count/u1");
        assert_eq!(split_partition_key(&stored), Some((7, &b"count/u1"[..])));
        assert!(partition_key(1, b"z") < partition_key(2, b"a"));
    }
}
