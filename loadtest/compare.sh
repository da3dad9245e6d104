#!/usr/bin/env bash
# Side-by-side fan-out benchmark: ringcast vs the axum relay, nginx+nchan and uWebSockets, same
# scenarios, same tool, same cores; and ringcast's Pusher Channels front-end vs sockudo (Pusher
# protocol 7).
#
# usage: loadtest/compare.sh            full size (takes several minutes)
#        SCALE=0.1 loadtest/compare.sh  quick version (connection counts and rates x0.1)
#
# Scenarios:
#   s1  1,000 subs, 1 topic, 200 publishes/s (200k deliveries/s)
#   s2  5,000 subs, 500 topics, 5,000 publishes/s (50k deliveries/s)
#   a   broadcast: 10,000 subs, 1 topic, 100 publishes/s
#   b   many topics: 10,000 subs, 1,000 topics, 20,000 publishes/s
#   c   idle connections: 50,000 (RSS per connection: the growth over the idle server divided by
#       the connections, and the marginal cost, the slope from a run with a third of them, which
#       leaves out the fixed memory the first connections touch: code pages, receive buffers)
#   d   throughput ceiling: 1,000 subs, 100 topics, rate raised until p99 > 50 ms or loss
#   r   reconnect storm (ringcast only): 1,000 subs on 10 stream topics (history 1,000), ringcast
#       --shards 2, steady 1,000 publishes/s; 3 s into the window every subscriber drops abruptly
#       (RST) and resubscribes with `since` (--recover): missing/duplicated/out of order by
#       offset, recovery latency and the time until every subscriber has recovered
#
# Environment (all optional):
#   SCALE=1            multiplies subscriber counts, topic counts and rates (not s1's and a's rate)
#   CORES=1            server cores: ringcast --shards, nchan worker_processes, axum TOKIO_WORKER_THREADS
#   DURATION=10s WARMUP=2s DRAIN=3s   per scenario
#   ROUNDS=3           rounds of s1, s2, a and b, the servers alternating within each round; the
#                      table shows each metric's median over the rounds (c, d and r run once)
#   SCENARIOS="s1 s2 a b c d"         which scenarios to run
#   PEERS="ringcast axum nchan"       which servers (the first is the reference of the ratios):
#     ringcast         ringcast, its own JSON protocol (/ws, POST /publish)
#     axum             the axum relay ($SHARED/peers/axum-relay.sh), ringcast's protocol
#     nchan            nginx+nchan ($SHARED/peers/nchan.sh), raw bodies
#     uws              uWebSockets v20.79.0 (loadtest/peers/uws/server.cpp, one thread, epoll, no
#                      compression), ringcast's protocol; built by hand (loadtest/peers/uws/README.md)
#                      and given as UWS_BIN; without it the peer is left out and the table says so
#     floor            ringcast-floor (loadtest/src/floor): the least a fan-out server must do (one
#                      thread, one io_uring, each publication framed once, one send per connection
#                      per turn, nothing else), ringcast's protocol and bytes: ringcast/floor is how
#                      far ringcast is from this kernel's floor. FLOOR_ARGS="--taskrun coop" runs it
#                      with ringcast's ring setup instead of DEFER_TASKRUN. Not in c (its memory is
#                      not a server's) nor r; one thread whatever CORES says.
#     ringcast-pusher  ringcast with one [[apps]] table (id 4711, key app-key, secret app-secret),
#                      driven with `ringcast-load --protocol pusher`: subscribers on /app/app-key
#                      with pusher:subscribe, publishes signed to POST /apps/4711/events
#     sockudo          sockudo, a Rust Pusher server (loadtest/peers/sockudo.sh: `cargo install
#                      sockudo` on first use, the same app, one process, TOKIO_WORKER_THREADS=CORES),
#                      driven the same way (its HTTP API closes each connection after one answer,
#                      so each of its publishes takes a TCP connection: the load tool notices and
#                      does that by itself); e.g. PEERS="ringcast-pusher sockudo" SCENARIOS="s1 s2 c"
#                      Scenario r is ringcast's own protocol only; the Pusher peers skip it.
#   RECV_PATH=uring RECV_BATCH_US=0 PROCS=1   ringcast-load's receive path, batch window, processes
#   PERF=0             1: count the server's syscalls and context switches with `perf stat`. Off by
#                      default: perf's per-syscall tracing taxes a server by its syscall count (uWS's
#                      1.3 per delivery more than ringcast's 0.2), so counted rounds are run apart from
#                      the rounds whose CPU is compared
#   N_S1 RATE_S1 | N_S2 T_S2 RATE_S2 | N_A RATE_A | N_B T_B RATE_B | N_C | N_D T_D RATE_D_START
#   N_R T_R RATE_R STORM_AT_R=3s SHARDS_R=2   (scenario r; its window is at least 5s)
#   SOURCE_IPS=127.0.0.1-127.0.0.4    client source addresses (needed past ~28k connections)
#   SHARED=../shared                  where peers/nchan.sh lives
#   OUT=/tmp/ringcast-compare         JSON results per server and scenario
#   SKIP_BUILD=1 RINGCAST_BIN=... LOAD_BIN=...   use existing binaries
#   REPORT_ONLY=1      run nothing: print the table of the JSON results already in $OUT (e.g.
#                      rounds gathered by separate runs, renamed PEER-SCENARIO-ROUND.json)
#   SOCKUDO_ROOT=~/.cache/ringcast-peers/sockudo SOCKUDO_BIN=...   where sockudo is (peers/sockudo.sh)
#   PUSHER_APP=4711:app-key:app-secret              the Pusher app of both Pusher peers
#   UWS_BIN=/path/to/uws-peer                       the uws peer's binary (loadtest/peers/uws/README.md)
#
# The server is pinned to the first CORES cpus with taskset and the client to the rest, when the
# machine has more cores than CORES; otherwise they share cores and the table says so.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
shared="${SHARED:-$root/../shared}"
SCALE="${SCALE:-1}"; CORES="${CORES:-1}"
DURATION="${DURATION:-10s}"; WARMUP="${WARMUP:-2s}"; DRAIN="${DRAIN:-3s}"
SCENARIOS="${SCENARIOS:-s1 s2 a b c d r}"; PEERS="${PEERS:-ringcast axum nchan}"; ROUNDS="${ROUNDS:-3}"
RECV_PATH="${RECV_PATH:-uring}"; RECV_BATCH_US="${RECV_BATCH_US:-0}"; PROCS="${PROCS:-1}"
perf_arg="--no-perf"; [ "${PERF:-0}" = 0 ] || perf_arg=""
SOURCE_IPS="${SOURCE_IPS:-127.0.0.1-127.0.0.4}"
OUT="${OUT:-${TMPDIR:-/tmp}/ringcast-compare}"
mkdir -p "$OUT"; [ -n "${REPORT_ONLY:-}" ] || rm -f "$OUT"/*.json

scale() { python3 -c "import sys; print(max(1, int(round($1 * $SCALE))))"; }
N_S1="${N_S1:-$(scale 1000)}"; RATE_S1="${RATE_S1:-200}"
N_S2="${N_S2:-$(scale 5000)}"; T_S2="${T_S2:-$(scale 500)}"; RATE_S2="${RATE_S2:-$(scale 5000)}"
N_A="${N_A:-$(scale 10000)}"; RATE_A="${RATE_A:-100}"
N_B="${N_B:-$(scale 10000)}"; T_B="${T_B:-$(scale 1000)}"; RATE_B="${RATE_B:-$(scale 20000)}"
N_C="${N_C:-$(scale 50000)}"
N_D="${N_D:-$(scale 1000)}"; T_D="${T_D:-$(scale 100)}"; RATE_D_START="${RATE_D_START:-$(scale 2000)}"
N_R="${N_R:-$(scale 1000)}"; T_R="${T_R:-10}"; RATE_R="${RATE_R:-$(scale 1000)}"
STORM_AT_R="${STORM_AT_R:-3s}"; SHARDS_R="${SHARDS_R:-2}"

# Open files: both the client and the server hold one descriptor per connection.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
nofile="$(ulimit -n)"
notes=()
if [ "$N_C" -gt $((nofile - 500)) ]; then
  [[ " $SCENARIOS " == *" c "* ]] && notes+=("scenario c: $N_C connections asked, but the open-file hard limit here is $nofile (raising it needs CAP_SYS_RESOURCE); ran $((nofile - 500))")
  N_C=$((nofile - 500))
fi
for v in N_S1 N_S2 N_A N_B N_D N_R; do
  if [ "${!v}" -gt $((nofile - 500)) ]; then
    notes+=("$v=${!v} clamped to $((nofile - 500)) by the open-file limit"); printf -v "$v" '%s' $((nofile - 500))
  fi
done

# The uws peer is built by hand (uWebSockets' source is not in this repository): without its
# binary it is left out of the runs, and the table says so. REPORT_ONLY needs no binary.
if [[ " $PEERS " == *" uws "* ]] && [ -z "${REPORT_ONLY:-}" ] && { [ -z "${UWS_BIN:-}" ] || [ ! -x "$UWS_BIN" ] || [ -d "$UWS_BIN" ]; }; then
  if [ -z "${UWS_BIN:-}" ]; then why="UWS_BIN not set"; else why="UWS_BIN=$UWS_BIN is not an executable file"; fi
  notes+=("uws: $why (see loadtest/peers/uws/README.md); not run")
  echo "== uws: $why (see loadtest/peers/uws/README.md); leaving it out" >&2
  kept=""; for p in $PEERS; do [ "$p" = uws ] || kept="$kept $p"; done
  PEERS="${kept# }"
  [ -n "$PEERS" ] || { echo "no peer left to run" >&2; exit 1; }
fi

tdir="${CARGO_TARGET_DIR:-$root/target}"
if [ -z "${SKIP_BUILD:-}" ] && [ -z "${REPORT_ONLY:-}" ]; then
  echo "== building release" >&2
  (cd "$root" && cargo build --release -q -p ringcast -p ringcast-load)
fi
RINGCAST="${RINGCAST_BIN:-$tdir/release/ringcast}"; LOAD="${LOAD_BIN:-$tdir/release/ringcast-load}"
FLOOR="${FLOOR_BIN:-$tdir/release/ringcast-floor}"

ncpu="$(nproc)"
server_cpus="0-$((CORES - 1))"
if [ "$ncpu" -gt "$CORES" ]; then
  client_cpus="$CORES-$((ncpu - 1))"; client_threads=$((ncpu - CORES))
  cpu_note="server pinned to cpus $server_cpus ($CORES core(s)), client to cpus $client_cpus; machine has $ncpu cores"
  # Core busy is read from these cpus' /proc/stat: everything that ran there
  # (the server, its deferred softirq work, and anything else scheduled there).
  server_cpus_arg="--server-cpus $server_cpus"
else
  client_cpus="0-$((ncpu - 1))"; client_threads="$ncpu"
  cpu_note="machine has only $ncpu core(s): client and server SHARE them (numbers are pessimistic for both)"
  server_cpus_arg=""
fi
if [ "$ncpu" -le 2 ]; then
  cpu_note="$cpu_note; with $ncpu cores in all, client and server run side by side, so absolute figures are small-machine figures"
fi

# The axum relay keeps its pid file and log in its own TMPDIR, so stopping it
# never touches another run's relay; its build is cached across runs.
axum_tmp="$OUT/axum"; mkdir -p "$axum_tmp"
axum_target="${AXUM_TARGET_DIR:-${TMPDIR:-/tmp}/ringcast-axum-relay-target}"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# ringcast-pusher's app, the same as sockudo's (peers/sockudo.sh) and ringcast-load's default.
PUSHER_APP="${PUSHER_APP:-4711:app-key:app-secret}"
IFS=: read -r pusher_id pusher_key pusher_secret <<<"$PUSHER_APP"
pusher_config="$OUT/pusher-apps.toml"
cat >"$pusher_config" <<TOML
[[apps]]
id = "$pusher_id"
key = "$pusher_key"
secret = "$pusher_secret"
client_events = true
TOML
sockudo_tmp="$OUT/sockudo"; mkdir -p "$sockudo_tmp"

# Scenario r's topics are streams: every publication keeps an offset and the
# history a reconnecting subscriber recovers from.
streams_config="$OUT/streams.toml"
cat >"$streams_config" <<'TOML'
[[rules]]
pattern = "*"
client_publish = true
presence = true
history_size = 1000
history_ttl_s = 300
TOML

server_pid=""; port=""; uws_pid=""
start_server() { # $1 = ringcast | ringcast-pusher | floor | axum | nchan | sockudo | uws; RINGCAST_ARGS: ringcast's own (default --shards $CORES)
  case "$1" in
    ringcast | ringcast-pusher | floor)
      local log="$OUT/$1.log" args="${RINGCAST_ARGS:---shards $CORES}"
      [ "$1" = ringcast-pusher ] && args="$args --config $pusher_config"
      if [ "$1" = floor ]; then
        # shellcheck disable=SC2086
        taskset -c "$server_cpus" "$FLOOR" 127.0.0.1:0 ${FLOOR_ARGS:-} >"$log" 2>&1 &
      else
        # shellcheck disable=SC2086
        taskset -c "$server_cpus" "$RINGCAST" --listen 127.0.0.1:0 $args >"$log" 2>&1 &
      fi
      server_pid=$!
      for _ in $(seq 100); do
        port="$(sed -n 's/^listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$log" | head -1)"
        [ -n "$port" ] && break; sleep 0.05
      done
      [ -n "$port" ] || { echo "$1 did not start; see $log" >&2; exit 1; }
      ;;
    uws)
      local log="$OUT/uws.log" up=""
      port="$(free_port)"
      taskset -c "$server_cpus" "$UWS_BIN" "$port" >"$log" 2>&1 &
      server_pid=$!; uws_pid=$server_pid
      for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && { up=1; break; }
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.05
      done
      [ -n "$up" ] || { echo "uws did not start on 127.0.0.1:$port; see $log" >&2; cat "$log" >&2; exit 1; }
      ;;
    sockudo)
      port="$(free_port)"
      TMPDIR="$sockudo_tmp" TOKIO_WORKER_THREADS="$CORES" "$here/peers/sockudo.sh" start "$port" >&2
      server_pid="$(cat "$sockudo_tmp/ringcast-sockudo.pid")"
      # -a: every thread; threads the runtime starts later inherit the mask.
      taskset -a -pc "$server_cpus" "$server_pid" >/dev/null
      ;;
    axum)
      port="$(free_port)"
      TMPDIR="$axum_tmp" CARGO_TARGET_DIR="$axum_target" TOKIO_WORKER_THREADS="$CORES" \
        "$shared/peers/axum-relay.sh" start "$port" >&2
      server_pid="$(cat "$axum_tmp/ringcast-axum-relay.pid")"
      # -a: every thread; threads the runtime starts later inherit the mask.
      taskset -a -pc "$server_cpus" "$server_pid" >/dev/null
      ;;
    nchan)
      port=8091
      "$shared/peers/nchan.sh" stop >/dev/null 2>&1 || true
      sleep 0.3
      "$shared/peers/nchan.sh" start "$port" "$CORES" >&2
      server_pid="$(cat "${TMPDIR:-/tmp}/ringcast-nchan/nginx.pid")"
      for p in $server_pid $(pgrep -P "$server_pid"); do taskset -pc "$server_cpus" "$p" >/dev/null; done
      ;;
  esac
}
stop_server() {
  case "$1" in
    ringcast | ringcast-pusher | floor) kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true ;;
    uws)
      if [ -n "$uws_pid" ]; then kill "$uws_pid" 2>/dev/null || true; wait "$uws_pid" 2>/dev/null || true; fi
      uws_pid=""
      ;;
    sockudo) TMPDIR="$sockudo_tmp" "$here/peers/sockudo.sh" stop >/dev/null 2>&1 || true ;;
    axum)
      TMPDIR="$axum_tmp" "$shared/peers/axum-relay.sh" stop >/dev/null 2>&1 || true
      for _ in $(seq 200); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.05; done
      ;;
    nchan)
      "$shared/peers/nchan.sh" stop >/dev/null 2>&1 || true
      # nginx drains thousands of connections before its master exits and
      # removes its pid file; starting the next one earlier races with it.
      for _ in $(seq 200); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.05; done
      ;;
  esac
  sleep 0.5
}
trap 'for s in $PEERS; do stop_server "$s"; done' EXIT

target_args() { # $1 = server
  case "$1" in
    ringcast | axum | uws | floor) echo "--host 127.0.0.1:$port" ;;
    ringcast-pusher | sockudo) echo "--host 127.0.0.1:$port --protocol pusher --pusher-app $PUSHER_APP" ;;
    nchan) echo "--sub-url ws://127.0.0.1:$port/sub/{topic} --pub-url http://127.0.0.1:$port/pub/{topic} --pub-body raw" ;;
  esac
}

run() { # $1 = server, $2 = scenario, rest = ringcast-load args; $round names the result
  local srv="$1" scn="$2"; shift 2
  start_server "$srv"
  echo "== $srv scenario $scn: $*" >&2
  # shellcheck disable=SC2046
  taskset -c "$client_cpus" "$LOAD" $(target_args "$srv") --server-pid "$server_pid" $server_cpus_arg \
    --threads "$client_threads" --recv-path "$RECV_PATH" --recv-batch-us "$RECV_BATCH_US" --procs "$PROCS" $perf_arg \
    --warmup "${warm:-$WARMUP}" --duration "${dur:-$DURATION}" --drain "$DRAIN" \
    --label "$srv/$scn" --json --quiet "$@" >"$OUT/$srv-$scn-$round.json" \
    || echo "   ($srv scenario $scn failed; see above)" >&2
  stop_server "$srv"
}

# Servers alternate within a round, so a slow minute of this shared machine
# hits every server of that round rather than one server's whole sample; and
# each round starts with the next server (round 2 with the second, ...), so
# none always runs first (on a cold machine) or last.
read -ra peer_list <<<"$PEERS"
for scn in $SCENARIOS; do
  [ -z "${REPORT_ONLY:-}" ] || break
  case "$scn" in c | d | r) rounds=1 ;; *) rounds="$ROUNDS" ;; esac
  for round in $(seq "$rounds"); do
   first=$(( (round - 1) % ${#peer_list[@]} ))
   for srv in "${peer_list[@]:first}" "${peer_list[@]:0:first}"; do
    case "$scn" in
      s1) run "$srv" s1 --subscribers "$N_S1" --topics 1 --rate "$RATE_S1" ;;
      s2) run "$srv" s2 --subscribers "$N_S2" --topics "$T_S2" --rate "$RATE_S2" ;;
      a) run "$srv" a --subscribers "$N_A" --topics 1 --rate "$RATE_A" ;;
      b) run "$srv" b --subscribers "$N_B" --topics "$T_B" --rate "$RATE_B" ;;
      c) [ "$srv" != floor ] || continue
         for n in "$(( N_C / 3 ))" "$N_C"; do
           name=c; [ "$n" = "$N_C" ] || name=c-third
           dur=2s warm=0s run "$srv" "$name" --subscribers "$n" --topics 100 --rate 0 \
             --source-ips "$SOURCE_IPS" --connect-rate 20000
         done ;;
      d) run "$srv" d --subscribers "$N_D" --topics "$T_D" --rate "$RATE_D_START" --find-ceiling \
           --ceiling-factor 1.5 --ceiling-p99-ms 50 ;;
      r)
        # Topic streams and `since` are ringcast's; the peers (uws included) have no recovery to measure.
        [ "$srv" = ringcast ] || continue
        # The storm needs room in the window after it for the recovery to show.
        dur_r="$(python3 -c "d='$DURATION'; s=float(d[:-2])/1e3 if d.endswith('ms') else float(d[:-1])*60 if d.endswith('m') else float(d.rstrip('s')); print(d if s >= 5 else '5s')")"
        dur="$dur_r" RINGCAST_ARGS="--shards $SHARDS_R --config $streams_config" run "$srv" r \
          --subscribers "$N_R" --topics "$T_R" --rate "$RATE_R" --storm-at "$STORM_AT_R" --recover ;;
      *) echo "unknown scenario $scn" >&2 ;;
    esac
   done
  done
done

python3 - "$OUT" "$PEERS" "$SCENARIOS" "$ROUNDS" "$cpu_note" "${notes[@]+"${notes[@]}"}" <<'PY'
import glob, json, os, statistics, sys
out, peers, scns, rounds_arg, cpu_note, notes = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4], sys.argv[5], sys.argv[6:]
desc = {"s1": "1 topic", "s2": "500 topics", "a": "broadcast", "b": "many topics", "c": "idle connections",
        "d": "throughput ceiling", "r": "reconnect storm"}
ringcast_only = {"r"}
not_run = {("floor", "c")}
def read_rounds(srv, scn):
    rows = []
    for name in sorted(glob.glob(os.path.join(out, f"{srv}-{scn}-*.json"))):
        try:
            with open(name) as f:
                rows.append(json.load(f))
        except Exception:
            pass
    return rows
def load_rounds(srv, scn):
    rows = read_rounds(srv, scn)
    if scn == "c":
        # The marginal cost of a connection: the slope of the connected RSS
        # between the run with a third of the connections and the full one.
        third = read_rounds(srv, "c-third")
        for r, t in zip(rows, third):
            try:
                dn = r["connections"]["ready"] - t["connections"]["ready"]
                dr = r["server_rss_connected_bytes"] - t["server_rss_connected_bytes"]
                if dn > 0:
                    r["marginal_rss_per_connection_bytes"] = dr / dn
            except (KeyError, TypeError):
                pass
    return rows
def load(srv, scn):
    rows = load_rounds(srv, scn)
    return rows[0] if rows else None
def median_of(rows, get):
    vals = []
    for r in rows:
        try: v = get(r)
        except Exception: v = None
        if isinstance(v, (int, float)): vals.append(v)
    return statistics.median(vals) if vals else None
def fmt(v, unit=""):
    if v is None: return "-"
    if isinstance(v, float) and abs(v) < 1: return f"{v:.3g}{unit}"
    if isinstance(v, float) and abs(v) < 100: return f"{v:.2f}{unit}"
    return f"{v:,.0f}{unit}"
metrics = [
    ("delivered msg/s", lambda r: r.get("delivered_per_s")),
    ("p50 ms", lambda r: r["latency_ms"]["p50"] if r["latency_ms"]["count"] else None),
    ("p99 ms", lambda r: r["latency_ms"]["p99"] if r["latency_ms"]["count"] else None),
    ("p99.9 ms", lambda r: r["latency_ms"]["p99_9"] if r["latency_ms"]["count"] else None),
    ("srv proc s/M", lambda r: r.get("server_cpu_s_per_million_deliveries")),
    ("srv core s/M", lambda r: r.get("server_core_busy_s_per_million_deliveries")),
    ("srv core* s/M", lambda r: r.get("server_core_busy_less_foreign_user_s_per_million_deliveries")),
    ("client s/M", lambda r: r.get("client_cpu_s_per_million_deliveries")),
    ("client recv s/M", lambda r: r.get("client_recv_cpu_s_per_million_deliveries")),
    ("syscalls/deliv", lambda r: r.get("server_syscalls_per_delivery")),
    ("ctxsw/deliv", lambda r: r.get("server_context_switches_per_delivery")),
    ("RSS B/conn", lambda r: r.get("server_rss_per_connection_bytes")),
    ("RSS B/conn marg", lambda r: r.get("marginal_rss_per_connection_bytes")),
    ("ceiling msg/s", lambda r: r.get("ceiling_rate")),
    ("missing", lambda r: r.get("missing")),
    ("stream missing", lambda r: r["streams"]["missing"]),
    ("stream dup/ooo", lambda r: r["streams"]["duplicated"] + r["streams"]["out_of_order"]),
    ("recovered deliv", lambda r: r["streams"]["recovered"]),
    ("recoveries ok", lambda r: r["streams"]["reconnect"]["recoveries_ok"]),
    ("recov. failed", lambda r: r["streams"]["reconnect"]["recoveries_failed"]),
    ("resub p50 ms", lambda r: r["streams"]["recovery_ms"]["subscribed"]["p50"]),
    ("resub p99 ms", lambda r: r["streams"]["recovery_ms"]["subscribed"]["p99"]),
    ("caught-up p99 ms", lambda r: r["streams"]["recovery_ms"]["caught_up"]["p99"]),
    ("storm all in s", lambda r: r["streams"]["storm"]["all_recovered_s"]),
]
ref = peers[0]
others = peers[1:]
rw = {o: max(18, len(ref) + len(o) + 3) for o in others}
hdr = f"{'scenario':<24} {'metric':<16}" + "".join(f"{p:>16}" for p in peers) + "".join(f"{ref+'/'+o:>{rw[o]}}" for o in others)
print(hdr); print("-" * len(hdr))
warn = []
for scn in scns:
    rounds = {p: load_rounds(p, scn) for p in peers}
    rs = {p: (rows[0] if rows else None) for p, rows in rounds.items()}
    first = next((r for r in rs.values() if r), None)
    size = ""
    if first:
        s = first["scenario"]; size = f"{s['subscribers']} subs/{s['topics']} t"
    label = f"({scn}) {desc.get(scn, scn)}"
    printed = 0
    for name, get in metrics:
        vals = {p: median_of(rows, get) for p, rows in rounds.items()}
        if all(v is None for v in vals.values()):
            continue
        if scn == "c" and name not in ("RSS B/conn", "RSS B/conn marg", "missing"): continue
        line = f"{(label if printed == 0 else (size if printed == 1 else '')):<24} {name:<16}"
        printed += 1
        line += "".join(f"{fmt(vals[p]):>16}" for p in peers)
        for o in others:
            a, b = vals[ref], vals[o]
            ratio = (a / b) if (isinstance(a, (int, float)) and isinstance(b, (int, float)) and b) else None
            line += f"{(f'{ratio:.2f}x' if ratio is not None else '-'):>{rw[o]}}"
        print(line)
    for p, rows in rounds.items():
        if not rows and ((scn in ringcast_only and p != "ringcast") or (p, scn) in not_run):
            continue
        if not rows:
            warn.append(f"{p} ({scn}): no result")
            continue
        for i, r in enumerate(rows, 1):
            tag = f"{p} ({scn}, round {i})" if len(rows) > 1 else f"{p} ({scn})"
            for w in r.get("warnings", []):
                warn.append(f"{tag}: {w}")
            if r.get("perf_note"):
                warn.append(f"{tag}: {r['perf_note']}")
            if r["connections"]["ready"] < r["connections"]["requested"]:
                warn.append(f"{tag}: only {r['connections']['ready']} of {r['connections']['requested']} subscribers connected")
    print()
print(f"each figure is the median over {rounds_arg} round(s) (servers alternating within a round); c, d and r ran once.")
print("ratio = " + ref + " / peer: above 1 is better for msg/s and ceiling, below 1 is better for latency, CPU, syscalls and RSS.")
print("srv proc = the server's own process CPU; srv core = busy time of the server's pinned cpus (its process plus the")
print("  loopback/softirq work it causes there, ksoftirqd included); srv core* = the same less other processes' user")
print("  time on those cpus (a shared machine's builds); client = all ringcast-load processes, client recv = its")
print("  subscriber side alone (handshakes and the receive path; the rest is publishing).")
first = next((r for p in peers for s in scns for r in [load(p, s)] if r), None)
if first:
    c = first["client"]
    print(f"client: receive path {c.get('recv_path')}, {c.get('procs')} process(es) x {c.get('threads')} thread(s)"
          + (f", batch window {c.get('recv_batch_us')} us" if c.get('recv_batch_us') else ""))
print("cores: " + cpu_note)
for n in notes: print("note: " + n)
for w in warn: print("warning: " + w)
PY
