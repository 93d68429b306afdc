#!/usr/bin/env bash
# The one test command: installs what is missing, builds the filter (wasm),
# the renderer and the mock backends, then runs every test:
# formatting (rustfmt), clippy (panics denied in filter code), native unit
# tests, a short fuzzing pass (scripts/fuzz.sh), and the integration suite
# against real Envoy processes.
#
#   scripts/test.sh [PYTEST ARGS]                  integration suite on the pinned Envoy (1.40.0)
#   scripts/test.sh --envoy-matrix [PYTEST ARGS]   ... on every Envoy in ENVOY_MATRIX instead,
#       each installed into .venv-envoy/<version>/: tests/integration/test_envoy_versions.py
#       checks what docs/envoy-versions.md says about that version, then the whole suite runs;
#       it must pass from MATRIX_FULL_FROM on and is reported (not required) below it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

ENVOY_MATRIX=(${SPILLWAY_ENVOY_MATRIX_VERSIONS:-1.36.4 1.37.0 1.38.2 1.38.3 1.39.0 1.39.3 1.40.0})
MATRIX_FULL_FROM=1.39.0
MATRIX=0
if [ "${1:-}" = "--envoy-matrix" ]; then
  MATRIX=1
  shift
fi

bash scripts/setup.sh
if (( MATRIX )); then
  bash scripts/setup.sh --extra-envoy "${ENVOY_MATRIX[@]}"
fi

echo "== build"
cargo build --locked --target wasm32-wasip1 --release --lib
cargo build --locked --release -p spillway-render
cargo build --locked --release -p spillway-mock
# The rate-limit service is its own workspace (see ratelimit/Cargo.toml),
# built into the same target directory; its first build compiles RocksDB.
RATELIMIT_CARGO=(--manifest-path ratelimit/Cargo.toml --target-dir "${CARGO_TARGET_DIR:-$ROOT/target}")
cargo build --locked --release "${RATELIMIT_CARGO[@]}"

echo "== format"
cargo fmt --all --check
cargo fmt --manifest-path ratelimit/Cargo.toml --check

echo "== clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo clippy --locked --target wasm32-wasip1 --release --lib -- -D warnings
cargo clippy --locked --release "${RATELIMIT_CARGO[@]}" --all-targets -- -D warnings

echo "== unit tests"
cargo test --locked --workspace
cargo test --locked --release "${RATELIMIT_CARGO[@]}"

# A short fuzzing pass from the committed seeds (fuzz/corpus): any crash fails
# the run. SPILLWAY_FUZZ_SECONDS sets the time per target; 0 skips it.
FUZZ_SECONDS="${SPILLWAY_FUZZ_SECONDS:-15}"
if (( FUZZ_SECONDS > 0 )); then
  echo "== fuzz (${FUZZ_SECONDS} s per target)"
  bash scripts/fuzz.sh "$FUZZ_SECONDS"
fi

if (( ! MATRIX )); then
  echo "== integration tests (real Envoy $("$ROOT/.venv/bin/envoy" --version | grep -o '[0-9]*\.[0-9]*\.[0-9]*' | head -1))"
  "$ROOT/.venv/bin/python" -m pytest tests/integration -q -p no:cacheprovider "$@"
  exit 0
fi

failed=0
summary=()
for v in "${ENVOY_MATRIX[@]}"; do
  export SPILLWAY_ENVOY="$ROOT/.venv-envoy/$v/envoy/_bin/envoy" SPILLWAY_ENVOY_MATRIX=1
  echo "== Envoy $v: version checks"
  if "$ROOT/.venv/bin/python" -m pytest tests/integration/test_envoy_versions.py -q -p no:cacheprovider -rs "$@"; then
    checks=ok
  else
    checks=FAILED
    failed=1
  fi
  if [ "$(printf '%s\n%s\n' "$MATRIX_FULL_FROM" "$v" | sort -V | head -1)" = "$MATRIX_FULL_FROM" ]; then
    echo "== Envoy $v: integration suite (must pass)"
    if "$ROOT/.venv/bin/python" -m pytest tests/integration -q -p no:cacheprovider "$@"; then
      suite=passed
    else
      suite=FAILED
      failed=1
    fi
  else
    echo "== Envoy $v: integration suite (below $MATRIX_FULL_FROM: reported, not required)"
    suite="$("$ROOT/.venv/bin/python" -m pytest tests/integration -q -p no:cacheprovider --tb=no "$@" 2>&1 | tail -1)" || true
    echo "$suite"
  fi
  summary+=("Envoy $v | version checks: $checks | suite: $suite")
done
echo "== Envoy matrix"
printf '%s\n' "${summary[@]}"
exit "$failed"
