#!/usr/bin/env bash
# A/B across nodes in one run: like ab.sh, but each side is two nodes of
# the same build joined through one Redis. ringcast-load's subscribers sit
# on node A, its publishes go to node B, so every delivery crosses Redis.
# Alternates the two builds ROUNDS times; node A is pinned to SERVER_CPUS
# (default cpu 0), node B, Redis and the client share CLIENT_CPUS (cpu 1).
# Prints per side the medians of node A's CPU per million deliveries, core
# busy, p50/p99, and the ratios B/A.
#
#   loadtest/ab-cluster.sh 3 1 before /tmp/ringcast-old after target/release/ringcast \
#       -- --subscribers 1000 --topics 1 --rate 200
#
# Needs `redis-server` (7 or newer) on PATH. Env: LOAD (ringcast-load
# binary), OUT (result dir), WARMUP, DURATION, REDIS_PORT (default 6391),
# CONFIG_A / CONFIG_B (TOML appended to both nodes' files of the first /
# second side, after `[cluster]`: e.g. a `[webhooks]` table).
set -euo pipefail
rounds=$1 shards=$2 la=$3 a=$4 lb=$5 b=$6; shift 7
LOAD=${LOAD:-$(dirname "$0")/../target/release/ringcast-load}
out=${OUT:-/tmp/ab-cluster}; mkdir -p "$out"; rm -f "$out"/*.json
scpu=${SERVER_CPUS:-0}; ccpu=${CLIENT_CPUS:-1}
redis_port=${REDIS_PORT:-6391}
taskset -c "$ccpu" redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$out" > "$out/redis.log" 2>&1 &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done

# Starts `cmd` as node `name` and prints its port once it reports ok.
start_node() {
  local cmd=$1 name=$2 cpu=$3 extra=$4 log="$out/$2.log"
  printf '[cluster]\nredis_url = "redis://127.0.0.1:%s"\nnode_name = "%s"\nprefix = "ab"\n%s\n' \
    "$redis_port" "$name" "$extra" > "$out/$name.toml"
  taskset -c "$cpu" $cmd --listen 127.0.0.1:0 --shards "$shards" --config "$out/$name.toml" > "$log" 2>&1 &
  echo $! > "$out/$name.pid"
  local port=""
  for _ in $(seq 100); do
    port=$(sed -n 's/^listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$log")
    [ -n "$port" ] && curl -s "http://127.0.0.1:$port/health" | grep -q '"status":"ok"' && break
    sleep 0.1
  done
  echo "$port"
}

for r in $(seq "$rounds"); do
  for pair in "$la|$a" "$lb|$b"; do
    label=${pair%%|*}; cmd=${pair#*|}
    if [ "$label" = "$la" ]; then extra=${CONFIG_A:-}; else extra=${CONFIG_B:-}; fi
    redis-cli -p "$redis_port" flushall >/dev/null
    port_a=$(start_node "$cmd" a "$scpu" "$extra")
    port_b=$(start_node "$cmd" b "$ccpu" "$extra")
    taskset -c "$ccpu" "$LOAD" --host 127.0.0.1:$port_a --pub-url "http://127.0.0.1:$port_b/publish" \
      --server-pid "$(cat "$out/a.pid")" --warmup ${WARMUP:-2s} --duration ${DURATION:-6s} --drain 1s \
      --json --quiet "$@" > "$out/$label-$r.json" 2> "$out/$label-$r.err" \
      || echo "run $label $r failed: $(tail -2 "$out/$label-$r.err")"
    for node in a b; do kill "$(cat "$out/$node.pid")"; wait "$(cat "$out/$node.pid")" 2>/dev/null || true; done
    sleep 0.3
  done
done
python3 - "$out" "$la" "$lb" "$rounds" <<'PY'
import json,sys,statistics as st
out,la,lb,rounds=sys.argv[1],sys.argv[2],sys.argv[3],int(sys.argv[4])
def load(label):
    rows=[]
    for r in range(1,rounds+1):
        try: rows.append(json.load(open(f"{out}/{label}-{r}.json")))
        except Exception: pass
    return rows
def med(rows,k):
    v=[r[k] for r in rows if r.get(k) is not None]
    return st.median(v) if v else float('nan')
def spread(rows,k):
    v=[r[k] for r in rows if r.get(k) is not None]
    return f"{min(v):.3g}-{max(v):.3g}" if v else "-"
fields=[("A cpu s/M","server_cpu_s_per_million_deliveries"),("A core s/M","server_core_busy_less_foreign_user_s_per_million_deliveries")]
res={}
for label in (la,lb):
    rows=load(label)
    bad=sum(r["missing"]+r["duplicates"]+r["out_of_order"] for r in rows)
    p50=st.median([r["latency_ms"]["p50"] for r in rows]); p99=st.median([r["latency_ms"]["p99"] for r in rows])
    p99s=[r["latency_ms"]["p99"] for r in rows]
    res[label]=[med(rows,k) for _,k in fields]+[p50,p99]
    print(f"{label:10} n={len(rows)} deliv/s {med(rows,'delivered_per_s'):9.0f} "+" ".join(f"{n} {med(rows,k):.4g} ({spread(rows,k)})" for n,k in fields)+f" p50 {p50:.3g} p99 {p99:.3g} ({min(p99s):.3g}-{max(p99s):.3g}) lost/dup/ooo {bad}")
print("ratio B/A: "+" ".join(f"{n} {res[lb][i]/res[la][i]:.2f}" for i,(n,_) in enumerate(fields+[('p50',0),('p99',0)]) if res[la][i]))
PY
