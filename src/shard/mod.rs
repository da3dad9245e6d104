//! A shard: one OS thread that owns a listener, its connections, a topic
//! index and its end of the bus.
//!
//! It is two halves, split the way `quinn` splits `quinn-proto` from `quinn`:
//!
//! - [`state`]: the sans-IO shard state (topics, interest and
//!   acknowledgements, users, presence, hooks, each connection's protocol).
//!   Events in, commands out; no socket, ring or clock. Simulated and fuzzed
//!   in memory ([`sim`]).
//! - `driver`: the only code that does I/O and the only code that names
//!   `io_uring`. It owns the ring, the listener, each connection's
//!   descriptor, outbound queue and close lifecycle, feeds the state events
//!   and carries out its commands.
//! - `conn_io`: a connection's I/O lifecycle (outbound queue, write delay,
//!   drain watch, open / over budget / closing / shut down) as plain data
//!   with its transitions, which the driver and the simulation's driver
//!   both call.
//!
//! Both key connections by the same generational [`key::ConnKey`].

mod conn_io;
mod driver;
pub mod key;
#[doc(hidden)]
pub mod sim;
pub mod state;

use std::io;
use std::net::TcpListener;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use crate::auth::Auth;
use crate::bus::{Bus, ShardId};
use crate::cluster::ClusterStatus;
use crate::config::Config;
use crate::hooks::Channels;
use crate::metrics::ShardStats;
use crate::proxy::ProxySink;
use crate::webhooks::WebhookSink;

pub use driver::outbound;
pub use state::names;

/// What every shard shares: configuration, bus, statistics, hooks and auth.
#[derive(Clone)]
pub struct Shared {
    pub(crate) config: Arc<Config>,
    pub(crate) bus: Arc<Bus>,
    pub(crate) stats: Arc<[ShardStats]>,
    pub(crate) channels: Arc<Channels>,
    pub(crate) auth: Arc<Auth>,
    /// Registrations held, counted once across shards for `max_registrations`.
    pub(crate) registrations: Arc<AtomicUsize>,
    /// Their bytes, counted once across shards for `max_registration_bytes`.
    pub(crate) registration_bytes: Arc<AtomicUsize>,
    /// `[cluster]`: whether Redis is reachable, and the cluster's counters.
    pub(crate) cluster: Option<Arc<ClusterStatus>>,
    /// `[webhooks]`: where the shards' transitions go.
    pub(crate) webhooks: Option<Arc<WebhookSink>>,
    /// `[proxy]`: where subscribe calls go.
    pub(crate) proxy: Option<Arc<ProxySink>>,
    /// Random for this run of the node, in every Pusher socket id: a
    /// channel authorization signed for one connection's socket id cannot
    /// be replayed by a connection in the same slot of another node, or of
    /// this node's next run.
    pub(crate) socket_salt: u32,
    /// Each Pusher app's open connections on this node.
    pub(crate) app_connections: Arc<crate::pusher::AppConnections>,
}

impl Shared {
    /// The shared parts for `config.shards` shards with these channels.
    pub fn new(config: Config, channels: Channels) -> io::Result<Shared> {
        let shards = config.shards.get();
        let capacity = config.limits.bus_queue_capacity;
        let bus = Arc::new(match config.cluster {
            Some(_) => Bus::with_broker(shards, capacity)?,
            None => Bus::new(shards, capacity)?,
        });
        let cluster = config.cluster.as_ref().map(|c| {
            let node = c.node_name.clone().unwrap_or_default();
            Arc::new(ClusterStatus::new(node, c.max_queued_bytes))
        });
        let stats: Arc<[ShardStats]> = (0..shards).map(|_| ShardStats::default()).collect();
        let auth = Arc::new(config.auth.build());
        let config_proxy = config.proxy.is_some();
        let webhooks = crate::webhooks::Plan::of(&config).map(|p| Arc::new(WebhookSink::new(p)));
        let mut salt = [0u8; 4];
        getrandom::fill(&mut salt).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Shared {
            socket_salt: u32::from_le_bytes(salt),
            app_connections: Arc::new(crate::pusher::AppConnections::new(config.apps.len())),
            config: Arc::new(config),
            bus,
            stats,
            channels: Arc::new(channels),
            auth,
            registrations: Arc::new(AtomicUsize::new(0)),
            registration_bytes: Arc::new(AtomicUsize::new(0)),
            cluster,
            webhooks,
            proxy: config_proxy.then(|| Arc::new(ProxySink::new())),
        })
    }

    /// The bus between the shards.
    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }

    /// Per-shard statistics.
    pub fn stats(&self) -> &Arc<[ShardStats]> {
        &self.stats
    }
}

/// Runs shard `id` on the calling thread until it has shut down.
pub(crate) fn run(id: ShardId, shared: Shared, listener: TcpListener) -> io::Result<()> {
    if shared.config.pin_cores {
        pin_to_core(id.0);
    }
    driver::Driver::new(id, shared, listener)?.run()
}

fn pin_to_core(shard: usize) {
    let cores = crate::config::available_cores().get();
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; the call only
    // reads the set. Failure (e.g. a restricted cpuset) leaves the thread unpinned.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(shard % cores, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
