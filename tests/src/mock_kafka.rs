//! librdkafka's mock cluster, run as a child process (`weir-mock-kafka`) so that worker
//! processes connect to it as to a broker. Producing and reading go through
//! [`KafkaBroker::external`].

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use crate::kafka_broker::KafkaBroker;

pub struct MockKafka {
    /// Produces to and reads from the mock.
    pub broker: KafkaBroker,
    child: Child,
    commands: ChildStdin,
    answers: BufReader<ChildStdout>,
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
        let mut answers = BufReader::new(child.stdout.take().expect("stdout"));
        answers.read_line(&mut line).expect("bootstrap servers");
        assert!(
            !line.trim().is_empty(),
            "weir-mock-kafka printed no bootstrap servers"
        );
        Self {
            // The mock does not hide aborted records from read_committed readers anyway,
            // and a killed producer's transaction stays open there: read_committed would
            // stop at it.
            broker: KafkaBroker::external(line.trim()).reading_uncommitted(),
            commands: child.stdin.take().expect("stdin"),
            child,
            answers,
        }
    }

    /// From now on, transactional requests fail as those of a fenced producer do (see
    /// `weir-mock-kafka`), until [`Self::clear`].
    pub fn fence(&mut self) {
        self.command("fence");
    }

    pub fn clear(&mut self) {
        self.command("clear");
    }

    fn command(&mut self, command: &str) {
        writeln!(self.commands, "{command}").expect("command to weir-mock-kafka");
        let mut answer = String::new();
        self.answers.read_line(&mut answer).expect("answer");
        assert_eq!(answer.trim(), "ok", "weir-mock-kafka on `{command}`");
    }
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
