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
//! Validation (is it a component of the supported contract?) happens before [`Registry`]
//! is called, in `runtime::Plugin::inspect`.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

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
    #[error("registry storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("registry index {0} is not readable: {1}")]
    Corrupt(String, String),
}

/// The registry in a local directory (see the module docs).
pub struct Registry {
    dir: PathBuf,
    /// Serialises changes: each reads an index, changes it and writes it back.
    writing: tokio::sync::Mutex<()>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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

impl Registry {
    /// Opens (creating if needed) the registry in `dir`.
    pub fn open(dir: &Path) -> Result<Self, RegistryError> {
        std::fs::create_dir_all(dir.join("blobs"))?;
        std::fs::create_dir_all(dir.join("plugins"))?;
        Ok(Self {
            dir: dir.to_owned(),
            writing: tokio::sync::Mutex::new(()),
        })
    }

    fn index_path(&self, name: &str) -> PathBuf {
        self.dir.join("plugins").join(format!("{name}.json"))
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir.join("blobs").join(format!("{hex}.wasm"))
    }

    /// A plugin's index; `None` when it was never uploaded.
    pub fn plugin(&self, name: &str) -> Result<Option<PluginInfo>, RegistryError> {
        check_name(name)?;
        let path = self.index_path(name);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| RegistryError::Corrupt(path.display().to_string(), e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A plugin's index, which must exist.
    pub fn existing(&self, name: &str) -> Result<PluginInfo, RegistryError> {
        self.plugin(name)?
            .ok_or_else(|| RegistryError::NoPlugin(name.to_owned()))
    }

    /// Every plugin, by name.
    pub fn plugins(&self) -> Result<Vec<PluginInfo>, RegistryError> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(self.dir.join("plugins"))? {
            let file = entry?.file_name();
            if let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".json")) {
                names.push(name.to_owned());
            }
        }
        names.sort();
        let mut plugins = Vec::new();
        for name in names {
            plugins.extend(self.plugin(&name)?);
        }
        Ok(plugins)
    }

    /// One version's metadata.
    pub fn version(&self, name: &str, version: u64) -> Result<VersionInfo, RegistryError> {
        let plugin = self.existing(name)?;
        plugin
            .versions
            .into_iter()
            .find(|v| v.version == version)
            .ok_or_else(|| RegistryError::NoVersion(name.to_owned(), version))
    }

    /// One version's component bytes.
    pub fn wasm(&self, name: &str, version: u64) -> Result<Vec<u8>, RegistryError> {
        let info = self.version(name, version)?;
        Ok(std::fs::read(self.blob_path(&info.digest))?)
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
        let _writing = self.writing.lock().await;
        let mut plugin = self.plugin(name)?.unwrap_or_else(|| PluginInfo {
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
        let blob = self.blob_path(&inspection.digest);
        if !blob.exists() {
            write_atomically(&blob, bytes)?;
        }
        let info = VersionInfo {
            name: name.to_owned(),
            version: plugin.last_version + 1,
            digest: inspection.digest,
            size_bytes: inspection.size_bytes,
            wit_version: inspection.wit_version.to_owned(),
            world: inspection.world,
            exports: inspection.exports,
            imports: inspection.imports,
            uploaded_at_ms: now_ms(),
            uploaded_by: who.to_owned(),
        };
        plugin.last_version = info.version;
        plugin.versions.push(info.clone());
        self.write_index(&plugin)?;
        Ok((info, true))
    }

    /// Deletes a version that is not active. Its bytes stay while another plugin name
    /// stores the same content.
    pub async fn delete(&self, name: &str, version: u64) -> Result<VersionInfo, RegistryError> {
        let _writing = self.writing.lock().await;
        let mut plugin = self.existing(name)?;
        if plugin.active == Some(version) {
            return Err(RegistryError::Active(name.to_owned(), version));
        }
        let at = plugin
            .versions
            .iter()
            .position(|v| v.version == version)
            .ok_or_else(|| RegistryError::NoVersion(name.to_owned(), version))?;
        let removed = plugin.versions.remove(at);
        self.write_index(&plugin)?;
        let still_used = self
            .plugins()?
            .iter()
            .any(|p| p.versions.iter().any(|v| v.digest == removed.digest));
        if !still_used {
            std::fs::remove_file(self.blob_path(&removed.digest))?;
        }
        Ok(removed)
    }

    /// Makes `version` the active one; the one it replaces becomes the rollback target.
    pub async fn activate(&self, name: &str, version: u64) -> Result<PluginInfo, RegistryError> {
        let _writing = self.writing.lock().await;
        let mut plugin = self.existing(name)?;
        if !plugin.versions.iter().any(|v| v.version == version) {
            return Err(RegistryError::NoVersion(name.to_owned(), version));
        }
        if plugin.active != Some(version) || plugin.canary.is_some() {
            if plugin.active != Some(version) {
                plugin.history.extend(plugin.active);
                plugin.active = Some(version);
            }
            plugin.canary = None;
            self.write_index(&plugin)?;
        }
        Ok(plugin)
    }

    /// Starts (or changes) a canary of `version` with `percent` of the records.
    pub async fn start_canary(
        &self,
        name: &str,
        version: u64,
        percent: f64,
    ) -> Result<PluginInfo, RegistryError> {
        let _writing = self.writing.lock().await;
        let mut plugin = self.existing(name)?;
        if !plugin.versions.iter().any(|v| v.version == version) {
            return Err(RegistryError::NoVersion(name.to_owned(), version));
        }
        if plugin.active == Some(version) || plugin.active.is_none() {
            return Err(RegistryError::CanaryOfActive(name.to_owned(), version));
        }
        plugin.canary = Some(CanaryInfo { version, percent });
        self.write_index(&plugin)?;
        Ok(plugin)
    }

    /// Ends a canary without changing the active version.
    pub async fn end_canary(&self, name: &str) -> Result<PluginInfo, RegistryError> {
        let _writing = self.writing.lock().await;
        let mut plugin = self.existing(name)?;
        plugin.canary = None;
        self.write_index(&plugin)?;
        Ok(plugin)
    }

    /// The version a rollback would activate: the latest earlier active one not deleted.
    pub fn rollback_target(&self, name: &str) -> Result<u64, RegistryError> {
        let plugin = self.existing(name)?;
        rollback_target(&plugin).ok_or_else(|| RegistryError::NoEarlierVersion(name.to_owned()))
    }

    /// Activates the version that was active before the current one (skipping deleted ones).
    pub async fn rollback(&self, name: &str) -> Result<PluginInfo, RegistryError> {
        let _writing = self.writing.lock().await;
        let mut plugin = self.existing(name)?;
        let target = rollback_target(&plugin)
            .ok_or_else(|| RegistryError::NoEarlierVersion(name.to_owned()))?;
        let at = plugin
            .history
            .iter()
            .rposition(|&v| v == target)
            .unwrap_or(0);
        plugin.history.truncate(at);
        plugin.active = Some(target);
        self.write_index(&plugin)?;
        Ok(plugin)
    }

    fn write_index(&self, plugin: &PluginInfo) -> Result<(), RegistryError> {
        let json = serde_json::to_vec_pretty(plugin)
            .map_err(|e| RegistryError::Io(std::io::Error::other(e)))?;
        write_atomically(&self.index_path(&plugin.name), &json)?;
        Ok(())
    }

    /// Appends `entry` to the audit log.
    pub fn audit(&self, entry: &AuditEntry) -> Result<(), RegistryError> {
        use std::io::Write;
        let mut line =
            serde_json::to_vec(entry).map_err(|e| RegistryError::Io(std::io::Error::other(e)))?;
        line.push(b'\n');
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("audit.jsonl"))?;
        file.write_all(&line)?;
        file.sync_data()?;
        Ok(())
    }

    /// The audit log, oldest first.
    pub fn audit_log(&self) -> Result<Vec<AuditEntry>, RegistryError> {
        let path = self.dir.join("audit.jsonl");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        text.lines()
            .map(|line| {
                serde_json::from_str(line)
                    .map_err(|e| RegistryError::Corrupt(path.display().to_string(), e.to_string()))
            })
            .collect()
    }
}

impl AuditEntry {
    pub fn new(who: &str, action: &str, plugin: &str) -> Self {
        Self {
            at_ms: now_ms(),
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

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}
