#!/usr/bin/env bash
# Re-renders istio/example-manifests.yaml from istio/example-filter.json.
#   istio/render-example.sh           rewrite the committed manifests
#   istio/render-example.sh --check   exit 1 if they are stale (tests/integration/test_istio.py)
# SPILLWAY_RENDER=path/to/spillway-render skips the cargo build.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
if [ -z "${SPILLWAY_RENDER:-}" ]; then
  cargo build --quiet --release -p spillway-render
  SPILLWAY_RENDER="${CARGO_TARGET_DIR:-$ROOT/target}/release/spillway-render"
fi
OUT=istio/example-manifests.yaml
# The sha256 is a placeholder: use `sha256sum spillway.wasm` of the file you publish.
fresh="$("$SPILLWAY_RENDER" istio/example-filter.json --istio \
  --namespace istio-ingress \
  --workload-selector app=gateway \
  --wasm-url https://downloads.example.com/spillway/0.1.0/spillway.wasm \
  --wasm-sha256 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef \
  --gateway istio-ingress/gateway \
  --host openai.example.com; echo x)"
fresh="${fresh%x}"
case "${1:-}" in
  "") printf '%s' "$fresh" >"$OUT"; echo "rendered $OUT" ;;
  --check)
    if [[ "$(cat "$OUT"; echo x)" != "${fresh}x" ]]; then
      echo "stale: $OUT (run istio/render-example.sh)" >&2; exit 1
    fi
    echo "up to date: $OUT" ;;
  *) echo "usage: istio/render-example.sh [--check]" >&2; exit 2 ;;
esac
