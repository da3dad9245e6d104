//! Nodes reaching Redis over TLS (`rediss://`), trusting a private CA
//! through `[cluster] tls_ca_file`; a node that does not trust it stays
//! degraded rather than talk to an unverified server.
#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::net::TcpListener;
use std::time::Duration;

use cluster::{recv_within, wait_for_redis, Redis};
use common::redis::RedisServer;
use common::TestServer;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn nodes_reach_a_tls_redis_that_they_trust_and_refuse_one_they_do_not() {
    let dir = std::env::temp_dir().join(format!("ringcast-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    common::tls::certificates(&dir, "redis");
    let tls_port = free_port();
    let file = |name: &str| dir.join(name).display().to_string();
    let _redis = RedisServer::start_with_args(vec![
        "--tls-port".into(),
        tls_port.to_string(),
        "--tls-cert-file".into(),
        file("redis.pem"),
        "--tls-key-file".into(),
        file("redis.key"),
        "--tls-ca-cert-file".into(),
        file("ca.pem"),
        "--tls-auth-clients".into(),
        "no".into(),
    ]);
    let node = |name: &str, trust: bool| {
        let ca = if trust {
            format!("tls_ca_file = \"{}\"\n", file("ca.pem"))
        } else {
            String::new()
        };
        let config = format!(
            "[cluster]\nredis_url = \"rediss://127.0.0.1:{tls_port}\"\nnode_name = \"{name}\"\nprefix = \"tls\"\n{ca}"
        );
        TestServer::start(cluster::SHARDS, Some(&config))
    };
    let a = node("a", true);
    let b = node("b", true);
    wait_for_redis(&a, "a", Redis::Up);
    wait_for_redis(&b, "b", Redis::Up);
    let mut on_a = a.ws("/ws");
    on_a.subscribe("secure");
    assert_eq!(b.publish(r#"{"topic":"secure","payload":"over tls"}"#), 202);
    let push = recv_within(&mut on_a, Duration::from_secs(5)).expect("the publish crossed Redis");
    assert!(push.contains("over tls"), "{push}");
    drop(on_a);

    // The system's CAs do not know this one: the node never counts as up.
    let untrusting = node("c", false);
    std::thread::sleep(Duration::from_secs(2));
    let health = cluster::health(&untrusting);
    assert_eq!(health["status"], "degraded", "{health}");
    let _ = std::fs::remove_dir_all(&dir);
}
