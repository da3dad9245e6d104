//! A real browser's `EventSource` (Debian's Chromium through playwright-core)
//! on `/sse`: it receives named events from several topics on one
//! connection, loses the connection (cut between it and the server, as a
//! restarted node or a proxy would), reconnects by itself with
//! `Last-Event-ID`, and gets every publication it missed exactly once and in
//! order, then live ones: resume with no SDK.
mod common;

use common::cut_proxy::CutProxy;
use common::TestServer;

const CONFIG: &str = r#"
stream_retry_ms = 300

[[rules]]
pattern = "s:*"
history_size = 100
history_ttl_s = 60

[[rules]]
pattern = "*"
"#;

#[test]
fn a_browser_event_source_resumes_after_its_connection_is_cut() {
    let server = TestServer::start(2, Some(CONFIG));
    let proxy = CutProxy::start(server.addr);
    let stdout = common::browser::run_script(
        "sse_test.mjs",
        &[
            format!("http://{}", proxy.addr),
            format!("http://{}", server.addr),
            proxy.control.port().to_string(),
        ],
    );
    print!("{stdout}");
    assert!(stdout.contains("event source test passed"));
}
