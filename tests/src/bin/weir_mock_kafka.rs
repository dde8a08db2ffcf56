//! librdkafka's mock Kafka cluster in a process of its own, so that real worker processes
//! can connect to it: `weir-mock-kafka <brokers> <topic>:<partitions>...` creates the
//! topics, prints the bootstrap servers on one line and serves until its stdin closes. The
//! mock implements transactions and producer fencing, which tansu lacks (issue 6).

use std::io::Read;

use rdkafka::mocking::MockCluster;

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
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    Ok(())
}
