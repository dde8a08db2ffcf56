//! A stateful plugin's accepted writes between the plugin and their done marks.
//!
//! The transform stage hands the plugin a reader that sees these pending writes over the
//! store's durable state, so each record reads the writes of every record accepted before
//! it, in its batch and in the batches still being written. A batch's writes travel with it
//! (in the order they were accepted) to its completion, which makes them durable with the
//! batch's done marks, batches in order ([`Turn`](crate::state::Turn)); then they leave
//! the pending set.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::clock::now_ms;
use crate::state::StateError;
use crate::state::keyed::{KeyedRead, KeyedWrite, Slot};

/// Accepted writes not yet durable, over the durable state.
pub(super) struct Pending {
    durable: Arc<dyn KeyedRead>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The latest pending write of each (partition, key), with its sequence number.
    latest: HashMap<Slot, (u64, KeyedWrite)>,
    /// The writes accepted for the batch in the transform stage, in order.
    batch: Vec<KeyedWrite>,
    /// The number of the last write accepted.
    seq: u64,
}

/// A batch's writes, in the order they were accepted, and the number of its last one.
#[derive(Default)]
pub(super) struct BatchWrites {
    pub writes: Vec<KeyedWrite>,
    pub last: u64,
}

impl Pending {
    pub(super) fn new(durable: Arc<dyn KeyedRead>) -> Self {
        Self {
            durable,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Accepts a processed record's writes (the transform stage, in the order of the
    /// plugin's answers).
    pub(super) fn accept(&self, writes: Vec<KeyedWrite>) {
        let mut inner = self.lock();
        for write in writes {
            inner.seq += 1;
            let seq = inner.seq;
            let key = (write.partition, write.key.clone());
            inner.latest.insert(key, (seq, write.clone()));
            inner.batch.push(write);
        }
    }

    /// The writes accepted since the last call: the batch just transformed.
    pub(super) fn take_batch(&self) -> BatchWrites {
        let mut inner = self.lock();
        BatchWrites {
            writes: std::mem::take(&mut inner.batch),
            last: inner.seq,
        }
    }

    /// Every write up to number `last` is durable: the store answers for them now.
    pub(super) fn durable_up_to(&self, last: u64) {
        self.lock().latest.retain(|_, (seq, _)| *seq > last);
    }
}

impl KeyedRead for Pending {
    fn get(&self, partition: i32, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        {
            let inner = self.lock();
            if let Some((_, write)) = inner.latest.get(&(partition, key.to_vec())) {
                return Ok(write.live_value(now_ms() as u64));
            }
        }
        self.durable.get(partition, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::keyed::NoState;

    fn set(key: &str, value: &str) -> KeyedWrite {
        KeyedWrite {
            partition: 0,
            key: key.into(),
            value: Some(value.into()),
            expires_ms: None,
        }
    }

    #[test]
    fn pending_writes_are_read_until_durable() {
        let pending = Pending::new(Arc::new(NoState));
        pending.accept(vec![set("a", "1"), set("b", "1")]);
        let first = pending.take_batch();
        pending.accept(vec![set("a", "2")]);
        let second = pending.take_batch();
        assert_eq!((first.writes.len(), first.last), (2, 2));
        assert_eq!((second.writes.len(), second.last), (1, 3));
        assert_eq!(pending.get(0, b"a").unwrap(), Some(b"2".to_vec()));
        assert_eq!(pending.get(1, b"a").unwrap(), None, "another partition");

        pending.durable_up_to(first.last);
        assert_eq!(
            pending.get(0, b"a").unwrap(),
            Some(b"2".to_vec()),
            "a later write of a"
        );
        assert_eq!(
            pending.get(0, b"b").unwrap(),
            None,
            "durable: the store answers"
        );
        pending.durable_up_to(second.last);
        assert_eq!(pending.get(0, b"a").unwrap(), None);
    }
}
