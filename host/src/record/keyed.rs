//! A stateful plugin's write to its keyed state (docs/state.md), as a processed record's
//! outcome carries it to where it is kept.

/// One write of one record: set (`value` is some) or delete, in the record's partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedWrite {
    pub partition: i32,
    pub key: Vec<u8>,
    /// `None`: delete the key.
    pub value: Option<Vec<u8>>,
    /// When the value expires, in ms since the epoch (`None`: never).
    pub expires_ms: Option<u64>,
}

impl KeyedWrite {
    /// Bytes of its key and value.
    pub fn bytes(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, Vec::len)
    }

    /// The value this write leaves, unless it deleted the key or the value expired by `now_ms`.
    pub fn live_value(&self, now_ms: u64) -> Option<Vec<u8>> {
        let live = self.expires_ms.is_none_or(|at| at > now_ms);
        self.value.clone().filter(|_| live)
    }
}
