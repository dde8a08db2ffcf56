//! The `/v1` plugin routes: upload (validated, content-addressed), list, show, download,
//! activate, roll back and delete versions. Mutating routes need the admin bearer token and
//! are closed while none is configured; every change, refused ones too, goes to the audit
//! log.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::AppState;
use crate::control::{Control, ControlError};
use crate::errors::chain;
use crate::metrics::{Summary, UploadAnswered, UploadResult, VersionCounts};
use crate::registry::{self, AuditEntry, PluginInfo, RegistryError, VersionInfo};

/// Uploads larger than this are refused with 413 unless configured otherwise (Python
/// components are tens of MiB).
pub const DEFAULT_MAX_UPLOAD_BYTES: usize = 64 * 1024 * 1024;
/// How long validating (compiling) an upload may take before it is refused.
pub const DEFAULT_COMPILE_TIMEOUT: Duration = Duration::from_secs(60);
/// Where the admin token can come from, besides the config file.
pub const ADMIN_TOKEN_ENV: &str = "WEIR_ADMIN_TOKEN";

/// What the plugin routes need: the control of plugin versions, and who may use it.
pub struct PluginApi {
    pub control: Arc<Control>,
    /// The bearer token of mutating routes; `None` closes them.
    pub admin_token: Option<String>,
    /// Whether reading routes answer without the token.
    pub open_reads: bool,
    pub compile_timeout: Duration,
    /// The memory cap of the child process that validates an upload; `None`: validate in
    /// this process (bounded in time only).
    pub compile_memory_bytes: Option<u64>,
    /// Larger upload bodies are refused with 413.
    pub max_upload_bytes: usize,
}

/// A refusal, answered as `{"error": "..."}` with its status.
#[derive(Debug)]
pub struct ApiError(pub(super) StatusCode, pub(super) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        Self::from_registry(&e)
    }
}

impl ApiError {
    fn from_registry(e: &RegistryError) -> Self {
        let status = match e {
            RegistryError::BadName(_) => StatusCode::BAD_REQUEST,
            RegistryError::NoPlugin(_) | RegistryError::NoVersion(..) => StatusCode::NOT_FOUND,
            RegistryError::Active(..)
            | RegistryError::NoEarlierVersion(_)
            | RegistryError::CanaryOfActive(..) => StatusCode::CONFLICT,
            RegistryError::Io(_) | RegistryError::Corrupt(..) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, chain(e))
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let status = match &e {
            ControlError::Registry(e) => return Self::from_registry(e),
            ControlError::CannotRun { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ControlError::NotRunning(_) | ControlError::Loading { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        Self(status, chain(&e))
    }
}

impl PluginApi {
    pub(super) fn check_token(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let unauthorized = |why: String| ApiError(StatusCode::UNAUTHORIZED, why);
        let Some(expected) = &self.admin_token else {
            return Err(unauthorized(format!(
                "this route is closed: no admin token is configured (set `api.admin_token` in the \
                 config or the {ADMIN_TOKEN_ENV} environment variable)"
            )));
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| unauthorized("send `Authorization: Bearer <admin token>`".into()))?;
        if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            Ok(())
        } else {
            Err(unauthorized(
                "the bearer token is not the admin token".into(),
            ))
        }
    }

    pub(super) fn check_read(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.open_reads {
            Ok(())
        } else {
            self.check_token(headers)
        }
    }

    /// Writes an audit line; a failure to write it fails the request.
    pub(super) async fn audit(&self, entry: AuditEntry) -> Result<(), ApiError> {
        self.control
            .registry
            .audit(&entry)
            .await
            .map_err(ApiError::from)
    }
}

/// Compares without stopping at the first difference (the length is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) fn plugin_api(state: &AppState) -> Result<&Arc<PluginApi>, ApiError> {
    state.api.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "this server has no plugin registry (start the worker with --api)".into(),
        )
    })
}

/// `POST /v1/plugins/{name}`: the body is the component; 201 with the new version, or 200
/// with the existing one when these bytes were uploaded under this name before. The audit log
/// and `weir_plugin_uploads_total{result}` record every upload, refused ones too.
pub async fn upload(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<VersionInfo>), ApiError> {
    let api = plugin_api(&state)?;
    let mut entry = AuditEntry::new("admin", "upload", &name);
    entry.digest = Some(format!("sha256:{}", hex::encode(Sha256::digest(&body))));
    let outcome = store_upload(api, &name, &headers, &body).await;
    let result = match &outcome {
        Ok((info, created)) => {
            entry.version = Some(info.version);
            if *created {
                UploadResult::Created
            } else {
                entry.decision = "accepted: already stored".into();
                UploadResult::AlreadyStored
            }
        }
        Err((result, error)) => {
            if *result == UploadResult::Unauthorized {
                entry.who = "anonymous".into();
            }
            entry.decision = format!("refused: {}", error.1);
            *result
        }
    };
    state.metrics.emit(UploadAnswered(result));
    api.audit(entry).await?;
    let (info, created) = outcome.map_err(|(_, error)| error)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(info)))
}

/// Checks an upload and stores it; a refusal comes with its `weir_plugin_uploads_total`
/// result.
async fn store_upload(
    api: &PluginApi,
    name: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(VersionInfo, bool), (UploadResult, ApiError)> {
    api.check_token(headers)
        .map_err(|e| (UploadResult::Unauthorized, e))?;
    registry::check_name(name).map_err(|e| (UploadResult::BadName, e.into()))?;
    let inspection = api.validate(body).await?;
    api.control
        .registry
        .upload(name, body, inspection, "admin")
        .await
        .map_err(|e| (UploadResult::Error, e.into()))
}

/// `GET /v1/plugins`.
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Vec<PluginInfo>>, ApiError> {
    let api = plugin_api(&state)?;
    api.check_read(&headers)?;
    Ok(Json(api.control.registry.plugins().await?))
}

/// `GET /v1/plugins/{name}`.
pub async fn show(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<PluginInfo>, ApiError> {
    let api = plugin_api(&state)?;
    api.check_read(&headers)?;
    Ok(Json(api.control.registry.existing(&name).await?))
}

/// What `GET /v1/status` answers.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    /// Whether the pipeline runs with its plugin loaded (as `/readyz`).
    pub ready: bool,
    /// The plugin version the worker runs now.
    pub plugin: Option<RunningVersion>,
    /// A candidate version that takes a share of the records, while it is watched.
    pub canary: Option<CanaryVersion>,
    /// True while the active version is quarantined with nothing to fall back to: records
    /// wait until a version is activated.
    pub paused: bool,
    /// Fates of every record since the worker started.
    pub totals: Summary,
    /// The same per plugin version (the version that transformed each record).
    pub by_version: BTreeMap<u64, VersionCounts>,
}

#[derive(Debug, serde::Serialize)]
pub struct RunningVersion {
    pub name: String,
    pub version: u64,
    pub digest: String,
}

#[derive(Debug, serde::Serialize)]
pub struct CanaryVersion {
    pub version: u64,
    pub digest: String,
    /// Its share of the records, 0 to 100.
    pub percent: f64,
}

/// `GET /v1/status`: the pipeline's plugin version and record counts, per version too.
pub async fn status(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Status>, ApiError> {
    let api = plugin_api(&state)?;
    api.check_read(&headers)?;
    let running = api.control.running.as_ref();
    let routing = running.map(|r| r.active.routing());
    let plugin = routing.as_ref().map(|r| {
        let meta = r.stable.meta();
        RunningVersion {
            name: meta.name.clone(),
            version: meta.version,
            digest: meta.digest.clone(),
        }
    });
    let canary = routing.as_ref().and_then(|r| r.canary.as_ref()).map(|c| {
        let meta = c.plugin.meta();
        CanaryVersion {
            version: meta.version,
            digest: meta.digest.clone(),
            percent: c.percent,
        }
    });
    let elapsed = running.map_or(Duration::ZERO, |r| r.started.elapsed());
    Ok(Json(Status {
        ready: state.ready.load(std::sync::atomic::Ordering::Relaxed),
        plugin,
        canary,
        paused: running.is_some_and(|r| r.active.is_paused()),
        totals: state.metrics.summary(elapsed),
        by_version: state.metrics.by_version(),
    }))
}

/// `GET /v1/cluster`: the live workers of every pipeline, from their heartbeats in Redis
/// (partitions, plugin version, last heartbeat).
pub async fn cluster(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Vec<crate::cluster::WorkerInfo>>, ApiError> {
    let api = plugin_api(&state)?;
    api.check_read(&headers)?;
    let Some(redis) = &api.control.redis else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "this worker runs in embedded mode: there is no cluster (workers share one with --redis)".into(),
        ));
    };
    let workers = crate::cluster::live_workers(redis, None)
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot read the workers' heartbeats from Redis: {e}"),
            )
        })?;
    Ok(Json(workers))
}

/// `GET /v1/plugins/{name}/versions/{version}`.
pub async fn version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, u64)>,
    headers: HeaderMap,
) -> Result<Json<VersionInfo>, ApiError> {
    let api = plugin_api(&state)?;
    api.check_read(&headers)?;
    Ok(Json(api.control.registry.version(&name, version).await?))
}

/// `GET /v1/plugins/{name}/versions/{version}/wasm`: the component bytes.
pub async fn download(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, u64)>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let api = plugin_api(&state)?;
    api.check_read(&headers)?;
    let bytes = api.control.registry.wasm(&name, version).await?;
    Ok(([(header::CONTENT_TYPE, "application/wasm")], bytes))
}

/// `DELETE /v1/plugins/{name}/versions/{version}`: only a version that is not active.
pub async fn delete(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, u64)>,
    headers: HeaderMap,
) -> Result<Json<VersionInfo>, ApiError> {
    let api = plugin_api(&state)?;
    let mut entry = AuditEntry::new("admin", "delete", &name);
    entry.version = Some(version);
    let deleting = async { Ok(api.control.registry.delete(&name, version).await?) };
    let removed = api.audited(entry, &headers, deleting).await?;
    Ok(Json(removed))
}

/// The body of `POST /v1/plugins/{name}/activate`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Activation {
    pub version: u64,
    pub canary_percent: Option<f64>,
}

/// `POST /v1/plugins/{name}/activate` with `{"version": N}`.
pub async fn activate(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(activation): Json<Activation>,
) -> Result<Json<PluginInfo>, ApiError> {
    let api = plugin_api(&state)?;
    let mut entry = AuditEntry::new("admin", "activate", &name);
    entry.version = Some(activation.version);
    let version = activation.version;
    if let Some(percent) = activation.canary_percent {
        entry.action = "canary".into();
        let starting = async {
            if !(percent > 0.0 && percent <= 100.0) {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("canary_percent must be more than 0 and at most 100, got {percent}"),
                ));
            }
            let loaded = api.control.load_running(&name, version).await?;
            let plugin = api
                .control
                .registry
                .start_canary(&name, version, percent)
                .await?;
            api.control.apply(loaded).await?;
            Ok(plugin)
        };
        return Ok(Json(api.audited(entry, &headers, starting).await?));
    }
    let activating = async {
        // Loaded first: a version this worker cannot run is refused before it is active.
        let loaded = api.control.load_running(&name, version).await?;
        let plugin = api.control.registry.activate(&name, version).await?;
        api.control.apply(loaded).await?;
        Ok(plugin)
    };
    Ok(Json(api.audited(entry, &headers, activating).await?))
}

/// `POST /v1/plugins/{name}/rollback`: back to the version active before the current one.
pub async fn rollback(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<PluginInfo>, ApiError> {
    let api = plugin_api(&state)?;
    let entry = AuditEntry::new("admin", "rollback", &name);
    let rolling_back = async {
        // A canary is rolled back by ending it; the active version stays.
        let plugin = if api.control.registry.existing(&name).await?.canary.is_some() {
            api.control.registry.end_canary(&name, None).await?
        } else {
            api.control
                .registry
                .rollback(&name, None)
                .await?
                .ok_or_else(|| RegistryError::NoEarlierVersion(name.clone()))?
        };
        api.control.apply(None).await?;
        Ok(plugin)
    };
    Ok(Json(api.audited(entry, &headers, rolling_back).await?))
}

/// What a change reports to the audit log: the version and digest it ended on.
trait Audited {
    fn describe(&self, entry: &mut AuditEntry);
}

impl Audited for VersionInfo {
    fn describe(&self, entry: &mut AuditEntry) {
        entry.digest = Some(self.digest.clone());
    }
}

impl Audited for PluginInfo {
    /// The version the change ended on: the candidate of a canary, else the active one.
    fn describe(&self, entry: &mut AuditEntry) {
        entry.version = match &self.canary {
            Some(canary) if entry.action == "canary" => Some(canary.version),
            _ => self.active,
        };
        entry.digest = self
            .versions
            .iter()
            .find(|v| Some(v.version) == entry.version)
            .map(|v| v.digest.clone());
    }
}

impl PluginApi {
    /// Runs `change` if the request carries the admin token, and writes the outcome, either
    /// way, to the audit log.
    async fn audited<T: Audited>(
        &self,
        mut entry: AuditEntry,
        headers: &HeaderMap,
        change: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        let outcome = match self.check_token(headers) {
            Err(e) => {
                entry.who = "anonymous".into();
                Err(e)
            }
            Ok(()) => change.await,
        };
        match &outcome {
            Ok(done) => done.describe(&mut entry),
            Err(error) => entry.decision = format!("refused: {}", error.1),
        }
        self.audit(entry).await?;
        outcome
    }
}
