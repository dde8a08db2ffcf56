//! The Redis state store for cluster mode: per-record leases with fencing tokens, and done
//! marks, in one Redis server or a Redis Cluster.
//!
//! Layout. The ids of a pipeline `<ns>` fall into buckets by the CRC16 of the id (one bucket
//! on a server; on a cluster, as many as configured, [`DEFAULT_CLUSTER_BUCKETS`] unless
//! said otherwise). A bucket is three keys with one hash tag,
//! so they live in one slot and one Lua script may touch them all: `weir:<ns>:{<tag>}:leases`
//! (a hash: id → lease), `…:done` (a hash: id → the fence that finished it; with a done TTL,
//! one hash per quarter of the TTL, `…:done:<window>`, dropped whole once its marks are
//! older than the TTL, so a mark lives between 1 and 1.25 TTLs) and `…:fence` (the counter
//! of fencing tokens). The tags spread the buckets evenly over the 16384 slots, so over the
//! masters of a cluster. An id seen on any partition is in its one bucket, so dedup stays
//! per pipeline.
//!
//! Each batch costs one script per bucket it touches in each direction, sent at once (one
//! round trip per node, in parallel): `claim` (one `HMGET` of the done marks and of the
//! leases, one `HSET` of the new leases, one fence for all of them) and `finish` (one `HMGET`
//! each, one `HSET` of the marks, one `HDEL` of the leases). A finish counts where the lease
//! was still ours, even past its deadline or gone, with nobody having taken the record
//! since, so a worker that stalled unseen past its TTL completes its durable work; another
//! worker's lease or done mark is left as it is. One more script renews or releases leases,
//! again only where they are still ours.
//!
//! A lease holds its deadline (Redis time) and the number of leases of the record that ran
//! out before (`<owner>|<fence>|<deadline>|<deaths>`): a claim past the deadline takes the
//! record over and returns the count, so crash-loop protection learns which records a dead
//! worker had in flight at no extra cost. The leases hash lives 20 lease TTLs past its last
//! claim or renewal. Leases are kept in the master's memory only, out of the AOF and of
//! replication (a third of the writes of a record, and the bulk of its bytes): a Redis
//! restart or failover drops them, so a record in flight then may be processed twice, never
//! lost, and its worker still finishes it (a lease gone with nobody on it since is still
//! its). Its `CrashLog` is the hash `weir:<ns>:crashes` of the records a worker
//! died with in the plugin (kept only for a dead worker's records, which run one at a time).
//!
//! Fences rise per bucket and never fall below Redis's clock in ms × 1000, so they keep
//! rising across a restart without AOF and across a cluster failover that lost the last
//! increments (a bucket would need a thousand claims in one millisecond to outrun it).
//! Needs Redis 7.0 or later.
//!
//! Plugins' keyed state (`keyed.rs`, one server only): per partition a hash held by one
//! worker at a time, with an epoch; a batch's writes go in the same script as its done marks
//! (`FINISH_KEYED`, which shares `judge` and `mark` with `FINISH`).
//!
//! A Redis outage (or a cluster's failover) pauses the worker instead of stopping it: every
//! call has a response timeout and is retried with backoff until Redis answers
//! (`weir_circuit_open{dependency="redis"}` is 1 meanwhile). Retrying is safe because every
//! script is idempotent for its owner: a claim re-finds the owner's own leases, and a finish
//! whose first attempt did land finds the done mark with its fence.

mod keyed;
mod target;

pub use keyed::read_redis_keyed_state;
pub use target::{RedisConnection, RedisTarget, is_transient};

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::future::join_all;
use prometheus::IntGauge;
use redis::Script;

use super::held::{Need, Values};
use super::keyed::KeyedRead;
use super::{Claim, Commit, CrashLog, Ownership, StateError, StateStore, Turn};
use keyed::KeyedState;
use target::MAX_RETRY_DELAY;

/// Buckets on a Redis Cluster unless configured: up to this many masters share the work.
pub const DEFAULT_CLUSTER_BUCKETS: usize = 16;

// Every bucket script gets `KEYS` = the fence counter, the leases hash, the done hash (its
// base name), and `ARGV` = owner, done TTL in ms (0: forever), lease TTL in ms, then ids
// (claim) or id, fence pairs (the rest).

/// Redis's clock in ms; leases (`<owner>|<fence>|<deadline ms>|<deaths>`: the owner's until
/// the deadline; after it, the next claim takes the record over and adds one to `deaths`,
/// the workers that died or stalled with it in flight); the done hashes; bulk writes.
const COMMON: &str = r"
local KEEP, WINDOWS, CHUNK = 20, 4, 1000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local owner, done_ttl, lease_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
-- (Numbers shown as text once per call: formatting them is a good part of the cost.)
local until_then = '|' .. (now + lease_ttl) .. '|'
local function lease(fence, deaths)
  return owner .. '|' .. fence .. until_then .. deaths
end
-- Leases live in this master's memory only: not in the AOF, not replicated (a restart or
-- a failover drops them, and the records in flight then may be processed twice); done
-- marks and fences are written through.
local function leases_only_here(on)
  redis.set_repl(on and redis.REPL_NONE or redis.REPL_ALL)
end
-- owner, fence, deadline, deaths of a lease
local function parse(value)
  local holder, fence, deadline, deaths = string.match(value, '^(.*)|(%d+)|(%d+)|(%d+)$')
  return holder, fence, tonumber(deadline), tonumber(deaths)
end
-- The done hashes to look in (newest first, the first takes new marks) and its expiry.
local function done_hashes()
  if done_ttl == 0 then
    return {KEYS[3]}, nil
  end
  local width = math.ceil(done_ttl / WINDOWS)
  local w = math.floor(now / width)
  local hashes = {}
  for i = 0, WINDOWS do
    hashes[i + 1] = KEYS[3] .. ':' .. (w - i)
  end
  return hashes, (w + WINDOWS + 1) * width
end
-- `command key items...`, CHUNK items at a time (unpack has a limit).
local function bulk(command, key, items)
  for i = 1, #items, CHUNK do
    redis.call(command, key, unpack(items, i, math.min(i + CHUNK - 1, #items)))
  end
end
-- The values of `fields` in hash `key`.
local function hmget(key, fields)
  local out = {}
  for i = 1, #fields, CHUNK do
    local part = redis.call('HMGET', key, unpack(fields, i, math.min(i + CHUNK - 1, #fields)))
    for j = 1, #part do
      out[i + j - 1] = part[j]
    end
  end
  return out
end
-- The done mark of each of `ids` (false where none).
local function marks(ids)
  local found = {}
  for _, h in ipairs((done_hashes())) do
    local m = hmget(h, ids)
    for i = 1, #ids do
      found[i] = found[i] or m[i]
    end
  end
  return found
end
-- ids and fences of ARGV's id, fence pairs
local function pairs_of_argv()
  local ids, fences = {}, {}
  for i = 4, #ARGV, 2 do
    ids[#ids + 1] = ARGV[i]
    fences[#fences + 1] = ARGV[i + 1]
  end
  return ids, fences
end
-- Whether each id may be marked done with its fence: 'lease' (our lease is there), 'free'
-- (no lease and no mark: nobody took it since), 'marked' (done already with its fence: a
-- retried call) or false (another worker's lease or done mark). Done marks are only looked
-- up where no lease is: while ours is there, nobody else can have marked the record.
local function judge(ids, fences)
  local held = hmget(KEYS[2], ids)
  local unleased, at = {}, {}
  for i = 1, #ids do
    if not held[i] then
      unleased[#unleased + 1] = ids[i]
      at[#at + 1] = i
    end
  end
  local marked = {}
  if #unleased > 0 then
    local found = marks(unleased)
    for j, i in ipairs(at) do
      marked[i] = found[j]
    end
  end
  local verdicts, prefixes = {}, {}
  for i = 1, #ids do
    if held[i] then
      -- A batch's leases mostly share one fence: its prefix is made once.
      local prefix = prefixes[fences[i]]
      if not prefix then
        prefix = owner .. '|' .. fences[i] .. '|'
        prefixes[fences[i]] = prefix
      end
      verdicts[i] = string.sub(held[i], 1, #prefix) == prefix and 'lease'
    elseif marked[i] then
      verdicts[i] = marked[i] == fences[i] and 'marked'
    else
      verdicts[i] = 'free'
    end
  end
  return verdicts
end
-- Marks done the ids judged 'lease' or 'free' and frees their leases; per id 1 where it is
-- done with its fence now, else 0.
local function mark(ids, fences, verdicts)
  local writes, freed, out = {}, {}, {}
  for i = 1, #ids do
    local v = verdicts[i]
    if v == 'lease' or v == 'free' then
      writes[#writes + 1] = ids[i]
      writes[#writes + 1] = fences[i]
      if v == 'lease' then
        freed[#freed + 1] = ids[i]
      end
    end
    out[i] = v and 1 or 0
  end
  if #writes > 0 then
    local hashes, expiry = done_hashes()
    bulk('HSET', hashes[1], writes)
    if expiry then
      redis.call('PEXPIREAT', hashes[1], expiry)
    end
  end
  if #freed > 0 then
    leases_only_here(true)
    bulk('HDEL', KEYS[2], freed)
  end
  return out
end
";

/// Leases what nobody holds; returns a claim per id (-1 done, 0 held elsewhere, else the
/// fence), then its deaths per id.
const CLAIM: &str = r"
local ids = {}
for i = 4, #ARGV do
  ids[#ids + 1] = ARGV[i]
end
local n = #ids
local done, held = marks(ids), hmget(KEYS[2], ids)
-- One fencing token for every lease this call takes: above every earlier one. As text:
-- Lua shows a number of more than 14 digits in exponent form.
-- Made once per call: the fence (text and number) and a fresh lease's value.
local fence, fence_n, fresh
local function take()
  if not fence then
    fence_n = math.max(tonumber(redis.call('GET', KEYS[1]) or 0) + 1, now * 1000)
    fence = string.format('%.0f', fence_n)
    fresh = lease(fence, 0)
    redis.call('SET', KEYS[1], fence)
  end
  return fence
end
local writes, out = {}, {}
for i = 1, n do
  local deaths = 0
  if done[i] then
    out[i] = -1
  elseif not held[i] then
    take()
    writes[#writes + 1] = ids[i]
    writes[#writes + 1] = fresh
    out[i] = fence_n
  else
    local holder, f, deadline, died = parse(held[i])
    if holder == owner then
      out[i], deaths = tonumber(f), died
      writes[#writes + 1] = ids[i]
      writes[#writes + 1] = lease(f, died)
    elseif deadline < now then
      -- Its holder died or stalled with it in flight: ours now.
      deaths = died + 1
      writes[#writes + 1] = ids[i]
      writes[#writes + 1] = lease(take(), deaths)
      out[i] = fence_n
    else
      out[i] = 0
    end
  end
  out[n + i] = deaths
end
if #writes > 0 then
  leases_only_here(true)
  bulk('HSET', KEYS[2], writes)
  redis.call('PEXPIRE', KEYS[2], lease_ttl * KEEP)
end
return out
";

/// Marks done where the lease is still ours (or gone with nobody on it since); 1 per such
/// id (or one already marked with its fence: a retried call), 0 where another worker's
/// lease or done mark is.
const FINISH: &str = r"
local ids, fences = pairs_of_argv()
return mark(ids, fences, judge(ids, fences))
";

/// Renews (`ARGV[2]` 1) or releases (0) leases, each only if still this owner's with that
/// fence.
const KEEP_OR_RELEASE: &str = r"
local renew = done_ttl > 0 -- ARGV[2] here: 1 renews, 0 releases
leases_only_here(true)
local ids, fences = pairs_of_argv()
local held = hmget(KEYS[2], ids)
local writes, freed, out = {}, {}, {}
for i = 1, #ids do
  out[i] = 0
  if held[i] then
    local holder, f, _, deaths = parse(held[i])
    if holder == owner and f == fences[i] then
      if renew then
        writes[#writes + 1] = ids[i]
        writes[#writes + 1] = lease(f, deaths)
      else
        freed[#freed + 1] = ids[i]
      end
      out[i] = 1
    end
  end
end
if #writes > 0 then
  bulk('HSET', KEYS[2], writes)
  redis.call('PEXPIRE', KEYS[2], lease_ttl * KEEP)
end
if #freed > 0 then
  bulk('HDEL', KEYS[2], freed)
end
return out
";

// The crash log (`CrashLog`): `KEYS[1]` is the hash of crash counts, `ARGV[4..]` the ids.
// A record's count goes up as it enters the plugin and is deleted as it leaves, so what a
// dead worker had in the plugin stays counted.

const CRASHES: &str = r"
local out = {}
for i = 4, #ARGV do
  out[i - 3] = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or 0)
end
return out
";

const ENTER: &str = r"
for i = 4, #ARGV do
  redis.call('HINCRBY', KEYS[1], ARGV[i], 1)
end
return {}
";

const LEAVE: &str = r"
for i = 4, #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[i])
end
return {}
";

/// Leases, done marks and crash counts in Redis.
pub struct RedisStore {
    conn: RedisConnection,
    /// Per bucket: its fence counter, leases hash and done hash.
    buckets: Vec<[String; 3]>,
    crash_log_key: String,
    owner: String,
    lease_ttl: Duration,
    done_ttl: Option<Duration>,
    claim: Script,
    finish: Script,
    keep_or_release: Script,
    crashes: Script,
    enter: Script,
    leave: Script,
    circuit: Option<IntGauge>,
    /// The pipeline's name.
    namespace: String,
    /// The plugin's keyed state, once [`RedisStore::keep_keyed_state`] named it.
    keyed: Option<Arc<KeyedState>>,
    take: Script,
    page: Script,
    finish_keyed: Script,
}

/// Redis Cluster's slot of `key` (CRC16 of the key, or of its `{hash tag}`, modulo 16384).
pub fn slot(key: &str) -> u16 {
    let tagged = key
        .split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map(|(tag, _)| tag)
        .filter(|tag| !tag.is_empty())
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tagged.as_bytes()) % 16384
}

/// `n` hash tags whose slots spread evenly over the 16384 slots: the `k`th lies in the
/// `k`th `n`th of them, so buckets spread evenly over masters holding equal slot ranges.
fn bucket_tags(n: usize) -> Vec<String> {
    (0..n)
        .map(|k| {
            let range = k * 16384 / n..(k + 1) * 16384 / n;
            (0..)
                .map(|i| format!("{k}.{i}"))
                .find(|tag| range.contains(&usize::from(slot(tag))))
                .expect("every range of slots has a tag")
        })
        .collect()
}

impl RedisStore {
    /// Connects to `target`, waiting for it to come up. `owner` names this worker in leases
    /// (unique per process); `namespace` is the pipeline name.
    pub async fn connect(
        target: &RedisTarget,
        namespace: &str,
        owner: &str,
        lease_ttl: Duration,
        done_ttl: Option<Duration>,
    ) -> Result<Self, StateError> {
        if owner.contains('|') {
            return Err(StateError::new(format!(
                "worker id `{owner}` must not contain `|`"
            )));
        }
        let mut delay = Duration::from_millis(200);
        let conn = loop {
            match target.connect().await {
                Ok(conn) => break conn,
                Err(e) if is_transient(&e) => {
                    eprintln!(
                        "weir: waiting for Redis at {target}: {e}; retrying in {:.1} s",
                        delay.as_secs_f64()
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    return Err(StateError::caused_by(
                        format!("cannot connect to Redis at {target}"),
                        e,
                    ));
                }
            }
        };
        let buckets = bucket_tags(target.buckets())
            .into_iter()
            .map(|tag| {
                let key = |what: &str| format!("weir:{namespace}:{{{tag}}}:{what}");
                [key("fence"), key("leases"), key("done")]
            })
            .collect();
        let script = |body: &str| Script::new(&format!("{COMMON}{body}"));
        Ok(Self {
            conn,
            buckets,
            crash_log_key: format!("weir:{namespace}:crashes"),
            owner: owner.to_owned(),
            lease_ttl,
            done_ttl,
            claim: script(CLAIM),
            finish: script(FINISH),
            keep_or_release: script(KEEP_OR_RELEASE),
            crashes: Script::new(CRASHES),
            enter: Script::new(ENTER),
            leave: Script::new(LEAVE),
            circuit: None,
            namespace: namespace.to_owned(),
            keyed: None,
            take: Script::new(keyed::TAKE),
            page: Script::new(keyed::PAGE),
            finish_keyed: script(keyed::FINISH_KEYED),
        })
    }

    /// Keeps the keyed state of the plugin named `plugin` (`keyed.rs`). Needs one Redis
    /// server: on a Redis Cluster a batch's done marks and its state would lie in different
    /// slots, out of reach of one script.
    pub fn keep_keyed_state(mut self, plugin: &str) -> Result<Self, StateError> {
        if self.buckets.len() != 1 {
            return Err(StateError::new(
                "keyed state needs one Redis server, not a Redis Cluster",
            ));
        }
        self.keyed = Some(Arc::new(KeyedState::new(&self.namespace, plugin)));
        Ok(self)
    }

    /// Reports outages on `gauge` (1 while Redis does not answer).
    pub fn with_circuit_gauge(mut self, gauge: IntGauge) -> Self {
        self.circuit = Some(gauge);
        self
    }

    fn ms(d: Duration) -> u64 {
        d.as_millis().max(1) as u64
    }

    /// The bucket of one record.
    fn bucket(&self, id: &str) -> usize {
        if self.buckets.len() == 1 {
            return 0;
        }
        usize::from(crc16::State::<crc16::XMODEM>::calculate(id.as_bytes())) % self.buckets.len()
    }

    /// Runs `script` once per bucket the records fall in, all at once, with the common
    /// arguments (owner, `ttl_ms`, the lease TTL) and each bucket's records' `args` (one
    /// per record, more than one value each); returns per bucket call its records' indices
    /// and the script's answer. While Redis is unavailable, tries the calls that failed
    /// again with backoff until it answers.
    async fn per_bucket<'a, A: redis::ToRedisArgs>(
        &self,
        script: &Script,
        ttl_ms: u64,
        records: impl Iterator<Item = (&'a str, A)>,
        what: &str,
    ) -> Result<Vec<(Vec<usize>, Vec<i64>)>, StateError> {
        let mut calls: Vec<(Vec<usize>, redis::ScriptInvocation)> = Vec::new();
        let mut call_of = vec![usize::MAX; self.buckets.len()];
        for (i, (id, args)) in records.enumerate() {
            let bucket = self.bucket(id);
            if call_of[bucket] == usize::MAX {
                call_of[bucket] = calls.len();
                let mut invocation = script.prepare_invoke();
                for key in &self.buckets[bucket] {
                    invocation.key(key);
                }
                invocation
                    .arg(&self.owner)
                    .arg(ttl_ms)
                    .arg(Self::ms(self.lease_ttl));
                calls.push((Vec::new(), invocation));
            }
            let (indices, invocation) = &mut calls[call_of[bucket]];
            indices.push(i);
            invocation.arg(args);
        }
        let invocations: Vec<&redis::ScriptInvocation> = calls.iter().map(|(_, s)| s).collect();
        let answers = self.run(&invocations, what).await?;
        Ok(calls.into_iter().map(|(i, _)| i).zip(answers).collect())
    }

    /// Runs the invocations at once (each routed to the node of its keys); while Redis is
    /// unavailable, tries those that failed again with backoff until it answers.
    async fn run<T: redis::FromRedisValue>(
        &self,
        invocations: &[&redis::ScriptInvocation<'_>],
        what: &str,
    ) -> Result<Vec<T>, StateError> {
        let mut answers: Vec<Option<T>> = invocations.iter().map(|_| None).collect();
        let mut delay = Duration::from_millis(50);
        let mut outage: Option<std::time::Instant> = None;
        loop {
            let pending: Vec<usize> = (0..answers.len())
                .filter(|&i| answers[i].is_none())
                .collect();
            let tries = pending.iter().map(|&i| {
                let mut conn = self.conn.clone();
                async move { invocations[i].invoke_async::<T>(&mut conn).await }
            });
            let tried = join_all(tries).await;
            let mut failed = None;
            for (&i, answer) in pending.iter().zip(tried) {
                match answer {
                    Ok(out) => answers[i] = Some(out),
                    Err(e) if is_transient(&e) => failed = Some(e),
                    Err(e) => return Err(StateError::caused_by(format!("redis {what}"), e)),
                }
            }
            let Some(e) = failed else {
                if let Some(since) = outage {
                    tracing::warn!(
                        "Redis answers again after {:.1} s; resuming",
                        since.elapsed().as_secs_f64()
                    );
                    self.circuit.iter().for_each(|g| g.set(0));
                }
                return Ok(answers.into_iter().flatten().collect());
            };
            if outage.is_none() {
                tracing::warn!("Redis {what} failed ({e}); pausing and retrying until it answers");
                outage = Some(std::time::Instant::now());
                self.circuit.iter().for_each(|g| g.set(1));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_RETRY_DELAY);
        }
    }

    /// Runs a per-lease script; says per lease whether it was still ours.
    async fn per_lease(
        &self,
        script: &Script,
        ttl_ms: u64,
        leases: &[(String, u64)],
        what: &str,
    ) -> Result<Vec<bool>, StateError> {
        let records = leases.iter().map(|(id, fence)| (id.as_str(), (id, fence)));
        let answers = self.per_bucket(script, ttl_ms, records, what).await?;
        let mut ours = vec![false; leases.len()];
        for (indices, out) in answers {
            check_length(what, &out, indices.len())?;
            for (i, v) in indices.into_iter().zip(out) {
                ours[i] = v == 1;
            }
        }
        Ok(ours)
    }
}

/// An answer of the wrong length is an error, not a panic.
fn check_length(what: &str, out: &[i64], expected: usize) -> Result<(), StateError> {
    if out.len() == expected {
        return Ok(());
    }
    Err(StateError::new(format!(
        "redis {what} answered {} values for {expected}",
        out.len()
    )))
}

impl RedisStore {
    /// Takes `partition`'s keyed state over (only if nobody else holds it, with
    /// `only_if_free`): the new epoch, or `None` when another worker holds it.
    async fn take(
        &self,
        keyed: &KeyedState,
        partition: i32,
        only_if_free: bool,
    ) -> Result<Option<u64>, StateError> {
        let mut invocation = self.take.prepare_invoke();
        (invocation
            .key(keyed.owner(partition))
            .key(keyed.partitions()))
        .arg(&self.owner)
        .arg(u8::from(only_if_free))
        .arg(partition);
        let answers: Vec<u64> = self.run(&[&invocation], "keyed state takeover").await?;
        Ok(answers.first().copied().filter(|&epoch| epoch > 0))
    }

    /// Loads `partition`'s keyed state, page by page.
    async fn load(&self, keyed: &KeyedState, partition: i32) -> Result<Values, StateError> {
        let hash = keyed.hash(partition);
        let mut values = Values::default();
        let mut cursor = "0".to_owned();
        loop {
            let mut invocation = self.page.prepare_invoke();
            invocation.key(&hash).arg(&cursor);
            let mut pages: Vec<(String, Vec<Vec<u8>>)> =
                self.run(&[&invocation], "keyed state load").await?;
            let (next, page) = pages.pop().unwrap_or_default();
            keyed::load_page(page, &mut values);
            if next == "0" || next.is_empty() {
                return Ok(values);
            }
            cursor = next;
        }
    }

    /// Marks a batch done with its keyed-state writes (`keyed::FINISH_KEYED`), on the
    /// batch's turn; per id whether it is done with its fence.
    async fn finish_keyed(
        &self,
        keyed: &KeyedState,
        done: &[(String, u64)],
        commit: Commit,
        mut turn: Turn,
    ) -> Result<Vec<bool>, StateError> {
        let Commit {
            writes,
            partitions,
            mut epochs,
            ..
        } = commit;
        // Every partition a record or a write is in (one the batch did not run under has
        // epoch 0, which is never ours).
        for &p in partitions.iter().chain(writes.iter().map(|w| &w.partition)) {
            if !epochs.iter().any(|&(q, _)| q == p) {
                epochs.push((p, 0));
            }
        }
        let by_partition: Vec<Vec<&super::keyed::KeyedWrite>> = (epochs.iter())
            .map(|&(p, _)| writes.iter().filter(|w| w.partition == p).collect())
            .collect();
        let [fence, leases, done_key] = &self.buckets[0];
        let mut invocation = self.finish_keyed.prepare_invoke();
        invocation.key(fence).key(leases).key(done_key);
        for &(p, _) in &epochs {
            invocation.key(keyed.hash(p)).key(keyed.owner(p));
        }
        (invocation.arg(&self.owner))
            .arg(self.done_ttl.map_or(0, Self::ms))
            .arg(Self::ms(self.lease_ttl))
            .arg(epochs.len());
        for (&(_, epoch), writes) in epochs.iter().zip(&by_partition) {
            invocation.arg(epoch).arg(writes.len());
            for write in writes {
                invocation.arg(&write.key).arg(keyed::stored(write));
            }
        }
        for ((id, fence), p) in done.iter().zip(&partitions) {
            let j = epochs.iter().position(|(q, _)| q == p).unwrap_or(0) + 1;
            invocation.arg(id).arg(fence).arg(j);
        }
        turn.wait().await;
        let mut answers: Vec<Vec<i64>> = self.run(&[&invocation], "finish").await?;
        let out = answers.pop().unwrap_or_default();
        check_length("finish", &out, done.len() + epochs.len())?;
        let (held, taken) = out.split_at(done.len());
        for ((&(p, epoch), writes), &taken) in epochs.iter().zip(&by_partition).zip(taken) {
            if taken == 1 {
                keyed.held.apply(p, epoch, writes);
            } else {
                keyed.held.lose(p, epoch);
                tracing::warn!(
                    partition = p,
                    epoch,
                    "keyed state: this batch's records of the partition were refused (another worker holds its state now, or one of them went to another worker); they are left to the partition's owner"
                );
            }
        }
        drop(turn);
        Ok(held.iter().map(|&v| v == 1).collect())
    }
}

#[async_trait]
impl StateStore for RedisStore {
    async fn finish_with(
        &self,
        done: &[(String, u64)],
        with: Commit,
        turn: Turn,
    ) -> Result<Vec<bool>, StateError> {
        match &self.keyed {
            Some(keyed) if !with.epochs.is_empty() => {
                self.finish_keyed(keyed, done, with, turn).await
            }
            _ if !with.writes.is_empty() => Err(StateError::new(
                "keyed-state writes of a batch that holds no partition's state",
            )),
            _ => {
                // Only keyed state needs the batches in order.
                drop(turn);
                self.finish(done).await
            }
        }
    }

    fn keyed(&self) -> Option<Arc<dyn KeyedRead>> {
        (self.keyed.as_ref()).map(|keyed| keyed.held.clone() as Arc<dyn KeyedRead>)
    }

    async fn own_keyed(&self, partitions: &[(i32, u64)]) -> Result<Ownership, StateError> {
        let Some(keyed) = &self.keyed else {
            return Ok(Ownership::all_along(partitions));
        };
        let mut ownership = Ownership::default();
        for &(partition, assignment) in partitions {
            let only_if_free = match keyed.held.need(partition, assignment) {
                Need::Runs(epoch) => {
                    ownership.epochs.push((partition, epoch));
                    continue;
                }
                Need::Takeover { only_if_free } => only_if_free,
            };
            let Some(epoch) = self.take(keyed, partition, only_if_free).await? else {
                // Another worker holds it: the batch runs, and its writes are refused.
                ownership
                    .epochs
                    .push((partition, keyed.held.epoch(partition)));
                continue;
            };
            let started = Instant::now();
            let values = self.load(keyed, partition).await?;
            let keys = values.len();
            keyed.held.install(partition, assignment, epoch, values);
            ownership.epochs.push((partition, epoch));
            ownership.restored.push(super::Restored {
                partition,
                epoch,
                keys,
                took: started.elapsed(),
            });
        }
        Ok(ownership)
    }

    async fn claim(&self, ids: &[String]) -> Result<Vec<Claim>, StateError> {
        let records = ids.iter().map(|id| (id.as_str(), id));
        let ttl = self.done_ttl.map_or(0, Self::ms);
        let answers = self.per_bucket(&self.claim, ttl, records, "claim").await?;
        let mut claims = vec![Claim::HeldElsewhere; ids.len()];
        for (indices, out) in answers {
            check_length("claim", &out, 2 * indices.len())?;
            let (fences, crashes) = out.split_at(indices.len());
            for ((i, &v), &crashes) in indices.into_iter().zip(fences).zip(crashes) {
                claims[i] = match v {
                    -1 => Claim::Done,
                    0 => Claim::HeldElsewhere,
                    fence => Claim::Leased {
                        fence: fence as u64,
                        crashes: u32::try_from(crashes).unwrap_or(0),
                    },
                };
            }
        }
        Ok(claims)
    }

    async fn finish(&self, done: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        let ttl = self.done_ttl.map_or(0, Self::ms);
        self.per_lease(&self.finish, ttl, done, "finish").await
    }

    async fn renew(&self, leases: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        self.per_lease(&self.keep_or_release, 1, leases, "renew")
            .await
    }

    async fn release(&self, leases: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        self.per_lease(&self.keep_or_release, 0, leases, "release")
            .await
    }
}

impl RedisStore {
    /// Runs a crash-log script on the ids.
    async fn crash_log(
        &self,
        script: &Script,
        ids: &[&str],
        what: &str,
    ) -> Result<Vec<i64>, StateError> {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(&self.crash_log_key)
            .arg(&self.owner)
            .arg(0)
            .arg(0)
            .arg(ids);
        let mut answers = self.run(&[&invocation], what).await?;
        Ok(answers.pop().unwrap_or_default())
    }
}

#[async_trait]
impl CrashLog for RedisStore {
    async fn crashes(&self, ids: &[&str]) -> Result<Vec<u32>, StateError> {
        let out = self.crash_log(&self.crashes, ids, "crash counts").await?;
        Ok(out
            .into_iter()
            .map(|n| u32::try_from(n).unwrap_or(0))
            .collect())
    }

    async fn enter(&self, ids: &[&str]) -> Result<(), StateError> {
        self.crash_log(&self.enter, ids, "crash log")
            .await
            .map(drop)
    }

    async fn leave(&self, ids: &[&str]) -> Result<(), StateError> {
        self.crash_log(&self.leave, ids, "crash log")
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // The examples of the Redis Cluster specification.
        assert_eq!(slot("123456789"), 0x31C3);
        assert_eq!(slot("{user1000}.following"), slot("user1000"));
        assert_eq!(slot("foo{}{bar}"), slot("foo{}{bar}"));
        assert_eq!(slot("foo{{bar}}zap"), slot("{bar"));
    }

    #[test]
    fn bucket_tags_spread_evenly_over_the_slots() {
        for n in [1, 3, DEFAULT_CLUSTER_BUCKETS] {
            let tags = bucket_tags(n);
            assert_eq!(tags.len(), n);
            for (k, tag) in tags.iter().enumerate() {
                let slot = usize::from(slot(&format!("weir:p:{{{tag}}}:leases")));
                assert!(
                    (k * 16384 / n..(k + 1) * 16384 / n).contains(&slot),
                    "{k}: {slot}"
                );
            }
        }
    }
}
