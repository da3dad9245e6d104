//! The broker's hands on Redis: fred clients, and the tasks that carry out
//! the state's operations and report what came of them as events, on one
//! channel (see `cluster::broker` for the loop).
//!
//! Everything here is bounded by the state: it asks for at most one batch
//! of channel changes and one presence write at a time, and bounds stream
//! publications, reads and presence queries in flight. Publications for the
//! other nodes are bounded in bytes by the shards (`max_queued_bytes`), and
//! here by count as a backstop.

mod member_events;
mod presence;
mod registry;
mod streams;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::*;
use fred::types::{Builder, ClusterHash, CustomCommand};
use tokio::sync::mpsc;

use crate::config::ClusterConfig;

use super::interest::Key;
use super::liveness::Pong;
use super::state::{control_channel, Event, Op, StreamPublication};
use super::subscriptions::Change;
use super::ClusterStatus;

pub(super) use streams::WaitReplicas;

/// Publications waiting for Redis, by count; the real bound is in bytes
/// (`cluster.max_queued_bytes`, checked by the shards before queueing).
const PUBLISH_QUEUE: usize = 65_536;
/// Most publications in one pipeline.
const PIPELINE_BATCH: usize = 1024;
/// Messages from Redis the client buffers for the broker before dropping
/// (counted): a second of a busy node's cross-node traffic.
const RECEIVE_BUFFER: usize = 65_536;
/// A Redis command that takes longer fails: a down Redis is then noticed
/// by publishers within this time, not after TCP gives up.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnect backoff: 50 ms doubling to 2 s, plus up to 100 ms of jitter so
/// the nodes of a cluster do not all reconnect at the same instant.
const BACKOFF_MIN_MS: u32 = 50;
const BACKOFF_MAX_MS: u32 = 2000;
const BACKOFF_JITTER_MS: u32 = 100;

/// A batch of channel changes, on the connection numbered `.0`.
type Batch = (u64, Vec<Change<Key>>);

/// A client of the node's Redis with the cluster's policies: connections
/// retried with jittered backoff (Redis may start after the node), every
/// command bounded by [`COMMAND_TIMEOUT`], never sent twice over a
/// reconnection, and `receive_buffer` messages buffered for a subscriber.
pub(crate) fn build_client(
    mut redis: fred::prelude::Config,
    receive_buffer: usize,
) -> Result<Client, Error> {
    let clustered = redis.server.is_clustered();
    // Retry the first connection too: Redis may start after us.
    redis.fail_fast = false;
    let mut policy = ReconnectPolicy::new_exponential(0, BACKOFF_MIN_MS, BACKOFF_MAX_MS, 2);
    policy.set_jitter(BACKOFF_JITTER_MS);
    Builder::from_config(redis)
        .set_policy(policy)
        .with_performance_config(|p| {
            p.default_command_timeout = COMMAND_TIMEOUT;
            p.broadcast_channel_capacity = receive_buffer;
        })
        .with_connection_config(|c| {
            c.connection_timeout = COMMAND_TIMEOUT;
            c.internal_command_timeout = COMMAND_TIMEOUT;
            // A command in flight when the connection drops is not
            // sent again on the next one: a publish could arrive
            // twice. A Redis Cluster answers MOVED or ASK while its
            // slots move (a failover, resharding), and following
            // one is a second attempt; there, stream publications
            // carry a key that makes a second run harmless.
            c.max_command_attempts = if clustered { 3 } else { 1 };
        })
        .build()
}

/// The node's connections to Redis and the tasks that use them.
pub(super) struct Redis {
    pub(super) subscriber: Client,
    publisher: Client,
    prefix: String,
    status: Arc<ClusterStatus>,
    presence_ttl: Duration,
    done: mpsc::UnboundedSender<Event>,
    batches: mpsc::UnboundedSender<Batch>,
    /// Channel, message, and the bytes it holds of `max_queued_bytes`.
    publishes: mpsc::Sender<(String, Bytes, usize)>,
    stream_publishes: mpsc::UnboundedSender<StreamPublication>,
}

impl Redis {
    /// Builds the clients and starts connecting (in the background: a node
    /// starts even when Redis is down, degraded, and keeps trying). What
    /// comes of the operations is sent to `done`.
    pub(super) fn connect(
        config: &ClusterConfig,
        redis: fred::prelude::Config,
        status: Arc<ClusterStatus>,
        done: mpsc::UnboundedSender<Event>,
    ) -> Result<Redis, Error> {
        let client = |receive_buffer: usize| build_client(redis.clone(), receive_buffer);
        let subscriber = client(RECEIVE_BUFFER)?;
        let publisher = client(16)?;
        subscriber.connect();
        publisher.connect();

        let (batches, batches_rx) = mpsc::unbounded_channel();
        tokio::spawn(subscriptions(subscriber.clone(), batches_rx, done.clone()));
        let (publishes, publishes_rx) = mpsc::channel(PUBLISH_QUEUE);
        tokio::spawn(publish(publisher.clone(), publishes_rx, status.clone()));
        let wait = (config.wait_replicas > 0).then_some(WaitReplicas {
            replicas: config.wait_replicas,
            // Under the command timeout, so WAIT answers before the client gives up.
            timeout_ms: (COMMAND_TIMEOUT / 2).as_millis() as u64,
        });
        let (stream_publishes, stream_rx) = mpsc::unbounded_channel();
        tokio::spawn(streams::publish_task(
            publisher.clone(),
            config.prefix.clone(),
            stream_rx,
            done.clone(),
            wait,
        ));
        Ok(Redis {
            subscriber,
            publisher,
            prefix: config.prefix.clone(),
            status,
            presence_ttl: config.presence_ttl,
            done,
            batches,
            publishes,
            stream_publishes,
        })
    }

    /// Whether Redis Cluster serves the node (commands may run twice).
    pub(super) fn clustered(&self) -> bool {
        self.publisher.is_clustered()
    }

    /// Whether both connections are open (not whether Redis answers).
    pub(super) fn connected(&self) -> bool {
        self.subscriber.is_connected() && self.publisher.is_connected()
    }

    /// Carries out an operation for Redis (not `Op::ToShard`, which is the
    /// bus's): what comes of it arrives as an event.
    pub(super) fn execute(&self, op: Op) {
        let client = self.publisher.clone();
        let done = self.done.clone();
        let prefix = self.prefix.clone();
        match op {
            Op::ToShard { .. } => debug_assert!(false, "envelopes go on the bus"),
            Op::Subscriptions {
                connection,
                changes,
            } => {
                let _ = self.batches.send((connection, changes));
            }
            Op::Publish {
                channel,
                message,
                held,
            } => {
                if self.publishes.try_send((channel, message, held)).is_err() {
                    self.status.release(held);
                    ClusterStatus::count(&self.status.stats.drops_total);
                }
            }
            Op::StreamPublish(publication) => {
                let _ = self.stream_publishes.send(publication);
            }
            Op::Read(request) => {
                tokio::spawn(async move { streams::read(client, &prefix, request, done).await });
            }
            Op::WriteRegistration(write) => {
                tokio::spawn(registry::write(client, prefix, write, done));
            }
            Op::LoadRegistrations { after } => {
                tokio::spawn(registry::load(client, prefix, after, done));
            }
            Op::WritePresence(writes) => {
                let (node, ttl) = (self.status.node.clone(), self.presence_ttl);
                tokio::spawn(presence::write(client, prefix, node, ttl, writes, done));
            }
            Op::QueryPresence(query) => {
                let node = self.status.node.clone();
                tokio::spawn(presence::query(client, prefix, node, query, done));
            }
            Op::DecideMembers(commands) => {
                let (node, ttl) = (self.status.node.clone(), self.presence_ttl);
                tokio::spawn(member_events::decide(
                    client, prefix, node, ttl, commands, done,
                ));
            }
            Op::AskNodes { id, message } => {
                tokio::spawn(async move {
                    let channel = control_channel(&prefix);
                    let heard = client.spublish::<i64, _, _>(channel, message).await;
                    let receivers = heard.ok().map(|n| n.max(0) as usize);
                    let _ = done.send(Event::NodesAsked { id, receivers });
                });
            }
            Op::AnswerNode { message } => {
                tokio::spawn(async move {
                    let channel = control_channel(&prefix);
                    if let Err(e) = client.spublish::<i64, _, _>(channel, message).await {
                        tracing::debug!("cluster: an answer to another node failed: {e}");
                    }
                });
            }
            Op::Ping => {
                tokio::spawn(async move {
                    let pong = match client.ping::<Value>(None).await {
                        Ok(_) => Pong::Answered,
                        Err(e) if *e.kind() == ErrorKind::Timeout => Pong::TimedOut,
                        Err(_) => Pong::Failed,
                    };
                    let _ = done.send(Event::Pong(pong));
                });
            }
        }
    }

    /// Sharded pub/sub (`SSUBSCRIBE`, `SPUBLISH`) needs Redis 7: an older
    /// server would take the connection and silently deliver nothing
    /// across nodes. Returns the version of one too old.
    pub(super) async fn unsupported_version(&self) -> Option<String> {
        let info = CustomCommand::new_static("INFO", ClusterHash::Random, false);
        let reply = self.publisher.custom::<String, _>(info, vec!["server"]);
        let Ok(Ok(info)) = tokio::time::timeout(COMMAND_TIMEOUT, reply).await else {
            return None; // unknown: the connection is being lost again
        };
        let version = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("")
            .trim()
            .to_string();
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        (major < 7).then_some(version)
    }

    /// Lets the publish tasks send what they hold, and closes.
    pub(super) async fn quit(self) {
        drop(self.publishes);
        drop(self.stream_publishes);
        let _ = tokio::time::timeout(COMMAND_TIMEOUT, self.publisher.quit()).await;
    }
}

/// Sends each batch of subscription changes pipelined (the client writes
/// them without waiting for answers; one change per channel in a batch, so
/// their order within it does not matter) and answers once all are
/// confirmed or failed. Batches go one at a time, in order.
async fn subscriptions(
    client: Client,
    mut batches: mpsc::UnboundedReceiver<Batch>,
    done: mpsc::UnboundedSender<Event>,
) {
    while let Some((connection, batch)) = batches.recv().await {
        let results = futures_util::future::join_all(batch.iter().map(|change| {
            let channel = change.channel.clone();
            let client = &client;
            async move {
                if change.subscribe {
                    client.ssubscribe(channel).await
                } else {
                    client.sunsubscribe(channel).await
                }
            }
        }))
        .await;
        let changes = batch
            .into_iter()
            .zip(results)
            .map(|(change, result)| {
                if let Err(e) = &result {
                    // Asked again once Redis answers (`resync`).
                    tracing::debug!(
                        "cluster: {} {} failed: {e}",
                        if change.subscribe {
                            "SSUBSCRIBE"
                        } else {
                            "SUNSUBSCRIBE"
                        },
                        change.channel
                    );
                }
                (change, result.is_ok())
            })
            .collect();
        let _ = done.send(Event::Subscribed {
            connection,
            changes,
        });
    }
}

/// Sends publications in pipelines, in the order the shards handed them over.
async fn publish(
    client: Client,
    mut queue: mpsc::Receiver<(String, Bytes, usize)>,
    status: Arc<ClusterStatus>,
) {
    let mut batch = Vec::with_capacity(PIPELINE_BATCH);
    while queue.recv_many(&mut batch, PIPELINE_BATCH).await > 0 {
        let pipeline = client.pipeline();
        let mut queued = 0u64;
        let mut held = 0;
        for (channel, message, bytes) in batch.drain(..) {
            held += bytes;
            let ok: Result<(), Error> = pipeline.spublish(channel, message).await;
            if ok.is_ok() {
                queued += 1;
            } else {
                ClusterStatus::count(&status.stats.drops_total);
            }
        }
        let results: Vec<Result<Value, Error>> = pipeline.try_all().await;
        let sent = results.iter().filter(|r| r.is_ok()).count() as u64;
        status
            .stats
            .published_total
            .fetch_add(sent, Ordering::Relaxed);
        status
            .stats
            .drops_total
            .fetch_add(queued.saturating_sub(sent), Ordering::Relaxed);
        status.release(held);
    }
}
