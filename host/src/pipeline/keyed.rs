//! A stateful plugin's accepted writes between the plugin and their done marks.
//!
//! The transform stage hands the plugin a reader that sees these pending writes over the
//! store's durable state, so each record reads the writes of every record accepted before
//! it, in its batch and in the batches still being written. A batch's writes travel with it
//! (in the order they were accepted) to its completion, which makes them durable with the
//! batch's done marks, batches in order ([`Turn`](crate::state::Turn)); then they leave
//! the pending set.
//!
//! When this process is the store's only writer (the embedded store), the values it wrote
//! stay in a bounded cache once durable, and so do keys the store does not have, so a hot
//! key costs no store read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::clock::now_ms;
use crate::state::StateError;
use crate::state::keyed::{KeyedRead, KeyedWrite, Slot};

/// Durable values kept in memory at most (then the cache starts again empty).
const CACHED_ENTRIES: usize = 100_000;

type Map<V> = HashMap<Slot, V, foldhash::fast::RandomState>;

/// Accepted writes not yet durable, over the durable state.
pub(super) struct Pending {
    durable: Arc<dyn KeyedRead>,
    /// Whether durable values may be cached (no other writer changes them).
    cache: bool,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The latest pending write of each (partition, key), with its sequence number.
    latest: Map<(u64, KeyedWrite)>,
    /// Durable values written here, and keys known absent (`None`), when caching.
    cached: Map<Option<KeyedWrite>>,
    /// The writes accepted for the batch in the transform stage, in order.
    batch: Vec<KeyedWrite>,
    /// The number of the last write accepted.
    seq: u64,
}

/// A batch's writes, in the order they were accepted, the number of its last one, and
/// the epochs of the partitions' state it ran under ([`crate::state::Ownership`]).
#[derive(Default)]
pub(super) struct BatchWrites {
    pub writes: Vec<KeyedWrite>,
    pub last: u64,
    pub epochs: Vec<(i32, u64)>,
}

impl Pending {
    pub(super) fn new(durable: Arc<dyn KeyedRead>) -> Self {
        Self {
            cache: durable.sole_writer(),
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
            epochs: Vec::new(),
        }
    }

    /// The state of `partitions` was taken over anew: the pending writes there (of batches
    /// that ran under an earlier epoch, which the store will refuse) are read no more.
    pub(super) fn forget(&self, partitions: &[i32]) {
        if partitions.is_empty() {
            return;
        }
        let mut inner = self.lock();
        let Inner { latest, cached, .. } = &mut *inner;
        latest.retain(|(partition, _), _| !partitions.contains(partition));
        cached.retain(|(partition, _), _| !partitions.contains(partition));
    }

    /// Every write up to number `last` is durable: the store answers for them now (or the
    /// cache, which keeps them).
    pub(super) fn durable_up_to(&self, last: u64) {
        let mut inner = self.lock();
        let Inner { latest, cached, .. } = &mut *inner;
        latest.retain(|slot, (seq, write)| {
            if *seq > last {
                return true;
            }
            if self.cache {
                cached.insert(slot.clone(), Some(write.clone()));
            }
            false
        });
        if cached.len() > CACHED_ENTRIES {
            cached.clear();
        }
    }
}

impl KeyedRead for Pending {
    fn get(&self, partition: i32, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        let slot = (partition, key.to_vec());
        {
            let inner = self.lock();
            if let Some((_, write)) = inner.latest.get(&slot) {
                return Ok(write.live_value(now_ms() as u64));
            }
            if let Some(known) = inner.cached.get(&slot) {
                return Ok(known.as_ref().and_then(|w| w.live_value(now_ms() as u64)));
            }
        }
        let value = self.durable.get(partition, key)?;
        // An absent key is cached (it cannot expire); a value read back is not (its expiry
        // is the store's), only values written here, once durable.
        if self.cache && value.is_none() {
            let mut inner = self.lock();
            // A write accepted meanwhile wins over what was read.
            if !inner.latest.contains_key(&slot) {
                inner.cached.insert(slot, None);
            }
        }
        Ok(value)
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

    #[test]
    fn pending_writes_of_a_partition_taken_over_anew_are_forgotten() {
        let pending = Pending::new(Arc::new(NoState));
        let mut other = set("a", "other");
        other.partition = 1;
        pending.accept(vec![set("a", "1"), other]);
        let batch = pending.take_batch();
        pending.forget(&[0]);
        assert_eq!(
            pending.get(0, b"a").unwrap(),
            None,
            "the store answers again"
        );
        assert_eq!(pending.get(1, b"a").unwrap(), Some(b"other".to_vec()));
        assert_eq!(batch.writes.len(), 2, "the batch still carries its writes");
        pending.durable_up_to(batch.last);
        assert_eq!(pending.get(1, b"a").unwrap(), None);
    }

    /// A store with one key, counting its reads, and (like the embedded store) this
    /// process as its only writer.
    #[derive(Default)]
    struct Counted(std::sync::atomic::AtomicU64);

    impl KeyedRead for Counted {
        fn get(&self, _partition: i32, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok((key == b"stored").then(|| b"s".to_vec()))
        }

        fn sole_writer(&self) -> bool {
            true
        }
    }

    #[test]
    fn with_one_writer_durable_writes_and_absent_keys_are_cached() {
        let store = Arc::new(Counted::default());
        let reads = || store.0.load(std::sync::atomic::Ordering::Relaxed);
        let pending = Pending::new(store.clone());
        pending.accept(vec![set("a", "1")]);
        pending.durable_up_to(pending.take_batch().last);
        assert_eq!(pending.get(0, b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(reads(), 0, "a durable write of this process is cached");
        assert_eq!(pending.get(0, b"none").unwrap(), None);
        assert_eq!(pending.get(0, b"none").unwrap(), None);
        assert_eq!(reads(), 1, "an absent key is read once");
        assert_eq!(pending.get(0, b"stored").unwrap(), Some(b"s".to_vec()));
        assert_eq!(pending.get(0, b"stored").unwrap(), Some(b"s".to_vec()));
        assert_eq!(
            reads(),
            3,
            "a value read back is not cached (its expiry is the store's)"
        );
        pending.accept(vec![set("none", "now")]);
        assert_eq!(pending.get(0, b"none").unwrap(), Some(b"now".to_vec()));
    }
}
