"""The shipped Grafana dashboard and Prometheus alert rules, proven against
a real Prometheus (Debian's) scraping a real Envoy with Spillway after a
scripted run: 429s, failovers, a flapping circuit, streams, two clients, a
client over its limit, and at the end every backend out. Every dashboard
query and every alert expression must return data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import backend_entry
from harness import ROOT, free_port, terminate, wait_until

sys.path.insert(0, str(ROOT / "deploy" / "grafana"))
import render_png  # noqa: E402

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
ALERTS = ROOT / "deploy" / "prometheus" / "spillway-alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "spillway-dashboard.json"

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None and os.environ.get("CI") != "true",
    reason="Debian's prometheus is not installed (scripts/setup.sh installs it)",
)

TEAM_A, TEAM_B = "key-of-team-a-1", "key-of-team-b-1"


class Prometheus:
    def __init__(self, workdir: Path, envoy_admin: str):
        self.port = free_port()
        shutil.copy(ALERTS, workdir / "spillway-alerts.yml")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["spillway-alerts.yml"],
            "scrape_configs": [{"job_name": "spillway-envoy", "metrics_path": "/stats/prometheus",
                                "static_configs": [{"targets": [envoy_admin.removeprefix("http://")]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=self.log)
        wait_until(lambda: httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200, 30, what="prometheus ready")
        # Prometheus starts scraping up to 5 s after it is ready (its target
        # discovery batches updates): the run must not start before.
        wait_until(lambda: self.query('up{job="spillway-envoy"} == 1'), 30, interval=0.2, what="first scrape")

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        assert r.status_code == 200, (expr, r.text)
        return r.json()["data"]["result"]

    def stop(self) -> None:
        terminate(self.proc, 10)
        self.log.close()


def scripted_run(envoy, east, west, paygo) -> None:
    """Two clients, chats and streams; 429s and 5xx on the way; team-a over
    its request limit; at the end all three backends throttled."""
    a, b = {"api-key": TEAM_A}, {"api-key": TEAM_B}
    # East refuses every request with a 1 ms retry-after: each one it gets
    # fails over, and it stays in rotation.
    east.configure(fail_next=[{"status": 429, "retry_after_ms": "1"}] * 500)
    for i in range(36):
        if i % 6 == 3:
            # Two 500s in a row open west's circuit (for 1 s).
            west.configure(fail_next=[{"status": 500}, {"status": 500}])
        envoy.chat(headers=a)
        envoy.chat(headers=b)
        with envoy.client.stream("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                                 json={"messages": [{"role": "user", "content": "hi"}], "stream": True,
                                       "stream_options": {"include_usage": True}}, headers=b) as r:
            assert r.status_code == 200 and r.read().rstrip().endswith(b"[DONE]")
        time.sleep(0.25)
    time.sleep(1.5)  # the loop's short throttles and open circuits end
    for mock in (east, west, paygo):
        mock.reset()
        mock.configure(fail_next=[{"status": 429, "retry_after": "300"}] * 3)
    for _ in range(15):
        r = envoy.chat(headers=b)
        everyone_refused = all(m.count() > 0 for m in (east, west, paygo))
        if everyone_refused and r.status_code == 429 and r.headers.get("x-spillway-attempts") == "0":
            return  # the gateway answered itself: every backend is out
        time.sleep(0.3)
    raise AssertionError("the backends never all went out")


def test_every_dashboard_query_and_alert_returns_data(start_mock, start_envoy, tmp_path):
    east = start_mock("east", "key-east")
    west = start_mock("west", "key-west")
    paygo = start_mock("paygo", "key-paygo")
    envoy = start_envoy({
        "backends": [backend_entry(east), backend_entry(west), backend_entry(paygo, priority=2)],
        "clients": [{"name": "team-a", "key": TEAM_A, "requests_per_minute": 20}, {"name": "team-b", "key": TEAM_B}],
        "circuit_breaker": {"consecutive_failures": 2, "open_s": 1},
    })
    prometheus = Prometheus(tmp_path, envoy.admin)
    try:
        started = time.time()
        scripted_run(envoy, east, west, paygo)
        # A few more scrapes and alert evaluations, and Envoy's 5 s
        # histogram flush, after the last request.
        time.sleep(7)
        dashboard = json.loads(DASHBOARD.read_text())
        empty = [(p["title"], t["expr"]) for p in render_png.panels(dashboard) for t in p["targets"]
                 if not prometheus.query(render_png.concrete(t["expr"]))]
        assert not empty, empty

        rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
        firing = {r["alert"]: prometheus.query(r["expr"]) for r in rules}
        # Nothing here makes a VM fail (the filter cannot trap by design):
        # that rule's series must exist and read zero reloads.
        vm = firing.pop("SpillwayVmFailures")
        assert vm == [] and prometheus.query("envoy_wasm_spillway_request_vm_reload"), vm
        debug = {q: [x["value"][1] for x in prometheus.query(q)] for q in (
            "sum(spillway_failovers_total)", "sum(spillway_requests_total)", "sum(rate(spillway_failovers_total[5m]))",
            "sum(rate(spillway_requests_total[5m]))", "spillway_circuit_opens_total", "increase(spillway_circuit_opens_total[30m])")}
        assert all(firing.values()), ({k: v for k, v in firing.items() if not v}, debug)
        assert {s["metric"]["backend"] for s in firing["SpillwayBackendThrottledLong"]} == {"east", "west", "paygo"}
        assert {s["metric"]["client"] for s in firing["SpillwayClientAtLimit"]} == {"team-a"}
        assert {s["metric"]["backend"] for s in firing["SpillwayCircuitFlapping"]} == {"west"}

        out = Path(os.environ.get("SPILLWAY_DASHBOARD_PNG", tmp_path / "dashboard.png"))
        render_png.render(prometheus.url, started, time.time(), out, rate_interval="10s")
        assert out.stat().st_size > 20_000
    finally:
        prometheus.stop()


def test_alert_rules_pass_promtool():
    if PROMTOOL is None:
        pytest.skip("promtool is not installed")
    check = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0 and "SUCCESS: 6 rules found" in check.stdout, check.stdout + check.stderr


def test_the_live_view_shows_each_backends_state_and_traffic(start_mock, start_envoy):
    east = start_mock("east", "key-east")
    west = start_mock("west", "key-west")
    envoy = start_envoy({"backends": [backend_entry(east), backend_entry(west)],
                         "clients": [{"name": "team-a", "key": TEAM_A}]})
    east.configure(fail_next=[{"status": 429, "retry_after": "120"}])
    for _ in range(6):
        assert envoy.chat(headers={"api-key": TEAM_A}).status_code == 200
    time.sleep(1.2)  # the state gauges refresh every second
    top = subprocess.run([sys.executable, str(ROOT / "scripts" / "spillway-top.py"), "--admin", envoy.admin,
                          "--once", "--interval", "0.5"], capture_output=True, text=True, timeout=30)
    assert top.returncode == 0, top.stderr
    rows = {line.split()[0]: line.split() for line in top.stdout.splitlines() if line.strip()}
    assert rows["east"][1] == "THROTTLED" and rows["west"][1] == "ok", top.stdout
    # west answered all six (2xx column); east's one 429 was failed over.
    assert rows["west"][3] == "6" and rows["east"][4] == "1" and rows["east"][7] == "1", top.stdout
    assert rows["team-a"][2] == "6", top.stdout
