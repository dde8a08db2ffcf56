//! Where the registry keeps its bytes: a local directory (embedded mode) or Redis (cluster
//! mode, shared by every worker). Both store the same four things: one JSON index per
//! plugin, component bytes per sha256, the audit log, and (Redis only) a change channel.
//!
//! An index is replaced with compare-and-swap ([`Store::swap_index`]): a change computed from
//! a stale index is refused, and the registry computes it again from the fresh one.

use std::path::{Path, PathBuf};

use redis::AsyncCommands;

use super::RegistryError;

/// The Redis keys of the registry start with this (pipelines use `weir:<pipeline>:`); the
/// hash tag puts them all in one slot of a Redis Cluster, as its script needs.
pub const REDIS_PREFIX: &str = "{weir-registry}";

/// The Redis channel every index change is published on; the message is the plugin name.
pub fn changes_channel() -> String {
    format!("{REDIS_PREFIX}:changes")
}

/// Replaces an index only if it still holds what the writer read, records the name and
/// publishes the change, in one step.
const SWAP_INDEX: &str = r"
local current = redis.call('GET', KEYS[1])
if current == false then current = '' end
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return 1
";

pub enum Store {
    Dir(PathBuf),
    Redis {
        conn: crate::state::RedisConnection,
        swap: redis::Script,
    },
}

pub fn redis_error(e: redis::RedisError) -> RegistryError {
    RegistryError::Io(std::io::Error::other(format!("redis: {e}")))
}

fn key(what: &str, name: &str) -> String {
    format!("{REDIS_PREFIX}:{what}:{name}")
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

impl Store {
    /// The directory store, created if needed.
    pub fn dir(dir: &Path) -> Result<Self, RegistryError> {
        std::fs::create_dir_all(dir.join("blobs"))?;
        std::fs::create_dir_all(dir.join("plugins"))?;
        Ok(Self::Dir(dir.to_owned()))
    }

    pub fn redis(conn: crate::state::RedisConnection) -> Self {
        Self::Redis {
            conn,
            swap: redis::Script::new(SWAP_INDEX),
        }
    }

    /// Where it is, for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Dir(dir) => dir.display().to_string(),
            Self::Redis { .. } => format!("Redis keys {REDIS_PREFIX}:*"),
        }
    }

    fn index_path(dir: &Path, name: &str) -> PathBuf {
        dir.join("plugins").join(format!("{name}.json"))
    }

    fn blob_path(dir: &Path, digest: &str) -> PathBuf {
        dir.join("blobs").join(format!("{}.wasm", hex_of(digest)))
    }

    /// The raw index of `name`; `None` when it was never written.
    pub async fn read_index(&self, name: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        match self {
            Self::Dir(dir) => read_optional(&Self::index_path(dir, name)),
            Self::Redis { conn, .. } => conn
                .clone()
                .get(key("index", name))
                .await
                .map_err(redis_error),
        }
    }

    /// Writes `new` as the index of `name` if it still is `old`; false when another writer
    /// changed it first. The caller serialises writers of a directory store.
    pub async fn swap_index(
        &self,
        name: &str,
        old: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool, RegistryError> {
        match self {
            Self::Dir(dir) => {
                write_atomically(&Self::index_path(dir, name), new)?;
                Ok(true)
            }
            Self::Redis { conn, swap } => {
                let swapped: i64 = swap
                    .key(key("index", name))
                    .key(format!("{REDIS_PREFIX}:names"))
                    .arg(old.unwrap_or_default())
                    .arg(new)
                    .arg(name)
                    .arg(changes_channel())
                    .invoke_async(&mut conn.clone())
                    .await
                    .map_err(redis_error)?;
                Ok(swapped == 1)
            }
        }
    }

    /// Every plugin name with an index, sorted.
    pub async fn names(&self) -> Result<Vec<String>, RegistryError> {
        let mut names: Vec<String> = match self {
            Self::Dir(dir) => {
                let mut names = Vec::new();
                for entry in std::fs::read_dir(dir.join("plugins"))? {
                    let file = entry?.file_name();
                    if let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".json")) {
                        names.push(name.to_owned());
                    }
                }
                names
            }
            Self::Redis { conn, .. } => conn
                .clone()
                .smembers(format!("{REDIS_PREFIX}:names"))
                .await
                .map_err(redis_error)?,
        };
        names.sort();
        Ok(names)
    }

    pub async fn read_blob(&self, digest: &str) -> Result<Vec<u8>, RegistryError> {
        let bytes = match self {
            Self::Dir(dir) => read_optional(&Self::blob_path(dir, digest))?,
            Self::Redis { conn, .. } => conn
                .clone()
                .get(key("blob", hex_of(digest)))
                .await
                .map_err(redis_error)?,
        };
        bytes.ok_or_else(|| {
            RegistryError::Corrupt(
                self.describe(),
                format!("the bytes of {digest} are missing"),
            )
        })
    }

    /// Stores component bytes under their digest (a no-op when they are there).
    pub async fn write_blob(&self, digest: &str, bytes: &[u8]) -> Result<(), RegistryError> {
        match self {
            Self::Dir(dir) => {
                let path = Self::blob_path(dir, digest);
                if !path.exists() {
                    write_atomically(&path, bytes)?;
                }
                Ok(())
            }
            Self::Redis { conn, .. } => conn
                .clone()
                .set_nx(key("blob", hex_of(digest)), bytes)
                .await
                .map_err(redis_error),
        }
    }

    pub async fn delete_blob(&self, digest: &str) -> Result<(), RegistryError> {
        match self {
            Self::Dir(dir) => match std::fs::remove_file(Self::blob_path(dir, digest)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            },
            Self::Redis { conn, .. } => conn
                .clone()
                .del(key("blob", hex_of(digest)))
                .await
                .map_err(redis_error),
        }
    }

    /// Appends one line (without its newline) to the audit log, durably.
    pub async fn append_audit(&self, line: &[u8]) -> Result<(), RegistryError> {
        match self {
            Self::Dir(dir) => {
                use std::io::Write;
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("audit.jsonl"))?;
                let mut line = line.to_vec();
                line.push(b'\n');
                file.write_all(&line)?;
                file.sync_data()?;
                Ok(())
            }
            Self::Redis { conn, .. } => conn
                .clone()
                .rpush(format!("{REDIS_PREFIX}:audit"), line)
                .await
                .map_err(redis_error),
        }
    }

    /// The audit log's lines, oldest first.
    pub async fn audit_lines(&self) -> Result<Vec<String>, RegistryError> {
        match self {
            Self::Dir(dir) => {
                let text = read_optional(&dir.join("audit.jsonl"))?.unwrap_or_default();
                Ok(String::from_utf8_lossy(&text)
                    .lines()
                    .map(str::to_owned)
                    .collect())
            }
            Self::Redis { conn, .. } => conn
                .clone()
                .lrange(format!("{REDIS_PREFIX}:audit"), 0, -1)
                .await
                .map_err(redis_error),
        }
    }
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, RegistryError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}
