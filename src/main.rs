//! The `ringcast` binary: CLI -> Config -> start shards -> wait for a signal.

use std::io::{IsTerminal as _, Write as _};
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
        .with_ansi(colour_logs())
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
    // A panic in release builds aborts the process (`panic = "abort"`): say
    // which thread and why before the abort, in the log's own format.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        tracing::error!("thread {name} panicked: {info}; ringcast is stopping");
        default_hook(info);
    }));
    // Block the signals before the shard threads exist so they inherit the mask
    // and only the signal thread below receives them.
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("installing signal handlers")?;
    let shards = config.shards;
    let relay = Relay::start(config).context("starting the relay")?;
    println!("listening on {}", relay.local_addr());
    std::io::stdout().flush()?;
    tracing::info!(shards = shards.get(), addr = %relay.local_addr(), "ringcast started");
    let stop = relay.shutdown_handle();
    std::thread::Builder::new()
        .name("ringcast-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                tracing::info!(signal, "shutting down");
                stop.shutdown();
            }
        })
        .context("starting the signal thread")?;
    if let Err(e) = relay.join() {
        tracing::error!("ringcast failed: {e}");
        // Shard threads that did not stop in time are abandoned, not joined.
        std::process::exit(1);
    }
    tracing::info!("stopped");
    Ok(())
}

/// Colour is for a person at a terminal: a log written to a file or a pipe
/// would carry the escape codes as text. NO_COLOR set to anything but the
/// empty string turns it off there too (https://no-color.org).
fn colour_logs() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
    std::io::stderr().is_terminal() && !no_color
}
