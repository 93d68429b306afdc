#!/usr/bin/env bash
# Spillway benchmarks, one command on a fresh machine (Debian, Rust, Python 3):
# installs what is missing, builds, runs every benchmark, writes
# bench/results/*.json|csv|png and regenerates BENCHMARKS.md.
#
#   bench/run.sh            full run (~40 min on 2 cores, installs included)
#   bench/run.sh --quick    smoke test: 1 repeat, short runs
#   bench/run.sh --only overhead,selection,goodput,quota,global   (any subset; other bench.py options pass through)
#   bench/run.sh --only quota --quota-levels at --no-litellm   (quota-aware routing part, one level)
#
# Everything listens on 127.0.0.1 only; every load run is bounded in requests
# and time (see bench/bench.py).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OHA_VERSION=1.16.0
say() { echo "== bench: $*"; }
START=$(date +%s)

# oha is built with native-tls: it links OpenSSL through pkg-config.
if command -v apt-get >/dev/null 2>&1 && ! { command -v pkg-config >/dev/null && pkg-config --exists openssl; }; then
  say "installing pkg-config libssl-dev (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pkg-config libssl-dev >/dev/null
fi

# valgrind counts the instructions per request (deterministic attribution).
if ! command -v valgrind >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  say "installing valgrind (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi

say "project setup (wasm target, .venv with Envoy)"
bash scripts/setup.sh

if [ ! -x bench/.venv/bin/python ]; then
  python3 -m venv bench/.venv
fi
if ! bench/.venv/bin/python -c 'import litellm, matplotlib, httpx, yaml' 2>/dev/null; then
  say "installing Python deps into bench/.venv (litellm[proxy], matplotlib, httpx)"
  bench/.venv/bin/pip install --quiet --disable-pip-version-check -r bench/requirements.txt
fi

if [ "$(bench/.tools/bin/oha --version 2>/dev/null || true)" != "oha $OHA_VERSION" ]; then
  say "building oha $OHA_VERSION from crates.io (a few minutes)"
  cargo install oha --version "$OHA_VERSION" --locked --no-default-features --features native-tls \
    --root bench/.tools --quiet
fi

say "building (release)"
cargo build --locked --quiet --target wasm32-wasip1 --release --lib
cargo build --locked --quiet --target wasm32-wasip1 --release -p spillway-bench-trivial-filter \
  -p spillway-bench-hostcall-cost
cargo build --locked --quiet --release -p spillway-render
cargo build --locked --quiet --release -p spillway-mock -p spillway-bench-selection
cargo build --locked --quiet --release --manifest-path ratelimit/Cargo.toml --target-dir "${CARGO_TARGET_DIR:-$ROOT/target}"

# The filter before the performance work, measured in the same run for the
# before/after table (any commit: BENCH_BASELINE_REF=<rev>; empty to skip).
export BENCH_BASELINE_REF="${BENCH_BASELINE_REF-ad96f9b}"
if [ -n "$BENCH_BASELINE_REF" ] && git rev-parse --verify -q "$BENCH_BASELINE_REF^{commit}" >/dev/null; then
  say "building the baseline filter ($BENCH_BASELINE_REF)"
  rm -rf target/baseline/src && mkdir -p target/baseline/src
  git archive "$BENCH_BASELINE_REF" | tar -x -C target/baseline/src
  CARGO_TARGET_DIR="$ROOT/target/baseline/build" cargo build --locked --quiet --release --target wasm32-wasip1 \
    --lib --manifest-path target/baseline/src/Cargo.toml
  cp target/baseline/build/wasm32-wasip1/release/spillway.wasm target/baseline/spillway.wasm
elif [ -n "$BENCH_BASELINE_REF" ]; then
  say "baseline $BENCH_BASELINE_REF is not in this clone: no before/after columns"
  rm -f target/baseline/spillway.wasm
fi

BENCH_INSTALL_BUILD_SECONDS=$(( $(date +%s) - START ))
export BENCH_INSTALL_BUILD_SECONDS
say "installs and builds took ${BENCH_INSTALL_BUILD_SECONDS} s; running benchmarks"
bench/.venv/bin/python bench/bench.py "$@"
bench/.venv/bin/python bench/report.py
say "done in $(( $(date +%s) - START )) s: bench/results/ and BENCHMARKS.md"
