//! Configuration: the TOML file and CLI flags, parsed once into typed values.
//!
//! Everything the relay bounds is a field of [`Limits`]; the shard code reads
//! these values and never re-parses anything. Unknown keys are rejected so a
//! typo in a limit cannot silently leave the default in place.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// Shards are addressed by bit in a `u64` interest mask.
pub const MAX_SHARDS: usize = 64;

/// Errors reading the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read; check the path and permissions.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrong types; the message names the key.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The path given.
        path: String,
        /// What the TOML parser said, including the offending key.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Limits that bound every resource a peer can make the relay spend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest WebSocket message (after reassembling fragments) and frame. Default 64 KiB;
    /// larger messages close the connection with 1009.
    pub max_message_bytes: usize,
    /// Topics one connection may hold at once. Default 50; more is answered with an `error`.
    pub max_subscriptions_per_connection: usize,
    /// Bytes queued for one connection that the kernel has not taken yet. Default 1 MiB;
    /// past it the connection is a slow consumer and is closed with 1013.
    pub max_outbound_bytes_per_connection: usize,
    /// HTTP request head (request line and headers). Default 16 KiB; more gets 431.
    pub max_http_header_bytes: usize,
    /// HTTP request body. Default 1 MiB; more gets 413.
    pub max_http_body_bytes: usize,
    /// Length of a topic name in bytes. Default 256.
    pub max_topic_bytes: usize,
    /// Live connections across all shards. Default 1,000,000; past it new connections get 503.
    pub max_connections: usize,
    /// Distinct topics with subscribers, per shard. Default 1,000,000.
    pub max_topics_per_shard: usize,
    /// Envelopes queued from one shard to another. Default 65,536: a full second of a
    /// 20k msgs/s publish burst aimed at one shard, at 24 bytes an envelope.
    pub bus_queue_capacity: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 * 1024,
            max_subscriptions_per_connection: 50,
            max_outbound_bytes_per_connection: 1024 * 1024,
            max_http_header_bytes: 16 * 1024,
            max_http_body_bytes: 1024 * 1024,
            max_topic_bytes: 256,
            max_connections: 1_000_000,
            max_topics_per_shard: 1_000_000,
            bus_queue_capacity: 65_536,
        }
    }
}

/// The whole relay configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address every shard binds with `SO_REUSEPORT`. Default `127.0.0.1:8000`.
    pub listen: SocketAddr,
    /// Number of shards (threads). Default: one per available core.
    pub shards: NonZeroUsize,
    /// Resource limits.
    pub limits: Limits,
    /// How long shutdown waits for close handshakes and queued writes. Default 5 s.
    pub shutdown_timeout: Duration,
    /// How long a closing connection may take to finish its close handshake. Default 3 s.
    pub close_timeout: Duration,
    /// Pin shard `i` to core `i % cores`. Default true.
    pub pin_cores: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            shards: available_cores(),
            limits: Limits::default(),
            shutdown_timeout: Duration::from_secs(5),
            close_timeout: Duration::from_secs(3),
            pin_cores: true,
        }
    }
}

/// Cores this process may run on; one shard each by default.
pub fn available_cores() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    shards: Option<usize>,
    shutdown_timeout_ms: Option<u64>,
    close_timeout_ms: Option<u64>,
    pin_cores: Option<bool>,
    #[serde(default)]
    limits: FileLimits,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_message_bytes: Option<usize>,
    max_subscriptions_per_connection: Option<usize>,
    max_outbound_bytes_per_connection: Option<usize>,
    max_http_header_bytes: Option<usize>,
    max_http_body_bytes: Option<usize>,
    max_topic_bytes: Option<usize>,
    max_connections: Option<usize>,
    max_topics_per_shard: Option<usize>,
    bus_queue_capacity: Option<usize>,
}

impl Config {
    /// Reads a TOML file on top of the defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Parses TOML text on top of the defaults.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<text>".into(),
            message: e.message().to_string(),
        })?;
        let mut config = Config::default();
        if let Some(listen) = file.listen {
            config.listen = listen.parse().map_err(|_| {
                ConfigError::Invalid(format!(
                    "listen: `{listen}` is not an address like 127.0.0.1:8000"
                ))
            })?;
        }
        if let Some(shards) = file.shards {
            config.set_shards(shards)?;
        }
        if let Some(ms) = file.shutdown_timeout_ms {
            config.shutdown_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = file.close_timeout_ms {
            config.close_timeout = Duration::from_millis(ms);
        }
        if let Some(pin) = file.pin_cores {
            config.pin_cores = pin;
        }
        let l = &mut config.limits;
        let f = file.limits;
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(v) = f.$field { l.$field = v; } )* };
        }
        take!(
            max_message_bytes,
            max_subscriptions_per_connection,
            max_outbound_bytes_per_connection,
            max_http_header_bytes,
            max_http_body_bytes,
            max_topic_bytes,
            max_connections,
            max_topics_per_shard,
            bus_queue_capacity
        );
        config.validate()?;
        Ok(config)
    }

    /// Sets the shard count; 0 means one per core.
    pub fn set_shards(&mut self, shards: usize) -> Result<(), ConfigError> {
        self.shards = match NonZeroUsize::new(shards) {
            Some(n) => n,
            None => available_cores(),
        };
        self.validate()
    }

    /// Checks ranges that the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.shards.get() > MAX_SHARDS {
            return Err(ConfigError::Invalid(format!(
                "shards: at most {MAX_SHARDS} are supported, got {}",
                self.shards
            )));
        }
        let l = &self.limits;
        let positive = [
            ("max_message_bytes", l.max_message_bytes),
            (
                "max_outbound_bytes_per_connection",
                l.max_outbound_bytes_per_connection,
            ),
            ("max_http_header_bytes", l.max_http_header_bytes),
            ("max_topic_bytes", l.max_topic_bytes),
            ("max_connections", l.max_connections),
            ("max_topics_per_shard", l.max_topics_per_shard),
            ("bus_queue_capacity", l.bus_queue_capacity),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "limits.{name} must be greater than 0"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.listen, "127.0.0.1:8000".parse().unwrap());
    }

    #[test]
    fn limits_are_read() {
        let c = Config::from_toml(
            "listen = \"0.0.0.0:9000\"\nshards = 2\n[limits]\nmax_message_bytes = 1024\nmax_subscriptions_per_connection = 3\n",
        )
        .unwrap();
        assert_eq!(c.shards.get(), 2);
        assert_eq!(c.limits.max_message_bytes, 1024);
        assert_eq!(c.limits.max_subscriptions_per_connection, 3);
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = Config::from_toml("[limits]\nmax_mesage_bytes = 1\n").unwrap_err();
        assert!(err.to_string().contains("max_mesage_bytes"), "{err}");
    }

    #[test]
    fn zero_limits_and_too_many_shards_are_rejected() {
        assert!(Config::from_toml("[limits]\nmax_message_bytes = 0\n").is_err());
        assert!(Config::from_toml("shards = 65\n").is_err());
        assert!(Config::from_toml("listen = \"nowhere\"\n").is_err());
    }
}
