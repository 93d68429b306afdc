"""Host calls per request against a recorded budget: a guard against cost
regressions that times nothing. Every call from the VM into Envoy (a header,
a property, shared data, a metric, a log line) is counted by the filter
itself (`spillway_host_calls_total`, both roles together); the budgets are
what the current code needs, rounded up, and only ever go down."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from conftest import backend_entry

CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
KEY = "key-of-the-team-1"

# (scenario, request) -> budget per client request, both roles: all host
# calls, and those that copy a value into the VM (a header or a whole header
# map, a property, shared data, a body chunk), which cost several times the
# others (see BENCHMARKS.md, "Where the added CPU goes").
BUDGETS = {
    ("default", "chat"): (40, 11),
    ("default", "stream"): (37, 12),
    ("gateway", "chat"): (45, 13),
    ("gateway", "stream"): (50, 14),
}
VALUE_CALLS = ("header_get", "header_pairs", "property", "shared_data_get", "body_get")


def host_calls(envoy) -> dict[str, int]:
    found = re.findall(r"^wasmcustom\.spillway_host_calls_total\.call\.(\w+): (\d+)$", envoy.stats(), re.M)
    return {kind: int(n) for kind, n in found}


@pytest.mark.parametrize("mode", ["default", "gateway"])
def test_host_calls_per_request_stay_within_budget(start_mock, start_envoy, mode):
    # Like Azure, every answer reports the quota left (quota-aware routing,
    # the default, learns it: one shared-data update per answer).
    quota = ("--requests-per-window", "1000000", "--tokens-per-window", "1000000000")
    mocks = [start_mock(n, f"key-{n}", *quota) for n in ("east", "west", "central")]
    config = {"backends": [backend_entry(m) for m in mocks]}
    headers = {}
    if mode == "gateway":
        config |= {"clients": [{"name": "team", "key": KEY, "tokens_per_minute": 10_000_000}], "stream_usage": True}
        headers = {"api-key": KEY}
    envoy = start_envoy(config)
    measured, by_call = {}, {}
    for kind, n in (("chat", 200), ("stream", 100)):
        time.sleep(1.2)  # counted on the once-a-second tick
        before = host_calls(envoy)
        for _ in range(n):
            body = {"messages": [{"role": "user", "content": "hi"}], "stream": kind == "stream"}
            with envoy.client.stream("POST", CHAT, json=body, headers=headers) as r:
                assert r.status_code == 200
                r.read()
        time.sleep(1.2)
        after = host_calls(envoy)
        by_call[kind] = {c: (after[c] - before.get(c, 0)) / n for c in after}
        measured[kind] = (sum(by_call[kind].values()), sum(by_call[kind].get(c, 0) for c in VALUE_CALLS))
    print(mode, measured, by_call)
    over = {k: v for k, v in measured.items() if v[0] > BUDGETS[(mode, k)][0] or v[1] > BUDGETS[(mode, k)][1]}
    assert not over, (measured, "over budget", by_call)
    assert all(v[0] > 10 and v[1] > 5 for v in measured.values()), measured  # the counter counts
    # Quota-aware routing needs the request's estimate: the request role holds
    # the JSON body and reads its fields itself (the request body, then the
    # answer's), and asks the host for one property, the attempt's cluster.
    assert by_call["chat"].get("body_get", 0) == 2, by_call
    assert by_call["chat"].get("property", 0) == 1, by_call
