#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs what the
# real-client tests need (Python `websockets`), builds, then tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import websockets' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'websockets>=13,<16'
fi

# The load generator's integration test runs the ringcast binary built here.
cargo build --workspace --quiet
cargo test --workspace "$@"
