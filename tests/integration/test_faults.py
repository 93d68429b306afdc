"""Production faults: what clients and broken backends do must not take the
gateway down, leak a key, or take healthy backends out of rotation.

Every test runs real Envoy (two workers) with the mock backends' fault
injection, and checks what the client got, what each backend saw, and the
health state afterwards."""

import json
import socket
import time

import httpx
import pytest
from conftest import backend_entry
from harness import http_connection_manager, wait_until

CHAT_PATH = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
CHAT_BODY = b'{"messages":[{"role":"user","content":"hi"}]}'


def raw_request(port: int, headers: list[tuple[bytes, bytes]], path: str = CHAT_PATH,
                body: bytes = CHAT_BODY) -> tuple[int, bytes]:
    """One HTTP/1.1 request on its own connection, header bytes sent as they
    are (clients can send bytes that are not UTF-8). Returns (status, raw answer)."""
    head = (f"POST {path} HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n").encode()
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(head + b"\r\n" + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, answer


def gauge(envoy, name: str, backend: str) -> int:
    return envoy.stat(f"wasmcustom.{name}.backend.{backend}")


def test_header_bytes_that_are_not_utf8_cannot_trap_the_vm(start_mock, start_envoy):
    east = start_mock("east", "key-east")
    west = start_mock("west", "key-west")
    envoy = start_envoy({
        "backends": [backend_entry(east), backend_entry(west)],
        "clients": [{"name": "team", "key": "team-key-123"}],
        # A 429 without a usable retry-after keeps a backend out for 1 s.
        "default_retry_after_s": 1,
    })
    bad = b"\xff\xfe\x80key"
    # From clients, in every header the request role reads: refused as a
    # wrong key (the bytes match no key), on many connections (both workers).
    for _ in range(6):
        for name in (b"api-key", b"authorization", b"ocp-apim-subscription-key"):
            value = b"Bearer " + bad if name == b"authorization" else bad
            status, answer = raw_request(envoy.port, [(name, value)])
            assert status == 401, answer[:500]
    # From backends, in the headers both roles read: a 429 whose retry-after
    # is not text fails over; a 200 whose content-type is not text passes.
    for _ in range(4):
        east.configure(fail_next=[{"status": 429, "raw_headers": [["retry-after", "ff fe"],
                                                                   ["retry-after-ms", "80 81"]]}])
        west.configure(fail_next=[{"status": 429, "raw_headers": [["retry-after", "ff fe"]]}])
        status, answer = raw_request(envoy.port, [(b"api-key", b"team-key-123")])
        assert status == 429, answer[:500]
        # Both were throttled for the default wait, and the client is told so.
        assert b"\r\nretry-after: 1\r\n" in answer.lower(), answer[:800]
        time.sleep(1.1)
    for _ in range(6):
        for m in (east, west):
            m.configure(fail_next=[{"status": 200, "raw_headers": [["content-type", "ff fe 2f 6a"]]}])
        status, answer = raw_request(envoy.port, [(b"api-key", b"team-key-123")])
        assert status == 200, answer[:500]
    # The gateway still serves on every worker: many fresh connections succeed.
    for _ in range(24):
        status, answer = raw_request(envoy.port, [(b"api-key", b"team-key-123")])
        assert status == 200, answer[:500]
    assert "panic" not in envoy.log().lower()
    assert gauge(envoy, "spillway_backend_circuit_open", "east") == 0


# --- only the API reaches backends ------------------------------------------------------------

ESCAPES = [
    "/openai/../admin",
    "/openai/%2e%2e/admin",
    "/openai/deployments/gpt-4o/%2E%2E/%2e%2e/%2e%2e/admin",
    "/openai/deployments/a%2Fb/chat/completions",
    "/openai/deployments/a%5Cb/chat/completions",
    "/openai/deployments/a%20b/chat/completions",
    "/openai/deployments/a:b/chat/completions",
    "/openai/./deployments/../../admin",
    "/admin",
]


def _no_path_hygiene(bootstrap: dict) -> None:
    hcm = http_connection_manager(bootstrap)
    for key in ("normalize_path", "merge_slashes", "path_with_escaped_slashes_action"):
        hcm.pop(key, None)


@pytest.mark.parametrize("envoy_normalises", [True, False], ids=["rendered", "without-envoy-normalisation"])
def test_only_plain_api_paths_reach_a_backend(start_mock, start_envoy, envoy_normalises):
    """With the rendered config Envoy resolves dot segments first; without it
    (another listener, Istio) the filter alone must refuse them."""
    east = start_mock("east", "key-east")
    envoy = start_envoy({"backends": [backend_entry(east, deployments={"gpt-4o": "gpt-4o-east"})]},
                        edit=None if envoy_normalises else _no_path_hygiene)
    for path in ESCAPES:
        status, answer = raw_request(envoy.port, [], path=path)
        assert status in (400, 404), (path, answer[:300])
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["type"] in ("invalid_request_error", "not_found_error"), (path, body)
    assert east.count() == 0, [r["path"] for r in east.requests()]
    # A renamed deployment cannot be escaped: the rename applies to the
    # deployment the path really names, or the path is refused.
    status, _ = raw_request(envoy.port, [], path="/openai/deployments/x/../gpt-4o/chat/completions?api-version=1")
    if envoy_normalises:
        assert status == 200
        assert [r["path"] for r in east.requests()] == ["/openai/deployments/gpt-4o-east/chat/completions"]
    else:
        assert status == 400
        assert east.count() == 0


# --- failover does not silently stop under load -----------------------------------------------

def test_dozens_of_concurrent_failovers_all_happen(start_mock, start_envoy):
    """Every request that lands on the failing backend first must fail over:
    Envoy's default of 3 concurrent retries per cluster would decline some and
    hand their clients the raw 503."""
    from concurrent.futures import ThreadPoolExecutor

    east = start_mock("east", "key-east")
    west = start_mock("west", "key-west", "--latency-ms", "300")
    envoy = start_envoy({
        "backends": [backend_entry(east), backend_entry(west)],
        # Keep east in rotation so every round sends half the requests to it first.
        "circuit_breaker": {"consecutive_failures": 1000, "open_s": 1},
    })
    n = 64
    east.configure(fail_next=[{"status": 503}] * n)

    def one(_):
        return raw_request(envoy.port, [])

    with ThreadPoolExecutor(max_workers=n) as pool:
        answers = list(pool.map(one, range(n)))
    statuses = [status for status, _ in answers]
    assert statuses == [200] * n, [a[:200] for s, a in answers if s != 200][:3]
    first_on_east = sum(1 for r in east.requests())
    assert first_on_east >= n // 4, first_on_east
    assert west.count() == n
    assert envoy.stat("cluster.spillway_east.upstream_rq_retry_overflow") == 0
    assert envoy.stat("cluster.spillway_west.upstream_rq_retry_overflow") == 0
    assert envoy.stat("wasmcustom.spillway_failovers_total.backend.east") == first_on_east


# --- broken backends leave rotation -----------------------------------------------------------

def test_a_backend_refusing_its_key_fails_over_and_leaves_rotation(start_mock, start_envoy):
    east = start_mock("east", "key-east-rotated")
    west = start_mock("west", "key-west")
    envoy = start_envoy({
        "backends": [backend_entry(east, api_key="key-east-old"), backend_entry(west)],
        "circuit_breaker": {"consecutive_failures": 2, "open_s": 60},
    })
    for _ in range(6):
        r = envoy.chat()
        assert r.status_code == 200 and r.headers["x-spillway-backend"] == "west", r.text
    # East refused twice, then its circuit opened: no more traffic to it.
    assert east.count() == 2
    assert all(rec["status"] == 401 for rec in east.requests())
    assert {rec["headers"]["api-key"] for rec in east.requests()} == {"key-east-old"}
    assert {rec["headers"]["api-key"] for rec in west.requests()} == {"key-west"}
    assert envoy.stat("wasmcustom.spillway_circuit_opens_total.backend.east") == 1
    wait_until(lambda: gauge(envoy, "spillway_backend_circuit_open", "east") == 1, timeout=5)
    assert "backend east refused its configured key (401)" in envoy.log()


def test_a_401_for_the_clients_own_credential_goes_back_to_the_client(start_mock, start_envoy):
    east = start_mock("east", "entra-token-of-the-client")
    west = start_mock("west", "key-west")
    # East passes the client's credential through (no api_key configured).
    envoy = start_envoy({"backends": [{"name": "east", "url": east.url}, backend_entry(west, priority=2)],
                         "circuit_breaker": {"consecutive_failures": 2, "open_s": 60}})
    for _ in range(4):
        r = envoy.chat(headers={"authorization": "Bearer expired-token"})
        assert r.status_code == 401, r.text
        assert r.headers["x-spillway-backend"] == "east"
    assert west.count() == 0
    assert envoy.stat("wasmcustom.spillway_circuit_opens_total.backend.east") == 0


def test_deployment_not_found_fails_over_without_taking_the_backend_out(start_mock, start_envoy):
    east = start_mock("east", "key-east", "--deployments", "gpt-4o-mini")
    west = start_mock("west", "key-west", "--deployments", "gpt-4o,gpt-4o-mini")
    envoy = start_envoy({"backends": [backend_entry(east), backend_entry(west)],
                         "circuit_breaker": {"consecutive_failures": 2, "open_s": 60}})
    for _ in range(6):
        r = envoy.chat("gpt-4o")
        assert r.status_code == 200 and r.headers["x-spillway-backend"] == "west", r.text
    assert east.count() == 3
    assert {rec["status"] for rec in east.requests()} == {404}
    # East still serves what it has.
    served = {envoy.chat("gpt-4o-mini").headers["x-spillway-backend"] for _ in range(4)}
    assert served == {"east", "west"}
    assert envoy.stat("wasmcustom.spillway_circuit_opens_total.backend.east") == 0
    # Nobody has it: the client gets Azure's 404 after every backend was asked.
    r = envoy.chat("gpt-5-nowhere")
    assert r.status_code == 404 and r.headers["x-spillway-attempts"] == "2", r.text
    assert r.json()["error"]["code"] == "DeploymentNotFound"
    for m in (east, west):
        assert m.requests()[-1]["path"] == "/openai/deployments/gpt-5-nowhere/chat/completions"


# --- a client that gives up is not a backend failure ------------------------------------------

def _give_up(envoy, timeout: float, **body) -> None:
    try:
        envoy.client.post(CHAT_PATH, json={"messages": [{"role": "user", "content": "hi"}], **body}, timeout=timeout)
    except httpx.TimeoutException:
        return
    raise AssertionError("the request was expected to time out on the client")


def _hang_up_mid_upload(port: int, api_key: str, content_type: str) -> None:
    head = (f"POST {CHAT_PATH} HTTP/1.1\r\nhost: gateway\r\ncontent-type: {content_type}\r\n"
            f"api-key: {api_key}\r\ncontent-length: 4000\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head + b'{"messages": [')
        time.sleep(0.2)


def test_clients_that_give_up_take_no_backend_out(start_mock, start_envoy):
    east = start_mock("east", "key-east", "--latency-ms", "3000")
    west = start_mock("west", "key-west", "--latency-ms", "3000")
    # Bodies stream (no buffer filter), so a multipart upload reaches the
    # backend before its client hangs up.
    envoy = start_envoy({
        "backends": [backend_entry(east), backend_entry(west)],
        "circuit_breaker": {"consecutive_failures": 2, "open_s": 60},
        "clients": [{"name": "team", "key": "team-key-123", "tokens_per_minute": 100000}],
    }, render_args=["--stream-request-bodies"])
    headers = {"api-key": "team-key-123"}
    envoy.client.headers.update(headers)
    for _ in range(8):
        _give_up(envoy, 0.2, max_tokens=5000)
    # A JSON body is held by Envoy until complete (its fields are read before
    # routing): hanging up mid-way reaches no filter and no backend. Other
    # bodies (multipart uploads) stream to the backend as they arrive.
    for content_type in ("application/json", "application/json", "multipart/form-data; boundary=b",
                         "multipart/form-data; boundary=b"):
        _hang_up_mid_upload(envoy.port, "team-key-123", content_type)
    time.sleep(0.5)
    for m in (east, west):
        m.configure(latency_ms=0)
    # Nothing was taken out: both backends serve, no circuit opened.
    served = {envoy.chat(headers=headers).headers.get("x-spillway-backend") for _ in range(4)}
    assert served == {"east", "west"}
    for name in ("east", "west"):
        assert envoy.stat(f"wasmcustom.spillway_circuit_opens_total.backend.{name}") == 0
        assert gauge(envoy, "spillway_backend_circuit_open", name) == 0
    gone = sum(envoy.stat(f"wasmcustom.spillway_upstream_requests_total.backend.{n}.class.client_gone")
               for n in ("east", "west"))
    assert gone >= 8, envoy.stats()
    assert envoy.stat("wasmcustom.spillway_upstream_requests_total.backend.east.class.reset") == 0
    assert envoy.stat("wasmcustom.spillway_requests_total.client.team.class.client_gone") == 10
    # Giving up is not free: the abandoned requests' estimates (5000+ tokens
    # each, 1000 for each upload by its announced size) stay charged.
    remaining = int(envoy.chat(headers=headers).headers["x-ratelimit-remaining-tokens"])
    refilled = 100000 / 60 * 10  # at most 10 s of refill since the first charge
    assert remaining < 100000 - 8 * 5000 - 2 * 1000 + refilled, remaining


def test_a_probe_whose_client_leaves_is_given_back(start_mock, start_envoy):
    east = start_mock("east", "key-east")
    west = start_mock("west", "key-west")
    envoy = start_envoy({
        "backends": [backend_entry(east), backend_entry(west, priority=2)],
        "circuit_breaker": {"consecutive_failures": 2, "open_s": 2},
    })
    east.configure(fail_next=[{"status": 503}, {"status": 503}])
    for _ in range(2):
        assert envoy.chat().headers["x-spillway-backend"] == "west"
    time.sleep(2.2)
    # The half-open probe goes to east, which hangs; its client gives up.
    east.configure(fail_next=[{"hang": True}])
    _give_up(envoy, 0.3)
    time.sleep(0.2)
    # The probe is free again at once (not after the 2 s lease): the next request probes.
    r = envoy.chat()
    assert r.status_code == 200 and r.headers["x-spillway-backend"] == "east", r.headers


# --- a backend's key never reaches another backend --------------------------------------------

def test_each_attempt_carries_exactly_its_backends_credential(start_mock, start_envoy):
    keyed = start_mock("keyed", "key-of-keyed")
    # Entra-style backend: no key configured, the client's own token passes.
    passthrough = start_mock("passthrough", "client-token")
    envoy = start_envoy({"backends": [backend_entry(keyed), {"name": "passthrough", "url": passthrough.url}]})
    client = {"authorization": "Bearer client-token"}
    # Round robin starts on the keyed backend, then the pass-through one;
    # the first backend of each request fails, so it fails over to the other.
    for first, second in ((keyed, passthrough), (passthrough, keyed)):
        first.configure(fail_next=[{"status": 503}])
        r = envoy.chat(headers=client)
        assert r.status_code == 200 and r.headers["x-spillway-attempts"] == "2", r.text
        assert r.headers["x-spillway-backend"] == second.name
        assert [rec["status"] for rec in first.requests()][-1] == 503
    seen = {name: [rec["headers"] for rec in m.requests()] for name, m in
            (("keyed", keyed), ("passthrough", passthrough))}
    for h in seen["keyed"]:
        assert h.get("api-key") == "key-of-keyed" and "authorization" not in h, h
    for h in seen["passthrough"]:
        assert h.get("authorization") == "Bearer client-token" and "api-key" not in h, h
    # What travels between attempts names the stash; it is not the secret.
    stash = seen["keyed"][-1]["x-spillway-credential"]
    assert "client-token" not in stash and len(stash) > 32


def test_with_gateway_keys_a_pass_through_backend_gets_no_credential(start_mock, start_envoy):
    keyed = start_mock("keyed", "key-of-keyed")
    passthrough = start_mock("passthrough")
    envoy = start_envoy({
        "backends": [backend_entry(keyed), {"name": "passthrough", "url": passthrough.url, "priority": 2}],
        "clients": [{"name": "team", "key": "team-key-123"}],
    })
    keyed.configure(fail_next=[{"status": 503}])
    r = envoy.chat(headers={"api-key": "team-key-123"})
    assert r.status_code == 200 and r.headers["x-spillway-backend"] == "passthrough", r.text
    h = passthrough.requests()[-1]["headers"]
    assert "api-key" not in h and "authorization" not in h, h
    assert "team-key-123" not in json.dumps(passthrough.requests() + keyed.requests())


# --- a broken stream ends visibly and counts against its backend ------------------------------

def _stream(envoy, **kw):
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    return envoy.client.stream("POST", CHAT_PATH, json=body, timeout=kw.get("timeout", 15))


def test_a_stream_the_backend_breaks_off_ends_visibly_and_counts(start_mock, start_envoy):
    east = start_mock("east", "key-east", "--stream-chunks", "8")
    west = start_mock("west", "key-west")
    envoy = start_envoy({"backends": [backend_entry(east), backend_entry(west, priority=2)],
                         "circuit_breaker": {"consecutive_failures": 2, "open_s": 60}})
    for _ in range(2):
        east.configure(fail_next=[{"reset_after_events": 2}])
        received = b""
        with pytest.raises(httpx.RemoteProtocolError):
            with _stream(envoy) as r:
                assert r.status_code == 200 and r.headers["x-spillway-backend"] == "east"
                for chunk in r.iter_raw():
                    received += chunk
        # What arrived is the start of the stream, never its end.
        assert b"data: " in received and b"[DONE]" not in received
    assert envoy.stat("wasmcustom.spillway_answers_cut_total.backend.east.class.backend") == 2
    assert envoy.stat("wasmcustom.spillway_circuit_opens_total.backend.east") == 1
    # East is out: the next stream goes to west and completes.
    with _stream(envoy) as r:
        text = r.read()
    assert r.headers["x-spillway-backend"] == "west" and text.rstrip().endswith(b"data: [DONE]")


def test_a_complete_or_abandoned_stream_does_not_count_against_its_backend(start_mock, start_envoy):
    east = start_mock("east", "key-east", "--stream-chunks", "6", "--stream-chunk-delay-ms", "200")
    envoy = start_envoy({"backends": [backend_entry(east)],
                         "circuit_breaker": {"consecutive_failures": 1, "open_s": 60}})
    with _stream(envoy) as r:
        assert r.read().rstrip().endswith(b"data: [DONE]")
    # A client that reads one chunk and hangs up.
    for _ in range(3):
        with _stream(envoy) as r:
            next(r.iter_raw())
    time.sleep(1.5)
    assert envoy.stat("wasmcustom.spillway_answers_cut_total.backend.east.class.client_gone") == 3
    assert envoy.stat("wasmcustom.spillway_answers_cut_total.backend.east.class.backend") == 0
    assert envoy.stat("wasmcustom.spillway_circuit_opens_total.backend.east") == 0
    assert envoy.chat().status_code == 200


def test_a_hung_backend_is_cut_by_the_idle_timeout(start_mock, start_envoy):
    """The hang policy: with attempt_idle_timeout_s, a backend that goes
    silent before answering is failed over; one that goes silent mid-stream
    is cut (the client sees the break) and counted against it."""
    east = start_mock("east", "key-east")
    west = start_mock("west", "key-west")
    envoy = start_envoy({"backends": [backend_entry(east), backend_entry(west, priority=2)],
                         "attempt_idle_timeout_s": 1,
                         "circuit_breaker": {"consecutive_failures": 5, "open_s": 60}})
    east.configure(fail_next=[{"hang": True}])
    started = time.monotonic()
    r = envoy.chat()
    assert r.status_code == 200 and r.headers["x-spillway-backend"] == "west", r.text
    assert 0.9 < time.monotonic() - started < 5
    east.configure(stream_chunk_delay_ms=3000)
    with pytest.raises(httpx.RemoteProtocolError):
        with _stream(envoy) as r:
            assert r.headers["x-spillway-backend"] == "east"
            for _ in r.iter_raw():
                pass
    assert envoy.stat("wasmcustom.spillway_answers_cut_total.backend.east.class.backend") == 1
    assert envoy.stat("wasmcustom.spillway_upstream_requests_total.backend.east.class.reset") == 1


# --- small ones ---------------------------------------------------------------------------------

def test_retry_after_hints_are_read_as_meant(start_mock, start_envoy):
    east = start_mock("east", "key-east")
    west = start_mock("west", "key-west")
    envoy = start_envoy({"backends": [backend_entry(east), backend_entry(west, priority=2)]})
    # retry-after-ms: 0 is no hint; the valid retry-after behind it counts.
    east.configure(fail_next=[{"status": 429, "retry_after_ms": "0", "retry_after": "7"}])
    west.configure(fail_next=[{"status": 429, "retry_after_ms": "0", "retry_after": "7"}])
    r = envoy.chat()
    assert r.status_code == 429 and r.headers["retry-after"] == "7", r.headers
    assert 6000 < int(r.headers["retry-after-ms"]) <= 7000
    time.sleep(7.1)
    # An HTTP-date in the past means "now": east is used again at once, not
    # after the 10 s default.
    east.configure(fail_next=[{"status": 429, "retry_after": "Sun, 06 Nov 1994 08:49:37 GMT"}])
    assert envoy.chat().headers["x-spillway-backend"] == "west"
    assert envoy.chat().headers["x-spillway-backend"] == "east"


def test_a_backend_whose_name_does_not_resolve_leaves_rotation(start_mock, start_envoy):
    """Envoy answers "no healthy upstream" before any attempt runs: the one
    request that meets it gets that 503 (in the OpenAI shape), and the backend
    is out at once, for every later request and as a fallback."""
    east = start_mock("east", "key-east")
    west = start_mock("west", "key-west")
    envoy = start_envoy({"backends": [
        {"name": "nowhere", "url": "http://spillway-nowhere.invalid", "api_key": "k"},
        backend_entry(east),
        backend_entry(west, priority=2),
    ], "circuit_breaker": {"consecutive_failures": 5, "open_s": 60}})
    answers = [envoy.chat() for _ in range(6)]
    assert [r.status_code for r in answers].count(503) == 1, [r.status_code for r in answers]
    failed = next(r for r in answers if r.status_code == 503)
    assert failed.json()["error"]["type"] == "server_error"
    assert {r.headers.get("x-spillway-backend") for r in answers if r.status_code == 200} == {"east"}
    assert envoy.stat("wasmcustom.spillway_circuit_opens_total.backend.nowhere") == 1
    wait_until(lambda: gauge(envoy, "spillway_backend_circuit_open", "nowhere") == 1, timeout=5)
    # As a fallback it is skipped too: east fails, west (not "nowhere") takes over.
    east.configure(fail_next=[{"status": 503}])
    r = envoy.chat()
    assert r.status_code == 200 and r.headers["x-spillway-backend"] == "west"
    assert "Envoy has no host for it" in envoy.log()


def test_when_envoy_declines_a_retry_the_client_still_gets_an_honest_answer(start_mock, start_envoy):
    """With no retry capacity at all (a cluster limit of 0 retries), Envoy
    declines every failover: the client gets the first backend's 429 with a
    retry-after that is true for the gateway, and no failover is counted."""
    def no_retries(bootstrap):
        for cluster in bootstrap["static_resources"]["clusters"]:
            cluster["circuit_breakers"] = {"thresholds": [{"priority": "DEFAULT", "max_retries": 0}]}

    east = start_mock("east", "key-east")
    west = start_mock("west", "key-west")
    envoy = start_envoy({"backends": [backend_entry(east), backend_entry(west)]}, edit=no_retries)
    east.configure(fail_next=[{"status": 429, "retry_after": "30"}])
    r = envoy.chat()
    assert r.status_code == 429 and r.headers["x-spillway-backend"] == "east", r.text
    # West is free right now: the honest wait is the shortest, not east's 30 s.
    assert r.headers["retry-after"] == "1"
    assert "x-spillway-retry" not in r.headers
    assert envoy.stat("cluster.spillway_east.upstream_rq_retry_overflow") == 1
    assert envoy.stat("wasmcustom.spillway_failovers_total.backend.east") == 0
    assert west.count() == 0
    # The next request goes to west at once, as the answer said it could.
    assert envoy.chat().headers["x-spillway-backend"] == "west"
