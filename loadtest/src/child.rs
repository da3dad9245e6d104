//! Subscriber child processes (`--procs N`). The parent re-executes its own
//! binary with its own arguments plus `--child I`; child `I` holds a
//! contiguous share of the subscribers (under its own open-file limit) and
//! answers one-line commands on stdin with one JSON line on stdout:
//!
//! | command | answer |
//! |---|---|
//! | `status` | `{"ready":R,"settled":S}` |
//! | `freeze` | `{"ready":R,"topic_ready":[..]}` |
//! | `epoch E M END` | `{}` (epoch E, measured from M ns on CLOCK_MONOTONIC; drops until END) |
//! | `unique` | `{"unique":U,"resuming":R}` (R: reconnects not answered yet) |
//! | `stats` | `{"counts":{..},"hist":HEX}`, the histogram V2-serialized |
//! | `conns` | connection counters |
//! | `recv` | receive-path diagnostics |
//! | `streams` | the run's stream figures, histograms V2-serialized |
//!
//! End of stdin ends the child. Latencies need no clock exchange: markers
//! carry CLOCK_MONOTONIC times, which every process reads alike.

use crate::account::DeliveryCounts;
use crate::churn::Reconnects;
use crate::fleet::Local;
use crate::offsets::{StreamCounts, TopicTails};
use crate::plan::Plan;
use crate::sub::{ConnStats, StreamStats};
use anyhow::{bail, Context, Result};
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// Serves the parent's commands until stdin closes.
pub(crate) fn serve(plan: &Plan) -> Result<()> {
    plan.raise_nofile()?;
    let local = Local::start(plan)?;
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let reply = answer(&local, line.trim())?;
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    local.shutdown();
    Ok(())
}

fn answer(local: &Local, cmd: &str) -> Result<Value> {
    let mut words = cmd.split_whitespace();
    Ok(match words.next().unwrap_or("") {
        "status" => {
            let (ready, settled) = local.progress();
            json!({"ready": ready, "settled": settled})
        }
        "freeze" => {
            let f = local.freeze();
            json!({"ready": f.ready, "topic_ready": f.topic_ready})
        }
        "epoch" => {
            let epoch: u32 = words.next().context("epoch number")?.parse()?;
            let start: u64 = words.next().context("measure start")?.parse()?;
            let end: u64 = words.next().context("window end")?.parse()?;
            local.begin_epoch(epoch, start, end);
            json!({})
        }
        "unique" => {
            let (unique, resuming) = local.drain_state();
            json!({"unique": unique, "resuming": resuming})
        }
        "stats" => {
            let (counts, hist) = local.take_stats();
            stats_to_json(&counts, &hist)?
        }
        "conns" => conns_to_json(&local.conn_stats()),
        "streams" => streams_to_json(&local.stream_stats())?,
        "recv" => {
            let r = local.recv_info();
            json!({"rearms": r.rearms, "not_deferred": r.not_deferred, "batch_us": r.batch_us})
        }
        other => bail!("unknown command {other:?}"),
    })
}

/// The parent's handle on one child.
pub(crate) struct ChildProc {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl ChildProc {
    /// Starts child `index`: this binary, these arguments, plus `--child index`.
    pub(crate) fn spawn(index: usize) -> Result<ChildProc> {
        let exe = std::env::current_exe().context("own executable")?;
        let mut child = Command::new(exe)
            .args(std::env::args_os().skip(1))
            .args(["--child", &index.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start subscriber child process")?;
        let stdin = child.stdin.take().context("child stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("child stdout")?);
        Ok(ChildProc {
            child,
            stdin,
            stdout,
        })
    }

    /// The child's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `cmd` to every child, then reads every answer, so children work
    /// on it in parallel.
    pub(crate) fn ask_all(kids: &mut [ChildProc], cmd: &str) -> Result<Vec<Value>> {
        for k in kids.iter_mut() {
            writeln!(k.stdin, "{cmd}").context("subscriber child exited")?;
            k.stdin.flush()?;
        }
        kids.iter_mut()
            .map(|k| {
                let mut line = String::new();
                if k.stdout.read_line(&mut line)? == 0 {
                    bail!("subscriber child {} exited (see its stderr)", k.pid());
                }
                serde_json::from_str(&line).context("subscriber child answer")
            })
            .collect()
    }

    /// Closes every child's stdin and waits for it to exit.
    pub(crate) fn end_all(kids: Vec<ChildProc>) {
        for k in kids {
            let ChildProc {
                mut child, stdin, ..
            } = k;
            drop(stdin);
            let _ = child.wait();
        }
    }
}

fn hist_to_hex(h: &Histogram<u64>) -> Result<String> {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut bytes)
        .map_err(|e| anyhow::anyhow!("histogram serialization: {e:?}"))?;
    Ok(hex(&bytes))
}

fn hist_from_hex(v: &Value) -> Result<Histogram<u64>> {
    let bytes = unhex(v.as_str().context("histogram missing")?)?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("histogram deserialization: {e:?}"))
}

fn stats_to_json(c: &DeliveryCounts, h: &Histogram<u64>) -> Result<Value> {
    Ok(json!({
        "counts": [c.unique, c.measured, c.duplicates, c.out_of_order,
                   c.out_of_order_beyond_window, c.misrouted, c.stale, c.malformed,
                   c.in_window],
        "hist": hist_to_hex(h)?,
    }))
}

fn streams_to_json(s: &StreamStats) -> Result<Value> {
    let r = &s.recovery;
    Ok(json!({
        "counts": s.counts.fields(),
        "ledgers": s.tails.ledgers,
        "high_sum": s.tails.high_sum,
        "high_max": s.tails.high_max,
        "subscribed": hist_to_hex(&r.subscribed)?,
        "caught_up": hist_to_hex(&r.caught_up)?,
        "storm": [r.storm_subscribed, r.storm_caught_up,
                  r.storm_subscribed_last_ns, r.storm_caught_up_last_ns],
        "reconnects": s.reconnects.fields(),
    }))
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_u64().unwrap_or(0)).collect())
        .unwrap_or_default()
}

/// Reads a child's `streams` answer.
pub(crate) fn streams_from_json(v: &Value) -> Result<StreamStats> {
    let storm = u64s(&v["storm"]);
    let storm = |i: usize| storm.get(i).copied().unwrap_or(0);
    let mut s = StreamStats::new(0);
    s.counts = StreamCounts::from_fields(&u64s(&v["counts"])).context("stream counts")?;
    s.tails = TopicTails {
        ledgers: u64s(&v["ledgers"]),
        high_sum: v["high_sum"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_i64().unwrap_or(0)).collect())
            .unwrap_or_default(),
        high_max: u64s(&v["high_max"]),
    };
    s.recovery.subscribed = hist_from_hex(&v["subscribed"])?;
    s.recovery.caught_up = hist_from_hex(&v["caught_up"])?;
    s.recovery.storm_subscribed = storm(0);
    s.recovery.storm_caught_up = storm(1);
    s.recovery.storm_subscribed_last_ns = storm(2);
    s.recovery.storm_caught_up_last_ns = storm(3);
    s.reconnects = Reconnects::from_fields(&u64s(&v["reconnects"])).context("reconnect counts")?;
    Ok(s)
}

/// Reads a child's `stats` answer.
pub(crate) fn stats_from_json(v: &Value) -> Result<(DeliveryCounts, Histogram<u64>)> {
    let n: Vec<u64> = v["counts"]
        .as_array()
        .context("stats without counts")?
        .iter()
        .map(|x| x.as_u64().unwrap_or(0))
        .collect();
    if n.len() != 9 {
        bail!("stats with {} counts", n.len());
    }
    let counts = DeliveryCounts {
        unique: n[0],
        measured: n[1],
        duplicates: n[2],
        out_of_order: n[3],
        out_of_order_beyond_window: n[4],
        misrouted: n[5],
        stale: n[6],
        malformed: n[7],
        in_window: n[8],
    };
    Ok((counts, hist_from_hex(&v["hist"])?))
}

fn conns_to_json(c: &ConnStats) -> Value {
    json!({
        "connect_failed": c.connect_failed, "upgrade_refused": c.upgrade_refused,
        "not_ready": c.not_ready, "closed_by_server": c.closed_by_server,
        "dropped": c.dropped, "protocol_errors": c.protocol_errors,
        "last_close_code": c.last_close_code, "first_error": c.first_error,
    })
}

/// Reads a child's `conns` answer.
pub(crate) fn conns_from_json(v: &Value) -> ConnStats {
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    ConnStats {
        connect_failed: n("connect_failed"),
        upgrade_refused: n("upgrade_refused"),
        not_ready: n("not_ready"),
        closed_by_server: n("closed_by_server"),
        dropped: n("dropped"),
        protocol_errors: n("protocol_errors"),
        last_close_code: n("last_close_code") as u32,
        first_error: v["first_error"].as_str().map(str::to_string),
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    if s.len() % 2 != 0 {
        bail!("odd hex length");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("bad hex"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_survive_the_trip_between_processes() {
        let mut h = crate::sub::new_histogram();
        for v in [1_000u64, 250_000, 3_000_000, 42_000_000_000] {
            h.record(v).unwrap();
        }
        let c = DeliveryCounts {
            unique: 4,
            measured: 3,
            duplicates: 1,
            out_of_order: 2,
            in_window: 5,
            ..DeliveryCounts::default()
        };
        let v = stats_to_json(&c, &h).unwrap();
        let line = v.to_string();
        let (c2, h2) = stats_from_json(&serde_json::from_str(&line).unwrap()).unwrap();
        assert_eq!(c2, c);
        assert_eq!(h2, h);
        let mut merged = crate::sub::new_histogram();
        merged.add(&h2).unwrap();
        merged.add(&h).unwrap();
        assert_eq!(merged.len(), 8);
    }

    #[test]
    fn stream_figures_survive_the_trip_between_processes() {
        let mut s = StreamStats::new(3);
        s.counts.tracked = 5;
        s.counts.recovered = 7;
        s.counts.gap_offsets = 2;
        s.tails.ledgers[1] = 5;
        s.tails.moved(1, 0, 40);
        s.tails.moved(2, 9, 3);
        s.recovery.subscribed.record(2_000_000).unwrap();
        s.recovery.storm_caught_up = 4;
        s.recovery.storm_caught_up_last_ns = 123;
        s.reconnects.drops = 6;
        s.reconnects.storm_drops = 4;
        let line = streams_to_json(&s).unwrap().to_string();
        let back = streams_from_json(&serde_json::from_str(&line).unwrap()).unwrap();
        assert_eq!(back.counts, s.counts);
        assert_eq!(back.tails, s.tails);
        assert_eq!(back.reconnects, s.reconnects);
        assert_eq!(back.recovery.subscribed, s.recovery.subscribed);
        assert_eq!(back.recovery.storm_caught_up_last_ns, 123);
        let mut sum = StreamStats::new(3);
        sum.add(&back);
        sum.add(&s);
        assert_eq!(sum.tails.high_sum, vec![0, 80, -12]);
        assert_eq!(sum.reconnects.drops, 12);
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(hex(&[0, 0xab, 0x7f]), "00ab7f");
        assert_eq!(unhex("00ab7f").unwrap(), vec![0, 0xab, 0x7f]);
        assert!(unhex("abc").is_err());
    }
}
