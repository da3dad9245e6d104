//! ringcast-load: open-loop fan-out latency load generator for ringcast and any
//! WebSocket pub/sub server with an HTTP (or WebSocket) publish.
//!
//! # Layout
//!
//! - `main.rs`     CLI, run orchestration (connect, freeze, epochs, drain), report
//! - `account.rs`  payload marker and per-(subscriber, publisher) sequence accounting
//! - `ws.rs`       sans-IO WebSocket client pieces: URLs, upgrade, frames
//! - `sub.rs`      subscriber tasks on a multi-threaded tokio runtime
//! - `publish.rs`  open-loop publisher threads (HTTP pipelined or WebSocket)
//! - `procstat.rs` /proc readers (CPU, RSS) and RLIMIT_NOFILE
//! - `clock.rs`    the process-wide monotonic nanosecond clock
//!
//! A run: subscribers connect (ramped, over several source addresses if asked)
//! and are counted ready once the server acknowledges the subscription; the
//! ready set is then frozen, which defines the expected deliveries of every
//! message. Publishers follow a fixed schedule; each payload carries its
//! scheduled time, so latency is schedule -> receipt. After the duration a
//! drain period lets stragglers arrive before missing deliveries are counted.

mod account;
mod clock;
mod procstat;
mod publish;
mod report;
mod sub;
mod ws;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use clock::{now_ns, sleep_until};
use publish::{Plan, PubCounters, Publisher, Via};
use report::{Conns, Env, Scenario, StepReport};
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::Duration;
use sub::{Shared, SubSpec};

/// How subscribers are spread over topics.
#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Dist {
    /// Subscriber i takes topic i mod T.
    Uniform,
    /// `--hot-fraction` of the subscribers on topic 0, the rest uniform over the others.
    Hot,
}

/// How publishers reach the server.
#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum PublishVia {
    /// HTTP POST, keep-alive and pipelined.
    Http,
    /// ringcast's `{"type":"message"}` over WebSocket connections subscribed to the topics.
    Ws,
}

/// HTTP publish body format.
#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum PubBody {
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
    ringcast-load --subscribers 2000 --topics 100 --rate 5000 --find-ceiling --server-pid $(pgrep -n ringcast)"
)]
struct Args {
    /// Server host:port used by the default URL templates.
    #[arg(long, default_value = "127.0.0.1:8000")]
    host: String,
    /// Subscribe URL template (`{topic}` is replaced). Default: ws://HOST/ws
    #[arg(long)]
    sub_url: Option<String>,
    /// Text frame sent after the upgrade to subscribe (`{topic}` replaced); "none" to send nothing.
    /// Default: ringcast's subscribe message, or none when the sub URL contains {topic}.
    #[arg(long)]
    sub_msg: Option<String>,
    /// Text in a server frame that marks the subscription ready; "none" = ready after the upgrade.
    /// Default: "subscribed" when a subscribe message is sent.
    #[arg(long)]
    sub_ack: Option<String>,
    /// Publish URL template (`{topic}` is replaced). Default: http://HOST/publish (or ws://HOST/ws with --publish-via ws)
    #[arg(long)]
    pub_url: Option<String>,
    /// HTTP publish body.
    #[arg(long, value_enum, default_value = "json")]
    pub_body: PubBody,
    /// Publish over HTTP or over WebSocket.
    #[arg(long, value_enum, default_value = "http")]
    publish_via: PublishVia,

    /// Subscriber connections.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Topics.
    #[arg(long, default_value_t = 1)]
    topics: usize,
    /// Topic name prefix (topic i is PREFIX + i).
    #[arg(long, default_value = "load-")]
    topic_prefix: String,
    /// Distribution of subscribers over topics.
    #[arg(long, value_enum, default_value = "uniform")]
    dist: Dist,
    /// Fraction of subscribers on the hot topic with --dist hot.
    #[arg(long, default_value_t = 0.5)]
    hot_fraction: f64,
    /// Publishers (each its own thread and connection); publishes go round-robin over topics.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Total publish rate, messages/s over all publishers (open loop). 0 = idle connections only.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Measured duration (e.g. 10s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Publishing before measurement starts (deliveries are checked, not measured).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Longest wait after the last publish for deliveries still in flight.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    drain: Duration,
    /// Payload size in bytes (marker plus padding).
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// Maximum unanswered HTTP publish requests per publisher connection.
    #[arg(long, default_value_t = 1024)]
    pipeline_depth: u64,

    /// Client worker threads for subscribers (default: available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Source addresses for subscriber sockets: A-B range or comma list (e.g. 127.0.0.1-127.0.0.16).
    #[arg(long)]
    source_ips: Option<String>,
    /// New subscriber connections per second (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    connect_rate: f64,
    /// Connections in the connect/upgrade phase at once.
    #[arg(long, default_value_t = 512)]
    connect_concurrency: usize,
    /// Longest wait for all subscribers to be ready.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    connect_timeout: Duration,

    /// Server process id(s), comma separated; their direct children are included (nginx workers).
    #[arg(long)]
    server_pid: Option<String>,
    /// Raise the rate step by step (x --ceiling-factor) until p99 exceeds --ceiling-p99-ms or
    /// deliveries go missing; report the highest rate held.
    #[arg(long)]
    find_ceiling: bool,
    /// Rate multiplier between ceiling steps.
    #[arg(long, default_value_t = 1.5)]
    ceiling_factor: f64,
    /// Highest rate tried by --find-ceiling.
    #[arg(long, default_value_t = 2_000_000.0)]
    ceiling_max_rate: f64,
    /// p99 latency limit (ms) for a ceiling step to count as held.
    #[arg(long, default_value_t = 50.0)]
    ceiling_p99_ms: f64,
    /// Free-form label copied into the report.
    #[arg(long, default_value = "")]
    label: String,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// No progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
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

fn parse_source_ips(s: &str) -> Result<Vec<Ipv4Addr>> {
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

fn resolve(url: &ws::Url) -> Result<SocketAddr> {
    url.authority
        .to_socket_addrs()
        .with_context(|| format!("resolve {}", url.authority))?
        .find(|a| a.is_ipv4())
        .with_context(|| format!("{}: no IPv4 address", url.authority))
}

/// Topic index of subscriber `i`.
fn topic_of(i: usize, n: usize, topics: usize, dist: Dist, hot_fraction: f64) -> usize {
    match dist {
        Dist::Uniform => i % topics,
        Dist::Hot => {
            let hot = ((n as f64) * hot_fraction.clamp(0.0, 1.0)).round() as usize;
            if i < hot || topics == 1 {
                0
            } else {
                1 + (i - hot) % (topics - 1)
            }
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.topics == 0 || args.publishers == 0 {
        bail!("--topics and --publishers must be at least 1");
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a non-negative number");
    }
    let _ = now_ns();
    let progress = |msg: String| {
        if !args.quiet {
            eprintln!("[ringcast-load] {msg}");
        }
    };

    let sub_url = args
        .sub_url
        .clone()
        .unwrap_or_else(|| format!("ws://{}/ws", args.host));
    let topic_in_url = sub_url.contains("{topic}");
    let sub_msg = match args.sub_msg.as_deref() {
        Some("none") | Some("") => None,
        Some(m) => Some(m.to_string()),
        None if topic_in_url => None,
        None => Some(r#"{"type":"subscribe","topic":"{topic}"}"#.to_string()),
    };
    let sub_ack = match args.sub_ack.as_deref() {
        Some("none") | Some("") => None,
        Some(a) => Some(a.to_string()),
        None if sub_msg.is_some() => Some(r#""subscribed""#.to_string()),
        None => None,
    };
    let pub_url = args
        .pub_url
        .clone()
        .unwrap_or_else(|| match args.publish_via {
            PublishVia::Http => format!("http://{}/publish", args.host),
            PublishVia::Ws => format!("ws://{}/ws", args.host),
        });
    let names: Vec<String> = (0..args.topics)
        .map(|t| format!("{}{t}", args.topic_prefix))
        .collect();
    let sub_addr = resolve(&ws::Url::parse(&ws::fill(&sub_url, &names[0]))?)?;
    let pub_addr = resolve(&ws::Url::parse(&ws::fill(&pub_url, &names[0]))?)?;
    let sources = match &args.source_ips {
        Some(s) => Some(parse_source_ips(s)?),
        None => None,
    };
    let want_fds = (args.subscribers + args.publishers * (1 + args.topics / 50) + 256) as u64;
    let nofile = procstat::raise_nofile(want_fds);
    if nofile < want_fds {
        bail!(
            "RLIMIT_NOFILE could not be raised to the {want_fds} descriptors this run needs (got {nofile}; \
             the hard limit needs CAP_SYS_RESOURCE to go higher): lower --subscribers, or raise `ulimit -Hn` \
             as root before starting ringcast-load"
        );
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads = args.threads.unwrap_or(cores).max(1);
    let server_pids: Vec<u32> = match &args.server_pid {
        Some(s) => s
            .split(',')
            .map(|p| {
                p.trim()
                    .parse::<u32>()
                    .with_context(|| format!("bad pid {p}"))
            })
            .collect::<Result<_>>()?,
        None => Vec::new(),
    };
    let server_procs = procstat::with_children(&server_pids);
    let rss_baseline = procstat::sample(&server_procs).map(|s| s.1);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    let shared = Arc::new(Shared::new(args.topics, args.publishers));

    // Connect subscribers.
    let connect_start = now_ns();
    let gate = Arc::new(tokio::sync::Semaphore::new(args.connect_concurrency.max(1)));
    let ack: Option<Arc<[u8]>> = sub_ack.as_ref().map(|a| Arc::from(a.as_bytes()));
    let mut specs = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        let topic = topic_of(
            i,
            args.subscribers,
            args.topics,
            args.dist,
            args.hot_fraction,
        );
        let name = &names[topic];
        let url = ws::Url::parse(&ws::fill(&sub_url, name))?;
        specs.push(SubSpec {
            addr: sub_addr,
            request: ws::upgrade_request(&url, i as u64 + 1),
            subscribe: sub_msg.as_ref().map(|m| ws::fill(m, name).into_bytes()),
            ack: ack.clone(),
            topic: topic as u32,
            source: sources.as_ref().map(|s| s[i % s.len()]),
        });
    }
    {
        let shared = shared.clone();
        let connect_rate = args.connect_rate;
        let timeout = args.connect_timeout;
        rt.spawn(async move {
            let start = now_ns();
            for (i, spec) in specs.into_iter().enumerate() {
                if connect_rate > 0.0 {
                    let due = start + (i as f64 * 1e9 / connect_rate) as u64;
                    let now = now_ns();
                    if due > now + 1_000_000 {
                        tokio::time::sleep(Duration::from_nanos(due - now)).await;
                    }
                }
                tokio::spawn(sub::run(shared.clone(), spec, gate.clone(), timeout));
            }
        });
    }
    let spawn_budget = if args.connect_rate > 0.0 {
        args.subscribers as f64 / args.connect_rate
    } else {
        0.0
    };
    let deadline =
        connect_start + ((spawn_budget + args.connect_timeout.as_secs_f64()) * 1e9) as u64;
    let mut last_print = now_ns();
    while shared.settled.load(SeqCst) < args.subscribers as u64 && now_ns() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        if now_ns() - last_print > 1_000_000_000 {
            last_print = now_ns();
            progress(format!(
                "connecting: {} ready, {} failed of {}",
                shared.ready.load(Relaxed),
                shared.settled.load(Relaxed) - shared.ready.load(Relaxed),
                args.subscribers
            ));
        }
    }
    shared.frozen.store(true, SeqCst);
    std::thread::sleep(Duration::from_millis(20));
    let connect_s = (now_ns() - connect_start) as f64 / 1e9;
    let ready = shared.ready.load(SeqCst);
    let topic_subs: Arc<Vec<u64>> = Arc::new(
        shared
            .topic_ready
            .iter()
            .map(|t| t.load(SeqCst) as u64)
            .collect(),
    );
    let not_ready =
        args.subscribers as u64 - shared.settled.load(SeqCst).min(args.subscribers as u64);
    shared.conn.not_ready.store(not_ready, Relaxed);
    progress(format!(
        "{ready} of {} subscribers ready in {connect_s:.2}s",
        args.subscribers
    ));
    // Let the server settle its per-connection allocations before reading RSS.
    std::thread::sleep(Duration::from_millis(200));
    let rss_connected = procstat::sample(&server_procs).map(|s| s.1);

    // Publishers.
    let counters = Arc::new(PubCounters::default());
    let via = match args.publish_via {
        PublishVia::Http => Via::Http {
            url: pub_url.clone(),
            json: args.pub_body == PubBody::Json,
        },
        PublishVia::Ws => Via::Ws {
            url: pub_url.clone(),
        },
    };
    let publishing = args.rate > 0.0 || args.find_ceiling;
    let mut pubs = Vec::new();
    if publishing {
        for p in 0..args.publishers {
            pubs.push(Publisher::connect(
                p as u32,
                args.publishers as u32,
                pub_addr,
                via.clone(),
                names.clone(),
                args.payload_bytes,
                args.pipeline_depth,
                counters.clone(),
                topic_subs.clone(),
            )?);
        }
    }

    let scenario = Scenario {
        label: args.label.clone(),
        sub_url: sub_url.clone(),
        pub_url: pub_url.clone(),
        publish_via: format!("{:?}", args.publish_via).to_lowercase(),
        subscribers: args.subscribers,
        topics: args.topics,
        dist: format!("{:?}", args.dist).to_lowercase(),
        publishers: args.publishers,
        payload_bytes: args.payload_bytes,
        duration_s: args.duration.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
    };
    let env = Env {
        cores,
        machine_cpus: procstat::online_cpus().max(cores),
        threads,
        nofile,
        server_pids: server_procs.clone(),
        rss_baseline,
        rss_connected,
    };

    let mut steps: Vec<StepReport> = Vec::new();
    let mut rate = args.rate.max(if args.find_ceiling { 1.0 } else { 0.0 });
    let mut epoch = 0u32;
    loop {
        epoch += 1;
        shared.epoch.store(epoch, SeqCst);
        let _ = shared.take_stats();
        counters.reset();
        let t0 = now_ns() + 100_000_000;
        let measure_start = t0 + args.warmup.as_nanos() as u64;
        let end = measure_start + args.duration.as_nanos() as u64;
        shared.measure_start_ns.store(measure_start, SeqCst);
        let plan = Plan {
            epoch,
            t0,
            measure_start,
            end,
            rate,
        };
        if publishing {
            progress(format!(
                "step {epoch}: {rate:.0} msgs/s for {:.1}s after {:.1}s warmup",
                args.duration.as_secs_f64(),
                args.warmup.as_secs_f64()
            ));
        }
        let mut samples = report::Samples::default();
        let lag = std::thread::scope(|s| {
            let handles: Vec<_> = pubs.iter_mut().map(|p| s.spawn(|| p.run(&plan))).collect();
            sleep_until(measure_start);
            samples.start(&server_procs);
            sleep_until(end);
            let mut lag = sub::new_histogram();
            for h in handles {
                if let Ok(l) = h.join() {
                    let _ = lag.add(&l);
                }
            }
            lag
        });
        let publish_done = now_ns();
        // Drain: stop early once every expected delivery arrived.
        let drain_deadline = publish_done.max(end) + args.drain.as_nanos() as u64;
        while now_ns() < drain_deadline {
            if publishing
                && counters.unanswered() == 0
                && shared.unique_so_far() >= counters.expected.load(SeqCst)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        samples.stop(&server_procs);
        let (counts, hist) = shared.take_stats();
        let step = StepReport::build(
            rate,
            &args_window(&args),
            &counters,
            &shared,
            counts,
            &hist,
            &lag,
            &samples,
            &env,
            (publish_done.saturating_sub(end)) as f64 / 1e9,
        );
        let held = step.held(args.ceiling_p99_ms);
        steps.push(step);
        if !args.find_ceiling || !held || rate * args.ceiling_factor > args.ceiling_max_rate {
            break;
        }
        rate *= args.ceiling_factor;
    }

    let conns = Conns::read(&shared, args.subscribers, ready, connect_s);
    let out = report::Run {
        scenario,
        env,
        conns,
        steps,
        find_ceiling: args.find_ceiling,
        ceiling_p99_ms: args.ceiling_p99_ms,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out.to_json())?);
    } else {
        print!("{}", out.to_table());
    }
    rt.shutdown_background();
    Ok(())
}

fn args_window(args: &Args) -> report::Window {
    report::Window {
        duration_s: args.duration.as_secs_f64(),
    }
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
    fn hot_distribution_puts_the_fraction_on_topic_zero() {
        let n = 1000;
        let on0 = (0..n)
            .filter(|&i| topic_of(i, n, 10, Dist::Hot, 0.5) == 0)
            .count();
        assert_eq!(on0, 500);
        assert!((0..n).all(|i| topic_of(i, n, 10, Dist::Uniform, 0.5) == i % 10));
    }
}
