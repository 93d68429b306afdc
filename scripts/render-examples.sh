#!/usr/bin/env bash
# Re-renders the committed Envoy bootstrap(s) from their filter JSON, so they
# stay reproducible:
#   envoy/docker-compose.json -> envoy/docker-compose.envoy.yaml  (docker-compose.yml)
#
#   scripts/render-examples.sh           rewrite the committed YAML
#   scripts/render-examples.sh --check   exit 1 if a committed YAML is stale
#
# Paths are passed relative to the repo root: the renderer records its input
# path in the header comment, and the output must not depend on where the
# checkout lives. tests/integration/test_shipping.py renders the same way.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
RENDER="${CARGO_TARGET_DIR:-$ROOT/target}/release/spillway-render"

CHECK=0
case "${1:-}" in
  "") ;;
  --check) CHECK=1 ;;
  *) echo "usage: scripts/render-examples.sh [--check]" >&2; exit 2 ;;
esac

cargo build --quiet --release -p spillway-render

# input json | output yaml | renderer options
EXAMPLES=(
  "envoy/docker-compose.json|envoy/docker-compose.envoy.yaml|--wasm /etc/envoy/spillway.wasm --listen 0.0.0.0:10000 --admin 0.0.0.0:9901"
)

stale=0
for example in "${EXAMPLES[@]}"; do
  IFS='|' read -r input output options <<<"$example"
  # shellcheck disable=SC2086  # options are word-split on purpose
  fresh="$("$RENDER" "$input" $options; echo x)"
  fresh="${fresh%x}"
  if (( CHECK )); then
    if [[ "$(cat "$output"; echo x)" != "${fresh}x" ]]; then
      echo "stale: $output (run scripts/render-examples.sh)" >&2
      stale=1
    else
      echo "up to date: $output"
    fi
  else
    printf '%s' "$fresh" >"$output"
    echo "rendered $input -> $output"
  fi
done
exit "$stale"
