#!/usr/bin/env bash
# Soak test: churns connections, subscriptions, publishes, registrations,
# resets and half-open HTTP requests against a two-shard release build for
# SECONDS (default 600), prints the server's RSS every 10 s and a summary,
# and fails if a gauge does not return to idle or a client saw an error.
# Not part of CI; the test itself is tests/soak.rs (#[ignore]).
#
#   ./scripts/soak.sh          # 10 minutes
#   ./scripts/soak.sh 60       # a quick run
#   SOAK_SEED=N ./scripts/soak.sh 60   # same operation choices per thread
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-600}
case "$seconds" in
  '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac

SOAK_SECONDS=$seconds cargo test --release -p ringcast --test soak -- --ignored --nocapture
