//! Exactly-once mode against a real Apache Kafka (started per test, or
//! `WEIR_KAFKA_BOOTSTRAP`): workers write every batch in Kafka transactions, with the
//! consumer offsets in the same transaction, and the output is read back as a
//! `read_committed` consumer reads it, where every input id must appear exactly once and in
//! its input partition's order, whatever happened to the workers: `kill -9` bounces, a
//! worker frozen past its session and fenced by the broker, a record parked in a retry
//! topic. Also the changelog topic that is to keep keyed state in this mode.

use crate::WEIR;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use weir_tests::kafka_broker::{KafkaBroker, TopicRecord};
use weir_tests::worker::{Cluster, Worker};

fn produce_ids(broker: &KafkaBroker, topic: &str, n: usize) {
    produce_ids_in(broker, topic, 0..n);
}

/// Produces the ids `e<i>` for `i` in `ids`, keyed by id.
fn produce_ids_in(broker: &KafkaBroker, topic: &str, ids: std::ops::Range<usize>) {
    let events = ids.map(|i| {
        let value = format!(r#"{{"id":"e{i}","user_id":"u{i}","ts":1704067200}}"#);
        (Some(format!("e{i}")), value, Vec::new())
    });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(broker.produce(topic, events));
}

/// A broker (`WEIR_KAFKA_BOOTSTRAP`, else a fresh one) and topics of this test's own:
/// `in` and `out` with `partitions` partitions, `dlq` with one, and the `extra` topics
/// (named `<run>-<name>`, one partition each), whose names are returned.
fn cluster(name: &str, partitions: i32, extra: &[&str]) -> (KafkaBroker, Cluster, Vec<String>) {
    let broker = KafkaBroker::start();
    let run = format!(
        "eos-{name}-{}-{}",
        std::process::id(),
        weir_tests::free_port()
    );
    let cluster = Cluster {
        bootstrap: broker.bootstrap.clone(),
        redis: None,
        group: format!("{run}-group"),
        input: format!("{run}-in"),
        output: format!("{run}-out"),
        dlq: format!("{run}-dlq"),
    };
    let extra: Vec<String> = extra.iter().map(|e| format!("{run}-{e}")).collect();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        broker.create_topic(&cluster.input, partitions).await;
        broker.create_topic(&cluster.output, partitions).await;
        broker.create_topic(&cluster.dlq, 1).await;
        for topic in &extra {
            broker.create_topic(topic, 1).await;
        }
    });
    (broker, cluster, extra)
}

/// The flags of an exactly-once worker `name` in slot `slot` of `cluster` (its
/// transactional id is the group's name and the slot).
fn eos_flags(cluster: &Cluster, name: &str, slot: &str) -> Vec<String> {
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
        format!("{}-{slot}", cluster.group),
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
    start_with(dir, name, slot, cluster, &[])
}

/// As [`start`], with `extra` flags.
fn start_with(
    dir: &std::path::Path,
    name: &str,
    slot: &str,
    cluster: &Cluster,
    extra: &[&str],
) -> Worker {
    let flags = eos_flags(cluster, name, slot);
    let mut flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    flags.extend_from_slice(extra);
    Worker::start(
        WEIR,
        dir,
        name,
        cluster,
        &weir_tests::plugin("faulty"),
        &flags,
    )
}

/// The logs of workers a and b.
fn logs(a: &Worker, b: &Worker) -> String {
    format!("a:\n{}\nb:\n{}", a.log(), b.log())
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

/// What a `read_committed` consumer finds in the output, against the input.
struct Committed {
    records: usize,
    distinct: usize,
    missing: usize,
    repeated: Vec<(String, usize)>,
    unknown: Vec<String>,
    /// Records out of their input partition's order: the record and the one before it
    /// from the same input partition in the same output partition, each as
    /// `id@input partition:offset→output partition:offset`.
    out_of_order: Vec<(String, String, String)>,
}

impl Committed {
    /// Reads the input (`n` records) and the whole output of `cluster`.
    fn read(broker: &KafkaBroker, cluster: &Cluster, n: usize) -> Self {
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
        let output = broker.read_topic(&cluster.output, Duration::from_secs(5), |_| false);
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut last: BTreeMap<(i32, i32), (i64, String)> = BTreeMap::new();
        let mut out_of_order = Vec::new();
        for r in &output {
            let id = r.header("weir.record-id").unwrap_or_default();
            *seen.entry(id.clone()).or_insert(0) += 1;
            let Some(&(from, offset)) = position.get(&id) else {
                continue;
            };
            // Records of one input partition in one output partition keep their input order.
            let at = format!("{id}@{from}:{offset}→{}:{}", r.partition, r.offset);
            if let Some((before, before_at)) =
                last.insert((r.partition, from), (offset, at.clone()))
                && before > offset
            {
                out_of_order.push((id, at, before_at));
            }
        }
        Self {
            records: output.len(),
            distinct: seen.len(),
            missing: position.keys().filter(|id| !seen.contains_key(*id)).count(),
            repeated: seen
                .iter()
                .filter(|&(_, &c)| c > 1)
                .map(|(id, &c)| (id.clone(), c))
                .collect(),
            unknown: seen
                .keys()
                .filter(|id| !position.contains_key(*id))
                .cloned()
                .collect(),
            out_of_order,
        }
    }

    /// Every input id exactly once, none other, each input partition's records in order
    /// (but those of `parked`, which come back after the records behind them); fails with
    /// what is wrong, and `logs`.
    fn assert_exactly_once_in_order(&self, parked: &[&str], logs: impl Fn() -> String) {
        let first = |n: usize| n.min(10);
        let out_of_order: Vec<_> = self
            .out_of_order
            .iter()
            .filter(|(id, _, _)| !parked.contains(&id.as_str()))
            .collect();
        let wrong = if !self.unknown.is_empty() {
            format!(
                "ids that were never input: {:?}",
                &self.unknown[..first(self.unknown.len())]
            )
        } else if self.missing > 0 {
            format!("{} input ids missing from the output", self.missing)
        } else if !self.repeated.is_empty() {
            format!(
                "{} ids committed more than once, e.g. {:?}",
                self.repeated.len(),
                &self.repeated[..first(self.repeated.len())]
            )
        } else if !out_of_order.is_empty() {
            format!(
                "records out of their input partition's order (id, where, where the record \
                 before it was): {:?}",
                &out_of_order[..first(out_of_order.len())]
            )
        } else {
            return;
        };
        panic!("{wrong}; logs:\n{}", logs());
    }
}

/// Every batch is written in a committed transaction (several batches share one when they
/// are written while the one before commits), every output exactly once, nothing aborted.
#[test]
fn a_worker_writes_every_batch_in_committed_transactions() {
    let (broker, cluster, _) = cluster("one", 4, &[]);
    let n = 2_000;
    produce_ids(&broker, &cluster.input, n);
    let dir = tempfile::tempdir().expect("tempdir");
    let worker = start(dir.path(), "a", "a", &cluster);
    wait_for_ids(&broker, &cluster, n, Duration::from_secs(120), || {
        worker.log()
    });
    Committed::read(&broker, &cluster, n).assert_exactly_once_in_order(&[], || worker.log());
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
/// transactional id, which fences its dead predecessor's open transaction. The output, read
/// with `read_committed`: every input id exactly once, none other, and each input
/// partition's records in input order.
#[test]
fn three_kill_nine_bounces_commit_every_id_exactly_once_in_order() {
    let (partitions, n) = (6, 100_000);
    let (broker, cluster, _) = cluster("bounces", partitions, &[]);
    produce_ids(&broker, &cluster.input, n);
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, elapsed) = bounce_three_times(&broker, &cluster, dir.path(), n);
    let committed = Committed::read(&broker, &cluster, n);
    println!(
        "{n} ids through 2 slots with 3 kill -9 bounces in {:.1} s: {} output records \
         read_committed, {} distinct, {} missing, {} repeated; the last a and b committed {} \
         transactions, aborted {}, were fenced {}",
        elapsed.as_secs_f64(),
        committed.records,
        committed.distinct,
        committed.missing,
        committed.repeated.len(),
        transactions_of(&[&a, &b], "committed"),
        transactions_of(&[&a, &b], "aborted"),
        transactions_of(&[&a, &b], "fenced"),
    );
    committed.assert_exactly_once_in_order(&[], || logs(&a, &b));
    let (a_log, b_log) = (a.log(), b.log());
    assert!(a.stop().success(), "{a_log}");
    assert!(b.stop().success(), "{b_log}");
}

/// A worker frozen with SIGSTOP inside an open transaction (its outputs written, not
/// committed) while another takes its partitions over, and kept frozen past its
/// `transaction.timeout.ms`: the broker itself aborts that transaction and bumps the
/// producer's epoch. No error is injected. Resumed, its late commit fails: it finds itself
/// fenced (and starts its Kafka clients again), or its requests timed out while it was
/// frozen and it aborts (and bumps its epoch); it counts one or the other. Nothing it wrote
/// is visible to `read_committed` readers: every id is in the output exactly once, in order,
/// while it goes on, alive, and shares the rest.
#[test]
fn a_paused_worker_is_fenced_by_the_broker_and_its_writes_stay_invisible() {
    let (broker, cluster, _) = cluster("paused", 4, &[]);
    let n = 40_000;
    // The input arrives over 20 s, so the worker is busy, with a transaction open most of
    // the time, when it is frozen.
    let producer = {
        let (broker, topic) = (
            KafkaBroker::external(&broker.bootstrap),
            cluster.input.clone(),
        );
        std::thread::spawn(move || {
            for chunk in 0..40 {
                let ids = chunk * 1_000..(chunk + 1) * 1_000;
                produce_ids_in(&broker, &topic, ids);
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let timeout_ms = 10_000;
    let a = start_with(
        dir.path(),
        "a",
        "a",
        &cluster,
        &[
            "--kafka-option",
            &format!("transaction.timeout.ms={timeout_ms}"),
        ],
    );
    let before = wait_for_ids(&broker, &cluster, n / 10, Duration::from_secs(120), || {
        a.log()
    });
    // How many of a's transactions failed to commit: fenced or aborted.
    let refused = |a: &Worker| {
        ["fenced", "aborted"]
            .map(|result| transactions(a, result).unwrap_or(0.0))
            .iter()
            .sum::<f64>()
    };
    let refused_before = refused(&a);
    // Frozen inside an open transaction: paused again until the output shows one.
    let mut tries = 0;
    let open = loop {
        a.pause();
        let open = broker.in_open_transactions(&cluster.output, 4);
        if open.iter().any(|&pending| pending > 0) {
            break open;
        }
        tries += 1;
        assert!(tries < 200, "never paused inside an open transaction");
        a.resume();
        std::thread::sleep(Duration::from_millis(20 + tries % 30));
    };
    let paused = Instant::now();
    let b = start(dir.path(), "b", "b", &cluster);
    let taken = wait_for_ids(
        &broker,
        &cluster,
        before.len() + n / 10,
        Duration::from_secs(120),
        || logs(&a, &b),
    );
    // Past the transaction timeout (and the broker's 1 s check for timed-out ones).
    let past = Duration::from_millis(timeout_ms + 3_000);
    std::thread::sleep(past.saturating_sub(paused.elapsed()));
    let paused_for = paused.elapsed();
    a.resume();
    let resumed = Instant::now();
    while refused(&a) <= refused_before {
        assert!(
            resumed.elapsed() < Duration::from_secs(120),
            "a's late commit did not fail after its resume; logs:\n{}",
            logs(&a, &b)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused_after = resumed.elapsed();
    producer.join().expect("producer");
    let ids = wait_for_ids(&broker, &cluster, n, Duration::from_secs(300), || {
        logs(&a, &b)
    });
    let committed = Committed::read(&broker, &cluster, n);
    let refusal = a
        .log()
        .lines()
        .find(|l| {
            l.contains("cannot go on")
                || (l.contains("weir::kafka::transactions") && l.contains("aborted"))
        })
        .unwrap_or_default()
        .to_owned();
    println!(
        "a paused inside an open transaction ({open:?} records pending per output partition, \
         {tries} tries) with {} ids out; b took over, {} out; a resumed after {:.1} s and its \
         late commit failed {:.1} s later ({} fenced, {} aborted): {refusal}; all {} ids out, \
         {} records read_committed",
        before.len(),
        taken.len(),
        paused_for.as_secs_f64(),
        refused_after.as_secs_f64(),
        transactions(&a, "fenced").unwrap_or(0.0),
        transactions(&a, "aborted").unwrap_or(0.0),
        ids.len(),
        committed.records,
    );
    committed.assert_exactly_once_in_order(&[], || logs(&a, &b));
    let (a_log, b_log) = (a.log(), b.log());
    assert!(a.stop().success(), "{a_log}");
    assert!(b.stop().success(), "{b_log}");
}

/// Exactly-once with a retry topic: a record that stays retryable for 5 s is parked in the
/// main pipeline's transaction and run again from the retry topic in the retry pipeline's
/// own transactions (transactional id `<slot>-retry`); every id is output exactly once.
#[test]
fn a_parked_record_comes_back_exactly_once() {
    let (broker, cluster, extra) = cluster("parked", 2, &["retry"]);
    let retry = &extra[0];
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
    rt.block_on(broker.produce(&cluster.input, events));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("retry.toml");
    std::fs::write(
        &config,
        "[retry]\nmax_attempts = 1000\nmax_backoff_ms = 1000\nmax_elapsed_ms = 60000\n",
    )
    .expect("config");
    let mut flags: Vec<String> = eos_flags(&cluster, "a", "a")
        .into_iter()
        .map(|f| {
            if f == "faults=off" {
                "faults=on".into()
            } else {
                f
            }
        })
        .collect();
    flags.extend(["--retry-topic", retry, "--config"].map(str::to_owned));
    flags.push(config.display().to_string());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let worker = Worker::start(
        WEIR,
        dir.path(),
        "a",
        &cluster,
        &weir_tests::plugin("faulty"),
        &flags,
    );
    wait_for_ids(&broker, &cluster, n, Duration::from_secs(120), || {
        worker.log()
    });
    let committed = Committed::read(&broker, &cluster, n);
    let parked = worker.metric("weir_records_parked_total").unwrap_or(0.0);
    assert!(parked >= 1.0, "parked {parked}");
    let transactions = |result: &str| transactions(&worker, result).unwrap_or(-1.0);
    assert_eq!(transactions("aborted"), 0.0);
    println!(
        "{n} ids exactly once; e5 parked {parked} times; {} transactions committed",
        transactions("committed")
    );
    committed.assert_exactly_once_in_order(&["e5"], || worker.log());
    let log = worker.log();
    assert!(worker.stop().success(), "{log}");
}

/// Keyed state's changelog topic (`kafka/changelog.rs`, for exactly-once mode's state): made
/// compacted with the input's partitions (another count is refused), and read back to the
/// end a `read_committed` consumer sees — committed transactions only, promptly even while
/// a transaction is open on the partition.
#[test]
fn a_changelog_partition_reads_back_what_committed_transactions_wrote() {
    use rdkafka::ClientConfig;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    use weir::kafka::changelog::{ensure_changelog, read_changelog, read_changelog_state};

    let broker = KafkaBroker::start();
    let kafka = weir::config::KafkaConfig {
        bootstrap: Some(broker.bootstrap.clone()),
        ..Default::default()
    };
    let topic = format!(
        "changelog-{}-{}",
        std::process::id(),
        weir_tests::free_port()
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // Input topics of three and four partitions.
    let (in3, in4) = (format!("{topic}-in3"), format!("{topic}-in4"));
    rt.block_on(async {
        broker.create_topic(&in3, 3).await;
        broker.create_topic(&in4, 4).await;
    });
    rt.block_on(ensure_changelog(&kafka, &topic, &in3))
        .expect("created");
    rt.block_on(ensure_changelog(&kafka, &topic, &in3))
        .expect("there already: fine");
    let compacted = rt.block_on(async {
        use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &broker.bootstrap)
            .create()
            .expect("admin");
        let configs = admin
            .describe_configs([&ResourceSpecifier::Topic(&topic)], &AdminOptions::new())
            .await
            .expect("describe");
        let config = configs
            .into_iter()
            .next()
            .expect("one")
            .expect("its config");
        config.get("cleanup.policy").and_then(|e| e.value.clone())
    });
    assert_eq!(compacted.as_deref(), Some("compact"));
    let refused = rt
        .block_on(ensure_changelog(&kafka, &topic, &in4))
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("has 3 partitions, the input topic 4"),
        "{refused:#}"
    );

    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("transactional.id", format!("{topic}-writer"))
        .create()
        .expect("producer");
    let timeout = Duration::from_secs(30);
    producer.init_transactions(timeout).expect("init");
    // Values in the stored form: 8 bytes of expiry (0: never), then the bytes.
    let stored = |v: &str| [&[0u8; 8][..], v.as_bytes()].concat();
    let send = |key: &str, value: Option<&str>| {
        let value = value.map(stored);
        let mut record = BaseRecord::<str, [u8]>::to(&topic).partition(1).key(key);
        if let Some(value) = &value {
            record = record.payload(value);
        }
        producer.send(record).map_err(|(e, _)| e).expect("send");
    };
    let transaction = |writes: &[(&str, Option<&str>)], commit: bool| {
        producer.begin_transaction().expect("begin");
        for &(key, value) in writes {
            send(key, value);
        }
        if commit {
            producer.commit_transaction(timeout).expect("commit");
        } else {
            producer.abort_transaction(timeout).expect("abort");
        }
    };
    transaction(&[("a", Some("1")), ("b", Some("1"))], true);
    transaction(&[("a", Some("99"))], false);
    transaction(&[("b", None)], true);
    // One left open, its records in the log.
    producer.begin_transaction().expect("begin");
    send("c", Some("1"));
    producer.flush(timeout).expect("flush");

    let read_back = || {
        let mut records = Vec::new();
        let started = Instant::now();
        read_changelog(&kafka, &topic, 1, |key, value| {
            let value = value.map(|v| String::from_utf8_lossy(&v[8..]).into_owned());
            records.push((String::from_utf8(key).expect("utf-8"), value));
        })
        .expect("read back");
        (records, started.elapsed())
    };
    let (records, took) = read_back();
    let want = |more: &[(&str, Option<&str>)]| -> Vec<(String, Option<String>)> {
        [("a", Some("1")), ("b", Some("1")), ("b", None)]
            .iter()
            .chain(more)
            .map(|(k, v)| ((*k).to_owned(), v.map(str::to_owned)))
            .collect()
    };
    assert_eq!(records, want(&[]), "committed only, in order");
    assert!(
        took < Duration::from_secs(20),
        "the open transaction held the read back for {took:?}"
    );
    producer.commit_transaction(timeout).expect("commit");
    assert_eq!(read_back().0, want(&[("c", Some("1"))]));

    let entries = read_changelog_state(&kafka, &topic).expect("state");
    let shown: Vec<(i32, String, String)> = (entries.iter())
        .map(|e| {
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            (e.partition, text(&e.key), text(&e.value))
        })
        .collect();
    assert_eq!(
        shown,
        [(1, "a".into(), "1".into()), (1, "c".into(), "1".into())],
        "the tombstone deleted b"
    );
    let out = weir_tests::stdout_of(
        std::process::Command::new(WEIR)
            .args(["state", "dump", "--plugin-name", "p", "--kafka"])
            .args([&broker.bootstrap, "--changelog-topic", &topic]),
    );
    assert_eq!(
        out,
        "{\"partition\":1,\"key\":\"a\",\"value\":\"1\"}\n{\"partition\":1,\"key\":\"c\",\"value\":\"1\"}\n"
    );
}

/// Keyed state in exactly-once mode (docs/state.md): `metrics` over events keyed by user,
/// two worker slots, slot a killed with `kill -9` three times and started again. Each
/// takeover restores the partitions' state from the changelog topic; the `read_committed`
/// output holds exactly the events one clean run makes — one `active_user` per user and
/// day, exactly the funnel transitions — and the changelog's final state is the input's.
#[test]
fn metrics_state_and_outputs_are_exact_through_three_kill_nine_bounces() {
    use crate::keyed_state::{events, truth};
    let (broker, cluster, _) = cluster("keyed", 4, &[]);
    // With repeated ids (one in 23): each worker's done marks in its embedded store are its
    // own (no Redis here), so a repeat is skipped by the marks in the changelog.
    let lines = events(40_000);
    let (want_outputs, want_state) = truth(&lines);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // Keyed by user; in four parts, one before the start and one after each bounce, so each
    // new a has records to take over.
    let produce = |lines: &[String]| produce_by_user(&rt, &broker, &cluster.input, lines);
    let parts: Vec<&[String]> = lines.chunks(lines.len().div_ceil(4)).collect();
    produce(parts[0]);
    let dir = tempfile::tempdir().expect("tempdir");
    // The plugin's name (and so the pipeline's) is this run's: its changelog topic too.
    let name = cluster.group.trim_end_matches("-group").to_owned();
    let start = |slot: &str| {
        let session = ["--kafka-option", "session.timeout.ms=6000"];
        start_metrics_slot(dir.path(), &cluster, &name, slot, &session)
    };
    let started = Instant::now();
    let mut a = start("a");
    let b = start("b");
    let mut restores = 0;
    for (bounce, next) in (1..=3).zip(&parts[1..]) {
        a.wait_metric(
            "weir_records_processed_total",
            1_500.0,
            Duration::from_secs(300),
        );
        let log = a.log();
        restores += log.matches("took the partition's keyed state over").count();
        a.kill();
        println!(
            "bounce {bounce}: slot a killed {:.1} s in",
            started.elapsed().as_secs_f64()
        );
        a = start("a");
        produce(next);
    }
    let got_state = wait_for_state(&broker, &name, &want_state, &a, &b);
    let (got, want) = outputs_against(&broker, &cluster.output, want_outputs);
    println!(
        "keyed state through 3 kill -9 bounces in {:.1} s: {} keys equal the input's truth; \
         {} restores by the killed workers; outputs read_committed {} (one clean run: {})",
        started.elapsed().as_secs_f64(),
        got_state.len(),
        restores,
        got.len(),
        want.len()
    );
    assert_same_outputs(&got, &want);
    assert!(a.stop().success());
    assert!(b.stop().success());
}

/// A repeat is judged with the state: a worker that takes a partition over skips the
/// repeats of ids committed there before, although its own state store never saw them
/// (another worker's embedded store has their done marks; the marks in the changelog, read
/// back with the state, are what it goes by).
#[test]
fn a_worker_taking_a_partition_over_skips_repeats_of_what_was_committed_there() {
    use crate::keyed_state::{events, truth};
    let (broker, cluster, _) = cluster("repeats", 2, &[]);
    let first = events(3_000);
    // Then: 300 repeats of ids the first worker committed, and new events.
    let mut second: Vec<String> = first.iter().step_by(10).cloned().collect();
    second.extend(events(6_000).into_iter().skip(3_000));
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    let (want_outputs, want_state) = truth(&all);
    let repeats_in = |lines: &[String], seen: &mut BTreeSet<String>| {
        (lines.iter())
            .filter(|line| {
                let event: serde_json::Value = serde_json::from_str(line).expect("JSON");
                !seen.insert(event["id"].as_str().expect("id").to_owned())
            })
            .count() as f64
    };
    let mut seen = BTreeSet::new();
    let (first_repeats, second_repeats) = (
        repeats_in(&first, &mut seen),
        repeats_in(&second, &mut seen),
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    produce_by_user(&rt, &broker, &cluster.input, &first);
    let dir = tempfile::tempdir().expect("tempdir");
    let name = cluster.group.trim_end_matches("-group").to_owned();
    let start = |slot: &str| start_metrics_slot(dir.path(), &cluster, &name, slot, &[]);
    let a = start("a");
    let handled = |w: &Worker| {
        ["processed", "dead_lettered", "deduplicated"]
            .iter()
            .map(|fate| {
                w.metric(&format!("weir_records_{fate}_total"))
                    .unwrap_or(0.0)
            })
            .sum::<f64>()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while handled(&a) < first.len() as f64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(handled(&a), first.len() as f64, "{}", a.log());
    assert!(a.stop().success());
    let b = start("b");
    produce_by_user(&rt, &broker, &cluster.input, &second);
    let got_state = wait_for_state(&broker, &name, &want_state, &b, &b);
    let skipped = b.metric("weir_records_deduplicated_total").unwrap_or(0.0);
    let (got, want) = outputs_against(&broker, &cluster.output, want_outputs);
    println!(
        "worker b skipped {skipped} repeats ({} of ids worker a committed; worker a skipped \
         {first_repeats}); {} keys equal the truth; outputs {} (one clean run: {})",
        second_repeats,
        got_state.len(),
        got.len(),
        want.len()
    );
    assert_eq!(skipped, second_repeats, "{}", b.log());
    assert_same_outputs(&got, &want);
    assert!(b.stop().success());
}

/// Starts worker slot `slot` of `metrics` as the plugin `name` in exactly-once mode, with a
/// transactional id and an embedded store (its leases' done marks) of its own, and `extra`
/// flags.
fn start_metrics_slot(
    dir: &std::path::Path,
    cluster: &Cluster,
    name: &str,
    slot: &str,
    extra: &[&str],
) -> Worker {
    let (id, state) = (format!("{}-{slot}", cluster.group), format!("state-{slot}"));
    let mut flags = vec![
        "--plugin-name",
        name,
        "--id",
        "/id",
        "--quiet",
        "--exactly-once",
        "--transactional-id",
        &id,
        "--state",
        &state,
    ];
    flags.extend(extra);
    let plugin = weir_tests::plugin("metrics");
    Worker::start(WEIR, dir, slot, cluster, &plugin, &flags)
}

/// Produces `lines` (`metrics` events) keyed by their user, or by their id when the user is
/// empty (an empty key would go to a random partition, a repeat maybe to another one).
fn produce_by_user(
    rt: &tokio::runtime::Runtime,
    broker: &KafkaBroker,
    topic: &str,
    lines: &[String],
) {
    let records = lines.iter().map(|line| {
        let event: serde_json::Value = serde_json::from_str(line).expect("JSON");
        let key = [&event["user_id"], &event["id"]]
            .into_iter()
            .filter_map(serde_json::Value::as_str)
            .find(|key| !key.is_empty())
            .expect("a user or an id");
        (Some(key.to_owned()), line.clone(), Vec::new())
    });
    rt.block_on(broker.produce(topic, records));
}

/// Waits (up to 5 minutes) for the changelog of the plugin `name` to hold `want`, as
/// `weir state dump --kafka` shows it; fails with both workers' logs otherwise.
fn wait_for_state(
    broker: &KafkaBroker,
    name: &str,
    want: &BTreeMap<String, String>,
    a: &Worker,
    b: &Worker,
) -> BTreeMap<String, String> {
    let state = || {
        let out = weir_tests::stdout_of(
            std::process::Command::new(WEIR)
                .args(["state", "dump", "--plugin-name", name, "--kafka"])
                .arg(&broker.bootstrap),
        );
        (out.lines())
            .map(|line| {
                let entry: serde_json::Value = serde_json::from_str(line).expect("JSON");
                let text = |f: &str| entry[f].as_str().expect("text").to_owned();
                (text("key"), text("value"))
            })
            .collect::<BTreeMap<String, String>>()
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut got = state();
    while &got != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(3));
        got = state();
    }
    let wrong = weir_tests::differences(want, &got);
    assert!(
        &got == want,
        "{} keys, {} wanted; e.g. {wrong:?}\n{}",
        got.len(),
        want.len(),
        logs(a, b)
    );
    got
}

/// The `read_committed` outputs of `topic` and the `want`ed ones, as sorted canonical JSON.
fn outputs_against(
    broker: &KafkaBroker,
    topic: &str,
    want: Vec<serde_json::Value>,
) -> (Vec<String>, Vec<String>) {
    let canonical = |values: &mut dyn Iterator<Item = serde_json::Value>| {
        let mut all: Vec<String> = values.map(|v| weir_tests::canonical(&v)).collect();
        all.sort();
        all
    };
    let want = canonical(&mut want.into_iter());
    let out = broker.read_topic(topic, Duration::from_secs(5), |r| r.len() >= want.len());
    let got = canonical(
        &mut out
            .iter()
            .map(|r| serde_json::from_str::<serde_json::Value>(&r.value_text()).expect("JSON")),
    );
    (got, want)
}

/// Outputs equal those of one clean run, or the failure names some missing and extra.
fn assert_same_outputs(got: &[String], want: &[String]) {
    let missing: Vec<&String> = want.iter().filter(|o| !got.contains(o)).take(5).collect();
    let extra: Vec<&String> = got.iter().filter(|o| !want.contains(o)).take(5).collect();
    assert!(
        got == want,
        "outputs differ from one clean run's: missing e.g. {missing:?}, extra e.g. {extra:?}"
    );
}
