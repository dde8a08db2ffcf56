//! The Redis state store for cluster mode: per-record leases with fencing tokens, and done
//! marks. Each call is one Lua script, so a batch costs two round trips: `claim` (the dedup
//! check, `INCR` for the fence and `SET PX` for every id) and `finish` (compare-and-set:
//! mark done and release, only where the lease is still ours).
//!
//! Keys, under the pipeline's namespace `<ns>`: `<ns>:done:<id>` (the fence that finished
//! it; optional TTL), `<ns>:lease:<id>` (`<owner>|<fence>`, with a TTL) and `<ns>:fence` (the
//! counter). Run Redis with AOF on: without it a restart resets the counter and fences go
//! backwards. The scripts build keys from their arguments, so Redis Cluster is not supported.

use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::aio::ConnectionManager;

use super::{Claim, StateError, StateStore};

const CLAIM: &str = r"
local ns, owner, ttl = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.call('EXISTS', ns .. ':done:' .. id) == 1 then
    out[#out + 1] = -1
  else
    local key = ns .. ':lease:' .. id
    local held = redis.call('GET', key)
    if not held then
      local fence = redis.call('INCR', ns .. ':fence')
      redis.call('SET', key, owner .. '|' .. fence, 'PX', ttl)
      out[#out + 1] = fence
    else
      local sep = string.find(held, '|', 1, true)
      if sep and string.sub(held, 1, sep - 1) == owner then
        redis.call('PEXPIRE', key, ttl)
        out[#out + 1] = tonumber(string.sub(held, sep + 1))
      else
        out[#out + 1] = 0
      end
    end
  end
end
return out
";

const FINISH: &str = r"
local ns, owner, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
for i = 4, #ARGV, 2 do
  local id, fence = ARGV[i], ARGV[i + 1]
  local key = ns .. ':lease:' .. id
  if redis.call('GET', key) == owner .. '|' .. fence then
    if ttl > 0 then
      redis.call('SET', ns .. ':done:' .. id, fence, 'PX', ttl)
    else
      redis.call('SET', ns .. ':done:' .. id, fence)
    end
    redis.call('DEL', key)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
";

const RENEW: &str = r"
local ns, owner, ttl = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for i = 4, #ARGV, 2 do
  local key = ns .. ':lease:' .. ARGV[i]
  if redis.call('GET', key) == owner .. '|' .. ARGV[i + 1] then
    redis.call('PEXPIRE', key, ttl)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
";

/// Leases and done marks in Redis.
pub struct RedisStore {
    conn: ConnectionManager,
    namespace: String,
    owner: String,
    lease_ttl: Duration,
    done_ttl: Option<Duration>,
    claim: Script,
    finish: Script,
    renew: Script,
}

fn redis_error(what: &str) -> impl Fn(redis::RedisError) -> StateError + '_ {
    move |e| StateError(format!("redis {what}: {e}"))
}

impl RedisStore {
    /// Connects to `url`. `owner` names this worker in leases (unique per process);
    /// `namespace` is the pipeline name.
    pub async fn connect(
        url: &str,
        namespace: &str,
        owner: &str,
        lease_ttl: Duration,
        done_ttl: Option<Duration>,
    ) -> Result<Self, StateError> {
        if owner.contains('|') {
            return Err(StateError(format!(
                "worker id `{owner}` must not contain `|`"
            )));
        }
        let client = redis::Client::open(url).map_err(redis_error("url"))?;
        let conn = ConnectionManager::new(client)
            .await
            .map_err(|e| StateError(format!("cannot connect to Redis at {url}: {e}")))?;
        Ok(Self {
            conn,
            namespace: format!("weir:{namespace}"),
            owner: owner.to_owned(),
            lease_ttl,
            done_ttl,
            claim: Script::new(CLAIM),
            finish: Script::new(FINISH),
            renew: Script::new(RENEW),
        })
    }

    fn ms(d: Duration) -> u64 {
        d.as_millis().max(1) as u64
    }

    /// Runs `script` with the common arguments, then `args`.
    async fn run(
        &self,
        script: &Script,
        ttl_ms: u64,
        args: &[String],
        what: &str,
    ) -> Result<Vec<i64>, StateError> {
        let mut invocation = script.prepare_invoke();
        invocation.arg(&self.namespace).arg(&self.owner).arg(ttl_ms);
        for a in args {
            invocation.arg(a);
        }
        let mut conn = self.conn.clone();
        invocation
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error(what))
    }

    /// Extends the leases that are still ours; says per id whether it was.
    pub async fn renew_leases(&self, leases: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        let args = pairs(leases);
        let out = self
            .run(&self.renew, Self::ms(self.lease_ttl), &args, "renew")
            .await?;
        Ok(out.into_iter().map(|v| v == 1).collect())
    }
}

fn pairs(items: &[(String, u64)]) -> Vec<String> {
    items
        .iter()
        .flat_map(|(id, fence)| [id.clone(), fence.to_string()])
        .collect()
}

#[async_trait]
impl StateStore for RedisStore {
    async fn claim(&self, ids: &[String]) -> Result<Vec<Claim>, StateError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let out = self
            .run(&self.claim, Self::ms(self.lease_ttl), ids, "claim")
            .await?;
        if out.len() != ids.len() {
            return Err(StateError(format!(
                "claim answered {} of {} ids",
                out.len(),
                ids.len()
            )));
        }
        Ok(out
            .into_iter()
            .map(|v| match v {
                -1 => Claim::Done,
                0 => Claim::HeldElsewhere,
                fence => Claim::Leased {
                    fence: fence as u64,
                },
            })
            .collect())
    }

    async fn finish(&self, done: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        if done.is_empty() {
            return Ok(Vec::new());
        }
        let ttl = self.done_ttl.map_or(0, Self::ms);
        let out = self.run(&self.finish, ttl, &pairs(done), "finish").await?;
        Ok(out.into_iter().map(|v| v == 1).collect())
    }

    async fn renew(&self, leases: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        self.renew_leases(leases).await
    }
}
