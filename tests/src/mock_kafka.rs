//! librdkafka's mock cluster, run as a child process (`weir-mock-kafka`) so that worker
//! processes connect to it as to a broker. Producing and reading go through
//! [`KafkaBroker::external`].

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use crate::kafka_broker::KafkaBroker;

pub struct MockKafka {
    /// Produces to and reads from the mock.
    pub broker: KafkaBroker,
    child: Child,
}

impl MockKafka {
    /// Starts `bin` (the `weir-mock-kafka` of the calling test) with `brokers` brokers and
    /// the `(name, partitions)` topics.
    pub fn start(bin: &str, brokers: i32, topics: &[(&str, i32)]) -> Self {
        let mut child = Command::new(bin)
            .arg(brokers.to_string())
            .args(topics.iter().map(|(name, n)| format!("{name}:{n}")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start weir-mock-kafka");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("bootstrap servers");
        assert!(
            !line.trim().is_empty(),
            "weir-mock-kafka printed no bootstrap servers"
        );
        Self {
            // The mock does not hide aborted records from read_committed readers anyway,
            // and a killed producer's transaction stays open there: read_committed would
            // stop at it.
            broker: KafkaBroker::external(line.trim()).reading_uncommitted(),
            child,
        }
    }
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
