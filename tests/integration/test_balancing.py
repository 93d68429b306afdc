"""Selection, failover and rewriting through a real Envoy with the built filter."""

import time
from collections import Counter

import httpx
import pytest
from conftest import backend_entry


def served_by(responses):
    return Counter(r.headers["x-spillway-backend"] for r in responses)


def test_round_robin_is_even_across_worker_threads(start_mock, start_envoy):
    mocks = [start_mock(n, f"key-{n}") for n in ("a", "b", "c")]
    envoy = start_envoy({"backends": [backend_entry(m) for m in mocks]}, concurrency=2)
    # New connections land on either worker; the counter lives in shared data.
    responses = [httpx.post(f"{envoy.url}/v1/chat/completions",
                            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                            headers={"connection": "close"}) for _ in range(30)]
    assert all(r.status_code == 200 for r in responses)
    assert served_by(responses) == {"a": 10, "b": 10, "c": 10}
    assert [m.count() for m in mocks] == [10, 10, 10]


def test_weights_set_the_share(start_mock, start_envoy):
    heavy, light = start_mock("heavy", "k1"), start_mock("light", "k2")
    envoy = start_envoy({"backends": [backend_entry(heavy, weight=3), backend_entry(light, weight=1)]})
    responses = [envoy.chat() for _ in range(40)]
    assert served_by(responses) == {"heavy": 30, "light": 10}
    # Smooth weighted round robin: the light backend is not starved for long runs.
    order = [r.headers["x-spillway-backend"] for r in responses[:8]]
    assert order.count("light") == 2


@pytest.mark.parametrize("routing", ["reactive", "quota_aware"])
def test_priority_spillover_when_the_preferred_backend_throttles(start_mock, start_envoy, routing):
    ptu = start_mock("ptu", "k-ptu", "--requests-per-window", "2", "--window-ms", "60000")
    paygo = start_mock("paygo", "k-paygo")
    envoy = start_envoy({"backends": [backend_entry(ptu), backend_entry(paygo, priority=2)], "routing": routing})
    first = [envoy.chat() for _ in range(2)]
    assert served_by(first) == {"ptu": 2}
    third = envoy.chat()
    assert third.status_code == 200
    assert third.headers["x-spillway-backend"] == "paygo"
    if routing == "reactive":
        # The third request hits the PTU quota (429) and fails over inside the same request.
        assert third.headers["x-spillway-attempts"] == "2"
    else:
        # The PTU deployment said it had no requests left: it is not asked.
        assert third.headers["x-spillway-attempts"] == "1"
    # The PTU deployment is left alone until its retry-after (or refill) has passed.
    later = [envoy.chat() for _ in range(5)]
    assert served_by(later) == {"paygo": 5}
    assert ptu.stats()["by_status"] == ({"200": 2, "429": 1} if routing == "reactive" else {"200": 2})


def test_throttled_backend_gets_nothing_until_its_deadline(trio):
    envoy, east, west, paygo = trio()
    east.configure(fail_next=[{"status": 429, "retry_after": "2"}])
    throttled_at = time.monotonic()
    r = envoy.chat()
    assert r.status_code == 200 and r.headers["x-spillway-backend"] == "west"
    assert r.headers["x-spillway-attempts"] == "2"
    while time.monotonic() - throttled_at < 1.5:
        assert envoy.chat().headers["x-spillway-backend"] == "west"
    assert east.count() == 1
    time.sleep(max(0.0, 2.2 - (time.monotonic() - throttled_at)))
    assert "east" in served_by([envoy.chat() for _ in range(2)])


def test_all_throttled_answers_429_with_the_soonest_retry_after(trio):
    envoy, east, west, paygo = trio()
    east.configure(fail_next=[{"status": 429, "retry_after": "30"}])
    west.configure(fail_next=[{"status": 429, "retry_after_ms": "4500", "retry_after": "5"}])
    paygo.configure(fail_next=[{"status": 429, "retry_after": "20"}])
    r = envoy.chat()
    # Every backend tried once within the request; the client sees one 429.
    assert r.status_code == 429
    assert r.headers["x-spillway-attempts"] == "3"
    assert r.headers["retry-after"] == "5"
    assert 4000 <= int(r.headers["retry-after-ms"]) <= 4500
    assert "x-spillway-retry" not in r.headers
    assert r.json()["error"]["code"] == "429"
    # The next request is answered by the gateway itself: no backend is called.
    before = [m.count() for m in (east, west, paygo)]
    local = envoy.chat()
    assert local.status_code == 429
    assert 1 <= int(local.headers["retry-after"]) <= 5
    assert local.headers["x-spillway-attempts"] == "0"
    assert local.json()["error"]["type"] == "rate_limit_error"
    assert [m.count() for m in (east, west, paygo)] == before


def test_5xx_fails_over_to_the_next_backend(trio):
    envoy, east, west, paygo = trio()
    east.configure(fail_next=[{"status": 503}])
    r = envoy.chat()
    assert r.status_code == 200
    assert (r.headers["x-spillway-backend"], r.headers["x-spillway-attempts"]) == ("west", "2")
    assert "Hello from west" in r.json()["choices"][0]["message"]["content"]


def test_reset_before_response_fails_over(trio):
    envoy, east, west, paygo = trio()
    east.configure(fail_next=[{"reset": True}])
    r = envoy.chat()
    assert r.status_code == 200
    assert (r.headers["x-spillway-backend"], r.headers["x-spillway-attempts"]) == ("west", "2")


def test_connection_refused_fails_over_and_opens_the_circuit(start_mock, start_envoy):
    from harness import free_port
    live = start_mock("live", "k-live")
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    envoy = start_envoy({
        "backends": [{"name": "dead", "url": dead_url, "api_key": "k"}, backend_entry(live)],
        "circuit_breaker": {"consecutive_failures": 2, "open_s": 60},
    })
    responses = [envoy.chat() for _ in range(8)]
    assert all(r.status_code == 200 for r in responses)
    assert served_by(responses) == {"live": 8}
    attempts = [r.headers["x-spillway-attempts"] for r in responses]
    # Two requests pay for the dead backend, then the circuit keeps it out.
    assert attempts.count("2") == 2, attempts
    assert attempts[-4:] == ["1"] * 4


def test_rewrites_key_host_and_deployment_per_backend(trio):
    envoy, east, west, paygo = trio(east={"deployments": {"gpt-4o": "gpt-4o-ptu"}})
    east.configure(fail_next=[{"status": 429, "retry_after": "1"}])
    r = envoy.chat("gpt-4o", headers={"api-key": "client-key", "authorization": "Bearer client-token"},
                   api_version=None)
    assert r.status_code == 200 and r.headers["x-spillway-backend"] == "west"
    (east_req,), (west_req,) = east.requests(), west.requests()
    assert east_req["path"] == "/openai/deployments/gpt-4o-ptu/chat/completions"
    assert east_req["headers"]["api-key"] == "key-east"
    assert east_req["headers"]["host"] == east.address
    # The retry to west carries west's key, Host and the original deployment name.
    assert west_req["path"] == "/openai/deployments/gpt-4o/chat/completions"
    assert west_req["query"] == "api-version=2024-10-21"
    assert west_req["headers"]["api-key"] == "key-west"
    assert west_req["headers"]["host"] == west.address
    for req in (east_req, west_req):
        assert "authorization" not in req["headers"]
        assert "client-key" not in str(req["headers"]) and "client-token" not in str(req["headers"])


def test_client_api_version_is_kept(trio):
    envoy, east, west, paygo = trio()
    r = envoy.client.post("/openai/deployments/gpt-4o/embeddings?api-version=2023-05-15", json={"input": "x"})
    assert r.status_code == 200
    assert east.requests()[0]["query"] == "api-version=2023-05-15"


def test_client_cannot_steer_with_internal_headers(trio):
    envoy, east, west, paygo = trio()
    forged = {"x-spillway-cluster": "spillway_paygo", "x-spillway-tried": "east,west",
              "x-spillway-path": "/openai/deployments/evil/chat/completions"}
    responses = [envoy.chat(headers=forged) for _ in range(4)]
    assert served_by(responses) == {"east": 2, "west": 2}
    assert all(r.headers["x-spillway-attempts"] == "1" for r in responses)
    assert paygo.count() == 0
    assert all(req["path"] == "/openai/deployments/gpt-4o/chat/completions" for req in east.requests())


def test_large_body_is_retried(trio):
    envoy, east, west, paygo = trio()
    east.configure(fail_next=[{"status": 429, "retry_after": "1"}])
    big = "x" * (8 * 1024 * 1024)
    r = envoy.client.post("/openai/deployments/emb/embeddings", json={"input": big})  # api-version added by config
    assert r.status_code == 200
    assert r.headers["x-spillway-backend"] == "west"
    assert west.requests()[0]["body_len"] == east.requests()[0]["body_len"] > 8 * 1024 * 1024


def test_unknown_path_gets_openai_style_404(trio):
    envoy, east, west, paygo = trio()
    r = envoy.client.get("/admin")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"
    assert east.count() == west.count() == paygo.count() == 0


def test_non_retriable_status_goes_straight_to_the_client(trio):
    envoy, east, west, paygo = trio({"retry_on": [429]})
    east.configure(fail_next=[{"status": 500}])
    r = envoy.chat()
    assert r.status_code == 500
    assert (r.headers["x-spillway-backend"], r.headers["x-spillway-attempts"]) == ("east", "1")
    assert west.count() == 0


def test_no_reachable_backend_gives_an_openai_style_error(start_envoy):
    from harness import free_port
    envoy = start_envoy({"backends": [{"name": "gone", "url": f"http://127.0.0.1:{free_port()}"}],
                         "api_version": "2024-10-21"})
    r = envoy.chat()
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["type"] == "server_error" and "upstream connect error" in err["message"]


def test_attempt_timeout_fails_over_from_a_hung_backend_without_cutting_streams(trio):
    envoy, east, west, paygo = trio({"attempt_timeout_s": 1})
    east.configure(latency_ms=3000)
    started = time.monotonic()
    r = envoy.chat()
    assert (r.status_code, r.headers["x-spillway-backend"], r.headers["x-spillway-attempts"]) == (200, "west", "2")
    assert time.monotonic() - started < 2.5
    # The timeout covers the wait for the answer to start, not the stream.
    east.configure(latency_ms=0)
    for m in (east, west):
        m.configure(stream_chunks=6, stream_chunk_delay_ms=400)
    with envoy.client.stream("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                             json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as s:
        body = s.read().decode()
    assert s.status_code == 200 and body.rstrip().endswith("data: [DONE]")
    assert body.count('"content":"') >= 6


def test_a_throttled_backends_turns_are_shared_by_the_others(start_mock, start_envoy):
    a, b, c = (start_mock(n, f"key-{n}") for n in ("a", "b", "c"))
    envoy = start_envoy({"backends": [backend_entry(m) for m in (a, b, c)]})
    c.configure(fail_next=[{"status": 429, "retry_after": "60"}])
    served = [envoy.chat().headers["x-spillway-backend"] for _ in range(31)]
    # One request met c's 429 and failed over; the other thirty are split
    # evenly between a and b (not 2:1 to whichever follows c).
    assert served.count("c") == 0 and c.count() == 1
    assert abs(served.count("a") - served.count("b")) <= 1, served
