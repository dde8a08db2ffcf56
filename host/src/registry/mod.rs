//! The plugin registry: every uploaded version of every plugin, content-addressed by sha256,
//! with version numbers that only go up per plugin name, and an append-only audit log.
//!
//! Embedded mode keeps it in a local directory:
//!
//! - `blobs/<sha256>.wasm`: component bytes, one file per distinct content;
//! - `plugins/<name>.json`: the plugin's versions and which one is active (written to a
//!   temporary file and renamed, so a crash leaves the old or the new index, never half);
//! - `audit.jsonl`: one line per upload, activation or deletion, refused ones too.
//!
//! Cluster mode keeps the same things in Redis (`store.rs`), shared by every worker, and
//! publishes each change so that every worker follows it at once ([`Registry::changes`]).
//!
//! Validation (is it a component of the supported contract?) happens before [`Registry`]
//! is called, in `runtime::Plugin::inspect`.

mod store;

use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use store::Store;

use crate::clock::now_ms;
use crate::runtime::{Inspection, World};

/// One uploaded version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub name: String,
    pub version: u64,
    /// `sha256:<hex>` of the component bytes.
    pub digest: String,
    pub size_bytes: usize,
    pub wit_version: String,
    pub world: World,
    pub exports: Vec<String>,
    pub imports: Vec<String>,
    pub uploaded_at_ms: u64,
    pub uploaded_by: String,
}

/// A plugin's versions and its active one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PluginInfo {
    pub name: String,
    pub versions: Vec<VersionInfo>,
    /// The version workers run; `None` until one is activated.
    pub active: Option<u64>,
    /// The highest version number ever given, deleted ones included: numbers never repeat.
    #[serde(default)]
    pub last_version: u64,
    /// Versions active before the current one, oldest first: where rollbacks go.
    #[serde(default)]
    pub history: Vec<u64>,
    /// A candidate version that gets a share of the records, while it is watched.
    #[serde(default)]
    pub canary: Option<CanaryInfo>,
    /// How many activations and rollbacks there were: a worker that applied fewer swaps in
    /// the active version again, even the same one (which resumes a paused worker).
    #[serde(default)]
    pub activations: u64,
}

/// A canary: the candidate version and its share of the records (0 to 100).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryInfo {
    pub version: u64,
    pub percent: f64,
}

/// One line of the audit log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_ms: u64,
    pub who: String,
    /// `upload`, `activate`, `rollback` or `delete`.
    pub action: String,
    pub plugin: String,
    pub version: Option<u64>,
    pub digest: Option<String>,
    /// `accepted`, or `refused: <why>`.
    pub decision: String,
}

/// Why the registry refused a request.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "`{0}` is not a plugin name: use 1 to 64 characters of a-z, 0-9, `-`, `_` and `.`, starting with a letter or digit"
    )]
    BadName(String),
    #[error("no plugin named `{0}`")]
    NoPlugin(String),
    #[error("plugin `{0}` has no version {1}")]
    NoVersion(String, u64),
    #[error("version {1} of `{0}` is active; activate another version before deleting it")]
    Active(String, u64),
    #[error("plugin `{0}` has no earlier active version to roll back to")]
    NoEarlierVersion(String),
    #[error(
        "version {1} of `{0}` cannot be a canary: a canary needs another version active (activate one first)"
    )]
    CanaryOfActive(String, u64),
    #[error("registry storage")]
    Io(#[from] std::io::Error),
    #[error("registry index {0} is not readable: {1}")]
    Corrupt(String, String),
}

/// The registry (see the module docs).
pub struct Registry {
    store: Store,
    /// Serialises this process's changes; another worker's are caught by compare-and-swap.
    writing: tokio::sync::Mutex<()>,
    /// Bumped on every change seen: made here, or published by another worker.
    changed: Arc<tokio::sync::watch::Sender<u64>>,
}

/// Plugin names double as file names, so they are kept to a safe alphabet.
pub fn check_name(name: &str) -> Result<(), RegistryError> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::BadName(name.to_owned()))
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, RegistryError> {
    serde_json::to_vec(value).map_err(|e| RegistryError::Io(std::io::Error::other(e)))
}

impl Registry {
    fn with_store(store: Store) -> Self {
        Self {
            store,
            writing: tokio::sync::Mutex::new(()),
            changed: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// Opens (creating if needed) the registry in `dir`.
    pub fn open(dir: &Path) -> Result<Self, RegistryError> {
        Ok(Self::with_store(Store::dir(dir)?))
    }

    /// The registry every worker of a cluster shares, in the Redis at `redis`. It listens
    /// for the changes other workers publish while it lives.
    pub async fn connect(redis: &crate::state::RedisTarget) -> Result<Self, RegistryError> {
        let conn = redis.connect().await.map_err(store::redis_error)?;
        let registry = Self::with_store(Store::redis(conn));
        tokio::spawn(listen(redis.clone(), Arc::downgrade(&registry.changed)));
        Ok(registry)
    }

    /// Where the registry is, for messages.
    pub fn describe(&self) -> String {
        self.store.describe()
    }

    /// Changes as they happen: the value goes up on each (several may show as one).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn parse(name: &str, raw: Option<&[u8]>) -> Result<Option<PluginInfo>, RegistryError> {
        raw.map(|bytes| {
            serde_json::from_slice(bytes).map_err(|e| {
                RegistryError::Corrupt(format!("the index of `{name}`"), e.to_string())
            })
        })
        .transpose()
    }

    /// A plugin's index; `None` when it was never uploaded.
    pub async fn plugin(&self, name: &str) -> Result<Option<PluginInfo>, RegistryError> {
        check_name(name)?;
        Self::parse(name, self.store.read_index(name).await?.as_deref())
    }

    /// A plugin's index, which must exist.
    pub async fn existing(&self, name: &str) -> Result<PluginInfo, RegistryError> {
        self.plugin(name)
            .await?
            .ok_or_else(|| RegistryError::NoPlugin(name.to_owned()))
    }

    /// Every plugin, by name.
    pub async fn plugins(&self) -> Result<Vec<PluginInfo>, RegistryError> {
        let mut plugins = Vec::new();
        for name in self.store.names().await? {
            plugins.extend(self.plugin(&name).await?);
        }
        Ok(plugins)
    }

    /// One version's metadata.
    pub async fn version(&self, name: &str, version: u64) -> Result<VersionInfo, RegistryError> {
        find_version(&self.existing(name).await?, version).cloned()
    }

    /// One version's component bytes.
    pub async fn wasm(&self, name: &str, version: u64) -> Result<Vec<u8>, RegistryError> {
        let info = self.version(name, version).await?;
        self.store.read_blob(&info.digest).await
    }

    /// Reads the index of `name`, lets `change` edit it (`None`: never uploaded) and writes
    /// it back if it changed. When another worker changed it in between, `change` runs again
    /// on the fresh index.
    async fn update<T>(
        &self,
        name: &str,
        mut change: impl FnMut(&mut Option<PluginInfo>) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        check_name(name)?;
        let _writing = self.writing.lock().await;
        loop {
            let raw = self.store.read_index(name).await?;
            let before = Self::parse(name, raw.as_deref())?;
            let mut after = before.clone();
            let out = change(&mut after)?;
            let Some(after) = after.filter(|after| Some(after) != before.as_ref()) else {
                return Ok(out);
            };
            if self
                .store
                .swap_index(name, raw.as_deref(), &to_json(&after)?)
                .await?
            {
                self.changed.send_modify(|n| *n += 1);
                return Ok(out);
            }
        }
    }

    /// Like [`Registry::update`] for a plugin that must exist; gives back the new index.
    async fn update_existing(
        &self,
        name: &str,
        mut change: impl FnMut(&mut PluginInfo) -> Result<(), RegistryError>,
    ) -> Result<PluginInfo, RegistryError> {
        self.update(name, |plugin| {
            let plugin = plugin
                .as_mut()
                .ok_or_else(|| RegistryError::NoPlugin(name.to_owned()))?;
            change(plugin)?;
            Ok(plugin.clone())
        })
        .await
    }

    /// Stores validated component bytes as the next version of `name`. Bytes already
    /// stored under that name give back their version (`false`: nothing new was stored).
    pub async fn upload(
        &self,
        name: &str,
        bytes: &[u8],
        inspection: Inspection,
        who: &str,
    ) -> Result<(VersionInfo, bool), RegistryError> {
        check_name(name)?;
        self.store.write_blob(&inspection.digest, bytes).await?;
        let uploaded_at_ms = now_ms() as u64;
        self.update(name, |plugin| {
            let plugin = plugin.get_or_insert_with(|| PluginInfo {
                name: name.to_owned(),
                ..PluginInfo::default()
            });
            if let Some(existing) = plugin
                .versions
                .iter()
                .find(|v| v.digest == inspection.digest)
            {
                return Ok((existing.clone(), false));
            }
            let info = VersionInfo {
                name: name.to_owned(),
                version: plugin.last_version + 1,
                digest: inspection.digest.clone(),
                size_bytes: inspection.size_bytes,
                wit_version: inspection.wit_version.to_owned(),
                world: inspection.world,
                exports: inspection.exports.clone(),
                imports: inspection.imports.clone(),
                uploaded_at_ms,
                uploaded_by: who.to_owned(),
            };
            plugin.last_version = info.version;
            plugin.versions.push(info.clone());
            Ok((info, true))
        })
        .await
    }

    /// Deletes a version that is not active. Its bytes stay while another plugin name
    /// stores the same content.
    pub async fn delete(&self, name: &str, version: u64) -> Result<VersionInfo, RegistryError> {
        let mut removed = None;
        self.update_existing(name, |plugin| {
            if plugin.active == Some(version) {
                return Err(RegistryError::Active(name.to_owned(), version));
            }
            let at = plugin
                .versions
                .iter()
                .position(|v| v.version == version)
                .ok_or_else(|| RegistryError::NoVersion(name.to_owned(), version))?;
            removed = Some(plugin.versions.remove(at));
            Ok(())
        })
        .await?;
        let removed = removed.ok_or_else(|| RegistryError::NoVersion(name.to_owned(), version))?;
        let still_used = self
            .plugins()
            .await?
            .iter()
            .any(|p| p.versions.iter().any(|v| v.digest == removed.digest));
        if !still_used {
            self.store.delete_blob(&removed.digest).await?;
        }
        Ok(removed)
    }

    /// Makes `version` the active one (ending any canary); the one it replaces becomes the
    /// rollback target. Every worker running `name` swaps it in, even when it was active.
    pub async fn activate(&self, name: &str, version: u64) -> Result<PluginInfo, RegistryError> {
        self.update_existing(name, |plugin| {
            find_version(plugin, version)?;
            set_active(plugin, version);
            Ok(())
        })
        .await
    }

    /// Activates the canary's candidate if `candidate` still is it; `None` when it is not
    /// (ended or promoted already, by a call or another worker).
    pub async fn promote(
        &self,
        name: &str,
        candidate: u64,
    ) -> Result<Option<PluginInfo>, RegistryError> {
        self.update(name, |plugin| {
            let Some(plugin) = plugin
                .as_mut()
                .filter(|p| p.canary.as_ref().is_some_and(|c| c.version == candidate))
            else {
                return Ok(None);
            };
            set_active(plugin, candidate);
            Ok(Some(plugin.clone()))
        })
        .await
    }

    /// Starts (or changes) a canary of `version` with `percent` of the records.
    pub async fn start_canary(
        &self,
        name: &str,
        version: u64,
        percent: f64,
    ) -> Result<PluginInfo, RegistryError> {
        self.update_existing(name, |plugin| {
            find_version(plugin, version)?;
            if plugin.active == Some(version) || plugin.active.is_none() {
                return Err(RegistryError::CanaryOfActive(name.to_owned(), version));
            }
            plugin.canary = Some(CanaryInfo { version, percent });
            Ok(())
        })
        .await
    }

    /// Ends the canary without changing the active version: any canary, or only one of
    /// `candidate`.
    pub async fn end_canary(
        &self,
        name: &str,
        candidate: Option<u64>,
    ) -> Result<PluginInfo, RegistryError> {
        self.update_existing(name, |plugin| {
            if plugin
                .canary
                .as_ref()
                .is_some_and(|c| candidate.is_none_or(|v| v == c.version))
            {
                plugin.canary = None;
            }
            Ok(())
        })
        .await
    }

    /// The version a rollback would activate: the latest earlier active one not deleted.
    pub async fn rollback_target(&self, name: &str) -> Result<u64, RegistryError> {
        let plugin = self.existing(name).await?;
        rollback_target(&plugin).ok_or_else(|| RegistryError::NoEarlierVersion(name.to_owned()))
    }

    /// Activates the version that was active before the current one (skipping deleted
    /// ones). With `from`, only while `from` is active: `None` when it no longer is (another
    /// worker rolled it back first).
    pub async fn rollback(
        &self,
        name: &str,
        from: Option<u64>,
    ) -> Result<Option<PluginInfo>, RegistryError> {
        self.update(name, |plugin| {
            let plugin = plugin
                .as_mut()
                .ok_or_else(|| RegistryError::NoPlugin(name.to_owned()))?;
            if from.is_some_and(|from| plugin.active != Some(from)) {
                return Ok(None);
            }
            let target = rollback_target(plugin)
                .ok_or_else(|| RegistryError::NoEarlierVersion(name.to_owned()))?;
            let at = plugin
                .history
                .iter()
                .rposition(|&v| v == target)
                .unwrap_or(0);
            plugin.history.truncate(at);
            plugin.active = Some(target);
            plugin.canary = None;
            plugin.activations += 1;
            Ok(Some(plugin.clone()))
        })
        .await
    }

    /// Appends `entry` to the audit log.
    pub async fn audit(&self, entry: &AuditEntry) -> Result<(), RegistryError> {
        self.store.append_audit(&to_json(entry)?).await
    }

    /// The audit log, oldest first.
    pub async fn audit_log(&self) -> Result<Vec<AuditEntry>, RegistryError> {
        self.store
            .audit_lines()
            .await?
            .iter()
            .map(|line| {
                serde_json::from_str(line)
                    .map_err(|e| RegistryError::Corrupt("the audit log".into(), e.to_string()))
            })
            .collect()
    }
}

/// Follows the changes other workers publish, bumping `changed`, until the registry is
/// dropped. After a lost connection it subscribes again (on a cluster, through the next
/// seed node: a message published on any node reaches them all) and reports one change,
/// since some may have been missed.
async fn listen(redis: crate::state::RedisTarget, changed: Weak<tokio::sync::watch::Sender<u64>>) {
    use futures_util::StreamExt;
    let mut delay = Duration::from_millis(200);
    let mut node = 0;
    while changed.strong_count() > 0 {
        let client = redis.node(node);
        node += 1;
        let pubsub = match client {
            Ok(client) => client.get_async_pubsub().await,
            Err(e) => Err(e),
        };
        match pubsub {
            Ok(mut pubsub) => match pubsub.subscribe(store::changes_channel()).await {
                Ok(()) => {
                    delay = Duration::from_millis(200);
                    if let Some(changed) = changed.upgrade() {
                        changed.send_modify(|n| *n += 1);
                    }
                    let mut messages = pubsub.into_on_message();
                    while messages.next().await.is_some() {
                        let Some(changed) = changed.upgrade() else {
                            return;
                        };
                        changed.send_modify(|n| *n += 1);
                    }
                }
                Err(e) => tracing::warn!("registry changes: cannot subscribe: {e}"),
            },
            Err(e) => tracing::warn!("registry changes: cannot connect to Redis: {e}"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

fn find_version(plugin: &PluginInfo, version: u64) -> Result<&VersionInfo, RegistryError> {
    plugin
        .versions
        .iter()
        .find(|v| v.version == version)
        .ok_or_else(|| RegistryError::NoVersion(plugin.name.clone(), version))
}

fn set_active(plugin: &mut PluginInfo, version: u64) {
    if plugin.active != Some(version) {
        plugin.history.extend(plugin.active);
        plugin.active = Some(version);
    }
    plugin.canary = None;
    plugin.activations += 1;
}

impl AuditEntry {
    pub fn new(who: &str, action: &str, plugin: &str) -> Self {
        Self {
            at_ms: now_ms() as u64,
            who: who.to_owned(),
            action: action.to_owned(),
            plugin: plugin.to_owned(),
            version: None,
            digest: None,
            decision: "accepted".into(),
        }
    }
}

fn rollback_target(plugin: &PluginInfo) -> Option<u64> {
    plugin
        .history
        .iter()
        .rev()
        .copied()
        .find(|&previous| plugin.versions.iter().any(|v| v.version == previous))
}
