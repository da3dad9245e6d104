//! The webhook thread: a current-thread tokio runtime that feeds the
//! shards' notices, POST outcomes and timers to [`WebhookState`] and runs
//! the POSTs it asks for with a pooled keep-alive HTTP/1.1 client, each
//! signed and bounded by `[webhooks] timeout_ms`; with `[cluster]`, also
//! the Redis batches of its arbiter, one at a time, on its own client.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Uri;
use tokio::sync::{mpsc, oneshot};

use crate::backend::{BackendClient, Worker};
use crate::config::{ClusterConfig, WebhookConfig};

use super::arbiter::{Answer, Arbiter};
use super::cluster::{ClusterKeys, ClusterRunner};
use super::signature;
use super::state::{Op, WebhookState};
use super::{Report, Signer, Target, WebhookSink};

/// A POST's outcome: its destination, its id, whether it was delivered.
type Posted = (usize, u64, bool);

/// The most of a backend's answer that is read (and thrown away, so the
/// connection can be used again).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Starts the webhook thread for `sink`'s reports and plan; with `cluster`, its
/// transitions are decided with the other nodes through Redis. Stopped
/// with a flush time, it sends what is owed (every vacate due at once) for
/// up to that.
pub fn spawn(sink: Arc<WebhookSink>, cluster: Option<ClusterConfig>) -> io::Result<Worker> {
    let reports = sink.reports.take("webhook")?;
    let plan = sink.plan.clone();
    let uris = plan
        .targets
        .iter()
        .map(|t| {
            t.url.parse::<Uri>().map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("webhook url {}: {e}", t.url),
                )
            })
        })
        .collect::<io::Result<Vec<Uri>>>()?;
    let client = crate::backend::client()?;
    Worker::spawn("ringcast-webhooks", move |stopped| async move {
        let config = plan.settings.clone();
        let destinations = plan.destinations();
        let (state, runner) = match cluster.map(|c| clustered(&config, &c)).transpose() {
            Ok(Some((arbiter, runner))) => (
                WebhookState::clustered(config.clone(), destinations, arbiter),
                Some(runner),
            ),
            Ok(None) => (WebhookState::new(config.clone(), destinations), None),
            Err(e) => {
                tracing::error!("webhooks cannot reach the cluster's Redis: {e}");
                return;
            }
        };
        let driver = Driver {
            state,
            config,
            targets: plan.targets.into_iter().zip(uris).collect(),
            sink,
            client,
            runner,
        };
        driver.run(reports, stopped).await
    })
}

/// The arbiter and its Redis client for a node of `cluster`, under a name
/// of its own for this run.
fn clustered(
    config: &WebhookConfig,
    cluster: &ClusterConfig,
) -> io::Result<(Arbiter, ClusterRunner)> {
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| io::Error::other(e.to_string()))?;
    let node: Arc<str> = Arc::from(format!("{:016x}", u64::from_le_bytes(id)));
    let ttl = cluster.presence_ttl;
    let delays = [
        config.vacated_delay,
        config.offline_delay,
        config.vacated_delay,
    ];
    debug_assert_eq!(delays[super::Subject::User as usize], config.offline_delay);
    let longest = config.vacated_delay.max(config.offline_delay);
    let keys = ClusterKeys::new(&cluster.prefix, &node, ttl, longest);
    let client = crate::cluster::redis_client(cluster)?;
    tracing::info!("webhooks: decided across the cluster as node {node}");
    let arbiter = Arbiter::new(node, delays, ttl, Instant::now());
    Ok((arbiter, ClusterRunner::new(client, keys)))
}

/// What came of a Redis batch, and the runner back.
type RedisDone = (u64, Option<Vec<Answer>>, ClusterRunner);

struct Driver {
    state: WebhookState,
    config: Arc<WebhookConfig>,
    /// Each destination's target and its parsed URL, in the state's order.
    targets: Vec<(Target, Uri)>,
    sink: Arc<WebhookSink>,
    client: BackendClient,
    /// With a cluster: the Redis runner, when no batch has it.
    runner: Option<ClusterRunner>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Driver {
    async fn run(
        mut self,
        mut reports: mpsc::UnboundedReceiver<Report>,
        mut stopped: oneshot::Receiver<Duration>,
    ) {
        let (done_tx, mut done) = mpsc::unbounded_channel::<Posted>();
        let (redis_tx, mut redis) = mpsc::unbounded_channel::<RedisDone>();
        let flush = loop {
            self.start(&done_tx, &redis_tx);
            let deadline = self.state.next_deadline();
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                report = reports.recv() => match report {
                    Some(report) => self.report(report),
                    None => break Duration::ZERO,
                },
                Some((to, id, ok)) = done.recv() => self.posted(to, id, ok),
                Some(answered) = redis.recv() => self.redis_answered(answered),
                () = sleep => self.state.tick(Instant::now(), unix_ms()),
                flush = &mut stopped => break flush.unwrap_or_default(),
            }
        };
        // The shards have stopped: their last notices are in the channel.
        while let Ok(report) = reports.try_recv() {
            self.report(report);
        }
        self.state.flush(Instant::now(), unix_ms());
        let until = tokio::time::Instant::now() + flush;
        loop {
            self.start(&done_tx, &redis_tx);
            if self.state.idle() {
                break;
            }
            let deadline = self.state.next_deadline();
            tokio::select! {
                Some((to, id, ok)) = done.recv() => self.posted(to, id, ok),
                Some(answered) = redis.recv() => self.redis_answered(answered),
                () = tokio::time::sleep_until(deadline.map_or(until, Into::into).min(until)) => {
                    if tokio::time::Instant::now() >= until {
                        break;
                    }
                    self.state.tick(Instant::now(), unix_ms());
                }
            }
        }
        if !self.state.idle() {
            tracing::warn!(
                "webhooks: {} bytes of events undelivered at shutdown ({} commands for Redis unsent)",
                self.state.queued_bytes(),
                self.state.redis_counts().0,
            );
        }
    }

    fn redis_answered(&mut self, (id, answers, runner): RedisDone) {
        self.runner = Some(runner);
        self.state
            .redis_answered(id, answers, Instant::now(), unix_ms());
    }

    fn report(&mut self, report: Report) {
        match report {
            Report::Transition(notice) => self.state.notice(notice, Instant::now(), unix_ms()),
            Report::ClientEvent(event) => self.state.client_event(event, Instant::now(), unix_ms()),
            Report::CacheMiss(topic) => self.state.cache_miss(topic, Instant::now(), unix_ms()),
        }
    }

    fn posted(&mut self, to: usize, id: u64, ok: bool) {
        let counter = if ok {
            &self.sink.stats.posts_total
        } else {
            &self.sink.stats.post_failures_total
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.state.posted(to, id, ok, Instant::now());
    }

    /// Runs the POSTs and Redis batches the state asks for, and shows its
    /// counters.
    fn start(
        &mut self,
        done: &mpsc::UnboundedSender<Posted>,
        redis: &mpsc::UnboundedSender<RedisDone>,
    ) {
        for op in self.state.take_ops() {
            let (to, id, body) = match op {
                Op::Post { to, id, body } => (to, id, body),
                Op::Redis { id, commands } => {
                    let mut runner = self.runner.take().expect("one Redis batch at a time");
                    let redis = redis.clone();
                    tokio::spawn(async move {
                        let answers = runner.run(&commands).await;
                        let _ = redis.send((id, answers, runner));
                    });
                    continue;
                }
            };
            let request = self.request(to, body);
            let client = self.client.clone();
            let done = done.clone();
            let timeout = self.config.timeout;
            tokio::spawn(async move {
                let ok = match tokio::time::timeout(timeout, send(client, request)).await {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        tracing::debug!("webhooks: POST failed: {e}");
                        false
                    }
                    Err(_) => {
                        tracing::debug!("webhooks: POST timed out after {timeout:?}");
                        false
                    }
                };
                let _ = done.send((to, id, ok));
            });
        }
        let stats = &self.sink.stats;
        let (events, dropped) = self.state.events_counts();
        stats.events_total.store(events, Ordering::Relaxed);
        stats.dropped_total.store(dropped, Ordering::Relaxed);
        stats
            .queued_bytes
            .store(self.state.queued_bytes() as u64, Ordering::Relaxed);
        let (waiting, failures) = self.state.redis_counts();
        stats.redis_waiting.store(waiting as u64, Ordering::Relaxed);
        stats
            .redis_failures_total
            .store(failures, Ordering::Relaxed);
    }

    /// The POST of `body` to destination `to`, signed as it expects.
    fn request(&self, to: usize, body: Bytes) -> hyper::Request<Full<Bytes>> {
        let (target, uri) = &self.targets[to];
        let request = hyper::Request::post(uri.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, "ringcast");
        let request = match &target.signer {
            Signer::Ringcast { secret } => {
                request.header(signature::HEADER, signature::sign(secret, &body))
            }
            Signer::Pusher { key, secret } => request.header("X-Pusher-Key", key.as_str()).header(
                "X-Pusher-Signature",
                crate::pusher::sign::hmac_hex(secret, &body),
            ),
        };
        request
            .body(Full::new(body))
            .expect("a request of a valid URI and header values")
    }
}

/// Sends `request`; a 2xx answer (read whole, up to a bound) is success.
async fn send(client: BackendClient, request: hyper::Request<Full<Bytes>>) -> Result<(), String> {
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    // Read the answer so the connection can carry the next POST.
    let _ = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the backend answered {status}"))
    }
}
