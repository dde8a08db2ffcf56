//! A worker following the registry: the plugin it runs is made to match the registry's
//! index of its name (active version and canary) on every change, whether made through this
//! worker's API or published by another worker of the cluster, and every few seconds in case
//! a notification was lost.

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use super::watch::watch_canary;
use super::{Control, ControlError, Running, no_keyed_state};
use crate::errors::chain;
use crate::metrics::{CanaryRouted, HotSwapped, PluginActivated};
use crate::registry::PluginInfo;
use crate::runtime::{LoadError, Plugin};

/// How often the registry is read again without a notification.
const RECHECK_EVERY: Duration = Duration::from_secs(2);

impl Running {
    /// Makes `plugin` the stable version. The version it replaces is kept in reserve, so
    /// that a rollback to it (or activating it again) swaps at once: no registry read, no
    /// compile, and its warm instances run the next batch.
    fn swap_in(&self, plugin: Arc<Plugin>) {
        plugin.set_in_reserve(false);
        let replaced = self.active.swap(plugin);
        replaced.set_in_reserve(true);
        *self.reserve.lock().unwrap_or_else(PoisonError::into_inner) = Some(replaced);
    }

    /// Drops the version in reserve once it is deleted from the registry (its memory with it).
    fn drop_deleted_reserve(&self, index: &PluginInfo) {
        let mut reserve = self.reserve.lock().unwrap_or_else(PoisonError::into_inner);
        let kept = |p: &Arc<Plugin>| index.versions.iter().any(|v| v.version == p.meta().version);
        if reserve.as_ref().is_some_and(|p| !kept(p)) {
            *reserve = None;
        }
    }

    /// The version in reserve, when it is `version`.
    fn reserve(&self, version: u64) -> Option<Arc<Plugin>> {
        let reserve = self.reserve.lock().unwrap_or_else(PoisonError::into_inner);
        reserve.clone().filter(|p| p.meta().version == version)
    }
}

/// Follows the registry for the worker's lifetime.
pub async fn follow(control: Arc<Control>) {
    let mut changes = control.registry.changes();
    loop {
        if let Err(e) = control.apply(None).await {
            tracing::warn!("following the plugin registry: {}", chain(&e));
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(RECHECK_EVERY) => {}
        }
    }
}

impl Control {
    /// Makes the running plugin what the registry says: its active version, swapped in
    /// when there was an activation (or rollback) since the last one applied, and its
    /// canary. `loaded` is a version the caller loaded already.
    pub async fn apply(
        self: &Arc<Self>,
        mut loaded: Option<Arc<Plugin>>,
    ) -> Result<(), ControlError> {
        let Some(running) = &self.running else {
            return Ok(());
        };
        let mut applied = running.applied.lock().await;
        let Some(index) = self.registry.plugin(&running.name).await? else {
            return Ok(());
        };
        running.drop_deleted_reserve(&index);
        let Some(active) = index.active else {
            return Ok(());
        };
        if *applied != (active, index.activations) {
            let routing = running.active.routing();
            let from = routing.stable.meta().version;
            // A promoted canary is already loaded: its records keep the instance they had.
            let candidate = routing
                .canary
                .filter(|c| index.canary.is_none() && c.plugin.meta().version == active);
            let promoted = candidate.is_some();
            let plugin = match candidate {
                Some(candidate) => candidate.plugin,
                None => self.load(&running.name, active, &mut loaded).await?,
            };
            running.swap_in(plugin);
            (running.metrics).emit(PluginActivated(running.active.current().meta()));
            running.metrics.emit(HotSwapped);
            tracing::info!(plugin = %running.name, from, to = active, promoted, "plugin version swapped in; batches under way finish on the old one");
            *applied = (active, index.activations);
        }
        let wanted = index.canary.as_ref().map(|c| (c.version, c.percent));
        let routing = running.active.routing();
        let had = routing.canary.as_ref();
        if wanted == had.map(|c| (c.plugin.meta().version, c.percent)) {
            return Ok(());
        }
        match wanted {
            None => {
                running.active.end_canary();
                tracing::info!(plugin = %running.name, "canary ended");
            }
            // Only the share changed: the same instance, still watched.
            Some((version, percent)) if had.is_some_and(|c| c.plugin.meta().version == version) => {
                if let Some(had) = had {
                    running.active.start_canary(had.plugin.clone(), percent);
                }
            }
            Some((version, percent)) => {
                let plugin = self.load(&running.name, version, &mut loaded).await?;
                running.active.start_canary(plugin, percent);
                tracing::info!(plugin = %running.name, stable = active, candidate = version, percent, "canary started");
                self.tasks
                    .spawn(watch_canary(self.clone(), active, version));
            }
        }
        running.metrics.emit(CanaryRouted(wanted));
        Ok(())
    }

    /// `version` of the running plugin `name`: `loaded` when it is that version, else
    /// loaded from the registry with the worker's plugin configuration.
    async fn load(
        &self,
        name: &str,
        version: u64,
        loaded: &mut Option<Arc<Plugin>>,
    ) -> Result<Arc<Plugin>, ControlError> {
        if let Some(plugin) = loaded.take_if(|p| p.meta().version == version) {
            return Ok(plugin);
        }
        self.load_running(name, version)
            .await?
            .ok_or_else(|| ControlError::NotRunning(name.to_owned()))
    }

    /// `version` of `name` with the worker's plugin configuration when the worker runs that
    /// plugin: the version in reserve when it is that one, else loaded from the registry
    /// (its `init` may refuse: 422); `None` for other plugins.
    pub async fn load_running(
        &self,
        name: &str,
        version: u64,
    ) -> Result<Option<Arc<Plugin>>, ControlError> {
        let Some(running) = self.running.as_ref().filter(|r| r.name == name) else {
            self.registry.version(name, version).await?;
            return Ok(None);
        };
        if let Some(plugin) = running.reserve(version) {
            return Ok(Some(plugin));
        }
        let bytes = self.registry.wasm(name, version).await?;
        let (runtime, name, config) = (
            self.runtime.clone(),
            name.to_owned(),
            running.config.clone(),
        );
        let loading = tokio::task::spawn_blocking(move || {
            Plugin::load(&runtime, &bytes, &name, version, config)
        });
        match loading.await {
            Ok(Ok(plugin)) if plugin.meta().stateful && running.keyed_state_refusal.is_some() => {
                let why = running.keyed_state_refusal.unwrap_or_default();
                Err(ControlError::CannotRun {
                    version,
                    source: LoadError::Contract(format!(
                        "version {version} {}",
                        no_keyed_state(why)
                    )),
                })
            }
            Ok(Ok(plugin)) => Ok(Some(Arc::new(plugin))),
            Ok(Err(source)) => Err(ControlError::CannotRun { version, source }),
            Err(source) => Err(ControlError::Loading { version, source }),
        }
    }
}
