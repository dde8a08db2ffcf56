//! Checking an upload before it is stored: is it a component of the contract this host runs
//! (`Plugin::inspect`, which compiles it)? Compiling untrusted bytes is bounded in time, and
//! in memory by doing it in a child process (`weir validate-upload`, hidden) that is killed
//! when its resident memory goes over the cap. The child builds its engine from the same
//! limits, so the artefact it leaves in the compile cache is the one an activation loads.

use std::io::Read;
use std::time::Duration;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::plugins::{ApiError, PluginApi};
use crate::config::LimitsConfig;
use crate::metrics::UploadResult;
use crate::runtime::{Inspection, LoadError, Plugin, Runtime, WIT_VERSION, World};

/// Where the child finds the worker's plugin limits (JSON).
const LIMITS_ENV: &str = "WEIR_VALIDATE_LIMITS";
/// How often the child's memory is looked at.
const WATCH_EVERY: Duration = Duration::from_millis(5);

/// What the child prints: the inspection, or why the bytes were refused.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Verdict {
    Component {
        digest: String,
        world: World,
        #[serde(default)]
        stateful: bool,
        size_bytes: usize,
        exports: Vec<String>,
        imports: Vec<String>,
    },
    /// Not WebAssembly, or a core module (400).
    NotAComponent(String),
    /// A component this host cannot run (422).
    Unsupported(String),
}

impl From<Result<Inspection, LoadError>> for Verdict {
    fn from(inspected: Result<Inspection, LoadError>) -> Self {
        match inspected {
            Ok(i) => Self::Component {
                digest: i.digest,
                world: i.world,
                stateful: i.stateful,
                size_bytes: i.size_bytes,
                exports: i.exports,
                imports: i.imports,
            },
            Err(e @ (LoadError::NotWasm | LoadError::CoreModule)) => {
                Self::NotAComponent(format!("the upload {e}"))
            }
            Err(e) => Self::Unsupported(format!("the upload {e}")),
        }
    }
}

impl Verdict {
    /// The inspection, or the refusal with its `weir_plugin_uploads_total` result.
    fn into_result(self) -> Result<Inspection, (UploadResult, ApiError)> {
        match self {
            Self::Component {
                digest,
                world,
                stateful,
                size_bytes,
                exports,
                imports,
            } => Ok(Inspection {
                digest,
                world,
                stateful,
                size_bytes,
                wit_version: WIT_VERSION,
                exports,
                imports,
            }),
            Self::NotAComponent(why) => Err((
                UploadResult::NotAComponent,
                ApiError(StatusCode::BAD_REQUEST, why),
            )),
            Self::Unsupported(why) => Err((
                UploadResult::Unsupported,
                ApiError(StatusCode::UNPROCESSABLE_ENTITY, why),
            )),
        }
    }
}

fn failed(e: impl std::fmt::Display) -> (UploadResult, ApiError) {
    (
        UploadResult::Error,
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("validation failed: {e}"),
        ),
    )
}

fn too_slow(api: &PluginApi) -> (UploadResult, ApiError) {
    (
        UploadResult::CompileTimeout,
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the upload did not compile within {} s",
                api.compile_timeout.as_secs()
            ),
        ),
    )
}

impl PluginApi {
    /// Inspects upload bytes within the time limit, and the memory limit when there is one.
    pub(super) async fn validate(
        &self,
        bytes: &[u8],
    ) -> Result<Inspection, (UploadResult, ApiError)> {
        match self.compile_memory_bytes {
            Some(cap) => self.validate_in_child(bytes, cap).await,
            None => {
                let runtime = self.control.runtime.clone();
                let bytes = bytes.to_vec();
                let inspecting =
                    tokio::task::spawn_blocking(move || Plugin::inspect(&runtime, &bytes));
                match tokio::time::timeout(self.compile_timeout, inspecting).await {
                    Ok(Ok(inspected)) => Verdict::from(inspected).into_result(),
                    Ok(Err(e)) => Err(failed(e)),
                    Err(_) => Err(too_slow(self)),
                }
            }
        }
    }

    async fn validate_in_child(
        &self,
        bytes: &[u8],
        cap: u64,
    ) -> Result<Inspection, (UploadResult, ApiError)> {
        let exe = std::env::current_exe().map_err(failed)?;
        let limits = serde_json::to_string(self.control.runtime.limits()).map_err(failed)?;
        let mut child = tokio::process::Command::new(exe)
            .arg("validate-upload")
            .env(LIMITS_ENV, limits)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(failed)?;
        let pid = child.id().unwrap_or(0);
        let mut stdin = child.stdin.take().ok_or_else(|| failed("no stdin"))?;
        let mut stdout = child.stdout.take().ok_or_else(|| failed("no stdout"))?;
        let bytes = bytes.to_vec();
        let writing = tokio::spawn(async move {
            // The child may die before reading everything; its verdict (or none) tells.
            let _ = stdin.write_all(&bytes).await;
        });
        let reading = async {
            let mut out = Vec::new();
            stdout.read_to_end(&mut out).await.map(|_| out)
        };
        let watching = async {
            loop {
                tokio::time::sleep(WATCH_EVERY).await;
                if rss_bytes(pid).is_some_and(|rss| rss > cap) {
                    return;
                }
            }
        };
        let outcome = tokio::time::timeout(self.compile_timeout, async {
            tokio::select! {
                out = reading => Some(out),
                () = watching => None,
            }
        })
        .await;
        writing.abort();
        let _ = child.start_kill();
        let _ = child.wait().await;
        match outcome {
            Err(_) => Err(too_slow(self)),
            Ok(None) => Err((
                UploadResult::CompileMemory,
                ApiError(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!(
                        "compiling the upload took more than api.compile_memory_mb = {} MiB",
                        cap >> 20
                    ),
                ),
            )),
            Ok(Some(Err(e))) => Err(failed(e)),
            Ok(Some(Ok(out))) => serde_json::from_slice::<Verdict>(&out)
                .map_err(|e| failed(format!("the validating process answered no verdict ({e})")))?
                .into_result(),
        }
    }
}

/// The resident memory of a process, from `/proc/<pid>/status`.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// `weir validate-upload`: the child's side. Reads the bytes from stdin, prints its verdict
/// as JSON on stdout.
pub fn validate_upload_child() -> anyhow::Result<()> {
    let limits: LimitsConfig = match std::env::var(LIMITS_ENV) {
        Ok(json) => serde_json::from_str(&json)?,
        Err(_) => LimitsConfig::default(),
    };
    let runtime = Runtime::new(&limits)?;
    let mut bytes = Vec::new();
    std::io::stdin().read_to_end(&mut bytes)?;
    let verdict = Verdict::from(Plugin::inspect(&runtime, &bytes));
    println!("{}", serde_json::to_string(&verdict)?);
    Ok(())
}
