"""Spillway benchmarks: proxy overhead, selection micro-benchmark, goodput
under quotas, quota-aware routing. Started by `bench/run.sh` (which installs and builds first);
writes everything to `bench/results/`, then `report.py` draws the charts and
writes BENCHMARKS.md.

    bench/.venv/bin/python bench/bench.py [--quick] [--only overhead,selection,goodput,quota]

Every process listens on 127.0.0.1 with a port picked at run time and is
stopped at the end; every load run is bounded in requests and in time.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import shutil
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

import configs
import loadgen

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
RESULTS = BENCH / "results"
WASM = TARGET / "wasm32-wasip1" / "release" / "spillway.wasm"
TRIVIAL_WASM = TARGET / "wasm32-wasip1" / "release" / "spillway_bench_trivial_filter.wasm"
PROBE_WASM = TARGET / "wasm32-wasip1" / "release" / "spillway_bench_hostcall_cost.wasm"
# The filter as it was before the performance work (built by bench/run.sh
# from BENCH_BASELINE_REF), measured in the same run for before/after.
BASELINE_WASM = Path(os.environ.get("BENCH_BASELINE_WASM", TARGET / "baseline" / "spillway.wasm"))
PROBE_CALLS = 100
RENDER = TARGET / "release" / "spillway-render"
MOCK = TARGET / "release" / "spillway-mock"
SELECTION = TARGET / "release" / "spillway-bench-selection"
RATELIMIT = TARGET / "release" / "spillway-ratelimit"
ENVOY = Path(os.environ.get("SPILLWAY_ENVOY", ROOT / ".venv" / "bin" / "envoy"))
# The binary itself (the `envoy` on the venv's PATH is a Python launcher),
# for running it under valgrind.
ENVOY_BIN = Path(os.environ.get("SPILLWAY_ENVOY_BIN") or next(
    iter(sorted((ROOT / ".venv" / "lib").glob("python3*/site-packages/envoy/_bin/envoy"))), ROOT / "missing-envoy"))
OHA = Path(os.environ.get("BENCH_OHA", BENCH / ".tools" / "bin" / "oha"))
LITELLM = BENCH / ".venv" / "bin" / "litellm"

CHAT_PATH = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
BODY = json.dumps(loadgen.BODY)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process tree, seconds (from /proc/PID/stat)."""
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM summed over the process tree (kB)."""
    out = {"rss_kb": 0, "hwm_kb": 0}
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out["rss_kb"] += int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    out["hwm_kb"] += int(line.split()[1])
        except OSError:
            continue
    return out


def wait_until(pred, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}: {last}")


class Proc:
    def __init__(self, name: str, cmd: list[str], workdir: Path, env: dict | None = None,
                 stdout_pipe: bool = False):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE if stdout_pipe else self._log, stderr=self._log,
            env={**os.environ, **(env or {})}, start_new_session=True, text=stdout_pipe or None,
        )
        self.pid = self.proc.pid

    def stop(self, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            # Own session: the signal reaches this process and its workers only.
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def log_count(self, needle: str) -> int:
        try:
            return self.log_path.read_text(errors="replace").count(needle)
        except OSError:
            return 0

    def mem(self) -> dict[str, int]:
        return rss_kb(self.pid)


class Mock(Proc):
    def __init__(self, name: str, workdir: Path, *args: str):
        super().__init__(f"mock-{name}", [str(MOCK), "--name", name, "--listen", "127.0.0.1:0", *args],
                         workdir, stdout_pipe=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"mock {name} did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        httpx.post(f"{self.url}/_mock/reset", timeout=5).raise_for_status()

    def stats(self) -> dict:
        r = httpx.get(f"{self.url}/_mock/stats", timeout=30)
        r.raise_for_status()
        return r.json()


class Envoy(Proc):
    def __init__(self, name: str, boot: dict, workdir: Path, concurrency: int = 2,
                 extra: list[str] | None = None):
        self.port, self.admin_port = free_port(), free_port()
        path = configs.write(configs.with_ports(boot, self.port, self.admin_port), workdir / f"{name}.yaml")
        self.config_path = path
        # Envoy's default log level (info): Spillway's per-request JSON log
        # line goes to this process's stderr, as it would in production.
        super().__init__(name, [str(ENVOY), "-c", str(path), "--concurrency", str(concurrency),
                                "--disable-hot-restart", "--base-id", str(random.randint(1000, 10_000_000)),
                                "-l", "info", *(extra or [])], workdir)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until(self._ready, 60, f"envoy {name} ready", self.proc)

    def _ready(self) -> bool:
        if httpx.get(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1).status_code != 200:
            return False
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True


class LiteLLM(Proc):
    def __init__(self, name: str, config_text: str, workdir: Path, workers: int):
        self.port = free_port()
        cfg = workdir / f"{name}.yaml"
        cfg.write_text(config_text)
        env = {
            # No network but loopback: use the bundled model cost map.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
            "LITELLM_TELEMETRY": "False",
            "DISABLE_SCHEMA_UPDATE": "True",
        }
        super().__init__(name, [str(LITELLM), "--config", str(cfg), "--host", "127.0.0.1",
                                "--port", str(self.port), "--num_workers", str(workers)], workdir, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until(lambda: httpx.get(f"{self.url}/health/liveliness", timeout=2).status_code == 200,
                   180, f"litellm {name} ready", self.proc)
        # Let every worker finish starting before load.
        time.sleep(3)


# ---------------------------------------------------------------- load with oha


def oha(url: str, headers: dict[str, str], body_path: Path, out: Path, *, rate: float | None = None,
        requests: int | None = None, duration_s: float | None = None, connections: int = 32) -> dict:
    cmd = [str(OHA), "-c", str(connections), "-m", "POST", "-T", "application/json", "-D", str(body_path),
           "--no-tui", "--output-format", "json", "-o", str(out), "-t", "30s"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    if rate is not None:
        cmd += ["-q", str(rate), "--latency-correction"]
    if requests is not None:
        cmd += ["-n", str(requests)]
        bound = requests / (rate or 1) * 3 + 60
    else:
        # -w: wait for the requests in flight at the deadline instead of
        # aborting them (an aborted request is a client disconnect, which
        # Spillway's circuit breaker counts against the backend).
        cmd += ["-z", f"{duration_s}s", "-w"]
        bound = (duration_s or 0) + 60
    subprocess.run(cmd + [url], check=True, timeout=bound, stdout=subprocess.DEVNULL)
    d = json.loads(out.read_text())
    codes = {str(k): v for k, v in (d.get("statusCodeDistribution") or {}).items()}
    n = sum(codes.values())
    p = d["latencyPercentiles"]
    return {
        "responses": n,
        "ok": codes.get("200", 0),
        "status": codes,
        "errors": d.get("errorDistribution") or {},
        "elapsed_s": d["summary"]["total"],
        "rps": n / d["summary"]["total"] if d["summary"]["total"] else 0.0,
        "p50_us": (p.get("p50") or 0) * 1e6,
        "p90_us": (p.get("p90") or 0) * 1e6,
        "p99_us": (p.get("p99") or 0) * 1e6,
    }


# ---------------------------------------------------------------- parts


def machine() -> dict:
    cpu = Path("/proc/cpuinfo").read_text()
    model = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("model name")), "?")
    mem_kb = int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines()
                      if l.startswith("MemTotal:")))
    envoy_v = subprocess.run([str(ENVOY), "--version"], capture_output=True, text=True).stdout.strip()
    oha_v = subprocess.run([str(OHA), "--version"], capture_output=True, text=True).stdout.strip()
    lite_v = subprocess.run([str(BENCH / ".venv" / "bin" / "python"), "-c",
                             "import importlib.metadata as m; print(m.version('litellm'))"],
                            capture_output=True, text=True).stdout.strip()
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src", "mock"],
                           capture_output=True, text=True).stdout
    changed = [line[3:] for line in dirty.splitlines() if line.strip()]
    import hashlib
    return {
        "uncommitted_changes_in": changed,
        "spillway_wasm_sha256": hashlib.sha256(WASM.read_bytes()).hexdigest(),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": next((l.split("=", 1)[1].strip('"') for l in Path("/etc/os-release").read_text().splitlines()
                    if l.startswith("PRETTY_NAME=")), "?"),
        "envoy": envoy_v.split("version:", 1)[-1].strip(),
        "oha": oha_v,
        "litellm": lite_v,
        "rustc": rustc,
        "python": platform.python_version(),
        "git_commit": git,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def render_spillway(filter_cfg: dict, workdir: Path, name: str) -> dict:
    fpath = workdir / f"{name}-filter.json"
    fpath.write_text(json.dumps(filter_cfg, indent=2))
    out = workdir / f"{name}-rendered.yaml"
    subprocess.run([str(RENDER), str(fpath), "--wasm", str(WASM), "--listen", "127.0.0.1:1",
                    "--admin", "127.0.0.1:2", "--no-access-log", "-o", str(out)],
                   check=True, capture_output=True, text=True)
    return configs.load_rendered(out)


def write_csv(name: str, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    """One results CSV, columns from the first row unless given."""
    with open(RESULTS / name, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames or list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def overhead(args, workdir: Path) -> dict:
    log("overhead: starting 3 mock backends")
    mocks = [Mock(f"m{i}", workdir) for i in range(3)]
    ports = [m.port for m in mocks]
    procs: list[Proc] = list(mocks)
    body = workdir / "body.json"
    body.write_text(BODY)
    try:
        rendered = render_spillway(configs.spillway_filter(ports), workdir, "overhead")
        plain = configs.plain(rendered, ports)
        gateway_cfg = configs.spillway_filter(ports) | {
            "clients": [{"name": "bench", "key": configs.MASTER_KEY, "tokens_per_minute": 1_000_000_000}],
            "stream_usage": True,
        }
        gateway = render_spillway(gateway_cfg, workdir, "overhead-gateway")
        boots = {
            "envoy-plain": plain,
            "envoy-native-filters": configs.plain_with_native_filters(rendered, plain),
            "envoy-trivial-wasm": configs.with_trivial(plain, str(TRIVIAL_WASM)),
            "envoy-trivial-wasm-x2": configs.with_trivial(plain, str(TRIVIAL_WASM), upstream_too=True),
            "envoy-spillway": rendered,
            "envoy-spillway-gateway": gateway,
        }
        if BASELINE_WASM.exists():
            # With the bootstrap of its day: body fields read on every path.
            boots["envoy-spillway-baseline"] = configs.with_baseline_body_fields(
                configs.with_wasm(rendered, str(WASM), str(BASELINE_WASM)))
        setups: list[dict[str, Any]] = [
            {"name": "direct", "url": mocks[0].url + CHAT_PATH, "proc": None, "rate": args.rate,
             "kind": "mock"},
        ]
        for name, boot in boots.items():
            log(f"overhead: starting {name}")
            e = Envoy(name, boot, workdir)
            procs.append(e)
            setups.append({"name": name, "url": e.url + CHAT_PATH, "proc": e, "rate": args.rate, "kind": "envoy"})
        # Ablation: the same Spillway bootstrap with Envoy's wasm log component at
        # warning, i.e. without writing Spillway's per-request JSON log line.
        e = Envoy("envoy-spillway-nolog", rendered, workdir, extra=["--component-log-level", "wasm:warning"])
        procs.append(e)
        setups.append({"name": "envoy-spillway-nolog", "url": e.url + CHAT_PATH, "proc": e, "rate": args.rate,
                       "kind": "envoy"})
        # Ablation: the request role alone (no attempt role on the clusters).
        e = Envoy("envoy-spillway-request-role", configs.spillway_request_role_only(rendered), workdir)
        procs.append(e)
        setups.append({"name": "envoy-spillway-request-role", "url": e.url + CHAT_PATH, "proc": e,
                       "rate": args.rate, "kind": "envoy"})
        if not args.no_litellm:
            log("overhead: starting LiteLLM proxy (2 workers)")
            lite = LiteLLM("litellm", configs.litellm_config(ports, num_retries=2), workdir,
                           workers=args.litellm_workers)
            procs.append(lite)
            setups.append({"name": "litellm", "url": lite.url + CHAT_PATH, "proc": lite,
                           "rate": args.litellm_rate, "kind": "litellm"})
        headers = {"api-key": configs.MASTER_KEY}

        mem: dict[str, dict] = {}
        for s in setups:
            if s["proc"] is not None:
                mem[s["name"]] = {"idle_after_start": s["proc"].mem()}

        runs: list[dict] = []
        for rep in range(args.repeats):
            for s in setups:
                name, proc, rate = s["name"], s["proc"], s["rate"]
                rate_s = args.litellm_rate_s if s["kind"] == "litellm" else args.rate_s
                # Warm-up (connections, V8 JIT, LiteLLM's lazily initialised
                # workers): two seconds closed loop.
                oha(s["url"], headers, body, workdir / "warmup.json", duration_s=2)
                for mode in ("saturation", "fixed-rate"):
                    out = workdir / f"oha-{name}-{mode}-{rep}.json"
                    load0, cpu0 = loadavg(), (proc.cpu() if proc else 0.0)
                    if mode == "saturation":
                        r = oha(s["url"], headers, body, out, duration_s=args.sat_s)
                    else:
                        r = oha(s["url"], headers, body, out, rate=rate, requests=int(rate * rate_s))
                    cpu1, load1 = (proc.cpu() if proc else 0.0), loadavg()
                    row = {
                        "setup": name, "repeat": rep, "mode": mode,
                        "offered_rps": rate if mode == "fixed-rate" else "",
                        "responses": r["responses"], "ok": r["ok"],
                        "non_200": r["responses"] - r["ok"],
                        "errors": sum(v for k, v in r["errors"].items() if "deadline" not in k),
                        "elapsed_s": round(r["elapsed_s"], 3), "rps": round(r["rps"], 1),
                        "p50_us": round(r["p50_us"], 1), "p90_us": round(r["p90_us"], 1),
                        "p99_us": round(r["p99_us"], 1),
                        "proxy_cpu_s": round(cpu1 - cpu0, 3) if proc else "",
                        "cpu_us_per_req": round((cpu1 - cpu0) / r["responses"] * 1e6, 1)
                        if proc and r["responses"] else "",
                        "load1_before": load0[0], "load1_after": load1[0],
                        "load5_before": load0[1], "load5_after": load1[1],
                    }
                    runs.append(row)
                    log(f"overhead rep {rep} {name:24s} {mode:10s} rps={row['rps']:8.1f} "
                        f"p50={row['p50_us']:9.0f}us p99={row['p99_us']:9.0f}us "
                        f"cpu/req={row['cpu_us_per_req']}us non200={row['non_200']} load={load0[0]}->{load1[0]}")
        prices = hostcall_prices(args, workdir, plain, headers, body) if "hostcalls" in args.only else None
        counted = None
        if "instructions" in args.only and shutil.which("valgrind") and ENVOY_BIN.exists():
            counted = instructions_per_request(args, workdir, {
                k: boots[k] for k in ("envoy-plain", "envoy-trivial-wasm-x2", "envoy-native-filters",
                                      "envoy-spillway-baseline", "envoy-spillway", "envoy-spillway-gateway")
                if k in boots and (not args.quick or k in ("envoy-plain", "envoy-spillway"))}, headers, body)
        calls = {}
        for s in setups:
            if s["name"].startswith("envoy-spillway") and s["name"] != "envoy-spillway-request-role":
                calls[s["name"]] = host_calls_per_request(s["proc"], s["url"], headers, body, workdir)
        for s in setups:
            if s["proc"] is not None:
                mem[s["name"]]["after_runs"] = s["proc"].mem()
                # Sanity: no Spillway backend may have been taken out during the runs.
                s["circuit_opens"] = s["proc"].log_count("circuit opened")
                s["log_bytes"] = s["proc"].log_path.stat().st_size
    finally:
        for p in reversed(procs):
            p.stop()

    write_csv("overhead_runs.csv", runs)

    summary: dict[str, Any] = {}
    for s in setups:
        name = s["name"]
        per_mode = {}
        for mode in ("saturation", "fixed-rate"):
            rows = [r for r in runs if r["setup"] == name and r["mode"] == mode]
            m = {k: summarize([float(r[k]) for r in rows]) for k in ("rps", "p50_us", "p90_us", "p99_us")}
            if s["proc"] is not None:
                m["cpu_us_per_req"] = summarize([float(r["cpu_us_per_req"]) for r in rows])
            m["non_200_total"] = sum(r["non_200"] for r in rows)
            m["errors_total"] = sum(r["errors"] for r in rows)
            m["load1"] = summarize([float(r["load1_before"]) for r in rows] + [float(r["load1_after"]) for r in rows])
            per_mode[mode] = m
        summary[name] = {"kind": s["kind"], "rate": s["rate"], **per_mode, "memory": mem.get(name),
                         "circuit_opens": s.get("circuit_opens", 0), "log_bytes": s.get("log_bytes", 0)}

    def med(name, mode, key):
        return summary[name][mode][key]["median"]

    ratios = {}
    for name in summary:
        if not name.startswith("envoy") or name == "envoy-plain":
            continue
        ratios[name] = {
            "rps_vs_plain": med(name, "saturation", "rps") / med("envoy-plain", "saturation", "rps"),
            "p50_added_us_at_rate": med(name, "fixed-rate", "p50_us") - med("envoy-plain", "fixed-rate", "p50_us"),
            "p99_added_us_at_rate": med(name, "fixed-rate", "p99_us") - med("envoy-plain", "fixed-rate", "p99_us"),
            "cpu_added_us_at_rate": med(name, "fixed-rate", "cpu_us_per_req")
            - med("envoy-plain", "fixed-rate", "cpu_us_per_req"),
            "cpu_added_us_at_saturation": med(name, "saturation", "cpu_us_per_req")
            - med("envoy-plain", "saturation", "cpu_us_per_req"),
            "rss_added_kb": summary[name]["memory"]["after_runs"]["rss_kb"]
            - summary["envoy-plain"]["memory"]["after_runs"]["rss_kb"],
            "rss_added_vs_trivial_kb": summary[name]["memory"]["after_runs"]["rss_kb"]
            - summary["envoy-trivial-wasm"]["memory"]["after_runs"]["rss_kb"],
        }
    doc = {
        "params": {
            "connections": 32, "envoy_concurrency": 2, "repeats": args.repeats,
            "saturation_s": args.sat_s, "fixed_rate_rps": args.rate, "fixed_rate_s": args.rate_s,
            "litellm_rate_rps": args.litellm_rate, "litellm_rate_s": args.litellm_rate_s,
            "litellm_workers": args.litellm_workers, "request_body": json.loads(BODY),
            "path": CHAT_PATH,
        },
        "wasm_bytes": {"spillway.wasm": WASM.stat().st_size,
                       "spillway_bench_trivial_filter.wasm": TRIVIAL_WASM.stat().st_size,
                       **({"baseline spillway.wasm": BASELINE_WASM.stat().st_size} if BASELINE_WASM.exists() else {})},
        "host_calls_per_request": calls,
        "host_call_prices": prices,
        "instructions": counted,
        "baseline_ref": os.environ.get("BENCH_BASELINE_REF", ""),
        "setups": summary,
        "ratios_vs_plain": ratios,
    }
    (RESULTS / "overhead.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def host_calls_per_request(envoy: "Envoy", url: str, headers: dict, body: Path, workdir: Path,
                           n: int = 500) -> dict[str, float]:
    """The filter's own count of host calls (`spillway_host_calls_total`, by
    kind, both roles), per request, over `n` requests; reported on the
    filter's once-a-second tick."""
    def read() -> dict[str, int]:
        text = httpx.get(f"http://127.0.0.1:{envoy.admin_port}/stats", timeout=10).text
        out = {}
        for line in text.splitlines():
            prefix = "wasmcustom.spillway_host_calls_total.call."
            if line.startswith(prefix):
                kind, _, value = line[len(prefix):].partition(": ")
                out[kind] = int(value)
        return out
    time.sleep(1.3)
    before = read()
    oha(url, headers, body, workdir / "calls.json", requests=n, connections=4)
    time.sleep(1.3)
    after = read()
    return {k: round((after[k] - before.get(k, 0)) / n, 2) for k in sorted(after) if k != "tick"}


def hostcall_prices(args, workdir: Path, plain: dict, headers: dict, body: Path) -> dict:
    """What one host call of each kind costs Envoy: the probe filter making
    PROBE_CALLS calls per request vs none, closed loop, repeats interleaved."""
    kinds = ["none", "header_get", "header_get_missing", "header_set", "header_remove_missing", "property",
             "shared_data_get", "shared_data_set", "metric_increment", "metric_define", "clock_wasi",
             "clock_proxy", "log_written", "log_filtered", "clear_route_cache", "alloc_4k"]
    envs: dict[str, Envoy] = {}
    runs: dict[str, list[float]] = {k: [] for k in kinds}
    n = 2000 if args.quick else 6000
    try:
        for k in kinds:
            boot = configs.with_hostcall_probe(plain, str(PROBE_WASM), k, 0 if k == "none" else PROBE_CALLS)
            envs[k] = Envoy(f"probe-{k}", boot, workdir)
        for rep in range(args.repeats):
            for k, e in envs.items():
                url = e.url + CHAT_PATH
                oha(url, headers, body, workdir / "warmup.json", duration_s=1)
                c0 = e.cpu()
                r = oha(url, headers, body, workdir / "probe.json", requests=n)
                runs[k].append((e.cpu() - c0) / r["responses"] * 1e6)
                log(f"hostcalls rep {rep} {k:22s} cpu/req={runs[k][-1]:7.1f}us")
    finally:
        for e in envs.values():
            e.stop()
    base = statistics.median(runs["none"])
    prices = {k: {"cpu_us_per_req": summarize(v), "us_per_call": (statistics.median(v) - base) / PROBE_CALLS}
              for k, v in runs.items()}
    return {"calls_per_request": PROBE_CALLS, "requests_per_run": n, "repeats": args.repeats, "kinds": prices}


# Valgrind maps a position-independent executable at this address (amd64).
VALGRIND_PIE_BASE = 0x108000


def allocator_range() -> tuple[int, int] | None:
    """Where Envoy's allocator (tcmalloc, its own `google_malloc` section)
    sits when Envoy runs under valgrind. Valgrind attributes no object to
    that section, so its cost shows as unnamed code at these addresses."""
    try:
        sections = subprocess.run(["readelf", "-SW", str(ENVOY_BIN)], capture_output=True, text=True,
                                  check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in sections.splitlines():
        parts = line.replace("[ ", "[").split()
        if len(parts) > 5 and parts[1] == "google_malloc":
            start, size = int(parts[3], 16), int(parts[5], 16)
            return VALGRIND_PIE_BASE + start, VALGRIND_PIE_BASE + start + size
    return None


def instructions_by_code(dump: str) -> dict[str, int]:
    """A callgrind dump's instructions by where the code lives: Envoy's own
    code, its allocator (tcmalloc), the wasm code V8 compiled (JIT: the
    filter's own computation and V8's stubs around it), and libc."""
    alloc = allocator_range()
    objects: dict[str, str] = {}
    functions: dict[str, str] = {}
    out = {"envoy": 0, "allocator": 0, "wasm_jit": 0, "libc": 0, "other": 0}
    where = "other"
    obj = fn = ""
    skip_next_cost = False
    for line in dump.splitlines():
        if line.startswith(("cob=", "cfn=")):
            # A call's target: names defined here are used by later lines.
            key, _, rest = line[4:].partition(" ")
            if rest:
                (objects if line.startswith("cob=") else functions)[key] = rest
            continue
        if line.startswith(("ob=", "fn=")):
            key, _, rest = line[3:].partition(" ")
            table = objects if line.startswith("ob=") else functions
            if rest:
                table[key] = rest
            name = table.get(key, key)
            if line.startswith("ob="):
                obj = name
            else:
                fn = name
            if "envoy" in obj.rsplit("/", 1)[-1]:
                where = "envoy"
            elif "libc" in obj:
                where = "libc"
            elif obj == "???" and fn.startswith("0x"):
                address = int(fn.split("'")[0], 16)
                where = "allocator" if alloc and alloc[0] <= address < alloc[1] else (
                    "wasm_jit" if address >= 0x10000000 else "other")
            else:
                where = "other"
            continue
        if line.startswith("calls="):
            skip_next_cost = True  # the next cost line is the call's inclusive cost
            continue
        if line[:1].isdigit() or line[:1] in "+-*":
            if skip_next_cost:
                skip_next_cost = False
                continue
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                out[where] += int(parts[1])
    return out


def instructions_per_request(args, workdir: Path, boots: dict[str, dict], headers: dict, body: Path) -> dict:
    """Instructions Envoy executes per request, counted by callgrind: the
    same count on every run, whatever else the machine does, so small
    differences between setups show. Envoy runs under valgrind with one
    worker; after 200 requests of warm-up the counters are zeroed, then
    `n` requests are counted."""
    n = 100 if args.quick else 300
    out: dict[str, dict] = {}
    for name, boot in boots.items():
        port, admin = free_port(), free_port()
        cfg = configs.write(configs.with_ports(boot, port, admin), workdir / f"cg-{name}.yaml")
        prefix = workdir / f"callgrind-{name}.out"
        log(f"instructions: {name} under callgrind")
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={prefix}", "--smc-check=all-non-file",
             str(ENVOY_BIN), "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart",
             "--base-id", str(random.randint(1000, 10_000_000)), "-l", "info"],
            stdout=open(workdir / f"cg-{name}.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=2).status_code == 200,
                       600, f"{name} under callgrind", proc)
            url = f"http://127.0.0.1:{port}{CHAT_PATH}"
            oha(url, headers, body, workdir / "cg-warmup.json", requests=200, connections=4)
            subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True, timeout=120)
            r = oha(url, headers, body, workdir / "cg-run.json", requests=n, connections=4)
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True, timeout=120)
            dumps = sorted(workdir.glob(f"callgrind-{name}.out*"), key=lambda f: f.stat().st_mtime)
            text = dumps[-1].read_text(errors="replace")
            totals = [int(line.split()[1]) for line in text.splitlines() if line.startswith(("summary:", "totals:"))]
            out[name] = {"instructions_per_request": max(totals) / n, "requests": n, "ok": r["ok"],
                         "by_code_per_request": {k: v / n for k, v in instructions_by_code(text).items()}}
            log(f"instructions: {name}: {out[name]['instructions_per_request'] / 1000:.1f} k per request")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            for f in workdir.glob(f"callgrind-{name}.out*"):
                f.unlink()
    return out


def selection(args) -> dict:
    log("selection: native micro-benchmark")
    out = RESULTS / "selection.json"
    load0 = loadavg()
    subprocess.run([str(SELECTION), "--json", str(out)] + (["--samples", "7"] if args.quick else []),
                   check=True, timeout=600)
    load1 = loadavg()
    doc = json.loads(out.read_text())
    doc["load1_before"], doc["load1_after"] = load0[0], load1[0]
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


# ------------------------------------------------------------ goodput + quotas


def windows_from_records(records: list[dict], window_ms: int, limit: int) -> list[dict]:
    """The mock's fixed windows, rebuilt from its request log: a window opens
    at the first request after the previous one expired (any status) and
    admits `requests_per_window` requests."""
    wins: list[dict] = []
    for r in sorted(records, key=lambda r: r["ts_ms"]):
        if r["path"].startswith("/_mock"):
            continue
        # The log's time is the arrival (whole ms), the quota's is taken a
        # little later: an admitted request beyond the limit shows the
        # window had already rolled over.
        rolled = bool(wins) and r["status"] == 200 and len(wins[-1]["ok_ts"]) >= limit
        if not wins or r["ts_ms"] >= wins[-1]["start"] + window_ms or rolled:
            wins.append({"start": r["ts_ms"], "end": r["ts_ms"] + window_ms, "ok_ts": []})
        if r["status"] == 200:
            wins[-1]["ok_ts"].append(r["ts_ms"])
    return wins


def capacity_back_at(t_ms: float, wins: list[dict], limit: int) -> float:
    """Earliest time >= t_ms at which this backend admits a request."""
    for w in reversed(wins):
        if w["start"] <= t_ms:
            if t_ms < w["end"] and sum(1 for ts in w["ok_ts"] if ts <= t_ms) >= limit:
                return w["end"]
            return t_ms
    return t_ms


RA_MS_TOLERANCE = 1.0


def check_retry_after(results: list[loadgen.Result], per_mock_records: list[list[dict]], window_ms: int,
                      limit: int) -> dict:
    wins = [windows_from_records(recs, window_ms, limit) for recs in per_mock_records]
    checked, short_s, short_ms, avoidable = 0, [], [], 0
    avoidable_examples: list[dict] = []
    max_short_ms_raw = float("-inf")
    slack_s: list[float] = []
    missing = 0
    for r in results:
        if r.status != 429:
            continue
        if not r.retry_after:
            missing += 1
            continue
        t = r.done_epoch_ms
        back = min(capacity_back_at(t, w, limit) for w in wins)
        real_wait = back - t
        if real_wait <= 0:
            avoidable += 1
            if len(avoidable_examples) < 10:
                # How long before the 429 arrived each backend had room again
                # (None: its window never filled).
                since = []
                for w in wins:
                    last = next((x for x in reversed(w) if x["start"] <= t), None)
                    full = last is not None and sum(1 for ts in last["ok_ts"] if ts <= t) >= limit
                    since.append(round(t - last["end"], 1) if full and t >= last["end"] else None)
                avoidable_examples.append({"done_epoch_ms": t, "retry_after": r.retry_after,
                                           "ms_since_capacity_back": since})
        checked += 1
        ra_ms = float(r.retry_after) * 1000
        slack_s.append(ra_ms - real_wait)
        if ra_ms < real_wait:
            short_s.append(real_wait - ra_ms)
        # retry-after-ms is whole ms and the mock logs whole ms: allow 1 ms.
        if r.retry_after_ms and float(r.retry_after_ms) + RA_MS_TOLERANCE < real_wait:
            short_ms.append(real_wait - float(r.retry_after_ms))
        if r.retry_after_ms:
            max_short_ms_raw = max(max_short_ms_raw, real_wait - float(r.retry_after_ms))
    return {
        "client_429s": checked + missing,
        "without_retry_after": missing,
        "checked": checked,
        "retry_after_shorter_than_real_wait": len(short_s),
        "max_shortfall_ms": max(short_s) if short_s else 0.0,
        "retry_after_ms_shorter_than_real_wait": len(short_ms),
        "retry_after_ms_max_shortfall_ms": max(short_ms) if short_ms else 0.0,
        "retry_after_ms_tolerance_ms": RA_MS_TOLERANCE,
        "retry_after_ms_max_raw_shortfall_ms": max_short_ms_raw if checked else None,
        "capacity_already_back_when_429_arrived": avoidable,
        "capacity_already_back_examples": avoidable_examples,
        "slack_ms": summarize(slack_s) if slack_s else None,
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))
    return v[k]


def goodput(args, workdir: Path) -> dict:
    n_req, window_ms = args.quota_requests, args.quota_window_ms
    log(f"goodput: starting 3 mock backends with {n_req} requests / {window_ms} ms each")
    mocks = [Mock(f"q{i}", workdir, "--requests-per-window", str(n_req), "--window-ms", str(window_ms))
             for i in range(3)]
    ports = [m.port for m in mocks]
    capacity_rps = 3 * n_req / (window_ms / 1000)
    levels = [("below", capacity_rps * 2 / 3), ("at", capacity_rps), ("above", capacity_rps * 2)]
    headers = {"api-key": configs.MASTER_KEY}
    rendered = render_spillway(configs.spillway_filter(ports), workdir, "goodput")
    native = configs.envoy_native_retry(configs.plain(rendered, ports), num_retries=2)
    setups = ["spillway", "envoy-native-retry"] + ([] if args.no_litellm else ["litellm"])
    runs, all_rows, ra_checks, mock_log = [], [], {}, []
    try:
        for setup in setups:
            for level, rate in levels:
                if setup == "spillway":
                    proc: Proc = Envoy(f"gp-spillway-{level}", rendered, workdir)
                elif setup == "envoy-native-retry":
                    proc = Envoy(f"gp-native-{level}", native, workdir)
                else:
                    proc = LiteLLM(f"gp-litellm-{level}", configs.litellm_config(ports, num_retries=2), workdir,
                                   workers=1)
                try:
                    # Warm-up (V8 JIT, LiteLLM's lazily created clients: its
                    # first request takes ~0.8 s), then fresh quota windows.
                    for _ in range(6):
                        httpx.post(proc.url + CHAT_PATH, json=loadgen.BODY, headers=headers, timeout=30)
                    for m in mocks:
                        m.reset()
                    load0 = loadavg()
                    log(f"goodput: {setup} {level} ({rate:g} rps x {args.goodput_s:g} s)")
                    res = loadgen.run(proc.url + CHAT_PATH, rate, args.goodput_s, headers, timeout=30)
                    load1 = loadavg()
                    stats = [m.stats() for m in mocks]
                finally:
                    proc.stop()
                lat = [r.latency_ms for r in res if r.status]
                ok_lat = [r.latency_ms for r in res if r.status == 200]
                up_total = sum(s["requests_total"] for s in stats)
                row = {
                    "setup": setup, "level": level, "offered_rps": round(rate, 2),
                    "duration_s": args.goodput_s, "requests": len(res),
                    "client_2xx": sum(1 for r in res if r.status == 200),
                    "client_429": sum(1 for r in res if r.status == 429),
                    "client_other": sum(1 for r in res if r.status not in (0, 200, 429)),
                    "client_errors": sum(1 for r in res if r.status == 0),
                    "upstream_calls": up_total,
                    "upstream_2xx": sum(s["by_status"].get("200", 0) for s in stats),
                    "upstream_429": sum(s["by_status"].get("429", 0) for s in stats),
                    "p50_ms": round(percentile(lat, 50), 2), "p99_ms": round(percentile(lat, 99), 2),
                    "ok_p50_ms": round(percentile(ok_lat, 50), 2), "ok_p99_ms": round(percentile(ok_lat, 99), 2),
                    "load1_before": load0[0], "load1_after": load1[0],
                }
                row["goodput_rps"] = round(row["client_2xx"] / args.goodput_s, 2)
                row["upstream_calls_per_request"] = round(up_total / len(res), 2)
                runs.append(row)
                log(f"goodput: {setup} {level}: 2xx={row['client_2xx']} 429={row['client_429']} "
                    f"other={row['client_other']} err={row['client_errors']} upstream={up_total} "
                    f"(429: {row['upstream_429']}) p50={row['p50_ms']}ms p99={row['p99_ms']}ms")
                for r in res:
                    all_rows.append({"setup": setup, "level": level, "offered_rps": round(rate, 2),
                                     **loadgen.asdict(r)})
                if setup == "spillway":
                    for i, st in enumerate(stats):
                        for rec in st["requests"]:
                            mock_log.append({"level": level, "mock": i, "ts_ms": rec["ts_ms"],
                                             "status": rec["status"]})
                    complete = all(s["requests_total"] <= len(s["requests"]) for s in stats)
                    check = check_retry_after(res, [s["requests"] for s in stats], window_ms, n_req)
                    check["mock_logs_complete"] = complete
                    ra_checks[level] = check
                    log(f"goodput: spillway {level} retry-after check: {check}")
                # Let throttles and cooldowns expire before the next run.
                time.sleep(1)
    finally:
        for m in mocks:
            m.stop()

    write_csv("goodput_requests.csv", all_rows)
    write_csv("goodput_spillway_mock_log.csv", mock_log, ["level", "mock", "ts_ms", "status"])
    doc = {
        "params": {"backends": 3, "requests_per_window": n_req, "window_ms": window_ms,
                   "capacity_rps": capacity_rps, "duration_s": args.goodput_s,
                   "levels": {k: v for k, v in levels}, "envoy_num_retries": 2, "litellm_num_retries": 2,
                   "litellm_workers": 1, "client_timeout_s": 30},
        "runs": runs,
        "spillway_retry_after_check": ra_checks,
    }
    (RESULTS / "goodput.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


# ------------------------------------------------------------ quota-aware routing

# Three backends with uneven token quotas (Azure counts per minute; 5 s here
# so one run spans several windows). The 6000 one is provisioned: it also
# reports its utilisation.
QUOTA_TOKENS = (6000, 3000, 1500)
QUOTA_REQUESTS = 40
QUOTA_WINDOW_MS = 5000
QUOTA_PROVISIONED = 0
# The request mix: (max_tokens, share in %); the mock charges each request
# its prompt estimate + max_tokens at admission.
QUOTA_MIX = ((50, 60), (300, 30), (1200, 10))
QUOTA_MESSAGES = ("Say hello in one short sentence.", "Name a colour.", "What is 2 + 2?",
                  "Give me a haiku about rain.", "Translate 'thank you' to French.")
QUOTA_LEVELS = {"below": 0.6, "at": 1.0, "above": 1.5}
QUOTA_SETUPS = ("spillway-reactive", "spillway-quota-aware", "envoy-native-retry", "litellm")
# The oversized case: one request larger than any backend's whole window.
OVERSIZED_MAX_TOKENS = 20_000
OVERSIZED_S = 12
OVERSIZED_AFTER_S = 5
OVERSIZED_BODY = {"messages": [{"role": "user", "content": "Write a very long story."}],
                  "max_tokens": OVERSIZED_MAX_TOKENS}


def quota_bodies() -> list[dict]:
    """The mix in exact proportions (100 bodies), shuffled with a fixed seed:
    every run and every setup sends the same sequence."""
    rng = random.Random(14)
    bodies = [{"messages": [{"role": "user", "content": rng.choice(QUOTA_MESSAGES)}], "max_tokens": mt}
              for mt, pct in QUOTA_MIX for _ in range(pct)]
    rng.shuffle(bodies)
    return bodies


def mock_charge(body: dict | None) -> int:
    """Tokens the mock charges a chat request at admission (its estimate:
    ceil(content chars / 4) + max_tokens, default 16); 0 for anything else."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return 0
    chars = sum(len(m["content"]) for m in body["messages"] if isinstance(m.get("content"), str))
    return max(1, -(-chars // 4)) + int(body.get("max_tokens", 16))


def quota_capacity(bodies: list[dict]) -> dict:
    window_s = QUOTA_WINDOW_MS / 1000
    mean_cost = statistics.mean(mock_charge(b) for b in bodies)
    token_rps = sum(QUOTA_TOKENS) / window_s / mean_cost
    request_rps = len(QUOTA_TOKENS) * QUOTA_REQUESTS / window_s
    return {"tokens_per_s": sum(QUOTA_TOKENS) / window_s, "mean_cost_tokens": round(mean_cost, 2),
            "token_capacity_rps": round(token_rps, 3), "request_capacity_rps": request_rps,
            "capacity_rps": round(min(token_rps, request_rps), 3)}


def upstream_429_spread(records: list[dict], start_ms: float, window_ms: int) -> dict:
    """How one backend's 429s fall in time: the most in one of the mock's own
    windows (rebuilt from its log: a window opens at the first request after
    the previous one expired), the most in any `window_ms` span (stricter:
    a span can straddle two windows), and how many `window_ms` buckets from
    the run's start hold more than one."""
    recs = sorted((r for r in records if not r["path"].startswith("/_mock")), key=lambda r: r["ts_ms"])
    t429 = [r["ts_ms"] for r in recs if r["status"] == 429]
    per_window: list[int] = []
    opened = None
    for r in recs:
        if opened is None or r["ts_ms"] >= opened + window_ms:
            opened = r["ts_ms"]
            per_window.append(0)
        per_window[-1] += r["status"] == 429
    span = max((bisect.bisect_left(t429, t + window_ms) - i for i, t in enumerate(t429)), default=0)
    buckets: dict[int, int] = {}
    for t in t429:
        k = int((t - start_ms) // window_ms)
        buckets[k] = buckets.get(k, 0) + 1
    return {"upstream_429": len(t429), "max_in_a_mock_window": max(per_window, default=0),
            "max_in_any_span": span, "buckets_over_one": sum(1 for v in buckets.values() if v > 1),
            "mock_windows": len(per_window),
            # When they came (ms from the run's start), to look at afterwards.
            "upstream_429_at_ms": [round(t - start_ms) for t in t429]}


def quota_backend(i: int, stats: dict, start_ms: float, duration_s: float) -> dict:
    """One mock's share of a run."""
    recs = stats["requests"]
    billed = sum(u.get("prompt_tokens", 0) + u.get("completion_tokens", 0)
                 for u in (stats.get("usage") or {}).values())
    return {
        "backend": f"mock{i}", "tokens_per_window": QUOTA_TOKENS[i], "provisioned": i == QUOTA_PROVISIONED,
        "upstream_calls": stats["requests_total"], "upstream_2xx": stats["by_status"].get("200", 0),
        # Charged at admission, as the mock does (max_tokens, not the answer).
        "tokens_charged": sum(mock_charge(r.get("body_json")) for r in recs if r["status"] == 200),
        "token_quota_in_run": round(QUOTA_TOKENS[i] * duration_s * 1000 / QUOTA_WINDOW_MS),
        "tokens_billed": billed,
        "log_complete": stats["requests_total"] <= len(recs),
        **upstream_429_spread(recs, start_ms, QUOTA_WINDOW_MS),
    }


def quota_row(setup: str, level: str, rate: float, duration_s: float, res: list[loadgen.Result],
              stats: list[dict], start_ms: float, load0: list[float], load1: list[float]) -> dict:
    per = [quota_backend(i, s, start_ms, duration_s) for i, s in enumerate(stats)]
    lat = [r.latency_ms for r in res if r.status]
    row = {
        "setup": setup, "level": level, "offered_rps": round(rate, 2), "duration_s": duration_s,
        "requests": len(res),
        "client_2xx": sum(1 for r in res if r.status == 200),
        "client_429": sum(1 for r in res if r.status == 429),
        "client_other": sum(1 for r in res if r.status not in (0, 200, 429)),
        "client_errors": sum(1 for r in res if r.status == 0),
        "upstream_calls": sum(b["upstream_calls"] for b in per),
        "upstream_2xx": sum(b["upstream_2xx"] for b in per),
        "upstream_429": sum(s["by_status"].get("429", 0) for s in stats),
        "max_429_per_backend_per_mock_window": max(b["max_in_a_mock_window"] for b in per),
        "max_429_per_backend_in_any_window_span": max(b["max_in_any_span"] for b in per),
        "buckets_with_over_one_429": sum(b["buckets_over_one"] for b in per),
        "p50_ms": round(percentile(lat, 50), 2), "p99_ms": round(percentile(lat, 99), 2),
        "load1_before": load0[0], "load1_after": load1[0],
        "backends": per,
    }
    row["goodput_rps"] = round(row["client_2xx"] / duration_s, 2)
    return row


def quota_proxy(setup: str, boots: dict[str, dict], ports: list[int], workdir: Path, name: str) -> Proc:
    if setup == "litellm":
        return LiteLLM(name, configs.litellm_config(ports, num_retries=2), workdir, workers=1)
    return Envoy(name, boots[setup], workdir)


def quota_measure(proc: Proc, mocks: list[Mock], rate: float, duration_s: float, bodies: list[dict],
                  overrides: dict[int, dict] | None = None):
    """Warm-up, fresh quota windows, one open-loop run; the results, each
    mock's stats and the run's start (epoch ms)."""
    headers = {"api-key": configs.MASTER_KEY}
    # Warm-up (V8 JIT, LiteLLM's lazily created clients), then fresh windows.
    for _ in range(6):
        httpx.post(proc.url + CHAT_PATH, json=loadgen.BODY, headers=headers, timeout=30)
    for m in mocks:
        m.reset()
    start_ms = time.time() * 1000
    res = loadgen.run(proc.url + CHAT_PATH, rate, duration_s, headers, timeout=30, bodies=bodies,
                      overrides=overrides)
    return res, [m.stats() for m in mocks], start_ms


def oversized_summary(res: list[loadgen.Result], idx: int, stats: list[dict]) -> dict:
    """The oversized request and the requests sent in the OVERSIZED_AFTER_S
    after it."""
    big = res[idx]
    after = [r for r in res if big.scheduled_s < r.scheduled_s <= big.scheduled_s + OVERSIZED_AFTER_S]
    tried = sum(1 for s in stats for r in s["requests"]
                if (r.get("body_json") or {}).get("max_tokens") == OVERSIZED_MAX_TOKENS)
    return {
        "oversized_index": idx, "oversized_sent_s": round(big.scheduled_s, 3),
        "oversized_status": big.status, "oversized_retry_after": big.retry_after,
        "oversized_upstream_calls": tried,
        "after_requests": len(after),
        "after_2xx": sum(1 for r in after if r.status == 200),
        "after_429": sum(1 for r in after if r.status == 429),
        "after_other": sum(1 for r in after if r.status not in (200, 429)),
    }


def quota_goals(runs: list[dict], oversized: dict[str, dict]) -> list[dict]:
    """The part's goals, each with the numbers it is judged on (recorded,
    not asserted)."""
    run = {(r["setup"], r["level"]): r for r in runs}
    qa, re_ = "spillway-quota-aware", "spillway-reactive"
    goals = []
    if (qa, "below") in run:
        n = run[(qa, "below")]["upstream_429"]
        goals.append({"id": "below_no_upstream_429", "level": "below", "measured": {"upstream_429": n},
                      "met": n == 0})
    for level in ("at", "above"):
        r = run.get((qa, level))
        if r:
            goals.append({"id": "at_most_one_429_per_backend_window", "level": level, "measured": {
                "max_429_per_backend_per_mock_window": r["max_429_per_backend_per_mock_window"],
                "max_429_per_backend_in_any_window_span": r["max_429_per_backend_in_any_window_span"],
                "upstream_429": r["upstream_429"]}, "met": r["max_429_per_backend_per_mock_window"] <= 1})
    for level in QUOTA_LEVELS:
        a, b = run.get((qa, level)), run.get((re_, level))
        if a and b:
            goals.append({"id": "goodput_not_below_reactive", "level": level,
                          "measured": {"quota_aware_rps": a["goodput_rps"], "reactive_rps": b["goodput_rps"]},
                          "met": a["goodput_rps"] >= b["goodput_rps"]})
    o = oversized.get(qa)
    if o:
        r = oversized.get(re_) or {}
        goals.append({"id": "oversized_leaves_others_served", "level": "below", "measured": {
            "after_requests": o["after_requests"], "after_2xx": o["after_2xx"], "after_429": o["after_429"],
            "reactive_after_2xx": r.get("after_2xx"), "reactive_after_429": r.get("after_429")},
            "met": o["after_2xx"] == o["after_requests"]})
    return goals


def quota_routing(args, workdir: Path) -> dict:
    """Quota-aware routing against learning from 429s alone (Spillway's
    routing before), Envoy's native retry and LiteLLM, on three backends
    with uneven token quotas and a mixed request size."""
    bodies = quota_bodies()
    cap = quota_capacity(bodies)
    levels = [(k, QUOTA_LEVELS[k] * cap["capacity_rps"]) for k in args.quota_levels.split(",")]
    setups = [s for s in args.quota_setups.split(",") if not (s == "litellm" and args.no_litellm)]
    log(f"quota: 3 mocks, tokens per {QUOTA_WINDOW_MS} ms window {QUOTA_TOKENS}; capacity "
        f"{cap['capacity_rps']:g} rps (mean cost {cap['mean_cost_tokens']:g} tokens)")
    mocks = [Mock(f"t{i}", workdir, "--tokens-per-window", str(t), "--requests-per-window", str(QUOTA_REQUESTS),
                  "--window-ms", str(QUOTA_WINDOW_MS)) for i, t in enumerate(QUOTA_TOKENS)]
    httpx.post(f"{mocks[QUOTA_PROVISIONED].url}/_mock/config", json={"provisioned": True},
               timeout=5).raise_for_status()
    ports = [m.port for m in mocks]
    boots = {
        "spillway-reactive": render_spillway(configs.spillway_quota_filter(ports, "reactive"), workdir, "qr-reactive"),
        "spillway-quota-aware": render_spillway(
            configs.spillway_quota_filter(ports, "quota_aware", QUOTA_WINDOW_MS // 1000), workdir, "qr-aware"),
    }
    boots["envoy-native-retry"] = configs.envoy_native_retry(configs.plain(boots["spillway-reactive"], ports), 2)
    runs, rows, oversized = [], [], {}
    try:
        for setup in setups:
            for level, rate in levels:
                runs.append(quota_one(args, setup, level, rate, args.quota_s, boots, mocks, bodies, workdir, rows))
            if args.quota_oversized:
                rate = QUOTA_LEVELS["below"] * cap["capacity_rps"]
                idx = loadgen.count_of(rate, OVERSIZED_S) // 4
                row = quota_one(args, setup, "oversized", rate, OVERSIZED_S, boots, mocks, bodies, workdir, rows,
                                {idx: OVERSIZED_BODY})
                oversized[setup] = {**row.pop("oversized"), "run": row}
                log(f"quota: {setup} oversized: {oversized[setup]}")
    finally:
        for m in mocks:
            m.stop()

    write_csv("quota_requests.csv", rows)
    doc = {
        "params": {"backends": len(QUOTA_TOKENS), "tokens_per_window": list(QUOTA_TOKENS),
                   "requests_per_window": QUOTA_REQUESTS, "window_ms": QUOTA_WINDOW_MS,
                   "provisioned_backend": f"mock{QUOTA_PROVISIONED}",
                   "mix": [{"max_tokens": mt, "percent": pct} for mt, pct in QUOTA_MIX], "seed": 14,
                   **cap, "duration_s": args.quota_s,
                   "levels": {k: round(v, 3) for k, v in levels}, "level_factors": QUOTA_LEVELS,
                   "setups": setups, "headroom_window_s": QUOTA_WINDOW_MS // 1000,
                   "envoy_num_retries": 2, "litellm_num_retries": 2, "litellm_workers": 1,
                   "oversized": {"max_tokens": OVERSIZED_MAX_TOKENS, "duration_s": OVERSIZED_S,
                                 "level": "below", "index": "requests // 4", "after_s": OVERSIZED_AFTER_S},
                   "client_timeout_s": 30},
        "runs": runs,
        "oversized": oversized,
        "goals": quota_goals(runs, oversized),
    }
    (RESULTS / "quota.json").write_text(json.dumps(doc, indent=2) + "\n")
    for g in doc["goals"]:
        log(f"quota goal {g['id']} ({g['level']}): {'met' if g['met'] else 'MISSED'} {g['measured']}")
    return doc


def quota_one(args, setup: str, level: str, rate: float, duration_s: float, boots: dict[str, dict],
              mocks: list[Mock], bodies: list[dict], workdir: Path, rows: list[dict],
              overrides: dict[int, dict] | None = None) -> dict:
    """One run in a fresh proxy process; appends every request to `rows`."""
    proc = quota_proxy(setup, boots, [m.port for m in mocks], workdir, f"qr-{setup}-{level}")
    try:
        load0 = loadavg()
        log(f"quota: {setup} {level} ({rate:.2f} rps x {duration_s:g} s)")
        res, stats, start_ms = quota_measure(proc, mocks, rate, duration_s, bodies, overrides)
        load1 = loadavg()
    finally:
        proc.stop()
    row = quota_row(setup, level, rate, duration_s, res, stats, start_ms, load0, load1)
    if overrides:
        row["oversized"] = oversized_summary(res, next(iter(overrides)), stats)
    log(f"quota: {setup} {level}: 2xx={row['client_2xx']} 429={row['client_429']} other={row['client_other']} "
        f"err={row['client_errors']} upstream={row['upstream_calls']} (429: {row['upstream_429']}, per backend "
        f"{[b['upstream_429'] for b in row['backends']]}, max per window {row['max_429_per_backend_per_mock_window']}"
        f", any 5 s {row['max_429_per_backend_in_any_window_span']})")
    for r in res:
        body = loadgen.body_of(r.index, bodies, overrides)
        rows.append({"setup": setup, "level": level, "offered_rps": round(rate, 2),
                     "max_tokens": body["max_tokens"], **loadgen.asdict(r)})
    # Every quota window (and any throttle a proxy holds) expires before the next run.
    time.sleep(QUOTA_WINDOW_MS / 1000 + 0.5)
    return row


# ---------------------------------------------------------------- global limits


def redis_server(workdir: Path) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc("redis", [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port),
                          "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], workdir)
    wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() is None, 10,
               "redis ready", proc.proc)
    return proc, port


def global_limits(args, workdir: Path) -> dict:
    """Latency the remote check adds: one client with limits far above the
    load, local (shared data) against global (spillway-ratelimit + Redis),
    fixed rate, p50/p99 and Envoy CPU per request."""
    log("global: starting a mock, redis-server and spillway-ratelimit")
    mock = Mock("global", workdir)
    procs: list[Proc] = [mock]
    body = workdir / "body.json"
    body.write_text(BODY)
    try:
        redis, redis_port = redis_server(workdir)
        procs.append(redis)
        rls_port = free_port()
        rls = Proc("ratelimit", [str(RATELIMIT), "--listen", f"127.0.0.1:{rls_port}",
                                 "--redis", f"redis://127.0.0.1:{redis_port}"], workdir)
        procs.append(rls)
        wait_until(lambda: socket.create_connection(("127.0.0.1", rls_port), timeout=1).close() is None, 10,
                   "spillway-ratelimit ready", rls.proc)
        client = {"name": "bench", "key": configs.MASTER_KEY, "requests_per_minute": 100_000_000,
                  "tokens_per_minute": 1_000_000_000}
        local_cfg = configs.spillway_filter([mock.port]) | {"clients": [client]}
        global_cfg = local_cfg | {"global_limits": {"service": f"127.0.0.1:{rls_port}"}}
        setups = {}
        for name, cfg in (("spillway-local-limits", local_cfg), ("spillway-global-limits", global_cfg)):
            e = Envoy(name, render_spillway(cfg, workdir, name), workdir)
            procs.append(e)
            setups[name] = e
        headers = {"api-key": configs.MASTER_KEY}
        runs: list[dict] = []
        rates = [float(r) for r in args.global_rates.split(",")]
        service_cpu: dict[float, float] = {}
        for rep, rate in ((rep, rate) for rate in rates for rep in range(args.repeats)):
            for name, e in setups.items():
                oha(e.url + CHAT_PATH, headers, body, workdir / "warmup.json", duration_s=2)
                out = workdir / f"oha-{name}-{rate:.0f}-{rep}.json"
                cpu0, svc0 = e.cpu(), rls.cpu() + redis.cpu()
                r = oha(e.url + CHAT_PATH, headers, body, out, rate=rate, requests=int(rate * args.rate_s))
                cpu = e.cpu() - cpu0
                if name == "spillway-global-limits":
                    service_cpu[rate] = service_cpu.get(rate, 0.0) + rls.cpu() + redis.cpu() - svc0
                row = {"setup": name, "repeat": rep, "offered_rps": rate, "responses": r["responses"],
                       "ok": r["ok"], "p50_us": round(r["p50_us"], 1), "p90_us": round(r["p90_us"], 1),
                       "p99_us": round(r["p99_us"], 1),
                       "envoy_cpu_us_per_request": round(cpu / max(r["responses"], 1) * 1e6, 1)}
                runs.append(row)
                log(f"global: {name} rep {rep}: ok={r['ok']}/{r['responses']} p50={row['p50_us']:.0f}us "
                    f"p99={row['p99_us']:.0f}us cpu={row['envoy_cpu_us_per_request']:.0f}us/req")
        write_csv("global_limits_runs.csv", runs)
        by_rate = []
        for rate in rates:
            summary = {}
            for name in setups:
                rows = [r for r in runs if r["setup"] == name and r["offered_rps"] == rate]
                summary[name] = {k: summarize([float(r[k]) for r in rows])
                                 for k in ("p50_us", "p99_us", "envoy_cpu_us_per_request")}
                summary[name]["errors"] = sum(r["responses"] - r["ok"] for r in rows)
            loc, glo = summary["spillway-local-limits"], summary["spillway-global-limits"]
            requests = int(rate * args.rate_s) * args.repeats
            by_rate.append({
                "rate": rate, "summary": summary,
                "added": {k: round(glo[k]["median"] - loc[k]["median"], 1)
                          for k in ("p50_us", "p99_us", "envoy_cpu_us_per_request")},
                "service_and_redis_cpu_us_per_request": round(service_cpu.get(rate, 0.0) / requests * 1e6, 1),
            })
            log(f"global @{rate:.0f} rps: added p50 {by_rate[-1]['added']['p50_us']} us, "
                f"p99 {by_rate[-1]['added']['p99_us']} us")
        result = {"rate_s": args.rate_s, "repeats": args.repeats, "by_rate": by_rate,
                  "service_cpu_s": round(rls.cpu(), 2), "redis_cpu_s": round(redis.cpu(), 2)}
        (RESULTS / "global_limits.json").write_text(json.dumps(result, indent=2) + "\n")
        return result
    finally:
        for p in reversed(procs):
            p.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description="Spillway benchmarks")
    ap.add_argument("--quick", action="store_true", help="1 repeat, short runs (smoke test)")
    ap.add_argument("--only", default="overhead,hostcalls,instructions,selection,goodput,quota,global")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate", type=float, default=1000, help="fixed rate for direct/Envoy setups (rps)")
    ap.add_argument("--rate-s", type=float, default=10)
    ap.add_argument("--sat-s", type=float, default=6)
    ap.add_argument("--litellm-rate", type=float, default=20)
    ap.add_argument("--litellm-rate-s", type=float, default=15)
    ap.add_argument("--litellm-workers", type=int, default=2)
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument("--quota-requests", type=int, default=10)
    ap.add_argument("--quota-window-ms", type=int, default=2000)
    ap.add_argument("--goodput-s", type=float, default=20)
    ap.add_argument("--quota-s", type=float, default=20, help="seconds per level in the quota part")
    ap.add_argument("--global-rates", default="1000,200",
                    help="global part: fixed rates (rps), the first as the issue's 1,000 rps")
    ap.add_argument("--quota-levels", default=",".join(QUOTA_LEVELS), help="quota part: any of below,at,above")
    ap.add_argument("--quota-setups", default=",".join(QUOTA_SETUPS),
                    help="quota part: any of " + ",".join(QUOTA_SETUPS))
    ap.add_argument("--no-quota-oversized", dest="quota_oversized", action="store_false",
                    help="quota part: skip the oversized-request runs")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.rate_s, args.sat_s, args.litellm_rate_s, args.goodput_s = 1, 3, 3, 5, 8
        args.quota_s = 8
    for p in (WASM, TRIVIAL_WASM, PROBE_WASM, RENDER, MOCK, SELECTION, RATELIMIT, ENVOY, OHA):
        if not p.exists():
            sys.exit(f"missing {p}: run bench/run.sh, which installs and builds everything")
    RESULTS.mkdir(parents=True, exist_ok=True)
    parts = set(args.only.split(","))
    (BENCH / ".work").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="run-", dir=BENCH / ".work") as tmp:
        workdir = Path(tmp)
        m = machine()
        m["load_at_start"] = loadavg()
        m["quick"] = args.quick
        t0 = time.monotonic()
        if "selection" in parts:
            selection(args)
        if "overhead" in parts:
            overhead(args, workdir)
        if "goodput" in parts:
            goodput(args, workdir)
        if "quota" in parts:
            quota_routing(args, workdir)
        if "global" in parts:
            global_limits(args, workdir)
        m["load_at_end"] = loadavg()
        m["bench_seconds"] = round(time.monotonic() - t0, 1)
        if os.environ.get("BENCH_INSTALL_BUILD_SECONDS"):
            m["install_build_seconds"] = int(os.environ["BENCH_INSTALL_BUILD_SECONDS"])
        prev = RESULTS / "machine.json"
        (prev).write_text(json.dumps(m, indent=2) + "\n")
    log(f"done in {m['bench_seconds']} s; results in {RESULTS}")


if __name__ == "__main__":
    main()
