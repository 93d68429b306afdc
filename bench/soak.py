"""Soak test: many requests of every kind through one Envoy + Spillway, with
memory, shared-data keys, wasm VM health and token accounting checked at the
end. Started by `bench/soak.sh` (which builds first); not part of CI.

    bench/.venv/bin/python bench/soak.py [REQUESTS] [--procs 2] [--concurrency 96] [--rate 0]

Setup: three mock backends on loopback (m0, m1 unlimited; m2 with a small
request quota, so it answers 429 + retry-after), each with its own key and a
stream of injected faults (500/503, connection resets before the answer,
answers cut in the middle); Envoy `--concurrency 2` with the rendered
Spillway bootstrap (`stream_usage` on, four gateway clients with generous
request and token limits, so admission and settlement run on every request).

Load (closed loop, `--concurrency` connections spread over `--procs` client
processes; a small asyncio HTTP/1.1 client on uvloop, cheap enough to leave
most of the two cores to Envoy): plain chat, streamed chat (usage hidden by
`stream_usage`, or asked for by the client), Responses API creates (plain and
streamed) and follow-ups with `previous_response_id` (pinned to the backend
that stored the first), and clients that hang up: before the answer (the
mock holds it back, `x-mock-latency-ms`) or after the first streamed event
(`x-mock-stream-chunk-delay-ms`). Cancelling clients use their own
deployment name (`gpt-4o-cancel`) so the token check can tell them apart.

Every `--sample-s` seconds: Envoy's RSS (/proc), Spillway's VM memory gauge
(`spillway_vm_memory_bytes`, per role) and shared-data key count
(`spillway_shared_data_keys`) when the filter has them ("n/a" otherwise),
Envoy's allocator gauges and its wasm stats (VMs created/active, reloads).

At the end (each check is recorded, and any failure makes the exit status 1):
no VM failure or reload (stats and Envoy's log), RSS and VM memory flat after
warm-up, shared-data keys within their bound, and tokens: per backend and
deployment, what Spillway counted (`spillway_tokens_total`) against what the
mock billed (`/_mock/stats` `usage`): equal for everything but the
cancelling clients' deployment, where the difference must be whole answers
the clients hung up on. Results: bench/results/soak.json, soak_samples.csv,
soak.png and the "Soak" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import multiprocessing as mp
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter, defaultdict, deque
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
RESULTS = BENCH / "results"
WASM = TARGET / "wasm32-wasip1" / "release" / "spillway.wasm"
RENDER = TARGET / "release" / "spillway-render"
MOCK = TARGET / "release" / "spillway-mock"
ENVOY = Path(os.environ.get("SPILLWAY_ENVOY", ROOT / ".venv" / "bin" / "envoy"))

API_VERSION = "2024-10-21"
DEPLOYMENT = "gpt-4o"
CANCEL_DEPLOYMENT = "gpt-4o-cancel"
CHAT_MESSAGES = [{"role": "user", "content": "Say hello in one short sentence."}]

# Gateway clients: generous limits (far above what the run can use), so
# admission and settlement run on every request but never refuse one.
CLIENTS = {
    "chat": "soak-chat-key-0001",
    "stream": "soak-stream-key-0002",
    "responses": "soak-responses-key-0003",
    "cancel": "soak-cancel-key-0004",
}
REQUESTS_PER_MINUTE = 100_000_000
TOKENS_PER_MINUTE = 10_000_000_000

# The request mix, in parts per 100 (kind -> weight).
MIX = {
    "chat": 36,            # classic path, JSON answer
    "stream": 22,          # streamed chat; stream_usage adds and hides the usage chunk
    "stream_usage": 3,     # streamed chat asking for include_usage itself
    "responses": 14,       # /openai/v1/responses create, JSON answer (its id is kept)
    "responses_followup": 9,  # a create with previous_response_id: pinned to the owner
    "responses_stream": 4,  # streamed Responses create
    "cancel_before_answer": 6,  # hangs up while the mock holds the answer back
    "cancel_mid_stream": 6,  # hangs up after the first content event
}
CANCEL_KINDS = ("cancel_before_answer", "cancel_mid_stream")
# Cancelling clients: the mock waits this long before answering (header),
# the client hangs up after CANCEL_AFTER_MS; mid-stream cancels get slow events.
CANCEL_LATENCY_MS = 300
CANCEL_AFTER_MS = (5, 25)
CANCEL_STREAM_DELAY_MS = 40

# Faults each mock is fed (fail_next; one entry per data-plane request, in
# order): kind -> weight per 10,000 requests, the rest served normally.
FAULTS = {
    "500": 100,
    "503": 50,
    "reset": 50,  # connection closed before any answer: Envoy retries elsewhere
    "cut": 40,  # reset_after_events 2: the answer is cut in the middle
}
FAULT_ENTRY = {
    "pass": {"status": 200},
    "500": {"status": 500},
    "503": {"status": 503},
    "reset": {"reset": True},
    "cut": {"reset_after_events": 2},
}
# m2's quota: requests per window (ms). The others have none.
SMALL_QUOTA = (30, 1000)

# Shared-data keys Spillway can create (src/affinity.rs SLOTS,
# src/credentials.rs SLOTS, plus a handful of single keys: health table,
# backend set, rotation counters, one per client's buckets).
KEY_BOUND = 16_384 + 4_096 + 32

REQUEST_TIMEOUT_S = 30.0


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ====================================================================== client
#
# A minimal HTTP/1.1 keep-alive client on asyncio streams: one buffer per
# connection, bodies by content-length or chunked encoding. httpx costs
# several times more CPU per request, and on two cores every µs the client
# spends is taken from Envoy.


class Broken(Exception):
    """The connection ended before the response did."""


class Conn:
    __slots__ = ("reader", "writer", "buf")

    def __init__(self, reader, writer):
        self.reader, self.writer, self.buf = reader, writer, bytearray()

    async def fill(self) -> None:
        data = await self.reader.read(65536)
        if not data:
            raise Broken("eof")
        self.buf += data

    async def head(self) -> tuple[int, dict]:
        buf = self.buf
        while (i := buf.find(b"\r\n\r\n")) < 0:
            await self.fill()
        lines = bytes(buf[:i]).decode("latin-1").split("\r\n")
        del buf[: i + 4]
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        return status, headers

    async def body(self, headers: dict) -> bytes:
        buf = self.buf
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(buf) < n:
                await self.fill()
            out = bytes(buf[:n])
            del buf[:n]
            return out
        if headers.get("transfer-encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                while (j := buf.find(b"\r\n")) < 0:
                    await self.fill()
                size = int(bytes(buf[:j]).split(b";")[0], 16)
                if size == 0:
                    # The last chunk: (trailers and) an empty line.
                    while (k := buf.find(b"\r\n\r\n", j)) < 0:
                        await self.fill()
                    del buf[: k + 4]
                    return bytes(out)
                need = j + 2 + size + 2
                while len(buf) < need:
                    await self.fill()
                out += buf[j + 2 : j + 2 + size]
                del buf[:need]
        # Neither: the body ends with the connection.
        try:
            while True:
                await self.fill()
        except Broken:
            out = bytes(buf)
            buf.clear()
            return out

    async def until(self, needle: bytes) -> bool:
        """Reads until `needle` shows up in what is buffered (True) or the
        connection ends (False)."""
        while needle not in self.buf:
            try:
                await self.fill()
            except Broken:
                return False
        return True

    def abort(self) -> None:
        self.writer.transport.abort()


def request_bytes(path: str, key: str, body: dict, extra: dict | None = None) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    head = (f"POST {path} HTTP/1.1\r\nhost: soak\r\ncontent-type: application/json\r\n"
            f"api-key: {key}\r\ncontent-length: {len(data)}\r\n")
    for k, v in (extra or {}).items():
        head += f"{k}: {v}\r\n"
    return head.encode() + b"\r\n" + data


CLASSIC = f"/openai/deployments/{{d}}/chat/completions?api-version={API_VERSION}"
RESPONSES = "/openai/v1/responses"


def static_requests() -> dict[str, bytes]:
    chat = CLASSIC.format(d=DEPLOYMENT)
    cancel = CLASSIC.format(d=CANCEL_DEPLOYMENT)
    return {
        "chat": request_bytes(chat, CLIENTS["chat"], {"messages": CHAT_MESSAGES, "max_tokens": 16}),
        "stream": request_bytes(chat, CLIENTS["stream"], {"messages": CHAT_MESSAGES, "stream": True}),
        "stream_usage": request_bytes(chat, CLIENTS["stream"], {
            "messages": CHAT_MESSAGES, "stream": True, "stream_options": {"include_usage": True}}),
        "responses": request_bytes(RESPONSES, CLIENTS["responses"], {"model": DEPLOYMENT, "input": "Hello there"}),
        "responses_stream": request_bytes(RESPONSES, CLIENTS["responses"], {
            "model": DEPLOYMENT, "input": "Hello there", "stream": True}),
        "cancel_before_answer": request_bytes(cancel, CLIENTS["cancel"], {"messages": CHAT_MESSAGES},
                                              {"x-mock-latency-ms": CANCEL_LATENCY_MS}),
        "cancel_mid_stream": request_bytes(cancel, CLIENTS["cancel"], {"messages": CHAT_MESSAGES, "stream": True},
                                           {"x-mock-stream-chunk-delay-ms": CANCEL_STREAM_DELAY_MS}),
    }


def followup_bytes(previous: str) -> bytes:
    return request_bytes(RESPONSES, CLIENTS["responses"],
                         {"model": DEPLOYMENT, "input": "And then?", "previous_response_id": previous})


RESP_ID = re.compile(rb'"id":"(resp_[^"]+)"')


class WorkerStats:
    def __init__(self):
        self.outcomes: Counter = Counter()  # (kind, outcome) -> n
        self.backends: Counter = Counter()  # (kind, backend) -> n
        self.latency: dict[str, array] = defaultdict(lambda: array("f"))  # kind -> ms
        self.per_second: dict[int, list[int]] = defaultdict(lambda: [0, 0])  # second -> [done, not 2xx]
        self.retry_after_missing = 0  # client 429s without retry-after
        self.examples: dict[str, list] = defaultdict(list)  # "kind status" -> first answers that were not 200


async def one(conn: Conn, kind: str, payload: bytes, st: WorkerStats, ids: deque,
              rng: random.Random) -> tuple[str, bool]:
    """Sends one request on `conn` and reads (or abandons) the answer.
    Returns (outcome, connection still usable); the outcome is the status as
    text, "cancelled" (the client hung up on purpose), or "broken" (the
    connection ended inside the answer). Raises Broken or OSError when the
    connection ended before any answer (the caller counts an error)."""
    conn.writer.write(payload)
    if kind == "cancel_before_answer":
        try:
            async with asyncio.timeout(rng.uniform(*CANCEL_AFTER_MS) / 1000):
                status, headers = await conn.head()
        except TimeoutError:
            return "cancelled", False
        # Answered before the client gave up (e.g. a local 429): read it.
    else:
        status, headers = await conn.head()
    if kind == "cancel_mid_stream" and status == 200:
        # The first content event ("Hello "), then hang up.
        return ("cancelled" if await conn.until(b"Hello") else "broken"), False
    backend = headers.get("x-spillway-backend")
    if backend:
        st.backends[(kind, backend)] += 1
    if status == 429 and "retry-after" not in headers:
        st.retry_after_missing += 1
    try:
        body = await conn.body(headers)
    except Broken:
        return "broken", False
    if status != 200:
        ex = st.examples[f"{kind} {status}"]
        if len(ex) < 3:
            ex.append({"backend": backend, "attempts": headers.get("x-spillway-attempts"),
                       "retry_after": headers.get("retry-after"), "body": body[:300].decode("utf-8", "replace")})
    if kind == "responses" and status == 200:
        m = RESP_ID.search(body)
        if m:
            ids.append(m.group(1).decode())
    return str(status), headers.get("connection", "").lower() != "close"


async def worker_main(host: str, port: int, count: int, concurrency: int, rate: float, seed: int,
                      progress, slot: int, deadline: float) -> WorkerStats:
    rng = random.Random(seed)
    kinds = [k for k, w in MIX.items() for _ in range(w)]
    reqs = static_requests()
    st = WorkerStats()
    ids: deque = deque(maxlen=512)
    next_index = 0
    t0 = time.monotonic()

    async def user() -> None:
        nonlocal next_index
        conn: Conn | None = None
        while True:
            i = next_index
            if i >= count or time.monotonic() > deadline:
                break
            next_index += 1
            if rate > 0:
                due = t0 + i / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            kind = kinds[rng.randrange(len(kinds))]
            if kind == "responses_followup":
                payload = followup_bytes(ids[rng.randrange(len(ids))]) if ids else reqs["responses"]
                if not ids:
                    kind = "responses"
            else:
                payload = reqs[kind]
            start = time.perf_counter()
            keep = False
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    if conn is None:
                        conn = Conn(*await asyncio.open_connection(host, port))
                    outcome, keep = await one(conn, kind, payload, st, ids, rng)
            except TimeoutError:
                outcome = "timeout"
            except (Broken, OSError):
                outcome = "error"
            except Exception as e:  # noqa: BLE001 - a client bug must not stop the run silently
                outcome = f"client-exception:{type(e).__name__}"
            elapsed = time.perf_counter() - start
            if not keep and conn is not None:
                conn.abort()
                conn = None
            st.outcomes[(kind, outcome)] += 1
            if kind not in CANCEL_KINDS and outcome not in ("error", "timeout"):
                st.latency[kind].append(elapsed * 1000)
            sec = st.per_second[int(time.monotonic() - t0)]
            sec[0] += 1
            if not outcome.startswith("2") and outcome != "cancelled":
                sec[1] += 1
            progress[slot] += 1
        if conn is not None:
            conn.abort()

    await asyncio.gather(*(user() for _ in range(concurrency)))
    return st


def worker_process(host, port, count, concurrency, rate, seed, progress, slot, deadline_wall, out_q) -> None:
    try:
        import uvloop  # noqa: PLC0415

        uvloop.install()
    except ImportError:
        pass
    deadline = time.monotonic() + (deadline_wall - time.time())
    try:
        st = asyncio.run(worker_main(host, port, count, concurrency, rate, seed, progress, slot, deadline))
    except BaseException as e:  # noqa: BLE001 - always report, so the main process does not wait forever
        out_q.put({"slot": slot, "error": repr(e)})
        raise
    out_q.put({
        "slot": slot,
        "cpu_s": time.process_time(),
        "outcomes": dict(st.outcomes),
        "backends": dict(st.backends),
        "latency": {k: v.tobytes() for k, v in st.latency.items()},
        "per_second": dict(st.per_second),
        "retry_after_missing": st.retry_after_missing,
        "examples": dict(st.examples),
    })


# =================================================================== processes


def proc_status_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:", "RssShmem:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU time spent by everything on the machine (all CPUs, not idle or
    iowait), seconds, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def parse_labels(name: str) -> tuple[str, dict]:
    """`wasmcustom.metric.k1.v1.k2.v2` -> (metric, {k1: v1, k2: v2})."""
    parts = name.removeprefix("wasmcustom.").split(".")
    metric, rest = parts[0], parts[1:]
    return metric, {rest[i]: rest[i + 1] for i in range(0, len(rest) - 1, 2)}


SAMPLE_FILTER = (r"^(wasm\.|wasmcustom\.spillway_(vm_memory|shared_data)|server\.memory_|"
                 r"http\.spillway\.downstream_(rq_total|rq_active|cx_active))")


class Sampler(threading.Thread):
    """Every `interval` s: Envoy's RSS and the stats the soak watches."""

    def __init__(self, envoy, progress, interval: float):
        super().__init__(daemon=True)
        import httpx  # noqa: PLC0415

        self.client = httpx.Client(timeout=10)
        self.envoy, self.progress, self.interval = envoy, progress, interval
        self.samples: list[dict] = []
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()
        self.names_seen: set[str] = set()

    def sample(self, phase: str) -> dict:
        t = time.monotonic() - self.t0
        s = {"t_s": round(t, 2), "phase": phase, "requests_done": int(sum(self.progress))}
        st = proc_status_kb(self.envoy.pid)
        s["rss_mib"] = round(st["VmRSS"] / 1024, 2)
        s["hwm_mib"] = round(st["VmHWM"] / 1024, 2)
        # Anonymous memory (heaps, V8) vs file pages (Envoy's binary: code
        # paths used for the first time fault in more of it).
        s["rss_anon_mib"] = round(st.get("RssAnon", 0) / 1024, 2)
        s["rss_file_mib"] = round(st.get("RssFile", 0) / 1024, 2)
        s["envoy_cpu_s"] = round(cpu_seconds(self.envoy.pid), 2)
        r = self.client.get(f"{self.envoy.admin}/stats", params={"format": "json", "filter": SAMPLE_FILTER})
        vm_mem, keys = {}, {}
        for item in r.json().get("stats", []):
            name, value = item.get("name"), item.get("value")
            if not isinstance(value, (int, float)):
                continue
            self.names_seen.add(name)
            if name.startswith("wasmcustom.spillway_vm_memory"):
                metric, labels = parse_labels(name)
                vm_mem[".".join(f"{k}={v}" for k, v in labels.items()) or metric] = value
            elif name.startswith("wasmcustom.spillway_shared_data"):
                metric, labels = parse_labels(name)
                keys[".".join(f"{k}={v}" for k, v in labels.items()) or metric] = value
            elif name.startswith("server.memory_"):
                s[name.removeprefix("server.")] = value
            elif name.startswith("http.spillway."):
                s[name.removeprefix("http.spillway.")] = value
            elif name.startswith("wasm."):
                s[name] = value
        s["vm_memory"] = vm_mem  # label set -> bytes
        s["vm_memory_bytes_total"] = sum(vm_mem.values()) if vm_mem else None
        s["shared_data_keys_by"] = keys
        s["shared_data_keys"] = max(keys.values()) if keys else None
        return s

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                s = self.sample("load")
            except Exception as e:  # noqa: BLE001 - a missed sample is not fatal
                log(f"sample failed: {e!r}")
                continue
            self.samples.append(s)
            prev = self.samples[-2] if len(self.samples) > 1 else None
            rps = ((s["requests_done"] - prev["requests_done"]) / (s["t_s"] - prev["t_s"])) if prev else 0
            vm = s["vm_memory_bytes_total"]
            log(f"{s['requests_done']:>9,} done  {rps:7.0f} rps  RSS {s['rss_mib']:.1f} MiB  "
                f"VM mem {'n/a' if vm is None else f'{vm / 2**20:.2f} MiB'}  "
                f"keys {'n/a' if s['shared_data_keys'] is None else s['shared_data_keys']}  "
                f"wasm created/active {s.get('wasm.envoy.wasm.runtime.v8.created')}/"
                f"{s.get('wasm.envoy.wasm.runtime.v8.active')}")


class FaultFeeder(threading.Thread):
    """Keeps each mock's fail_next queue topped up with a seeded mix of
    faults and normal answers; remembers every entry it queued so the kinds
    actually used are known at the end (the first `queued - pending`)."""

    LOW, BATCH = 1500, 3000

    def __init__(self, mocks, seed: int):
        super().__init__(daemon=True)
        import httpx  # noqa: PLC0415

        self.client = httpx.Client(timeout=10)
        self.mocks = mocks
        self.rng = random.Random(seed)
        self.queued: dict[str, list[str]] = {m.name: [] for m in mocks}
        self.stop_event = threading.Event()
        self.table = [k for k, w in FAULTS.items() for _ in range(w)]
        self.table += ["pass"] * (10_000 - len(self.table))
        self.errors = 0

    def top_up(self) -> None:
        for m in self.mocks:
            pending = self.client.get(f"{m.url}/_mock/config").json()["fail_next_pending"]
            if pending >= self.LOW:
                continue
            kinds = [self.table[self.rng.randrange(len(self.table))] for _ in range(self.BATCH)]
            r = self.client.post(f"{m.url}/_mock/config", json={"fail_next": [FAULT_ENTRY[k] for k in kinds]})
            r.raise_for_status()
            self.queued[m.name] += kinds

    def run(self) -> None:
        while not self.stop_event.wait(0.25):
            try:
                self.top_up()
            except Exception as e:  # noqa: BLE001
                self.errors += 1
                log(f"fault feeder: {e!r}")

    def used(self) -> dict[str, dict[str, int]]:
        out = {}
        for m in self.mocks:
            pending = self.client.get(f"{m.url}/_mock/config").json()["fail_next_pending"]
            kinds = self.queued[m.name]
            out[m.name] = dict(Counter(kinds[: len(kinds) - pending]))
        return out


# ================================================================== analysis


def prometheus(text: str) -> list[tuple[str, dict, float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$', line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        try:
            out.append((m.group(1), labels, float(m.group(3))))
        except ValueError:
            continue
    return out


# Spillway's warnings about what backends did (the injected faults).
EXPECTED_WARNINGS = re.compile(r"^(backend \S+ broke off an answer|circuit opened for backend \S+)$")
LOG_PROBLEMS = re.compile(
    r"panicked|wasm trap|Wasm VM failed|VM failed|failed to (?:load|start|initialize|create)|"
    r"unreachable|out of bounds|stack overflow|wasm abort|Function: .* failed", re.I)


def scan_envoy_log(path: Path) -> dict:
    """Counts Envoy log lines by level, finds wasm failure lines, and sums
    Spillway's per-request log lines' tokens per (backend, deployment)."""
    levels: Counter = Counter()
    warnings: Counter = Counter()
    host_warnings: Counter = Counter()
    problems: list[str] = []
    problem_count = 0
    tokens: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    request_lines = 0
    lvl = re.compile(rb"^\[[^\]]+\]\[\d+\]\[(\w+)\]\[(\w+)\]")
    with open(path, "rb") as f:
        for raw in f:
            m = lvl.match(raw)
            level, component = (m.group(1).decode(), m.group(2).decode()) if m else ("?", "?")
            levels[level] += 1
            i = raw.find(b'{"msg":"request"')
            if i >= 0:
                request_lines += 1
                try:
                    d = json.loads(raw[i:])
                except ValueError:
                    continue
                if d.get("prompt_tokens") is not None:
                    t = tokens[(d.get("backend") or "", d.get("deployment") or "")]
                    t[0] += d["prompt_tokens"]
                    t[1] += d.get("completion_tokens") or 0
                continue
            line = raw.decode("utf-8", "replace").rstrip()
            if level not in ("warning", "error", "critical") and not LOG_PROBLEMS.search(line):
                continue
            msg = line.split(" spillway: ", 1)[1] if " spillway: " in line else None
            if msg is not None and level == "warning" and EXPECTED_WARNINGS.search(msg):
                # Spillway reporting what the injected faults did.
                warnings[re.sub(r"\bm\d+\b", "{backend}", msg)] += 1
            elif msg is not None and level == "warning":
                # Spillway's own warnings about a failed host call: not a VM
                # failure, but not expected either.
                host_warnings[re.sub(r"\d+", "N", msg)[:200]] += 1
            elif level in ("error", "critical") or component == "wasm" or "wasm" in line.lower() \
                    or "panicked" in line:
                problem_count += 1
                if len(problems) < 20:
                    problems.append(line[:400])
    return {"levels": dict(levels), "wasm_problem_lines": problem_count, "wasm_problem_examples": problems,
            "spillway_warnings": dict(warnings), "spillway_host_call_warnings": dict(host_warnings),
            "request_lines": request_lines,
            "tokens_from_log": {f"{b}|{d}": v for (b, d), v in tokens.items()}}


def flatness(samples: list[dict], key: str, total: int, warmup_frac: float) -> dict | None:
    """Start (first sample), plateau (median of the samples between the end
    of warm-up and twice that), end (median of the last three samples under
    load), growth end - plateau, max after warm-up, and a least-squares slope
    per 100k requests over everything after warm-up."""
    pts = [(s["requests_done"], s[key]) for s in samples if s["phase"] == "load" and s.get(key) is not None]
    if len(pts) < 4:
        return None
    warm = warmup_frac * total
    after = [(x, y) for x, y in pts if x >= warm]
    if len(after) < 3:
        after = pts[len(pts) // 2:]
    plateau_pts = [y for x, y in after if x <= 2 * warm] or [after[0][1]]
    xs, ys = [x for x, _ in after], [y for _, y in after]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in after) / var if var else 0.0
    end = statistics.median([y for _, y in pts[-3:]])
    plateau = statistics.median(plateau_pts)
    second = after[len(after) // 2:]
    return {"start": pts[0][1], "plateau": plateau, "end": end, "growth": end - plateau,
            "max_after_warmup": max(ys), "min_after_warmup": min(ys),
            "slope_per_100k_requests": slope * 100_000,
            "slope_second_half_per_100k_requests": fit(second) * 100_000 if len(second) >= 3 else None,
            "samples": len(pts), "warmup_requests": int(warm)}


def fit(pts: list[tuple[float, float]]) -> float:
    """Least-squares slope dy/dx."""
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in pts) / var if var else 0.0


def percentile(values, q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))]


def token_check(mock_usage: dict[str, dict], spill: dict, cancels: int) -> dict:
    """mock_usage: backend -> deployment -> {answers, prompt_tokens, completion_tokens, cut}.
    spill: (backend, deployment) -> [prompt, completion] from spillway_tokens_total."""
    rows, ok = [], True
    unseen_answers_total = 0
    keys = {(b, d) for b, ds in mock_usage.items() for d in ds} | set(spill)
    for b, d in sorted(keys):
        u = mock_usage.get(b, {}).get(d, {"answers": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                          "cut": {"answers": 0, "prompt_tokens": 0, "completion_tokens": 0}})
        cut = u["cut"]
        expect = (u["prompt_tokens"] - cut["prompt_tokens"], u["completion_tokens"] - cut["completion_tokens"])
        got = tuple(spill.get((b, d), [0, 0]))
        diff = (expect[0] - got[0], expect[1] - got[1])
        row = {"backend": b, "deployment": d, "mock_answers": u["answers"], "mock_prompt": u["prompt_tokens"],
               "mock_completion": u["completion_tokens"], "cut_answers": cut["answers"],
               "cut_prompt": cut["prompt_tokens"], "cut_completion": cut["completion_tokens"],
               "spillway_prompt": got[0], "spillway_completion": got[1],
               "unseen_prompt": diff[0], "unseen_completion": diff[1]}
        if d == CANCEL_DEPLOYMENT:
            # Answers the mock generated (and bills) but nobody downstream
            # received: the client hung up. Every cancel-deployment answer has
            # the same size, so the difference must be whole answers, never
            # negative (a negative one would be counted twice).
            per_p = u["prompt_tokens"] / u["answers"] if u["answers"] else 0
            per_c = u["completion_tokens"] / u["answers"] if u["answers"] else 0
            n_p = diff[0] / per_p if per_p else 0
            n_c = diff[1] / per_c if per_c else 0
            whole = (abs(n_p - round(n_p)) < 1e-9 and abs(n_c - round(n_c)) < 1e-9 and round(n_p) == round(n_c))
            row["unseen_answers"] = round(n_c) if whole else None
            row["spillway_answers"] = round(got[1] / per_c) if per_c else 0
            row["ok"] = diff[0] >= 0 and diff[1] >= 0 and whole
            unseen_answers_total += round(n_c) if whole else 0
        else:
            row["ok"] = diff == (0, 0)
        ok &= row["ok"]
        rows.append(row)
    counted = sum(r.get("spillway_answers", 0) for r in rows if r["deployment"] == CANCEL_DEPLOYMENT)
    return {"ok": ok and unseen_answers_total <= cancels, "rows": rows,
            "cancel_unseen_answers": unseen_answers_total, "cancel_answers_counted_by_spillway": counted,
            "client_cancels": cancels}


# ====================================================================== main


def machine() -> dict:
    cpu = Path("/proc/cpuinfo").read_text()
    model = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("model name")), "?")
    mem_kb = int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines()
                      if l.startswith("MemTotal:")))
    envoy_v = subprocess.run([str(ENVOY), "--version"], capture_output=True, text=True).stdout.strip()
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src", "mock", "render"],
                           capture_output=True, text=True).stdout
    return {
        "nproc": os.cpu_count(), "cpu_model": model, "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(), "envoy": envoy_v.split("version:", 1)[-1].strip(),
        "python": platform.python_version(), "git_commit": git,
        "uncommitted_changes_in": [line[3:] for line in dirty.splitlines() if line.strip()],
        "spillway_wasm_sha256": hashlib.sha256(WASM.read_bytes()).hexdigest(),
        "spillway_wasm_mtime_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(WASM.stat().st_mtime)),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def filter_config(mock_ports: list[int]) -> dict:
    return {
        "backends": [{"name": f"m{i}", "url": f"http://127.0.0.1:{p}", "api_key": f"soak-backend-key-{i}"}
                     for i, p in enumerate(mock_ports)],
        "api_version": API_VERSION,
        "stream_usage": True,
        "clients": [{"name": n, "key": k, "requests_per_minute": REQUESTS_PER_MINUTE,
                     "tokens_per_minute": TOKENS_PER_MINUTE} for n, k in CLIENTS.items()],
    }


def run(args) -> int:
    sys.path.insert(0, str(BENCH))
    import httpx  # noqa: PLC0415

    import bench  # noqa: PLC0415 - its process helpers

    for p in (WASM, RENDER, MOCK, ENVOY):
        if not p.exists():
            sys.exit(f"missing {p}: run bench/soak.sh, which builds everything")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (BENCH / ".work").mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="soak-", dir=BENCH / ".work"))
    meta = machine()
    meta["load_at_start"] = bench.loadavg()
    log(f"workdir {workdir}; wasm sha256 {meta['spillway_wasm_sha256'][:16]}…")
    procs = []
    try:
        mocks = []
        for i in range(3):
            quota = (["--requests-per-window", str(SMALL_QUOTA[0]), "--window-ms", str(SMALL_QUOTA[1])]
                     if i == 2 else [])
            m = bench.Mock(f"m{i}", workdir, "--api-key", f"soak-backend-key-{i}", *quota)
            m.name = f"m{i}"
            mocks.append(m)
            procs.append(m)
        fcfg = filter_config([m.port for m in mocks])
        fpath = workdir / "filter.json"
        fpath.write_text(json.dumps(fcfg, indent=2))
        port, admin = bench.free_port(), bench.free_port()
        boot = workdir / "envoy.yaml"
        subprocess.run([str(RENDER), str(fpath), "--wasm", str(WASM), "--listen", f"127.0.0.1:{port}",
                        "--admin", f"127.0.0.1:{admin}", "--no-access-log", "-o", str(boot)],
                       check=True, capture_output=True, text=True)
        envoy = bench.Proc("envoy", [str(ENVOY), "-c", str(boot), "--concurrency", "2", "--disable-hot-restart",
                                     "--base-id", str(random.randint(1000, 10_000_000)), "-l", "info"]
                           + (["--component-log-level", "wasm:warning"] if args.no_request_log else []), workdir)
        envoy.admin = f"http://127.0.0.1:{admin}"
        procs.append(envoy)

        def ready() -> bool:
            return httpx.get(f"{envoy.admin}/ready", timeout=1).status_code == 200

        bench.wait_until(ready, 60, "envoy ready", envoy.proc)
        stats_at_start = httpx.get(f"{envoy.admin}/stats", params={"filter": r"^wasm\."}, timeout=10).text
        log(f"Envoy up (pid {envoy.pid}), RSS {proc_status_kb(envoy.pid)['VmRSS'] / 1024:.1f} MiB; "
            f"mocks {[m.port for m in mocks]}; m2 quota {SMALL_QUOTA[0]} requests / {SMALL_QUOTA[1]} ms")

        feeder = FaultFeeder(mocks, args.seed)
        feeder.top_up()
        feeder.start()

        progress = mp.get_context("spawn").RawArray("q", args.procs)
        sampler = Sampler(envoy, progress, args.sample_s)
        idle = sampler.sample("idle")
        sampler.samples.append(idle)
        sampler.start()
        ctx = mp.get_context("spawn")
        out_q = ctx.Queue()
        share = [args.requests // args.procs + (1 if i < args.requests % args.procs else 0)
                 for i in range(args.procs)]
        conc = [max(1, args.concurrency // args.procs)] * args.procs
        deadline_wall = time.time() + args.max_seconds
        log(f"load: {args.requests:,} requests, {args.procs} client processes x {conc[0]} connections"
            + (f", {args.rate:g} rps" if args.rate else ", closed loop") + f"; limit {args.max_seconds} s")
        t_load0 = time.monotonic()
        cpu0 = cpu_seconds(envoy.pid)
        mock_cpu0 = sum(cpu_seconds(m.pid) for m in mocks)
        busy0 = machine_busy_s()
        workers = [ctx.Process(target=worker_process,
                               args=("127.0.0.1", port, share[i], conc[i], args.rate / args.procs,
                                     args.seed * 1000 + i, progress, i, deadline_wall, out_q))
                   for i in range(args.procs)]
        for w in workers:
            w.start()
        results = []
        while len(results) < len(workers):
            try:
                r = out_q.get(timeout=5)
            except Exception:  # noqa: BLE001 - queue.Empty
                if all(not w.is_alive() for w in workers) and out_q.empty():
                    raise RuntimeError("client processes exited without reporting") from None
                continue
            if "error" in r:
                raise RuntimeError(f"client process {r['slot']} failed: {r['error']}")
            results.append(r)
        for w in workers:
            w.join(30)
        load_s = time.monotonic() - t_load0
        cpu1 = cpu_seconds(envoy.pid)
        mock_cpu1 = sum(cpu_seconds(m.pid) for m in mocks)
        busy1 = machine_busy_s()
        sampler.stop_event.set()
        sampler.join(30)
        feeder.stop_event.set()
        feeder.join(30)
        faults_used = feeder.used()
        # Let the last answers' on_log run (it follows the response), then
        # the final samples: right after the load and after a quiet period.
        time.sleep(2)
        sampler.samples.append(sampler.sample("after"))
        time.sleep(args.settle_s)
        sampler.samples.append(sampler.sample("after"))
        prom = httpx.get(f"{envoy.admin}/stats/prometheus", timeout=30).text
        stats_at_end = httpx.get(f"{envoy.admin}/stats", params={"filter": r"^wasm\."}, timeout=10).text
        mock_stats = {m.name: m.stats() for m in mocks}
        mock_rss = {m.name: proc_status_kb(m.pid)["VmRSS"] for m in mocks}
    finally:
        for p in reversed(procs):
            p.stop()
    log(f"load finished in {load_s:.0f} s; scanning Envoy's log ({envoy.log_path.stat().st_size / 2**20:.0f} MiB)")
    scan = scan_envoy_log(envoy.log_path)

    # ------------------------------------------------------------ aggregate
    outcomes: Counter = Counter()
    backends: Counter = Counter()
    latency: dict[str, array] = defaultdict(lambda: array("f"))
    per_second: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    ra_missing = 0
    examples: dict[str, list] = {}
    for r in results:
        for k, v in r["examples"].items():
            examples.setdefault(k, []).extend(v[: 3 - len(examples.get(k, []))])
        outcomes.update(r["outcomes"])
        backends.update(r["backends"])
        for k, b in r["latency"].items():
            a = array("f")
            a.frombytes(b)
            latency[k].extend(a)
        for s, (n, bad) in r["per_second"].items():
            per_second[s][0] += n
            per_second[s][1] += bad
        ra_missing += r["retry_after_missing"]
    done = sum(outcomes.values())
    by_kind: dict[str, dict] = {}
    for (kind, outcome), n in sorted(outcomes.items()):
        by_kind.setdefault(kind, {})[outcome] = n
    cancels = sum(n for (k, o), n in outcomes.items() if o == "cancelled")

    # Spillway's own counters.
    metrics = prometheus(prom)
    spill_tokens: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    spill_tokens_by_client: Counter = Counter()
    counters: dict[str, dict] = defaultdict(dict)
    for name, labels, value in metrics:
        if name == "spillway_tokens_total":
            t = spill_tokens[(labels.get("backend", ""), labels.get("deployment", ""))]
            t[0 if labels.get("kind") == "prompt" else 1] += int(value)
            spill_tokens_by_client[labels.get("client", "")] += int(value)
        elif name.startswith("spillway_") and not name.startswith(("spillway_vm_memory", "spillway_shared_data")):
            counters[name][",".join(f"{k}={v}" for k, v in sorted(labels.items()))] = value
    mock_usage = {b: s.get("usage") or {} for b, s in mock_stats.items()}
    tokens = token_check(mock_usage, dict(spill_tokens), cancels)
    log_tokens = {tuple(k.split("|", 1)): v for k, v in scan["tokens_from_log"].items()}
    log_vs_metric = all(log_tokens.get(k, [0, 0]) == v for k, v in spill_tokens.items()) and all(
        spill_tokens.get(k, [0, 0]) == v for k, v in log_tokens.items())

    # Wasm VM health.
    def wasm_stats(text: str) -> dict[str, int]:
        out = {}
        for line in text.splitlines():
            k, _, v = line.partition(": ")
            if v.strip().lstrip("-").isdigit():
                out[k] = int(v)
        return out

    w0, w1 = wasm_stats(stats_at_start), wasm_stats(stats_at_end)
    reloads = {k: v for k, v in w1.items() if "vm_reload" in k and not k.endswith("vm_reload_backoff")}
    vm_checks = {
        "runtime_created_start": w0.get("wasm.envoy.wasm.runtime.v8.created"),
        "runtime_created_end": w1.get("wasm.envoy.wasm.runtime.v8.created"),
        "runtime_active_start": w0.get("wasm.envoy.wasm.runtime.v8.active"),
        "runtime_active_end": w1.get("wasm.envoy.wasm.runtime.v8.active"),
        "vm_count_start": w0.get("wasm.wasm_vm_count"),
        "vm_count_end": w1.get("wasm.wasm_vm_count"),
        "reload_stats": reloads,
        "log_wasm_problem_lines": scan["wasm_problem_lines"],
        "log_wasm_problem_examples": scan["wasm_problem_examples"],
        "spillway_warnings": scan["spillway_warnings"],
        "spillway_host_call_warnings": scan["spillway_host_call_warnings"],
    }
    vm_ok = (vm_checks["runtime_created_start"] == vm_checks["runtime_created_end"]
             and vm_checks["runtime_active_start"] == vm_checks["runtime_active_end"]
             and vm_checks["vm_count_start"] == vm_checks["vm_count_end"]
             and all(v == 0 for v in reloads.values()) and scan["wasm_problem_lines"] == 0)

    samples = sampler.samples
    rss = flatness(samples, "rss_mib", args.requests, args.warmup)
    rss_anon = flatness(samples, "rss_anon_mib", args.requests, args.warmup)
    rss_file = flatness(samples, "rss_file_mib", args.requests, args.warmup)
    allocated = flatness(samples, "memory_allocated", args.requests, args.warmup)
    vm = flatness(samples, "vm_memory_bytes_total", args.requests, args.warmup)
    keys = flatness(samples, "shared_data_keys", args.requests, args.warmup)
    checks = {"no_vm_failures_or_reloads": vm_ok}
    if rss:
        rss["tolerance"] = max(args.rss_tolerance_mib, 0.05 * rss["plateau"])
        checks["rss_flat_after_warmup"] = rss["growth"] <= rss["tolerance"]
    if vm:
        vm["tolerance"] = max(args.vm_tolerance_mib * 2**20, 0.02 * vm["plateau"])
        checks["vm_memory_flat_after_warmup"] = vm["growth"] <= vm["tolerance"]
    if keys:
        keys["bound"] = KEY_BOUND
        checks["shared_data_keys_bounded"] = keys["max_after_warmup"] <= KEY_BOUND
    checks["tokens_match_mocks"] = tokens["ok"]
    if not args.no_request_log:
        checks["log_tokens_match_metric"] = log_vs_metric
    checks["no_host_call_warnings"] = not scan["spillway_host_call_warnings"]
    checks["all_requests_done"] = done == args.requests
    checks["no_client_timeouts"] = sum(n for (k, o), n in outcomes.items() if o == "timeout") == 0

    load_samples = [s for s in samples if s["phase"] == "load"]
    peak_rps = 0.0
    for a, b in zip(load_samples, load_samples[1:]):
        if b["t_s"] > a["t_s"]:
            peak_rps = max(peak_rps, (b["requests_done"] - a["requests_done"]) / (b["t_s"] - a["t_s"]))
    lat = {k: {"n": len(v), "p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99), "max_ms": max(v) if v else None}
           for k, v in sorted(latency.items())}
    meta["load_at_end"] = bench.loadavg()
    doc = {
        "params": {
            "requests": args.requests, "procs": args.procs, "concurrency": args.concurrency, "rate": args.rate,
            "sample_s": args.sample_s, "warmup_fraction": args.warmup, "seed": args.seed,
            "envoy_concurrency": 2, "mix_percent": MIX, "faults_per_10000": FAULTS,
            "small_quota": {"backend": "m2", "requests_per_window": SMALL_QUOTA[0], "window_ms": SMALL_QUOTA[1]},
            "cancel": {"latency_ms": CANCEL_LATENCY_MS, "hang_up_after_ms": list(CANCEL_AFTER_MS),
                       "stream_chunk_delay_ms": CANCEL_STREAM_DELAY_MS},
            "clients": {n: {"requests_per_minute": REQUESTS_PER_MINUTE, "tokens_per_minute": TOKENS_PER_MINUTE}
                        for n in CLIENTS},
            "command": args.command,
        },
        "machine": meta,
        "load": {"requests_done": done, "seconds": round(load_s, 1), "rps": round(done / load_s, 1),
                 "peak_rps_sample": round(peak_rps, 1),
                 "envoy_cpu_s": round(cpu1 - cpu0, 1), "envoy_cpu_us_per_request": round((cpu1 - cpu0) / done * 1e6, 1)
                 if done else None,
                 "cpu_s": {"envoy": round(cpu1 - cpu0, 1), "mocks": round(mock_cpu1 - mock_cpu0, 1),
                           "clients": round(sum(r["cpu_s"] for r in results), 1),
                           "machine_busy": round(busy1 - busy0, 1), "machine_capacity": round(load_s * os.cpu_count(), 1)},
                 "by_kind": by_kind, "client_cancels": cancels, "client_429_without_retry_after": ra_missing,
                 "answered_by_backend": {f"{k}|{b}": n for (k, b), n in sorted(backends.items())},
                 "latency_ms": lat, "non_200_examples": examples},
        "faults_used": faults_used,
        "mocks": {b: {"requests_total": s["requests_total"], "by_status": s["by_status"],
                      "usage": s.get("usage"), "rss_kib_end": mock_rss[b]} for b, s in mock_stats.items()},
        "spillway_counters": counters,
        "tokens": tokens,
        "tokens_by_client": dict(spill_tokens_by_client),
        "log": {k: scan[k] for k in ("levels", "request_lines")} | {"tokens_match_metric": log_vs_metric},
        "vm": vm_checks,
        "gauges_present": {
            "spillway_vm_memory_bytes": any(s.get("vm_memory") for s in samples),
            "spillway_shared_data_keys": any(s.get("shared_data_keys") is not None for s in samples),
            "vm_memory_labels": sorted({k for s in samples for k in (s.get("vm_memory") or {})}),
        },
        "memory": {"rss_mib": rss, "rss_anon_mib": rss_anon, "rss_file_mib": rss_file,
                   "tcmalloc_allocated_bytes": allocated, "vm_memory_bytes": vm, "shared_data_keys": keys,
                   "idle_rss_mib": idle["rss_mib"], "final_rss_mib": samples[-1]["rss_mib"],
                   "hwm_mib": samples[-1]["hwm_mib"],
                   "final_vm_memory": samples[-1].get("vm_memory"),
                   "final_shared_data_keys": samples[-1].get("shared_data_keys")},
        "checks": checks,
        "ok": all(checks.values()),
    }
    write_outputs(doc, samples, per_second)
    if not args.keep:
        for p in workdir.iterdir():
            p.unlink()
        workdir.rmdir()
    else:
        log(f"kept {workdir}")
    for name, ok in checks.items():
        log(f"check {name}: {'ok' if ok else 'FAILED'}")
    return 0 if doc["ok"] else 1


# ==================================================================== output

SAMPLE_FIELDS = ["t_s", "phase", "requests_done", "rss_mib", "rss_anon_mib", "rss_file_mib", "hwm_mib", "envoy_cpu_s", "memory_allocated",
                 "memory_heap_size", "memory_physical_size", "vm_memory_bytes_total", "shared_data_keys",
                 "downstream_rq_total", "downstream_rq_active", "downstream_cx_active",
                 "wasm.envoy.wasm.runtime.v8.created", "wasm.envoy.wasm.runtime.v8.active", "wasm.wasm_vm_count"]


def write_outputs(doc: dict, samples: list[dict], per_second: dict) -> None:
    vm_labels = doc["gauges_present"]["vm_memory_labels"]
    key_labels = sorted({k for s in samples for k in (s.get("shared_data_keys_by") or {})})
    with open(RESULTS / "soak_samples.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SAMPLE_FIELDS + [f"vm_memory[{k}]" for k in vm_labels] + [f"keys[{k}]" for k in key_labels])
        for s in samples:
            row = [("n/a" if s.get(k) is None else s.get(k)) for k in SAMPLE_FIELDS]
            row += [(s.get("vm_memory") or {}).get(k, "n/a") for k in vm_labels]
            row += [(s.get("shared_data_keys_by") or {}).get(k, "n/a") for k in key_labels]
            w.writerow(row)
    (RESULTS / "soak.json").write_text(json.dumps(doc, indent=2) + "\n")
    chart(doc, samples, per_second)
    update_benchmarks_md(doc)
    log("wrote bench/results/soak.json, soak_samples.csv, soak.png and the Soak section of BENCHMARKS.md")


def chart(doc: dict, samples: list[dict], per_second: dict) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    load = [s for s in samples if s["phase"] in ("load", "after")]
    x = [s["requests_done"] / 1000 for s in load]
    fig, axes = plt.subplots(4, 1, figsize=(11, 13), sharex=False)
    warm = doc["params"]["warmup_fraction"] * doc["params"]["requests"] / 1000

    ax = axes[0]
    rss_vals = [s["rss_mib"] for s in load]
    ax.plot(x, rss_vals, label="Envoy RSS (VmRSS, left)", color="tab:blue")
    if any(s.get("rss_anon_mib") for s in load):
        anon = [s.get("rss_anon_mib") for s in load]
        ax.plot(x, anon, label="of which anonymous (RssAnon, left)", color="tab:purple")
        rss_vals = rss_vals + [a for a in anon if a]
    ax.axvline(warm, color="k", alpha=0.3, linestyle=":", label="end of warm-up")
    lo, hi = min(rss_vals), max(rss_vals)
    ax.set_ylim(lo - max(5, 0.5 * (hi - lo)), hi + max(5, 0.5 * (hi - lo)))
    ax.set_ylabel("RSS, MiB")
    handles, names = ax.get_legend_handles_labels()
    if any(s.get("memory_allocated") for s in load):
        ax2 = ax.twinx()
        ax2.plot(x, [(s.get("memory_allocated") or 0) / 2**20 for s in load], color="tab:cyan",
                 label="tcmalloc allocated (right)")
        ax2.plot(x, [(s.get("memory_heap_size") or 0) / 2**20 for s in load], color="tab:gray", linestyle="--",
                 label="tcmalloc heap size (right)")
        ax2.set_ylim(bottom=0)
        ax2.set_ylabel("tcmalloc, MiB")
        h2, n2 = ax2.get_legend_handles_labels()
        handles, names = handles + h2, names + n2
    ax.set_title("Envoy memory (note the RSS axis does not start at 0)")
    ax.legend(handles, names, loc="lower right", fontsize=8)

    ax = axes[1]
    labels = doc["gauges_present"]["vm_memory_labels"]
    if labels:
        for j, k in enumerate(labels):
            ax.plot(x, [((s.get("vm_memory") or {}).get(k) or float("nan")) / 2**20 for s in load], label=k,
                    linestyle="-" if j == 0 else "--", linewidth=2 if j == 0 else 1.2)
        vals = [v / 2**20 for s in load for v in (s.get("vm_memory") or {}).values()]
        if vals:
            ax.set_ylim(0, max(vals) * 1.25)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "spillway_vm_memory_bytes: n/a (the filter does not export it)", ha="center",
                va="center", transform=ax.transAxes)
    ax.axvline(warm, color="k", alpha=0.3, linestyle=":")
    ax.set_ylabel("MiB")
    ax.set_title("Spillway wasm VM memory (spillway_vm_memory_bytes: largest linear memory of a role's VMs)")

    ax = axes[2]
    if any(s.get("shared_data_keys") is not None for s in load):
        ax.plot(x, [s.get("shared_data_keys") if s.get("shared_data_keys") is not None else float("nan")
                    for s in load], color="tab:green", label="spillway_shared_data_keys")
        ax.axhline(16_384, color="tab:red", alpha=0.4, linestyle="--", label="affinity table slots (16,384)")
        ax.set_ylim(bottom=0)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "spillway_shared_data_keys: n/a (the filter does not export it)", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_ylabel("keys")
    ax.set_title("Envoy shared-data keys")
    ax.set_xlabel("requests completed (thousands)")

    ax = axes[3]
    secs = sorted(per_second)
    ax.plot(secs, [per_second[s][0] for s in secs], color="tab:blue", linewidth=0.6, label="completed / s")
    ax.plot(secs, [per_second[s][1] for s in secs], color="tab:red", linewidth=0.6,
            label="not 2xx / s (429, 5xx, cut, errors; cancels excluded)")
    ax.set_xlabel("seconds since start of load")
    ax.set_ylabel("requests/s")
    ax.set_title(f"Load: {doc['load']['requests_done']:,} requests in {doc['load']['seconds']:.0f} s "
                 f"({doc['load']['rps']:,.0f} rps)")
    ax.legend(loc="lower right", fontsize=8)
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(f"Spillway soak: {doc['params']['requests']:,} requests, Envoy --concurrency 2", fontsize=12)
    fig.tight_layout()
    fig.savefig(RESULTS / "soak.png", dpi=100)
    plt.close(fig)


def _mib(v, digits=1):
    return "n/a" if v is None else f"{v:,.{digits}f}"


def markdown_section(doc: dict) -> list[str]:
    """The "Soak" section of BENCHMARKS.md, from soak.json (also used by report.py)."""
    p, ld, mem, tok, vm = doc["params"], doc["load"], doc["memory"], doc["tokens"], doc["vm"]
    m = doc["machine"]
    rss, vmm, keys = mem["rss_mib"], mem["vm_memory_bytes"], mem["shared_data_keys"]
    checks = doc["checks"]

    def res(name):
        return "n/a" if name not in checks else ("**pass**" if checks[name] else "**FAIL**")

    def mb(v):
        return "n/a" if v is None else f"{v / 2**20:,.2f}"

    kinds_total = Counter()
    for kind, outs in ld["by_kind"].items():
        for o, n in outs.items():
            kinds_total[o] += n
    lines = [
        "## Soak",
        "",
        "```sh",
        p["command"],
        "```",
        "",
        f"{ld['requests_done']:,} requests through one Envoy (`--concurrency 2`) with Spillway in front of three "
        "mock backends (`spillway-mock`): m0 and m1 unlimited, m2 with a quota of "
        f"{p['small_quota']['requests_per_window']} requests per {p['small_quota']['window_ms']} ms (429 + "
        "`retry-after`); each mock fed a stream of injected faults per 10,000 requests: "
        + ", ".join(f"{n} {k}" for k, n in p["faults_per_10000"].items())
        + " (`reset`: connection closed before an answer; `cut`: the answer aborted after 2 events / half its bytes). "
        "Filter: `stream_usage` on, four gateway clients with limits far above the load "
        f"({p['clients']['chat']['requests_per_minute']:,} requests and {p['clients']['chat']['tokens_per_minute']:,} "
        "tokens per minute), so admission and settlement run on every request. "
        f"Load: closed loop, {p['concurrency']} connections over {p['procs']} client processes (a small asyncio "
        "HTTP/1.1 client, `bench/soak.py`), mix in percent: "
        + ", ".join(f"{k} {v}" for k, v in p["mix_percent"].items())
        + f". Cancelling clients hang up {p['cancel']['hang_up_after_ms'][0]}–{p['cancel']['hang_up_after_ms'][1]} ms "
        f"after sending while the mock holds the answer back {p['cancel']['latency_ms']} ms, or right after the first "
        f"streamed content event ({p['cancel']['stream_chunk_delay_ms']} ms between events); they use their own "
        f"deployment name (`{CANCEL_DEPLOYMENT}`) so their tokens can be told apart.",
        "",
        f"Machine: {m['nproc']} × {m['cpu_model']}, {m['mem_gib']} GiB; Envoy {m['envoy']}; commit {m['git_commit']}"
        + (f" with uncommitted changes in {', '.join(m['uncommitted_changes_in'])}" if m["uncommitted_changes_in"] else "")
        + f"; `spillway.wasm` sha256 `{m['spillway_wasm_sha256'][:16]}…`; {m['date_utc']} UTC; load average "
        f"{m['load_at_start'][0]} at start, {m['load_at_end'][0]} at end (the machine is shared).",
        "",
        "| | result |",
        "|---|---|",
        f"| requests | {ld['requests_done']:,} in {ld['seconds']:,.0f} s: **{ld['rps']:,.0f} rps** average "
        f"(best {p['sample_s']:g}-s sample {ld['peak_rps_sample']:,.0f} rps); Envoy CPU {ld['envoy_cpu_us_per_request']} "
        "µs per request |",
        "| CPU during the load, s (of "
        f"{ld['cpu_s']['machine_capacity']:,.0f} available) | Envoy {ld['cpu_s']['envoy']:,.0f}, mocks "
        f"{ld['cpu_s']['mocks']:,.0f}, load generator {ld['cpu_s']['clients']:,.0f}, everything else on the machine "
        f"{max(0.0, ld['cpu_s']['machine_busy'] - ld['cpu_s']['envoy'] - ld['cpu_s']['mocks'] - ld['cpu_s']['clients']):,.0f}"
        " |",
        "| client outcomes | " + ", ".join(f"{o}: {n:,}" for o, n in sorted(kinds_total.items(), key=lambda kv: -kv[1]))
        + f" (429s without `retry-after`: {ld['client_429_without_retry_after']}) |",
        f"| wasm VMs (`wasm.envoy.wasm.runtime.v8.created` / `active`, `wasm.wasm_vm_count`) | created "
        f"{vm['runtime_created_start']} → {vm['runtime_created_end']}, active {vm['runtime_active_start']} → "
        f"{vm['runtime_active_end']}, count {vm['vm_count_start']} → {vm['vm_count_end']} |",
        "| VM reloads (`wasm.<root_id>.vm_reload*`) | "
        + ", ".join(f"`{k.removeprefix('wasm.')}` {v}" for k, v in sorted(vm["reload_stats"].items())) + " |",
        f"| wasm failures in Envoy's log (panics, traps, VM failures, wasm warnings/errors) | "
        f"{vm['log_wasm_problem_lines']} |",
        f"| **VM failures or reloads** | {res('no_vm_failures_or_reloads')} |",
        "| Spillway's warnings (what the injected faults did) | "
        + (", ".join(f"\"{k}\" {v:,}" for k, v in sorted(vm["spillway_warnings"].items())) or "none")
        + "; failed host calls: "
        + (", ".join(f"\"{k}\" {v:,}" for k, v in vm["spillway_host_call_warnings"].items()) or "none")
        + f" ({res('no_host_call_warnings')}) |",
        f"| Envoy RSS, MiB: idle / start of load / plateau after warm-up / end / max after warm-up | "
        f"{_mib(mem['idle_rss_mib'])} / {_mib(rss and rss['start'])} / {_mib(rss and rss['plateau'])} / "
        f"{_mib(rss and rss['end'])} / {_mib(rss and rss['max_after_warmup'])} |",
        f"| RSS growth after warm-up (end − plateau; slope) | {_mib(rss and rss['growth'])} MiB; "
        f"{_mib(rss and rss['slope_per_100k_requests'], 2)} MiB per 100k requests after warm-up, "
        f"{_mib(rss and rss.get('slope_second_half_per_100k_requests'), 2)} over the second half — flat within "
        f"{_mib(rss and rss['tolerance'])} MiB: {res('rss_flat_after_warmup')} |",
        "| RSS split after warm-up, MiB: anonymous (heaps, V8) plateau → end / file-backed (Envoy's binary) "
        "plateau → end / tcmalloc allocated plateau → end | "
        + (f"{mem['rss_anon_mib']['plateau']:,.1f} → {mem['rss_anon_mib']['end']:,.1f} / "
           f"{mem['rss_file_mib']['plateau']:,.1f} → {mem['rss_file_mib']['end']:,.1f} / "
           if mem.get("rss_anon_mib") and mem.get("rss_file_mib") else "n/a / n/a / ")
        + (f"{mem['tcmalloc_allocated_bytes']['plateau'] / 2**20:,.1f} → "
           f"{mem['tcmalloc_allocated_bytes']['end'] / 2**20:,.1f} |" if mem.get("tcmalloc_allocated_bytes") else "n/a |"),
        f"| Spillway VM memory (`spillway_vm_memory_bytes`: the largest linear memory of a role's VMs; both roles "
        "added), MiB: start / plateau / end | "
        + (f"{mb(vmm['start'])} / {mb(vmm['plateau'])} / {mb(vmm['end'])}; growth {mb(vmm['growth'])}: "
           f"{res('vm_memory_flat_after_warmup')} |" if vmm else "n/a (gauge not exported by this build) |"),
        f"| shared-data keys (`spillway_shared_data_keys`): start / plateau / end / max | "
        + (f"{keys['start']:,.0f} / {keys['plateau']:,.0f} / {keys['end']:,.0f} / {keys['max_after_warmup']:,.0f} "
           f"(bound {KEY_BOUND:,}): {res('shared_data_keys_bounded')} |" if keys
           else "n/a (gauge not exported by this build) |"),
        f"| tokens: Spillway vs the mocks' bills | {res('tokens_match_mocks')} (table below); Spillway's "
        f"per-request log lines sum to its metric: {res('log_tokens_match_metric')} |",
        "",
    ]
    if mem.get("final_vm_memory"):
        lines += ["VM memory at the end, per label set: "
                  + ", ".join(f"`{k}` {v / 2**20:,.2f} MiB" for k, v in mem["final_vm_memory"].items()), ""]
    lines += [
        "![soak](bench/results/soak.png)",
        "",
        "**Tokens.** Per backend and deployment: what the mock billed (`/_mock/stats` `usage`: every answer "
        "it generated), minus answers an injected `cut` fault aborted before their usage was sent (no proxy can "
        "count those), against Spillway's `spillway_tokens_total`. "
        f"For `{DEPLOYMENT}` they must be equal. For `{CANCEL_DEPLOYMENT}` the difference is answers the mock "
        "generated for clients that had already hung up: Azure bills them, Spillway never receives their usage; "
        "it must be a whole number of answers (never negative: that would be double counting) and at most the "
        f"number of client cancels ({tok['client_cancels']:,}).",
        "",
        f"Of the cancelling clients' answers, Spillway counted {tok['cancel_answers_counted_by_spillway']:,} and "
        f"missed {tok['cancel_unseen_answers']:,} of the {tok['client_cancels']:,} cancels "
        f"({ld['by_kind'].get('cancel_before_answer', {}).get('cancelled', 0):,} before the answer, "
        f"{ld['by_kind'].get('cancel_mid_stream', {}).get('cancelled', 0):,} mid-stream; some requests "
        "hung up before they reached a backend at all, so no answer was generated). Spillway saw "
        f"{sum(v for k, v in (doc['spillway_counters'].get('spillway_answers_cut_total') or {}).items() if 'client_gone' in k):,.0f}"
        " streams cut by the client (`spillway_answers_cut_total{class=\"client_gone\"}`); a mid-stream cancel "
        "it did not see cut is one whose whole stream, usage included, had reached Envoy before the hang-up did, "
        "and it counted those tokens: the backend billed them too.",
        "",
        "| backend | deployment | mock answers | mock prompt / completion | cut answers (tokens) | "
        "expected | Spillway prompt / completion | difference | |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in tok["rows"]:
        exp_p, exp_c = r["mock_prompt"] - r["cut_prompt"], r["mock_completion"] - r["cut_completion"]
        diff = f"{r['unseen_prompt']:,} / {r['unseen_completion']:,}"
        if r["deployment"] == CANCEL_DEPLOYMENT and r.get("unseen_answers") is not None:
            diff += f" (= {r['unseen_answers']:,} answers)"
        lines.append(
            f"| {r['backend']} | {r['deployment']} | {r['mock_answers']:,} | {r['mock_prompt']:,} / "
            f"{r['mock_completion']:,} | {r['cut_answers']:,} ({r['cut_prompt'] + r['cut_completion']:,}) | "
            f"{exp_p:,} / {exp_c:,} | {r['spillway_prompt']:,} / {r['spillway_completion']:,} | {diff} | "
            f"{'ok' if r['ok'] else '**mismatch**'} |")
    lat = ld["latency_ms"]
    c = doc["spillway_counters"]

    def counter(name: str) -> str:
        vals = c.get(name) or {}
        return ", ".join(f"{k or 'total'} {v:,.0f}" for k, v in sorted(vals.items())) or "none"

    answered = Counter()
    for kb, n in ld["answered_by_backend"].items():
        answered[kb.split("|", 1)[1]] += n
    lines += [
        "",
        "Spillway's counters at the end: upstream requests by backend and class: "
        + counter("spillway_upstream_requests_total") + "; failovers: " + counter("spillway_failovers_total")
        + "; throttle events: " + counter("spillway_throttle_events_total") + "; circuit opens: "
        + counter("spillway_circuit_opens_total") + "; local replies: " + counter("spillway_local_replies_total")
        + "; answers cut: " + counter("spillway_answers_cut_total") + ". Answers clients got, by "
        "`x-spillway-backend`: " + ", ".join(f"{b} {n:,}" for b, n in sorted(answered.items())) + ".",
    ]
    # What looked wrong, from the numbers (a line appears only when it applies).
    obs = []
    up = c.get("spillway_upstream_requests_total") or {}
    ok0, ok1 = up.get("backend=m0,class=2xx", 0), up.get("backend=m1,class=2xx", 0)
    if ok1 and ok0 / ok1 > 1.3:
        obs.append(
            f"- **Uneven balance while m2 is throttled**: m0 got {ok0:,.0f} upstream 2xx, m1 {ok1:,.0f} "
            f"({ok0 / ok1:.2f}×), though both are equal (priority 1, weight 1). m2 is throttled most of the time "
            "(its quota is far below a third of the load), and `Pool::pick` (src/selection.rs) takes \"the first "
            "usable member from\" the rotation's position, so m2's turns all go to the member after it in the "
            "schedule, m0: 2/3 of the load to m0, 1/3 to m1. (Three mocks, m2 throttled by one 429 with "
            "`retry-after: 60`, 60 chats: m0 40, m1 20.)")
    nf = ld["by_kind"].get("responses_followup", {}).get("400", 0)
    if nf:
        obs.append(
            f"- **{nf:,} follow-ups answered `400 previous_response_not_found`** (of "
            f"{sum(ld['by_kind'].get('responses_followup', {}).values()):,}), though every id came from a "
            "successful create. The affinity table (src/affinity.rs) has 16,384 slots and a newer id takes an "
            "older one's slot: an id a thousand creates old (typical for this client's follow-ups) is gone with "
            "probability 1 − (1 − 1/16,384)^1,000 ≈ 6%. A forgotten id is "
            "looked up on the available backends in turn; when none has it and a backend that may hold it is "
            "throttled or open, the client gets a 429 with that wait. A 400 still reaches the client when the "
            "owner was not counted as out at that moment (for example half-open, its probe taken). The lookups "
            "also explain most of the upstream 4xx on m0 and m1.")
    if obs:
        lines += ["", "What looked wrong:", ""] + obs
    lines += [
        "",
        "Client latency by kind (ms, p50 / p99, closed loop on a saturated 2-core box): "
        + "; ".join(f"{k} {v['p50_ms']:.1f} / {v['p99_ms']:.1f}" for k, v in lat.items() if v["n"]) + ".",
        "",
        "Client outcomes by kind: "
        + "; ".join(f"{k}: " + ", ".join(f"{o} {n:,}" for o, n in sorted(outs.items(), key=lambda kv: -kv[1]))
                    for k, outs in ld["by_kind"].items()) + ".",
        "",
        "Faults the mocks actually served: "
        + "; ".join(f"{b}: " + ", ".join(f"{k} {n:,}" for k, n in sorted(f.items()) if k != "pass")
                    for b, f in doc["faults_used"].items()) + ".",
        "",
        f"Files: `bench/results/soak.json` (everything above and Spillway's counters), `soak_samples.csv` (one row "
        f"per {p['sample_s']:g}-s sample; \"n/a\" where a gauge is missing), `soak.png`. "
        "`bench/soak.sh` is not part of CI; `bench/soak.sh 20000` is a quick check (~1 min).",
        "",
    ]
    return lines


def update_benchmarks_md(doc: dict) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = "\n".join(markdown_section(doc)).rstrip() + "\n"
    m = re.search(r"^## Soak\n", text, re.M)
    if m:
        nxt = re.search(r"^## ", text[m.end():], re.M)
        end = m.end() + nxt.start() if nxt else len(text)
        text = text[: m.start()] + section + ("\n" + text[end:] if nxt else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("requests", nargs="?", type=int, default=1_000_000)
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--concurrency", type=int, default=96, help="connections, all processes together")
    ap.add_argument("--rate", type=float, default=0, help="requests/s cap, all processes together (0: closed loop)")
    ap.add_argument("--sample-s", type=float, default=5)
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of the requests counted as warm-up")
    ap.add_argument("--settle-s", type=float, default=5, help="quiet time before the final sample")
    ap.add_argument("--max-seconds", type=int, default=2700, help="hard limit on the load phase (s)")
    ap.add_argument("--rss-tolerance-mib", type=float, default=8)
    ap.add_argument("--vm-tolerance-mib", type=float, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-request-log", action="store_true",
                    help="Envoy's wasm log at warning: no per-request JSON log line (less CPU; the log-vs-metric "
                         "token check becomes n/a)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (Envoy log, configs)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the Soak section from soak.json")
    args = ap.parse_args()
    args.command = os.environ.get("SOAK_COMMAND") or "bench/soak.sh " + " ".join(sys.argv[1:])
    if args.report_only:
        update_benchmarks_md(json.loads((RESULTS / "soak.json").read_text()))
        return
    sys.exit(run(args))


if __name__ == "__main__":
    main()
