//! A real Kafka-protocol broker for tests: `tansu` (built into `.tools/tansu` by
//! `scripts/tools.sh`) on a free loopback port, with in-memory storage or a SQLite file that
//! survives `kill -9`; stopped when dropped. With `WEIR_KAFKA_BOOTSTRAP` set, the tests use
//! that cluster instead (and never stop it). Also: topic creation, producing test records and
//! reading a topic back whole.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

/// How the broker keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    Memory,
    /// A SQLite file: data survives a `kill -9` and restart.
    Sqlite,
}

/// A running broker.
pub struct KafkaBroker {
    pub bootstrap: String,
    process: Option<Child>,
    port: u16,
    storage: Storage,
    dir: Option<tempfile::TempDir>,
    /// `isolation.level` of [`Self::read_topic`].
    isolation: &'static str,
}

pub use weir::kafka::TopicRecord;

/// The tansu binary: `WEIR_TANSU`, else `.tools/tansu/bin/tansu`.
fn tansu() -> PathBuf {
    if let Ok(path) = std::env::var("WEIR_TANSU") {
        return PathBuf::from(path);
    }
    let path = crate::repo_root().join(".tools/tansu/bin/tansu");
    assert!(
        path.exists(),
        "{} is missing: run `bash scripts/tools.sh` (it builds tansu), or set WEIR_KAFKA_BOOTSTRAP",
        path.display()
    );
    path
}

impl KafkaBroker {
    /// Starts a fresh broker (or returns the external one of `WEIR_KAFKA_BOOTSTRAP`).
    pub fn start(storage: Storage) -> Self {
        if let Ok(bootstrap) = std::env::var("WEIR_KAFKA_BOOTSTRAP") {
            let mut broker = Self::external(&bootstrap);
            broker.storage = storage;
            return broker;
        }
        Self::start_on(crate::free_port(), storage)
    }

    /// A broker this harness did not start (to produce to and read from).
    pub fn external(bootstrap: &str) -> Self {
        Self {
            bootstrap: bootstrap.to_owned(),
            process: None,
            port: 0,
            storage: Storage::Memory,
            dir: None,
            isolation: "read_committed",
        }
    }

    /// Makes [`Self::read_topic`] read uncommitted records too.
    pub fn reading_uncommitted(mut self) -> Self {
        self.isolation = "read_uncommitted";
        self
    }

    /// Starts a fresh local broker on `port`.
    pub fn start_on(port: u16, storage: Storage) -> Self {
        let mut broker = Self {
            bootstrap: format!("127.0.0.1:{port}"),
            process: None,
            port,
            storage,
            dir: Some(tempfile::tempdir().expect("tempdir")),
            isolation: "read_committed",
        };
        broker.spawn();
        broker
    }

    /// The process id of a local broker.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }

    /// Whether this broker is ours to stop and restart.
    pub fn is_local(&self) -> bool {
        self.dir.is_some()
    }

    fn spawn(&mut self) {
        let dir = self.dir.as_ref().expect("a local broker").path().to_owned();
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let storage = match self.storage {
            Storage::Memory => "memory://tansu/".to_owned(),
            // tansu resolves the path against its working directory (the temporary one).
            Storage::Sqlite => "sqlite://tansu.db".to_owned(),
        };
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join("tansu.log"))
            .expect("broker log");
        let child = Command::new(tansu())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                &storage,
            ])
            .current_dir(&dir)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start tansu");
        self.process = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "tansu did not listen within 30 s; its log: {}",
                std::fs::read_to_string(dir.join("tansu.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9` the broker.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (and, with SQLite, the same data). tansu 0.6 has
    /// been seen to exit a second after such a restart (once in many runs): the test is about
    /// the worker riding out a broker outage, so a broker that exits within 3 s is started
    /// again (at most 3 times), saying so with its log.
    pub fn restart(&mut self) {
        self.kill();
        for attempt in 1..=3 {
            self.spawn();
            std::thread::sleep(Duration::from_secs(3));
            let exited = self
                .process
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            let Some(status) = exited else { return };
            let dir = self.dir.as_ref().expect("a local broker").path();
            let log = std::fs::read_to_string(dir.join("tansu.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!(
                "tansu exited ({status}) right after restart {attempt}; starting it again. \
                 Its log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            self.process = None;
        }
        panic!("tansu did not stay up after 3 restarts");
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap);
        config
    }

    /// Creates a topic with `partitions` partitions (replication factor 1).
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> =
            self.client_config().create().expect("admin client");
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let results = admin
            .create_topics(&[topic], &AdminOptions::new())
            .await
            .expect("create topics");
        for result in results {
            result.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
        }
    }

    /// Produces `(key, value, headers)` records to `topic` and waits for every delivery.
    pub async fn produce(
        &self,
        topic: &str,
        records: impl IntoIterator<Item = (Option<String>, String, Vec<(String, String)>)>,
    ) {
        // One record per batch: tansu 0.6 answers a fetch from an offset inside a batch with
        // the *next* batch, so a consumer resuming mid-batch (after a rebalance) would skip
        // the batch's remaining records. Apache Kafka returns the whole batch.
        let producer: FutureProducer = self
            .client_config()
            .set("batch.num.messages", "1")
            .create()
            .expect("producer");
        let mut pending = Vec::new();
        for (key, value, headers) in records {
            let mut record = FutureRecord::to(topic)
                .payload(&value)
                .headers(weir::kafka::owned_headers(&headers));
            if let Some(key) = &key {
                record = record.key(key);
            }
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err((_, r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }
        for delivery in pending {
            delivery
                .await
                .expect("delivery answered")
                .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
        }
    }

    /// Every record of `topic` from the start, read until `until` says enough or `idle`
    /// passes without a new record.
    pub fn read_topic(
        &self,
        topic: &str,
        idle: Duration,
        until: impl Fn(&[TopicRecord]) -> bool,
    ) -> Vec<TopicRecord> {
        let consumer: BaseConsumer = self
            .client_config()
            .set("group.id", "weir-tests-reader")
            .set("enable.auto.commit", "false")
            .set("isolation.level", self.isolation)
            .create()
            .expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let mut tpl = TopicPartitionList::new();
        for t in metadata.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                    .expect("partition");
            }
        }
        consumer.assign(&tpl).expect("assign");
        let mut records = Vec::new();
        let mut last = Instant::now();
        // `until` may be costly: it is asked when the topic pauses and every 1,000 records.
        let mut asked = usize::MAX;
        while last.elapsed() < idle {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    last = Instant::now();
                    records.push(TopicRecord::of(&m));
                    if records.len() % 1_000 == 0 && until(&records) {
                        break;
                    }
                }
                Some(Err(e)) => eprintln!("read {topic}: {e}"),
                None => {
                    if asked != records.len() {
                        asked = records.len();
                        if until(&records) {
                            break;
                        }
                    }
                }
            }
        }
        records
    }

    /// The high watermark of each partition of `topic` (how many records it holds, when it
    /// starts at 0).
    pub fn watermarks(&self, topic: &str, partitions: i32) -> Vec<i64> {
        let consumer: BaseConsumer = self.client_config().create().expect("consumer");
        (0..partitions)
            .map(|p| {
                consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .map_or(-1, |(_, high)| high)
            })
            .collect()
    }

    /// Committed offsets of `group` on `topic`, per partition.
    pub fn committed(&self, group: &str, topic: &str, partitions: i32) -> HashMap<i32, i64> {
        let consumer: BaseConsumer = self
            .client_config()
            .set("group.id", group)
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect()
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.kill();
    }
}
