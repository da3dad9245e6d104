//! The HTTP client the webhook and proxy threads reach the application
//! backend with: hyper-util's pooled keep-alive HTTP/1.1 client over
//! `http://` or `https://` (rustls, trusting the system's CAs, or the PEM
//! file `SSL_CERT_FILE` names).

use std::io;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

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
