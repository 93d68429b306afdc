"""Quota-aware routing: every answer's `x-ratelimit-remaining-*` (and
`x-ratelimit-limit-*`) teaches Spillway what each backend has left; requests
go where that covers their estimate, a 429 about one request's size throttles
no one, and clients see what the pool has left. `routing: "reactive"` is the
behaviour before (learn only from 429s), kept as the comparison."""

import pytest

from conftest import backend_entry

MINUTE = ("--window-ms", "60000")


def upstream_429s(*mocks) -> int:
    return sum(m.stats()["by_status"].get("429", 0) for m in mocks)


@pytest.mark.parametrize("routing", ["reactive", "quota_aware"])
def test_uneven_quotas_are_used_without_a_429(start_mock, start_envoy, routing):
    # east can take seven requests of 401 tokens (max_tokens 400 and the
    # prompt), west two: eight fit into the two together.
    east = start_mock("east", "key-east", "--tokens-per-window", "3000", *MINUTE)
    west = start_mock("west", "key-west", "--tokens-per-window", "1000", *MINUTE)
    envoy = start_envoy({"backends": [backend_entry(east), backend_entry(west)], "routing": routing})
    answers = [envoy.chat(max_tokens=400) for _ in range(8)]
    assert [r.status_code for r in answers] == [200] * 8
    if routing == "reactive":
        # Round robin sends west its share until it answers 429.
        assert upstream_429s(east, west) >= 1
    else:
        # west said how much it had left: nothing was sent that it refused.
        assert upstream_429s(east, west) == 0
        assert envoy.stat("wasmcustom.spillway_throttle_events_total.backend.west") == 0


@pytest.mark.parametrize("routing", ["reactive", "quota_aware"])
def test_one_oversized_request_leaves_the_others_served(trio, routing):
    envoy, east, west, paygo = trio({"routing": routing})
    for m in (east, west, paygo):
        m.configure(tokens_per_window=2000, window_ms=60000)
    warm = envoy.chat(max_tokens=10)  # teaches the limits (quota-aware)
    assert warm.status_code == 200
    huge = envoy.chat(max_tokens=50_000)
    assert huge.status_code == 429
    assert huge.headers["x-spillway-attempts"] == "3"
    small = [envoy.chat(max_tokens=10) for _ in range(4)]
    if routing == "reactive":
        # Every backend answered the huge request with 429: all throttled.
        assert [r.status_code for r in small] == [429] * 4
    else:
        # Each 429 was about that request's size: nobody is throttled.
        assert [r.status_code for r in small] == [200] * 4
        assert envoy.stat("wasmcustom.spillway_sized_out_total.backend.east") == 1
        assert all(envoy.stat(f"wasmcustom.spillway_backend_throttled.backend.{b}") == 0
                   for b in ("east", "west", "paygo"))


def test_answers_report_what_the_pool_has_left(start_mock, start_envoy):
    east = start_mock("east", "key-east", "--tokens-per-window", "5000", "--requests-per-window", "50", *MINUTE)
    west = start_mock("west", "key-west", "--tokens-per-window", "5000", "--requests-per-window", "50", *MINUTE)
    envoy = start_envoy({"backends": [backend_entry(east), backend_entry(west)]})
    first = envoy.chat(max_tokens=100)
    # One backend known: what it reported (5000 - 101 tokens, 50 - 1 requests).
    assert 4899 <= int(first.headers["x-ratelimit-remaining-tokens"]) < 4920
    assert first.headers["x-ratelimit-remaining-requests"] == "49"
    served = {first.headers["x-spillway-backend"]: 1}
    while len(served) < 2:
        last = envoy.chat(max_tokens=100)
        served[last.headers["x-spillway-backend"]] = served.get(last.headers["x-spillway-backend"], 0) + 1
        assert sum(served.values()) < 20
    # Both known: the sum of what each has left (each answer costs 101
    # tokens; what the other reported earlier refills a little meanwhile).
    n = sum(served.values())
    assert 10_000 - n * 101 <= int(last.headers["x-ratelimit-remaining-tokens"]) <= 10_000 - n * 101 + 50
    assert last.headers["x-ratelimit-remaining-requests"] == str(100 - n)
    # One backend's limit next to the pool's remaining would mislead: gone.
    assert "x-ratelimit-limit-tokens" not in last.headers


def test_a_client_limit_lower_than_the_pool_is_what_the_client_sees(start_mock, start_envoy):
    east = start_mock("east", "key-east", "--tokens-per-window", "100000", *MINUTE)
    envoy = start_envoy({"backends": [backend_entry(east)],
                         "clients": [{"name": "team", "key": "key-of-the-team", "tokens_per_minute": 2000}]})
    r = envoy.chat(max_tokens=100, headers={"api-key": "key-of-the-team"})
    assert r.status_code == 200
    assert int(r.headers["x-ratelimit-remaining-tokens"]) < 2000


def test_local_429s_tell_the_sdk_a_wait_it_obeys(trio):
    envoy, east, west, paygo = trio()
    for m in (east, west, paygo):
        m.configure(fail_next=[{"status": 429, "retry_after": "120"}])
    assert envoy.chat().status_code == 429
    local = envoy.chat()
    assert local.status_code == 429 and local.headers["x-spillway-attempts"] == "0"
    # The whole wait in seconds; the milliseconds stop at the 60 s the
    # openai SDK obeys (above it, it would retry after its own short backoff).
    assert 100 <= int(local.headers["retry-after"]) <= 120
    assert int(local.headers["retry-after-ms"]) == 60000


def test_low_tier_clients_spill_to_pay_as_you_go_before_the_ptu_reserve(start_mock, start_envoy):
    # The PTU takes four requests of 401 tokens (2,000 per minute) and
    # reports its utilisation; 40 % of it is kept for the high tier.
    ptu = start_mock("ptu", "key-ptu", "--tokens-per-window", "2000", *MINUTE)
    ptu.configure(provisioned=True)
    paygo = start_mock("paygo", "key-paygo")
    envoy = start_envoy({
        "backends": [backend_entry(ptu, provisioned=True, reserve_percent=40), backend_entry(paygo, priority=2)],
        "clients": [{"name": "interactive", "key": "key-of-interactive"},
                    {"name": "batch", "key": "key-of-the-batch", "tier": "low"}],
    })

    def ask(key):
        r = envoy.chat(max_tokens=400, headers={"api-key": key})
        assert r.status_code == 200
        return r.headers["x-spillway-backend"]

    # Batch uses the PTU up to 60 % (20 %, 40 %, 60 % after each), then spills.
    assert [ask("key-of-the-batch") for _ in range(5)] == ["ptu", "ptu", "ptu", "paygo", "paygo"]
    # Interactive still gets the PTU's reserve, until it is really full.
    assert [ask("key-of-interactive") for _ in range(2)] == ["ptu", "paygo"]
    assert ptu.stats()["by_status"] == {"200": 4}


def test_clients_cannot_forge_their_estimate_or_tier(start_mock, start_envoy):
    east = start_mock("east", "key-east", "--tokens-per-window", "100000", *MINUTE)
    west = start_mock("west", "key-west", "--tokens-per-window", "100000", *MINUTE)
    envoy = start_envoy({"backends": [backend_entry(east), backend_entry(west)],
                         "clients": [{"name": "batch", "key": "key-of-the-batch", "tier": "low"},
                                     {"name": "app", "key": "key-of-the-app"}]})
    forged = {"x-spillway-estimate": "1", "x-spillway-tier": "low"}
    r = envoy.chat(max_tokens=5000, headers={"api-key": "key-of-the-app", **forged})
    assert r.status_code == 200
    seen = [req["headers"] for m in (east, west) for req in m.requests()]
    assert len(seen) == 1
    # The estimate the attempts route on is Spillway's own (the budget and
    # the prompt), and a high-tier client's request carries no tier.
    assert int(seen[0]["x-spillway-estimate"]) > 5000
    assert "x-spillway-tier" not in seen[0]
