"""Real processes for integration tests: Rust mock backends and Envoy with the built filter.

Everything listens on 127.0.0.1 with ports picked at run time; every process is
stopped when its context ends.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
WASM = TARGET / "wasm32-wasip1" / "release" / "spillway.wasm"
RENDER = TARGET / "release" / "spillway-render"
MOCK = TARGET / "release" / "spillway-mock"
RATELIMIT = TARGET / "release" / "spillway-ratelimit"
ENVOY = Path(os.environ.get("SPILLWAY_ENVOY", ROOT / ".venv" / "bin" / "envoy"))


def require_artifacts() -> None:
    missing = [str(p) for p in (WASM, RENDER, MOCK, RATELIMIT, ENVOY) if not p.exists()]
    if missing:
        raise RuntimeError(
            "missing build artifacts (run scripts/test.sh, which builds them): " + ", ".join(missing)
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessExited(RuntimeError):
    """A process the test waits for is gone: no point in waiting longer."""


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except ProcessExited:
            raise
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last_error = e
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}: {last_error}")


def terminate(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL if the process is still there after `timeout` s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class MockBackend:
    """One spillway-mock process (an Azure OpenAI look-alike)."""

    def __init__(self, name: str, api_key: str | None = None, *args: str):
        self.name = name
        self.api_key = api_key
        cmd = [str(MOCK), "--name", name, "--listen", "127.0.0.1:0"]
        if api_key:
            cmd += ["--api-key", api_key]
        cmd += list(args)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"mock {name} did not start: {line!r}")
        self.address = line.split(" ", 1)[1]
        self.url = f"http://{self.address}"
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def configure(self, **settings: Any) -> dict:
        r = self.client.post("/_mock/config", json=settings)
        r.raise_for_status()
        return r.json()

    def reset(self) -> None:
        self.client.post("/_mock/reset").raise_for_status()

    def stats(self) -> dict:
        r = self.client.get("/_mock/stats")
        r.raise_for_status()
        return r.json()

    def requests(self) -> list[dict]:
        return self.stats()["requests"]

    def count(self) -> int:
        return self.stats()["requests_total"]

    def stop(self) -> None:
        terminate(self.proc, 5)
        if hasattr(self, "client"):
            self.client.close()


class Redis:
    """Debian's redis-server on a free loopback port, nothing persisted."""

    def __init__(self):
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(self.binary).exists():
            raise RuntimeError("redis-server is missing (scripts/setup.sh installs Debian's redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        """Starts (or, after `stop`, restarts empty) on the same port."""
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._ready, timeout=10, what="redis ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise ProcessExited(f"redis-server exited with {self.proc.returncode}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        terminate(self.proc, 5)


class RateLimitService:
    """spillway-ratelimit: Envoy's rate-limit service protocol, counters in Redis."""

    def __init__(self, redis: Redis | None):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        cmd = [str(RATELIMIT), "--listen", self.address]
        if redis is not None:
            cmd += ["--redis", redis.url]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._ready, timeout=10, what="rate-limit service ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise ProcessExited(f"spillway-ratelimit exited with {self.proc.returncode}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True

    def stop(self) -> None:
        terminate(self.proc, 5)


def render(filter_config: dict | str, workdir: Path, listen_port: int, admin_port: int,
           extra_args: list[str] | None = None, edit=None) -> Path:
    """Renders an Envoy bootstrap for a filter JSON with the project's renderer;
    `edit(bootstrap_dict)` may change it afterwards (to run the filter in a
    config the renderer would not write)."""
    cfg = workdir / "filter.json"
    cfg.write_text(filter_config if isinstance(filter_config, str) else json.dumps(filter_config, indent=2))
    out = workdir / "envoy.yaml"
    cmd = [str(RENDER), str(cfg), "--wasm", str(WASM), "--listen", f"127.0.0.1:{listen_port}",
           "--admin", f"127.0.0.1:{admin_port}", "--output", str(out)] + (extra_args or [])
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    if edit is not None:
        doc = yaml.safe_load(out.read_text())
        edit(doc)
        out.write_text(json.dumps(doc))  # JSON is YAML with every string quoted
    return out


def http_connection_manager(bootstrap: dict) -> dict:
    """The listener's HTTP connection manager config in a rendered bootstrap."""
    return bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


class Envoy:
    """A real Envoy running the rendered bootstrap with the built filter."""

    def __init__(self, filter_config: dict | str, env: dict[str, str] | None = None,
                 concurrency: int = 2, render_args: list[str] | None = None, lds: bool = False,
                 edit=None):
        self.tmp = tempfile.TemporaryDirectory(prefix="spillway-envoy-")
        self.dir = Path(self.tmp.name)
        self.port = free_port()
        self.admin_port = free_port()
        self.render_args = list(render_args or [])
        if lds:
            (self.dir / "lds").mkdir()
            self.lds_path = self.dir / "lds" / "listeners.yaml"
            self.render_args += ["--lds", str(self.lds_path)]
        self.config_path = render(filter_config, self.dir, self.port, self.admin_port, self.render_args, edit)
        self.log_path = self.dir / "envoy.log"
        self.env = {**os.environ, **(env or {})}
        # Envoy's own log goes to stderr unbuffered; the access log to stdout.
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(ENVOY), "-c", str(self.config_path), "--concurrency", str(concurrency),
             "--disable-hot-restart", "--base-id", str(random.randint(1000, 10_000_000)),
             "-l", "info"],
            stdout=self._log_file, stderr=self._log_file, env=self.env,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        try:
            wait_until(self._ready, timeout=30, what="envoy ready")
        except Exception:
            log = self.log()
            self.stop()
            raise RuntimeError("envoy did not become ready; log tail:\n" + log[-4000:])
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise ProcessExited(f"envoy exited with {self.proc.returncode}")
        r = httpx.get(f"{self.admin}/ready", timeout=1)
        if r.status_code != 200:
            return False
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True

    def apply(self, filter_config: dict | str, raw_filter_json: str | None = None) -> None:
        """Renders a new listener file (LDS mode) and moves it into place.

        `raw_filter_json` replaces the filter JSON inside the rendered listener,
        to hand Envoy a config the renderer itself would refuse."""
        scratch = self.dir / "scratch"
        scratch.mkdir(exist_ok=True)
        args = [a if a != str(self.lds_path) else str(scratch / "listeners.yaml") for a in self.render_args]
        render(filter_config, scratch, self.port, self.admin_port, args)
        text = (scratch / "listeners.yaml").read_text()
        if raw_filter_json is not None:
            doc = yaml.safe_load(text)
            _replace_plugin_config(doc, raw_filter_json)
            text = json.dumps(doc)
        tmp = self.lds_path.with_suffix(".new")
        tmp.write_text(text)
        os.replace(tmp, self.lds_path)

    def stat(self, name: str) -> int:
        for line in self.stats().splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stats(self) -> str:
        return httpx.get(f"{self.admin}/stats", timeout=5).text

    def chat(self, deployment: str = "gpt-4o", headers: dict | None = None,
             api_version: str | None = "2024-10-21", **body: Any) -> httpx.Response:
        """A chat completion the way AzureOpenAI sends it (with `api-version` unless None)."""
        payload = {"messages": [{"role": "user", "content": "hi"}], **body}
        query = f"?api-version={api_version}" if api_version else ""
        return self.client.post(f"/openai/deployments/{deployment}/chat/completions{query}",
                                json=payload, headers=headers or {})

    def stop(self) -> None:
        terminate(self.proc, 10)
        if hasattr(self, "client"):
            self.client.close()
        self._log_file.close()
        self.tmp.cleanup()


def _replace_plugin_config(node: Any, raw: str) -> None:
    if isinstance(node, dict):
        if node.get("@type") == "type.googleapis.com/google.protobuf.StringValue" and "value" in node:
            node["value"] = raw
        for v in node.values():
            _replace_plugin_config(v, raw)
    elif isinstance(node, list):
        for v in node:
            _replace_plugin_config(v, raw)


def validate(filter_config: dict | str, env: dict[str, str] | None = None,
             raw_filter_json: str | None = None) -> subprocess.CompletedProcess:
    """Runs `envoy --mode validate` on the rendered bootstrap (optionally with
    the filter JSON inside it replaced by `raw_filter_json`)."""
    with tempfile.TemporaryDirectory(prefix="spillway-validate-") as d:
        path = render(filter_config, Path(d), free_port(), free_port())
        if raw_filter_json is not None:
            doc = yaml.safe_load(path.read_text())
            _replace_plugin_config(doc, raw_filter_json)
            path.write_text(json.dumps(doc))
        return subprocess.run(
            [str(ENVOY), "--mode", "validate", "-c", str(path), "--disable-hot-restart",
             "--base-id", str(random.randint(1000, 10_000_000))],
            capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60,
        )
