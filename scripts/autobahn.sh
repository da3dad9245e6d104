#!/usr/bin/env bash
# Autobahn Testsuite conformance run: builds the release binary, starts
# ringcast on a free loopback port with scripts/autobahn/ringcast.toml, runs
# the testsuite's fuzzingclient (every case: 1-11, and 12-13, permessage-deflate,
# which the config turns on) against ws://127.0.0.1:PORT/echo, and fails
# on any FAILED case or on a NON-STRICT / INFORMATIONAL / UNIMPLEMENTED case
# not listed in scripts/autobahn/expected-nonstrict.txt.
#
#   ./scripts/autobahn.sh
#
# The testsuite (pip autobahntestsuite 0.8.2, pinned with its dependencies in
# scripts/autobahn/requirements.txt) runs only on Python 2.7; it is installed
# into a virtualenv under ${XDG_CACHE_HOME:-$HOME/.cache}/ringcast-autobahn
# from pyenv's 2.7.18 and reused while the pins are unchanged. Environment:
#   PYTHON27                   a Python 2.7 interpreter (default: pyenv's 2.7.18)
#   AUTOBAHN_CACHE             where the virtualenvs live
#   AUTOBAHN_KEEP_REPORT=1     keep the report directory (kept anyway on failure)
#   AUTOBAHN_TIMEOUT_SECONDS   whole-testsuite timeout (default 1800)
set -euo pipefail
cd "$(dirname "$0")/.."
start_seconds=$SECONDS

here=scripts/autobahn
cache=${AUTOBAHN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ringcast-autobahn}
# Newest virtualenv that still creates Python 2.7 environments (20.22 dropped them).
virtualenv_pin='virtualenv==20.21.1'

work=$(mktemp -d "${TMPDIR:-/tmp}/ringcast-autobahn.XXXXXX")
server_pid=
status=1
finish() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [ "$status" -eq 0 ] && [ "${AUTOBAHN_KEEP_REPORT:-0}" != 1 ]; then
    rm -rf "$work"
  else
    echo "autobahn: report and logs kept in $work"
  fi
  echo "autobahn: total time $((SECONDS - start_seconds)) s"
}
trap finish EXIT

find_python27() {
  if [ -n "${PYTHON27:-}" ]; then
    echo "$PYTHON27"
    return
  fi
  local root
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for candidate in "$root/versions/2.7.18/bin/python" "$(command -v python2.7 || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
      echo "$candidate"
      return
    fi
  done
  echo "autobahn: no Python 2.7 found; set PYTHON27 (pyenv install 2.7.18)" >&2
  exit 1
}

# Creates (or reuses) the Python 2.7 virtualenv with the pinned testsuite.
# The stamp records what it was built from, so a changed pin rebuilds it.
install_testsuite() {
  local python27 stamp env
  python27=$(find_python27)
  "$python27" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' || {
    echo "autobahn: $python27 is not Python 2.7" >&2
    exit 1
  }
  stamp=$( (echo "$virtualenv_pin"; "$python27" -V 2>&1; cat "$here/requirements.txt") | sha256sum | cut -c1-16)
  env="$cache/py27-$stamp"
  mkdir -p "$cache"
  # Two runs on one machine must not build the same environment at once.
  exec 9>"$cache/.lock"
  flock 9
  if [ ! -f "$env/.complete" ]; then
    echo "autobahn: installing the testsuite into $env"
    rm -rf "$env" "$cache/virtualenv-tool"
    python3 -m venv "$cache/virtualenv-tool"
    "$cache/virtualenv-tool/bin/pip" install --quiet --disable-pip-version-check "$virtualenv_pin"
    "$cache/virtualenv-tool/bin/virtualenv" --quiet --python "$python27" "$env"
    PYTHONWARNINGS=ignore "$env/bin/pip" install --quiet --disable-pip-version-check \
      --no-python-version-warning -r "$here/requirements.txt"
    PYTHONWARNINGS=ignore "$env/bin/pip" check --disable-pip-version-check --no-python-version-warning
    touch "$env/.complete"
  fi
  flock -u 9
  exec 9>&-
  wstest="$env/bin/wstest"
}

install_testsuite

cargo build --release -p ringcast --quiet
# Honour a custom target directory, as cargo does.
bin="${CARGO_TARGET_DIR:-target}/release/ringcast"

"$bin" --listen 127.0.0.1:0 --shards 2 --config "$here/ringcast.toml" \
  >"$work/server.out" 2>"$work/server.err" &
server_pid=$!
addr=
for _ in $(seq 100); do
  addr=$(sed -n '1s/^listening on //p' "$work/server.out")
  [ -n "$addr" ] && break
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$addr" ]; then
  echo "autobahn: ringcast did not start:" >&2
  cat "$work/server.err" >&2
  exit 1
fi
echo "autobahn: ringcast on $addr (pid $server_pid)"

python3 - "$here/fuzzingclient.json" "$work/fuzzingclient.json" "ws://$addr/echo" "$work/report" <<'EOF'
import json, sys
spec = json.load(open(sys.argv[1]))
spec["servers"][0]["url"] = sys.argv[3]
spec["outdir"] = sys.argv[4]
json.dump(spec, open(sys.argv[2], "w"), indent=2)
EOF

echo "autobahn: running the fuzzingclient (log: $work/wstest.log)"
testsuite_start=$SECONDS
if ! (cd "$work" && timeout "${AUTOBAHN_TIMEOUT_SECONDS:-1800}" \
  "$wstest" --mode fuzzingclient --spec "$work/fuzzingclient.json") >"$work/wstest.log" 2>&1; then
  echo "autobahn: the fuzzingclient failed:" >&2
  tail -n 30 "$work/wstest.log" >&2
  exit 1
fi
echo "autobahn: testsuite took $((SECONDS - testsuite_start)) s"

if ! kill -0 "$server_pid" 2>/dev/null; then
  echo "autobahn: ringcast exited during the run:" >&2
  tail -n 30 "$work/server.err" >&2
  exit 1
fi

python3 "$here/check_report.py" "$work/report" "$here/expected-nonstrict.txt"
status=0
