"""Bounded resources under real Envoy: the VM's memory for huge bodies and
answers in flight at once, client-chosen metric labels, shared-data keys."""

from __future__ import annotations

import json
import random
import re
import string
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from conftest import backend_entry

KEY = "key-of-the-team-1"


def prometheus(envoy) -> str:
    return httpx.get(f"{envoy.admin}/stats/prometheus", timeout=5).text


def sample(envoy, metric: str, labels: str = "") -> int:
    pattern = re.compile(rf"^{metric}{re.escape(labels or '{}')} (\d+)$", re.M)
    found = pattern.search(prometheus(envoy))
    return int(found.group(1)) if found else -1


def test_vm_memory_reaches_a_plateau_with_huge_bodies_and_answers_in_flight(start_mock, start_envoy):
    """32 MiB JSON requests that both roles rewrite (usage asked for a
    stream; the model renamed for the backend) and 4 MiB JSON answers,
    several at once, three rounds: each VM's memory stops growing after the
    first round and stays well below what keeping every body would take."""
    east = start_mock("east", "key-east")
    envoy = start_envoy({
        "backends": [backend_entry(east, models=["gpt-4o"], deployments={"gpt-4o": "gpt-4o-east"})],
        "clients": [{"name": "team", "key": KEY, "tokens_per_minute": 1_000_000_000}],
        "stream_usage": True,
    }, render_args=["--body-limit-bytes", str(40 << 20)])
    huge = json.dumps({"model": "gpt-4o", "stream": True, "max_tokens": 5,
                       "messages": [{"role": "user", "content": "x" * (32 << 20)}]}).encode()
    auth = {"api-key": KEY, "content-type": "application/json"}

    def big_request(_):
        with httpx.Client(base_url=envoy.url, timeout=120) as c:
            with c.stream("POST", "/openai/v1/chat/completions", content=huge, headers=auth) as r:
                return r.status_code, r.read()

    def big_answer(_):
        with httpx.Client(base_url=envoy.url, timeout=120) as c:
            # 27,000 embeddings: an answer of over 4 MiB.
            r = c.post("/openai/v1/embeddings", headers=auth, json={"model": "gpt-4o", "input": ["a"] * 27_000})
            return r.status_code, r.content

    memory = []
    for _ in range(3):
        with ThreadPoolExecutor(6) as pool:
            uploads = list(pool.map(big_request, range(3)))
            answers = list(pool.map(big_answer, range(6)))
        assert all(s == 200 and a.rstrip().endswith(b"[DONE]") for s, a in uploads), [s for s, _ in uploads]
        assert all(s == 200 and len(a) > 4 << 20 for s, a in answers), [(s, len(a)) for s, a in answers]
        time.sleep(1.3)  # the gauges refresh every second
        memory.append((sample(envoy, "spillway_vm_memory_bytes", '{role="request"}'),
                       sample(envoy, "spillway_vm_memory_bytes", '{role="attempt"}')))
    # Both rewrites reached the backend: usage asked for, the model renamed.
    grown = len('"stream_options":{"include_usage":true},') + len("gpt-4o-east") - len("gpt-4o")
    uploads_seen = [r for r in east.requests() if r["path"].endswith("/chat/completions")]
    assert uploads_seen and all(r["body_len"] == len(huge) + grown for r in uploads_seen)
    (first_req, first_att), (_, _), (last_req, last_att) = memory
    assert last_req == first_req and last_att == first_att, memory
    # One body and its rewrite at a time per VM, never one per request in
    # flight (3 x 32 MiB uploads and 6 x 4 MiB answers per round).
    assert 0 < last_req < 200 << 20 and 0 < last_att < 200 << 20, memory
    # Tokens were accounted from the kept ends of the 4 MiB answers.
    assert "spillway_tokens_total" in prometheus(envoy)


def test_client_chosen_deployment_names_cannot_grow_the_stats(start_mock, start_envoy):
    east = start_mock("east", "key-east")
    envoy = start_envoy({"backends": [backend_entry(east)]})
    rng = random.Random(7)
    names = ["".join(rng.choices(string.ascii_lowercase, k=100)) for _ in range(150)]
    for name in names:
        r = envoy.client.post("/openai/v1/chat/completions", json={"model": name, "messages": []})
        assert r.status_code == 200, r.text
    labels = set(re.findall(r'spillway_tokens_total\{[^}]*deployment="([^"]*)"', prometheus(envoy)))
    assert "other" in labels
    assert len(labels) <= 2 * 64 + 1 and all(len(v) <= 64 for v in labels), (len(labels), max(map(len, labels)))
    # A model name no deployment could have is refused before anything else.
    r = envoy.client.post("/openai/v1/chat/completions", json={"model": "m" * 300, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidModel"


def test_shared_data_keys_stay_within_their_bounds(start_mock, start_envoy):
    """Requests that create keys of every kind (client buckets, stashed
    credentials, response affinity, rotation, health): the key count the
    filter reports grows with the structures, never with the requests."""
    east = start_mock("east")
    west = start_mock("west")
    envoy = start_envoy({"backends": [{"name": "east", "url": east.url}, {"name": "west", "url": west.url}],
                         "clients": [{"name": "team", "key": KEY, "requests_per_minute": 100_000}]})
    auth = {"api-key": KEY}

    def burst(n: int) -> None:
        for _ in range(n):
            assert envoy.chat(headers=auth).status_code == 200
            r = envoy.client.post("/openai/v1/responses", headers=auth, json={"model": "gpt-4o", "input": "hi"})
            assert r.status_code == 200, r.text

    burst(20)
    time.sleep(1.3)
    after_20 = sample(envoy, "spillway_shared_data_keys")
    burst(200)
    time.sleep(1.3)
    after_220 = sample(envoy, "spillway_shared_data_keys")
    # Only response-affinity slots (one per stored response, 16,384 at most)
    # grow with traffic here; everything else was created by the first burst.
    assert 0 < after_20 <= after_220 <= after_20 + 200, (after_20, after_220)
