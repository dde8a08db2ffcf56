//! Kafka and Redis the way users run them: a worker connects to an Apache Kafka over
//! `SASL_SSL` (SCRAM, certificates made by the test) and to a Redis over TLS as an ACL
//! user, its passwords taken from the environment; input compressed with every codec is
//! read (the output is written with zstd). A wrong password or an untrusted certificate,
//! for Kafka or Redis, ends the worker with one clear error line instead of a hang, and no
//! secret is ever printed.

use crate::WEIR;
use std::path::Path;
use std::time::Duration;

use weir_tests::kafka_broker::{KafkaBroker, SaslSsl};
use weir_tests::redis_server::{RedisServer, Secured};
use weir_tests::tls::TestPki;
use weir_tests::worker::{Cluster, Worker};

const KAFKA_PASSWORD: &str = "kafka-pw-7f3a9";
const REDIS_PASSWORD: &str = "redis-pw-c41e2";

/// A broker with a `SASL_SSL` listener (user `weir`), a TLS-only Redis (ACL user `weir`),
/// and topics `in`, `out` and `dlq`, created over the broker's plain listener.
struct Setup {
    pki: TestPki,
    broker: KafkaBroker,
    redis: RedisServer,
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
}

impl Setup {
    fn new() -> Self {
        let pki = TestPki::new();
        let read = |path: &Path| std::fs::read_to_string(path).expect("PEM");
        let broker = KafkaBroker::start_with_sasl_ssl(SaslSsl {
            certificate: read(&pki.server_certificate()),
            private_key: read(&pki.server_key()),
            users: vec![("weir".into(), KAFKA_PASSWORD.into())],
        });
        let redis = RedisServer::start_secured(Secured {
            certificate: pki.server_certificate(),
            key: pki.server_key(),
            ca: pki.ca(),
            user: "weir".into(),
            password: REDIS_PASSWORD.into(),
        });
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            for (topic, partitions) in [("in", 2), ("out", 2), ("dlq", 1)] {
                broker.create_topic(topic, partitions).await;
            }
        });
        Self {
            pki,
            broker,
            redis,
            dir: tempfile::tempdir().expect("tempdir"),
            rt,
        }
    }

    /// Produces `e<from>..e<to>` compressed with `codec`.
    fn produce(&self, ids: std::ops::Range<usize>, codec: &str) {
        let records = ids.map(|i| {
            let value = format!(r#"{{"id":"e{i}","user_id":"u{i}","ts":1704067200}}"#);
            (Some(format!("e{i}")), value, Vec::new())
        });
        self.rt.block_on(
            self.broker
                .produce_with("in", records, &[("compression.type", codec)]),
        );
    }

    /// A worker on the `SASL_SSL` listener (mechanism `mechanism`, CA `ca`, password from
    /// `WEIR_TEST_KAFKA_PASSWORD`) and the TLS Redis (`redis_ca`, password from
    /// `WEIR_TEST_REDIS_PASSWORD`), the environment holding `passwords`.
    fn worker(
        &self,
        name: &str,
        mechanism: &str,
        ca: &Path,
        redis_ca: &Path,
        passwords: (&str, &str),
    ) -> Worker {
        let redis_url = self
            .redis
            .url
            .replace(REDIS_PASSWORD, "${env:WEIR_TEST_REDIS_PASSWORD}");
        let cluster = Cluster {
            bootstrap: self.broker.sasl_ssl_bootstrap(),
            redis: Some(redis_url),
            group: "g".into(),
            input: "in".into(),
            output: "out".into(),
            dlq: "dlq".into(),
        };
        let options = [
            "security.protocol=SASL_SSL".to_owned(),
            format!("sasl.mechanism={mechanism}"),
            "sasl.username=weir".to_owned(),
            "sasl.password=${env:WEIR_TEST_KAFKA_PASSWORD}".to_owned(),
            format!("ssl.ca.location={}", ca.display()),
            "compression.type=zstd".to_owned(),
        ];
        let redis_ca = redis_ca.display().to_string();
        let mut flags = vec!["--id", "/id", "--quiet", "--redis-ca-file", &redis_ca];
        for option in &options {
            flags.extend(["--kafka-option", option]);
        }
        Worker::start_with_env(
            WEIR,
            self.dir.path(),
            name,
            &cluster,
            &weir_tests::plugin("enrich"),
            &flags,
            &[
                ("WEIR_TEST_KAFKA_PASSWORD", passwords.0),
                ("WEIR_TEST_REDIS_PASSWORD", passwords.1),
            ],
        )
    }
}

/// The passwords a worker was given.
const GIVEN: [&str; 3] = [KAFKA_PASSWORD, REDIS_PASSWORD, WRONG_PASSWORD];
const WRONG_PASSWORD: &str = "not-the-pw-5d0b8";

/// Asserts that `worker` ends, failing, with one error line holding every one of `needles`
/// and no password it was given; returns that line, and how long the worker took to end.
fn ends_with_one_error(mut worker: Worker, needles: &[&str]) -> String {
    let started = std::time::Instant::now();
    let status = worker.wait_exit(Duration::from_secs(90));
    let took = started.elapsed();
    let log = worker.log();
    assert!(!status.success(), "the worker should have failed:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("weir: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line:\n{log}");
    for needle in needles {
        assert!(errors[0].contains(needle), "`{needle}` not said:\n{log}");
    }
    for secret in GIVEN {
        assert!(!log.contains(secret), "a password was printed:\n{log}");
    }
    format!(
        "{} (ended {:.1} s after the test began waiting)",
        errors[0],
        took.as_secs_f64()
    )
}

#[test]
fn a_worker_runs_over_sasl_ssl_and_tls_redis_with_passwords_from_the_environment() {
    let s = Setup::new();
    let codecs = ["none", "gzip", "snappy", "lz4", "zstd"];
    for (i, codec) in codecs.iter().enumerate() {
        s.produce(i * 200..(i + 1) * 200, codec);
    }
    let n = codecs.len() * 200;
    let ca = s.pki.ca();
    let w = s.worker(
        "w",
        "SCRAM-SHA-512",
        &ca,
        &ca,
        (KAFKA_PASSWORD, REDIS_PASSWORD),
    );
    w.wait_metric(
        "weir_records_processed_total",
        n as f64,
        Duration::from_secs(120),
    );
    let out = s
        .broker
        .read_topic("out", Duration::from_secs(5), |r| r.len() >= n);
    assert_eq!(out.len(), n, "every record of every codec is output");

    // `weir cluster status` over TLS, as the ACL user, lists the worker.
    let status = std::process::Command::new(WEIR)
        .args(["cluster", "status", "--json", "--redis-ca-file"])
        .arg(&ca)
        .args(["--redis", &s.redis.url])
        .output()
        .expect("weir cluster status");
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && said.contains("\"topic\": \"in\""),
        "{said}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(w.stop().success(), "graceful stop");
    // The whole log, the shutdown included.
    let log = std::fs::read_to_string(s.dir.path().join("w.log")).expect("log");
    for secret in GIVEN {
        assert!(!log.contains(secret), "a password was printed:\n{log}");
    }
    println!("{n} records over SASL_SSL (SCRAM-SHA-512) and TLS Redis, input in {codecs:?}");
}

#[test]
fn a_wrong_kafka_password_is_one_clear_error() {
    let s = Setup::new();
    let ca = s.pki.ca();
    let w = s.worker(
        "w",
        "SCRAM-SHA-256",
        &ca,
        &ca,
        (WRONG_PASSWORD, REDIS_PASSWORD),
    );
    let line = ends_with_one_error(w, &["refused", "Authentication failed"]);
    println!("{line}");
}

#[test]
fn an_untrusted_kafka_certificate_is_one_clear_error() {
    let s = Setup::new();
    let w = s.worker(
        "w",
        "SCRAM-SHA-256",
        &s.pki.untrusted_ca(),
        &s.pki.ca(),
        (KAFKA_PASSWORD, REDIS_PASSWORD),
    );
    let line = ends_with_one_error(w, &["refused", "certificate verify failed"]);
    println!("{line}");
}

#[test]
fn a_wrong_redis_password_or_an_untrusted_redis_certificate_is_one_clear_error() {
    let s = Setup::new();
    let ca = s.pki.ca();
    let w = s.worker(
        "wrong-password",
        "SCRAM-SHA-256",
        &ca,
        &ca,
        (KAFKA_PASSWORD, WRONG_PASSWORD),
    );
    let wrong = ends_with_one_error(w, &["Redis at rediss://weir:***@", "AuthenticationFailed"]);
    let w = s.worker(
        "untrusted",
        "SCRAM-SHA-256",
        &ca,
        &s.pki.untrusted_ca(),
        (KAFKA_PASSWORD, REDIS_PASSWORD),
    );
    let untrusted =
        ends_with_one_error(w, &["Redis at rediss://weir:", "certificate verify failed"]);
    println!("{wrong}\n{untrusted}");
}

/// `--check` prints the effective configuration without a secret: secret options hidden,
/// the Redis password masked, references to where secrets are shown as written.
#[test]
fn check_shows_no_secret() {
    let out = std::process::Command::new(WEIR)
        .args(["run", "--check", "--plugin", "p.wasm", "--kafka", "k:9092"])
        .args([
            "--group",
            "g",
            "--input-topic",
            "in",
            "--output-topic",
            "out",
        ])
        .args(["--dlq-topic", "dlq"])
        .args(["--kafka-option", "sasl.password=hunter2"])
        .args(["--kafka-option", "sasl.username=weir"])
        .args([
            "--kafka-option",
            "ssl.key.pem=-----BEGIN PRIVATE KEY----- hunter2",
        ])
        .args([
            "--kafka-option",
            "sasl.oauthbearer.client.secret=${env:SECRET}",
        ])
        .args(["--redis", "rediss://weir:hunter2@redis:6380/0"])
        .output()
        .expect("weir run --check");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stdout.contains("hunter2") && !stderr.contains("hunter2"),
        "{stdout}{stderr}"
    );
    assert!(
        stdout.contains("\"sasl.password\" = \"<hidden>\""),
        "{stdout}"
    );
    assert!(stdout.contains("\"sasl.username\" = \"weir\""), "{stdout}");
    assert!(stdout.contains("${env:SECRET}"), "{stdout}");
    assert!(
        stdout.contains("rediss://weir:***@redis:6380/0"),
        "{stdout}"
    );
}
