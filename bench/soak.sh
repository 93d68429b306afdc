#!/usr/bin/env bash
# Spillway soak test (not part of CI): REQUESTS (default 1,000,000) of every
# kind through one Envoy (--concurrency 2) with Spillway and three mock
# backends (quota 429s, injected 5xx / resets / cut answers, clients that hang
# up), sampling Envoy's RSS, Spillway's VM memory and shared-data key gauges
# and the wasm VM stats; at the end it asserts no VM failure or reload, flat
# memory after warm-up and token accounting equal to the mocks' bills.
# Writes bench/results/soak.json|csv|png and the "Soak" section of BENCHMARKS.md;
# exits 1 when a check fails.
#
#   bench/soak.sh                 one million requests (~15-30 min on 2 cores, depending on
#                                 what else the machine runs)
#   bench/soak.sh 20000           quick check (~1 min)
#   bench/soak.sh 20000 --no-build --procs 2 --concurrency 96 --rate 0 --keep
#                                 (options after REQUESTS go to bench/soak.py; see --help)
#
# Everything listens on 127.0.0.1 only; the load phase is bounded by
# --max-seconds (default 2700) and every request by a 30 s timeout.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
say() { echo "== soak: $*"; }

BUILD=1
ARGS=()
for a in "$@"; do
  if [ "$a" = "--no-build" ]; then BUILD=0; else ARGS+=("$a"); fi
done

say "project setup (wasm target, .venv with Envoy)"
bash scripts/setup.sh >/dev/null
if [ ! -x bench/.venv/bin/python ]; then
  python3 -m venv bench/.venv
fi
if ! bench/.venv/bin/python -c 'import matplotlib, httpx, uvloop' 2>/dev/null; then
  say "installing Python deps into bench/.venv"
  bench/.venv/bin/pip install --quiet --disable-pip-version-check -r bench/requirements.txt
fi

if [ "$BUILD" = 1 ]; then
  say "building (release): spillway.wasm, spillway-render, spillway-mock"
  cargo build --locked --quiet --target wasm32-wasip1 --release --lib
  cargo build --locked --quiet --release -p spillway-render -p spillway-mock
fi

export SOAK_COMMAND="bench/soak.sh${*:+ $*}"
exec bench/.venv/bin/python bench/soak.py "${ARGS[@]}"
