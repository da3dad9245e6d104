//! The command line: every flag, its default and how durations and address
//! ranges are written. Parsing only; what a run does with the values is
//! `plan.rs`.

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use std::net::Ipv4Addr;
use std::time::Duration;

/// How subscribers are spread over topics.
#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub(crate) enum Dist {
    /// Subscriber i takes topic i mod T.
    Uniform,
    /// `--hot-fraction` of the subscribers on topic 0, the rest uniform over the others.
    Hot,
}

/// How subscriber sockets are read once their subscription is sent.
#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub(crate) enum RecvPath {
    /// io_uring: one ring per receive thread, a multishot receive per socket
    /// over a provided-buffer ring, every frame of a completion parsed at once.
    Uring,
    /// tokio (epoll): one task per socket, one `read` per readiness event.
    Tokio,
}

/// What subscribers speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Transport {
    /// WebSocket (`/ws` and a subscribe message, or any --sub-url).
    Ws,
    /// Server-Sent Events (`GET /sse?topic=T`): events parsed as a browser
    /// would; --recover reconnects with `Last-Event-ID`.
    Sse,
}

/// How publishers reach the server.
#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub(crate) enum PublishVia {
    /// HTTP POST, keep-alive and pipelined.
    Http,
    /// ringcast's `{"type":"message"}` over WebSocket connections subscribed to the topics.
    Ws,
}

/// The wire protocol subscribers and publishers speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Protocol {
    /// ringcast's own JSON protocol (`/ws`, `{"type":"subscribe"}`, `POST /publish`).
    Ringcast,
    /// Pusher Channels v7: `/app/{key}`, `pusher:subscribe` on public channels,
    /// publishes through the signed HTTP API (`POST /apps/{id}/events`).
    Pusher,
}

/// HTTP publish body format.
#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub(crate) enum PubBody {
    /// ringcast's `{"topic":T,"message":"<payload>"}`.
    Json,
    /// The payload itself (nchan and most HTTP-publish servers).
    Raw,
}

#[derive(Parser, Debug)]
#[command(
    name = "ringcast-load",
    version,
    about = "Open-loop fan-out latency load generator (no coordinated omission)",
    after_help = "Examples:\n  ringcast-load --subscribers 10000 --topics 100 --rate 20000 --duration 30s\n  \
    ringcast-load --sub-url 'ws://127.0.0.1:8091/sub/{topic}' --pub-url 'http://127.0.0.1:8091/pub/{topic}' --pub-body raw\n  \
    ringcast-load --subscribers 2000 --topics 100 --rate 5000 --find-ceiling --server-pid $(pgrep -n ringcast)\n  \
    ringcast-load --subscribers 1000 --topics 10 --rate 1000 --reconnect-every 2s --recover   (topics with history)\n  \
    ringcast-load --subscribers 1000 --topics 10 --rate 1000 --storm-at 3s --recover"
)]
pub(crate) struct Args {
    /// Server host:port used by the default URL templates.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub(crate) host: String,
    /// What subscribers speak.
    #[arg(long, value_enum, default_value = "ws")]
    pub(crate) transport: Transport,
    /// Protocol of subscribers and publishers: ringcast's own, or Pusher Channels
    /// (subscribers on `/app/{key}`, publishes through the signed HTTP events API).
    #[arg(long, value_enum, default_value = "ringcast")]
    pub(crate) protocol: Protocol,
    /// The Pusher app as `ID:KEY:SECRET` (with --protocol pusher).
    #[arg(long, default_value = "4711:app-key:app-secret")]
    pub(crate) pusher_app: String,
    /// WebSocket subscribers offer permessage-deflate and inflate compressed pushes.
    #[arg(long)]
    pub(crate) compression: bool,
    /// Subscribe URL template (`{topic}` is replaced). Default: ws://HOST/ws
    /// (with --transport sse: http://HOST/sse?topic={topic})
    #[arg(long)]
    pub(crate) sub_url: Option<String>,
    /// Text frame sent after the upgrade to subscribe (`{topic}` replaced); "none" to send nothing.
    /// Default: ringcast's subscribe message, or none when the sub URL contains {topic}.
    #[arg(long)]
    pub(crate) sub_msg: Option<String>,
    /// Text in a server frame that marks the subscription ready; "none" = ready after the upgrade.
    /// Default: "subscribed" when a subscribe message is sent.
    #[arg(long)]
    pub(crate) sub_ack: Option<String>,
    /// Publish URL template (`{topic}` is replaced). Default: http://HOST/publish (or ws://HOST/ws with --publish-via ws)
    #[arg(long)]
    pub(crate) pub_url: Option<String>,
    /// HTTP publish body.
    #[arg(long, value_enum, default_value = "json")]
    pub(crate) pub_body: PubBody,
    /// Publish over HTTP or over WebSocket.
    #[arg(long, value_enum, default_value = "http")]
    pub(crate) publish_via: PublishVia,

    /// Subscriber connections.
    #[arg(long, default_value_t = 100)]
    pub(crate) subscribers: usize,
    /// Topics.
    #[arg(long, default_value_t = 1)]
    pub(crate) topics: usize,
    /// Topic name prefix (topic i is PREFIX + i).
    #[arg(long, default_value = "load-")]
    pub(crate) topic_prefix: String,
    /// Distribution of subscribers over topics.
    #[arg(long, value_enum, default_value = "uniform")]
    pub(crate) dist: Dist,
    /// Fraction of subscribers on the hot topic with --dist hot.
    #[arg(long, default_value_t = 0.5)]
    pub(crate) hot_fraction: f64,
    /// Publishers (each its own thread and connection); publishes go round-robin over topics.
    #[arg(long, default_value_t = 1)]
    pub(crate) publishers: usize,
    /// Total publish rate, messages/s over all publishers (open loop). 0 = idle connections only.
    #[arg(long, default_value_t = 1000.0)]
    pub(crate) rate: f64,
    /// Measured duration (e.g. 10s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) duration: Duration,
    /// Publishing before measurement starts (deliveries are checked, not measured).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub(crate) warmup: Duration,
    /// Longest wait after the last publish for deliveries still in flight.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub(crate) drain: Duration,
    /// Payload size in bytes (marker plus padding).
    #[arg(long, default_value_t = 64)]
    pub(crate) payload_bytes: usize,
    /// Maximum unanswered HTTP publish requests per publisher connection.
    /// Real publishers rarely pipeline deeply (16, as a pooled client's
    /// burst; 1,024 before 2026-12-06, which the README's older figures used).
    #[arg(long, default_value_t = 16)]
    pub(crate) pipeline_depth: u64,

    /// Each subscriber drops its connection abruptly (RST, no close frame) at random
    /// times with this mean during the measured window (exponential gaps, seeded by
    /// --seed) and reconnects at once. E.g. 2s.
    #[arg(long, value_parser = parse_duration)]
    pub(crate) reconnect_every: Option<Duration>,
    /// Reconnect storm: drop every subscriber abruptly at once this long into the
    /// measured window; all reconnect at once while publishing goes on.
    #[arg(long, value_parser = parse_duration)]
    pub(crate) storm_at: Option<Duration>,
    /// Re-subscribe after a drop from the last position (ringcast streams:
    /// `since` = offset of the last push and the epoch of the last `subscribed`).
    /// Without it a reconnect subscribes afresh and loses what was published meanwhile.
    #[arg(long)]
    pub(crate) recover: bool,
    /// Seed of the subscribers' drop schedules (the same seed repeats a run's drops).
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,

    /// Subscriber threads per process (default: available cores): receive rings
    /// with --recv-path uring (plus as many handshake workers), tokio workers otherwise.
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Source addresses for subscriber sockets: A-B range or comma list (e.g. 127.0.0.1-127.0.0.16).
    #[arg(long)]
    pub(crate) source_ips: Option<String>,
    /// New subscriber connections per second (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) connect_rate: f64,
    /// Connections in the connect/upgrade phase at once.
    #[arg(long, default_value_t = 512)]
    pub(crate) connect_concurrency: usize,
    /// Longest wait for all subscribers to be ready.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub(crate) connect_timeout: Duration,

    /// How subscriber sockets are read: io_uring multishot receive (cheaper per
    /// delivery) or tokio/epoll (the original path, kept for comparison).
    #[arg(long, value_enum, default_value = "uring")]
    pub(crate) recv_path: RecvPath,
    /// Receive batch window, microseconds (uring path, Linux 6.12+): under
    /// load a receive thread wakes at most once per window and handles every
    /// socket that got data in it; a delivery after a quiet window is handled
    /// at once. Adds at most this much to measured latency. 0 = wake per completion.
    #[arg(long, default_value_t = 0)]
    pub(crate) recv_batch_us: u32,
    /// Subscriber processes: the tool re-executes itself this many times, each
    /// child holding a share of the subscribers (each under its own open-file
    /// limit); the parent publishes, measures and merges. 1 = all in this process.
    #[arg(long, default_value_t = 1)]
    pub(crate) procs: usize,
    /// Cpus the server runs on, for "server core busy" (e.g. 0 or 0-1). Default:
    /// the server's affinity, when it excludes this client's cpus.
    #[arg(long)]
    pub(crate) server_cpus: Option<String>,
    /// Do not run `perf stat` on the server (syscalls and context switches per delivery).
    #[arg(long)]
    pub(crate) no_perf: bool,
    /// Internal: run as subscriber child INDEX of --procs, driven over stdin/stdout.
    #[arg(long, hide = true)]
    pub(crate) child: Option<usize>,
    /// Server process id(s), comma separated; their direct children are included (nginx workers).
    #[arg(long)]
    pub(crate) server_pid: Option<String>,
    /// Raise the rate step by step (x --ceiling-factor) until p99 exceeds --ceiling-p99-ms or
    /// deliveries go missing; report the highest rate held.
    #[arg(long)]
    pub(crate) find_ceiling: bool,
    /// Rate multiplier between ceiling steps.
    #[arg(long, default_value_t = 1.5)]
    pub(crate) ceiling_factor: f64,
    /// Highest rate tried by --find-ceiling.
    #[arg(long, default_value_t = 2_000_000.0)]
    pub(crate) ceiling_max_rate: f64,
    /// p99 latency limit (ms) for a ceiling step to count as held.
    #[arg(long, default_value_t = 50.0)]
    pub(crate) ceiling_p99_ms: f64,
    /// Free-form label copied into the report.
    #[arg(long, default_value = "")]
    pub(crate) label: String,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub(crate) quiet: bool,
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mul) = if let Some(v) = s.strip_suffix("ms") {
        (v, 1e-3)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?}"))?;
    if !(v >= 0.0 && v.is_finite()) {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(v * mul))
}

pub(crate) fn parse_source_ips(s: &str) -> Result<Vec<Ipv4Addr>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a
                .trim()
                .parse()
                .with_context(|| format!("bad address {a}"))?;
            let b: Ipv4Addr = b
                .trim()
                .parse()
                .with_context(|| format!("bad address {b}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a > 65_536 {
                bail!("bad source range {part}");
            }
            out.extend((a..=b).map(Ipv4Addr::from));
        } else {
            out.push(
                part.parse()
                    .with_context(|| format!("bad address {part}"))?,
            );
        }
    }
    if out.is_empty() {
        bail!("--source-ips lists no address");
    }
    Ok(out)
}

/// Parses a cpu list such as `0`, `0-3` or `0,2-3`.
pub(crate) fn parse_cpu_list(s: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let a: usize = a.trim().parse().with_context(|| format!("bad cpu {a}"))?;
        let b: usize = b.trim().parse().with_context(|| format!("bad cpu {b}"))?;
        if b < a {
            bail!("bad cpu range {part}");
        }
        out.extend(a..=b);
    }
    if out.is_empty() {
        bail!("empty cpu list");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_source_ranges_parse() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("x").is_err());
        let ips = parse_source_ips("127.0.0.1-127.0.0.4").unwrap();
        assert_eq!(ips.len(), 4);
        assert_eq!(ips[3], Ipv4Addr::new(127, 0, 0, 4));
        assert_eq!(parse_source_ips("10.0.0.1, 10.0.0.9").unwrap().len(), 2);
    }

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0").unwrap(), vec![0]);
        assert_eq!(parse_cpu_list("0,2-3").unwrap(), vec![0, 2, 3]);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("").is_err());
    }
}
