//! Plugins' keyed state in Redis (cluster mode on one Redis server).
//!
//! Layout, for pipeline `<ns>` and plugin name `<plugin>`: per input partition `P` a hash
//! `weir:<ns>:keyed:<plugin>:<P>` (key → value in `state::keyed`'s stored form, with its
//! expiry) and its owner `…:<P>:owner` (`<worker>|<epoch>`); the set
//! `weir:<ns>:keyed:<plugin>:partitions` names the partitions that have state.
//!
//! One worker holds a partition's state at a time. A worker assigned a partition anew takes
//! its state over ([`TAKE`]: the epoch goes up and the owner becomes this worker), then
//! loads the whole hash into memory and reads only there ([`KeyedState`]): nobody else may
//! change it meanwhile. A batch's writes go to Redis in the script that marks its records
//! done ([`FINISH_KEYED`]), and only while the partition's owner is still this worker with
//! the epoch the batch ran under: a worker that lost the partition, even one that does not
//! know it yet, can change neither the state its successor loaded nor the done marks of
//! that partition's records, which its successor processes again. A partition's records
//! of a batch finish all or none; a record whose lease went to another worker under our
//! epoch (a duplicate id in another partition, taken after our lease ran out) makes the
//! script give the partition's state up (its later batches read that record's writes), and
//! the worker takes it over again, from Redis, for its next batch there.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::clock::now_ms;
use crate::state::StateError;
use crate::state::keyed::{KeyedEntry, KeyedRead, KeyedWrite, decode_value, encode_value};

/// Takes a partition's state over: `KEYS[1]` its owner, `KEYS[2]` the set of partitions;
/// `ARGV[1]` this worker, `ARGV[2]` 1 to take it only if nobody holds it (or we do),
/// `ARGV[3]` the partition. Returns the new epoch, or 0 when another worker holds it.
pub(super) const TAKE: &str = r"
local holder, epoch = string.match(redis.call('GET', KEYS[1]) or '|0', '^(.*)|(%d+)$')
if ARGV[2] == '1' and holder ~= '' and holder ~= ARGV[1] then
  return 0
end
local next = tonumber(epoch) + 1
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. next)
redis.call('SADD', KEYS[2], ARGV[3])
return next
";

/// A page of a hash: `KEYS[1]`, from cursor `ARGV[1]`; the next cursor and fields and values.
pub(super) const PAGE: &str = r"
return redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', 1000)
";

/// `FINISH` with keyed state. `KEYS[4..]`: per partition its hash and its owner. `ARGV[4]`:
/// the number of partitions; then per partition its epoch, its number of writes and the
/// writes (key, stored value; an empty value deletes); then id, fence, partition number
/// triples. Returns per id 1 (done with its fence) or 0, then per partition 1 (its writes
/// applied, its records marked) or 0 (refused: another worker holds its state, or one of
/// its records went to another worker).
pub(super) const FINISH_KEYED: &str = r"
local k, at = tonumber(ARGV[4]), 5
local parts = {}
for j = 1, k do
  local epoch, n = ARGV[at], tonumber(ARGV[at + 1])
  local ours = redis.call('GET', KEYS[3 + 2 * j]) == owner .. '|' .. epoch
  parts[j] = {epoch = epoch, from = at + 2, n = n, ours = ours}
  at = at + 2 + 2 * n
end
local ids, fences, of = {}, {}, {}
for i = at, #ARGV, 3 do
  ids[#ids + 1] = ARGV[i]
  fences[#fences + 1] = ARGV[i + 1]
  of[#of + 1] = tonumber(ARGV[i + 2])
end
local verdicts = judge(ids, fences)
-- A partition's records finish all or none: one that went elsewhere under our epoch gives
-- the state up (the batches after it read its writes).
for i = 1, #ids do
  local p = parts[of[i]]
  if p.ours and not verdicts[i] then
    p.ours = false
    redis.call('SET', KEYS[3 + 2 * of[i]], '|' .. p.epoch)
  end
end
for j = 1, k do
  local p = parts[j]
  if p.ours then
    local hash, sets = KEYS[2 + 2 * j], {}
    for w = p.from, p.from + 2 * p.n - 1, 2 do
      if ARGV[w + 1] == '' then
        bulk('HSET', hash, sets)
        sets = {}
        redis.call('HDEL', hash, ARGV[w])
      else
        sets[#sets + 1] = ARGV[w]
        sets[#sets + 1] = ARGV[w + 1]
      end
    end
    bulk('HSET', hash, sets)
  end
end
-- The refused records: not done, and our leases on them go at once.
local release = {}
for i = 1, #ids do
  if not parts[of[i]].ours then
    if verdicts[i] == 'lease' then
      release[#release + 1] = ids[i]
    end
    verdicts[i] = false
  end
end
local out = mark(ids, fences, verdicts)
if #release > 0 then
  leases_only_here(true)
  bulk('HDEL', KEYS[2], release)
end
for j = 1, k do
  out[#out + 1] = parts[j].ours and 1 or 0
end
return out
";

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A partition's stored values by key.
pub(super) type Values = Map<Vec<u8>, Vec<u8>>;

/// The keyed state of the partitions this worker holds, in memory.
pub(super) struct KeyedState {
    /// `weir:<ns>:keyed:<plugin>`
    prefix: String,
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
}

/// What a batch of one partition needs before it runs.
pub(super) enum Need {
    /// Nothing: it runs under this epoch.
    Runs(u64),
    /// The partition's state taken over (only if nobody else holds it: `only_if_free`).
    Takeover { only_if_free: bool },
}

impl KeyedState {
    pub(super) fn new(namespace: &str, plugin: &str) -> Self {
        Self {
            prefix: keyed_prefix(namespace, plugin),
            held: Mutex::default(),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Map<i32, Held>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The hash of `partition`'s state.
    pub(super) fn hash(&self, partition: i32) -> String {
        format!("{}:{partition}", self.prefix)
    }

    /// The key naming `partition`'s owner and epoch.
    pub(super) fn owner(&self, partition: i32) -> String {
        format!("{}:{partition}:owner", self.prefix)
    }

    /// The set of partitions with state.
    pub(super) fn partitions(&self) -> String {
        partitions_key(&self.prefix)
    }

    /// What a batch read from `partition` under `assignment` needs: a partition assigned
    /// anew is taken over; one given up is taken again unless another worker has it; a
    /// batch read under an earlier assignment runs under the current epoch (its records'
    /// claims and the epoch's check decide).
    pub(super) fn need(&self, partition: i32, assignment: u64) -> Need {
        match self.held().get(&partition) {
            Some(held) if held.assignment >= assignment && !held.lost => Need::Runs(held.epoch),
            Some(held) if held.assignment >= assignment => Need::Takeover { only_if_free: true },
            _ => Need::Takeover {
                only_if_free: false,
            },
        }
    }

    /// The epoch of `partition` as held (0: never held: its writes are refused).
    pub(super) fn epoch(&self, partition: i32) -> u64 {
        self.held().get(&partition).map_or(0, |held| held.epoch)
    }

    /// `partition`'s state, just taken over under `epoch` and loaded.
    pub(super) fn install(&self, partition: i32, assignment: u64, epoch: u64, values: Values) {
        let held = Held {
            assignment,
            epoch,
            lost: false,
            values,
        };
        self.held().insert(partition, held);
    }

    /// Redis took a batch's `writes` to `partition` under `epoch`.
    pub(super) fn apply(&self, partition: i32, epoch: u64, writes: &[&KeyedWrite]) {
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
    }

    /// Redis refused a batch of `partition` under `epoch`: the state is not ours any more.
    pub(super) fn lose(&self, partition: i32, epoch: u64) {
        if let Some(held) = self.held().get_mut(&partition).filter(|h| h.epoch == epoch) {
            held.lost = true;
        }
    }
}

/// A partition's state as loaded: stored values by key, the expired ones left out.
/// Adds a page of a loaded hash (fields and values, one after the other) to `into`, the
/// expired values left out.
pub(super) fn load_page(page: Vec<Vec<u8>>, into: &mut Values) {
    let now = now_ms() as u64;
    let mut page = page.into_iter();
    while let (Some(key), Some(stored)) = (page.next(), page.next()) {
        if decode_value(&stored, now).is_some() {
            into.insert(key, stored);
        }
    }
}

/// The stored form of a batch's write, as `FINISH_KEYED` takes it (empty: delete).
pub(super) fn stored(write: &KeyedWrite) -> Vec<u8> {
    (write.value.as_ref()).map_or_else(Vec::new, |v| encode_value(v, write.expires_ms))
}

/// The live keyed state of `plugin` in `pipeline`, read from Redis at `target` (`weir
/// state`); entries in key order, one partition after another.
pub async fn read_redis_keyed_state(
    target: &super::RedisTarget,
    pipeline: &str,
    plugin: &str,
) -> Result<Vec<KeyedEntry>, StateError> {
    let cannot = |e| StateError::caused_by(format!("cannot read keyed state from {target}"), e);
    let mut conn = target.connect().await.map_err(cannot)?;
    let prefix = keyed_prefix(pipeline, plugin);
    let mut partitions: Vec<i32> = redis::cmd("SMEMBERS")
        .arg(partitions_key(&prefix))
        .query_async(&mut conn)
        .await
        .map_err(cannot)?;
    partitions.sort_unstable();
    let now = now_ms() as u64;
    let mut entries = Vec::new();
    for partition in partitions {
        let mut values: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(format!("{prefix}:{partition}"))
            .query_async(&mut conn)
            .await
            .map_err(cannot)?;
        values.sort_unstable();
        entries.extend(
            (values.into_iter())
                .filter_map(|(key, stored)| KeyedEntry::live(partition, key, &stored, now)),
        );
    }
    Ok(entries)
}

/// `weir:<ns>:keyed:<plugin>`: where a pipeline's plugin keeps its state.
fn keyed_prefix(namespace: &str, plugin: &str) -> String {
    format!("weir:{namespace}:keyed:{plugin}")
}

fn partitions_key(prefix: &str) -> String {
    format!("{prefix}:partitions")
}

impl KeyedRead for KeyedState {
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
                (h.values.iter()).filter_map(move |(key, stored)| {
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
        let state = KeyedState::new("p", "metrics");
        assert!(matches!(
            state.need(3, 1),
            Need::Takeover {
                only_if_free: false
            }
        ));
        let mut values = Values::default();
        load_page(
            vec![
                b"k".to_vec(),
                encode_value(b"v", None),
                b"old".to_vec(),
                encode_value(b"x", Some(1)),
            ],
            &mut values,
        );
        state.install(3, 1, 7, values);
        assert_eq!(state.get(3, b"k").unwrap(), Some(b"v".to_vec()));
        assert_eq!(state.get(3, b"old").unwrap(), None, "expired: not loaded");
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
        assert_eq!(
            stored(&delete),
            Vec::<u8>::new(),
            "a delete goes as an empty value"
        );
    }
}
