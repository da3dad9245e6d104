//! A third-party client: Python `websockets` drives the relay protocol and echo.
mod common;

use std::process::Command;

use common::TestServer;

#[test]
fn the_python_websockets_client_speaks_the_relay_protocol() {
    let server = TestServer::start(2, Some("[limits]\nmax_message_bytes = 131072\n"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/relay_client.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(server.addr.to_string())
        .output()
        .expect("python3 runs (CI installs it with the websockets package)");
    assert!(
        output.status.success(),
        "python client failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("all checks passed"));
}
