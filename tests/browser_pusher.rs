//! pusher-js's browser build in a real browser (Debian's Chromium through
//! playwright-core, `tests/browser/pusher_test.mjs`): a presence channel
//! with two tabs of one user and one of another, a client event, and an
//! event triggered by Pusher's server SDK. `scripts/test.sh` installs
//! Chromium and the npm packages.
mod common;

use common::TestServer;

#[test]
fn pusher_js_in_a_browser_joins_presence_and_relays_client_events() {
    let config = "[[apps]]\nid = \"4711\"\nkey = \"app-key\"\nsecret = \"app-secret\"\nclient_events = true\n";
    let server = TestServer::start(2, Some(config));
    let stdout = common::browser::run_script(
        "pusher_test.mjs",
        &[
            format!("http://{}", server.addr),
            "4711".into(),
            "app-key".into(),
            "app-secret".into(),
        ],
    );
    print!("{stdout}");
    assert!(stdout.contains("browser pusher test passed"));
}
