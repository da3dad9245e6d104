//! The `ringcast` binary: CLI -> Config -> start shards -> wait for a signal.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use ringcast::{server, Config, Relay};

/// A thread-per-core io_uring WebSocket pub/sub relay.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Address to listen on (every shard binds it with SO_REUSEPORT). Default 127.0.0.1:8000.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Number of shards (threads); 0 = one per core.
    #[arg(long)]
    shards: Option<usize>,
    /// TOML configuration file; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "ringcast=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut config = match &cli.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    if let Some(shards) = cli.shards {
        config.set_shards(shards)?;
    }
    match server::raise_fd_limit() {
        Ok(limit) => tracing::debug!("open-file limit raised to {limit}"),
        Err(e) => tracing::warn!("could not raise the open-file limit: {e}"),
    }
    // Block the signals before the shard threads exist so they inherit the mask
    // and only the signal thread below receives them.
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("installing signal handlers")?;
    let shards = config.shards;
    let server = Relay::start(config).context("starting the relay")?;
    println!("listening on {}", server.local_addr());
    std::io::stdout().flush()?;
    tracing::info!(shards = shards.get(), addr = %server.local_addr(), "ringcast started");
    if let Some(signal) = signals.forever().next() {
        tracing::info!(signal, "shutting down");
    }
    server.shutdown();
    server.join().context("a shard failed")?;
    tracing::info!("stopped");
    Ok(())
}
