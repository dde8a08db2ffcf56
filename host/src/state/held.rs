//! The keyed state of the partitions a worker holds, in memory: what a store shared by
//! several workers (Redis in cluster mode, the changelog topic in exactly-once mode) loads
//! when the worker takes a partition's state over, reads from, and keeps up to date with
//! the writes it makes durable. One partition's state is held by one worker at a time, with
//! an epoch: the store refuses writes of an epoch that is not the partition's latest.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use super::StateError;
use super::keyed::{KeyedEntry, KeyedRead, KeyedWrite, decode_value, encode_value, is_host_key};
use crate::clock::now_ms;

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A partition's stored values by key.
pub(crate) type Values = Map<Vec<u8>, Vec<u8>>;

/// The keyed state of the partitions this worker holds, in memory.
#[derive(Default)]
pub(crate) struct HeldPartitions {
    held: Mutex<Map<i32, Held>>,
}

/// One partition's state as this worker holds it.
struct Held {
    /// The assignment it was taken over for (`Ack::partitions`).
    assignment: u64,
    epoch: u64,
    /// Given up or taken by another worker: writes under `epoch` are refused.
    lost: bool,
    /// Key → stored value.
    values: Values,
    /// How many values there were after expired ones were last dropped.
    swept: usize,
}

/// Expired values are dropped from memory whenever a partition's values have doubled since
/// the last time, from this many on (amortized: a constant cost per write).
const SWEEP_FROM: usize = 4096;

/// What a batch of one partition needs before it runs.
pub(crate) enum Need {
    /// Nothing: it runs under this epoch.
    Runs(u64),
    /// The partition's state taken over (only if nobody else holds it: `only_if_free`).
    Takeover { only_if_free: bool },
}

impl HeldPartitions {
    fn held(&self) -> std::sync::MutexGuard<'_, Map<i32, Held>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What a batch read from `partition` under `assignment` needs: a partition assigned
    /// anew is taken over; one given up is taken again unless another worker has it; a
    /// batch read under an earlier assignment runs under the current epoch (its records'
    /// claims and the epoch's check decide).
    pub(crate) fn need(&self, partition: i32, assignment: u64) -> Need {
        match self.held().get(&partition) {
            Some(held) if held.assignment >= assignment && !held.lost => Need::Runs(held.epoch),
            Some(held) if held.assignment >= assignment => Need::Takeover { only_if_free: true },
            _ => Need::Takeover {
                only_if_free: false,
            },
        }
    }

    /// The epoch of `partition` as held (0: never held: its writes are refused).
    pub(crate) fn epoch(&self, partition: i32) -> u64 {
        self.held().get(&partition).map_or(0, |held| held.epoch)
    }

    /// `partition`'s state, just taken over under `epoch` and loaded.
    pub(crate) fn install(&self, partition: i32, assignment: u64, epoch: u64, values: Values) {
        let held = Held {
            assignment,
            epoch,
            lost: false,
            swept: values.len(),
            values,
        };
        self.held().insert(partition, held);
    }

    /// The store took a batch's `writes` to `partition` under `epoch`.
    pub(crate) fn apply(&self, partition: i32, epoch: u64, writes: &[&KeyedWrite]) {
        let mut held = self.held();
        // Taken over again since: what it loaded has them already.
        let Some(held) = held.get_mut(&partition).filter(|h| h.epoch == epoch) else {
            return;
        };
        for write in writes {
            match &write.value {
                Some(value) => {
                    let stored = encode_value(value, write.expires_ms);
                    held.values.insert(write.key.clone(), stored);
                }
                None => {
                    held.values.remove(&write.key);
                }
            }
        }
        if held.values.len() >= SWEEP_FROM.max(2 * held.swept) {
            let now = now_ms() as u64;
            held.values
                .retain(|_, stored| decode_value(stored, now).is_some());
            held.swept = held.values.len();
        }
    }

    /// The store refused a batch of `partition` under `epoch`: the state is not ours any more.
    pub(crate) fn lose(&self, partition: i32, epoch: u64) {
        if let Some(held) = self.held().get_mut(&partition).filter(|h| h.epoch == epoch) {
            held.lost = true;
        }
    }
}

impl KeyedRead for HeldPartitions {
    fn get(&self, partition: i32, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        let held = self.held();
        let Some(held) = held.get(&partition) else {
            return Err(StateError::new(format!(
                "the keyed state of partition {partition} is not held by this worker"
            )));
        };
        let now = now_ms() as u64;
        Ok((held.values.get(key)).and_then(|stored| decode_value(stored, now).map(<[u8]>::to_vec)))
    }

    /// What this worker holds (the partitions it took over and has not lost).
    fn entries(&self) -> Result<Vec<KeyedEntry>, StateError> {
        let now = now_ms() as u64;
        let held = self.held();
        let mut entries: Vec<KeyedEntry> = (held.iter())
            .filter(|(_, h)| !h.lost)
            .flat_map(|(&partition, h)| {
                (h.values.iter())
                    .filter(|(key, _)| !is_host_key(key))
                    .filter_map(move |(key, stored)| {
                        KeyedEntry::live(partition, key.clone(), stored, now)
                    })
            })
            .collect();
        entries.sort_by(|a, b| (a.partition, &a.key).cmp(&(b.partition, &b.key)));
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(key: &str, value: Option<&str>) -> KeyedWrite {
        KeyedWrite {
            partition: 3,
            key: key.into(),
            value: value.map(Into::into),
            expires_ms: None,
        }
    }

    #[test]
    fn a_partition_is_taken_over_when_assigned_anew_and_again_only_if_free_once_lost() {
        let state = HeldPartitions::default();
        assert!(matches!(
            state.need(3, 1),
            Need::Takeover {
                only_if_free: false
            }
        ));
        let mut values = Values::default();
        values.insert(b"k".to_vec(), encode_value(b"v", None));
        values.insert(b"old".to_vec(), encode_value(b"x", Some(1)));
        state.install(3, 1, 7, values);
        assert_eq!(state.get(3, b"k").unwrap(), Some(b"v".to_vec()));
        assert_eq!(state.get(3, b"old").unwrap(), None, "expired");
        assert!(state.get(4, b"k").is_err(), "a partition not held");
        assert!(matches!(state.need(3, 1), Need::Runs(7)));
        assert!(
            matches!(state.need(3, 0), Need::Runs(7)),
            "a batch of an earlier assignment"
        );
        assert!(matches!(
            state.need(3, 2),
            Need::Takeover {
                only_if_free: false
            }
        ));

        let (set, delete) = (write("n", Some("1")), write("k", None));
        state.apply(3, 6, &[&set]);
        assert_eq!(state.get(3, b"n").unwrap(), None, "another epoch's batch");
        state.apply(3, 7, &[&set, &delete]);
        assert_eq!(state.get(3, b"n").unwrap(), Some(b"1".to_vec()));
        assert_eq!(state.get(3, b"k").unwrap(), None);
        assert_eq!(state.entries().unwrap().len(), 1);

        state.lose(3, 6);
        assert!(
            matches!(state.need(3, 1), Need::Runs(7)),
            "another epoch's refusal"
        );
        state.lose(3, 7);
        assert!(matches!(
            state.need(3, 1),
            Need::Takeover { only_if_free: true }
        ));
        assert!(
            state.entries().unwrap().is_empty(),
            "what it lost is not shown"
        );
    }

    #[test]
    fn expired_values_leave_memory_as_a_partition_grows_and_host_keys_are_not_shown() {
        let state = HeldPartitions::default();
        state.install(3, 1, 1, Values::default());
        let expired: Vec<KeyedWrite> = (0..SWEEP_FROM - 1)
            .map(|i| KeyedWrite {
                expires_ms: Some(1),
                ..write(&format!("old/{i}"), Some("1"))
            })
            .collect();
        state.apply(3, 1, &expired.iter().collect::<Vec<_>>());
        let mark = super::super::keyed::DoneMarks::default().mark(3, "e1", 0);
        state.apply(3, 1, &[&mark]);
        let held = |p: i32| state.held().get(&p).map_or(0, |h| h.values.len());
        assert_eq!(held(3), 1, "the expired values were dropped");
        assert_eq!(state.get(3, &mark.key).unwrap(), Some(b"1".to_vec()));
        assert!(
            state.entries().unwrap().is_empty(),
            "the done mark is the host's"
        );
    }
}
