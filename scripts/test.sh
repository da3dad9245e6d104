#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs what the
# real-client tests need (Python `websockets`, `sseclient-py` and `pusher`;
# npm pusher-js, pusher and laravel-echo; Debian's Chromium and npm
# playwright-core for the browser test; Debian's redis-server for the cluster
# tests), builds, then tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import websockets' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'websockets>=13,<16'
fi
# tests/event_streams.rs reads /sse with sseclient-py.
if ! python3 -c 'import sseclient' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'sseclient-py>=1.8,<2'
fi

# tests/pusher_sdk.rs drives the Pusher HTTP API with Pusher's Python library.
if ! python3 -c 'import pusher' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'pusher==3.3.4'
fi

# The browser test (tests/browser_chat.rs) drives Debian's Chromium through
# npm playwright-core; no browser is downloaded.
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
pinned=$(node -p 'require("./tests/browser/package.json").dependencies["playwright-core"]')
installed=$(node -p 'require("./tests/browser/node_modules/playwright-core/package.json").version' 2>/dev/null || true)
if [ "$pinned" != "$installed" ]; then
  npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
fi

# The Pusher tests (tests/pusher_*.rs) run Pusher's own npm libraries and
# Laravel Echo: installed again whenever one of them is not the pinned one.
if ! node -e '
  const deps = require("./tests/pusher/package.json").dependencies;
  for (const [name, version] of Object.entries(deps)) {
    if (require(`./tests/pusher/node_modules/${name}/package.json`).version !== version) process.exit(1);
  }' 2>/dev/null; then
  npm ci --prefix tests/pusher --no-audit --no-fund --loglevel=error
fi

# The cluster tests (tests/cluster*.rs) run their own redis-server on a private
# loopback port; tests/redis_cluster.rs runs six of them as a Redis Cluster and
# joins them with redis-cli (redis-tools, a dependency of the package). Only
# the binaries are needed (the package's own service on 6379 is never used).
# The package index is refreshed only if the install fails.
# tests/redis_tls.rs makes its test CA and certificate with the openssl CLI.
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null \
  || ! command -v openssl >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq redis-server openssl >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq redis-server openssl >/dev/null
  fi
fi

# The load generator's integration test runs the ringcast binary built here.
cargo build --workspace --quiet
# --no-fail-fast: one failing test binary must not hide the results of the others.
cargo test --workspace --no-fail-fast "$@"
