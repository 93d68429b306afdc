#!/usr/bin/env bash
# The one test command: installs what is missing, builds the filter (wasm),
# the renderer and the mock backends, then runs every test:
# native unit tests, clippy (panics denied in filter code), and the
# integration suite against real Envoy processes.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

echo "== build"
cargo build --locked --target wasm32-wasip1 --release --lib
cargo build --locked --release --bin spillway-render -p spillway
cargo build --locked --release -p spillway-mock

echo "== clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo clippy --locked --target wasm32-wasip1 --release --lib -- -D warnings

echo "== unit tests"
cargo test --locked --workspace

echo "== integration tests (real Envoy $("$ROOT/.venv/bin/envoy" --version | grep -o '[0-9]*\.[0-9]*\.[0-9]*' | head -1))"
"$ROOT/.venv/bin/python" -m pytest tests/integration -q -p no:cacheprovider "$@"
