#!/usr/bin/env bash
# The plain HTTP path against nginx (nchan's nginx, `return 200` on /health
# and its publisher endpoint), the uWebSockets peer and the floor:
# `wrk -t1 -c100` keep-alive, server pinned to cpu 0 and wrk to cpu 1, servers
# alternating within each round and each round starting with the next server
# (round 2 with the second, ...). Prints per server and endpoint the medians
# of requests/s, the server cpu's busy microseconds per request (elapsed less
# idle and iowait from /proc/stat, so softirq work counts; read over the
# middle half of wrk's run) with its range over the rounds, and wrk's cpu
# busy share, then per endpoint the ratios ringcast / each other server
# (of the medians, and the range of the ratios round by round).
#
#   loadtest/http.sh [ROUNDS]          default 5 rounds of 6 s per server and endpoint
#
# Servers (env SERVERS, default "ringcast nginx uws floor"; uws and floor are
# left out, with a note at the end, when their binary is not there):
#   ringcast  GET /health, POST /publish of ringcast's JSON body (--shards 1)
#   ringcast2 the same with another build (RINGCAST2_BIN): an A/B of two
#             builds, ratios printed as ringcast / ringcast2
#   nginx     nchan's nginx ($SHARED/peers/nchan.sh, one worker): GET /health
#             (`return 200`), nchan's POST /pub/{topic} with a raw body
#   uws       the uWebSockets peer (loadtest/peers/uws/README.md, built by
#             hand, given as UWS_BIN): GET /health, POST /publish as ringcast
#   floor     ringcast-floor (loadtest/src/floor, built with ringcast-load):
#             the least a server must do (README, "The floor"); GET /health
#             answered `200 ok`, POST /publish as ringcast
#
# Env: SERVERS (above), RINGCAST_BIN (default target/release/ringcast, built
# if missing), RINGCAST2_BIN (for ringcast2; required with it), UWS_BIN
# (the uws peer's binary; unset: no uws), FLOOR_BIN
# (default target/release/ringcast-floor; not built here: `cargo build
# --release -p ringcast-load`), DURATION (wrk's -d, default 6s), SHARED
# (where peers/nchan.sh lives).
# When wrk's cpu is busy near 100% the request rate measures wrk as much as
# the server: compare the CPU per request then.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
shared="${SHARED:-$root/../shared}"
rounds="${1:-5}"
duration="${DURATION:-6s}"
bin="${RINGCAST_BIN:-$root/target/release/ringcast}"
floor_bin="${FLOOR_BIN:-$root/target/release/ringcast-floor}"
uws_bin="${UWS_BIN:-}"
bin2="${RINGCAST2_BIN:-}"
servers="${SERVERS:-ringcast nginx uws floor}"
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 1; }

# Which servers run: uws and floor are left out when their binary is missing.
notes=()
list=()
for s in $servers; do
  case "$s" in
    ringcast) [ -x "$bin" ] || (cd "$root" && cargo build --release -q -p ringcast) ;;
    ringcast2)
      [ -n "$bin2" ] && [ -x "$bin2" ] && [ ! -d "$bin2" ] || {
        echo "ringcast2: set RINGCAST2_BIN to the other build's ringcast binary" >&2; exit 1; } ;;
    nginx) [ -x "$shared/peers/nchan.sh" ] || { echo "nginx: $shared/peers/nchan.sh not found (set SHARED)" >&2; exit 1; } ;;
    uws)
      if [ -z "$uws_bin" ]; then
        notes+=("uws: UWS_BIN not set (see loadtest/peers/uws/README.md); not run"); continue
      elif [ ! -x "$uws_bin" ] || [ -d "$uws_bin" ]; then
        notes+=("uws: UWS_BIN=$uws_bin is not an executable file (see loadtest/peers/uws/README.md); not run"); continue
      fi ;;
    floor)
      if [ ! -x "$floor_bin" ] || [ -d "$floor_bin" ]; then
        notes+=("floor: $floor_bin not found (cargo build --release -p ringcast-load, or set FLOOR_BIN); not run"); continue
      fi ;;
    *) echo "unknown server '$s' in SERVERS (ringcast, ringcast2, nginx, uws, floor)" >&2; exit 1 ;;
  esac
  list+=("$s")
done
[ "${#list[@]}" -gt 0 ] || { printf '%s\n' "${notes[@]}" >&2; echo "no server left to run" >&2; exit 1; }

# The cpu window: the middle half of wrk's run (1.5 s to 4.5 s of the default 6 s).
timing="$(python3 -c "
import re, sys
m = re.fullmatch(r'([0-9.]+)(ms|s|m|h)?', sys.argv[1])
if not m: sys.exit('DURATION=' + sys.argv[1] + ': not a duration like 6s')
d = float(m.group(1)) * {'ms': 1e-3, 's': 1, None: 1, 'm': 60, 'h': 3600}[m.group(2)]
print(f'{d / 4:.3f} {d / 2:.3f}')" "$duration")"
read -r warm window <<<"$timing"

out="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  if [[ " ${list[*]} " == *" nginx "* ]]; then "$shared/peers/nchan.sh" stop >/dev/null 2>&1 || true; fi
  rm -rf "$out"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

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
  sleep "$warm"
  local t0 i0 t1 i1
  t0=$(date +%s.%N); i0=$(idle_ticks); sleep "$window"; t1=$(date +%s.%N); i1=$(idle_ticks)
  wait "$w"
  local rps non2xx
  rps=$(awk '/Requests\/sec/ { print $2 }' "$wrk_out")
  non2xx=$(awk '/Non-2xx/ { print $NF }' "$wrk_out")
  if ! awk -v r="${rps:-0}" 'BEGIN { exit !(r > 0) }'; then
    echo "$1 $2: wrk got no answer ($(grep -h 'Socket errors' "$wrk_out" | sed 's/^ *//' || echo 'no socket errors'))" >&2
    rps=0
  fi
  echo "$1 $2 $rps $t0 $t1 $i0 $i1 ${non2xx:-0}" >>"$out/results"
}

port=""
start_server() { # $1 = server; sets pid (ringcast, ringcast2, uws, floor) and port
  case "$1" in
    ringcast | ringcast2 | floor)
      local log="$out/$1.log"
      if [ "$1" = floor ]; then
        taskset -c 0 "$floor_bin" 127.0.0.1:0 >"$log" 2>&1 &
      else
        local build="$bin"
        [ "$1" = ringcast2 ] && build="$bin2"
        taskset -c 0 "$build" --listen 127.0.0.1:0 --shards 1 >"$log" 2>&1 &
      fi
      pid=$!
      port=""
      for _ in $(seq 100); do
        port="$(sed -n 's/^listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$log" | head -1)"
        [ -n "$port" ] && break; sleep 0.05
      done
      [ -n "$port" ] || { echo "$1 did not start; its log:" >&2; cat "$log" >&2; exit 1; }
      ;;
    uws)
      local log="$out/uws.log" up=""
      port="$(free_port)"
      taskset -c 0 "$uws_bin" "$port" >"$log" 2>&1 &
      pid=$!
      for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && { up=1; break; }
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
      done
      [ -n "$up" ] || { echo "uws did not start on 127.0.0.1:$port; its log:" >&2; cat "$log" >&2; exit 1; }
      ;;
    nginx)
      port=8091
      "$shared/peers/nchan.sh" start "$port" 1 >/dev/null
      local npid p
      npid="$(cat "${TMPDIR:-/tmp}/ringcast-nchan/nginx.pid")"
      for p in $npid $(pgrep -P "$npid"); do taskset -pc 0 "$p" >/dev/null; done
      ;;
  esac
}
stop_server() { # $1 = server
  if [ "$1" = nginx ]; then
    "$shared/peers/nchan.sh" stop >/dev/null
  else
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  fi
  sleep 0.5
}

for r in $(seq "$rounds"); do
  # Each round starts with the next server, so none always runs first or last.
  first=$(( (r - 1) % ${#list[@]} ))
  for endpoint in health publish; do
    for srv in "${list[@]:first}" "${list[@]:0:first}"; do
      start_server "$srv"
      if [ "$endpoint" = health ]; then
        measure "$srv" health "http://127.0.0.1:$port/health" ""
      elif [ "$srv" = nginx ]; then
        measure nginx publish "http://127.0.0.1:$port/pub/bench" "$out/nginx-publish.lua"
      else
        measure "$srv" publish "http://127.0.0.1:$port/publish" "$out/ringcast-publish.lua"
      fi
      stop_server "$srv"
    done
  done
done

python3 - "$out/results" "$(getconf CLK_TCK)" "${list[*]}" "${notes[@]}" <<'PY'
import collections, statistics as st, sys
tck = float(sys.argv[2])
order = sys.argv[3].split()
notes = sys.argv[4:]
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    srv, ep, rps, t0, t1, i0c0, i0c1, i1c0, i1c1, non2xx = line.split()
    wall = float(t1) - float(t0)
    busy0 = max(0.0, 1 - (float(i1c0) - float(i0c0)) / tck / wall)
    busy1 = max(0.0, 1 - (float(i1c1) - float(i0c1)) / tck / wall)
    cpu = busy0 / float(rps) * 1e6 if float(rps) > 0 else float("inf")
    rows[(srv, ep)].append((float(rps), cpu, busy1, int(non2xx)))
print(f"{'endpoint':<9} {'server':<9} {'req/s':>9} {'cpu us/req':>11} {'(min-max)':>13} {'wrk cpu':>8} {'non-2xx':>8}")
med = {}
for ep in ("health", "publish"):
    for srv in order:
        v = rows.get((srv, ep))
        if not v:
            continue
        m = (st.median(x[0] for x in v), st.median(x[1] for x in v), st.median(x[2] for x in v), sum(x[3] for x in v))
        med[(srv, ep)] = m
        spread = f"{min(x[1] for x in v):.2f}-{max(x[1] for x in v):.2f}"
        print(f"{ep:<9} {srv:<9} {m[0]:>9,.0f} {m[1]:>11.2f} {spread:>13} {m[2]:>8.2f} {m[3]:>8}")
ok = lambda x, y: 0 < y < float("inf") and x < float("inf")
ratio = lambda x, y: f"{x / y:.2f}x" if ok(x, y) else "n/a"
for ep in ("health", "publish"):
    a = med.get(("ringcast", ep))
    for srv in order:
        b = med.get((srv, ep))
        if a and b and srv != "ringcast":
            # Servers alternate within a round, so the rounds pair up: the
            # spread of the per-round ratios says how firm the median is.
            pairs = zip(rows[("ringcast", ep)], rows[(srv, ep)])
            per_round = sorted(x[1] / y[1] for x, y in pairs if ok(x[1], y[1]))
            spread = f" (rounds {per_round[0]:.2f}-{per_round[-1]:.2f}x)" if per_round else ""
            print(f"{ep + ':':<9} ringcast / {srv:<6} req/s {ratio(a[0], b[0])}  cpu per request {ratio(a[1], b[1])}{spread}")
tail = "; nginx publish = nchan's POST /pub/{topic}" if "nginx" in order else ""
print(f"medians of {len(next(iter(rows.values())))} rounds{tail}")
for n in notes:
    print(f"note: {n}")
PY
