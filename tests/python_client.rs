//! A third-party client: Python `websockets` drives the relay protocol and echo.
mod common;

use common::TestServer;

#[test]
fn the_python_websockets_client_speaks_the_relay_protocol() {
    let server = TestServer::start(2, Some("[limits]\nmax_message_bytes = 131072\n"));
    common::run_python("relay_client.py", server.addr);
}
