//! A real browser: Debian's Chromium, driven by playwright-core from Node,
//! loads the built-in chat page (`GET /`) in two contexts and chats across them.
//! `scripts/test.sh` installs Chromium and the npm dependencies; this test fails
//! (it does not skip) when they are missing.
mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TestServer;

const CHROMIUM: &str = "/usr/bin/chromium";
/// The script gives up after 60 s by itself; this is the backstop.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(90);

#[test]
fn two_browsers_chat_through_the_built_in_page() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/browser/chat_test.mjs");
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run ./scripts/test.sh (it installs Debian's chromium)"
    );
    assert!(
        root.join("tests/browser/node_modules/playwright-core/package.json")
            .exists(),
        "tests/browser/node_modules is missing: run ./scripts/test.sh (npm ci --prefix tests/browser)"
    );

    let server = TestServer::start(2, None);
    let mut child = Command::new("node")
        .arg(&script)
        .arg(format!("http://{}", server.addr))
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("node does not start ({e}): run ./scripts/test.sh"));

    // Drain both pipes on threads so a chatty script cannot block on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break Some(status);
        }
        if start.elapsed() > SCRIPT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out.join().unwrap();
    let stderr = err.join().unwrap();
    match status {
        Some(status) if status.success() => print!("{stdout}"),
        Some(status) => panic!(
            "browser chat test failed ({status}):\nstdout:\n{stdout}\nstderr:\n{stderr}"
        ),
        None => panic!(
            "browser chat test did not finish in {SCRIPT_TIMEOUT:?}:\nstdout:\n{stdout}\nstderr:\n{stderr}"
        ),
    }
}
