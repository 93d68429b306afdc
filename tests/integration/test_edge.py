"""The listener clients talk to, hardened as an edge proxy (README "Running at the edge"):
header and request timeouts, header limits, request bodies held until complete, the
client address, HTTP/2 limits, the overload manager, the admin interface and keys
kept out of the rendered config. Everything against real Envoy on loopback.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import time
from pathlib import Path

import harness
import httpx
import pytest
import yaml
from conftest import backend_entry
from harness import RENDER, ROOT, wait_until

CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
AUDIO = "/openai/deployments/whisper/audio/transcriptions?api-version=2024-10-21"


@pytest.fixture
def edge(start_mock, start_envoy):
    """One keyed backend behind Envoy rendered with `render_args`."""

    def make(*render_args: str, **kwargs):
        mock = start_mock("east", "key-east")
        envoy = start_envoy({"backends": [backend_entry(mock)], "api_version": "2024-10-21"},
                            render_args=list(render_args), **kwargs)
        return envoy, mock

    return make


def cluster_stat(envoy, name: str) -> int:
    return envoy.stat(f"cluster.spillway_east.{name}")


class Raw:
    """A client on a plain socket, for requests no HTTP library would send."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.start = time.monotonic()
        self.data = b""

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def poll(self, wait: float) -> bool:
        """Reads what arrived within `wait` s; False once the connection is closed."""
        ready, _, _ = select.select([self.sock], [], [], wait)
        if not ready:
            return True
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, OSError):
            return False
        self.data += chunk
        return bool(chunk)

    def response(self) -> tuple[int, bytes] | None:
        """(status, body) once a whole response with content-length has arrived."""
        head, sep, body = self.data.partition(b"\r\n\r\n")
        if not sep:
            return None
        lines = head.split(b"\r\n")
        length = next((int(l.split(b":", 1)[1]) for l in lines[1:] if l.lower().startswith(b"content-length:")), 0)
        if len(body) < length:
            return None
        return int(lines[0].split()[1]), body[:length]

    def wait_response(self, timeout: float, trickle: bytes | None = None, every: float = 0.1,
                      during=None) -> tuple[int, bytes, float]:
        """Waits for a response, sending `trickle` every `every` s meanwhile; calls
        `during(elapsed)` between sends. Returns (status, body, elapsed)."""
        deadline = self.start + timeout
        while time.monotonic() < deadline:
            if trickle is not None and not self.send(trickle):
                trickle = None  # the server stopped reading: just wait for its answer
            if during is not None:
                during(self.elapsed())
            open_ = self.poll(every)
            got = self.response()
            if got:
                return got[0], got[1], self.elapsed()
            if not open_:
                raise AssertionError(f"closed without a response after {self.elapsed():.1f}s: {self.data[:200]!r}")
        raise AssertionError(f"no response within {timeout}s: {self.data[:200]!r}")

    def wait_closed(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.poll(0.05):
                return self.elapsed()
        raise AssertionError(f"connection still open after {timeout}s")

    def close(self) -> None:
        self.sock.close()


def openai_error(body: bytes, code: int) -> dict:
    error = json.loads(body)["error"]
    assert error["code"] == code and error["type"] == "server_error", error
    return error


# ---------------------------------------------------------------- every option renders and validates

OPTION_SETS = [
    [],
    ["--request-headers-timeout-s", "0", "--request-timeout-s", "0", "--stream-idle-timeout-s", "0"],
    ["--request-headers-timeout-s", "1", "--request-timeout-s", "86400", "--stream-idle-timeout-s", "3600"],
    ["--max-request-headers-kb", "8192", "--max-headers-count", "1000"],
    ["--max-request-headers-kb", "1", "--max-headers-count", "1"],
    ["--headers-with-underscores", "allow"],
    ["--headers-with-underscores", "drop"],
    ["--http2-max-concurrent-streams", "1", "--http2-initial-stream-window-bytes", "65535",
     "--http2-initial-connection-window-bytes", "65535"],
    ["--http2-max-concurrent-streams", "2147483647", "--http2-initial-stream-window-bytes", "2147483647",
     "--http2-initial-connection-window-bytes", "2147483647"],
    ["--use-remote-address", "false", "--xff-num-trusted-hops", "3"],
    ["--max-heap-mb", "0", "--max-connections", "0"],
    ["--max-heap-mb", "65536", "--max-connections", "1"],
    ["--stream-request-bodies", "--body-limit-bytes", "4294967295"],
    ["--body-limit-bytes", "1", "--route-timeout-s", "1", "--no-access-log"],
]


@pytest.mark.parametrize("args", OPTION_SETS, ids=lambda a: " ".join(a) or "defaults")
def test_every_renderer_option_renders_a_config_envoy_accepts(args, monkeypatch):
    render = harness.render

    def render_with(cfg, workdir, listen, admin, extra_args=None, edit=None):
        return render(cfg, workdir, listen, admin, [*(extra_args or []), *args], edit)

    monkeypatch.setattr(harness, "render", render_with)
    config = {"backends": [{"name": "a", "url": "https://a.openai.azure.com", "api_key_env": "A_KEY"},
                           {"name": "b", "url": "http://127.0.0.1:9", "priority": 2}]}
    r = harness.validate(config, env={"A_KEY": "a-key-value"})
    assert r.returncode == 0, r.stderr[-3000:]


# ---------------------------------------------------------------- headers

def test_a_client_that_never_finishes_its_headers_gets_408_and_is_closed(edge):
    envoy, mock = edge("--request-headers-timeout-s", "1")
    raw = Raw(envoy.port)
    try:
        assert raw.send(f"POST {CHAT} HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\n".encode())
        status, body, at = raw.wait_response(timeout=5)
        assert status == 408 and 0.9 <= at < 3, (status, at)
        assert openai_error(body, 408)["message"] == "request header timeout"
        # Envoy closes the connection (after waiting up to 1 s for the client to).
        assert raw.wait_closed(3) < at + 2
    finally:
        raw.close()
    assert mock.count() == 0 and cluster_stat(envoy, "upstream_cx_total") == 0
    assert envoy.stat("http.spillway.downstream_rq_header_timeout") == 1


def test_a_slow_but_complete_request_is_not_cut_by_the_headers_timeout(edge):
    envoy, mock = edge("--request-headers-timeout-s", "1")
    raw = Raw(envoy.port)
    try:
        # A keep-alive connection may stay idle: the timer starts with a request's first byte.
        time.sleep(1.5)
        body = b'{"messages":[{"role":"user","content":"hi"}]}'
        assert raw.send(f"POST {CHAT} HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\n"
                        f"content-length: {len(body)}\r\n\r\n".encode() + body)
        status, _, _ = raw.wait_response(timeout=5)
        assert status == 200
    finally:
        raw.close()
    assert mock.count() == 1


def test_oversized_headers_get_431(edge):
    envoy, mock = edge()  # default: 32 KiB of request headers
    assert envoy.chat(headers={"x-note": "a" * 30_000}).status_code == 200
    r = envoy.chat(headers={"x-note": "a" * 40_000})
    assert r.status_code == 431
    assert mock.count() == 1


def test_too_many_headers_get_431(edge):
    envoy, mock = edge()  # default: 100 request headers
    assert envoy.chat(headers={f"x-h{i}": "v" for i in range(80)}).status_code == 200
    assert envoy.chat(headers={f"x-h{i}": "v" for i in range(120)}).status_code == 431
    envoy2, mock2 = edge("--max-headers-count", "20")
    assert envoy2.chat(headers={f"x-h{i}": "v" for i in range(30)}).status_code == 431
    assert mock.count() == 1 and mock2.count() == 0


def test_headers_with_underscores_are_refused_or_dropped(edge):
    envoy, mock = edge()
    r = envoy.chat(headers={"api_key": "sneaky"})
    assert r.status_code == 400 and mock.count() == 0
    envoy2, mock2 = edge("--headers-with-underscores", "drop")
    assert envoy2.chat(headers={"api_key": "sneaky"}).status_code == 200
    assert "api_key" not in mock2.requests()[-1]["headers"]


# ---------------------------------------------------------------- slow uploaders

SLOW_BODIES = {
    "multipart": (AUDIO, "multipart/form-data; boundary=b",
                  b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'),
    "json": (CHAT, "application/json", b'{"messages":[{"role":"user","content":"'),
}


def start_slow_upload(envoy, kind: str) -> Raw:
    path, content_type, start = SLOW_BODIES[kind]
    raw = Raw(envoy.port)
    assert raw.send(f"POST {path} HTTP/1.1\r\nHost: gw\r\napi-key: anything\r\ncontent-type: {content_type}\r\n"
                    f"content-length: 100000\r\n\r\n".encode() + start)
    return raw


@pytest.mark.parametrize("kind", ["multipart", "json"])
def test_a_slow_uploader_never_holds_a_backend_connection(edge, kind):
    """Headers and the start of a body, then one byte every 100 ms: Envoy holds the
    body (buffer filter; the request role too for JSON), so no backend connection is ever
    opened, and the request timeout ends the upload with a 408."""
    envoy, mock = edge("--request-timeout-s", "2")
    raw = start_slow_upload(envoy, kind)
    seen: list[tuple[int, int]] = []

    def during(elapsed: float) -> None:
        if 0.5 < elapsed < 1.8 and len(seen) < 3:
            seen.append((cluster_stat(envoy, "upstream_cx_total"), cluster_stat(envoy, "upstream_rq_total")))

    try:
        status, body, at = raw.wait_response(timeout=6, trickle=b"a", during=during)
        assert status == 408 and 1.8 <= at < 4, (status, at)
        assert openai_error(body, 408)["message"] == "request timeout"
        assert raw.wait_closed(3) < at + 2.5
    finally:
        raw.close()
    assert seen and all(s == (0, 0) for s in seen), seen
    assert (cluster_stat(envoy, "upstream_cx_total"), cluster_stat(envoy, "upstream_rq_total")) == (0, 0)
    assert mock.count() == 0 and mock.requests() == []
    assert envoy.stat("http.spillway.downstream_rq_timeout") == 1


def test_without_buffering_a_slow_uploader_holds_a_backend_until_the_request_timeout(edge):
    """--stream-request-bodies passes multipart bodies on as they arrive: the upload
    then holds a backend connection, and only the request timeout ends it."""
    envoy, mock = edge("--request-timeout-s", "2", "--stream-request-bodies")
    raw = start_slow_upload(envoy, "multipart")
    active: list[int] = []

    def during(elapsed: float) -> None:
        if 0.8 < elapsed < 1.8 and not active:
            active.append(cluster_stat(envoy, "upstream_rq_active"))

    try:
        status, body, at = raw.wait_response(timeout=6, trickle=b"a", during=during)
        assert status == 408 and 1.8 <= at < 4, (status, at)
        raw.wait_closed(3)
    finally:
        raw.close()
    assert active == [1]
    wait_until(lambda: cluster_stat(envoy, "upstream_rq_active") == 0, timeout=5, what="backend released")
    assert cluster_stat(envoy, "upstream_rq_total") == 1
    assert mock.count() == 0  # the backend never got a whole request


def multipart(size: int) -> dict:
    return {"files": {"file": ("a.wav", b"\0" * size, "audio/x-wav")}, "data": {"model": "whisper"}}


def test_uploads_up_to_the_body_limit_pass_and_larger_ones_get_413(edge):
    envoy, mock = edge("--body-limit-bytes", str(1 << 20))
    r = envoy.client.post(AUDIO, **multipart(512 * 1024))
    assert r.status_code == 200, r.text
    assert mock.requests()[-1]["body_len"] > 512 * 1024
    r = envoy.client.post(AUDIO, **multipart(2 << 20))
    assert r.status_code == 413
    openai_error(r.content, 413)
    assert mock.count() == 1 and cluster_stat(envoy, "upstream_rq_total") == 1
    # Streaming bodies lifts the limit for multipart (such a body cannot fail over).
    envoy2, mock2 = edge("--body-limit-bytes", str(1 << 20), "--stream-request-bodies")
    assert envoy2.client.post(AUDIO, **multipart(2 << 20)).status_code == 200
    assert mock2.requests()[-1]["body_len"] > 2 << 20


def test_the_request_timeout_does_not_cut_long_answers(edge):
    envoy, mock = edge("--request-timeout-s", "1")
    mock.configure(stream_chunks=6, stream_chunk_delay_ms=400)
    events = []
    with envoy.client.stream("POST", CHAT, json={"messages": [{"role": "user", "content": "hi"}],
                                                 "stream": True}) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 7
    mock.configure(stream_chunks=5, stream_chunk_delay_ms=0, latency_ms=2000)
    started = time.monotonic()
    assert envoy.chat().status_code == 200 and time.monotonic() - started >= 2


# ---------------------------------------------------------------- the client's address

CLAIM = "203.0.113.7"


def forwarding(mock) -> dict:
    headers = mock.requests()[-1]["headers"]
    return {k: v for k, v in headers.items() if k in ("x-forwarded-for", "x-envoy-external-address")}


ENVOY_ONLY = {"x-envoy-decorator-operation": "op", "x-envoy-downstream-service-cluster": "c"}


def test_the_client_address_is_the_connections_not_what_the_client_claims(edge):
    envoy, mock = edge()
    assert envoy.chat(headers={"x-forwarded-for": CLAIM, **ENVOY_ONLY}).status_code == 200
    # Headers meant for Envoy itself do not pass from an external client to a backend.
    assert not set(ENVOY_ONLY) & set(mock.requests()[-1]["headers"])
    seen = forwarding(mock)
    assert seen["x-envoy-external-address"] == "127.0.0.1"
    # The claim is kept for the record, with the address Envoy saw appended after it.
    entries = [e.strip() for e in seen["x-forwarded-for"].split(",")]
    assert entries[0] == CLAIM and len(entries) == 2 and entries[1] != CLAIM
    wait_until(lambda: "client=127.0.0.1" in envoy.log(), timeout=5, what="access log line")


def test_trusted_hops_take_the_client_address_from_the_proxy_in_front(edge):
    envoy, mock = edge("--xff-num-trusted-hops", "1")
    assert envoy.chat(headers={"x-forwarded-for": f"198.51.100.1, {CLAIM}"}).status_code == 200
    assert forwarding(mock)["x-envoy-external-address"] == CLAIM
    wait_until(lambda: f"client={CLAIM}" in envoy.log(), timeout=5, what="access log line")


def test_without_use_remote_address_x_forwarded_for_passes_unchanged(edge):
    envoy, mock = edge("--use-remote-address", "false")
    assert envoy.chat(headers={"x-forwarded-for": CLAIM, **ENVOY_ONLY}).status_code == 200
    assert forwarding(mock) == {"x-forwarded-for": CLAIM}
    assert set(ENVOY_ONLY) <= set(mock.requests()[-1]["headers"])


# ---------------------------------------------------------------- HTTP/2

def h2_server_settings(port: int) -> tuple[dict[int, int], int]:
    """Speaks HTTP/2 with prior knowledge: the server's SETTINGS and its connection
    window increment (WINDOW_UPDATE on stream 0)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + struct.pack(">I", 0)[1:] + bytes([4, 0]) + struct.pack(">I", 0))
        data, settings, increment = b"", None, None
        deadline = time.monotonic() + 5
        while (settings is None or increment is None) and time.monotonic() < deadline:
            while len(data) >= 9:
                length = int.from_bytes(data[:3], "big")
                if len(data) < 9 + length:
                    break
                kind, flags, stream = data[3], data[4], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
                payload, data = data[9:9 + length], data[9 + length:]
                if kind == 4 and not flags & 1:
                    settings = {int.from_bytes(payload[i:i + 2], "big"): int.from_bytes(payload[i + 2:i + 6], "big")
                                for i in range(0, len(payload), 6)}
                elif kind == 8 and stream == 0:
                    increment = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if settings is None or increment is None:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        assert settings is not None and increment is not None, (settings, increment)
        return settings, increment


MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 0x3, 0x4


@pytest.mark.parametrize("args, streams, stream_window, connection_window", [
    ([], 100, 1 << 20, 4 << 20),
    (["--http2-max-concurrent-streams", "7", "--http2-initial-stream-window-bytes", "65535",
      "--http2-initial-connection-window-bytes", "131072"], 7, 65535, 131072),
], ids=["defaults", "options"])
def test_http2_clients_get_the_rendered_limits(edge, args, streams, stream_window, connection_window):
    envoy, _ = edge(*args)
    settings, increment = h2_server_settings(envoy.port)
    assert settings[MAX_CONCURRENT_STREAMS] == streams
    assert settings[INITIAL_WINDOW_SIZE] == stream_window
    assert 65535 + increment == connection_window


# ---------------------------------------------------------------- overload manager

def test_the_overload_manager_runs_and_shows_in_admin_stats(edge):
    envoy, _ = edge()
    stats = envoy.stats()
    for name in ("overload.envoy.resource_monitors.fixed_heap.pressure",
                 "overload.envoy.overload_actions.shrink_heap.active",
                 "overload.envoy.overload_actions.stop_accepting_requests.active"):
        assert f"\n{name}: " in "\n" + stats, name
    wait_until(lambda: envoy.stat("overload.envoy.resource_monitors.fixed_heap.pressure") > 0,
               timeout=5, what="heap pressure measured")
    assert envoy.stat("overload.envoy.overload_actions.stop_accepting_requests.active") == 0
    assert envoy.chat().status_code == 200
    # A connection limit is set: Envoy does not warn that there is none.
    assert "no configured limit to the number of allowed active downstream connections" not in envoy.log()


def test_over_the_heap_limit_envoy_answers_503_and_admin_still_works(edge):
    envoy, mock = edge("--max-heap-mb", "1")  # far below what Envoy itself uses
    wait_until(lambda: envoy.stat("overload.envoy.overload_actions.stop_accepting_requests.active") == 1,
               timeout=5, what="stop_accepting_requests active")
    assert envoy.stat("overload.envoy.overload_actions.shrink_heap.active") == 1
    r = envoy.chat()
    assert (r.status_code, r.text) == (503, "envoy overloaded")
    assert mock.count() == 0
    assert httpx.get(f"{envoy.admin}/ready", timeout=5).status_code == 200


# ---------------------------------------------------------------- admin interface

def test_the_admin_interface_is_on_loopback_unless_asked(tmp_path):
    cfg = tmp_path / "f.json"
    cfg.write_text(json.dumps({"backends": [{"name": "a", "url": "http://127.0.0.1:9"}]}))
    r = subprocess.run([str(RENDER), str(cfg)], capture_output=True, text=True, check=True)
    assert yaml.safe_load(r.stdout)["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert r.stderr == ""
    r = subprocess.run([str(RENDER), str(cfg), "--admin", "0.0.0.0:9901"], capture_output=True, text=True, check=True)
    assert "warning: the admin interface listens on 0.0.0.0:9901" in r.stderr
    # docker-compose: 0.0.0.0 inside the container, published on the host's loopback only.
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["envoy"]
    admin_ports = [p for p in compose["ports"] if p.endswith(":9901")]
    assert admin_ports == ["127.0.0.1:9901:9901"]
    rendered = yaml.safe_load((ROOT / "envoy" / "docker-compose.envoy.yaml").read_text())
    assert rendered["admin"]["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 9901}


# ---------------------------------------------------------------- keys

ENV_SECRET = "sk-env-secret-4f7d2c9e81"
LITERAL_SECRET = "sk-literal-secret-b3a06e"


def render_cli(config: dict, tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cfg = tmp_path / "filter.json"
    cfg.write_text(json.dumps(config))
    return subprocess.run([str(RENDER), str(cfg), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


def test_keys_from_the_environment_stay_out_of_the_rendered_config(tmp_path):
    config = {"backends": [{"name": "east", "url": "https://east.openai.azure.com", "api_key_env": "EAST_KEY"}],
              "clients": [{"name": "app", "key_env": "APP_KEY"}]}
    env = {"EAST_KEY": ENV_SECRET, "APP_KEY": "app-gateway-key-77"}
    for args in ([], ["--istio", "--namespace", "n", "--workload-selector", "app=gw",
                      "--wasm-url", "https://h/spillway.wasm", "--wasm-sha256", "0" * 64]):
        r = render_cli(config, tmp_path, *args, env=env)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert ENV_SECRET not in r.stdout and "app-gateway-key-77" not in r.stdout
        assert "EAST_KEY" in r.stdout and "APP_KEY" in r.stdout
    result = harness.validate(config, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_literal_key_is_warned_about_by_field_never_by_value(tmp_path):
    config = {"backends": [{"name": "east", "url": "https://east.openai.azure.com", "api_key": LITERAL_SECRET},
                           {"name": "west", "url": "https://west.openai.azure.com", "api_key_env": "WEST_KEY"}],
              "clients": [{"name": "app", "key": "literal-client-key-1"}]}
    for args in ([], ["--istio", "--namespace", "n", "--workload-selector", "app=gw",
                      "--wasm-url", "https://h/spillway.wasm", "--wasm-sha256", "0" * 64]):
        r = render_cli(config, tmp_path, *args)
        assert r.returncode == 0, r.stderr
        warnings = [l for l in r.stderr.splitlines() if l.startswith("spillway-render: warning: ")]
        assert len(warnings) == 2, r.stderr
        assert "backends[0].api_key (east) is a literal key" in warnings[0]
        assert "clients[0].key (app) is a literal key" in warnings[1]
        assert LITERAL_SECRET not in r.stderr and "literal-client-key-1" not in r.stderr
        assert LITERAL_SECRET in r.stdout  # which is what the warning is about


def test_config_dump_shows_literal_keys_but_not_keys_from_the_environment(start_mock, start_envoy):
    east, west = start_mock("east", LITERAL_SECRET), start_mock("west", ENV_SECRET)
    envoy = start_envoy({"backends": [backend_entry(east),
                                      {"name": "west", "url": west.url, "api_key_env": "WEST_KEY", "priority": 2}]},
                        env={"WEST_KEY": ENV_SECRET})
    east.configure(fail_next=[{"status": 429, "retry_after": "30"}])
    r = envoy.chat()
    assert (r.status_code, r.headers["x-spillway-backend"]) == (200, "west")
    assert west.requests()[-1]["headers"]["api-key"] == ENV_SECRET
    dump = httpx.get(f"{envoy.admin}/config_dump", timeout=10).text
    assert LITERAL_SECRET in dump
    assert ENV_SECRET not in dump and "WEST_KEY" in dump
