//! The webhook thread: a current-thread tokio runtime that feeds the
//! shards' notices, POST outcomes and timers to [`WebhookState`] and runs
//! the POSTs it asks for with a pooled keep-alive HTTP/1.1 client, each
//! signed and bounded by `[webhooks] timeout_ms`.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Uri;
use tokio::sync::{mpsc, oneshot};

use crate::backend::{BackendClient, Worker};
use crate::config::WebhookConfig;

use super::signature;
use super::state::{Op, WebhookState};
use super::{Report, WebhookSink};

/// The most of a backend's answer that is read (and thrown away, so the
/// connection can be used again).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Starts the webhook thread for `sink`'s reports. Stopped with a flush
/// time, it sends what is owed (every vacate due at once) for up to that.
pub fn spawn(sink: Arc<WebhookSink>, config: Arc<WebhookConfig>) -> io::Result<Worker> {
    let reports = sink.reports.take("webhook")?;
    let uri: Uri = config
        .url
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("webhooks.url: {e}")))?;
    let client = crate::backend::client()?;
    Worker::spawn("ringcast-webhooks", move |stopped| {
        let driver = Driver {
            state: WebhookState::new(config.clone()),
            config,
            uri,
            sink,
            client,
        };
        driver.run(reports, stopped)
    })
}

struct Driver {
    state: WebhookState,
    config: Arc<WebhookConfig>,
    uri: Uri,
    sink: Arc<WebhookSink>,
    client: BackendClient,
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
        let (done_tx, mut done) = mpsc::unbounded_channel::<(u64, bool)>();
        let flush = loop {
            self.start_posts(&done_tx);
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
                Some((id, ok)) = done.recv() => self.posted(id, ok),
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
            self.start_posts(&done_tx);
            if self.state.idle() {
                break;
            }
            let deadline = self.state.next_deadline();
            tokio::select! {
                Some((id, ok)) = done.recv() => self.posted(id, ok),
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
                "webhooks: {} bytes of events undelivered at shutdown",
                self.state.queued_bytes()
            );
        }
    }

    fn report(&mut self, report: Report) {
        match report {
            Report::Transition(notice) => self.state.notice(notice, Instant::now(), unix_ms()),
            Report::ClientEvent(event) => self.state.client_event(event, Instant::now(), unix_ms()),
        }
    }

    fn posted(&mut self, id: u64, ok: bool) {
        let counter = if ok {
            &self.sink.stats.posts_total
        } else {
            &self.sink.stats.post_failures_total
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.state.posted(id, ok, Instant::now());
    }

    /// Runs the POSTs the state asks for, and shows its counters.
    fn start_posts(&mut self, done: &mpsc::UnboundedSender<(u64, bool)>) {
        for op in self.state.take_ops() {
            let Op::Post { id, body } = op;
            let request = self.request(body);
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
                let _ = done.send((id, ok));
            });
        }
        let stats = &self.sink.stats;
        stats
            .events_total
            .store(self.state.events_total, Ordering::Relaxed);
        stats
            .dropped_total
            .store(self.state.dropped_total, Ordering::Relaxed);
        stats
            .queued_bytes
            .store(self.state.queued_bytes() as u64, Ordering::Relaxed);
    }

    fn request(&self, body: Bytes) -> hyper::Request<Full<Bytes>> {
        let signature = signature::sign(&self.config.secret, &body);
        hyper::Request::post(self.uri.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, "ringcast")
            .header(signature::HEADER, signature)
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
