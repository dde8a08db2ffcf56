//! A real Apache Kafka for tests: the broker's jars from Maven Central (installed into
//! `.tools/kafka/libs` by `scripts/tools.sh`, pinned in `tools/kafka/pom.xml`), run with
//! Java 17+ as one combined KRaft node (broker and controller) on free loopback ports, its log
//! directory in a temporary directory, stopped when dropped. It can be killed with `kill -9`
//! and started again on the same ports and log directory, and it can open a `SASL_SSL`
//! listener besides the plain one. With `WEIR_KAFKA_BOOTSTRAP` set, tests that only need *a*
//! Kafka use that cluster instead (and never stop it). Also: topic creation, producing test
//! records and reading a topic back whole.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

pub use weir::kafka::TopicRecord;

/// The JVM's heap: fixed, so the broker's memory is the same in every run.
const HEAP: &str = "512m";

/// A `SASL_SSL` listener: the broker's key and certificate (PEM) and the SCRAM and PLAIN
/// users it accepts.
#[derive(Debug, Clone)]
pub struct SaslSsl {
    /// The broker's certificate chain and private key, PEM.
    pub certificate: String,
    pub private_key: String,
    /// `(user, password)` pairs, accepted by `PLAIN`, `SCRAM-SHA-256` and `SCRAM-SHA-512`.
    pub users: Vec<(String, String)>,
}

/// A broker this harness started: its ports and files.
struct Local {
    dir: tempfile::TempDir,
    port: u16,
    controller_port: u16,
    /// The port of the `SASL_SSL` listener, when there is one.
    sasl_ssl: Option<(u16, SaslSsl)>,
}

/// A running broker.
pub struct KafkaBroker {
    pub bootstrap: String,
    process: Option<Child>,
    local: Option<Local>,
}

/// The broker's jars: `WEIR_KAFKA_LIBS`, else `.tools/kafka/libs`.
fn libs() -> PathBuf {
    let path = std::env::var_os("WEIR_KAFKA_LIBS")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join(".tools/kafka/libs"));
    assert!(
        path.join(format!("kafka_2.13-{}.jar", crate::KAFKA_VERSION))
            .is_file(),
        "Apache Kafka {} is missing from {}: run `bash scripts/tools.sh` (it fetches the jars \
         from Maven Central), or set WEIR_KAFKA_BOOTSTRAP",
        crate::KAFKA_VERSION,
        path.display()
    );
    path
}

/// `java`, with the broker's jars on the class path and its logging set up: Log4j2 at WARN,
/// plus the one INFO line that says the server started.
fn java(dir: &Path) -> Command {
    let log4j = dir.join("log4j2.properties");
    if !log4j.exists() {
        std::fs::write(
            &log4j,
            "rootLogger.level=WARN\n\
             rootLogger.appenderRef.out.ref=OUT\n\
             appender.out.type=Console\n\
             appender.out.name=OUT\n\
             appender.out.layout.type=PatternLayout\n\
             appender.out.layout.pattern=[%d] %p %m (%c)%n\n\
             logger.started.name=kafka.server.KafkaRaftServer\n\
             logger.started.level=INFO\n",
        )
        .expect("log4j2.properties");
    }
    let mut java = Command::new("java");
    java.arg("-cp")
        .arg(libs().join("*"))
        .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
        .current_dir(dir)
        .stdin(Stdio::null());
    java
}

/// A cluster id as `kafka-storage random-uuid` makes one: 16 random bytes, URL-safe base64
/// without padding.
fn cluster_id() -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 16];
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seed = nanos ^ (u128::from(std::process::id()) << 64) ^ u128::from(crate::free_port());
    bytes.copy_from_slice(&seed.to_le_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl KafkaBroker {
    /// A Kafka for a test that only produces, consumes and runs workers: the one at
    /// `WEIR_KAFKA_BOOTSTRAP`, else a fresh local broker.
    pub fn start() -> Self {
        match std::env::var("WEIR_KAFKA_BOOTSTRAP") {
            Ok(bootstrap) => Self::external(&bootstrap),
            Err(_) => Self::start_local(),
        }
    }

    /// A fresh local broker, even when `WEIR_KAFKA_BOOTSTRAP` is set (for tests that kill it
    /// or configure it).
    pub fn start_local() -> Self {
        Self::start_on(crate::free_port(), None)
    }

    /// A fresh local broker with a `SASL_SSL` listener besides the plain one; its bootstrap
    /// address is [`Self::sasl_ssl_bootstrap`].
    pub fn start_with_sasl_ssl(listener: SaslSsl) -> Self {
        Self::start_on(crate::free_port(), Some(listener))
    }

    /// A broker this harness did not start (to produce to and read from).
    pub fn external(bootstrap: &str) -> Self {
        Self {
            bootstrap: bootstrap.to_owned(),
            process: None,
            local: None,
        }
    }

    /// Starts a fresh local broker whose plain listener is on `port`.
    pub fn start_on(port: u16, sasl_ssl: Option<SaslSsl>) -> Self {
        let local = Local {
            dir: tempfile::tempdir().expect("tempdir"),
            port,
            controller_port: crate::free_port(),
            sasl_ssl: sasl_ssl.map(|l| (crate::free_port(), l)),
        };
        let mut broker = Self {
            bootstrap: format!("127.0.0.1:{port}"),
            process: None,
            local: Some(local),
        };
        broker.configure();
        broker.spawn();
        broker
    }

    fn local(&self) -> &Local {
        self.local.as_ref().expect("a broker this harness started")
    }

    /// The address of the `SASL_SSL` listener.
    pub fn sasl_ssl_bootstrap(&self) -> String {
        let (port, _) = self.local().sasl_ssl.as_ref().expect("a SASL_SSL listener");
        format!("127.0.0.1:{port}")
    }

    /// The process id of a local broker.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }

    /// Whether this broker is ours to stop and restart.
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// Writes `server.properties` and formats the log directory (once per broker).
    fn configure(&self) {
        let local = self.local();
        let dir = local.dir.path();
        let (port, cport) = (local.port, local.controller_port);
        let mut listeners = format!("PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}");
        let mut advertised = format!("PLAINTEXT://127.0.0.1:{port}");
        let mut extra = String::new();
        if let Some((sport, listener)) = &local.sasl_ssl {
            listeners.push_str(&format!(",SASL_SSL://127.0.0.1:{sport}"));
            advertised.push_str(&format!(",SASL_SSL://127.0.0.1:{sport}"));
            // Kafka takes PEM key material inline; a value's newlines must be escaped in a
            // properties file.
            let pem = |text: &str| text.trim().replace('\n', "\\n\\\n");
            let plain_users: String = listener
                .users
                .iter()
                .map(|(user, password)| format!(" user_{user}=\"{password}\""))
                .collect();
            extra = format!(
                "ssl.keystore.type=PEM\n\
                 ssl.keystore.certificate.chain={}\n\
                 ssl.keystore.key={}\n\
                 sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512\n\
                 listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required{plain_users};\n\
                 listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\n\
                 listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\n",
                pem(&listener.certificate),
                pem(&listener.private_key),
            );
        }
        let properties = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.bootstrap.servers=127.0.0.1:{cport}\n\
             listeners={listeners}\n\
             advertised.listeners={advertised}\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=PLAINTEXT\n\
             log.dirs={data}\n\
             num.partitions=1\n\
             auto.create.topics.enable=false\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=4\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             transaction.state.log.num.partitions=4\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             share.coordinator.state.topic.num.partitions=1\n\
             group.initial.rebalance.delay.ms=0\n\
             group.min.session.timeout.ms=1000\n\
             group.consumer.min.session.timeout.ms=1000\n\
             group.consumer.session.timeout.ms=6000\n\
             group.consumer.min.heartbeat.interval.ms=500\n\
             group.consumer.heartbeat.interval.ms=1000\n\
             log.cleaner.dedupe.buffer.size=2097152\n\
             transaction.abort.timed.out.transaction.cleanup.interval.ms=1000\n\
             {extra}",
            data = dir.join("data").display(),
        );
        std::fs::write(dir.join("server.properties"), properties).expect("server.properties");
        let mut format = java(dir);
        // `=`: an id may begin with `-`.
        format.args(["kafka.tools.StorageTool", "format", "--standalone"]);
        format.arg(format!("--cluster-id={}", cluster_id()));
        format.args(["--config", "server.properties"]);
        if let Some((_, listener)) = &local.sasl_ssl {
            for (user, password) in &listener.users {
                for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512"] {
                    format.arg("--add-scram").arg(format!(
                        "{mechanism}=[name=\"{user}\",password=\"{password}\"]"
                    ));
                }
            }
        }
        let out = format
            .output()
            .expect("run java (Java 17+ must be on PATH)");
        assert!(
            out.status.success(),
            "kafka-storage format failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn log_path(&self) -> PathBuf {
        self.local().dir.path().join("kafka.log")
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the broker and waits until it says it started.
    fn spawn(&mut self) {
        let dir = self.local().dir.path().to_owned();
        let log_path = self.log_path();
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("broker log");
        let before = std::fs::metadata(&log_path).map_or(0, |m| m.len()) as usize;
        let mut java = java(&dir);
        java.arg(format!("-Xms{HEAP}"))
            .arg(format!("-Xmx{HEAP}"))
            .args(["kafka.Kafka", "server.properties"])
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        #[allow(unsafe_code)]
        // SAFETY: prctl(2) only, between fork and exec: the broker gets SIGKILL when the
        // thread that started it (the test) ends, so a test binary that is killed or
        // panics past its drops leaves no broker behind.
        unsafe {
            java.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = java.spawn().expect("start the Kafka broker (java)");
        loop {
            let log = self.log();
            if log
                .get(before..)
                .is_some_and(|l| l.contains("Kafka Server started"))
            {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the Kafka broker exited ({status}) while starting; its log:\n{log}");
            }
            if started.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                panic!("the Kafka broker did not start within 120 s; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        announce(&child, started.elapsed());
        self.process = Some(child);
    }

    /// `kill -9` the broker.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports and log directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
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
        self.produce_with(topic, records, &[]).await;
    }

    /// As [`Self::produce`], with these producer properties (e.g. `compression.type`).
    pub async fn produce_with(
        &self,
        topic: &str,
        records: impl IntoIterator<Item = (Option<String>, String, Vec<(String, String)>)>,
        properties: &[(&str, &str)],
    ) {
        let mut config = self.client_config();
        config.set("linger.ms", "5");
        for (key, value) in properties {
            config.set(*key, *value);
        }
        let producer: FutureProducer = config.create().expect("producer");
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

    /// Every record of `topic` from the start, as a `read_committed` consumer sees it, read
    /// until `until` says enough or `idle` passes without a new record.
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
            .set("isolation.level", "read_committed")
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

    /// Per partition of `topic`, how many of its last offsets are in transactions still
    /// open: the high watermark less the last stable offset.
    pub fn in_open_transactions(&self, topic: &str, partitions: i32) -> Vec<i64> {
        // librdkafka asks for the end offset at the client's isolation level: the high
        // watermark when reading uncommitted, the last stable offset when reading committed.
        let end = |isolation: &str| -> Vec<i64> {
            let consumer: BaseConsumer = self
                .client_config()
                .set("isolation.level", isolation)
                .create()
                .expect("consumer");
            (0..partitions)
                .map(|p| {
                    consumer
                        .fetch_watermarks(topic, p, Duration::from_secs(10))
                        .map_or(0, |(_, end)| end)
                })
                .collect()
        };
        let high = end("read_uncommitted");
        let stable = end("read_committed");
        high.iter().zip(&stable).map(|(h, s)| h - s).collect()
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

/// Says once per test binary what the first broker cost: its heap, its resident memory once
/// started, and its start time. Written to stderr directly, past the test harness's capture.
fn announce(child: &Child, took: Duration) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let rss = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .map(|l| l["VmRSS:".len()..].trim().to_owned())
            })
            .unwrap_or_else(|| "?".into());
        let _ = writeln!(
            std::io::stderr(),
            "Apache Kafka {} (single KRaft node): JVM heap {HEAP}, resident {rss} once started, \
             started in {:.1} s",
            crate::KAFKA_VERSION,
            took.as_secs_f64()
        );
    });
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.kill();
    }
}
