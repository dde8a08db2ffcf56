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

use std::sync::Arc;

use crate::clock::now_ms;
use crate::state::StateError;
use crate::state::held::{HeldPartitions, Values};
use crate::state::keyed::{KeyedEntry, KeyedWrite, decode_value, encode_value};

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

/// Where a plugin's keyed state lives in Redis, and the partitions of it this worker holds.
pub(super) struct KeyedState {
    /// `weir:<ns>:keyed:<plugin>`
    prefix: String,
    pub(super) held: Arc<HeldPartitions>,
}

impl KeyedState {
    pub(super) fn new(namespace: &str, plugin: &str) -> Self {
        Self {
            prefix: keyed_prefix(namespace, plugin),
            held: Arc::default(),
        }
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
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loaded_page_leaves_expired_values_out_and_a_delete_goes_as_an_empty_value() {
        let mut values = Values::default();
        let page = [b"k".to_vec(), encode_value(b"v", None)];
        let expired = [b"old".to_vec(), encode_value(b"x", Some(1))];
        load_page([page, expired].concat(), &mut values);
        assert_eq!(values.len(), 1);
        assert_eq!(values.get(&b"k"[..]), Some(&encode_value(b"v", None)));
        let delete = KeyedWrite {
            partition: 3,
            key: b"k".to_vec(),
            value: None,
            expires_ms: None,
        };
        assert_eq!(stored(&delete), Vec::<u8>::new());
    }
}
