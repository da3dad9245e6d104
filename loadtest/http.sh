#!/usr/bin/env bash
# The plain HTTP path against nginx (nchan's nginx, `return 200` on /health
# and its publisher endpoint): `wrk -t1 -c100` keep-alive, server pinned to
# cpu 0 and wrk to cpu 1, servers alternating within each round. Prints per
# endpoint the medians of requests/s, the server cpu's busy microseconds per
# request (elapsed less idle and iowait from /proc/stat, so softirq work
# counts) and wrk's cpu busy share, and the ratios ringcast / nginx.
#
#   loadtest/http.sh [ROUNDS]          default 5 rounds of 6 s per server and endpoint
#
# Env: RINGCAST_BIN (default target/release/ringcast, built if missing),
# DURATION (wrk's -d, default 6s), SHARED (where peers/nchan.sh lives).
# When wrk's cpu is busy near 100% the request rate measures wrk as much as
# the server: compare the CPU per request then.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
shared="${SHARED:-$root/../shared}"
rounds="${1:-5}"
duration="${DURATION:-6s}"
bin="${RINGCAST_BIN:-$root/target/release/ringcast}"
[ -x "$bin" ] || (cd "$root" && cargo build --release -q -p ringcast)
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 1; }
out="$(mktemp -d)"
trap '"$shared/peers/nchan.sh" stop >/dev/null 2>&1 || true; rm -rf "$out"' EXIT

cat >"$out/ringcast-publish.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"topic":"bench","event":"tick","payload":{"n":1,"text":"0123456789012345678901234567890123456789"}}'
LUA
cat >"$out/nginx-publish.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"n":1,"text":"0123456789012345678901234567890123456789"}'
LUA

# Idle+iowait ticks of cpu 0 and cpu 1 (an io_uring wait counts as iowait).
idle_ticks() { awk '$1 == "cpu0" || $1 == "cpu1" { printf "%s ", $5 + $6 }' /proc/stat; }

measure() { # $1 = server, $2 = endpoint, $3 = url, $4 = lua script or ""
  local wrk_out="$out/wrk.txt"
  # shellcheck disable=SC2046
  taskset -c 1 wrk -t1 -c100 -d"$duration" $([ -n "$4" ] && echo "-s $4") "$3" >"$wrk_out" &
  local w=$!
  sleep 1.5
  local t0 i0 t1 i1
  t0=$(date +%s.%N); i0=$(idle_ticks); sleep 3; t1=$(date +%s.%N); i1=$(idle_ticks)
  wait "$w"
  local rps non2xx
  rps=$(awk '/Requests\/sec/ { print $2 }' "$wrk_out")
  non2xx=$(awk '/Non-2xx/ { print $NF }' "$wrk_out")
  echo "$1 $2 $rps $t0 $t1 $i0 $i1 ${non2xx:-0}" >>"$out/results"
}

for r in $(seq "$rounds"); do
  for endpoint in health publish; do
    taskset -c 0 "$bin" --listen 127.0.0.1:0 --shards 1 >"$out/ringcast.log" 2>&1 &
    pid=$!
    port=""
    for _ in $(seq 100); do
      port="$(sed -n 's/^listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$out/ringcast.log" | head -1)"
      [ -n "$port" ] && break; sleep 0.05
    done
    if [ "$endpoint" = health ]; then
      measure ringcast health "http://127.0.0.1:$port/health" ""
    else
      measure ringcast publish "http://127.0.0.1:$port/publish" "$out/ringcast-publish.lua"
    fi
    kill "$pid"; wait "$pid" 2>/dev/null || true

    "$shared/peers/nchan.sh" start 8091 1 >/dev/null
    npid="$(cat "${TMPDIR:-/tmp}/ringcast-nchan/nginx.pid")"
    for p in $npid $(pgrep -P "$npid"); do taskset -pc 0 "$p" >/dev/null; done
    if [ "$endpoint" = health ]; then
      measure nginx health "http://127.0.0.1:8091/health" ""
    else
      measure nginx publish "http://127.0.0.1:8091/pub/bench" "$out/nginx-publish.lua"
    fi
    "$shared/peers/nchan.sh" stop >/dev/null
    sleep 0.5
  done
done

python3 - "$out/results" "$(getconf CLK_TCK)" <<'PY'
import collections, statistics as st, sys
tck = float(sys.argv[2])
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    srv, ep, rps, t0, t1, i0c0, i0c1, i1c0, i1c1, non2xx = line.split()
    wall = float(t1) - float(t0)
    busy0 = max(0.0, 1 - (float(i1c0) - float(i0c0)) / tck / wall)
    busy1 = max(0.0, 1 - (float(i1c1) - float(i0c1)) / tck / wall)
    rows[(srv, ep)].append((float(rps), busy0 / float(rps) * 1e6, busy1, int(non2xx)))
print(f"{'endpoint':<9} {'server':<9} {'req/s':>9} {'cpu us/req':>11} {'wrk cpu':>8} {'non-2xx':>8}")
med = {}
for (srv, ep), v in sorted(rows.items()):
    m = (st.median(x[0] for x in v), st.median(x[1] for x in v), st.median(x[2] for x in v), sum(x[3] for x in v))
    med[(srv, ep)] = m
    print(f"{ep:<9} {srv:<9} {m[0]:>9,.0f} {m[1]:>11.2f} {m[2]:>8.2f} {m[3]:>8}")
for ep in ("health", "publish"):
    a, b = med.get(("ringcast", ep)), med.get(("nginx", ep))
    if a and b:
        print(f"{ep}: ringcast / nginx  req/s {a[0] / b[0]:.2f}x  cpu per request {a[1] / b[1]:.2f}x")
print(f"medians of {len(next(iter(rows.values())))} rounds; nginx publish = nchan's POST /pub/{{topic}}")
PY
