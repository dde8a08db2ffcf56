//! The HTTP server of a worker: `/metrics` (Prometheus text), `/healthz`, `/readyz`, and
//! the plugin API under `/v1` (`plugins.rs`) when the worker has a registry, with the
//! validation of uploads (`validate.rs`) and a stateful plugin's keyed state (`state.rs`). HTTP only: what a route changes goes through
//! [`crate::control`]. [`router`] builds it from shared state, so tests drive it
//! in-process with `oneshot`.

mod plugins;
mod state;
mod validate;

pub use plugins::{ADMIN_TOKEN_ENV, DEFAULT_COMPILE_TIMEOUT, DEFAULT_MAX_UPLOAD_BYTES, PluginApi};
pub use validate::validate_upload_child;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower_http::limit::RequestBodyLimitLayer;

use crate::metrics::{Metrics, UploadAnswered, UploadResult};

/// What the routes read.
#[derive(Clone)]
pub struct AppState {
    pub metrics: Arc<Metrics>,
    /// True once the plugin is loaded and the pipeline runs.
    pub ready: Arc<AtomicBool>,
    /// The plugin registry and who may change it; `None`: no `/v1` plugin routes.
    pub api: Option<Arc<PluginApi>>,
    /// The keyed state of this worker's stateful plugin (`GET /v1/state`).
    pub keyed: Option<Arc<dyn crate::state::keyed::KeyedRead>>,
}

pub fn router(state: AppState) -> Router {
    let max_upload = (state.api.as_ref()).map_or(DEFAULT_MAX_UPLOAD_BYTES, |a| a.max_upload_bytes);
    let v1 = Router::new()
        .route("/openapi.json", get(openapi))
        .route("/status", get(plugins::status))
        .route("/cluster", get(plugins::cluster))
        .route("/state", get(state::state))
        .route("/plugins", get(plugins::list))
        .route("/plugins/{name}", post(plugins::upload).get(plugins::show))
        .route("/plugins/{name}/activate", post(plugins::activate))
        .route("/plugins/{name}/rollback", post(plugins::rollback))
        .route(
            "/plugins/{name}/versions/{version}",
            get(plugins::version).delete(plugins::delete),
        )
        .route(
            "/plugins/{name}/versions/{version}/wasm",
            get(plugins::download),
        )
        // One limit for uploads, tower-http's (413), instead of axum's 2 MiB default.
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(max_upload))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            record_uploads_too_large,
        ));
    Router::new()
        .nest("/v1", v1)
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Uploads over the size cap never reach their handler (tower-http answers 413): they are
/// recorded here, in the audit log and `weir_plugin_uploads_total{result="too_large"}`.
async fn record_uploads_too_large(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let upload_of = (request.method() == axum::http::Method::POST)
        .then(|| request.uri().path().strip_prefix("/plugins/"))
        .flatten()
        .filter(|name| !name.contains('/'))
        .map(str::to_owned);
    let who = match &state.api {
        Some(api) if api.check_token(request.headers()).is_ok() => "admin",
        _ => "anonymous",
    };
    let response = next.run(request).await;
    if let (Some(name), Some(api)) = (upload_of, &state.api)
        && response.status() == StatusCode::PAYLOAD_TOO_LARGE
    {
        (state.metrics).emit(UploadAnswered(UploadResult::TooLarge));
        let mut entry = crate::registry::AuditEntry::new(who, "upload", &name);
        entry.decision = format!(
            "refused: the upload is larger than the limit of {} bytes",
            api.max_upload_bytes
        );
        if let Err(e) = api.audit(entry).await {
            tracing::error!("recording a refused upload failed: {}", e.1);
        }
    }
    response
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// The OpenAPI document of the `/v1` routes (`tests/tests/all/plugin_api.rs` calls every
/// route it lists).
async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the pipeline is not running\n",
        )
    }
}

/// Binds `addr`; returns the bound address (port 0 picks one) and the server to run.
pub async fn bind(
    addr: SocketAddr,
    state: AppState,
) -> std::io::Result<(SocketAddr, impl Future<Output = ()> + Send + 'static)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let server = async move {
        if let Err(e) = axum::serve(listener, router(state)).await {
            tracing::error!("the HTTP server on {bound} stopped: {e}");
        }
    };
    Ok((bound, server))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    fn state(ready: bool) -> AppState {
        AppState {
            metrics: Arc::new(Metrics::new()),
            ready: Arc::new(AtomicBool::new(ready)),
            api: None,
            keyed: None,
        }
    }

    async fn get(state: AppState, path: &str) -> (StatusCode, String) {
        let response = router(state)
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn metrics_and_probes() {
        let s = state(false);
        s.metrics.emit(crate::metrics::RecordsTaken { count: 3 });
        let (status, body) = get(s.clone(), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("weir_records_in_total 3"), "{body}");
        assert_eq!(get(s.clone(), "/healthz").await.0, StatusCode::OK);
        assert_eq!(
            get(s.clone(), "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        s.ready.store(true, Ordering::Relaxed);
        assert_eq!(get(s, "/readyz").await.0, StatusCode::OK);
    }
}
