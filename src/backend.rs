//! What the webhook and proxy threads share to reach the application
//! backend: the HTTP client (hyper-util's pooled keep-alive HTTP/1.1 client
//! over `http://` or `https://`: rustls, trusting the system's CAs, or the
//! PEM file `SSL_CERT_FILE` names), the hand-off of work from the shards,
//! and the worker thread itself.

use std::future::Future;
use std::io;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{mpsc, oneshot};

/// A client for JSON POSTs to the backend.
pub type BackendClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How long an idle pooled connection to the backend is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// A client for `http://` and `https://` URLs; fails if the system's CAs
/// cannot be read.
pub fn client() -> io::Result<BackendClient> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .build(connector))
}

/// Work the shards hand a worker thread without waiting: they keep the
/// sending side, the thread takes the receiving side once. The channel is
/// unbounded; each user bounds what the shards put in it.
#[derive(Debug)]
pub struct Handoff<T> {
    sender: mpsc::UnboundedSender<T>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<T>>>,
}

impl<T> Default for Handoff<T> {
    fn default() -> Handoff<T> {
        let (sender, receiver) = mpsc::unbounded_channel();
        Handoff {
            sender,
            receiver: Mutex::new(Some(receiver)),
        }
    }
}

impl<T> Handoff<T> {
    /// Hands `value` over; lost only once the thread has stopped (the node
    /// is shutting down).
    pub fn send(&self, value: T) {
        let _ = self.sender.send(value);
    }

    /// The receiving side, for the thread `name` that starts once.
    pub fn take(&self, name: &str) -> io::Result<mpsc::UnboundedReceiver<T>> {
        self.receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| io::Error::other(format!("the {name} thread was started twice")))
    }
}

/// A thread off the serving path running one future on a current-thread
/// tokio runtime, until told to stop (with how long it may take to finish
/// what it owes).
pub struct Worker {
    stop: oneshot::Sender<Duration>,
    thread: std::thread::JoinHandle<()>,
}

impl Worker {
    /// Starts thread `name` running what `run` makes of the stop signal.
    pub fn spawn<F, Fut>(name: &str, run: F) -> io::Result<Worker>
    where
        F: FnOnce(oneshot::Receiver<Duration>) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let (stop, stopped) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || runtime.block_on(run(stopped)))?;
        Ok(Worker { stop, thread })
    }

    /// Tells the thread to stop within `flush` and waits for it.
    pub fn stop(self, flush: Duration) {
        let _ = self.stop.send(flush);
        let _ = self.thread.join();
    }
}
