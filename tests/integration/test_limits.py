"""Client limits that cannot be dodged: however a body is framed (length,
chunked HTTP/1.1, HTTP/2 without a length, HTTP/2 with trailers), whatever
it carries (tools, schemas, message parts, several choices), and however the
request ends (cut streams, abandoned requests, failed answers after the
backend worked), the client is charged what it asked for and used.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from conftest import backend_entry

CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
KEY = "key-of-team-tokens"
TPM = 20_000


def body(max_tokens: int = 1000, content: str = "hi", **extra) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                       **extra}).encode()


def estimate(raw: bytes, max_tokens: int = 1000) -> int:
    """What admission charges before the answer: the body's size in tokens
    (4 bytes each, rounded up) plus the completion budget."""
    return -(-len(raw) // 4) + max_tokens


def h2_post(port: int, path: str, headers: list[tuple[str, str]], chunks: list[bytes],
            trailers: list[tuple[str, str]] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/2 request over cleartext (prior knowledge), optionally ending
    with trailers, which no high-level client sends."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":authority", "localhost"),
                               (":path", path), ("content-type", "application/json"), *headers])
    for chunk in chunks:
        conn.send_data(stream, chunk)
    if trailers:
        conn.send_headers(stream, trailers, end_stream=True)
    else:
        conn.end_stream(stream)
    sock.sendall(conn.data_to_send())
    status, response_headers, data = 0, {}, b""
    try:
        while True:
            received = sock.recv(65536)
            if not received:
                break
            ended = False
            for event in conn.receive_data(received):
                if isinstance(event, h2.events.ResponseReceived):
                    response_headers = dict(event.headers)
                    status = int(response_headers[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ended = True
            sock.sendall(conn.data_to_send())
            if ended:
                break
    finally:
        sock.close()
    return status, response_headers, data


def chunked(client: httpx.Client, raw: bytes, headers: dict) -> httpx.Response:
    """HTTP/1.1 with `transfer-encoding: chunked` (a generator body has no length)."""
    def pieces():
        yield raw[: len(raw) // 2]
        yield raw[len(raw) // 2:]
    return client.post(CHAT, content=pieces(), headers={"content-type": "application/json", **headers})


@pytest.fixture
def gateway(start_mock, start_envoy):
    def make(render_args=None, **filter_extra):
        east = start_mock("east", "key-east")
        west = start_mock("west", "key-west")
        config = {
            "backends": [backend_entry(east), backend_entry(west)],
            "clients": [{"name": "team", "key": KEY, "tokens_per_minute": TPM}],
            **filter_extra,
        }
        return east, west, start_envoy(config, render_args=render_args)
    return make


def remaining(headers) -> int:
    return int(headers["x-ratelimit-remaining-tokens"])


class Ledger:
    """What the client's token bucket should hold: the limit, less what
    earlier requests used (their answers' usage), less this request's
    estimate; refill while the test runs may add at most `slack`."""

    def __init__(self, tpm: int):
        self.tpm, self.used = tpm, 0
        self.started = time.monotonic()

    def check(self, status: int, headers, answer: bytes, raw: bytes, what: str) -> None:
        assert status == 200, (what, status, answer)
        expected = self.tpm - self.used - estimate(raw)
        slack = (time.monotonic() - self.started + 1) * self.tpm / 60
        assert expected <= remaining(headers) <= expected + slack, (what, remaining(headers), expected, slack)
        self.used += json.loads(answer)["usage"]["total_tokens"]


@pytest.mark.parametrize("render_args", [[], ["--stream-request-bodies"]], ids=["buffered", "streamed"])
def test_every_framing_is_admitted_at_its_estimate(gateway, render_args):
    # Envoy's buffer filter (on by default) gives a complete body a length;
    # without it the request role still holds a JSON request until the body is in.
    _, _, envoy = gateway(render_args)
    auth = {"api-key": KEY}
    raw = body(content="x" * 400)
    ledger = Ledger(TPM)
    r = envoy.client.post(CHAT, content=raw, headers={"content-type": "application/json", **auth})
    ledger.check(r.status_code, r.headers, r.content, raw, "content-length")
    r = chunked(envoy.client, raw, auth)
    ledger.check(r.status_code, r.headers, r.content, raw, "chunked HTTP/1.1")
    for trailers in (None, [("x-checksum", "abc")]):
        status, headers, answer = h2_post(envoy.port, CHAT, [("api-key", KEY)], [raw[:100], raw[100:]], trailers)
        ledger.check(status, headers, answer, raw, f"HTTP/2, trailers {trailers}")


def sse_streamed_tokens(raw: bytes) -> int:
    """Tokens the gateway counts for streamed content without usage: each
    content delta's characters, 4 to a token, rounded up per event."""
    tokens = 0
    for line in raw.decode().splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[len("data: "):])
            for choice in chunk.get("choices", []):
                content = (choice.get("delta") or {}).get("content") or ""
                tokens += -(-len(content) // 4)
    return tokens


def stream_body(**extra) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "y" * 200}], "stream": True, **extra}).encode()


def test_a_stream_without_usage_is_charged_its_prompt_and_what_was_streamed(start_mock, start_envoy):
    # A long answer: what was streamed is far more than the refill slack.
    east = start_mock("east", "key-east", "--stream-chunks", "600")
    envoy = start_envoy({"backends": [backend_entry(east)],
                         "clients": [{"name": "team", "key": KEY, "tokens_per_minute": TPM}]})
    auth = {"api-key": KEY, "content-type": "application/json"}
    raw = stream_body()
    with envoy.client.stream("POST", CHAT, content=raw, headers=auth) as r:
        streamed = r.read()
    assert r.status_code == 200 and b'"usage"' not in streamed
    charged = -(-len(raw) // 4) + sse_streamed_tokens(streamed)
    assert sse_streamed_tokens(streamed) > 600
    probe = body(max_tokens=10)
    r = envoy.client.post(CHAT, content=probe, headers=auth)
    expected = TPM - charged - estimate(probe, 10)
    assert expected <= remaining(r.headers) <= expected + 200, (remaining(r.headers), expected)


def test_a_stream_cut_short_is_charged_what_was_streamed(start_mock, start_envoy):
    east = start_mock("east", "key-east", "--stream-chunks", "12")
    envoy = start_envoy({"backends": [backend_entry(east)],
                         "clients": [{"name": "team", "key": KEY, "tokens_per_minute": TPM}]})
    auth = {"api-key": KEY, "content-type": "application/json"}
    east.configure(fail_next=[{"reset_after_events": 5}])
    raw = stream_body(max_tokens=4000, stream_options={"include_usage": True})
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        with envoy.client.stream("POST", CHAT, content=raw, headers=auth) as r:
            for chunk in r.iter_raw():
                received += chunk
    # Cut before its usage chunk: neither the whole budget (4000) nor only
    # the prompt, but the prompt and the five events that arrived.
    charged = -(-len(raw) // 4) + sse_streamed_tokens(received)
    assert b'"usage":{' not in received and sse_streamed_tokens(received) > 0
    probe = body(max_tokens=10)
    r = envoy.client.post(CHAT, content=probe, headers=auth)
    expected = TPM - charged - estimate(probe, 10)
    assert expected <= remaining(r.headers) <= expected + 200, (remaining(r.headers), expected)


def test_a_request_its_backends_worked_on_is_not_refunded(start_mock, start_envoy):
    """Both backends take the request and go silent: Envoy answers 504 after
    each try's idle timeout. The backends may have billed the work, so the
    estimate stays charged (a refused connection would be refunded)."""
    east = start_mock("east", "key-east")
    west = start_mock("west", "key-west")
    envoy = start_envoy({"backends": [backend_entry(east), backend_entry(west, priority=2)],
                         "attempt_idle_timeout_s": 1,
                         "clients": [{"name": "team", "key": KEY, "tokens_per_minute": TPM}]})
    auth = {"api-key": KEY, "content-type": "application/json"}
    for mock in (east, west):
        mock.configure(fail_next=[{"hang": True}])
    raw = body(max_tokens=5000)
    started = time.monotonic()
    r = envoy.client.post(CHAT, content=raw, headers=auth)
    assert r.status_code == 504, r.text
    probe = body(max_tokens=10)
    r = envoy.client.post(CHAT, content=probe, headers=auth)
    expected = TPM - estimate(raw, 5000) - estimate(probe, 10)
    refilled = (time.monotonic() - started + 0.5) * TPM / 60
    assert expected <= remaining(r.headers) <= expected + refilled < TPM - 4000, (remaining(r.headers), expected)


def test_with_trailers_a_stream_still_gets_its_usage_added(gateway):
    east, west, envoy = gateway(stream_usage=True)
    raw = stream_body()
    status, _, answer = h2_post(envoy.port, CHAT, [("api-key", KEY)], [raw], [("x-checksum", "abc")])
    assert status == 200 and answer.rstrip().endswith(b"data: [DONE]")
    # The backend was asked for usage; the client, who did not ask, gets none.
    seen = (east.requests() or west.requests())[-1]["body_json"]
    assert seen["stream_options"] == {"include_usage": True} and seen["messages"][0]["content"] == "y" * 200
    assert b'"usage":{' not in answer


def test_a_body_of_unknown_size_from_a_token_limited_client_is_refused(start_mock, start_envoy):
    east = start_mock("east", "key-east")
    envoy = start_envoy({"backends": [backend_entry(east)],
                         "clients": [{"name": "team", "key": KEY, "tokens_per_minute": TPM}]},
                        render_args=["--stream-request-bodies"])
    # Not JSON (Envoy did not read it) and no length: its size would be
    # known only after it went upstream.
    r = chunked(envoy.client, b"x" * 5000, {"api-key": KEY, "content-type": "application/octet-stream"})
    assert r.status_code == 411 and r.json()["error"]["code"] == "LengthRequired", r.text
    assert east.count() == 0
    # With a length it is admitted at its size.
    r = envoy.client.post(CHAT, content=b"x" * 5000, headers={"api-key": KEY, "content-type": "application/octet-stream"})
    assert remaining(r.headers) <= TPM - 1250


def test_racing_requests_on_both_workers_cannot_overshoot(gateway):
    """Twenty-four requests at once, a third each with a length, chunked and
    over HTTP/2, on separate connections (Envoy spreads them over its two
    workers): exactly as many are admitted as the limit holds, the rest get
    429 before any backend sees them, and once the answers are in the bucket
    holds the limit less what the admitted requests really used."""
    east, west, envoy = gateway(["--stream-request-bodies"])
    for mock in (east, west):
        mock.configure(latency_ms=1500)  # no answer settles before all are admitted
    raw = body(content="x" * 400)
    auth = {"api-key": KEY}

    def send(i: int):
        if i % 3 == 0:
            with httpx.Client(base_url=envoy.url, timeout=30) as c:
                r = c.post(CHAT, content=raw, headers={"content-type": "application/json", **auth})
            return r.status_code, r.content
        if i % 3 == 1:
            with httpx.Client(base_url=envoy.url, timeout=30) as c:
                r = chunked(c, raw, auth)
            return r.status_code, r.content
        status, _, answer = h2_post(envoy.port, CHAT, [("api-key", KEY)], [raw], None)
        return status, answer

    barrier = threading.Barrier(24)

    def at_once(i: int):
        barrier.wait()
        return send(i)

    started = time.monotonic()
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(at_once, range(24)))
    admitted = [json.loads(a) for s, a in results if s == 200]
    limited = [s for s, _ in results if s == 429]
    fits = TPM // estimate(raw)
    assert fits <= len(admitted) <= fits + 1, [s for s, _ in results]
    assert len(admitted) + len(limited) == 24
    assert east.count() + west.count() == len(admitted)
    used = sum(a["usage"]["total_tokens"] for a in admitted)
    for mock in (east, west):
        mock.configure(latency_ms=0)
    probe = body(max_tokens=10)
    r = envoy.client.post(CHAT, content=probe, headers={"content-type": "application/json", **auth})
    expected = TPM - used - estimate(probe, 10)
    refilled = (time.monotonic() - started + 0.5) * TPM / 60
    assert expected <= remaining(r.headers) <= expected + refilled, (remaining(r.headers), expected, refilled)
