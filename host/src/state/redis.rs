//! The Redis state store for cluster mode: per-record leases with fencing tokens, and done
//! marks. Each call is one Lua script, so a batch costs two round trips: `claim` (one
//! `SET NX PX GET` per id, which is the dedup check and the lease at once, with one `INCR`
//! for the fence all its new leases share) and `finish` (one `SET ... GET` per id that marks
//! it done and releases the lease, and counts where the lease was still ours, even past its
//! deadline or gone, with nobody having taken the record since, so a worker that stalled
//! unseen past its TTL completes its durable work; where another worker's lease or done
//! mark was there, it is put back). One more script renews or releases leases, again only
//! where they are still ours.
//!
//! Keys, under the pipeline's namespace `<ns>`: one per record, `<ns>:id:<id>`, holding
//! a lease while leased and `D|<fence>` once done (the fence that finished it; optional
//! TTL), so claim and finish cost one command per record each; and `<ns>:fence` (the
//! counter). A lease holds its deadline (Redis time) and the number of
//! leases of the record that ran out before (`L|<owner>|<fence>|<deadline>|<deaths>`): a
//! claim past the deadline takes the record over and returns the count, so crash-loop
//! protection learns which records a dead worker had in flight at no extra cost. Its
//! `CrashLog` is the hash `<ns>:crashes` of the records a worker died with in the plugin
//! (kept only for a dead worker's records, which run one at a time: one script reads a
//! batch's counts, one raises them as a record enters the plugin, one deletes them as it
//! leaves).
//! The scripts get their keys as `KEYS`. Needs Redis 7.0 or
//! later (`SET` with both `NX` and `GET`). Run Redis with AOF on: without it a restart resets
//! the counter and fences go backwards. One script touches keys of many hash slots, so Redis
//! Cluster is not supported.
//!
//! A Redis outage pauses the worker instead of stopping it: every call has a response
//! timeout and is retried with backoff until Redis answers (`weir_circuit_open{dependency=
//! "redis"}` is 1 meanwhile). Retrying is safe because every script is idempotent for its
//! owner: a claim re-finds the owner's own leases, and a finish whose first attempt did land
//! finds the done mark with its fence.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use prometheus::IntGauge;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Claim, CrashLog, StateError, StateStore};

// Every script gets the record keys as `KEYS` (claim: after the fence counter) and `ARGV` =
// owner, TTL in ms, the lease TTL in ms, then (per-lease scripts) one fence per record key.
//
// A lease is `L|<owner>|<fence>|<deadline ms>|<deaths>`: it is the owner's until the deadline
// (Redis time); after it, the next claim takes the record over and adds one to `deaths`, the
// workers that died (or stalled) with the record in flight. The key itself lives `KEEP`
// lease TTLs, so an abandoned lease is dropped in the end.

/// Redis's clock in ms, and the lease of `owner` with `fence` and `deaths`, due in `ttl` ms.
const LEASE: &str = r"
local KEEP = 20
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function lease(owner, fence, ttl, deaths)
  return 'L|' .. owner .. '|' .. fence .. '|' .. (now + ttl) .. '|' .. deaths
end
-- owner, fence, deadline, deaths of a lease value (nil for a done mark)
local function parse(value)
  local owner, fence, deadline, deaths = string.match(value, '^L|(.*)|(%d+)|(%d+)|(%d+)$')
  if not owner then
    return nil
  end
  return owner, fence, tonumber(deadline), tonumber(deaths)
end
";

/// Leases what nobody holds; returns a claim per record, then its deaths per record.
const CLAIM: &str = r"
local owner, lease_ttl = ARGV[1], tonumber(ARGV[3])
local keep = lease_ttl * KEEP
-- One fencing token for every lease this call takes: still higher than any earlier one.
local fence = redis.call('INCR', KEYS[1])
local n = #KEYS - 1
local out = {}
for i = 2, #KEYS do
  -- Lease it if nobody has; either way, learn what was there.
  local state = redis.call('SET', KEYS[i], lease(owner, fence, lease_ttl, 0), 'NX', 'PX', keep, 'GET')
  local deaths = 0
  if not state then
    out[i - 1] = fence
  elseif string.byte(state) == 68 then -- 'D': done
    out[i - 1] = -1
  else
    local holder, held, deadline, died = parse(state)
    if holder == owner then
      redis.call('SET', KEYS[i], lease(owner, held, lease_ttl, died), 'PX', keep)
      out[i - 1], deaths = tonumber(held), died
    elseif holder and deadline < now then
      -- Its holder died or stalled with it in flight: ours now.
      deaths = died + 1
      redis.call('SET', KEYS[i], lease(owner, fence, lease_ttl, deaths), 'PX', keep)
      out[i - 1] = fence
    else
      out[i - 1] = 0
    end
  end
  out[n + i - 1] = deaths
end
return out
";

/// Marks done with one `SET ... GET` per record; puts back what another worker had there.
const FINISH: &str = r"
local owner, ttl, keep = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]) * KEEP
local out = {}
for i = 1, #KEYS do
  local fence = ARGV[i + 3]
  local done = 'D|' .. fence
  local was
  if ttl > 0 then
    was = redis.call('SET', KEYS[i], done, 'PX', ttl, 'GET')
  else
    was = redis.call('SET', KEYS[i], done, 'GET')
  end
  local holder, held = nil, nil
  if was then
    holder, held = parse(was)
  end
  -- Ours (even past its deadline: nobody took it); or gone with nobody on it since.
  if not was or was == done or (holder == owner and held == fence) then
    out[i] = 1
  else
    -- Another worker's lease or done mark.
    if string.byte(was) == 68 and ttl > 0 then
      redis.call('SET', KEYS[i], was, 'PX', ttl)
    elseif string.byte(was) == 68 then
      redis.call('SET', KEYS[i], was)
    else
      redis.call('SET', KEYS[i], was, 'PX', keep)
    end
    out[i] = 0
  end
end
return out
";

/// Renews (TTL > 0) or releases (TTL 0) leases, each only if still this owner's with that
/// fence.
const KEEP_OR_RELEASE: &str = r"
local owner, ttl, keep = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]) * KEEP
local out = {}
for i = 1, #KEYS do
  local value = redis.call('GET', KEYS[i])
  local holder, held, deaths = nil, nil, 0
  if value then
    local _
    holder, held, _, deaths = parse(value)
  end
  if holder == owner and held == ARGV[i + 3] then
    if ttl > 0 then
      redis.call('SET', KEYS[i], lease(owner, held, ttl, deaths), 'PX', keep)
    else
      redis.call('DEL', KEYS[i])
    end
    out[i] = 1
  else
    out[i] = 0
  end
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
    conn: ConnectionManager,
    namespace: String,
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
}

/// Where the cluster's Redis is: a `redis://` or `rediss://` (TLS) URL, with
/// `user:password@` for AUTH and ACL users, and for TLS the CA certificate (PEM) the
/// server's must chain to (unset: the system's CAs). Shown without its password.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTarget {
    url: String,
    ca_file: Option<PathBuf>,
}

impl RedisTarget {
    pub fn new(url: impl Into<String>, ca_file: Option<PathBuf>) -> Self {
        Self {
            url: url.into(),
            ca_file,
        }
    }

    /// A client for it (connecting comes later); a bad URL or CA file is an error.
    pub fn client(&self) -> redis::RedisResult<redis::Client> {
        let Some(path) = &self.ca_file else {
            return redis::Client::open(self.url.as_str());
        };
        let pem = std::fs::read(path).map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "cannot read the Redis CA file",
                format!("{}: {e}", path.display()),
            ))
        })?;
        let certificates = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        };
        redis::Client::build_with_tls(self.url.as_str(), certificates)
    }
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTarget")
            .field("url", &crate::config::secrets::redact_url(&self.url))
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::config::secrets::redact_url(&self.url))
    }
}

/// How long one Redis call may take before it counts as failed and is tried again.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest wait between two tries while Redis is unavailable.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(1);

fn redis_error(what: &str) -> impl Fn(redis::RedisError) -> StateError + '_ {
    move |e| StateError::caused_by(format!("redis {what}"), e)
}

impl RedisStore {
    /// Connects to `target`. `owner` names this worker in leases (unique per process);
    /// `namespace` is the pipeline name.
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
        let client = target
            .client()
            .map_err(|e| StateError::caused_by(format!("Redis at {target}"), e))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(MAX_RETRY_DELAY);
        let mut delay = Duration::from_millis(200);
        let conn = loop {
            match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
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
        Ok(Self {
            conn,
            namespace: format!("weir:{namespace}"),
            owner: owner.to_owned(),
            lease_ttl,
            done_ttl,
            claim: Script::new(&format!("{LEASE}{CLAIM}")),
            finish: Script::new(&format!("{LEASE}{FINISH}")),
            keep_or_release: Script::new(&format!("{LEASE}{KEEP_OR_RELEASE}")),
            crashes: Script::new(CRASHES),
            enter: Script::new(ENTER),
            leave: Script::new(LEAVE),
            circuit: None,
        })
    }

    /// Reports outages on `gauge` (1 while Redis does not answer).
    pub fn with_circuit_gauge(mut self, gauge: IntGauge) -> Self {
        self.circuit = Some(gauge);
        self
    }

    fn ms(d: Duration) -> u64 {
        d.as_millis().max(1) as u64
    }

    /// The key of one record.
    fn key(&self, id: &str) -> String {
        format!("{}:id:{id}", self.namespace)
    }

    /// Runs `script` on `keys` with the common arguments (owner, `ttl_ms`, the lease TTL),
    /// then `args`; while Redis is unavailable, tries again with backoff until it answers.
    async fn run(
        &self,
        script: &Script,
        keys: &[String],
        ttl_ms: u64,
        args: &[String],
        what: &str,
    ) -> Result<Vec<i64>, StateError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        invocation
            .arg(&self.owner)
            .arg(ttl_ms)
            .arg(Self::ms(self.lease_ttl));
        for a in args {
            invocation.arg(a);
        }
        let mut delay = Duration::from_millis(50);
        let mut outage: Option<std::time::Instant> = None;
        loop {
            let mut conn = self.conn.clone();
            match invocation.invoke_async(&mut conn).await {
                Ok(out) => {
                    if let Some(since) = outage {
                        tracing::warn!(
                            "Redis answers again after {:.1} s; resuming",
                            since.elapsed().as_secs_f64()
                        );
                        if let Some(g) = &self.circuit {
                            g.set(0);
                        }
                    }
                    return Ok(out);
                }
                Err(e) if is_transient(&e) => {
                    if outage.is_none() {
                        tracing::warn!(
                            "Redis {what} failed ({e}); pausing and retrying until it answers"
                        );
                        outage = Some(std::time::Instant::now());
                        if let Some(g) = &self.circuit {
                            g.set(1);
                        }
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_RETRY_DELAY);
                }
                Err(e) => return Err(redis_error(what)(e)),
            }
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
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = leases.iter().map(|(id, _)| self.key(id)).collect();
        let fences: Vec<String> = leases.iter().map(|(_, fence)| fence.to_string()).collect();
        let out = self.run(script, &keys, ttl_ms, &fences, what).await?;
        Ok(out.into_iter().map(|v| v == 1).collect())
    }
}

/// Errors that go away when Redis comes back (as opposed to a script or data error).
fn is_transient(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
                | redis::ErrorKind::Server(redis::ServerErrorKind::TryAgain)
                | redis::ErrorKind::Server(redis::ServerErrorKind::MasterDown)
        )
}

#[async_trait]
impl StateStore for RedisStore {
    async fn claim(&self, ids: &[String]) -> Result<Vec<Claim>, StateError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = std::iter::once(format!("{}:fence", self.namespace))
            .chain(ids.iter().map(|id| self.key(id)))
            .collect();
        let out = self
            .run(&self.claim, &keys, Self::ms(self.lease_ttl), &[], "claim")
            .await?;
        if out.len() != 2 * ids.len() {
            return Err(StateError::new(format!(
                "claim answered {} values for {} ids",
                out.len(),
                ids.len()
            )));
        }
        let (claims, crashes) = out.split_at(ids.len());
        Ok(claims
            .iter()
            .zip(crashes)
            .map(|(&v, &crashes)| match v {
                -1 => Claim::Done,
                0 => Claim::HeldElsewhere,
                fence => Claim::Leased {
                    fence: fence as u64,
                    crashes: u32::try_from(crashes).unwrap_or(0),
                },
            })
            .collect())
    }

    async fn finish(&self, done: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        let ttl = self.done_ttl.map_or(0, Self::ms);
        self.per_lease(&self.finish, ttl, done, "finish").await
    }

    async fn renew(&self, leases: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        self.per_lease(
            &self.keep_or_release,
            Self::ms(self.lease_ttl),
            leases,
            "renew",
        )
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
        let key = format!("{}:crashes", self.namespace);
        let ids: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
        self.run(script, &[key], 0, &ids, what).await
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
