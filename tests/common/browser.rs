//! Runs one of the real-browser scripts (`tests/browser/*.mjs`: Debian's
//! Chromium driven by playwright-core from Node). `scripts/test.sh`
//! installs Chromium and the npm dependencies; a test fails (it does not
//! skip) when they are missing.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
/// The scripts give up after 60 s by themselves; this is the backstop.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs `node tests/browser/{script} {args..}`; panics with its output
/// unless it exits 0 within the timeout. Returns its stdout.
pub fn run_script(script: &str, args: &[String]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run ./scripts/test.sh (it installs Debian's chromium)"
    );
    assert!(
        root.join("tests/browser/node_modules/playwright-core/package.json")
            .exists(),
        "tests/browser/node_modules is missing: run ./scripts/test.sh (npm ci --prefix tests/browser)"
    );
    let mut child = Command::new("node")
        .arg(root.join("tests/browser").join(script))
        .args(args)
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
        Some(status) if status.success() => stdout,
        Some(status) => {
            panic!("{script} failed ({status}):\nstdout:\n{stdout}\nstderr:\n{stderr}")
        }
        None => panic!(
            "{script} did not finish in {SCRIPT_TIMEOUT:?}:\nstdout:\n{stdout}\nstderr:\n{stderr}"
        ),
    }
}
