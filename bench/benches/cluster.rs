//! Cluster mode, Kafka → Kafka, on a local Apache Kafka (the tests' broker, one KRaft node)
//! and a local Redis (issue 4's benchmark, with issue 6's exactly-once run):
//!
//! - (a) a raw rdkafka consume → produce passthrough written here, at-least-once the way
//!   rdkafka's own example does it but without waiting on each record: every record is sent
//!   as it is consumed (idempotent producer, the worker's consumer settings), and a second
//!   task awaits the deliveries in order and stores each confirmed record's offset;
//! - (b) a `weir` worker running an identity plugin (`faulty` with `faults=off`) with the
//!   embedded state store, no Redis;
//! - (c) a `weir` worker running `enrich` with Redis leases and done marks;
//! - (d) the same worker in exactly-once mode (`--exactly-once`): Kafka transactions.
//!
//! The four take turns `WEIR_BENCH_ROUNDS` times (default 3; the order turns around every
//! other round, so no run is always first or last), because the machine's slow phases move
//! one run by up to half. Each consumes the same input topic (in its own consumer group,
//! with its own done marks) into its own output topic, one process at a time, and is timed
//! from its first consumed record to its last record done (weir:
//! `weir_records_processed_total` = N, read every 20 ms; passthrough: its last delivery).
//! CPU is the process's user + system time over the same span, from `/proc/<pid>/stat`, for
//! the worker, the broker and Redis alike. Prints records/s, CPU-seconds per million
//! records, and the ratios b/a, c/a and d/c of each round with their medians.
//!
//! ```sh
//! bash scripts/build-plugins.sh && bash scripts/tools.sh   # plugins, the Kafka jars
//! cargo bench -p weir-bench --bench cluster                # WEIR_BENCH_RECORDS=1000000
//! ```
//!
//! `WEIR_BENCH_REDIS_CLUSTER=1` runs (c) and (d) on a local Redis Cluster instead (three
//! masters and a replica each, `weir_tests::redis_cluster`); Redis CPU is then the sum over
//! its six processes. `WEIR_BENCH_ARGS` (e.g. `"--batch-size 512"`) adds flags to every
//! weir run;
//! `WEIR_BENCH_RUNS` (e.g. `ab`) makes only those runs ((a) always runs: the ratios need it).
//!
//! `WEIR_BENCH_PLUGIN=metrics` runs the stateful `metrics` plugin instead (keyed state,
//! docs/state.md): (b) with its state in the embedded store, (c) in Redis (there is no (d):
//! exactly-once mode keeps no keyed state yet); the table adds worker CPU per state write,
//! and the difference (c) − (b) per write.
//!
//! `WEIR_BENCH_BASELINE=<path of another build's weir-bench-worker>` compares two builds in
//! one run: each weir run, (b), (c) and (d), is made with the baseline too, right before or
//! after (the order turns around every round), and a second table gives this build's rate
//! and worker CPU against the baseline's. `WEIR_BENCH_WORKER=<path>` runs that build as "this
//! build" instead of the one cargo just made (to compare two older builds).

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use weir_tests::kafka_broker::KafkaBroker;
use weir_tests::measure::{cpu_seconds, env_usize};
use weir_tests::redis_cluster::RedisCluster;
use weir_tests::redis_server::RedisServer;
use weir_tests::worker::{Cluster, Worker};

/// The passthrough (a child process running this executable) allocates as weir does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WEIR: &str = env!("CARGO_BIN_EXE_weir-bench-worker");
/// The suffix of a baseline run's names (topics, group, done marks).
const BASE: &str = "-base";
/// Set in the environment of the passthrough child process (this same executable).
const PASSTHROUGH: &str = "WEIR_BENCH_PASSTHROUGH";
const PARTITIONS: i32 = 4;
/// Records the passthrough has sent and not yet seen confirmed, at most.
const IN_FLIGHT: usize = 10_000;

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    if let Ok(args) = std::env::var(PASSTHROUGH) {
        return rt.block_on(passthrough(&args));
    }
    let n = env_usize("WEIR_BENCH_RECORDS", 1_000_000)?;
    let rounds = env_usize("WEIR_BENCH_ROUNDS", 3)?.max(1);

    let baseline = std::env::var("WEIR_BENCH_BASELINE").ok();
    let this = std::env::var("WEIR_BENCH_WORKER").unwrap_or_else(|_| WEIR.into());
    let stateful = std::env::var("WEIR_BENCH_PLUGIN").is_ok_and(|p| p == "metrics");
    let default_runs = if stateful { "abc" } else { "abcd" };
    let only = std::env::var("WEIR_BENCH_RUNS").unwrap_or_else(|_| default_runs.into());
    let tags: &[&str] = if baseline.is_some() {
        &["", BASE]
    } else {
        &[""]
    };
    let broker = KafkaBroker::start();
    // One Redis server, or a Redis Cluster: its URL (seeds), the flags that say which, and
    // its processes.
    let (_server, _cluster, redis_url, redis_flags, redis_pids) =
        if std::env::var("WEIR_BENCH_REDIS_CLUSTER").is_ok_and(|v| v == "1") {
            let cluster = RedisCluster::start();
            let (url, pids) = (cluster.url(), cluster.pids());
            (None, Some(cluster), url, vec!["--redis-cluster"], pids)
        } else {
            let server = RedisServer::start();
            let pids = server
                .is_local()
                .then(|| server.pid())
                .into_iter()
                .collect();
            let url = server.url.clone();
            (Some(server), None, url, vec![], pids)
        };
    let dir = tempfile::tempdir()?;
    rt.block_on(async {
        broker.create_topic("bench-in", PARTITIONS).await;
        for round in 1..=rounds {
            for run in ["a", "b", "c", "d"] {
                for tag in tags {
                    let topic = format!("bench-out-{run}{round}{tag}");
                    broker.create_topic(&topic, PARTITIONS).await;
                }
            }
        }
        broker.create_topic("bench-dlq", 1).await;
    });
    let started = Instant::now();
    rt.block_on(produce(&broker.bootstrap, n))?;
    eprintln!(
        "produced {n} records in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let cluster = |name: &str, redis: Option<&str>| Cluster {
        bootstrap: broker.bootstrap.clone(),
        redis: redis.map(str::to_owned),
        group: format!("bench-{name}"),
        input: "bench-in".into(),
        output: format!("bench-out-{name}"),
        dlq: "bench-dlq".into(),
    };
    let services = Services {
        broker: broker.pid(),
        redis: redis_pids,
    };
    let run = |kind: char, round: usize, tag: &str| -> anyhow::Result<Measured> {
        let name = format!("{kind}{round}{tag}");
        let weir = match (tag, &baseline) {
            (BASE, Some(path)) => path.as_str(),
            _ => this.as_str(),
        };
        // Each run has done marks of its own: the plugin's name names them.
        let plugin_name = format!("enrich-{name}");
        let transactional_id = format!("bench-{name}");
        match kind {
            'a' => run_passthrough(&services, &cluster(&name, None), n),
            'b' if stateful => run_weir(
                weir,
                &services,
                &cluster(&name, None),
                dir.path(),
                "metrics",
                &["--id", "/id", "--state", &format!("state-{name}")],
                n,
            ),
            'b' => run_weir(
                weir,
                &services,
                &cluster(&name, None),
                dir.path(),
                "faulty",
                &[
                    "--plugin-config",
                    "faults=off",
                    "--state",
                    &format!("state-{name}"),
                ],
                n,
            ),
            'c' => run_weir(
                weir,
                &services,
                &cluster(&name, Some(&redis_url)),
                dir.path(),
                if stateful { "metrics" } else { "enrich" },
                &[
                    &["--id", "/id", "--plugin-name", &plugin_name],
                    &redis_flags[..],
                ]
                .concat(),
                n,
            ),
            _ => run_weir(
                weir,
                &services,
                &cluster(&name, Some(&redis_url)),
                dir.path(),
                "enrich",
                &[
                    &[
                        "--id",
                        "/id",
                        "--plugin-name",
                        &plugin_name,
                        "--exactly-once",
                        "--transactional-id",
                        &transactional_id,
                    ],
                    &redis_flags[..],
                ]
                .concat(),
                n,
            ),
        }
    };
    let mut measured: Vec<[Option<Measured>; 4]> = Vec::new();
    // (b), (c), (d) of the baseline build, by round.
    let mut baseline_runs: Vec<[Option<Measured>; 3]> = Vec::new();
    for round in 1..=rounds {
        let mut order = ['a', 'b', 'c', 'd'];
        let mut builds = tags.to_vec();
        if round % 2 == 0 {
            order.reverse();
            builds.reverse();
        }
        let mut runs: [Option<Measured>; 4] = Default::default();
        let mut base: [Option<Measured>; 3] = Default::default();
        for kind in order.into_iter().filter(|&k| k == 'a' || only.contains(k)) {
            let k = (kind as u8 - b'a') as usize;
            for &tag in builds.iter().filter(|&&tag| kind != 'a' || tag != BASE) {
                eprintln!("round {round}: ({kind}){tag}");
                let measured = Some(run(kind, round, tag)?);
                match tag {
                    BASE => base[k - 1] = measured,
                    _ => runs[k] = measured,
                }
            }
        }
        measured.push(runs);
        baseline_runs.push(base);
    }

    let on = if broker.is_local() {
        format!(
            "Apache Kafka {} (one local KRaft node)",
            weir_tests::KAFKA_VERSION
        )
    } else {
        format!("the Kafka at {}", broker.bootstrap)
    };
    println!(
        "\nKafka → Kafka on {on}, {n} records, {PARTITIONS} partitions, one worker process, \
         {rounds} rounds:\n"
    );
    let names = if stateful {
        [
            "(a) rdkafka passthrough",
            "(b) weir, metrics, state in the embedded store",
            "(c) weir, metrics, state in Redis",
            "(d) the same, exactly-once",
        ]
    } else {
        [
            "(a) rdkafka passthrough",
            "(b) weir, identity, no Redis",
            "(c) weir, enrich + Redis",
            "(d) the same, exactly-once",
        ]
    };
    let labels: Vec<String> = (1..=rounds)
        .flat_map(|round| names.map(|name| format!("{name}, round {round}")))
        .collect();
    let rows: Vec<(&str, &Measured)> = (labels.iter())
        .zip(measured.iter().flatten())
        .filter_map(|(label, run)| Some((label.as_str(), run.as_ref()?)))
        .collect();
    print_table(n, &rows, "(a) of round 1");
    let ratio = |of: usize, to: usize| -> Option<(Vec<String>, f64)> {
        let mut ratios: Vec<f64> = (measured.iter())
            .filter_map(|runs| Some(runs[of].as_ref()?.rate(n) / runs[to].as_ref()?.rate(n)))
            .collect();
        let each = ratios.iter().map(|r| format!("{r:.2}")).collect();
        ratios.sort_by(f64::total_cmp);
        Some((each, *ratios.get(ratios.len() / 2)?))
    };
    for (label, of, to, target) in [
        ("b/a", 1, 0, "≥ 0.9"),
        ("c/a", 2, 0, "≥ 0.6"),
        ("d/c", 3, 2, "≥ 0.9"),
    ] {
        let Some((each, median)) = ratio(of, to) else {
            continue;
        };
        println!(
            "\n{label} round by round: {}; median {median:.2} (target {target})",
            each.join(", ")
        );
    }
    if stateful {
        print_state_writes(&measured);
    }
    if let Some(path) = &baseline {
        print_against_baseline(n, path, &measured, &baseline_runs);
    }
    Ok(())
}

/// Worker CPU per keyed-state write of (b) (embedded store) and (c) (Redis), round by
/// round, and what Redis adds per write: (c) − (b).
fn print_state_writes(measured: &[[Option<Measured>; 4]]) {
    println!(
        "
Worker CPU per state write (metrics):
"
    );
    println!("| round | writes | (b) µs per write | (c) µs per write | (c) − (b) µs per write |");
    println!("|---:|---:|---:|---:|---:|");
    for (round, runs) in measured.iter().enumerate() {
        let (Some(b), Some(c)) = (&runs[1], &runs[2]) else {
            continue;
        };
        let per_write = |m: &Measured| m.cpu[0] * 1e6 / m.state_writes.max(1.0);
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} |",
            round + 1,
            c.state_writes,
            per_write(b),
            per_write(c),
            per_write(c) - per_write(b)
        );
    }
}

/// This build's (b), (c), (d) against the baseline build's, round by round: the rate's
/// ratio and the worker CPU's.
fn print_against_baseline(
    n: usize,
    path: &str,
    measured: &[[Option<Measured>; 4]],
    baseline: &[[Option<Measured>; 3]],
) {
    println!("\nThis build against the baseline ({path}):\n");
    println!(
        "| run | round | baseline records/s | this records/s | rate ratio | baseline worker CPU-s per 1M | this | CPU ratio | baseline Redis CPU-s per 1M | this |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let names = ["(b)", "(c)", "(d)"];
    let mut ratios: [Vec<f64>; 3] = Default::default();
    for (round, (runs, base)) in measured.iter().zip(baseline).enumerate() {
        for (k, name) in names.iter().enumerate() {
            let (Some(base), Some(this)) = (&base[k], &runs[k + 1]) else {
                continue;
            };
            let cpu = |m: &Measured| m.cpu[0] * 1e6 / n as f64;
            let redis = |m: &Measured| m.cpu[2] * 1e6 / n as f64;
            let ratio = this.rate(n) / base.rate(n);
            ratios[k].push(ratio);
            println!(
                "| {name} | {} | {:.0} | {:.0} | {ratio:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                round + 1,
                base.rate(n),
                this.rate(n),
                cpu(base),
                cpu(this),
                cpu(this) / cpu(base),
                redis(base),
                redis(this)
            );
        }
    }
    for (name, mut ratios) in names.iter().zip(ratios) {
        ratios.sort_by(f64::total_cmp);
        if let Some(median) = ratios.get(ratios.len() / 2) {
            println!("\n{name} this ÷ baseline rate, median of rounds: {median:.2}");
        }
    }
}

/// A Markdown table of runs over `n` records, each with its rate as a ratio to the first
/// run's (named `first`).
fn print_table(n: usize, runs: &[(&str, &Measured)], first: &str) {
    println!(
        "| run | records/s | worker CPU-s per 1M | broker CPU-s per 1M | Redis CPU-s per 1M | ratio to {first} |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let base = runs[0].1.rate(n);
    for (name, run) in runs {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
            run.rate(n),
            run.cpu[0] * 1e6 / n as f64,
            run.cpu[1] * 1e6 / n as f64,
            run.cpu[2] * 1e6 / n as f64,
            run.rate(n) / base
        );
    }
}

/// One measured run: wall time and CPU-seconds (worker, broker, Redis) from first record
/// to last.
struct Measured {
    seconds: f64,
    cpu: [f64; 3],
    /// Keyed-state writes of a stateful plugin.
    state_writes: f64,
}

impl Measured {
    fn rate(&self, n: usize) -> f64 {
        n as f64 / self.seconds
    }
}

/// The local broker's and Redis's processes (none when they are external; a Redis
/// Cluster's six).
struct Services {
    broker: Option<u32>,
    redis: Vec<u32>,
}

/// CPU-seconds of the worker, the broker and Redis at one instant.
fn cpu_now(worker: u32, services: &Services) -> anyhow::Result<[f64; 3]> {
    let of = |pids: &mut dyn Iterator<Item = u32>| -> anyhow::Result<f64> {
        pids.map(|pid| cpu_seconds(&pid.to_string(), false)).sum()
    };
    Ok([
        cpu_seconds(&worker.to_string(), false)?,
        of(&mut services.broker.into_iter())?,
        of(&mut services.redis.iter().copied())?,
    ])
}

fn measured(start: (Instant, [f64; 3]), end: (Instant, [f64; 3])) -> Measured {
    Measured {
        seconds: (end.0 - start.0).as_secs_f64(),
        cpu: std::array::from_fn(|i| end.1[i] - start.1[i]),
        state_writes: 0.0,
    }
}

/// Small JSON events keyed by id, as the integration tests use; batched producer.
async fn produce(bootstrap: &str, n: usize) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .create()?;
    let actions = ["view", "click", "purchase", "add_to_cart", "refund"];
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("e{i}");
        let value = format!(
            r#"{{"id":"{id}","user_id":"u{}","ts":{},"action":"{}"}}"#,
            i % 97,
            1_704_067_200 + i,
            actions[i % actions.len()]
        );
        let mut record = FutureRecord::to("bench-in").key(&id).payload(&value);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => break pending.push(delivery),
                Err((_, r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }
    for delivery in pending {
        delivery
            .await?
            .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
    }
    Ok(())
}

/// Runs a weir worker until it has processed `n` records.
fn run_weir(
    weir: &str,
    services: &Services,
    cluster: &Cluster,
    dir: &Path,
    plugin: &str,
    extra: &[&str],
    n: usize,
) -> anyhow::Result<Measured> {
    let tuning = std::env::var("WEIR_BENCH_ARGS").unwrap_or_default();
    let mut args = vec!["--quiet"];
    args.extend_from_slice(extra);
    args.extend(tuning.split_whitespace());
    let plugin = weir_tests::plugin(plugin);
    let worker = Worker::start(weir, dir, &cluster.group, cluster, &plugin, &args);
    let pid = worker.pid();
    let poll = Duration::from_millis(20);
    let deadline = Instant::now() + Duration::from_secs(1800);
    let wait_for = |metric: &str, at_least: f64| -> anyhow::Result<(Instant, [f64; 3])> {
        loop {
            if worker.metric(metric).is_some_and(|v| v >= at_least) {
                return Ok((Instant::now(), cpu_now(pid, services)?));
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{}: {metric} did not reach {at_least}; log:\n{}",
                cluster.group,
                worker.log()
            );
            std::thread::sleep(poll);
        }
    };
    let first = wait_for("weir_records_in_total", 1.0)?;
    let last = wait_for("weir_records_processed_total", n as f64)?;
    let out = worker.metric("weir_records_out_total").unwrap_or(0.0);
    let state_writes = worker.metric("weir_state_writes_total").unwrap_or(0.0);
    // A stateful plugin emits derived events, not one output per record.
    anyhow::ensure!(
        out >= n as f64 || state_writes > 0.0,
        "{}: only {out} outputs",
        cluster.group
    );
    if let Some(committed) = worker.metric_where("weir_transactions_total", "result=\"committed\"")
    {
        eprintln!(
            "{}: {committed} transactions committed, {:.0} records per transaction",
            cluster.group,
            n as f64 / committed.max(1.0)
        );
    }
    let log = worker.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
    if !warnings.is_empty() {
        eprintln!(
            "{}: {} warnings, e.g.\n{}",
            cluster.group,
            warnings.len(),
            warnings[..warnings.len().min(5)].join("\n")
        );
    }
    anyhow::ensure!(worker.stop().success(), "{} failed", cluster.group);
    Ok(Measured {
        state_writes,
        ..measured(first, last)
    })
}

/// Runs the passthrough (this executable again) until it has forwarded `n` records. It
/// prints `first` when it receives its first record and `done` after its last delivery.
fn run_passthrough(services: &Services, cluster: &Cluster, n: usize) -> anyhow::Result<Measured> {
    let args = format!(
        "{} {} {} {} {n}",
        cluster.bootstrap, cluster.group, cluster.input, cluster.output
    );
    let mut child = Command::new(std::env::current_exe()?)
        .env(PASSTHROUGH, args)
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped");
    let mut first = None;
    let mut last = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let at = (Instant::now(), cpu_now(pid, services)?);
        match line?.as_str() {
            "first" => first = Some(at),
            "done" => last = Some(at),
            other => eprintln!("passthrough: {other}"),
        }
    }
    anyhow::ensure!(child.wait()?.success(), "the passthrough failed");
    match (first, last) {
        (Some(first), Some(last)) => Ok(measured(first, last)),
        _ => anyhow::bail!("the passthrough stopped before it forwarded {n} records"),
    }
}

/// The passthrough process: `bootstrap group input output n` in the environment.
async fn passthrough(args: &str) -> anyhow::Result<()> {
    let [bootstrap, group, input, output, n] = args.split(' ').collect::<Vec<_>>()[..] else {
        anyhow::bail!("{PASSTHROUGH}: expected `bootstrap group input output n`, got {args}");
    };
    let n: usize = n.parse()?;
    // The worker's own defaults (host/src/kafka/consumer.rs, host/src/kafka/producer.rs).
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.offset.store", "false")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("fetch.queue.backoff.ms", "20")
        .create()?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()?;
    consumer.subscribe(&[input])?;
    let consumer = std::sync::Arc::new(consumer);

    // Deliveries are awaited in the order they were sent, by a task of their own; each
    // confirmed record's offset is stored then (at-least-once), so consuming never waits
    // for the broker's acknowledgements, only for the channel's bound.
    let (sent, mut confirmations) =
        tokio::sync::mpsc::channel::<(i32, i64, DeliveryFuture)>(IN_FLIGHT);
    let confirmer = {
        let consumer = consumer.clone();
        let input = input.to_owned();
        tokio::spawn(async move {
            let mut confirmed = 0;
            while let Some((partition, offset, delivery)) = confirmations.recv().await {
                delivery
                    .await?
                    .map_err(|(e, _)| anyhow::anyhow!("deliver: {e}"))?;
                consumer.store_offset(&input, partition, offset)?;
                confirmed += 1;
                if confirmed == n {
                    println!("done");
                    break;
                }
            }
            anyhow::Ok(())
        })
    };
    for forwarded in 0..n {
        let m = consumer.recv().await?;
        if forwarded == 0 {
            println!("first");
        }
        let mut record = FutureRecord::to(output).payload(m.payload().unwrap_or_default());
        if let Some(key) = m.key() {
            record = record.key(key);
        }
        let delivery = loop {
            match producer.send_result(record) {
                Ok(delivery) => break delivery,
                Err((_, r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        };
        sent.send((m.partition(), m.offset(), delivery)).await?;
    }
    confirmer.await??;
    consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync)?;
    Ok(())
}
