#!/usr/bin/env bash
# Spillway demo: three mock Azure OpenAI deployments behind Envoy + spillway.wasm.
#
#   scripts/demo.sh           set up, build, start everything, print how to call
#                             it, run until Ctrl-C / SIGTERM, then stop it all
#   scripts/demo.sh --check   same start-up, then one chat request through the
#                             gateway; exits 0 only if it got HTTP 200
#   scripts/demo.sh --watch   like the first, with a live view of the gateway
#                             (backends, states, requests, failovers, tokens/s)
#                             instead of the access log
#   scripts/demo.sh --global  two Envoy replicas sharing client limits through
#                             spillway-ratelimit and Redis (envoy/demo-global.json:
#                             client key demo-client-key, 10 requests per minute
#                             across both replicas); with --check, 12 requests
#                             spread over both must give exactly 10 answers
#
# eastus is quota-limited (3 requests per 20 s): once it has served 3, the next
# request sent to it gets a 429 and fails over to westus within the same request
# (response headers x-spillway-backend: westus, x-spillway-attempts: 2).
#
# Environment overrides (defaults in brackets):
#   SPILLWAY_DEMO_PORT [10000]          gateway listener on 127.0.0.1
#   SPILLWAY_DEMO_ADMIN_PORT [9901]     Envoy admin on 127.0.0.1
#   SPILLWAY_DEMO_EASTUS_PORT [18001]   mock ports; when any differs from
#   SPILLWAY_DEMO_WESTUS_PORT [18002]   envoy/demo.json, a copy of it with the
#   SPILLWAY_DEMO_PAYGO_PORT [18003]    ports substituted is rendered instead
#   SPILLWAY_DEMO_PORT2 [10001]         --global: the second replica's listener
#   SPILLWAY_DEMO_ADMIN_PORT2 [9902]    --global: its admin
#   SPILLWAY_DEMO_RATELIMIT_PORT [18081] --global: spillway-ratelimit
#   SPILLWAY_DEMO_REDIS_PORT [16379]    --global: redis-server
#   SPILLWAY_DEMO_RUN_DIR [.run/demo]   rendered config and logs
#   CARGO_TARGET_DIR [target]
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

usage() { sed -n '2,/^[^#]/p' "$0" | sed -n 's/^# \{0,1\}//p'; }

CHECK=0
WATCH=0
GLOBAL=0
for arg in "$@"; do
  case "$arg" in
    --check) CHECK=1 ;;
    --watch) WATCH=1 ;;
    --global) GLOBAL=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "demo.sh: unknown argument $arg" >&2; usage >&2; exit 2 ;;
  esac
done

PORT="${SPILLWAY_DEMO_PORT:-10000}"
ADMIN_PORT="${SPILLWAY_DEMO_ADMIN_PORT:-9901}"
EASTUS_PORT="${SPILLWAY_DEMO_EASTUS_PORT:-18001}"
WESTUS_PORT="${SPILLWAY_DEMO_WESTUS_PORT:-18002}"
PAYGO_PORT="${SPILLWAY_DEMO_PAYGO_PORT:-18003}"
PORT2="${SPILLWAY_DEMO_PORT2:-10001}"
ADMIN_PORT2="${SPILLWAY_DEMO_ADMIN_PORT2:-9902}"
RATELIMIT_PORT="${SPILLWAY_DEMO_RATELIMIT_PORT:-18081}"
REDIS_PORT="${SPILLWAY_DEMO_REDIS_PORT:-16379}"
RUN_DIR="${SPILLWAY_DEMO_RUN_DIR:-$ROOT/.run/demo}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
WASM="$TARGET/wasm32-wasip1/release/spillway.wasm"
RENDER="$TARGET/release/spillway-render"
MOCK="$TARGET/release/spillway-mock"
RATELIMIT="$TARGET/release/spillway-ratelimit"
ENVOY="${SPILLWAY_ENVOY:-$ROOT/.venv/bin/envoy}"
PY="$ROOT/.venv/bin/python"

EASTUS_KEY=demo-key-eastus
WESTUS_KEY=demo-key-westus
PAYGO_KEY=demo-key-paygo
CHAT_PATH="/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'demo.sh: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- ports
declare -A SEEN=()
for spec in "SPILLWAY_DEMO_PORT=$PORT" "SPILLWAY_DEMO_ADMIN_PORT=$ADMIN_PORT" \
            "SPILLWAY_DEMO_EASTUS_PORT=$EASTUS_PORT" "SPILLWAY_DEMO_WESTUS_PORT=$WESTUS_PORT" \
            "SPILLWAY_DEMO_PAYGO_PORT=$PAYGO_PORT" \
            $( (( GLOBAL )) && echo "SPILLWAY_DEMO_PORT2=$PORT2 SPILLWAY_DEMO_ADMIN_PORT2=$ADMIN_PORT2 SPILLWAY_DEMO_RATELIMIT_PORT=$RATELIMIT_PORT SPILLWAY_DEMO_REDIS_PORT=$REDIS_PORT"); do
  name="${spec%%=*}" port="${spec#*=}"
  if ! [[ "$port" =~ ^[0-9]+$ ]] || (( port < 1 || port > 65535 )); then
    die "$name=$port is not a port number"
  fi
  [[ -z "${SEEN[$port]:-}" ]] || die "$name and ${SEEN[$port]} are both $port; pick distinct ports"
  SEEN[$port]="$name"
done

port_busy() {
  python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket()
# Like Envoy and the mocks: TIME_WAIT leftovers of a previous run do not count,
# a socket bound or listening there does.
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(0)  # busy
finally:
    s.close()
sys.exit(1)
EOF
}

check_ports() {
  local busy=()
  local specs=("gateway:SPILLWAY_DEMO_PORT:$PORT" "admin:SPILLWAY_DEMO_ADMIN_PORT:$ADMIN_PORT"
               "mock eastus:SPILLWAY_DEMO_EASTUS_PORT:$EASTUS_PORT"
               "mock westus:SPILLWAY_DEMO_WESTUS_PORT:$WESTUS_PORT"
               "mock paygo:SPILLWAY_DEMO_PAYGO_PORT:$PAYGO_PORT")
  if (( GLOBAL )); then
    specs+=("second gateway:SPILLWAY_DEMO_PORT2:$PORT2" "second admin:SPILLWAY_DEMO_ADMIN_PORT2:$ADMIN_PORT2"
            "spillway-ratelimit:SPILLWAY_DEMO_RATELIMIT_PORT:$RATELIMIT_PORT"
            "redis-server:SPILLWAY_DEMO_REDIS_PORT:$REDIS_PORT")
  fi
  for spec in "${specs[@]}"; do
    IFS=: read -r what var port <<<"$spec"
    if port_busy "$port"; then
      busy+=("  127.0.0.1:$port ($what) is already in use; stop whatever listens there or set $var")
    fi
  done
  if (( ${#busy[@]} )); then
    printf 'demo.sh: error: port busy:\n' >&2
    printf '%s\n' "${busy[@]}" >&2
    exit 1
  fi
}

# Fail fast, before the (possibly long) setup and build.
check_ports

# ---------------------------------------------------------------- processes
PIDS=()
TAIL_PID=""
# shellcheck disable=SC2317  # the trap handlers are invoked indirectly
cleanup() {
  local pid
  trap - EXIT
  trap '' INT TERM  # a second Ctrl-C must not cut the clean-up short
  if [[ -n "$TAIL_PID" ]]; then kill "$TAIL_PID" 2>/dev/null || true; fi
  if (( ${#PIDS[@]} )); then
    say "stopping ${#PIDS[@]} demo process(es)"
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do
      local alive=0
      for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
      (( alive )) || break
      sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  fi
}
# shellcheck disable=SC2317
on_exit() { local rc=$?; cleanup; exit "$rc"; }
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- setup + build
say "setting up (scripts/setup.sh)"
bash "$ROOT/scripts/setup.sh"
say "building spillway.wasm, spillway-render and spillway-mock (release)"
cargo build --quiet --target wasm32-wasip1 --release --lib || die "building spillway.wasm failed"
cargo build --quiet --release -p spillway-render || die "building spillway-render failed"
cargo build --quiet --release -p spillway-mock || die "building spillway-mock failed"
if (( GLOBAL )); then
  say "building spillway-ratelimit (release; the first build compiles its storage libraries, several minutes)"
  cargo build --quiet --release --manifest-path ratelimit/Cargo.toml --target-dir "$TARGET" \
    || die "building spillway-ratelimit failed"
  command -v redis-server >/dev/null 2>&1 || die "redis-server is missing (scripts/setup.sh installs Debian's redis-server)"
fi
for f in "$WASM" "$RENDER" "$MOCK" "$ENVOY" "$PY"; do
  [[ -x "$f" || -f "$f" ]] || die "missing $f after setup and build"
done

# The build may have taken a while; someone could have taken a port meanwhile.
check_ports

mkdir -p "$RUN_DIR"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"

# ---------------------------------------------------------------- mocks
start_mock() {  # name port key [extra args...]
  local name="$1" port="$2" key="$3"; shift 3
  local log="$RUN_DIR/mock-$name.log"
  : >"$log"
  "$MOCK" --name "$name" --listen "127.0.0.1:$port" --api-key "$key" "$@" >"$log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  for _ in $(seq 100); do
    if grep -q '^LISTENING ' "$log"; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      die "mock $name did not start on 127.0.0.1:$port (port busy?); its output:
$(cat "$log")"
    fi
    sleep 0.1
  done
  die "mock $name did not report LISTENING within 10 s; see $log"
}

say "starting mocks: eastus :$EASTUS_PORT (3 requests / 20 s), westus :$WESTUS_PORT, paygo :$PAYGO_PORT"
start_mock eastus "$EASTUS_PORT" "$EASTUS_KEY" --requests-per-window 3 --window-ms 20000
start_mock westus "$WESTUS_PORT" "$WESTUS_KEY"
start_mock paygo "$PAYGO_PORT" "$PAYGO_KEY"

# ---------------------------------------------------------------- redis + rate-limit service (--global)
wait_port() {  # port what pid
  for _ in $(seq 100); do
    if ! kill -0 "$3" 2>/dev/null; then die "$2 exited during start-up; see $RUN_DIR"; fi
    if "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=1).close()" "$1" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  die "$2 did not listen on 127.0.0.1:$1 within 10 s; see $RUN_DIR"
}
if (( GLOBAL )); then
  say "starting redis-server :$REDIS_PORT and spillway-ratelimit :$RATELIMIT_PORT"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$RUN_DIR/redis.log" 2>&1 &
  PIDS+=("$!")
  wait_port "$REDIS_PORT" redis-server "$!"
  "$RATELIMIT" --listen "127.0.0.1:$RATELIMIT_PORT" --redis "redis://127.0.0.1:$REDIS_PORT" \
    >"$RUN_DIR/ratelimit.log" 2>&1 &
  PIDS+=("$!")
  wait_port "$RATELIMIT_PORT" spillway-ratelimit "$!"
fi

# ---------------------------------------------------------------- render
DEMO_JSON="$ROOT/envoy/demo.json"
(( GLOBAL )) && DEMO_JSON="$ROOT/envoy/demo-global.json"
FILTER_JSON="$DEMO_JSON"
if [[ "$EASTUS_PORT:$WESTUS_PORT:$PAYGO_PORT:$RATELIMIT_PORT" != "18001:18002:18003:18081" ]]; then
  FILTER_JSON="$RUN_DIR/$(basename "$DEMO_JSON")"
  sed -e "s#127\.0\.0\.1:18001\"#127.0.0.1:$EASTUS_PORT\"#" \
      -e "s#127\.0\.0\.1:18002\"#127.0.0.1:$WESTUS_PORT\"#" \
      -e "s#127\.0\.0\.1:18003\"#127.0.0.1:$PAYGO_PORT\"#" \
      -e "s#127\.0\.0\.1:18081\"#127.0.0.1:$RATELIMIT_PORT\"#" \
      "$DEMO_JSON" >"$FILTER_JSON"
fi
"$RENDER" "$FILTER_JSON" --wasm "$WASM" --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$ADMIN_PORT" \
  --output "$RUN_DIR/envoy.yaml" || die "spillway-render failed for $FILTER_JSON"
if (( GLOBAL )); then
  "$RENDER" "$FILTER_JSON" --wasm "$WASM" --listen "127.0.0.1:$PORT2" --admin "127.0.0.1:$ADMIN_PORT2" \
    --output "$RUN_DIR/envoy2.yaml" || die "spillway-render failed for $FILTER_JSON"
fi

# ---------------------------------------------------------------- envoy
start_envoy() {  # config port admin_port name access_log -> sets ENVOY_PID
  local config="$1" port="$2" admin="$3" name="$4" access="$RUN_DIR/$5"
  local base_id=$(( (RANDOM * 32768 + RANDOM) % 10000000 + 1000 ))
  say "starting Envoy on 127.0.0.1:$port (admin 127.0.0.1:$admin)"
  : >"$access"
  EASTUS_KEY="$EASTUS_KEY" WESTUS_KEY="$WESTUS_KEY" PAYGO_KEY="$PAYGO_KEY" \
    "$ENVOY" -c "$config" --concurrency 2 --disable-hot-restart --base-id "$base_id" \
    -l info --log-path "$RUN_DIR/$name.log" --file-flush-interval-msec 200 \
    >"$access" 2>"$RUN_DIR/$name.stderr" &
  ENVOY_PID=$!
  PIDS+=("$ENVOY_PID")
  local ready=0
  for _ in $(seq 300); do  # 30 s
    if ! kill -0 "$ENVOY_PID" 2>/dev/null; then
      die "Envoy exited during start-up; log tail:
$(tail -n 30 "$RUN_DIR/$name.log" 2>/dev/null; tail -n 10 "$RUN_DIR/$name.stderr" 2>/dev/null)"
    fi
    if "$PY" - "$admin" "$port" <<'EOF' 2>/dev/null
import socket, sys, urllib.request
admin, port = sys.argv[1], int(sys.argv[2])
with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
    assert r.status == 200
socket.create_connection(("127.0.0.1", port), timeout=1).close()
EOF
    then ready=1; break; fi
    sleep 0.1
  done
  (( ready )) || die "Envoy not ready within 30 s; see $RUN_DIR/$name.log"
}

if (( GLOBAL )); then
  start_envoy "$RUN_DIR/envoy2.yaml" "$PORT2" "$ADMIN_PORT2" envoy2 access2.log
fi
start_envoy "$RUN_DIR/envoy.yaml" "$PORT" "$ADMIN_PORT" envoy access.log

GATEWAY="http://127.0.0.1:$PORT"

# ---------------------------------------------------------------- --check
if (( CHECK && GLOBAL )); then
  say "sending 12 requests as demo-team, alternating between $GATEWAY and http://127.0.0.1:$PORT2"
  set +e
  "$PY" - "$GATEWAY" "http://127.0.0.1:$PORT2" "$CHAT_PATH" <<'EOF'
import http.client, json, sys, urllib.parse
gateways, path = sys.argv[1:3], sys.argv[3]
body = json.dumps({"messages": [{"role": "user", "content": "Hello from demo.sh --global --check"}], "max_tokens": 20})
statuses = []
for i in range(12):
    u = urllib.parse.urlsplit(gateways[i % 2])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", path, body=body, headers={"content-type": "application/json", "api-key": "demo-client-key"})
    r = conn.getresponse()
    r.read()
    statuses.append(r.status)
    print(f"replica {i % 2 + 1}: {r.status}  x-ratelimit-remaining-requests: {r.getheader('x-ratelimit-remaining-requests')}")
served = statuses.count(200)
print(f"served: {served} of 12 (limit: 10 per minute across both replicas)")
sys.exit(0 if served == 10 and statuses[10:] == [429, 429] else 1)
EOF
  rc=$?
  set -e
  if (( rc == 0 )); then say "check passed"; else say "check FAILED (logs: $RUN_DIR)"; fi
  exit "$rc"
fi

if (( CHECK )); then
  say "sending one chat request through $GATEWAY"
  set +e
  "$PY" - "$GATEWAY" "$CHAT_PATH" <<'EOF'
import http.client, json, sys, urllib.parse
gateway, path = sys.argv[1], sys.argv[2]
u = urllib.parse.urlsplit(gateway)
conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
body = json.dumps({"messages": [{"role": "user", "content": "Hello from demo.sh --check"}]})
conn.request("POST", path, body=body, headers={"content-type": "application/json", "api-key": "anything"})
r = conn.getresponse()
data = r.read()
print(f"status: {r.status}")
print(f"x-spillway-backend: {r.getheader('x-spillway-backend')}")
print(f"x-spillway-attempts: {r.getheader('x-spillway-attempts')}")
if r.status != 200:
    print(data.decode(errors="replace")[:2000])
sys.exit(0 if r.status == 200 else 1)
EOF
  rc=$?
  if (( rc == 0 )); then
    say "holding a two-turn Responses conversation through $GATEWAY/openai/v1/"
    "$PY" - "$GATEWAY" <<'EOF'
import sys
from openai import OpenAI
client = OpenAI(base_url=f"{sys.argv[1]}/openai/v1/", api_key="anything", max_retries=0)
first = client.responses.with_raw_response.create(model="gpt-4o", input="Hello")
second = client.responses.with_raw_response.create(model="gpt-4o", input="And then?",
                                                    previous_response_id=first.parse().id)
for turn in (first, second):
    print(f"x-spillway-backend: {turn.headers['x-spillway-backend']}  {turn.parse().output_text}")
# The follow-up must reach the backend that stored the first turn.
sys.exit(0 if first.headers["x-spillway-backend"] == second.headers["x-spillway-backend"] else 1)
EOF
    rc=$?
  fi
  set -e
  if (( rc == 0 )); then say "check passed"; else say "check FAILED (Envoy log: $RUN_DIR/envoy.log)"; fi
  exit "$rc"
fi

# ---------------------------------------------------------------- interactive
CLIENT_KEY=anything
KEY_NOTE="The gateway replaces the api-key with each backend's own key, so send any key."
if (( GLOBAL )); then
  CLIENT_KEY=demo-client-key
  KEY_NOTE="Requests need the client key demo-client-key; the gateway sends each backend its own key."
fi
cat <<EOF

Spillway demo is running.

  Gateway   $GATEWAY   (Envoy $("$ENVOY" --version 2>/dev/null | grep -o '[0-9]\+\.[0-9]\+\.[0-9]\+' | head -1) + spillway.wasm)
  Backends  eastus  127.0.0.1:$EASTUS_PORT  priority 1, quota 3 requests / 20 s
            westus  127.0.0.1:$WESTUS_PORT  priority 1
            paygo   127.0.0.1:$PAYGO_PORT  priority 2 (only when eastus and westus are unavailable)

$KEY_NOTE
Look at x-spillway-backend / x-spillway-attempts: eastus and westus share the
load; once eastus has served 3 requests in 20 s it answers 429 and that same
request fails over to westus (x-spillway-attempts: 2).

Chat:
  curl -i '$GATEWAY$CHAT_PATH' \\
    -H 'content-type: application/json' -H 'api-key: $CLIENT_KEY' \\
    -d '{"messages":[{"role":"user","content":"Hello"}]}'

Streamed:
  curl -iN '$GATEWAY$CHAT_PATH' \\
    -H 'content-type: application/json' -H 'api-key: $CLIENT_KEY' \\
    -d '{"messages":[{"role":"user","content":"Hello"}],"stream":true}'

Python (.venv/bin/python has the openai package):
  from openai import AzureOpenAI
  client = AzureOpenAI(azure_endpoint="$GATEWAY", api_key="$CLIENT_KEY", api_version="2024-10-21")
  raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": "Hello"}])
  print(raw.headers["x-spillway-backend"], raw.headers["x-spillway-attempts"])
  print(raw.parse().choices[0].message.content)

Responses API (a conversation stays with the backend that stored it):
  from openai import OpenAI
  client = OpenAI(base_url="$GATEWAY/openai/v1/", api_key="$CLIENT_KEY")
  first = client.responses.create(model="gpt-4o", input="Hello")
  second = client.responses.create(model="gpt-4o", input="And then?", previous_response_id=first.id)
  print(first.output_text); print(second.output_text)    # the same backend, "(turn 2)"

$( (( GLOBAL )) && cat <<GLOBAL_EOF
Two replicas share client limits (global mode):
  Replica 2 $(printf 'http://127.0.0.1:%s' "$PORT2")   (admin 127.0.0.1:$ADMIN_PORT2)
  spillway-ratelimit 127.0.0.1:$RATELIMIT_PORT, counters in redis-server 127.0.0.1:$REDIS_PORT
  The client key demo-client-key (client demo-team) may send 10 requests per minute
  in all, whichever replica they reach; the 11th gets a 429 from either:
  for p in $PORT $PORT2 $PORT $PORT2 $PORT $PORT2; do curl -s -o /dev/null -w "%{http_code} " \\
    "http://127.0.0.1:\$p$CHAT_PATH" -H 'api-key: demo-client-key' \\
    -H 'content-type: application/json' -d '{"messages":[{"role":"user","content":"Hi"}]}'; done

GLOBAL_EOF
)
Live view (backends and their state, requests, failovers, tokens/s):
  python3 scripts/spillway-top.py --admin http://127.0.0.1:$ADMIN_PORT     (or start the demo with --watch)

Admin:
  http://127.0.0.1:$ADMIN_PORT/stats?filter=spillway    per-backend cluster stats (upstream_rq_429, upstream_rq_retry, ...)
  http://127.0.0.1:$ADMIN_PORT/clusters                 backend endpoints
Files: $RUN_DIR/{envoy.yaml,envoy.log,access.log,mock-*.log}

$( (( WATCH )) && echo "The live view follows. Ctrl-C stops everything." || echo "Access log follows (attempts= and cluster= show failover). Ctrl-C stops everything.")
EOF

if (( WATCH )); then
  python3 "$ROOT/scripts/spillway-top.py" --admin "http://127.0.0.1:$ADMIN_PORT" &
else
  tail -n +1 -f "$RUN_DIR/access.log" &
fi
TAIL_PID=$!
set +e
wait "$ENVOY_PID"
rc=$?
set -e
# Only reached if Envoy stopped by itself (Ctrl-C / SIGTERM run the trap).
die "Envoy exited unexpectedly with status $rc; see $RUN_DIR/envoy.log"
