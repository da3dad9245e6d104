#!/usr/bin/env bash
# Three ringcast nodes joined through one Redis, on this machine, to try the
# cluster by hand: Redis on 127.0.0.1:6390 (its own directory, nothing saved)
# and release builds of nodes a, b, c on 127.0.0.1:8001-8003, two shards each.
# Enter stops Redis and starts it again (watch the nodes degrade and recover);
# Ctrl-C stops everything and removes the files.
#
#   ./scripts/cluster.sh
#   RUST_LOG=ringcast=debug ./scripts/cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."

redis_port=6390
first_port=8001
shards=2
names=(a b c)

die() { echo "cluster.sh: $*" >&2; exit 1; }

# True if something accepts connections on 127.0.0.1:$1.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# True if Redis answers PING (inline command, no redis-cli needed).
redis_pong() {
  (
    exec 3<>"/dev/tcp/127.0.0.1/$redis_port"
    printf 'PING\r\n' >&3
    IFS= read -r -t 2 reply <&3
    [[ $reply == $'+PONG\r' ]]
  ) 2>/dev/null
}

# True if the node on port $1 answers GET /health with 200.
# A node is up when /health says "status":"ok": it answers 200 while
# degraded too (not reaching Redis), and then it is not in the cluster yet.
healthy() {
  (
    exec 3<>"/dev/tcp/127.0.0.1/$1"
    printf 'GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3
    response=$(timeout 2 cat <&3)
    [[ $response == "HTTP/1.1 200"* && $response == *'"status":"ok"'* ]]
  ) 2>/dev/null
}

command -v redis-server >/dev/null || die "redis-server not found: apt-get install -y redis-server"
for port in "$redis_port" $(seq "$first_port" $((first_port + ${#names[@]} - 1))); do
  ! listening "$port" || die "port $port is already in use"
done

cargo build --release

work=$(mktemp -d "${TMPDIR:-/tmp}/ringcast-cluster.XXXXXX")
mkdir "$work/redis"
redis_pid=
node_pids=()

cleanup() {
  trap - EXIT INT TERM
  local pids=("${node_pids[@]}")
  [[ -z $redis_pid ]] || pids+=("$redis_pid")
  if ((${#pids[@]})); then
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  rm -rf "$work"
  echo "cluster.sh: stopped"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_redis() {
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize no --dir "$work/redis" --logfile "$work/redis/redis.log" \
    </dev/null >/dev/null 2>&1 &
  redis_pid=$!
  for _ in $(seq 100); do
    if redis_pong; then
      echo "redis: up on 127.0.0.1:$redis_port (pid $redis_pid)"
      return
    fi
    kill -0 "$redis_pid" 2>/dev/null || break
    sleep 0.1
  done
  tail -n 20 "$work/redis/redis.log" >&2 || true
  die "redis-server did not start"
}

stop_redis() {
  kill "$redis_pid" 2>/dev/null || true
  wait "$redis_pid" 2>/dev/null || true
  redis_pid=
  echo "redis: stopped (nodes go degraded; POST /publish answers 503)"
}

start_redis

for i in "${!names[@]}"; do
  name=${names[$i]}
  port=$((first_port + i))
  cat >"$work/$name.toml" <<EOF
[cluster]
redis_url = "redis://127.0.0.1:$redis_port"
node_name = "$name"
EOF
  # Each line of the node's output is tagged with its name. The tagger ignores
  # Ctrl-C so the node's last lines (the drain) still show.
  RUST_LOG=${RUST_LOG:-ringcast=info} ./target/release/ringcast \
    --listen "127.0.0.1:$port" --shards "$shards" --config "$work/$name.toml" \
    > >(trap '' INT; exec sed -u "s/^/[$name] /") 2>&1 &
  node_pids+=($!)
done

for i in "${!names[@]}"; do
  port=$((first_port + i))
  for _ in $(seq 100); do
    healthy "$port" && break
    kill -0 "${node_pids[$i]}" 2>/dev/null || die "node ${names[$i]} exited (its output is above)"
    sleep 0.1
  done
  healthy "$port" || die "node ${names[$i]} is not ok on port $port after 10 s (degraded: does it reach Redis?)"
done

cat <<EOF

Cluster up: Redis 127.0.0.1:$redis_port; nodes a 127.0.0.1:8001, b 127.0.0.1:8002,
c 127.0.0.1:8003 ($shards shards each). Configs and the Redis log: $work

Subscribe on two nodes (two terminals), then publish on a third:
  websocat ws://127.0.0.1:8001/ws      # type {"type":"subscribe","topic":"news"}
  websocat ws://127.0.0.1:8003/ws      # the same
  curl -s -X POST 127.0.0.1:8002/publish -H 'Content-Type: application/json' \\
       -d '{"topic":"news","payload":"hello from b"}'

A client publishes to a topic it holds:
  {"type":"message","topic":"news","event":"say","payload":"hi from a"}

Chat between users on different nodes:
  websocat 'ws://127.0.0.1:8001/chat?user_id=ann&recipient_id=ben'
  websocat 'ws://127.0.0.1:8002/chat?user_id=ben&recipient_id=ann'

State:
  curl -s 127.0.0.1:8001/health
  curl -s 127.0.0.1:8001/metrics | grep '^ringcast_cluster'

Enter: stop Redis / start it again (the nodes reconnect and resubscribe).
Ctrl-C: stop everything.

EOF

while IFS= read -r _; do
  if [[ -n $redis_pid ]]; then stop_redis; else start_redis; fi
done
# Standard input ended (not a terminal): run until Ctrl-C or a node exits.
wait -n "${node_pids[@]}"
