//! `GET /v1/state`: a stateful plugin's keyed state as this worker's store holds it durably
//! (writes of records not yet marked done are not shown), read-only, one JSON line per key
//! as `weir state dump` prints them (docs/state.md). Query: `partition`, `key` (UTF-8
//! text), `base64=true`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::plugins::{ApiError, plugin_api};

/// What the query asks for.
#[derive(Default)]
struct StateQuery {
    partition: Option<i32>,
    key: Option<String>,
    base64: bool,
}

impl StateQuery {
    fn parse(uri: &Uri) -> Result<Self, ApiError> {
        let bad = |why: String| ApiError(StatusCode::BAD_REQUEST, why);
        let mut query = Self::default();
        let pairs = form_urlencoded::parse(uri.query().unwrap_or("").as_bytes());
        for (name, value) in pairs {
            match name.as_ref() {
                "partition" => {
                    let p = value.parse().map_err(|_| {
                        bad(format!("partition `{value}` is not a partition number"))
                    })?;
                    query.partition = Some(p);
                }
                "key" => query.key = Some(value.into_owned()),
                "base64" => query.base64 = value == "true",
                other => {
                    return Err(bad(format!(
                        "unknown parameter `{other}` (use partition, key, base64)"
                    )));
                }
            }
        }
        Ok(query)
    }
}

pub async fn state(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    plugin_api(&state)?.check_read(&headers)?;
    let query = StateQuery::parse(&uri)?;
    let keyed = state.keyed.clone().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "this worker's state store keeps no keyed state".into(),
        )
    })?;
    let entries = tokio::task::spawn_blocking(move || keyed.entries())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, crate::errors::chain(&e)))?;
    let mut body = String::new();
    for entry in entries {
        if query.partition.is_some_and(|p| p != entry.partition)
            || query
                .key
                .as_ref()
                .is_some_and(|k| k.as_bytes() != entry.key)
        {
            continue;
        }
        body.push_str(&entry.json_line(query.base64));
        body.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}
