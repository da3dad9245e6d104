//! The log on stderr is coloured only for a person at a terminal: written to
//! a file or a pipe it carries no ANSI escape codes, and NO_COLOR
//! (https://no-color.org) set to anything but the empty string turns colour
//! off on a terminal too.
mod common;

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use common::IO_TIMEOUT;

/// The byte every ANSI colour sequence starts with.
const ESC: u8 = 0x1b;

/// Where the server's stderr goes.
enum Stderr {
    Pipe,
    Terminal,
}

/// A pseudo-terminal: (the side a terminal emulator reads, the side a
/// program writes to).
fn pty() -> (File, File) {
    // SAFETY: posix_openpt returns a new descriptor, owned by the File at once.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
    assert!(
        master >= 0,
        "posix_openpt: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `master` is open and nothing else owns it.
    let master = unsafe { File::from_raw_fd(master) };
    let fd = master.as_raw_fd();
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `fd` is a pty master; ptsname_r writes at most `name.len()` bytes.
    unsafe {
        assert_eq!(libc::grantpt(fd), 0, "grantpt");
        assert_eq!(libc::unlockpt(fd), 0, "unlockpt");
        assert_eq!(libc::ptsname_r(fd, name.as_mut_ptr(), name.len()), 0);
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated path.
    let path = unsafe { CStr::from_ptr(name.as_ptr()) }.to_str().unwrap();
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .unwrap();
    (master, slave)
}

/// Starts ringcast with stderr on `stderr` and NO_COLOR set to `no_color`
/// (unset if None), and returns its log up to and including the line that
/// says it started.
fn startup_log(stderr: Stderr, no_color: Option<&str>) -> Vec<u8> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringcast"));
    cmd.args(["--listen", "127.0.0.1:0", "--shards", "1"])
        .env("RUST_LOG", "ringcast=info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        // Held open until the server is killed: it prints its address there.
        .stdout(Stdio::piped());
    if let Some(value) = no_color {
        cmd.env("NO_COLOR", value);
    }
    let (mut child, log): (_, Box<dyn Read + Send>) = match stderr {
        Stderr::Pipe => {
            let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
            let log = child.stderr.take().unwrap();
            (child, Box::new(log))
        }
        Stderr::Terminal => {
            let (master, slave) = pty();
            let child = cmd.stderr(slave).spawn().unwrap();
            // Drops the command's copy of the terminal's program side.
            drop(cmd);
            (child, Box::new(master))
        }
    };
    // Lines come from a thread, so a server that never logs fails the test
    // at the deadline instead of hanging it.
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        let mut log = BufReader::new(log);
        loop {
            let mut line = Vec::new();
            match log.read_until(b'\n', &mut line) {
                Ok(n) if n > 0 && lines.send(line).is_ok() => {}
                _ => return,
            }
        }
    });
    let start = Instant::now();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("ringcast started") {
        let left = IO_TIMEOUT.saturating_sub(start.elapsed());
        let line = received.recv_timeout(left).unwrap_or_else(|_| {
            panic!(
                "no \"ringcast started\" line; the log was {:?}",
                String::from_utf8_lossy(&seen)
            )
        });
        seen.extend_from_slice(&line);
    }
    let _ = child.kill();
    let _ = child.wait();
    seen
}

fn has_colour(log: &[u8]) -> bool {
    log.contains(&ESC)
}

#[test]
fn logs_written_to_a_pipe_carry_no_colour_codes() {
    let log = startup_log(Stderr::Pipe, None);
    assert!(
        !has_colour(&log),
        "ANSI codes in a piped log: {:?}",
        String::from_utf8_lossy(&log)
    );
}

#[test]
fn logs_written_to_a_terminal_are_coloured() {
    let log = startup_log(Stderr::Terminal, None);
    assert!(
        has_colour(&log),
        "no colour on a terminal: {:?}",
        String::from_utf8_lossy(&log)
    );
}

#[test]
fn no_color_turns_colour_off_on_a_terminal() {
    let log = startup_log(Stderr::Terminal, Some("1"));
    assert!(
        !has_colour(&log),
        "ANSI codes despite NO_COLOR=1: {:?}",
        String::from_utf8_lossy(&log)
    );
}

#[test]
fn an_empty_no_color_leaves_colour_on() {
    let log = startup_log(Stderr::Terminal, Some(""));
    assert!(
        has_colour(&log),
        "no colour with NO_COLOR empty: {:?}",
        String::from_utf8_lossy(&log)
    );
}
