//! A real browser: Debian's Chromium, driven by playwright-core from Node,
//! loads the built-in chat page (`GET /`) in two contexts and chats across them.
//! `scripts/test.sh` installs Chromium and the npm dependencies; this test fails
//! (it does not skip) when they are missing.
mod common;

use common::TestServer;

#[test]
fn two_browsers_chat_through_the_built_in_page() {
    let server = TestServer::start(2, None);
    let stdout = common::browser::run_script("chat_test.mjs", &[format!("http://{}", server.addr)]);
    print!("{stdout}");
}
