"""`wait_for_backend_ms`: when every backend is out and the first is back
within that wait, a request is held until then instead of getting a 429;
each worker holds at most `max_waiting_requests`."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx


def throttle_all(envoy, mocks, retry_after: str) -> None:
    for m in mocks:
        m.configure(fail_next=[{"status": 429, "retry_after": retry_after}])
    r = envoy.chat()
    assert r.status_code == 429 and r.headers["x-spillway-attempts"] == "3"


def test_a_request_waits_for_the_first_backend_back(trio):
    envoy, east, west, paygo = trio({"wait_for_backend_ms": 3000})
    throttle_all(envoy, (east, west, paygo), "1")
    started = time.monotonic()
    r = envoy.chat()
    waited = time.monotonic() - started
    assert r.status_code == 200
    assert 0.5 <= waited < 2.0, waited
    assert envoy.stat("wasmcustom.spillway_waits_total") >= 1


def test_a_wait_longer_than_allowed_is_a_429_at_once(trio):
    envoy, east, west, paygo = trio({"wait_for_backend_ms": 3000})
    throttle_all(envoy, (east, west, paygo), "10")
    started = time.monotonic()
    r = envoy.chat()
    assert r.status_code == 429 and r.headers["x-spillway-attempts"] == "0"
    assert time.monotonic() - started < 0.5
    assert envoy.stat("wasmcustom.spillway_waits_total") == 0


def test_each_worker_holds_a_bounded_number_of_waiting_requests(trio):
    # Envoy runs two workers here: at most one waiting request each.
    envoy, east, west, paygo = trio({"wait_for_backend_ms": 3000, "max_waiting_requests": 1})
    throttle_all(envoy, (east, west, paygo), "2")

    def ask(_):
        started = time.monotonic()
        with httpx.Client(base_url=envoy.url, timeout=10) as c:
            r = c.post("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                       json={"messages": [{"role": "user", "content": "hi"}]})
        return r.status_code, time.monotonic() - started

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(8)))
    served = [t for status, t in results if status == 200]
    refused = [t for status, t in results if status == 429]
    assert 1 <= len(served) <= 2, results
    assert len(refused) >= 6 and all(t < 1.0 for t in refused), results
    assert all(t >= 1.0 for t in served), results


def test_a_client_that_leaves_while_waiting_frees_its_place(trio):
    envoy, east, west, paygo = trio({"wait_for_backend_ms": 3000, "max_waiting_requests": 1})
    throttle_all(envoy, (east, west, paygo), "2")
    with httpx.Client(base_url=envoy.url, timeout=0.3) as c:
        for _ in range(4):
            try:
                c.post("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                       json={"messages": [{"role": "user", "content": "hi"}]})
            except httpx.ReadTimeout:
                pass
    time.sleep(2.2)
    r = envoy.chat()
    assert r.status_code == 200
    assert sum(m.stats()["by_status"].get("200", 0) for m in (east, west, paygo)) == 1


def test_a_stream_that_waited_still_gets_its_usage_added(trio):
    # The body was complete (and read for its fields) before the request
    # waited; when it goes on, the request role rewrites Envoy's held copy.
    envoy, east, west, paygo = trio({"wait_for_backend_ms": 3000, "stream_usage": True})
    throttle_all(envoy, (east, west, paygo), "1")
    started = time.monotonic()
    with envoy.client.stream("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                             json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert time.monotonic() - started >= 0.5
    assert envoy.stat("wasmcustom.spillway_waits_total") >= 1
    served = [req for m in (east, west, paygo) for req in m.requests() if req.get("body_json", {}).get("stream")]
    assert len(served) == 1, served
    assert served[0]["body_json"]["stream_options"] == {"include_usage": True}
    # The client did not ask for usage: the usage-only chunk is not passed on.
    assert events and all('"choices":[]' not in e for e in events), events


def test_an_upload_that_is_not_json_waits_too(trio):
    # Not held for body fields: the request pauses at its headers, and its
    # body, handed to the filter all the same, stays buffered until it goes on.
    envoy, east, west, paygo = trio({"wait_for_backend_ms": 3000})
    throttle_all(envoy, (east, west, paygo), "1")
    before = sum(m.count() for m in (east, west, paygo))
    started = time.monotonic()
    r = envoy.client.post("/openai/deployments/whisper/audio/transcriptions?api-version=2024-10-21",
                          files={"file": ("a.wav", b"\0" * 4096, "audio/x-wav")}, data={"model": "whisper"})
    waited = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert waited >= 0.5, waited
    assert envoy.stat("wasmcustom.spillway_waits_total") >= 1
    assert sum(m.count() for m in (east, west, paygo)) == before + 1
    uploads = [q for m in (east, west, paygo) for q in m.requests() if q.get("body_len", 0) > 4096]
    assert len(uploads) == 1, uploads
