#!/usr/bin/env bash
# Install (once) and start sockudo, a Rust Pusher Channels server from crates.io, on loopback
# with one Pusher app, for `ringcast-load --protocol pusher` (loadtest/compare.sh peer `sockudo`).
#
# usage: sockudo.sh start [PORT]   (default 6001) | sockudo.sh stop
#
# The binary is built by `cargo install sockudo --locked` into $SOCKUDO_ROOT (default
# ~/.cache/ringcast-peers/sockudo) the first time only; nothing of sockudo's is kept in this
# repository. The install needs protoc (Debian: protobuf-compiler) and took about 5 minutes on
# 2 cores (sockudo 5.2.0).
#
# The app: id 4711, key app-key, secret app-secret (ringcast-load's --pusher-app default), client
# events on, no connection or event-rate limit of its own. The server: one process on
# 127.0.0.1:PORT, local adapter (no cluster), memory app manager, cache and no queue, rate limiter
# and Prometheus metrics off; everything else at sockudo's defaults (e.g. its per-socket send
# buffer of 1,000 messages, its WebSocket pings every 30 s, its info-level log of every
# connection). Its HTTP API answers every request with `Connection: close` (by design, not
# configurable): ringcast-load notices and then publishes on a new TCP connection per request.
#
# Environment (all optional):
#   SOCKUDO_ROOT=~/.cache/ringcast-peers/sockudo   where `cargo install` puts bin/sockudo
#   SOCKUDO_BIN=/path/to/sockudo                    use this binary instead (no install)
#   SOCKUDO_VERSION=                                 `cargo install sockudo --version ...`
#   SOCKUDO_INSTALL_ARGS=                            more `cargo install` arguments (e.g. features)
#   SOCKUDO_LOG=info                                 its RUST_LOG (sockudo's production default)
#   TOKIO_WORKER_THREADS=                            its runtime's worker threads (default: all cpus)
# The pid file, the log and the config live in $TMPDIR (default /tmp): ringcast-sockudo.*.
set -euo pipefail
tmp="${TMPDIR:-/tmp}"
pidf="$tmp/ringcast-sockudo.pid"
log="$tmp/ringcast-sockudo.log"
cfgdir="$tmp/ringcast-sockudo"
case "${1:-start}" in
  stop)
    if [ -f "$pidf" ]; then
      pid="$(cat "$pidf")"
      kill "$pid" 2>/dev/null || true
      # Its shutdown grace period is 1 s (config below); do not leave it behind.
      for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidf"; exit 0;;
  start) ;;
  *) echo "usage: $0 start [PORT] | stop" >&2; exit 2;;
esac
port="${2:-6001}"

root="${SOCKUDO_ROOT:-$HOME/.cache/ringcast-peers/sockudo}"
bin="${SOCKUDO_BIN:-$root/bin/sockudo}"
if [ ! -x "$bin" ]; then
  # A build script of one of its dependencies (metrics-exporter-tcp) runs protoc.
  if ! command -v protoc >/dev/null 2>&1 && [ -z "${PROTOC:-}" ]; then
    echo "sockudo: building it needs protoc: apt-get install protobuf-compiler (or set PROTOC)" >&2
    exit 1
  fi
  echo "sockudo: installing from crates.io into $root (this takes long on a small machine)" >&2
  # shellcheck disable=SC2086
  nice -n 19 cargo install sockudo --locked --root "$root" \
    ${SOCKUDO_VERSION:+--version "$SOCKUDO_VERSION"} ${SOCKUDO_INSTALL_ARGS:-} >&2
fi

if [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
  echo "sockudo: already running (pid $(cat "$pidf")); stop it first" >&2; exit 1
fi

# sockudo reads config/config.toml from its working directory before --config, so both name
# this file: nothing from elsewhere can slip in.
mkdir -p "$cfgdir/config"
cat >"$cfgdir/config/config.toml" <<TOML
debug = false
mode = "production"
host = "127.0.0.1"
port = $port
path_prefix = "/"
max_connections = 0
shutdown_grace_period = 1

[adapter]
driver = "local"

[app_manager]
driver = "memory"

[app_manager.cache]
enabled = false

[[app_manager.array.apps]]
id = "4711"
key = "app-key"
secret = "app-secret"
enabled = true
enable_client_messages = true
max_connections = 0
max_backend_events_per_second = 1000000000
max_client_events_per_second = 1000000000
max_read_requests_per_second = 1000000000

[cache]
driver = "memory"

[queue]
driver = "none"

[rate_limiter]
enabled = false

[metrics]
enabled = false
TOML

# Only what is set here reaches it: sockudo overrides its config from many environment
# variables (HOST, PORT, DEBUG, REDIS_URL, ...), and the caller's must not change the run.
(cd "$cfgdir" && exec env -i PATH="$PATH" HOME="$HOME" RUST_LOG="${SOCKUDO_LOG:-info}" \
  ${TOKIO_WORKER_THREADS:+TOKIO_WORKER_THREADS="$TOKIO_WORKER_THREADS"} \
  "$bin" --config "$cfgdir/config/config.toml") >"$log" 2>&1 &
echo $! >"$pidf"

for _ in $(seq 100); do
  if ! kill -0 "$(cat "$pidf")" 2>/dev/null; then
    echo "sockudo exited at start; see $log:" >&2; tail -20 "$log" >&2; rm -f "$pidf"; exit 1
  fi
  # /up/4711 answers 200 only once app 4711 is loaded: a config sockudo could not read is
  # replaced by its defaults (no app), which this never accepts.
  if curl -sf "http://127.0.0.1:$port/up/4711" >/dev/null 2>&1; then
    echo "sockudo up on 127.0.0.1:$port (pid $(cat "$pidf"), $("$bin" --version 2>/dev/null || echo sockudo))"
    exit 0
  fi
  sleep 0.1
done
echo "sockudo did not answer on 127.0.0.1:$port within 10 s; see $log" >&2; "$0" stop; exit 1
