//! `weir plugin push|list|activate|rollback` and `weir pipeline status`: the plugin API
//! (`/v1`, docs/api.md) from the command line. Plain HTTP/1.1 over one connection per request; the API has no TLS.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::api::ADMIN_TOKEN_ENV;

/// Where the API is and the token to send.
pub struct Client {
    /// `host:port`.
    addr: String,
    token: Option<String>,
}

impl Client {
    /// `api` is `http://host:port` (or `host:port`); the token defaults to `WEIR_ADMIN_TOKEN`.
    pub fn new(api: &str, token: Option<String>) -> anyhow::Result<Self> {
        let addr = api
            .strip_prefix("http://")
            .unwrap_or(api)
            .trim_end_matches('/');
        if addr.starts_with("https://") || addr.contains('/') || !addr.contains(':') {
            bail!("--api `{api}` is not an address like http://127.0.0.1:8080");
        }
        let token = token
            .or_else(|| std::env::var(ADMIN_TOKEN_ENV).ok())
            .filter(|t| !t.is_empty());
        Ok(Self {
            addr: addr.to_owned(),
            token,
        })
    }

    /// Sends one request; returns the JSON answer, or the API's error as the error.
    fn call(&self, method: &str, path: &str, body: &[u8]) -> anyhow::Result<Value> {
        let mut stream = TcpStream::connect(&self.addr)
            .with_context(|| format!("cannot reach the weir API at {}", self.addr))?;
        stream.set_read_timeout(Some(Duration::from_secs(300)))?;
        let mut head = format!(
            "{method} /v1{path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n",
            self.addr,
            body.len()
        );
        if let Some(token) = &self.token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .context("reading the API's answer")?;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("the API's answer has no end of headers")?;
        let status: u16 = String::from_utf8_lossy(&response[..split])
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("the API's answer has no status")?;
        let body = &response[split + 4..];
        let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(json);
        }
        let reason = json["error"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
        bail!("{method} /v1{path}: {status}: {reason}")
    }
}

/// One line per version: `name vN sha256:… size world [active]`.
fn describe(version: &Value, active: Option<u64>) -> String {
    let number = version["version"].as_u64().unwrap_or(0);
    let digest = version["digest"].as_str().unwrap_or("");
    format!(
        "{} v{number}  {}  {} bytes  {}{}",
        version["name"].as_str().unwrap_or(""),
        &digest[..digest.len().min(19)],
        version["size_bytes"],
        version["world"].as_str().unwrap_or(""),
        if Some(number) == active {
            "  (active)"
        } else {
            ""
        }
    )
}

/// `weir plugin push <file> --name <name>`: uploads a version.
pub fn push(client: &Client, file: &std::path::Path, name: &str) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let version = client.call("POST", &format!("/plugins/{name}"), &bytes)?;
    println!("{}", describe(&version, None));
    Ok(())
}

/// `weir plugin list`: every plugin and version.
pub fn list(client: &Client) -> anyhow::Result<()> {
    let plugins = client.call("GET", "/plugins", b"")?;
    let plugins = plugins.as_array().cloned().unwrap_or_default();
    if plugins.is_empty() {
        println!("no plugins");
    }
    for plugin in plugins {
        let active = plugin["active"].as_u64();
        for version in plugin["versions"].as_array().into_iter().flatten() {
            println!("{}", describe(version, active));
        }
    }
    Ok(())
}

/// `weir plugin activate <name> <version> [--canary <percent>]`.
pub fn activate(
    client: &Client,
    name: &str,
    version: u64,
    canary: Option<f64>,
) -> anyhow::Result<()> {
    let mut body = serde_json::json!({ "version": version });
    if let Some(percent) = canary {
        body["canary_percent"] = percent.into();
    }
    let plugin = client.call(
        "POST",
        &format!("/plugins/{name}/activate"),
        body.to_string().as_bytes(),
    )?;
    print_active(name, &plugin);
    Ok(())
}

/// `weir plugin rollback <name>`.
pub fn rollback(client: &Client, name: &str) -> anyhow::Result<()> {
    let plugin = client.call("POST", &format!("/plugins/{name}/rollback"), b"")?;
    print_active(name, &plugin);
    Ok(())
}

fn print_active(name: &str, plugin: &Value) {
    match plugin["canary"].as_object() {
        Some(canary) => println!(
            "{name}: version {} is active; version {} is a canary with {} % of the records",
            plugin["active"], canary["version"], canary["percent"]
        ),
        None => println!("{name}: version {} is active", plugin["active"]),
    }
}

/// `weir pipeline status [--json]`: the worker's `/v1/status`.
pub fn status(client: &Client, json: bool) -> anyhow::Result<()> {
    let status = client.call("GET", "/status", b"")?;
    if json {
        println!("{status:#}");
        return Ok(());
    }
    let ready = if status["ready"] == true {
        "ready"
    } else {
        "not ready"
    };
    let plugin = &status["plugin"];
    let digest = plugin["digest"].as_str().unwrap_or("");
    println!(
        "{} v{}  {}  {ready}{}",
        plugin["name"].as_str().unwrap_or("(no plugin)"),
        plugin["version"],
        &digest[..digest.len().min(19)],
        if status["paused"] == true {
            ", paused: the active version is quarantined; activate a version to resume"
        } else {
            ""
        }
    );
    if let Some(canary) = status["canary"].as_object() {
        println!(
            "canary: v{} with {} % of the records",
            canary["version"], canary["percent"]
        );
    }
    let totals = &status["totals"];
    println!(
        "records: {} in, {} processed, {} dead-lettered, {} deduplicated, {} out",
        totals["records_in"],
        totals["processed"],
        totals["dead_lettered"],
        totals["deduplicated"],
        totals["records_out"]
    );
    for (version, counts) in status["by_version"].as_object().into_iter().flatten() {
        println!(
            "  v{version}: {} processed, {} dead-lettered{}",
            counts["processed"],
            counts["dead_lettered"],
            by_class(&counts["dead_lettered_by_class"])
        );
    }
    Ok(())
}

/// ` (trap 3, invalid 1)` for the classes with records; empty when there are none.
fn by_class(classes: &Value) -> String {
    let listed: Vec<String> = classes
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64().is_some_and(|n| n > 0))
        .map(|(class, n)| format!("{class} {n}"))
        .collect();
    if listed.is_empty() {
        String::new()
    } else {
        format!(" ({})", listed.join(", "))
    }
}
