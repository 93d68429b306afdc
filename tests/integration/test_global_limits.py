"""Client limits that hold across Envoy replicas: two Envoys with Spillway,
one rate-limit service (spillway-ratelimit, Envoy's RLS protocol) and one
Redis on loopback, one client spreading its requests over both replicas.

What each test checks is what a user would see: how many requests were
served and refused, what the backend billed, the 429's wait, and what
happens when Redis or the service goes away.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import backend_entry
from harness import RateLimitService, Redis, wait_until

KEY = "key-of-team-global"
CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"


@pytest.fixture
def services():
    """Redis and the rate-limit service; stopped after the test."""
    started = []

    def start(with_redis: bool = True):
        redis = Redis() if with_redis else None
        if redis:
            started.append(redis)
        rls = RateLimitService(redis)
        started.append(rls)
        return redis, rls

    yield start
    for s in reversed(started):
        s.stop()


def filter_config(mock, rls_address: str | None, failure_mode: str = "open", **limits) -> dict:
    config = {
        "backends": [backend_entry(mock)],
        "clients": [{"name": "team", "key": KEY, **limits}],
    }
    if rls_address is not None:
        config["global_limits"] = {"service": rls_address, "failure_mode": failure_mode, "timeout_ms": 500}
    return config


def body(max_tokens: int = 200) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}).encode()


def estimate(raw: bytes, max_tokens: int) -> int:
    """What admission charges: the body's size in tokens plus the completion budget."""
    return -(-len(raw) // 4) + max_tokens


def post(envoy, raw: bytes) -> httpx.Response:
    return envoy.client.post(CHAT, content=raw, headers={"api-key": KEY, "content-type": "application/json"})


def spread(replicas, raw: bytes, n: int) -> list[httpx.Response]:
    """`n` requests one after another, alternating between the replicas."""
    return [post(replicas[i % len(replicas)], raw) for i in range(n)]


def billed(mock) -> int:
    usage = mock.stats()["usage"]
    return sum(d["prompt_tokens"] + d["completion_tokens"] for d in usage.values())


def stat_sum(replicas, name: str) -> int:
    return sum(e.stat(f"wasmcustom.{name}") for e in replicas)


@pytest.mark.parametrize("mode", ["global", "local"])
def test_the_request_limit_holds_across_two_replicas(start_mock, start_envoy, services, mode):
    mock = start_mock("east")
    rls_address = services()[1].address if mode == "global" else None
    config = filter_config(mock, rls_address, requests_per_minute=10)
    replicas = [start_envoy(config), start_envoy(config)]
    answers = spread(replicas, body(), 26)
    served = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert len(served) + len(refused) == 26
    if mode == "local":
        # Each replica keeps its own count: the client gets twice its limit.
        assert len(served) == 20
        return
    assert len(served) == 10
    assert mock.count() == 10
    # The refusals are the client's own, OpenAI-shaped, with the service's wait.
    error = refused[0].json()["error"]
    assert error["type"] == "rate_limit_error" and "request rate limit" in error["message"]
    assert 1 <= int(refused[0].headers["retry-after"]) <= 60
    assert refused[0].headers["x-ratelimit-remaining-requests"] == "0"
    # What each answer says is left counts both replicas' requests.
    assert [r.headers["x-ratelimit-remaining-requests"] for r in served] == [str(9 - i) for i in range(10)]


def test_the_token_limit_holds_across_two_replicas(start_mock, start_envoy, services):
    mock = start_mock("east")
    tpm = 3000
    config = filter_config(mock, services()[1].address, tokens_per_minute=tpm)
    replicas = [start_envoy(config), start_envoy(config)]
    raw = body(200)
    answers = spread(replicas, raw, 20)
    served = sum(r.status_code == 200 for r in answers)
    # Each request is charged its estimate at admission; the mock bills less
    # (the rest is not given back until the window ends).
    assert served == tpm // estimate(raw, 200)
    assert billed(mock) <= tpm
    last = answers[-1]
    assert last.status_code == 429
    assert "token rate limit" in last.json()["error"]["message"]


def test_usage_beyond_the_estimate_is_charged_and_the_overshoot_stays_within_its_bound(
        start_mock, start_envoy, services):
    """A backend that bills more than the estimate (here: 300 completion
    tokens for `max_tokens: 1`): requests in flight at once can pass the limit
    by what they use beyond their estimates, no more; once their corrections
    reach the service, the client is refused."""
    mock = start_mock("east")
    mock.configure(stream_chunks=300)
    tpm = 1000
    config = filter_config(mock, services()[1].address, tokens_per_minute=tpm)
    replicas = [start_envoy(config), start_envoy(config)]
    raw = body(1)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: post(replicas[i % 2], raw), range(6)))
    assert [r.status_code for r in answers] == [200] * 6
    used = [r.json()["usage"]["total_tokens"] for r in answers]
    excess = sum(u - estimate(raw, 1) for u in used)
    assert billed(mock) == sum(used) > tpm
    # The documented bound: the limit plus what in-flight requests used
    # beyond their estimates.
    assert sum(used) <= tpm + excess
    # The corrections go out on each replica's next tick (every 100 ms).
    time.sleep(0.5)
    refused = post(replicas[0], raw)
    assert refused.status_code == 429
    assert "token rate limit" in refused.json()["error"]["message"]
    assert post(replicas[1], raw).status_code == 429
    assert mock.count() == 6


def test_redis_stopped_mid_run_with_failure_mode_open_admits_uncharged_and_recovers(
        start_mock, start_envoy, services):
    mock = start_mock("east")
    redis, rls = services()
    config = filter_config(mock, rls.address, "open", requests_per_minute=3)
    replicas = [start_envoy(config), start_envoy(config)]
    assert [r.status_code for r in spread(replicas, body(), 4)] == [200, 200, 200, 429]
    redis.stop()
    answers = spread(replicas, body(), 6)
    assert [r.status_code for r in answers] == [200] * 6
    assert mock.count() == 9
    assert stat_sum(replicas, "spillway_limit_service_failures_total.reason.admitted") == 6
    for envoy in replicas:
        assert "rate-limit service: gRPC status" in envoy.log()
        assert "admitting requests uncharged (failure_mode open)" in envoy.log()
    # Redis back (empty, as after a restart without persistence): limits
    # apply again without restarting anything.
    redis.start()
    statuses = wait_until(lambda: (s := [r.status_code for r in spread(replicas, body(), 4)]).count(429) and s,
                          timeout=10, what="limits applied again")
    assert statuses.count(200) <= 3


def test_redis_stopped_mid_run_with_failure_mode_closed_refuses_with_a_503(start_mock, start_envoy, services):
    mock = start_mock("east")
    redis, rls = services()
    config = filter_config(mock, rls.address, "closed", requests_per_minute=100)
    replicas = [start_envoy(config), start_envoy(config)]
    assert [r.status_code for r in spread(replicas, body(), 2)] == [200, 200]
    redis.stop()
    answers = spread(replicas, body(), 4)
    assert [r.status_code for r in answers] == [503] * 4
    error = answers[0].json()["error"]
    assert error["code"] == "rate_limit_service_unavailable" and error["type"] == "server_error"
    assert answers[0].headers["retry-after"] == "1"
    assert mock.count() == 2
    assert stat_sum(replicas, "spillway_limit_service_failures_total.reason.refused") == 4
    assert "refusing requests (failure_mode closed)" in replicas[0].log()
    # The service itself gone: the same, promptly.
    rls.stop()
    started = time.monotonic()
    assert post(replicas[1], body()).status_code == 503
    assert time.monotonic() - started < 2


def test_a_client_without_limits_never_waits_for_the_service(start_mock, start_envoy, services):
    mock = start_mock("east")
    config = filter_config(mock, "127.0.0.1:9", "closed", requests_per_minute=5)
    config["clients"].append({"name": "open-team", "key": "key-of-open-team"})
    envoy = start_envoy(config)
    # Nothing listens on port 9: the limited client is refused (closed) ...
    assert post(envoy, body()).status_code == 503
    # ... while a client without limits is served without asking.
    r = envoy.client.post(CHAT, content=body(), headers={"api-key": "key-of-open-team"})
    assert r.status_code == 200
    assert mock.count() == 1
