//! Issue 6's exactly-once tests. They run against librdkafka's mock cluster
//! (`weir-mock-kafka`, a child process), because tansu 0.6 has no transactions.
//!
//! What the mock cannot show, measured: it does not hide the records of aborted
//! transactions from `read_committed` consumers, and it answers `TxnOffsetCommit` without
//! storing the offsets (`rd_kafka_mock_handle_TxnOffsetCommit` in librdkafka 2.12 reads
//! and checks them, then drops them), so offsets committed in transactions are invisible
//! and a restarted consumer starts from the beginning again. So on the mock these tests
//! assert: a run without aborts writes every output exactly once, one committed
//! transaction per batch; with kill -9 bounces nothing is lost and no id appears that was
//! not input. Repeats are counted and printed. The strict assertions are made by
//! [`on_a_real_kafka_every_id_is_committed_exactly_once_in_order`], against a real Apache
//! Kafka at `WEIR_KAFKA_BOOTSTRAP`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use weir_tests::kafka_broker::{KafkaBroker, TopicRecord};
use weir_tests::mock_kafka::MockKafka;
use weir_tests::worker::{Cluster, Worker};

const BIN: &str = env!("CARGO_BIN_EXE_weir-under-test");
const MOCK: &str = env!("CARGO_BIN_EXE_weir-mock-kafka");

fn produce_ids(broker: &KafkaBroker, topic: &str, n: usize) {
    let events = (0..n).map(|i| {
        let value = format!(r#"{{"id":"e{i}","user_id":"u{i}","ts":1704067200}}"#);
        (Some(format!("e{i}")), value, Vec::new())
    });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(broker.produce(topic, events));
}

fn cluster(mock: &MockKafka) -> Cluster {
    Cluster {
        bootstrap: mock.broker.bootstrap.clone(),
        redis: None,
        group: "g".into(),
        input: "in".into(),
        output: "out".into(),
        dlq: "dlq".into(),
    }
}

/// The flags of an exactly-once worker `name` in slot `slot`.
fn eos_flags(name: &str, slot: &str) -> Vec<String> {
    [
        "--plugin-config",
        "faults=off",
        "--id",
        "/id",
        "--quiet",
        "--exactly-once",
        "--transactional-id",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([
        format!("weir-test-{slot}"),
        "--state".into(),
        format!("state-{name}"),
    ])
    .chain(
        [
            // A killed worker's partitions move on within seconds.
            "--kafka-option",
            "session.timeout.ms=6000",
        ]
        .map(str::to_owned),
    )
    .collect()
}

/// Starts worker `name` in slot `slot` (its transactional id).
fn start(dir: &std::path::Path, name: &str, slot: &str, cluster: &Cluster) -> Worker {
    let flags = eos_flags(name, slot);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Worker::start(
        BIN,
        dir,
        name,
        cluster,
        &weir_tests::plugin("faulty"),
        &flags,
    )
}

/// `weir_transactions_total{result}` of a worker (`None` while it does not answer).
fn transactions(worker: &Worker, result: &str) -> Option<f64> {
    worker.metric_where("weir_transactions_total", &format!("result=\"{result}\""))
}

/// Waits until the output holds at least `at_least` distinct ids, failing after `timeout`;
/// returns them with how often each appears.
fn wait_for_ids(
    broker: &KafkaBroker,
    cluster: &Cluster,
    at_least: usize,
    timeout: Duration,
    logs: impl Fn() -> String,
) -> BTreeMap<String, usize> {
    let started = Instant::now();
    loop {
        let ids = output_ids(broker, cluster, at_least);
        if ids.len() >= at_least {
            return ids;
        }
        assert!(
            started.elapsed() < timeout,
            "{} of {at_least} ids in the output after {timeout:?} ({}); logs:\n{}",
            ids.len(),
            missing_by_partition(broker, cluster, &ids),
            logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Which input partitions the ids missing from the output come from, and the first few.
fn missing_by_partition(
    broker: &KafkaBroker,
    cluster: &Cluster,
    ids: &BTreeMap<String, usize>,
) -> String {
    let input = broker.read_topic(&cluster.input, Duration::from_secs(2), |_| false);
    let mut missing: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for r in &input {
        let id = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
        if !ids.contains_key(&id) {
            missing.entry(r.partition).or_default().push(r.offset);
        }
    }
    let summary: Vec<String> = missing
        .iter()
        .map(|(p, offsets)| {
            format!(
                "input partition {p}: {} missing, offsets {:?}..{:?}",
                offsets.len(),
                offsets.first(),
                offsets.last()
            )
        })
        .collect();
    summary.join("; ")
}

/// The record ids of the output topic, each with how often it appears: read until the topic
/// pauses, or holds `n` distinct ids (repeats do not count towards `n`).
fn output_ids(broker: &KafkaBroker, cluster: &Cluster, n: usize) -> BTreeMap<String, usize> {
    let distinct = |records: &[TopicRecord]| {
        records
            .iter()
            .filter_map(|r| r.header("weir.record-id"))
            .collect::<BTreeSet<_>>()
            .len()
    };
    let out = broker.read_topic(&cluster.output, Duration::from_secs(2), |r| {
        distinct(r) >= n
    });
    let mut ids = BTreeMap::new();
    for r in &out {
        if let Some(id) = r.header("weir.record-id") {
            *ids.entry(id).or_insert(0) += 1;
        }
    }
    ids
}

/// Every batch is written in a committed transaction (several batches share one when they
/// are written while the one before commits), every output exactly once, nothing aborted.
#[test]
fn a_worker_writes_every_batch_in_committed_transactions() {
    let mock = MockKafka::start(MOCK, 3, &[("in", 4), ("out", 4), ("dlq", 1)]);
    let n = 2_000;
    produce_ids(&mock.broker, "in", n);
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = cluster(&mock);
    let worker = start(dir.path(), "a", "a", &cluster);
    let ids = wait_for_ids(&mock.broker, &cluster, n, Duration::from_secs(120), || {
        worker.log()
    });
    let repeated: Vec<_> = ids.iter().filter(|&(_, &c)| c > 1).collect();
    assert_eq!(ids.len(), n, "ids in the output; log:\n{}", worker.log());
    assert!(
        repeated.is_empty(),
        "repeated without an abort: {repeated:?}"
    );
    let transactions = |result: &str| transactions(&worker, result).unwrap_or(-1.0);
    let committed = transactions("committed");
    assert!(committed >= 1.0, "committed transactions: {committed}");
    assert_eq!(transactions("aborted"), 0.0);
    assert_eq!(transactions("fenced"), 0.0);
    println!("{n} records in batches of at most 128, in {committed} committed transactions");
    assert!(worker.stop().success());
}

/// Workers in slots a and b over `cluster`'s `n` input ids; slot a killed with `kill -9`
/// three times (at ≥ 20 %, ≥ 45 % and ≥ 70 % of the ids in the output) and started again
/// with its transactional id; returns once every id is in the output: the last a and b,
/// and the time it took.
fn bounce_three_times(
    broker: &KafkaBroker,
    cluster: &Cluster,
    dir: &std::path::Path,
    n: usize,
) -> (Worker, Worker, Duration) {
    let started = Instant::now();
    let mut a = start(dir, "a", "a", cluster);
    let b = start(dir, "b", "b", cluster);
    let logs = |a: &Worker, b: &Worker| format!("a:\n{}\nb:\n{}", a.log(), b.log());
    for (bounce, share) in [(1, 20), (2, 45), (3, 70)] {
        let ids = wait_for_ids(
            broker,
            cluster,
            n * share / 100,
            Duration::from_secs(300),
            || logs(&a, &b),
        );
        a.kill();
        println!(
            "bounce {bounce}: slot a killed with {} of {n} ids in the output, {:.1} s in",
            ids.len(),
            started.elapsed().as_secs_f64()
        );
        a = start(dir, "a", "a", cluster);
    }
    wait_for_ids(broker, cluster, n, Duration::from_secs(600), || {
        logs(&a, &b)
    });
    (a, b, started.elapsed())
}

/// `weir_transactions_total{result}` summed over `workers`.
fn transactions_of(workers: &[&Worker], result: &str) -> f64 {
    workers
        .iter()
        .map(|w| transactions(w, result).unwrap_or(0.0))
        .sum()
}

/// In the style of Kafka's own transactions system test: 100,000 sequential ids over 6
/// partitions, two worker slots, and slot a killed with `kill -9` three times (at ≥ 20 %,
/// ≥ 45 % and ≥ 70 % of the ids in the output) and started again with the same
/// transactional id (on a real broker that fences its dead predecessor's open transaction;
/// the mock does not fence).
#[test]
fn three_kill_nine_bounces_lose_nothing() {
    let partitions = 6;
    let mock = MockKafka::start(
        MOCK,
        3,
        // 12 output partitions: the mock keeps at most 5 MB per partition and drops the
        // oldest records beyond that; 100,000 outputs with their repeats come near it on 6.
        &[("in", partitions), ("out", 12), ("dlq", 1)],
    );
    let n = 100_000;
    produce_ids(&mock.broker, "in", n);
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = cluster(&mock);
    let (a, b, elapsed) = bounce_three_times(&mock.broker, &cluster, dir.path(), n);
    // Everything written, repeats included.
    let ids = output_ids(&mock.broker, &cluster, usize::MAX);
    let repeated = ids.values().filter(|&&c| c > 1).count();
    let transactions = |result: &str| transactions_of(&[&a, &b], result);
    println!(
        "{n} ids through 2 slots with 3 kill -9 bounces in {:.1} s: all {} in the output, {repeated} \
         of them more than once (aborted transactions' records and re-reads after restarts, which \
         the mock shows; see the module doc); the last a and b committed {} transactions and \
         aborted {}",
        elapsed.as_secs_f64(),
        ids.len(),
        transactions("committed"),
        transactions("aborted"),
    );
    let unknown: BTreeSet<&String> = ids
        .keys()
        .filter(|id| {
            id.strip_prefix('e')
                .and_then(|i| i.parse::<usize>().ok())
                .is_none_or(|i| i >= n)
        })
        .collect();
    assert!(unknown.is_empty(), "ids that were never input: {unknown:?}");
    assert_eq!(ids.len(), n);
    let (a_log, b_log) = (a.log(), b.log());
    assert!(a.stop().success(), "{a_log}");
    assert!(b.stop().success(), "{b_log}");
}

/// The strict assertions the mock cannot show, on a real Apache Kafka at
/// `WEIR_KAFKA_BOOTSTRAP` (none is reachable from the machine Weir is developed on, so the
/// test is `#[ignore]`d; `scripts/test.sh` runs it when that variable is set, and says that
/// it did not otherwise). The same 100,000 ids over 6 partitions and three `kill -9`
/// bounces as above, on topics of its own; the output, read with `read_committed`: every
/// input id exactly once, none other, and each input partition's records in input order.
#[test]
#[ignore = "needs a real Apache Kafka: set WEIR_KAFKA_BOOTSTRAP (scripts/test.sh then runs it)"]
fn on_a_real_kafka_every_id_is_committed_exactly_once_in_order() {
    let bootstrap = std::env::var("WEIR_KAFKA_BOOTSTRAP")
        .expect("WEIR_KAFKA_BOOTSTRAP: the bootstrap address of a real Apache Kafka");
    let broker = KafkaBroker::external(&bootstrap);
    let run = format!("{}-{}", std::process::id(), weir_tests::free_port());
    let cluster = Cluster {
        bootstrap,
        redis: None,
        group: format!("weir-eos-{run}"),
        input: format!("weir-eos-in-{run}"),
        output: format!("weir-eos-out-{run}"),
        dlq: format!("weir-eos-dlq-{run}"),
    };
    let (partitions, n) = (6, 100_000);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        broker.create_topic(&cluster.input, partitions).await;
        broker.create_topic(&cluster.output, partitions).await;
        broker.create_topic(&cluster.dlq, 1).await;
    });
    produce_ids(&broker, &cluster.input, n);
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, elapsed) = bounce_three_times(&broker, &cluster, dir.path(), n);

    // Where each id was input.
    let input = broker.read_topic(&cluster.input, Duration::from_secs(5), |r| r.len() >= n);
    let position: BTreeMap<String, (i32, i64)> = input
        .iter()
        .map(|r| {
            let id = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
            (id, (r.partition, r.offset))
        })
        .collect();
    assert_eq!(position.len(), n, "input ids");
    // The output as read_committed consumers see it, in each partition's order.
    let output = broker.read_topic(&cluster.output, Duration::from_secs(10), |_| false);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut last: BTreeMap<(i32, i32), i64> = BTreeMap::new();
    let mut out_of_order = Vec::new();
    for r in &output {
        let id = r.header("weir.record-id").unwrap_or_default();
        *seen.entry(id.clone()).or_insert(0) += 1;
        let Some(&(from, offset)) = position.get(&id) else {
            continue;
        };
        // Records of one input partition in one output partition keep their input order.
        if let Some(before) = last.insert((r.partition, from), offset)
            && before > offset
        {
            out_of_order.push((id, r.partition, r.offset));
        }
    }
    let repeated: Vec<_> = seen.iter().filter(|&(_, &c)| c > 1).take(10).collect();
    let unknown: Vec<_> = seen
        .keys()
        .filter(|id| !position.contains_key(*id))
        .take(10)
        .collect();
    let missing = position.keys().filter(|id| !seen.contains_key(*id)).count();
    println!(
        "{n} ids through 2 slots with 3 kill -9 bounces on {} in {:.1} s: {} output records \
         read_committed, {} distinct, {missing} missing; {} transactions committed, {} aborted, \
         {} fenced",
        broker.bootstrap,
        elapsed.as_secs_f64(),
        output.len(),
        seen.len(),
        transactions_of(&[&a, &b], "committed"),
        transactions_of(&[&a, &b], "aborted"),
        transactions_of(&[&a, &b], "fenced"),
    );
    assert!(unknown.is_empty(), "ids that were never input: {unknown:?}");
    assert_eq!(missing, 0, "input ids missing from the output");
    assert!(
        repeated.is_empty(),
        "ids committed more than once: {repeated:?}"
    );
    assert!(
        out_of_order.is_empty(),
        "records out of their input partition's order (id, output partition, offset): {:?}",
        &out_of_order[..out_of_order.len().min(10)]
    );
    let (a_log, b_log) = (a.log(), b.log());
    assert!(a.stop().success(), "{a_log}");
    assert!(b.stop().success(), "{b_log}");
}

/// A worker frozen with SIGSTOP while another takes its partitions, resumed to find its
/// producer fenced: none of its batches in flight commit, it counts the fencing in
/// `weir_transactions_total{result="fenced"}`, and it joins the group again with a new
/// producer (`<slot>.1`), in the same process; the two then share the rest, and nothing is
/// lost. The mock does not fence a producer whose transactional id is registered again (it
/// hands out a new producer id), so the fencing a real broker would answer is injected
/// (`MockKafka::fence`) while only the resumed worker runs.
#[test]
fn a_paused_worker_resumed_after_a_takeover_is_fenced_and_joins_again() {
    let mut mock = MockKafka::start(MOCK, 3, &[("in", 4), ("out", 4), ("dlq", 1)]);
    let n = 40_000;
    produce_ids(&mock.broker, "in", n);
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = cluster(&mock);
    let a = start(dir.path(), "a", "a", &cluster);
    let logs = |a: &Worker, b: &Worker| format!("a:\n{}\nb:\n{}", a.log(), b.log());
    let fenced = |w: &Worker| transactions(w, "fenced");
    let before = wait_for_ids(
        &mock.broker,
        &cluster,
        n / 10,
        Duration::from_secs(120),
        || a.log(),
    );
    a.pause();
    let b = start(dir.path(), "b", "b", &cluster);
    let taken = wait_for_ids(
        &mock.broker,
        &cluster,
        before.len() + n / 10,
        Duration::from_secs(120),
        || logs(&a, &b),
    );
    b.pause();
    mock.fence();
    a.resume();
    let resumed = Instant::now();
    while fenced(&a).unwrap_or(0.0) < 1.0 {
        assert!(
            resumed.elapsed() < Duration::from_secs(120),
            "a was not fenced after its resume; logs:\n{}",
            logs(&a, &b)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let fenced_after = resumed.elapsed();
    mock.clear();
    b.resume();
    let ids = wait_for_ids(&mock.broker, &cluster, n, Duration::from_secs(300), || {
        logs(&a, &b)
    });
    let repeated = ids.values().filter(|&&c| c > 1).count();
    assert!(
        a.log().contains("starting the Kafka clients again"),
        "{}",
        a.log()
    );
    println!(
        "a paused with {} ids out; b took over, {} out; a resumed and was fenced {:.1} s \
         later ({} fencing(s) counted), and joined again; all {n} ids out, {repeated} more than \
         once",
        before.len(),
        taken.len(),
        fenced_after.as_secs_f64(),
        fenced(&a).unwrap_or(0.0)
    );
    assert_eq!(ids.len(), n);
    let (a_log, b_log) = (a.log(), b.log());
    assert!(a.stop().success(), "{a_log}");
    assert!(b.stop().success(), "{b_log}");
}

/// Exactly-once with a retry topic: a record that stays retryable for 5 s is parked in the
/// main pipeline's transaction and run again from the retry topic in the retry pipeline's
/// own transactions (transactional id `<slot>-retry`); every id is output exactly once.
#[test]
fn a_parked_record_comes_back_exactly_once() {
    let mock = MockKafka::start(MOCK, 3, &[("in", 2), ("out", 2), ("dlq", 1), ("retry", 1)]);
    let n = 1_000;
    let until_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis()
        + 5_000;
    let events = (0..n).map(|i| {
        let fault = match i {
            5 => format!(r#","fault":"retry_until","until_ms":{until_ms}"#),
            _ => String::new(),
        };
        let value = format!(r#"{{"id":"e{i}","user_id":"u{i}","ts":1704067200{fault}}}"#);
        (Some(format!("e{i}")), value, Vec::new())
    });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(mock.broker.produce("in", events));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("retry.toml");
    std::fs::write(
        &config,
        "[retry]\nmax_attempts = 1000\nmax_backoff_ms = 1000\nmax_elapsed_ms = 60000\n",
    )
    .expect("config");
    let mut flags: Vec<String> = eos_flags("a", "a")
        .into_iter()
        .map(|f| {
            if f == "faults=off" {
                "faults=on".into()
            } else {
                f
            }
        })
        .collect();
    flags.extend(["--retry-topic", "retry", "--config"].map(str::to_owned));
    flags.push(config.display().to_string());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let cluster = cluster(&mock);
    let worker = Worker::start(
        BIN,
        dir.path(),
        "a",
        &cluster,
        &weir_tests::plugin("faulty"),
        &flags,
    );
    let ids = wait_for_ids(&mock.broker, &cluster, n, Duration::from_secs(120), || {
        worker.log()
    });
    let repeated: Vec<_> = ids.iter().filter(|&(_, &c)| c > 1).collect();
    assert!(repeated.is_empty(), "repeated: {repeated:?}");
    assert_eq!(ids.len(), n);
    let parked = worker.metric("weir_records_parked_total").unwrap_or(0.0);
    assert!(parked >= 1.0, "parked {parked}");
    let transactions = |result: &str| transactions(&worker, result).unwrap_or(-1.0);
    assert_eq!(transactions("aborted"), 0.0);
    println!(
        "{n} ids exactly once; e5 parked {parked} times; {} transactions committed",
        transactions("committed")
    );
    let log = worker.log();
    assert!(worker.stop().success(), "{log}");
}
