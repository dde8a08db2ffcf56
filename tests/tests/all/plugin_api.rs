//! The `/v1` plugin API in-process (`router` + `oneshot`) over a registry in a temporary
//! directory and real plugin components: auth (closed by default), upload validation
//! (400, 413, 422), content addressing, reads, deletion and the audit log.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::Value;
use tower::ServiceExt;
use weir::api::{self, AppState, PluginApi};
use weir::config::LimitsConfig;
use weir::control::{self, Control, Running};
use weir::metrics::Metrics;
use weir::registry::Registry;
use weir::runtime::{ActivePlugin, Plugin, Runtime};

const TOKEN: &str = "s3cret-token";

struct Api {
    state: AppState,
    _dir: tempfile::TempDir,
}

impl Api {
    fn new(token: Option<&str>, open_reads: bool, max_upload_bytes: usize) -> Self {
        Self::with(token, open_reads, max_upload_bytes, |_| {})
    }

    fn with(
        token: Option<&str>,
        open_reads: bool,
        max_upload_bytes: usize,
        adjust: impl FnOnce(&mut Control),
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut control = Control {
            registry: Registry::open(dir.path()).expect("registry"),
            runtime: Arc::new(Runtime::new(&LimitsConfig::default()).expect("runtime")),
            running: None,
            redis: None,
            canary: Default::default(),
            quarantine: Default::default(),
            tasks: Default::default(),
        };
        adjust(&mut control);
        let plugin_api = PluginApi {
            control: Arc::new(control),
            admin_token: token.map(str::to_owned),
            open_reads,
            compile_timeout: api::DEFAULT_COMPILE_TIMEOUT,
            // In this process: the test binary is not `weir`, so it cannot be the child.
            compile_memory_bytes: None,
            max_upload_bytes,
        };
        let state = AppState {
            metrics: Arc::new(Metrics::new()),
            ready: Arc::new(AtomicBool::new(true)),
            api: Some(Arc::new(plugin_api)),
            keyed: None,
        };
        Self { state, _dir: dir }
    }

    /// `weir_plugin_uploads_total` by result, from the `/metrics` text, sorted.
    fn uploads(&self) -> Vec<(String, u64)> {
        let text = self.state.metrics.render();
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
        let mut uploads: Vec<(String, u64)> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "weir_plugin_uploads_total")
            .map(|s| {
                let prometheus_parse::Value::Counter(n) = s.value else {
                    panic!("not a counter: {s:?}");
                };
                (s.labels["result"].to_owned(), n as u64)
            })
            .collect();
        uploads.sort();
        uploads
    }

    fn control(&self) -> &Arc<Control> {
        &self.state.api.as_deref().expect("plugin API").control
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, Vec<u8>) {
        // JSON bodies need the content type; component uploads do not mind it.
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = api::router(self.state.clone())
            .oneshot(request.body(Body::from(body)).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        (status, bytes.to_vec())
    }

    /// Status and JSON body.
    async fn json(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let (status, bytes) = self.call(method, path, token, body).await;
        let json = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{method} {path}: {status}, not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, json)
    }
}

fn component(name: &str) -> Vec<u8> {
    std::fs::read(weir_tests::plugin(name)).expect("plugin built by scripts/build-plugins.sh")
}

fn error(body: &Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {body}"))
}

#[tokio::test]
async fn mutating_routes_are_closed_without_a_configured_token() {
    let api = Api::new(None, true, api::DEFAULT_MAX_UPLOAD_BYTES);
    let (status, body) = api
        .json(
            "POST",
            "/v1/plugins/enrich",
            Some("anything"),
            component("enrich"),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(error(&body).contains(api::ADMIN_TOKEN_ENV), "{body}");
    let (status, body) = api
        .json("DELETE", "/v1/plugins/enrich/versions/1", None, vec![])
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    // Nothing was stored; both refusals are in the audit log.
    assert_eq!(
        api.json("GET", "/v1/plugins", None, vec![]).await.1,
        serde_json::json!([])
    );
    let audit = api.control().registry.audit_log().await.expect("audit");
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert!(
        audit
            .iter()
            .all(|e| e.decision.starts_with("refused") && e.who == "anonymous"),
        "{audit:?}"
    );
}

#[tokio::test]
async fn uploads_are_authorised_validated_and_content_addressed() {
    let api = Api::new(Some(TOKEN), true, api::DEFAULT_MAX_UPLOAD_BYTES);
    let enrich = component("enrich");

    let (status, body) = api
        .json("POST", "/v1/plugins/enrich", None, enrich.clone())
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = api
        .json("POST", "/v1/plugins/enrich", Some("wrong"), enrich.clone())
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    let (status, v1) = api
        .json("POST", "/v1/plugins/enrich", Some(TOKEN), enrich.clone())
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v1}");
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["world"], "batch");
    assert_eq!(v1["wit_version"], "0.1.0");
    assert_eq!(v1["size_bytes"], enrich.len());
    let digest = v1["digest"].as_str().expect("digest");
    assert!(
        digest.starts_with("sha256:") && digest.len() == 7 + 64,
        "{digest}"
    );
    assert!(
        v1["exports"]
            .as_array()
            .expect("exports")
            .iter()
            .any(|e| e == "weir:transform/batch-transform@0.1.0"),
        "{v1}"
    );

    // The same bytes again: the same version, nothing new.
    let (status, again) = api
        .json("POST", "/v1/plugins/enrich", Some(TOKEN), enrich.clone())
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["version"], 1);
    // Other bytes under the same name: the next version.
    let (status, v2) = api
        .json(
            "POST",
            "/v1/plugins/enrich",
            Some(TOKEN),
            component("filter"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v2}");
    assert_eq!(v2["version"], 2);

    // Not wasm, a core module, a component without the contract, a bad name.
    let (status, body) = api
        .json("POST", "/v1/plugins/bad", Some(TOKEN), b"hello".to_vec())
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error(&body).contains("not a WebAssembly file"), "{body}");
    let core = wat::parse_str("(module)").expect("wat");
    let (status, body) = api.json("POST", "/v1/plugins/bad", Some(TOKEN), core).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error(&body).contains("core WebAssembly module"), "{body}");
    let empty = wat::parse_str("(component)").expect("wat");
    let (status, body) = api
        .json("POST", "/v1/plugins/bad", Some(TOKEN), empty)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(error(&body).contains("weir:transform@0.1.0"), "{body}");
    let (status, body) = api
        .json(
            "POST",
            "/v1/plugins/Bad%20Name",
            Some(TOKEN),
            enrich.clone(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error(&body).contains("not a plugin name"), "{body}");

    // The audit log has every decision, in order.
    let audit = api.control().registry.audit_log().await.expect("audit");
    let decisions: Vec<(&str, Option<u64>, bool)> = audit
        .iter()
        .map(|e| {
            (
                e.who.as_str(),
                e.version,
                e.decision.starts_with("accepted"),
            )
        })
        .collect();
    assert_eq!(
        decisions,
        [
            ("anonymous", None, false),
            ("anonymous", None, false),
            ("admin", Some(1), true),
            ("admin", Some(1), true),
            ("admin", Some(2), true),
            ("admin", None, false),
            ("admin", None, false),
            ("admin", None, false),
            ("admin", None, false),
        ]
    );
    assert_eq!(audit[2].digest.as_deref(), Some(digest));
    // And `weir_plugin_uploads_total` counts each result.
    let uploads = api.uploads();
    let uploads: Vec<(&str, u64)> = uploads.iter().map(|(r, n)| (r.as_str(), *n)).collect();
    assert_eq!(
        uploads,
        [
            ("already_stored", 1),
            ("bad_name", 1),
            ("compile_memory", 0),
            ("compile_timeout", 0),
            ("created", 2),
            ("error", 0),
            ("not_a_component", 2),
            ("too_large", 0),
            ("unauthorized", 2),
            ("unsupported", 1),
        ]
    );
}

#[tokio::test]
async fn uploads_over_the_size_cap_get_413() {
    let api = Api::new(Some(TOKEN), true, 1024);
    let (status, _) = api
        .call(
            "POST",
            "/v1/plugins/enrich",
            Some(TOKEN),
            component("enrich"),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        api.json("GET", "/v1/plugins", None, vec![]).await.1,
        serde_json::json!([])
    );
    // Refused before its handler, it is still counted and audited.
    let too_large = api.uploads().into_iter().find(|(r, _)| r == "too_large");
    assert_eq!(too_large, Some(("too_large".into(), 1)));
    let audit = api.control().registry.audit_log().await.expect("audit");
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(
        (audit[0].who.as_str(), audit[0].plugin.as_str()),
        ("admin", "enrich")
    );
    assert!(
        audit[0]
            .decision
            .contains("larger than the limit of 1024 bytes"),
        "{audit:?}"
    );
}

#[tokio::test]
async fn versions_are_listed_downloaded_and_deleted() {
    let api = Api::new(Some(TOKEN), false, api::DEFAULT_MAX_UPLOAD_BYTES);
    let enrich = component("enrich");
    let filter = component("filter");
    assert_eq!(
        api.json("POST", "/v1/plugins/p", Some(TOKEN), enrich.clone())
            .await
            .0,
        StatusCode::CREATED
    );
    assert_eq!(
        api.json("POST", "/v1/plugins/p", Some(TOKEN), filter.clone())
            .await
            .0,
        StatusCode::CREATED
    );
    assert_eq!(
        api.json("POST", "/v1/plugins/q", Some(TOKEN), enrich.clone())
            .await
            .0,
        StatusCode::CREATED
    );

    // Reads need the token here (open_reads = false).
    assert_eq!(
        api.call("GET", "/v1/plugins", None, vec![]).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, list) = api.json("GET", "/v1/plugins", Some(TOKEN), vec![]).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .map(|p| p["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["p", "q"]);
    let (_, p) = api.json("GET", "/v1/plugins/p", Some(TOKEN), vec![]).await;
    assert_eq!(p["versions"].as_array().expect("versions").len(), 2);
    assert_eq!(p["active"], Value::Null);
    let (status, v2) = api
        .json("GET", "/v1/plugins/p/versions/2", Some(TOKEN), vec![])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v2["size_bytes"], filter.len());
    let (status, bytes) = api
        .call("GET", "/v1/plugins/p/versions/2/wasm", Some(TOKEN), vec![])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bytes, filter);
    let (status, body) = api
        .json("GET", "/v1/plugins/p/versions/9", Some(TOKEN), vec![])
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = api
        .json("GET", "/v1/plugins/nope", Some(TOKEN), vec![])
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // Deleting p's version 1 keeps the bytes q still uses; q's copy downloads.
    let (status, removed) = api
        .json("DELETE", "/v1/plugins/p/versions/1", Some(TOKEN), vec![])
        .await;
    assert_eq!(status, StatusCode::OK, "{removed}");
    assert_eq!(
        api.call("GET", "/v1/plugins/p/versions/1", Some(TOKEN), vec![])
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.call("GET", "/v1/plugins/q/versions/1/wasm", Some(TOKEN), vec![])
            .await
            .1,
        enrich
    );
    // Deleting the newest version does not free its number for the next upload.
    let (status, _) = api
        .json("DELETE", "/v1/plugins/p/versions/2", Some(TOKEN), vec![])
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, v3) = api
        .json("POST", "/v1/plugins/p", Some(TOKEN), enrich.clone())
        .await;
    assert_eq!(v3["version"], 3);
    let audit = api.control().registry.audit_log().await.expect("audit");
    let deletions: Vec<_> = audit
        .iter()
        .filter(|e| e.action == "delete")
        .map(|e| e.version)
        .collect();
    assert_eq!(deletions, [Some(1), Some(2)]);
}

#[tokio::test]
async fn activation_and_rollback_move_the_active_version() {
    let api = Api::new(Some(TOKEN), true, api::DEFAULT_MAX_UPLOAD_BYTES);
    for plugin in ["enrich", "filter", "split"] {
        let (status, _) = api
            .json("POST", "/v1/plugins/p", Some(TOKEN), component(plugin))
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let activate = |version: u64| {
        serde_json::to_vec(&serde_json::json!({ "version": version })).expect("json")
    };
    let post = |path: &'static str, body: Vec<u8>| api.json("POST", path, Some(TOKEN), body);

    let (status, body) = post("/v1/plugins/p/activate", activate(1)).await;
    assert_eq!(
        (status, &body["active"]),
        (StatusCode::OK, &serde_json::json!(1)),
        "{body}"
    );
    let (status, body) = post("/v1/plugins/p/activate", activate(3)).await;
    assert_eq!(
        (status, &body["active"]),
        (StatusCode::OK, &serde_json::json!(3)),
        "{body}"
    );
    // The active version cannot be deleted.
    let (status, body) = api
        .json("DELETE", "/v1/plugins/p/versions/3", Some(TOKEN), vec![])
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = post("/v1/plugins/p/rollback", vec![]).await;
    assert_eq!(
        (status, &body["active"]),
        (StatusCode::OK, &serde_json::json!(1)),
        "{body}"
    );
    let (status, body) = post("/v1/plugins/p/rollback", vec![]).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(error(&body).contains("no earlier active version"), "{body}");
    assert_eq!(
        api.json("GET", "/v1/plugins/p", None, vec![]).await.1["active"],
        1
    );

    // A canary is recorded beside the active version; a rollback ends it, not the active one.
    let canary = |version: u64, percent: f64| {
        serde_json::to_vec(&serde_json::json!({ "version": version, "canary_percent": percent }))
            .expect("json")
    };
    let (status, body) = post("/v1/plugins/p/activate", canary(2, 10.0)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["canary"],
        serde_json::json!({ "version": 2, "percent": 10.0 })
    );
    assert_eq!(body["active"], 1);
    let (status, body) = post("/v1/plugins/p/activate", canary(1, 10.0)).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "the active version is no canary: {body}"
    );
    let (status, body) = post("/v1/plugins/p/activate", canary(2, 0.0)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = post("/v1/plugins/p/rollback", vec![]).await;
    assert_eq!(
        (status, &body["canary"], &body["active"]),
        (StatusCode::OK, &Value::Null, &serde_json::json!(1)),
        "{body}"
    );

    // Unknown versions and missing tokens are refused.
    let (status, body) = post("/v1/plugins/p/activate", activate(9)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let unauthenticated = Request::post("/v1/plugins/p/activate")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(activate(2)))
        .expect("request");
    let response = api::router(api.state.clone())
        .oneshot(unauthenticated)
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        api.json("GET", "/v1/plugins/p", None, vec![]).await.1["active"],
        1
    );

    let audit = api.control().registry.audit_log().await.expect("audit");
    let changes: Vec<(&str, Option<u64>, bool)> = audit
        .iter()
        .filter(|e| e.action != "upload")
        .map(|e| {
            (
                e.action.as_str(),
                e.version,
                e.decision.starts_with("accepted"),
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            ("activate", Some(1), true),
            ("activate", Some(3), true),
            ("delete", Some(3), false),
            ("rollback", Some(1), true),
            ("rollback", None, false),
            ("canary", Some(2), true),
            ("canary", Some(1), false),
            ("canary", Some(2), false),
            ("rollback", Some(1), true),
            ("activate", Some(9), false),
            ("activate", Some(2), false),
        ]
    );
}

/// A worker keeps the version it swapped out loaded: rolling back to it, or activating it
/// again, swaps in that same loaded plugin (its warm instance included) instead of reading,
/// compiling and instantiating it again. Any other version is loaded from the registry, and
/// deleting the version in reserve drops it.
#[tokio::test]
async fn the_version_swapped_out_is_kept_loaded_for_a_rollback() {
    let runtime = Arc::new(Runtime::new(&LimitsConfig::default()).expect("runtime"));
    let load = |name: &str, version: u64| {
        Plugin::load(&runtime, &component(name), "p", version, Vec::new()).expect("load")
    };
    let active = Arc::new(ActivePlugin::new(load("enrich", 1)));
    let running = Running {
        name: "p".into(),
        started: std::time::Instant::now(),
        active: active.clone(),
        config: Vec::new(),
        metrics: Arc::new(Metrics::new()),
        // Version 1, activated once: what the registry will say after the first activation.
        applied: tokio::sync::Mutex::new((1, 1)),
        reserve: Default::default(),
        // As a worker that cannot keep keyed state: a stateful version is refused (below).
        keyed_state_refusal: Some("this test's worker keeps none"),
    };
    let api = Api::with(
        Some(TOKEN),
        true,
        api::DEFAULT_MAX_UPLOAD_BYTES,
        |control| {
            control.runtime = runtime.clone();
            control.running = Some(running);
        },
    );
    for plugin in ["enrich", "faulty", "enrich-c"] {
        let (status, _) = api
            .json("POST", "/v1/plugins/p", Some(TOKEN), component(plugin))
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let post = |path: &'static str, version: Option<u64>| {
        let body = version.map_or_else(Vec::new, |v| format!(r#"{{"version":{v}}}"#).into());
        api.json("POST", path, Some(TOKEN), body)
    };
    let activate = |version| post("/v1/plugins/p/activate", Some(version));
    let running_version = || active.current().meta().version;

    let v1 = active.current();
    assert_eq!(activate(1).await.0, StatusCode::OK);
    assert!(Arc::ptr_eq(&active.current(), &v1), "nothing to swap");
    assert_eq!(activate(2).await.0, StatusCode::OK);
    let v2 = active.current();
    assert_eq!(running_version(), 2);

    let (status, body) = post("/v1/plugins/p/rollback", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        Arc::ptr_eq(&active.current(), &v1),
        "the rollback loaded version 1 again"
    );
    assert_eq!(activate(2).await.0, StatusCode::OK);
    assert!(
        Arc::ptr_eq(&active.current(), &v2),
        "activating version 2 again loaded it again"
    );
    // Version 3 is loaded from the registry; 2 goes in reserve and 1 is dropped.
    assert_eq!(activate(3).await.0, StatusCode::OK);
    assert_eq!(running_version(), 3);
    assert_eq!(activate(2).await.0, StatusCode::OK);
    assert!(Arc::ptr_eq(&active.current(), &v2), "2 was in reserve");
    assert_eq!(activate(1).await.0, StatusCode::OK);
    assert_eq!(running_version(), 1);
    assert!(
        !Arc::ptr_eq(&active.current(), &v1),
        "version 1 was two swaps back: loaded anew"
    );
    // A stateful version cannot run where its state cannot be kept.
    let (status, _) = api
        .json("POST", "/v1/plugins/p", Some(TOKEN), component("metrics"))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = activate(4).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body.to_string()
            .contains("keeps keyed state (it imports weir:transform/state), which this worker cannot keep: this test's worker keeps none"),
        "{body}"
    );
    assert_eq!(running_version(), 1, "still version 1");

    // Deleting the version in reserve (2) frees it, once the worker follows the registry.
    let deleted = Arc::downgrade(&v2);
    drop(v2);
    tokio::spawn(control::follow(api.control().clone()));
    let (status, body) = api
        .json(
            "DELETE",
            "/v1/plugins/p/versions/2",
            Some(TOKEN),
            Vec::new(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while deleted.upgrade().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "version 2 still loaded after its deletion"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Every route the OpenAPI document lists answers (no 405, no bare 404 of an unknown
/// route), and a version has exactly the fields the document requires.
#[tokio::test]
async fn the_openapi_document_matches_the_routes() {
    let api = Api::new(Some(TOKEN), true, api::DEFAULT_MAX_UPLOAD_BYTES);
    let (status, doc) = api.json("GET", "/v1/openapi.json", None, vec![]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, version) = api
        .json("POST", "/v1/plugins/p", Some(TOKEN), component("enrich"))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let mut required: Vec<&str> = doc["components"]["schemas"]["Version"]["required"]
        .as_array()
        .expect("required")
        .iter()
        .map(|v| v.as_str().expect("name"))
        .collect();
    let mut fields: Vec<&str> = version
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    required.sort_unstable();
    fields.sort_unstable();
    assert_eq!(required, fields);

    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 8, "{paths:?}");
    for (path, item) in paths {
        for method in ["get", "post", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            let uri = format!("/v1{path}")
                .replace("{name}", "p")
                .replace("{version}", "1");
            let body = if path.ends_with("/activate") {
                br#"{"version":1}"#.to_vec()
            } else if path == "/plugins/{name}" && method == "post" {
                component("enrich")
            } else {
                Vec::new()
            };
            let (status, bytes) = api
                .call(&method.to_uppercase(), &uri, Some(TOKEN), body)
                .await;
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
            if status == StatusCode::NOT_FOUND {
                let json: Value = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|_| panic!("{method} {uri}: no such route"));
                assert!(json.get("error").is_some(), "{method} {uri}: {json}");
            }
        }
    }
}

#[tokio::test]
async fn the_cluster_route_lists_live_workers_from_redis() {
    let embedded = Api::new(Some(TOKEN), true, api::DEFAULT_MAX_UPLOAD_BYTES);
    let (status, body) = embedded.json("GET", "/v1/cluster", None, vec![]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(error(&body).contains("embedded mode"), "{body}");

    let redis = weir_tests::redis_server::RedisServer::start();
    let api = Api::with(Some(TOKEN), true, api::DEFAULT_MAX_UPLOAD_BYTES, |c| {
        c.redis = Some(redis.target());
    });
    let info = weir::cluster::WorkerInfo {
        id: "w1".into(),
        host: "h".into(),
        pipeline: "api-test".into(),
        topic: "in".into(),
        partitions: vec![0, 2],
        plugin: "p".into(),
        plugin_version: 3,
        plugin_digest: "sha256:ab".into(),
        last_seen_ms: 0,
    };
    let beating = tokio::spawn(weir::cluster::heartbeat(
        redis.target(),
        move || info.clone(),
        |_, _| {},
    ));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let workers = loop {
        let (status, workers) = api.json("GET", "/v1/cluster", None, vec![]).await;
        assert_eq!(status, StatusCode::OK, "{workers}");
        if workers.as_array().is_some_and(|w| !w.is_empty()) || std::time::Instant::now() > deadline
        {
            break workers;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    beating.abort();
    let worker = &workers[0];
    assert_eq!(worker["id"], "w1", "{workers}");
    assert_eq!(worker["partitions"], serde_json::json!([0, 2]), "{workers}");
    assert_eq!(worker["plugin_version"], 3, "{workers}");
    assert!(
        worker["last_seen_ms"].as_u64().is_some_and(|ms| ms > 0),
        "{workers}"
    );
}

#[tokio::test]
async fn the_state_route_shows_a_stateful_plugins_keyed_state() {
    use weir::state::keyed::{KeyedWrite, MemoryState};
    let mut api = Api::new(Some(TOKEN), false, api::DEFAULT_MAX_UPLOAD_BYTES);
    let (status, body) = api.json("GET", "/v1/state", Some(TOKEN), vec![]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(error(&body).contains("keeps no keyed state"), "{body}");

    let state = Arc::new(MemoryState::default());
    let set = |partition, key: &str, value: &[u8]| KeyedWrite {
        partition,
        key: key.into(),
        value: Some(value.to_vec()),
        expires_ms: None,
    };
    state.apply(vec![
        set(0, "count/ann", b"7"),
        set(1, "count/bob", &[0xff]),
    ]);
    api.state.keyed = Some(state);
    let (status, _) = api.call("GET", "/v1/state", None, vec![]).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "reads need the token here"
    );
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("UTF-8");
    let (status, all) = api.call("GET", "/v1/state", Some(TOKEN), vec![]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        text(all),
        "{\"partition\":0,\"key\":\"count/ann\",\"value\":\"7\"}\n\
         {\"partition\":1,\"key\":\"count/bob\",\"value\":\"/w==\",\"value_base64\":true}\n"
    );
    let (_, one) = api
        .call("GET", "/v1/state?key=count%2Fann", Some(TOKEN), vec![])
        .await;
    assert_eq!(text(one).lines().count(), 1);
    let (_, by_partition) = api
        .call("GET", "/v1/state?partition=1", Some(TOKEN), vec![])
        .await;
    assert!(text(by_partition).contains("count/bob"));
    let (status, body) = api
        .json("GET", "/v1/state?nope=1", Some(TOKEN), vec![])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error(&body).contains("unknown parameter `nope`"), "{body}");
}
