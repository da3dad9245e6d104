//! Counts the server's syscalls and context switches over exactly the
//! measured window with `perf stat`: started with its counters disabled
//! before the window (attaching takes tens of milliseconds), enabled and
//! disabled through its control FIFO at the window's edges, then read.
//! Owns the perf child process and its FIFOs; knows nothing of the run.

use anyhow::{bail, Context, Result};
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// The events counted: every syscall entry, and every context switch of the
/// server's threads (voluntary and involuntary).
const EVENTS: &str = "raw_syscalls:sys_enter,context-switches";
/// Longest wait for perf to acknowledge a control command. Attaching to a
/// server with thousands of sockets takes well under a second here.
const ACK_TIMEOUT_MS: i32 = 5_000;

/// Counts over one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PerfCounts {
    /// `raw_syscalls:sys_enter` events.
    pub(crate) syscalls: u64,
    /// `context-switches` events.
    pub(crate) context_switches: u64,
}

/// Checks that `perf stat` can count the events here; the error says why not.
pub(crate) fn check() -> Result<(), String> {
    let out = Command::new("perf")
        .args(["stat", "-x,", "-e", EVENTS, "true"])
        .stdout(Stdio::null())
        .output()
        .map_err(|e| format!("perf not runnable ({e})"))?;
    let text = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || parse(&text).is_none() {
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        return Err(format!(
            "`perf stat -e {EVENTS}` does not work here: {first}"
        ));
    }
    Ok(())
}

/// A `perf stat` attached to some processes, counters off until `enable`.
pub(crate) struct PerfStat {
    child: Child,
    ctl: File,
    ack: File,
    out: PathBuf,
    dir: PathBuf,
}

impl PerfStat {
    /// Attaches to `pids` (all their threads) with counting disabled.
    pub(crate) fn attach(pids: &[String]) -> Result<PerfStat> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ringcast-load-perf-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let (ctl_path, ack_path, out) = (dir.join("ctl"), dir.join("ack"), dir.join("out"));
        mkfifo(&ctl_path)?;
        mkfifo(&ack_path)?;
        // Read-write opens of a FIFO do not wait for the other end (Linux).
        let ctl = OpenOptions::new().read(true).write(true).open(&ctl_path)?;
        let ack = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&ack_path)?;
        let control = format!("fifo:{},{}", ctl_path.display(), ack_path.display());
        let child = Command::new("perf")
            .args([
                "stat",
                "-x,",
                "-D",
                "-1",
                "--control",
                &control,
                "-e",
                EVENTS,
            ])
            .args(["-p", &pids.join(","), "-o"])
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start perf stat")?;
        Ok(PerfStat {
            child,
            ctl,
            ack,
            out,
            dir,
        })
    }

    fn command(&mut self, cmd: &str) -> Result<()> {
        self.ctl.write_all(format!("{cmd}\n").as_bytes())?;
        let mut pfd = libc::pollfd {
            fd: self.ack.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd, as the count says.
        let n = unsafe { libc::poll(&mut pfd, 1, ACK_TIMEOUT_MS) };
        if n <= 0 {
            bail!("perf did not acknowledge {cmd:?}");
        }
        let mut buf = [0u8; 64];
        let _ = self.ack.read(&mut buf);
        Ok(())
    }

    /// Starts counting.
    pub(crate) fn enable(&mut self) -> Result<()> {
        self.command("enable")
    }

    /// Stops counting, ends perf and reads its counts.
    pub(crate) fn finish(mut self) -> Result<PerfCounts> {
        let disabled = self.command("disable");
        // SAFETY: signals our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.child.wait();
        disabled?;
        let text = std::fs::read_to_string(&self.out).context("perf output")?;
        parse(&text).with_context(|| format!("perf output without counts: {text}"))
    }
}

impl Drop for PerfStat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn mkfifo(path: &Path) -> Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error()).context("mkfifo");
    }
    Ok(())
}

/// Reads `perf stat -x,` output: `count,unit,event,...` per line.
fn parse(text: &str) -> Option<PerfCounts> {
    let mut syscalls = None;
    let mut switches = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 3 {
            continue;
        }
        let count = f[0].trim().parse::<u64>().ok();
        match f[2].trim() {
            "raw_syscalls:sys_enter" => syscalls = count,
            "context-switches" | "cs" => switches = count,
            _ => {}
        }
    }
    Some(PerfCounts {
        syscalls: syscalls?,
        context_switches: switches?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_output_parses_and_uncounted_is_none() {
        let ok = "# started on x\n\n11440944,,raw_syscalls:sys_enter,1878309346,100.00,,\n\
                  125,,context-switches,1878309346,100.00,,\nEvents disabled\n";
        assert_eq!(
            parse(ok),
            Some(PerfCounts {
                syscalls: 11_440_944,
                context_switches: 125
            })
        );
        let not =
            "<not counted>,,raw_syscalls:sys_enter,0,0.00,,\n3,,context-switches,1,100.00,,\n";
        assert_eq!(parse(not), None);
    }
}
