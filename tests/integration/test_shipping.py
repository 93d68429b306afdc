"""What ships besides the filter: docker-compose.yml and its Dockerfiles, the
committed compose Envoy config, envoy/demo.json and scripts/demo.sh."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from harness import ENVOY, RENDER, ROOT, WASM, free_port, validate  # noqa: E402

COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_JSON = "envoy/docker-compose.json"  # relative: the renderer records it in the header
COMPOSE_YAML = ROOT / "envoy" / "docker-compose.envoy.yaml"
# Keep in step with scripts/render-examples.sh.
COMPOSE_RENDER_ARGS = ["--wasm", "/etc/envoy/spillway.wasm", "--listen", "0.0.0.0:10000",
                       "--admin", "0.0.0.0:9901"]
CONTAINER_WASM = "/etc/envoy/spillway.wasm"
DEMO_JSON = ROOT / "envoy" / "demo.json"
DEMO_KEYS = {"EASTUS_KEY": "demo-key-eastus", "WESTUS_KEY": "demo-key-westus",
             "PAYGO_KEY": "demo-key-paygo"}


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict:
    return compose()["services"]


def render_compose_json(*extra: str) -> bytes:
    """Renders envoy/docker-compose.json exactly as scripts/render-examples.sh does."""
    args = list(COMPOSE_RENDER_ARGS)
    if extra:  # later options win in spillway-render
        args += list(extra)
    return subprocess.run([str(RENDER), COMPOSE_JSON, *args], cwd=ROOT, check=True,
                          capture_output=True, timeout=60).stdout


def envoy_validate(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(config), "--disable-hot-restart",
         "--base-id", str(random.randint(1000, 10_000_000))],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=120,
    )


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


# ---------------------------------------------------------------- (a) compose accepts it

def test_docker_compose_config_accepts_the_compose_file():
    cmd = compose_command()
    if cmd is None:
        pytest.skip("neither the docker-compose binary nor the docker compose plugin is installed "
                    "(Debian: apt-get install -y docker-compose)")
    # `config` only parses and resolves the file: no daemon needed.
    r = subprocess.run([*cmd, "-f", str(COMPOSE_FILE), "config"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    resolved = yaml.safe_load(r.stdout)
    assert set(resolved["services"]) == {"mock-eastus", "mock-westus", "mock-paygo",
                                         "spillway-wasm", "envoy"}


# ---------------------------------------------------------------- (b) what it refers to exists

def _dockerfile_copy_sources(dockerfile: Path) -> list[str]:
    """Sources of COPY/ADD instructions that read the build context (not --from)."""
    sources = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        flags = [w for w in words[1:] if w.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        paths = [w for w in words[1:] if not w.startswith("--")]
        sources += paths[:-1]
    return sources


def test_every_build_input_and_bind_mount_exists():
    checked = []
    for name, svc in services().items():
        build = svc.get("build")
        if build:
            build = {"context": build} if isinstance(build, str) else build
            context = (ROOT / build.get("context", ".")).resolve()
            assert context.is_dir(), f"{name}: build context {context} missing"
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            text = dockerfile.read_text()
            if "target" in build:
                assert re.search(rf"^FROM\s.+\sAS\s+{re.escape(build['target'])}\s*$", text,
                                 re.MULTILINE | re.IGNORECASE), f"{name}: no stage {build['target']}"
            for src in _dockerfile_copy_sources(dockerfile):
                assert (context / src).exists(), f"{name}: {dockerfile.name} copies missing {src}"
                checked.append(src)
        for volume in svc.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith((".", "/")):
                path = (ROOT / source).resolve()
                assert path.exists(), f"{name}: mounts missing {source}"
                checked.append(source)
            else:
                assert source in (compose().get("volumes") or {}), f"{name}: undeclared volume {source}"
    assert "./envoy/docker-compose.envoy.yaml" in checked and "src" in checked


def test_envoy_service_finds_its_config_wasm_and_keys():
    svcs = services()
    envoy = svcs["envoy"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in envoy["volumes"]}
    command = envoy["command"]
    config_in_container = command[command.index("-c") + 1]
    assert mounts[config_in_container] == "./envoy/docker-compose.envoy.yaml"
    # The wasm path the config was rendered with sits in the volume spillway-wasm fills.
    wasm_volume = next(src for dst, src in mounts.items() if CONTAINER_WASM.startswith(dst + "/"))
    wasm_svc_mount = next(v for v in svcs["spillway-wasm"]["volumes"] if v.startswith(wasm_volume + ":"))
    assert "/wasm/spillway.wasm" in (ROOT / "docker" / "Dockerfile.filter").read_text()
    assert wasm_svc_mount.split(":")[1] == "/wasm"
    assert f'"filename": "{CONTAINER_WASM}"' in COMPOSE_YAML.read_text()
    assert envoy["depends_on"]["spillway-wasm"]["condition"] == "service_completed_successfully"
    # Every backend is a compose service whose key is the one Envoy gets for it.
    cfg = json.loads((ROOT / COMPOSE_JSON).read_text())
    for backend in cfg["backends"]:
        host = re.match(r"https?://([^:/]+)", backend["url"]).group(1)
        assert host in svcs, f"{backend['name']}: no service {host}"
        mock_cmd = svcs[host]["command"]
        key = mock_cmd[mock_cmd.index("--api-key") + 1]
        assert envoy["environment"][backend["api_key_env"]] == key
        assert set(envoy["depends_on"]) >= {host}


# ---------------------------------------------------------------- (c) committed render is fresh + valid

def test_committed_compose_envoy_yaml_is_a_fresh_render():
    fresh = render_compose_json()
    assert COMPOSE_YAML.read_bytes() == fresh, (
        "envoy/docker-compose.envoy.yaml is stale: run scripts/render-examples.sh")


def test_compose_envoy_yaml_passes_envoy_validate(tmp_path):
    # Same render with the locally built wasm, so Envoy can load the module.
    local = render_compose_json("--wasm", str(WASM))
    committed = COMPOSE_YAML.read_text()
    assert local.decode() == committed.replace(json.dumps(CONTAINER_WASM), json.dumps(str(WASM)))
    path = tmp_path / "docker-compose.envoy.yaml"
    path.write_bytes(local)
    r = envoy_validate(path, DEMO_KEYS)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "OK" in r.stdout + r.stderr


# ---------------------------------------------------------------- (d) the demo config

def test_demo_json_renders_and_validates(tmp_path):
    out = tmp_path / "envoy.yaml"
    subprocess.run([str(RENDER), "envoy/demo.json", "--wasm", str(WASM), "--listen", "127.0.0.1:10000",
                    "--admin", "127.0.0.1:9901", "--output", str(out)], cwd=ROOT, check=True, timeout=60)
    assert out.read_text().count('"address": "127.0.0.1"') >= 3
    r = validate(DEMO_JSON.read_text(), env=DEMO_KEYS)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


# ---------------------------------------------------------------- (e) scripts/demo.sh --check

def distinct_free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def run_demo(args: list[str], env: dict, timeout: float) -> str:
    """Runs scripts/demo.sh with `args`; its output, after asserting it succeeded."""
    # A new session so a timeout can stop the script and everything it started.
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "demo.sh"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 15)
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"scripts/demo.sh {' '.join(args)} did not finish within {timeout:.0f} s:\n" + out[-4000:])
    assert proc.returncode == 0, out[-4000:]
    return out


def test_demo_script_check_serves_a_chat_request():
    gateway, admin, east, west, paygo = distinct_free_ports(5)
    with tempfile.TemporaryDirectory(prefix="spillway-demo-") as run_dir:
        env = {**os.environ,
               "SPILLWAY_DEMO_PORT": str(gateway), "SPILLWAY_DEMO_ADMIN_PORT": str(admin),
               "SPILLWAY_DEMO_EASTUS_PORT": str(east), "SPILLWAY_DEMO_WESTUS_PORT": str(west),
               "SPILLWAY_DEMO_PAYGO_PORT": str(paygo), "SPILLWAY_DEMO_RUN_DIR": run_dir}
        out = run_demo(["--check"], env, timeout=240)
        assert "status: 200" in out, out[-4000:]
        backend = re.search(r"^x-spillway-backend: (\S+)$", out, re.MULTILINE)
        assert backend and backend.group(1) in ("eastus", "westus", "paygo"), out[-4000:]
        # The Responses conversation: both turns answered by the backend that stored the first.
        turns = re.findall(r"^x-spillway-backend: (\S+)  Hello from (\S+) .*$", out, re.MULTILINE)
        assert len(turns) == 2 and turns[0] == turns[1] and turns[0][0] == turns[0][1], out[-4000:]
        assert "(turn 2)" in out
        # The ports were substituted into a copy of demo.json; everything was stopped.
        rendered = (Path(run_dir) / "envoy.yaml").read_text()
        assert f'"port_value": {east}' in rendered and f'"port_value": {gateway}' in rendered
        for port in (gateway, admin, east, west, paygo):
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"


def test_docker_build_context_holds_the_whole_workspace(tmp_path):
    """cargo refuses to build when a workspace member is missing: each
    Dockerfile must copy every member into its build stage."""
    dockerfiles = [p for p in sorted((ROOT / "docker").glob("Dockerfile.*")) if p.suffix != ".dockerignore"]
    assert len(dockerfiles) == 2
    for dockerfile in dockerfiles:
        context = tmp_path / dockerfile.name
        context.mkdir()
        for src in _dockerfile_copy_sources(dockerfile):
            source = ROOT / src
            if source.is_dir():
                shutil.copytree(source, context / src, ignore=shutil.ignore_patterns("target"))
            else:
                (context / src).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, context / src)
        r = subprocess.run(["cargo", "metadata", "--locked", "--offline", "--no-deps", "--format-version", "1"],
                           cwd=context, capture_output=True, text=True)
        assert r.returncode == 0, f"{dockerfile.name}: {r.stderr[-2000:]}"
        members = {p["name"] for p in json.loads(r.stdout)["packages"]}
        assert {"spillway", "spillway-render", "spillway-mock"} <= members, (dockerfile.name, members)


def test_demo_script_global_check_shares_the_limit_between_two_replicas():
    """`scripts/demo.sh --global --check`: Redis, spillway-ratelimit and two
    Envoys; 12 requests from one client spread over both replicas give
    exactly the 10 its limit allows."""
    ports = distinct_free_ports(9)
    names = ["PORT", "ADMIN_PORT", "EASTUS_PORT", "WESTUS_PORT", "PAYGO_PORT", "PORT2", "ADMIN_PORT2",
             "RATELIMIT_PORT", "REDIS_PORT"]
    with tempfile.TemporaryDirectory(prefix="spillway-demo-") as run_dir:
        env = {**os.environ, "SPILLWAY_DEMO_RUN_DIR": run_dir,
               **{f"SPILLWAY_DEMO_{n}": str(p) for n, p in zip(names, ports)}}
        out = run_demo(["--global", "--check"], env, timeout=600)
        assert "served: 10 of 12" in out, out[-4000:]
        assert re.findall(r"^replica (\d): (\d+)", out, re.MULTILINE)[-2:] == [("1", "429"), ("2", "429")]
        # The service's port was substituted into a copy of demo-global.json; everything was stopped.
        assert f"127.0.0.1:{ports[7]}" in (Path(run_dir) / "demo-global.json").read_text()
        for port in ports:
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"
