//! The worker's HTTP servers: `/metrics` and the probes, and the plugin API when configured.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;

use super::plan::Plan;
use crate::api::{self, AppState, PluginApi};
use crate::metrics::Metrics;
use crate::state::keyed::KeyedRead;
use crate::tasks::Tasks;

/// Serves metrics, and the plugin API, where addresses are configured; returns the flag
/// `/readyz` reads.
pub(super) async fn serve(
    plan: &Plan,
    metrics: &Arc<Metrics>,
    plugin_api: Option<Arc<PluginApi>>,
    keyed: Option<Arc<dyn KeyedRead>>,
    tasks: &Tasks,
) -> anyhow::Result<Arc<AtomicBool>> {
    let ready = Arc::new(AtomicBool::new(false));
    let state = |api| AppState {
        metrics: metrics.clone(),
        ready: ready.clone(),
        api,
        keyed: keyed.clone(),
    };
    if let Some(addr) = plan.metrics_addr {
        let bound = serve_on(addr, state(None), tasks).await?;
        eprintln!("weir: serving /metrics, /healthz, /readyz on http://{bound}");
    }
    if let (Some(api_plan), Some(api)) = (&plan.api, plugin_api) {
        let bound = serve_on(api_plan.addr, state(Some(api)), tasks).await?;
        eprintln!(
            "weir: serving the plugin API on http://{bound}/v1 (and /metrics, /healthz, /readyz)"
        );
    }
    Ok(ready)
}

async fn serve_on(addr: SocketAddr, state: AppState, tasks: &Tasks) -> anyhow::Result<SocketAddr> {
    let (bound, server) = api::bind(addr, state)
        .await
        .with_context(|| format!("cannot serve on {addr}"))?;
    tasks.spawn(server);
    Ok(bound)
}
