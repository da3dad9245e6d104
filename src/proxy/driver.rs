//! The proxy thread: runs each call the shards hand it as a POST (a
//! current-thread tokio runtime, hyper-util's pooled keep-alive HTTP/1.1
//! client), bounded by `[proxy] timeout_ms`, and puts the verdict on the
//! asking shard's own bus queue (the one outside control uses), waking it.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Uri;
use tokio::sync::{mpsc, oneshot};

use crate::backend::{BackendClient, Worker};
use crate::bus::{Bus, Envelope};
use crate::config::ProxyConfig;

use super::{Call, CallKind, ProxySink, Verdict};

/// The most of a backend's answer that is read: an answer is a small JSON
/// object, and a longer one is no verdict.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Starts the proxy thread for `sink`'s calls. Stopped, it drops the calls
/// still running (their shards have stopped) whatever the flush time.
pub fn spawn(sink: Arc<ProxySink>, config: &ProxyConfig, bus: Arc<Bus>) -> io::Result<Worker> {
    let calls = sink.calls.take("proxy")?;
    let parse = |key: &str, url: &Option<String>| -> io::Result<Option<Uri>> {
        url.as_deref()
            .map(|u| {
                u.parse::<Uri>().map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("proxy.{key}: {e}"))
                })
            })
            .transpose()
    };
    let uris = Uris {
        connect: parse("connect_url", &config.connect_url)?,
        refresh: parse("refresh_url", &config.refresh_url)?,
        subscribe: parse("subscribe_url", &config.subscribe_url)?,
        publish: parse("publish_url", &config.publish_url)?,
    };
    let timeout = config.timeout;
    let client = crate::backend::client()?;
    Worker::spawn("ringcast-proxy", move |stopped| {
        run(calls, stopped, client, uris, timeout, sink, bus)
    })
}

/// Where each kind of call goes.
struct Uris {
    connect: Option<Uri>,
    refresh: Option<Uri>,
    subscribe: Option<Uri>,
    publish: Option<Uri>,
}

async fn run(
    mut calls: mpsc::UnboundedReceiver<Call>,
    mut stopped: oneshot::Receiver<Duration>,
    client: BackendClient,
    uris: Uris,
    timeout: Duration,
    sink: Arc<ProxySink>,
    bus: Arc<Bus>,
) {
    loop {
        let call = tokio::select! {
            call = calls.recv() => match call {
                Some(call) => call,
                None => return,
            },
            _ = &mut stopped => return,
        };
        let uri = match call.kind {
            CallKind::Connect => &uris.connect,
            CallKind::Refresh => &uris.refresh,
            CallKind::Subscribe => &uris.subscribe,
            CallKind::Publish => &uris.publish,
        };
        let request = uri.clone().map(|uri| {
            hyper::Request::post(uri)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .header(hyper::header::USER_AGENT, "ringcast")
                .body(Full::new(call.body))
                .expect("a request of a valid URI and header values")
        });
        let (client, sink, bus) = (client.clone(), sink.clone(), bus.clone());
        tokio::spawn(async move {
            let verdict = match request {
                // A channel hook asked for a proxy the config has no URL for.
                None => Verdict::Failed(format!("no [proxy] URL for {:?} calls", call.kind)),
                Some(request) => match tokio::time::timeout(timeout, ask(client, request)).await {
                    Ok(verdict) => verdict,
                    Err(_) => {
                        Verdict::Failed(format!("no answer within {} ms", timeout.as_millis()))
                    }
                },
            };
            let counter = match &verdict {
                Verdict::Allowed { .. } => &sink.stats.allowed_total,
                Verdict::Refused { .. } => &sink.stats.refused_total,
                Verdict::Failed(_) => &sink.stats.failed_total,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            sink.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            let mut envelope = Envelope::ProxyVerdict {
                ticket: call.ticket,
                verdict,
            };
            // The shard drains its queues every loop turn; a full queue
            // empties within one.
            while let Err(back) = bus.push(call.shard, call.shard, envelope) {
                envelope = back;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            bus.waker(call.shard).signal();
        });
    }
}

/// POSTs `request` and reads the verdict from the answer.
async fn ask(client: BackendClient, request: hyper::Request<Full<Bytes>>) -> Verdict {
    let response = match client.request(request).await {
        Ok(response) => response,
        Err(e) => return Verdict::Failed(format!("the backend is unreachable: {e}")),
    };
    let status = response.status().as_u16();
    match Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
    {
        Ok(body) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            Verdict::of_answer(status, &body.to_bytes(), now)
        }
        Err(e) => Verdict::Failed(format!("the backend's answer could not be read: {e}")),
    }
}
