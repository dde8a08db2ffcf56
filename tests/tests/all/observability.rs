//! Operating Weir (docs/operations.md) against a real Prometheus (Debian's package): the
//! shipped alert rules pass `promtool`'s unit tests, every alert among them; a real
//! Prometheus scraping real workers fires the DLQ, fault and retirement alerts for a faulty
//! plugin and nothing for a clean pipeline; and every query of the shipped Grafana dashboard
//! returns data from that Prometheus after the run, so a renamed metric breaks this test and
//! not a dashboard.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weir_tests::prometheus::Prometheus;
use weir_tests::repo_root;
use weir_tests::worker::{Cluster, Worker};

use crate::cluster::Setup;

fn deploy(path: &str) -> PathBuf {
    repo_root().join("deploy").join(path)
}

/// The names of the alerts in `deploy/prometheus/alerts.yml`.
fn alert_names() -> BTreeSet<String> {
    let text = std::fs::read_to_string(deploy("prometheus/alerts.yml")).expect("alerts.yml");
    let rules: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
    (rules["groups"].as_sequence().expect("groups").iter())
        .flat_map(|g| g["rules"].as_sequence().expect("rules").iter())
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect()
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy("prometheus"))
        .output()
        .expect("promtool (apt-get install prometheus; scripts/tools.sh does)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// `promtool check rules` and `promtool test rules`; and every alert has a test where it
/// fires (promtool compares the whole list of alerts at each time, so the series beside
/// the firing ones, and the times before, are where it must not fire).
#[test]
fn the_alert_rules_pass_promtool_and_every_alert_is_tested() {
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "alerts.test.yml"]);
    let tests = std::fs::read_to_string(deploy("prometheus/alerts.test.yml")).expect("tests");
    let tests: serde_yaml::Value = serde_yaml::from_str(&tests).expect("YAML");
    let (mut firing, mut silent) = (BTreeSet::new(), BTreeSet::new());
    for test in tests["tests"].as_sequence().expect("tests") {
        for case in test["alert_rule_test"].as_sequence().expect("cases") {
            let name = case["alertname"].as_str().expect("alertname").to_owned();
            match case["exp_alerts"]
                .as_sequence()
                .is_some_and(|a| !a.is_empty())
            {
                true => firing.insert(name),
                false => silent.insert(name),
            };
        }
    }
    let names = alert_names();
    assert_eq!(firing, names, "every alert has a case where it fires");
    let untested_silence: Vec<&String> = names.iter().filter(|n| !silent.contains(*n)).collect();
    println!(
        "{} alerts; every one fires in a test; these are checked silent only beside a \
         firing series: {untested_silence:?}",
        names.len()
    );
}

/// The shipped rules with every `for:` cut to 0s, so a run of a minute shows what the
/// shipped rules would fire after their waits.
fn rules_without_waits(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(deploy("prometheus/alerts.yml")).expect("alerts.yml");
    let cut: Vec<String> = (text.lines())
        .map(|line| match line.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 0s", &line[..line.len() - line.trim_start().len()]),
            None => line.to_owned(),
        })
        .collect();
    let path = dir.join("alerts.yml");
    std::fs::write(&path, cut.join("\n")).expect("rules");
    path
}

/// The alerts of `pipeline` firing now, by name.
fn firing(prometheus: &Prometheus, pipeline: &str) -> BTreeSet<String> {
    (prometheus.alerts().iter())
        .filter(|a| a["state"] == "firing" && a["labels"]["pipeline"] == pipeline)
        .map(|a| a["labels"]["alertname"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// Every query of the dashboard (panels and annotations), with its variables filled in
/// for `pipeline`: (where it is, PromQL).
fn dashboard_queries(pipeline: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy("grafana/dashboards/weir.json")).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("JSON");
    let fill = |expr: &str| {
        expr.replace("$pipeline", pipeline)
            .replace("$worker", ".*")
            .replace("$__rate_interval", "1m")
            .replace("$__range", "10m")
    };
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let title = panel["title"].as_str().unwrap_or("?");
            let expr = target["expr"].as_str().expect("expr");
            queries.push((format!("panel `{title}`"), fill(expr)));
        }
    }
    for annotation in dashboard["annotations"]["list"]
        .as_array()
        .expect("annotations")
    {
        let name = annotation["name"].as_str().unwrap_or("?");
        let expr = annotation["expr"].as_str().expect("expr");
        queries.push((format!("annotation `{name}`"), fill(expr)));
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        let query = variable["query"]["query"].as_str().expect("query");
        // label_values(<selector>, label): the selector has the data.
        let selector = query
            .strip_prefix("label_values(")
            .and_then(|q| q.rsplit_once(','))
            .map(|(selector, _)| fill(selector))
            .expect("a label_values query");
        let name = variable["name"].as_str().unwrap_or("?");
        queries.push((format!("variable `{name}`"), selector));
    }
    queries
}

/// Events `enrich` takes and `faulty` traps on.
fn trapping_events(from: usize, to: usize) -> Vec<String> {
    (from..to)
        .map(|i| json!({"id": format!("e{i}"), "user_id": format!("u{i}"), "ts": 1_704_067_200, "fault": "trap"}).to_string())
        .collect()
}

/// A real Prometheus scrapes two pipelines' workers with the shipped rules: `shop` runs
/// `enrich` in exactly-once mode, then version 2 (`faulty`, trapping on every record) is
/// activated through the API and the host quarantines it back to version 1; `quiet` runs
/// `enrich` over clean events. The DLQ, fault and retirement alerts fire for `shop` and none for `quiet`; then
/// every dashboard query has data.
#[test]
fn prometheus_fires_the_fault_alerts_for_a_faulty_plugin_and_none_for_a_clean_pipeline() {
    const TOKEN: &str = "obs-token";
    let s = Setup::new("obs", 2);
    let config = s.dir.path().join("worker.toml");
    let worker_config =
        format!("[api]\nadmin_token = \"{TOKEN}\"\n[quarantine]\nmin_records = 5\n");
    std::fs::write(&config, worker_config).expect("config");
    let api_port = weir_tests::free_port();
    let api = format!("127.0.0.1:{api_port}");
    let config = config.to_str().expect("utf-8");
    let shop = s.worker_of(
        "enrich",
        "shop",
        &[
            "--plugin-name",
            "shop",
            "--api",
            &api,
            "--config",
            config,
            // Exactly-once, so the transactions panel has data too.
            "--exactly-once",
            "--transactional-id",
            &format!("{}-shop", s.cluster.group),
        ],
    );
    // `quiet`: its own topics and group on the same broker and Redis.
    let quiet_cluster = Cluster {
        group: format!("{}-quiet", s.cluster.group),
        input: format!("{}-quiet", s.cluster.input),
        output: format!("{}-quiet", s.cluster.output),
        dlq: format!("{}-quiet", s.cluster.dlq),
        ..s.cluster.clone()
    };
    s.rt.block_on(async {
        for topic in [
            &quiet_cluster.input,
            &quiet_cluster.output,
            &quiet_cluster.dlq,
        ] {
            s.broker.create_topic(topic, 2).await;
        }
    });
    let quiet = Worker::start(
        crate::WEIR,
        s.dir.path(),
        "quiet",
        &quiet_cluster,
        &weir_tests::plugin("enrich"),
        &["--id", "/id", "--quiet", "--plugin-name", "quiet"],
    );
    let rules = rules_without_waits(s.dir.path());
    let targets = [&shop, &quiet].map(|w| format!("127.0.0.1:{}", w.metrics_port()));
    let prometheus = Prometheus::start(&targets, &[&rules]);
    let logs = || {
        format!(
            "shop:\n{}\nquiet:\n{}\nprometheus:\n{}",
            shop.log(),
            quiet.log(),
            prometheus.log()
        )
    };

    // `quiet`: clean events all along; `shop`: clean, then trapping ones on version 2.
    let clean = |from: usize, to: usize| -> Vec<String> {
        (from..to)
            .map(|i| {
                json!({"id": format!("c{i}"), "user_id": format!("u{i}"), "ts": 1_704_067_200})
                    .to_string()
            })
            .collect()
    };
    let produce = |topic: &str, events: Vec<String>| {
        let records = events.into_iter().map(|e| (None, e, Vec::new()));
        s.rt.block_on(s.broker.produce(topic, records));
    };
    produce(&quiet_cluster.input, clean(0, 200));
    produce(&s.cluster.input, clean(0, 50));
    shop.wait_metric(
        "weir_records_processed_total",
        50.0,
        Duration::from_secs(120),
    );
    // Prometheus has the counters before the faults (an increase needs a sample before it).
    let deadline = Instant::now() + Duration::from_secs(60);
    while prometheus
        .query(r#"weir_records_processed_total{pipeline="shop"} >= 50"#)
        .is_empty()
    {
        assert!(Instant::now() < deadline, "no scrape of shop:\n{}", logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    let faulty = std::fs::read(weir_tests::plugin("faulty")).expect("faulty built");
    let (status, body) =
        weir_tests::http::json(api_port, TOKEN, "POST", "/v1/plugins/shop", &faulty);
    assert_eq!(status, 201, "{body}");
    let activation = br#"{"version":2}"#;
    let (status, body) = weir_tests::http::json(
        api_port,
        TOKEN,
        "POST",
        "/v1/plugins/shop/activate",
        activation,
    );
    assert_eq!(status, 200, "{body}");
    let started = Instant::now();
    // Version 2 traps on everything: the host quarantines it back to version 1.
    let mut quarantined = None;
    let want: BTreeSet<String> = [
        "WeirDeadLetterRateHigh",
        "WeirPluginFaults",
        "WeirVersionRetired",
    ]
    .map(str::to_owned)
    .into();
    let mut batch = 0;
    let got = loop {
        // A little more of each every round, so rates have samples on both sides.
        produce(
            &s.cluster.input,
            trapping_events(batch * 20, batch * 20 + 20),
        );
        produce(
            &quiet_cluster.input,
            clean(200 + batch * 20, 220 + batch * 20),
        );
        batch += 1;
        if quarantined.is_none() {
            let (_, plugin) =
                weir_tests::http::json(api_port, TOKEN, "GET", "/v1/plugins/shop", b"");
            if plugin["active"] == 1 && batch > 1 {
                quarantined = Some(std::time::SystemTime::now());
            }
        }
        let got = firing(&prometheus, "shop");
        if want.is_subset(&got) && quarantined.is_some() {
            break got;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "firing for shop after 180 s: {got:?}; alerts: {:?}; up: {:?}; dead letters: {:?}\n{}",
            prometheus.alerts(),
            prometheus.query("up"),
            prometheus.query("weir_records_dead_lettered_total"),
            logs()
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    println!(
        "firing for the faulty pipeline {:.1} s after version 2 was activated: {got:?}",
        started.elapsed().as_secs_f64()
    );
    let noisy = firing(&prometheus, "quiet");
    assert!(noisy.is_empty(), "alerts for the clean pipeline: {noisy:?}");
    let pending: Vec<Value> = (prometheus.alerts().into_iter())
        .filter(|a| a["labels"]["pipeline"] == "quiet")
        .collect();
    assert!(
        pending.is_empty(),
        "the clean pipeline has alerts pending: {pending:?}"
    );
    let faults = (prometheus.alerts().into_iter())
        .find(|a| a["labels"]["alertname"] == "WeirPluginFaults" && a["state"] == "firing")
        .expect("WeirPluginFaults");
    assert_eq!(faults["labels"]["class"], "trap", "{faults}");
    assert_eq!(faults["labels"]["dlq"], s.cluster.dlq.as_str(), "{faults}");
    let description = faults["annotations"]["description"].as_str().unwrap_or("");
    assert!(
        description.contains(&format!("--dlq-topic {}", s.cluster.dlq)),
        "{description}"
    );

    // Every dashboard query has data for the faulty pipeline: the annotations' (a minute's
    // window) evaluated 5 s after the quarantine was seen, the others now. Lag comes with
    // librdkafka's statistics every 5 s, and its trend needs two samples: the queries get
    // 30 s to have data.
    let quarantined = quarantined
        .expect("quarantined")
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    let without_data = || -> Vec<(String, String)> {
        (dashboard_queries("shop").into_iter())
            .filter(|(place, expr)| {
                let at = place.starts_with("annotation").then_some(quarantined + 5.0);
                prometheus.query_at(expr, at).is_empty()
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut empty = without_data();
    while !empty.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        empty = without_data();
    }
    let queries = dashboard_queries("shop").len();
    println!(
        "{} of {queries} dashboard queries returned data",
        queries - empty.len()
    );
    assert!(
        empty.is_empty(),
        "dashboard queries without data: {empty:#?}"
    );
    assert!(shop.stop().success());
    assert!(quiet.stop().success());
}
