#!/usr/bin/env bash
# A/B in one run: alternates two server commands (binaries, or one binary
# with two configs) on one ringcast-load scenario, ROUNDS times each, server
# pinned to SERVER_CPUS (default cpu 0) and the client to CLIENT_CPUS
# (default cpu 1), and prints per side the medians of server CPU per
# million deliveries, core busy, syscalls and context switches per
# delivery, client CPU, p50/p99, and the ratios B/A. This machine is noisy:
# compare ratios from one run, never figures from two.
#
#   loadtest/ab.sh 5 1 before "/tmp/ringcast-old" after "target/release/ringcast" \
#       -- --subscribers 1000 --topics 1 --rate 200
#
# The server command gets `--listen 127.0.0.1:0 --shards SHARDS` appended.
# Env: LOAD (ringcast-load binary), OUT (result dir), WARMUP, DURATION;
# ARGS_A / ARGS_B: client arguments for one side only, to compare two
# client setups against one server (e.g. ARGS_B="--transport sse").
#
#   ARGS_B="--transport sse" loadtest/ab.sh 5 1 ws target/release/ringcast \
#       sse target/release/ringcast -- --subscribers 1000 --topics 1 --rate 200
set -euo pipefail
rounds=$1 shards=$2 la=$3 a=$4 lb=$5 b=$6; shift 7
LOAD=${LOAD:-$(dirname "$0")/../target/release/ringcast-load}
out=${OUT:-/tmp/ab2}; mkdir -p "$out"; rm -f "$out"/*.json
scpu=${SERVER_CPUS:-0}; ccpu=${CLIENT_CPUS:-1}
for r in $(seq "$rounds"); do
  for pair in "$la|$a|${ARGS_A:-}" "$lb|$b|${ARGS_B:-}"; do
    label=${pair%%|*}; rest=${pair#*|}; cmd=${rest%%|*}; extra=${rest#*|}
    taskset -c "$scpu" $cmd --listen 127.0.0.1:0 --shards "$shards" > "$out/server.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do port=$(sed -n 's/^listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$out/server.log"); [ -n "$port" ] && break; sleep 0.05; done
    taskset -c "$ccpu" "$LOAD" --host 127.0.0.1:$port --server-pid $pid --warmup ${WARMUP:-1s} --duration ${DURATION:-5s} --drain 1s --json --quiet "$@" $extra > "$out/$label-$r.json" 2> "$out/$label-$r.err" || echo "run $label $r failed: $(tail -2 $out/$label-$r.err)"
    kill $pid; wait $pid 2>/dev/null || true
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
fields=[("cpu s/M","server_cpu_s_per_million_deliveries"),("core s/M","server_core_busy_less_foreign_user_s_per_million_deliveries"),("sysc/dlv","server_syscalls_per_delivery"),("cs/dlv","server_context_switches_per_delivery"),("cli s/M","client_cpu_s_per_million_deliveries")]
res={}
for label in (la,lb):
    rows=load(label)
    bad=sum(r["missing"]+r["duplicates"]+r["out_of_order"] for r in rows)
    p50=st.median([r["latency_ms"]["p50"] for r in rows]); p99=st.median([r["latency_ms"]["p99"] for r in rows])
    res[label]=[med(rows,k) for _,k in fields]+[p50,p99]
    print(f"{label:10} n={len(rows)} deliv/s {med(rows,'delivered_per_s'):9.0f} "+" ".join(f"{n} {med(rows,k):.4g}" for n,k in fields)+f" p50 {p50:.3g} p99 {p99:.3g} bad {bad} sat {sum(r['client_saturated'] for r in rows)}")
print("ratio B/A: "+" ".join(f"{n} {res[lb][i]/res[la][i]:.2f}" for i,(n,_) in enumerate(fields+[('p50',0),('p99',0)]) if res[la][i]))
PY
