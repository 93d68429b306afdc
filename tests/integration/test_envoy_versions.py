"""Which Envoy versions run Spillway, and how (docs/envoy-versions.md).

Default run: the rendered demo config validates against the default Envoy.
With SPILLWAY_ENVOY_MATRIX=1 (scripts/test.sh --envoy-matrix sets it, with
SPILLWAY_ENVOY pointing at one version's binary) it also measures, for that
binary, what docs/envoy-versions.md claims: which config fields it knows, whether
it has a Wasm runtime, and what failover, streaming and large-body retries do with
the config stripped of the fields it does not know (the degraded mode).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from functools import cache
from pathlib import Path

import harness
import pytest
import yaml
from conftest import backend_entry
from harness import ENVOY, ROOT, free_port, render, validate

MATRIX = os.environ.get("SPILLWAY_ENVOY_MATRIX") == "1"
DEMO = json.loads((ROOT / "envoy" / "demo.json").read_text())
DEMO_ENV = {"EASTUS_KEY": "k-east", "WESTUS_KEY": "k-west", "PAYGO_KEY": "k-paygo"}

# Measured with scripts/test.sh --envoy-matrix; keep in step with docs/envoy-versions.md.
#   refresh: route retry_policy.refresh_cluster_on_retry is a known field
#   body_limit: route request_body_buffer_limit is a known field
#   wasm: the binary has a Wasm runtime (V8)
#   failover: after a 429 the same request is answered by the other backend
#   streaming: SSE chunks reach the client while the backend is still writing
#   large_body: an 8 MiB request body is resent after a 429 (to the other backend when
#               failover works, to the same one otherwise)
FULL = {"refresh": True, "body_limit": True, "wasm": True,
        "failover": True, "streaming": True, "large_body": True}
DEGRADED = {"refresh": False, "body_limit": True, "wasm": True,
            "failover": False, "streaming": True, "large_body": True}
NO_WASM = {"refresh": False, "body_limit": True, "wasm": False,
           "failover": None, "streaming": None, "large_body": None}
EXPECTED = {
    "1.36.4": DEGRADED,
    "1.37.0": DEGRADED,
    "1.38.2": DEGRADED,
    "1.38.3": NO_WASM,  # the PyPI wheel is built without a Wasm runtime
    "1.39.0": FULL,
    "1.39.3": FULL,
    "1.40.0": FULL,
}
# Fields a degraded config drops, by where they live in the rendered bootstrap.
OPTIONAL_FIELDS = {"refresh_cluster_on_retry": ("route", "retry_policy"),
                   "request_body_buffer_limit": ()}

matrix_only = pytest.mark.skipif(not MATRIX, reason="set SPILLWAY_ENVOY_MATRIX=1 (scripts/test.sh --envoy-matrix)")


@cache
def envoy_version() -> str:
    out = subprocess.run([str(ENVOY), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"/(\d+\.\d+\.\d+)/", out)
    assert m, out
    return m.group(1)


def expected() -> dict:
    v = envoy_version()
    if v not in EXPECTED:
        pytest.fail(f"Envoy {v} is not in the table: measure it and add it here and to docs/envoy-versions.md")
    return EXPECTED[v]


def first_route(doc: dict) -> dict:
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["route_config"]["virtual_hosts"][0]["routes"][0]


def strip(doc: dict, fields: set[str]) -> None:
    route = first_route(doc)
    for field in fields:
        node = route
        for key in OPTIONAL_FIELDS[field]:
            node = node[key]
        node.pop(field, None)


def validate_doc(doc: dict, tmp: Path, env: dict) -> subprocess.CompletedProcess:
    path = tmp / "envoy.yaml"
    path.write_text(json.dumps(doc))
    return subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path), "--disable-hot-restart",
                           "--base-id", str(free_port())],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=60)


@cache
def probe() -> tuple[frozenset[str], bool]:
    """(fields this Envoy does not know, whether it can run the filter), found by
    validating the rendered demo config and dropping each field Envoy names."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="spillway-probe-") as d:
        tmp = Path(d)
        doc = yaml.safe_load(render(DEMO, tmp, free_port(), free_port()).read_text())
        unknown: set[str] = set()
        for _ in range(len(OPTIONAL_FIELDS) + 1):
            r = validate_doc(doc, tmp, DEMO_ENV)
            if r.returncode == 0:
                return frozenset(unknown), True
            # Envoy varies the whitespace in these messages on purpose.
            m = re.search(r"no\s+such\s+field:\s+'(\w+)'", r.stderr)
            if m and m.group(1) in OPTIONAL_FIELDS and m.group(1) not in unknown:
                unknown.add(m.group(1))
                strip(doc, {m.group(1)})
                continue
            if re.search(r"compiled\s+without\s+support", r.stderr):
                return frozenset(unknown), False
            pytest.fail("Envoy refuses the config for another reason:\n" + r.stderr[-3000:])
    pytest.fail("probe did not settle")


@pytest.fixture
def compat_envoy(monkeypatch):
    """start_envoy, with the rendered config stripped of the fields this Envoy does not know."""
    unknown, runs = probe()
    if not runs:
        pytest.skip(f"Envoy {envoy_version()} has no Wasm runtime")
    original = harness.render
    started: list[harness.Envoy] = []

    def compat_render(filter_config, workdir, listen_port, admin_port, extra_args=None):
        path = original(filter_config, workdir, listen_port, admin_port, extra_args)
        doc = yaml.safe_load(path.read_text())
        strip(doc, set(unknown))
        path.write_text(json.dumps(doc))
        return path

    monkeypatch.setattr(harness, "render", compat_render)

    def start(filter_config, **kwargs) -> harness.Envoy:
        e = harness.Envoy(filter_config, **kwargs)
        started.append(e)
        return e

    yield start
    for e in started:
        e.stop()


def test_rendered_demo_config_validates():
    result = validate(DEMO, env=DEMO_ENV)
    ok = result.returncode == 0
    if MATRIX:
        assert ok == (expected() == FULL), result.stderr[-2000:]
    else:
        assert ok, result.stderr[-3000:]


@matrix_only
def test_known_fields_and_wasm_runtime_match_the_table():
    unknown, runs = probe()
    observed = {"refresh": "refresh_cluster_on_retry" not in unknown,
                "body_limit": "request_body_buffer_limit" not in unknown, "wasm": runs}
    assert observed == {k: expected()[k] for k in observed}, f"Envoy {envoy_version()}: {observed}"


def pair(start_mock, compat_envoy):
    east, west = start_mock("east", "key-east"), start_mock("west", "key-west")
    envoy = compat_envoy({"backends": [backend_entry(east), backend_entry(west, priority=2)],
                          "api_version": "2024-10-21"})
    return envoy, east, west


@matrix_only
def test_failover_on_429(start_mock, compat_envoy):
    envoy, east, west = pair(start_mock, compat_envoy)
    # A throttled deployment answers 429 to every attempt until its retry-after.
    east.configure(fail_next=[{"status": 429, "retry_after": "30"}] * 3)
    r = envoy.chat()
    failover = r.status_code == 200 and r.headers.get("x-spillway-backend") == "west"
    # Whatever the version: the attempt role ran (upstream Wasm filter) and set the key.
    assert east.requests()[0]["headers"]["api-key"] == "key-east"
    if not failover:
        # Degraded: the retry went to the same cluster again.
        print(f"Envoy {envoy_version()}: {r.status_code} {dict(r.headers)} east={east.count()} west={west.count()}")
    assert failover == expected()["failover"], (r.status_code, dict(r.headers), east.count(), west.count())
    # Either way the throttled backend is left alone by the next request.
    r = envoy.chat()
    assert (r.status_code, r.headers["x-spillway-backend"]) == (200, "west")


@matrix_only
def test_streaming_passes_through_live(start_mock, compat_envoy):
    envoy, east, west = pair(start_mock, compat_envoy)
    east.configure(stream_chunks=5, stream_chunk_delay_ms=300)
    payload = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    times = []
    start = time.monotonic()
    with envoy.client.stream("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                             json=payload) as r:
        status = r.status_code
        for line in r.iter_lines():
            if line.startswith("data: "):
                times.append(time.monotonic() - start)
    live = status == 200 and len(times) >= 5 and times[0] < times[-1] - 0.8
    assert live == expected()["streaming"], (status, times)


@matrix_only
def test_large_body_is_resent_on_retry(start_mock, compat_envoy):
    envoy, east, west = pair(start_mock, compat_envoy)
    east.configure(fail_next=[{"status": 429, "retry_after": "30"}])
    big = "x" * (8 * 1024 * 1024)
    r = envoy.client.post("/openai/deployments/emb/embeddings", json={"input": big})
    bodies = [q["body_len"] for m in (east, west) for q in m.requests()]
    # Above the 1 MiB connection buffer only request_body_buffer_limit lets Envoy resend.
    resent = r.status_code == 200 and len(bodies) == 2 and min(bodies) > 8 * 1024 * 1024
    assert resent == expected()["large_body"], (r.status_code, dict(r.headers), bodies)
    if resent and expected()["failover"]:
        assert r.headers["x-spillway-backend"] == "west"
