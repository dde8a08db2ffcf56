//! `docker-compose.yml` cannot run here (no Docker engine), so this checks it for real
//! without Docker: each worker's command line, with the files it mounts, validates through
//! `weir run --check`; the workers reach the Kafka and Redis services of the file; Redis
//! keeps an AOF; Prometheus scrapes exactly what the workers serve; Grafana's data source is
//! that Prometheus.

use crate::WEIR;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;
use weir_tests::repo_root;

fn compose() -> Value {
    let text = std::fs::read_to_string(repo_root().join("docker-compose.yml")).expect("read");
    serde_yaml::from_str(&text).expect("docker-compose.yml is YAML")
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    let s = &compose["services"][name];
    assert!(!s.is_null(), "docker-compose.yml has no service `{name}`");
    s
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|seq| {
            seq.iter()
                .map(|x| x.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `(host path, container path)` of a service's bind mounts.
fn mounts(service: &Value) -> Vec<(PathBuf, String)> {
    strings(&service["volumes"])
        .into_iter()
        .filter(|v| v.starts_with("./"))
        .map(|v| {
            let mut parts = v.split(':');
            let host = repo_root().join(parts.next().expect("host path"));
            let inside = parts.next().expect("container path").to_owned();
            (host, inside)
        })
        .collect()
}

/// The effective configuration of a worker service, as `weir run --check` prints it.
fn worker_config(service: &Value) -> toml::Table {
    let command = strings(&service["command"]);
    assert_eq!(
        command.first().map(String::as_str),
        Some("weir"),
        "{command:?}"
    );
    let mounts = mounts(service);
    let args: Vec<String> = command[1..]
        .iter()
        .map(|arg| {
            mounts
                .iter()
                .find(|(_, inside)| inside == arg)
                .map_or_else(|| arg.clone(), |(host, _)| host.display().to_string())
        })
        .collect();
    let out = Command::new(WEIR)
        .args(&args)
        .arg("--check")
        .output()
        .expect("run weir --check");
    assert!(
        out.status.success(),
        "`weir {} --check` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    toml::from_str(&String::from_utf8_lossy(&out.stdout)).expect("--check prints TOML")
}

fn get<'a>(t: &'a toml::Table, path: &str) -> &'a str {
    let mut v: Option<&toml::Value> = None;
    for (i, key) in path.split('.').enumerate() {
        v = if i == 0 {
            t.get(key)
        } else {
            v.and_then(|x| x.get(key))
        };
    }
    v.and_then(toml::Value::as_str)
        .unwrap_or_else(|| panic!("`{path}` missing from the effective configuration"))
}

#[test]
fn compose_workers_validate_and_prometheus_scrapes_them() {
    let compose = compose();
    let workers: Vec<String> = compose["services"]
        .as_mapping()
        .expect("services")
        .keys()
        .filter_map(|k| k.as_str())
        .filter(|k| k.starts_with("worker"))
        .map(str::to_owned)
        .collect();
    assert_eq!(workers.len(), 2, "two workers: {workers:?}");

    // The Kafka the tests run, in both services that use its image.
    for name in ["kafka", "topics"] {
        assert_eq!(
            service(&compose, name)["image"].as_str(),
            Some(format!("apache/kafka:{}", weir_tests::KAFKA_VERSION).as_str()),
            "{name}"
        );
    }
    // Kafka (KRaft) advertises the address the workers use; Redis keeps an AOF.
    let kafka_env = &service(&compose, "kafka")["environment"];
    assert_eq!(
        kafka_env["KAFKA_PROCESS_ROLES"].as_str(),
        Some("broker,controller")
    );
    let advertised = kafka_env["KAFKA_ADVERTISED_LISTENERS"]
        .as_str()
        .expect("listeners");
    let redis_command = strings(&service(&compose, "redis")["command"]).join(" ");
    assert!(
        redis_command.contains("--appendonly yes"),
        "{redis_command}"
    );

    let mut scraped_by_workers = BTreeSet::new();
    for name in &workers {
        let config = worker_config(service(&compose, name));
        let bootstrap = get(&config, "kafka.bootstrap");
        assert!(
            advertised.ends_with(&format!("//{bootstrap}")),
            "{name} uses {bootstrap}; Kafka advertises {advertised}"
        );
        let redis = get(&config, "state.redis_url");
        assert!(redis.starts_with("redis://redis:"), "{name}: {redis}");
        // Traces go to the Jaeger service's OTLP/HTTP receiver.
        let otlp = get(&config, "tracing.otlp_endpoint");
        assert_eq!(otlp, "http://jaeger:4318", "{name}");
        assert!(service(&compose, "jaeger")["image"].as_str().is_some());
        let metrics = get(&config, "metrics.addr");
        let (host, port) = metrics.rsplit_once(':').expect("host:port");
        assert_eq!(
            host, "0.0.0.0",
            "{name} must serve metrics inside the network"
        );
        scraped_by_workers.insert(format!("{name}:{port}"));
        // The plugin is one the image builds.
        let plugin = get(&config, "plugin.path");
        let file = plugin
            .strip_prefix("/opt/weir/plugins/")
            .expect("in the image's plugin dir");
        let crate_name = file.strip_suffix(".wasm").expect(".wasm");
        assert!(
            repo_root().join("plugins").join(crate_name).is_dir(),
            "{plugin}"
        );
    }
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).expect("Dockerfile");
    assert!(dockerfile.contains("/opt/weir/plugins/"));

    // Prometheus scrapes exactly the workers' metrics addresses.
    let (prometheus_yml, _) = mounts(service(&compose, "prometheus"))
        .into_iter()
        .find(|(_, inside)| inside.ends_with("prometheus.yml"))
        .expect("prometheus.yml is mounted");
    let prometheus: Value =
        serde_yaml::from_str(&std::fs::read_to_string(prometheus_yml).expect("read"))
            .expect("YAML");
    let targets: BTreeSet<String> = prometheus["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .flat_map(|job| {
            job["static_configs"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|c| strings(&c["targets"]))
        .collect();
    assert_eq!(targets, scraped_by_workers);

    // Grafana's provisioned data source is that Prometheus.
    let (provisioning, _) = mounts(service(&compose, "grafana"))
        .into_iter()
        .next()
        .expect("grafana provisioning is mounted");
    let datasources: Value = serde_yaml::from_str(
        &std::fs::read_to_string(provisioning.join("datasources/prometheus.yml")).expect("read"),
    )
    .expect("YAML");
    let url = datasources["datasources"][0]["url"].as_str().expect("url");
    let port = strings(&service(&compose, "prometheus")["ports"])
        .first()
        .and_then(|p| p.rsplit(':').next().map(str::to_owned))
        .expect("prometheus port");
    assert_eq!(url, format!("http://prometheus:{port}"));

    // Prometheus loads the shipped alert rules, and Grafana the shipped dashboard, which
    // queries that data source.
    let inside = |service_name: &str, path: &str| {
        mounts(service(&compose, service_name))
            .into_iter()
            .find_map(|(host, inside)| {
                let rest = Path::new(path).strip_prefix(&inside).ok()?;
                Some(host.join(rest))
            })
            .unwrap_or_else(|| panic!("{service_name} does not mount {path}"))
    };
    for rules in strings(&prometheus["rule_files"]) {
        let host = inside("prometheus", &rules);
        assert_eq!(
            host,
            repo_root().join("deploy/prometheus/alerts.yml"),
            "{rules}"
        );
    }
    assert!(
        !strings(&prometheus["rule_files"]).is_empty(),
        "no rule_files"
    );
    let providers: Value = serde_yaml::from_str(
        &std::fs::read_to_string(provisioning.join("dashboards/weir.yml")).expect("read"),
    )
    .expect("YAML");
    let folder = providers["providers"][0]["options"]["path"]
        .as_str()
        .expect("path");
    let dashboard = inside("grafana", &format!("{folder}/weir.json"));
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dashboard).expect("read")).expect("JSON");
    let uid = datasources["datasources"][0]["uid"].as_str().expect("uid");
    assert_eq!(dashboard["panels"][0]["datasource"]["uid"], uid);
}

#[test]
fn check_names_what_is_wrong_without_connecting() {
    // A cluster config missing its DLQ topic: refused with the flag to pass.
    let out = Command::new(WEIR)
        .args([
            "run",
            "--plugin",
            "/nowhere/p.wasm",
            "--kafka",
            "127.0.0.1:1",
            "--group",
            "g",
            "--input-topic",
            "in",
            "--output-topic",
            "out",
            "--check",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("dlq.topic") && stderr.contains("--dlq-topic"),
        "{stderr}"
    );
}
