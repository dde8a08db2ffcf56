//! Issue 6's exactly-once tests run against librdkafka's mock cluster (`weir-mock-kafka`, a
//! child process), because tansu 0.6 has no transactions. This first test checks the
//! harness itself: a worker process consumes from the mock in a consumer group and produces
//! to it, at least once.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use weir_tests::mock_kafka::MockKafka;
use weir_tests::worker::{Cluster, Worker};

const BIN: &str = env!("CARGO_BIN_EXE_weir-under-test");
const MOCK: &str = env!("CARGO_BIN_EXE_weir-mock-kafka");

#[test]
fn a_worker_consumes_and_produces_through_the_mock_cluster() {
    let mock = MockKafka::start(MOCK, 3, &[("in", 4), ("out", 4), ("dlq", 1)]);
    let n = 2_000;
    let events = (0..n).map(|i| {
        let value = format!(r#"{{"id":"e{i}","user_id":"u{i}","ts":1704067200}}"#);
        (Some(format!("e{i}")), value, Vec::new())
    });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(mock.broker.produce("in", events));
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster {
        bootstrap: mock.broker.bootstrap.clone(),
        redis: None,
        group: "g".into(),
        input: "in".into(),
        output: "out".into(),
        dlq: "dlq".into(),
    };
    let plugin = weir_tests::plugin("faulty");
    let worker = Worker::start(
        BIN,
        dir.path(),
        "w",
        &cluster,
        &plugin,
        &["--plugin-config", "faults=off", "--id", "/id", "--quiet"],
    );
    let started = Instant::now();
    let ids = loop {
        let out = mock
            .broker
            .read_topic("out", Duration::from_secs(3), |r| r.len() >= n);
        let ids: BTreeSet<String> = out
            .iter()
            .filter_map(|r| r.header("weir.record-id"))
            .collect();
        if ids.len() >= n || started.elapsed() > Duration::from_secs(90) {
            break ids;
        }
    };
    assert_eq!(ids.len(), n, "ids in the output; log:\n{}", worker.log());
    assert!(worker.stop().success());
}
