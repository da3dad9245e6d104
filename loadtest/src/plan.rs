//! What a run will do, resolved once from the command line: URLs and
//! addresses, topic names, which subscriber goes to which topic and source
//! address, how many threads and processes. The parent and every subscriber
//! child build the same `Plan` from the same arguments, so subscriber `i`
//! is the same connection whichever process opens it.

use crate::churn;
use crate::cli::{parse_source_ips, Args, Dist, Protocol, PubBody, PublishVia, Transport};
use crate::publish::Via;
use crate::pusher;
use crate::report::Scenario;
use crate::sub::SubSpec;
use crate::ws;
use anyhow::{bail, Context, Result};
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::sync::Arc;

/// Descriptors a process needs beside its sockets: stdio, the ring and
/// runtime fds, /proc reads, perf's pipes. Generous, it only sets a floor.
const SPARE_FDS: usize = 256;

/// The resolved run.
pub(crate) struct Plan {
    /// The command line as given.
    pub(crate) args: Args,
    /// Subscribe URL template.
    pub(crate) sub_url: String,
    /// Subscribe frame template, if one is sent.
    pub(crate) sub_msg: Option<String>,
    /// Text marking the subscription acknowledged, if one is awaited.
    pub(crate) sub_ack: Option<Arc<[u8]>>,
    /// Text of a server message awaited after the upgrade before the
    /// subscribe frame is sent (Pusher's `pusher:connection_established`).
    pub(crate) greeting: Option<Arc<[u8]>>,
    /// The Pusher app, with `--protocol pusher`.
    pub(crate) pusher: Option<pusher::App>,
    /// Publish URL template.
    pub(crate) pub_url: String,
    /// Topic names, index = topic id.
    pub(crate) names: Vec<String>,
    /// Where subscribers connect.
    pub(crate) sub_addr: SocketAddr,
    /// Where publishers connect.
    pub(crate) pub_addr: SocketAddr,
    /// Source addresses for subscriber sockets, round robin.
    pub(crate) sources: Option<Vec<Ipv4Addr>>,
    /// Cpus this process may run on.
    pub(crate) cores: usize,
    /// Subscriber threads per process.
    pub(crate) threads: usize,
    /// When subscribers drop and how they come back.
    pub(crate) churn: churn::Plan,
}

impl Plan {
    /// Resolves `args`; fails on values no run can use.
    pub(crate) fn new(args: Args) -> Result<Plan> {
        if args.topics == 0 || args.publishers == 0 || args.procs == 0 {
            bail!("--topics, --publishers and --procs must be at least 1");
        }
        if !(args.rate >= 0.0 && args.rate.is_finite()) {
            bail!("--rate must be a non-negative number");
        }
        if args.reconnect_every.is_some_and(|d| d.is_zero()) {
            bail!("--reconnect-every must be more than 0");
        }
        if args.storm_at.is_some_and(|t| t >= args.duration) {
            bail!("--storm-at must fall inside the measured window (less than --duration)");
        }
        let churn = churn::Plan::new(args.reconnect_every, args.storm_at, args.recover, args.seed);
        if churn.drops() && args.find_ceiling {
            bail!("--reconnect-every and --storm-at measure one rate: not with --find-ceiling");
        }
        if args.recover && args.sub_msg.is_some() {
            // `since` is ringcast's subscribe field; a custom frame cannot carry it.
            bail!("--recover re-subscribes with ringcast's subscribe message: not with --sub-msg");
        }
        let pusher = match args.protocol {
            Protocol::Ringcast => None,
            Protocol::Pusher => {
                if args.transport != Transport::Ws {
                    bail!("--protocol pusher subscribes over WebSocket: not with --transport sse");
                }
                if args.publish_via != PublishVia::Http {
                    bail!("--protocol pusher publishes through the HTTP API: not with --publish-via ws");
                }
                if args.recover {
                    bail!("--recover re-subscribes from a ringcast stream position: not with --protocol pusher");
                }
                Some(pusher::App::parse(&args.pusher_app)?)
            }
        };
        let sub_url = args
            .sub_url
            .clone()
            .unwrap_or_else(|| match (&pusher, args.transport) {
                (Some(app), _) => app.sub_url(&args.host),
                (None, Transport::Ws) => format!("ws://{}/ws", args.host),
                (None, Transport::Sse) => format!("http://{}/sse?topic={{topic}}", args.host),
            });
        if args.transport == Transport::Sse && args.sub_msg.is_some() {
            bail!("--transport sse names its topic in the URL: not with --sub-msg");
        }
        let topic_in_url = sub_url.contains("{topic}");
        let sub_msg = match args.sub_msg.as_deref() {
            Some("none") | Some("") => None,
            Some(m) => Some(m.to_string()),
            None if pusher.is_some() => Some(pusher::SUBSCRIBE.to_string()),
            None if topic_in_url => None,
            None => Some(r#"{"type":"subscribe","topic":"{topic}"}"#.to_string()),
        };
        let sub_ack = match args.sub_ack.as_deref() {
            Some("none") | Some("") => None,
            Some(a) => Some(a.to_string()),
            None if pusher.is_some() && sub_msg.is_some() => Some(pusher::SUBSCRIBED.to_string()),
            None if sub_msg.is_some() || args.transport == Transport::Sse => {
                Some(r#""subscribed""#.to_string())
            }
            None => None,
        };
        let pub_url = args
            .pub_url
            .clone()
            .unwrap_or_else(|| match (&pusher, args.publish_via) {
                (Some(app), _) => app.events_url(&args.host),
                (None, PublishVia::Http) => format!("http://{}/publish", args.host),
                (None, PublishVia::Ws) => format!("ws://{}/ws", args.host),
            });
        let names: Vec<String> = (0..args.topics)
            .map(|t| format!("{}{t}", args.topic_prefix))
            .collect();
        if pusher.is_some() {
            if let Some(bad) = names.iter().find(|n| !pusher::public_channel(n)) {
                bail!(
                    "--protocol pusher: `{bad}` is not a public Pusher channel name \
                     (A-Z a-z 0-9 _ - = @ , . ; and no private-/presence- prefix): change --topic-prefix"
                );
            }
        }
        // Pusher: the subscribe waits for the connection to be established
        // (only when a subscribe frame is sent at all).
        let greeting = match &pusher {
            Some(_) if sub_msg.is_some() => {
                Some(Arc::from(pusher::CONNECTION_ESTABLISHED.as_bytes()))
            }
            _ => None,
        };
        let sub_addr = resolve(&ws::Url::parse(&ws::fill(&sub_url, &names[0]))?)?;
        let pub_addr = resolve(&ws::Url::parse(&ws::fill(&pub_url, &names[0]))?)?;
        let sources = match &args.source_ips {
            Some(s) => Some(parse_source_ips(s)?),
            None => None,
        };
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let threads = args.threads.unwrap_or(cores).max(1);
        Ok(Plan {
            sub_url,
            sub_msg,
            sub_ack: sub_ack.map(|a| Arc::from(a.as_bytes())),
            greeting,
            pusher,
            pub_url,
            names,
            sub_addr,
            pub_addr,
            sources,
            cores,
            threads,
            churn,
            args,
        })
    }

    /// Whether any rate step publishes.
    pub(crate) fn publishing(&self) -> bool {
        self.args.rate > 0.0 || self.args.find_ceiling
    }

    /// Subscribers held by this process (the parent holds none with --procs > 1).
    pub(crate) fn local_subscribers(&self) -> Range<usize> {
        match (self.args.child, self.args.procs) {
            (Some(i), n) => share(self.args.subscribers, n, i),
            (None, 1) => 0..self.args.subscribers,
            (None, _) => 0..0,
        }
    }

    /// Raises RLIMIT_NOFILE to what this process's sockets need; fails with
    /// advice when the hard limit is too low.
    pub(crate) fn raise_nofile(&self) -> Result<u64> {
        let publisher_fds = if self.args.child.is_some() {
            0
        } else {
            self.args.publishers * (1 + self.args.topics / 50)
        };
        let want = (self.local_subscribers().len() + publisher_fds + SPARE_FDS) as u64;
        let nofile = crate::procstat::raise_nofile(want);
        if nofile < want {
            bail!(
                "RLIMIT_NOFILE could not be raised to the {want} descriptors this process needs (got {nofile}; \
                 the hard limit needs CAP_SYS_RESOURCE to go higher): use more --procs, lower --subscribers, \
                 or raise `ulimit -Hn` as root before starting ringcast-load"
            );
        }
        Ok(nofile)
    }

    /// What subscriber `i` connects to and sends.
    pub(crate) fn spec(&self, i: usize) -> Result<SubSpec> {
        let a = &self.args;
        let topic = topic_of(i, a.subscribers, a.topics, a.dist, a.hot_fraction);
        let name = &self.names[topic];
        let url = ws::Url::parse(&ws::fill(&self.sub_url, name))?;
        Ok(SubSpec {
            addr: self.sub_addr,
            request: match a.transport {
                Transport::Ws => ws::upgrade_request_with(&url, i as u64 + 1, a.compression),
                Transport::Sse => ws::stream_request(&url, None),
            },
            transport: a.transport,
            url,
            subscribe: self
                .sub_msg
                .as_ref()
                .map(|m| ws::fill(m, name).into_bytes()),
            ack: self.sub_ack.clone(),
            greeting: self.greeting.clone(),
            topic: topic as u32,
            topic_name: name.clone(),
            index: i as u64,
            source: self.sources.as_ref().map(|s| s[i % s.len()]),
        })
    }

    /// How publishers reach the server.
    pub(crate) fn via(&self) -> Via {
        if let Some(app) = &self.pusher {
            return Via::Pusher {
                url: self.pub_url.clone(),
                app: app.clone(),
            };
        }
        match self.args.publish_via {
            PublishVia::Http => Via::Http {
                url: self.pub_url.clone(),
                json: self.args.pub_body == PubBody::Json,
            },
            PublishVia::Ws => Via::Ws {
                url: self.pub_url.clone(),
            },
        }
    }

    /// The scenario as the report describes it.
    pub(crate) fn scenario(&self) -> Scenario {
        let a = &self.args;
        Scenario {
            label: a.label.clone(),
            sub_url: self.sub_url.clone(),
            pub_url: self.pub_url.clone(),
            protocol: format!("{:?}", a.protocol).to_lowercase(),
            publish_via: match a.protocol {
                Protocol::Pusher => "pusher-http-api".to_string(),
                Protocol::Ringcast => format!("{:?}", a.publish_via).to_lowercase(),
            },
            subscribers: a.subscribers,
            topics: a.topics,
            dist: format!("{:?}", a.dist).to_lowercase(),
            publishers: a.publishers,
            payload_bytes: a.payload_bytes,
            duration_s: a.duration.as_secs_f64(),
            warmup_s: a.warmup.as_secs_f64(),
        }
    }
}

fn resolve(url: &ws::Url) -> Result<SocketAddr> {
    url.authority
        .to_socket_addrs()
        .with_context(|| format!("resolve {}", url.authority))?
        .find(|a| a.is_ipv4())
        .with_context(|| format!("{}: no IPv4 address", url.authority))
}

/// Subscribers of child `i` of `procs`: contiguous, sizes differing by at most one.
pub(crate) fn share(n: usize, procs: usize, i: usize) -> Range<usize> {
    (n * i / procs)..(n * (i + 1) / procs)
}

/// Topic index of subscriber `i`.
pub(crate) fn topic_of(i: usize, n: usize, topics: usize, dist: Dist, hot_fraction: f64) -> usize {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_distribution_puts_the_fraction_on_topic_zero() {
        let n = 1000;
        let on0 = (0..n)
            .filter(|&i| topic_of(i, n, 10, Dist::Hot, 0.5) == 0)
            .count();
        assert_eq!(on0, 500);
        assert!((0..n).all(|i| topic_of(i, n, 10, Dist::Uniform, 0.5) == i % 10));
    }

    #[test]
    fn shares_cover_every_subscriber_once() {
        let parts: Vec<_> = (0..3).map(|i| share(10, 3, i)).collect();
        assert_eq!(parts, vec![0..3, 3..6, 6..10]);
        assert_eq!(share(2, 4, 0), 0..0);
        assert_eq!((0..4).map(|i| share(2, 4, i).len()).sum::<usize>(), 2);
    }
}
