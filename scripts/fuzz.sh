#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS_PER_TARGET seconds (default 60)
# and fails if any of them finds a crash, a panic or a hang.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
#
# Targets are the [[bin]] entries of fuzz/Cargo.toml; a file in
# fuzz/fuzz_targets/ without one is an error, so a new target cannot be
# skipped silently. Each run starts from the committed seeds in
# fuzz/corpus/<target>/ but writes what it discovers to a temporary corpus,
# so the committed one never changes. Crashing inputs land in
# fuzz/artifacts/<target>/ (ignored by git); replay one with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
case $seconds in
  '' | *[!0-9]*) echo "usage: $0 [SECONDS_PER_TARGET]" >&2; exit 2 ;;
esac

# cargo-fuzz builds with sanitizer flags only nightly accepts.
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz.sh: needs a nightly toolchain (rustup toolchain list shows none)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

# `cargo fuzz list` reads the [[bin]] names from fuzz/Cargo.toml.
mapfile -t targets < <(cargo +nightly fuzz list)
for file in fuzz/fuzz_targets/*.rs; do
  name=$(basename "$file" .rs)
  if ! printf '%s\n' "${targets[@]}" | grep -qx "$name"; then
    echo "fuzz.sh: $file has no [[bin]] named \"$name\" in fuzz/Cargo.toml" >&2
    exit 1
  fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
for target in "${targets[@]}"; do
  echo "== $target: ${seconds}s"
  mkdir -p "$work/$target"
  seeds=()
  if [ -d "fuzz/corpus/$target" ]; then
    seeds=("fuzz/corpus/$target")
  fi
  # A target's dictionary (fuzz/dict/<target>.dict) gives libFuzzer the
  # tokens its input is made of: route prefixes and suffixes, headers.
  dict=()
  if [ -f "fuzz/dict/$target.dict" ]; then
    dict=("-dict=fuzz/dict/$target.dict")
  fi
  # The first corpus directory receives new inputs: the temporary one.
  # -timeout: an input that runs 10 s is a hang, reported like a crash.
  if ! cargo +nightly fuzz run "$target" "$work/$target" "${seeds[@]}" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 "${dict[@]}"; then
    failed+=("$target")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz.sh: ${#targets[@]} targets ran ${seconds}s each without a crash"
