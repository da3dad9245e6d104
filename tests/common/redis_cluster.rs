//! A real Redis Cluster for the tests: three masters and a replica each,
//! from the Debian `redis-server`, joined with `redis-cli --cluster create`,
//! every node persistent (AOF, fsync always) and on its own loopback port.
//! Test files include it with `#[path = "common/redis_cluster.rs"] mod redis_cluster;`.
#![allow(dead_code, unreachable_pub)]

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::redis::RedisServer;

/// How long the cluster may take to agree on its slots, or to promote a
/// replica after its master died (node timeout 1 s, then an election).
const CLUSTER_READY: Duration = Duration::from_secs(30);

pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts six nodes and makes them a cluster of three masters with a
    /// replica each; returns once every node says `cluster_state:ok`.
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..6).map(|_| RedisServer::start_cluster_node()).collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli runs (the redis-tools package)");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_until("every node to report cluster_state:ok", |c| {
            c.nodes
                .iter()
                .filter(|n| n.is_running())
                .all(|n| n.cmd(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        });
        // Replicas attach after the slots are assigned: wait for them too,
        // so a failover has someone to promote.
        cluster.wait_until("every master to have a replica in sync", |c| {
            c.masters().len() == 3
                && c.nodes.iter().all(|n| {
                    let replication = n.cmd(&["INFO", "replication"]);
                    replication.contains("connected_slaves:1")
                        || replication.contains("master_link_status:up")
                })
        });
        cluster
    }

    /// `redis-cluster://` with every master as a seed, for `[cluster] redis_url`.
    pub fn url(&self) -> String {
        let mut seeds = self.nodes.iter().filter(|n| n.is_running());
        let first = seeds.next().expect("a running node");
        let mut url = format!("redis-cluster://127.0.0.1:{}", first.port());
        for (i, node) in seeds.enumerate() {
            url += if i == 0 { "?" } else { "&" };
            url += &format!("node=127.0.0.1:{}", node.port());
        }
        url
    }

    /// The running nodes that are masters now.
    pub fn masters(&self) -> Vec<&RedisServer> {
        self.nodes
            .iter()
            .filter(|n| n.is_running() && n.cmd(&["INFO", "replication"]).contains("role:master"))
            .collect()
    }

    /// The index of the master serving `key`'s slot now.
    pub fn master_of(&self, key: &str) -> usize {
        let slot: u16 = self.nodes[0]
            .cmd(&["CLUSTER", "KEYSLOT", key])
            .parse()
            .unwrap();
        self.nodes
            .iter()
            .position(|n| {
                n.is_running()
                    && n.cmd(&["INFO", "replication"]).contains("role:master")
                    && owns_slot(n, slot)
            })
            .expect("a master serves every slot")
    }

    /// Kills node `index` (SIGKILL) and waits until the cluster is whole
    /// again: its replica promoted and every live node `cluster_state:ok`.
    pub fn kill_and_fail_over(&mut self, index: usize) {
        self.nodes[index].stop();
        self.wait_until("a replica to take over the killed master's slots", |c| {
            c.masters().len() == 3
                && c.nodes
                    .iter()
                    .filter(|n| n.is_running())
                    .all(|n| n.cmd(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        });
    }

    fn wait_until(&self, what: &str, mut done: impl FnMut(&RedisCluster) -> bool) {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < CLUSTER_READY,
                "Redis Cluster: timed out after {CLUSTER_READY:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Whether node `n` serves `slot`: its own line of `CLUSTER NODES` lists
/// its slot ranges.
fn owns_slot(n: &RedisServer, slot: u16) -> bool {
    let nodes = n.cmd(&["CLUSTER", "NODES"]);
    let Some(mine) = nodes.lines().find(|l| l.contains("myself")) else {
        return false;
    };
    mine.split_whitespace().skip(8).any(|range| {
        let mut ends = range.split('-');
        let (Some(start), end) = (ends.next(), ends.next()) else {
            return false;
        };
        let (Ok(start), Ok(end)) = (start.parse::<u16>(), end.unwrap_or(start).parse::<u16>())
        else {
            return false;
        };
        (start..=end).contains(&slot)
    })
}
