//! librdkafka's mock Kafka cluster in a process of its own, so that real worker processes
//! can connect to it: `weir-mock-kafka <brokers> <topic>:<partitions>...` creates the
//! topics, prints the bootstrap servers on one line and serves until its stdin closes. The
//! mock implements transactions, which tansu lacks (issue 6).
//!
//! Commands on stdin, each answered with `ok` on stdout:
//! - `fence`: the transactional requests that follow (`Produce`, `AddPartitionsToTxn`,
//!   `AddOffsetsToTxn`, `EndTxn`) fail with `INVALID_PRODUCER_EPOCH`, as a real broker
//!   answers a producer whose transactional id was registered again by another. (The mock
//!   itself gives the other producer a new producer id and does not fence.)
//! - `clear`: they succeed again.

use std::io::BufRead;

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const TRANSACTIONAL: [RDKafkaApiKey; 4] = [
    RDKafkaApiKey::Produce,
    RDKafkaApiKey::AddPartitionsToTxn,
    RDKafkaApiKey::AddOffsetsToTxn,
    RDKafkaApiKey::EndTxn,
];

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let brokers: i32 = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: weir-mock-kafka <brokers> <topic>:<partitions>..."))?
        .parse()?;
    let cluster = MockCluster::new(brokers)?;
    for topic in args {
        let (name, partitions) = topic
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("`{topic}` is not <topic>:<partitions>"))?;
        cluster.create_topic(name, partitions.parse()?, brokers.min(3))?;
    }
    println!("{}", cluster.bootstrap_servers());
    // Serve until the harness closes our stdin (or kills us).
    for line in std::io::stdin().lock().lines() {
        match line?.trim() {
            "fence" => {
                let errors = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH; 10_000];
                for api in TRANSACTIONAL {
                    cluster.request_errors(api, &errors);
                }
            }
            "clear" => {
                for api in TRANSACTIONAL {
                    cluster.clear_request_errors(api);
                }
            }
            other => anyhow::bail!("unknown command `{other}`"),
        }
        println!("ok");
    }
    Ok(())
}
