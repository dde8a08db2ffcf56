//! A real Redis Cluster for tests: six of Debian's `redis-server`s (three masters and a
//! replica of each) on free loopback ports with AOF on, joined by `redis-cli --cluster
//! create`; a master can be killed with `kill -9` and its replica's promotion awaited.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::redis_server::RedisServer;

/// A running Redis Cluster, stopped when dropped.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

/// How long a master may be silent before its replica takes over.
const NODE_TIMEOUT_MS: u64 = 1_000;

impl RedisCluster {
    /// Starts three masters with a replica each and waits until every slot is served.
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                RedisServer::start_with(
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        &NODE_TIMEOUT_MS.to_string(),
                        "--cluster-port",
                        &crate::free_port().to_string(),
                    ]
                    .map(str::to_owned)
                    .to_vec(),
                )
            })
            .collect();
        let cluster = Self { nodes };
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(
                cluster
                    .nodes
                    .iter()
                    .map(|n| format!("127.0.0.1:{}", n.port())),
            )
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("run redis-cli (Debian package redis-tools, with redis-server)");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        cluster.wait_until_served(Duration::from_secs(30));
        cluster
    }

    /// Every node's URL, comma-separated (the seeds a worker is given).
    pub fn url(&self) -> String {
        let urls: Vec<String> = (self.nodes.iter())
            .map(|n| format!("redis://127.0.0.1:{}/", n.port()))
            .collect();
        urls.join(",")
    }

    /// Where it is, as the worker's library takes it.
    pub fn target(&self) -> weir::state::RedisTarget {
        weir::state::RedisTarget::cluster(self.url(), weir::state::DEFAULT_CLUSTER_BUCKETS)
    }

    /// Its processes.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(RedisServer::pid).collect()
    }

    /// `redis-cli -p <port> <args>`'s output.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The ports of the live masters that serve slots.
    pub fn masters(&self) -> Vec<u16> {
        let any = self.live().next().expect("a live node");
        let mut masters: Vec<u16> = self
            .cli(any, &["cluster", "nodes"])
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let serves = fields.len() > 8;
                let flags = fields.get(2)?;
                let live_master = flags.contains("master") && !flags.contains("fail");
                let port = fields.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                (serves && live_master).then_some(port)
            })
            .collect();
        masters.sort_unstable();
        masters
    }

    /// The calls of `command` each live master has served (INFO commandstats).
    pub fn calls_per_master(&self, command: &str) -> Vec<u64> {
        let prefix = format!("cmdstat_{command}:calls=");
        (self.masters().into_iter())
            .map(|port| {
                (self.cli(port, &["info", "commandstats"]).lines())
                    .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
                    .and_then(|rest| rest.split(',').next()?.parse().ok())
                    .unwrap_or(0)
            })
            .collect()
    }

    /// `kill -9` of the master at `port`, for good.
    pub fn kill(&mut self, port: u16) {
        let node = (self.nodes.iter_mut())
            .find(|n| n.port() == port)
            .expect("a node of this cluster");
        node.kill_now();
    }

    fn live(&self) -> impl Iterator<Item = u16> + '_ {
        (self.nodes.iter())
            .map(RedisServer::port)
            .filter(|&p| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok())
    }

    /// Waits until every live node says the cluster serves all its slots with three live
    /// masters (after a kill: until a replica took over), and every replica is in sync
    /// with its master (one that never was refuses to take over).
    pub fn wait_until_served(&self, timeout: Duration) {
        let started = Instant::now();
        loop {
            let ok = self.live().all(|p| {
                let replication = self.cli(p, &["info", "replication"]);
                let synced = !replication.contains("role:slave")
                    || replication.contains("master_link_status:up");
                synced
                    && self
                        .cli(p, &["cluster", "info"])
                        .contains("cluster_state:ok")
            });
            if ok && self.masters().len() == 3 {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "the Redis Cluster did not serve every slot in {timeout:?}: {}",
                self.cli(self.live().next().unwrap_or(0), &["cluster", "nodes"])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
