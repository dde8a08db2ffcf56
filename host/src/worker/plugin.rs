//! The plugin a worker starts with: the `--plugin` file, or, when the worker serves the
//! plugin API, the registry's active version of its name, with the control that swaps
//! versions while it runs.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use super::plan::{ApiPlan, Plan, PluginPlan};
use crate::api::{self, PluginApi};
use crate::control::{self, Control, Running};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::runtime::{ActivePlugin, Plugin, Runtime};
use crate::tasks::Tasks;

/// The plugin to run, and the control behind the API when it is served. With the API, the
/// control follows the registry from now on (every worker of a cluster swaps together).
pub(super) async fn start(
    plan: &Plan,
    runtime: Arc<Runtime>,
    metrics: &Arc<Metrics>,
    tasks: &Tasks,
) -> anyhow::Result<(Arc<ActivePlugin>, Option<Arc<PluginApi>>)> {
    let PluginPlan { path, name, config } = &plan.plugin;
    let Some(api) = &plan.api else {
        let plugin = Plugin::load_file(&runtime, path, name, 1, config.clone())
            .with_context(|| format!("plugin {}", path.display()))?;
        return Ok((Arc::new(ActivePlugin::new(plugin)), None));
    };
    let mut control = control(plan, api, runtime, tasks).await?;
    let (plugin, activations) = active_version(&control, &plan.plugin).await?;
    let version = plugin.meta().version;
    let plugin = Arc::new(ActivePlugin::new(plugin));
    control.running = Some(Running {
        name: name.clone(),
        started: Instant::now(),
        active: plugin.clone(),
        config: config.clone(),
        metrics: metrics.clone(),
        applied: tokio::sync::Mutex::new((version, activations)),
        reserve: std::sync::Mutex::new(None),
        keyed_state_refusal: plan.keyed_state_refusal(),
    });
    let control = Arc::new(control);
    tasks.spawn(control::follow(control.clone()));
    tasks.spawn(control::watch_active(control.clone()));
    Ok((plugin, Some(Arc::new(plugin_api(api, control)))))
}

/// The control behind the plugin API. A cluster's workers share one registry in their
/// Redis; an embedded worker keeps its own in a directory.
async fn control(
    plan: &Plan,
    api: &ApiPlan,
    runtime: Arc<Runtime>,
    tasks: &Tasks,
) -> anyhow::Result<Control> {
    let registry = match plan.redis() {
        Some(redis) => Registry::connect(redis)
            .await
            .with_context(|| format!("plugin registry in the Redis at {redis}"))?,
        None => {
            let dir = &api.registry_dir;
            Registry::open(dir).with_context(|| format!("plugin registry in {}", dir.display()))?
        }
    };
    Ok(Control {
        registry,
        runtime,
        running: None,
        redis: plan.redis().cloned(),
        canary: plan.canary.clone(),
        quarantine: plan.quarantine.clone(),
        tasks: tasks.clone(),
    })
}

/// The plugin API over `control`: who may use it, and its limits on uploads.
fn plugin_api(api: &ApiPlan, control: Arc<Control>) -> PluginApi {
    let admin_token = (api.admin_token.clone())
        .or_else(|| std::env::var(api::ADMIN_TOKEN_ENV).ok())
        .filter(|t| !t.is_empty());
    if admin_token.is_none() {
        eprintln!(
            "weir: no admin token (api.admin_token or {}): the API's mutating routes answer 401",
            api::ADMIN_TOKEN_ENV
        );
    }
    PluginApi {
        control,
        admin_token,
        open_reads: api.open_reads,
        compile_timeout: api.compile_timeout,
        compile_memory_bytes: api.compile_memory_bytes,
        max_upload_bytes: api.max_upload_bytes,
    }
}

/// The registry's active version of `name`, loaded, with the activation count it is from;
/// when the registry has none, the `--plugin` file is uploaded (if new) and activated first.
async fn active_version(control: &Control, plugin: &PluginPlan) -> anyhow::Result<(Plugin, u64)> {
    use crate::registry::AuditEntry;
    let PluginPlan { path, name, config } = plugin;
    let name = name.as_str();
    let registry = &control.registry;
    let index = registry.plugin(name).await?;
    let (version, activations) = match index
        .as_ref()
        .and_then(|p| Some((p.active?, p.activations)))
    {
        Some(active) => active,
        None => {
            let bytes =
                std::fs::read(path).with_context(|| format!("plugin {}", path.display()))?;
            let inspection = Plugin::inspect(&control.runtime, &bytes)
                .with_context(|| format!("plugin {}", path.display()))?;
            let (info, _) = registry.upload(name, &bytes, inspection, "worker").await?;
            let index = registry.activate(name, info.version).await?;
            for action in ["upload", "activate"] {
                let mut entry = AuditEntry::new("worker", action, name);
                entry.version = Some(info.version);
                entry.digest = Some(info.digest.clone());
                registry.audit(&entry).await?;
            }
            eprintln!(
                "weir: registry had no active version of `{name}`: {} is version {}",
                path.display(),
                info.version
            );
            (info.version, index.activations)
        }
    };
    let bytes = registry.wasm(name, version).await?;
    let plugin = Plugin::load(&control.runtime, &bytes, name, version, config.clone())
        .with_context(|| format!("plugin `{name}` version {version} from the registry"))?;
    Ok((plugin, activations))
}
