//! Where Redis is and how every part of Weir talks to it: one server (`redis://`,
//! `rediss://`) or a Redis Cluster (its seed nodes), behind one connection type,
//! [`RedisConnection`], that the state store, the registry and the heartbeats share.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// How long one Redis call may take before it counts as failed and is tried again.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest wait between two tries while Redis is unavailable.
pub(crate) const MAX_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Where the cluster's Redis is: a `redis://` or `rediss://` (TLS) URL, with
/// `user:password@` for AUTH and ACL users, and for TLS the CA certificate (PEM) the
/// server's must chain to (unset: the system's CAs). For a Redis Cluster, the URLs of one
/// or more of its nodes, separated by commas (the client finds the others). Shown without
/// passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTarget {
    url: String,
    ca_file: Option<PathBuf>,
    cluster: bool,
    /// How many buckets a pipeline's ids fall into (1 on a server).
    buckets: usize,
}

impl RedisTarget {
    /// One Redis server.
    pub fn new(url: impl Into<String>, ca_file: Option<PathBuf>) -> Self {
        Self {
            url: url.into(),
            ca_file,
            cluster: false,
            buckets: 1,
        }
    }

    /// A Redis Cluster, reached through `seeds` (comma-separated node URLs), over which a
    /// pipeline's ids spread in `buckets` buckets.
    pub fn cluster(seeds: impl Into<String>, buckets: usize) -> Self {
        Self {
            url: seeds.into(),
            ca_file: None,
            cluster: true,
            buckets: buckets.max(1),
        }
    }

    /// How many buckets a pipeline's ids fall into: 1 on a server.
    pub fn buckets(&self) -> usize {
        self.buckets
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The server's URL, or the cluster's seed nodes.
    fn urls(&self) -> Vec<&str> {
        crate::config::secrets::url_list(&self.url)
    }

    /// A client of one node: the server, or the `n`th seed of a cluster (modulo their
    /// number). Pub/sub uses it: a message published on any node of a cluster reaches every
    /// node's subscribers. Connecting comes later; a bad URL or CA file is an error.
    pub fn node(&self, n: usize) -> RedisResult<redis::Client> {
        let urls = self.urls();
        let url = urls.get(n % urls.len().max(1)).copied().unwrap_or("");
        let Some(path) = &self.ca_file else {
            return redis::Client::open(url);
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
        redis::Client::build_with_tls(url, certificates)
    }

    /// Connects (once; callers that must wait for Redis retry). Every call on the
    /// connection answers within [`RESPONSE_TIMEOUT`] or fails.
    pub async fn connect(&self) -> RedisResult<RedisConnection> {
        if self.cluster {
            let client = redis::cluster::ClusterClient::builder(self.urls())
                .connection_timeout(RESPONSE_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                .retries(2)
                .max_retry_wait(MAX_RETRY_DELAY.as_millis() as u64)
                .build()?;
            let conn = client.get_async_connection().await?;
            return Ok(RedisConnection::Cluster(Arc::new(ClusterLink {
                client,
                conn: Mutex::new(conn),
                renewing: AtomicBool::new(false),
            })));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(MAX_RETRY_DELAY);
        let manager = ConnectionManager::new_with_config(self.node(0)?, config).await?;
        Ok(RedisConnection::Server(manager))
    }
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTarget")
            .field("url", &self.to_string())
            .field("ca_file", &self.ca_file)
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls = crate::config::secrets::redact_url(&self.url);
        if self.cluster {
            write!(f, "the Redis Cluster of {urls}")
        } else {
            f.write_str(&urls)
        }
    }
}

/// A connection to one Redis server (reconnecting by itself) or to a Redis Cluster
/// (routing each command to the node of its keys' slot, following failovers). Cheap to
/// clone; clones share the connection.
#[derive(Clone)]
pub enum RedisConnection {
    Server(ConnectionManager),
    Cluster(Arc<ClusterLink>),
}

/// The connection to a cluster, made again after a call fails on an unavailable node: the
/// cluster client can stay stuck on a topology of a dead master long after its replica
/// took over (redis 1.8, seen in `cluster::a_redis_cluster_master_killed_mid_run_…`),
/// while a fresh one finds the new master at once.
pub struct ClusterLink {
    client: redis::cluster::ClusterClient,
    conn: Mutex<ClusterConnection>,
    /// A new connection is being made (by one failed call at a time).
    renewing: AtomicBool,
}

impl ClusterLink {
    fn current(&self) -> ClusterConnection {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// After `result`'s call: on an error that an unavailable node explains, connects
    /// again (unless another call already is).
    async fn after<T>(&self, result: RedisResult<T>) -> RedisResult<T> {
        let renew = matches!(&result, Err(e) if is_transient(e))
            && !self.renewing.swap(true, Ordering::AcqRel);
        if renew {
            if let Ok(fresh) = self.client.get_async_connection().await {
                *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
            }
            self.renewing.store(false, Ordering::Release);
        }
        result
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Server(c) => c.req_packed_command(cmd),
            Self::Cluster(link) => Box::pin(async move {
                let mut conn = link.current();
                let result = conn.req_packed_command(cmd).await;
                link.after(result).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Server(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(link) => Box::pin(async move {
                let mut conn = link.current();
                let result = conn.req_packed_commands(pipeline, offset, count).await;
                link.after(result).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Server(c) => c.get_db(),
            Self::Cluster(_) => 0,
        }
    }
}

/// Errors that go away when Redis comes back or a cluster's failover ends (as opposed to a
/// script or data error).
pub fn is_transient(e: &redis::RedisError) -> bool {
    use redis::ServerErrorKind::{BusyLoading, ClusterDown, MasterDown, TryAgain};
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(BusyLoading | TryAgain | MasterDown | ClusterDown)
        )
}
