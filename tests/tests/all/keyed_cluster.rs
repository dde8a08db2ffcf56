//! Stateful plugins in cluster mode, at-least-once (docs/state.md), against a real Apache
//! Kafka and a real Redis: two workers run `metrics` over input keyed by user; the second
//! joins mid-stream (a rebalance moves partitions away from a live worker), then the first
//! is killed with `kill -9` mid-stream; the keyed state in Redis ends where the input takes
//! it: every user's count is the number of distinct valid events, written once.

use crate::WEIR;
use crate::cluster::{Protocol, Setup};
use crate::keyed_state::{events, truth};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::Value;
use weir_tests::kafka_broker::KafkaBroker;
use weir_tests::redis_server::RedisServer;

/// The keyed state of `metrics` in Redis (`weir state dump --redis`): key → value, and the
/// keys found in more than one partition.
fn state_in_redis(s: &Setup) -> (BTreeMap<String, String>, Vec<String>) {
    let redis = s.cluster.redis.as_deref().expect("redis");
    let out = weir_tests::stdout_of(std::process::Command::new(WEIR).args([
        "state",
        "dump",
        "--plugin-name",
        "metrics",
        "--redis",
        redis,
    ]));
    let (mut state, mut twice) = (BTreeMap::new(), Vec::new());
    for line in out.lines() {
        let entry: Value = serde_json::from_str(line).expect("JSON");
        let key = entry["key"].as_str().expect("text key").to_owned();
        let value = entry["value"].as_str().expect("text value").to_owned();
        if state.insert(key.clone(), value).is_some() {
            twice.push(key);
        }
    }
    (state, twice)
}

#[test]
fn metrics_state_is_exact_after_kill_nine_of_one_of_two_workers() {
    let s = Setup::with(
        "keyed-kill9",
        4,
        KafkaBroker::start_local(),
        RedisServer::start(),
    );
    let lines = events(48_000);
    let (want_outputs, want_state) = truth(&lines);
    // Keyed by user, as docs/state.md says: a user's events, duplicates included, in one
    // partition.
    let produce = |lines: &[String]| {
        let records = lines.iter().map(|line| {
            let event: Value = serde_json::from_str(line).expect("JSON");
            let user = event["user_id"].as_str().expect("user_id").to_owned();
            (Some(user), line.clone(), Vec::new())
        });
        s.rt.block_on(s.broker.produce(&s.cluster.input, records));
    };
    let opts = s.quick_takeover(Protocol::Classic);
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    // A third of the stream first: a reads it alone.
    let third = lines.len() / 3;
    produce(&lines[..third]);
    let mut a = s.worker_of("metrics", "a", &opts);
    // b joins while a is mid-stream: a rebalance moves partitions, with their state, from a
    // live worker that still has batches of them in flight.
    a.wait_metric("weir_records_in_total", 4_000.0, Duration::from_secs(300));
    let b = s.worker_of("metrics", "b", &opts);
    let assigned = |log: &str| {
        (log.lines()).any(|l| l.contains("partitions assigned") && !l.contains("partitions=[]"))
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !assigned(&b.log()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(assigned(&b.log()), "b got no partitions:\n{}", b.log());
    // The rest of the stream, for both; kill -9 a once it has read 2,000 more records.
    let a_before = a.metric("weir_records_in_total").unwrap_or(0.0);
    produce(&lines[third..]);
    a.wait_metric(
        "weir_records_in_total",
        a_before + 2_000.0,
        Duration::from_secs(300),
    );
    let takeovers = |log: &str| -> Vec<String> {
        (log.lines())
            .filter(|l| l.contains("took the partition's keyed state over"))
            .map(str::to_owned)
            .collect()
    };
    let b_before = takeovers(&b.log()).len();
    let a_done = a.metric("weir_records_in_total").unwrap_or(0.0);
    a.kill();
    let killed = Instant::now();

    // b takes a's partitions over, loads their state from Redis and finishes the stream.
    let deadline = Duration::from_secs(180);
    let (state, twice) = loop {
        let (state, twice) = state_in_redis(&s);
        if state == want_state || killed.elapsed() > deadline {
            break (state, twice);
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    assert!(twice.is_empty(), "keys in two partitions: {twice:?}");
    // b took a's partitions over, with the state a had made durable in them.
    let b_log = b.log();
    let after_kill = &takeovers(&b_log)[b_before..];
    assert!(
        after_kill.iter().any(|l| !l.contains("loaded 0 keys")),
        "b took no state over from a: {after_kill:?}\n{b_log}"
    );
    let wrong = weir_tests::differences(&want_state, &state);
    assert!(
        state == want_state,
        "{} keys, {} wanted; e.g. {wrong:?}\n--- b:\n{}\n--- a:\n{}",
        state.len(),
        want_state.len(),
        b.log(),
        a.log()
    );

    // Outputs: at least once. Every (user, day) has its `active_user`, every user's highest
    // stage its `funnel` event; a repeat is what a's last batches wrote and never finished.
    let out = s
        .broker
        .read_topic(&s.cluster.output, Duration::from_secs(5), |_| false);
    let outputs: Vec<Value> = (out.iter())
        .map(|r| serde_json::from_str(&r.value_text()).expect("JSON"))
        .collect();
    let active = |outputs: &[Value]| {
        let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
        for o in outputs.iter().filter(|o| o["type"] == "active_user") {
            let key = (o["user_id"].to_string(), o["day"].to_string());
            *counts.entry(key).or_default() += 1;
        }
        counts
    };
    let (got, want) = (active(&outputs), active(&want_outputs));
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    assert!(missing.is_empty(), "active users lost: {missing:?}");
    assert_eq!(got.len(), want.len(), "no active user out of nowhere");
    let repeated: usize = got.values().map(|c| c - 1).sum();
    let top_stages = |outputs: &[Value]| -> BTreeSet<(String, String)> {
        let mut top = BTreeMap::new();
        for o in outputs.iter().filter(|o| o["type"] == "funnel") {
            top.insert(o["user_id"].to_string(), o["stage"].to_string());
        }
        top.into_iter().collect()
    };
    let funnel_events = outputs.iter().filter(|o| o["type"] == "funnel").count();
    let want_funnel = want_outputs
        .iter()
        .filter(|o| o["type"] == "funnel")
        .count();
    let stages_reached: BTreeSet<(String, String)> = (outputs.iter())
        .filter(|o| o["type"] == "funnel")
        .map(|o| (o["user_id"].to_string(), o["stage"].to_string()))
        .collect();
    assert!(
        top_stages(&want_outputs).is_subset(&stages_reached),
        "every user's highest stage has its funnel event"
    );
    let refused = (a.log().lines())
        .filter(|l| l.contains("were refused"))
        .count();
    println!(
        "keyed state after b joined ({b_before} takeovers; {refused} of a's batches refused \
         after the rebalance) and kill -9 of a (it had read {a_done} records; b then took {} \
         partitions' state over): {} keys equal the input's truth, {:.1} s after the kill; \
         outputs: {repeated} repeated active_user events (of {}), {funnel_events} funnel \
         events ({want_funnel} in one clean run)",
        after_kill.len(),
        state.len(),
        killed.elapsed().as_secs_f64(),
        want.len()
    );
    assert!(b.stop().success());
}
