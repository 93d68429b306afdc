"""`spillway-render --istio`: the manifests are well formed, match the filter JSON, and
the Envoy config inside them is accepted by (and works in) a real Envoy.

There is no Kubernetes here, so `istio_bootstrap` does what istiod would do with the
manifests for the gateway: the VirtualService becomes the route named `spillway` (next to
another application's virtual host on the same gateway), the EnvoyFilter's HTTP_FILTER
patches go right before the gateway's router, its HTTP_ROUTE MERGE is applied to the
route and its CLUSTER ADD values become clusters.
"""

from __future__ import annotations

import copy
import hashlib
import http.server
import json
import os
import random
import subprocess
import tempfile
import threading
from pathlib import Path

import harness
import openai
import pytest
import yaml
from conftest import backend_entry
from harness import ENVOY, RENDER, ROOT, WASM

EXAMPLE_FILTER = ROOT / "istio" / "example-filter.json"
EXAMPLE_MANIFESTS = ROOT / "istio" / "example-manifests.yaml"
SHA = "0123456789abcdef" * 4
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def render_istio(filter_path: Path, *extra: str, cwd: Path = ROOT) -> str:
    cmd = [str(RENDER), str(filter_path), "--istio", "--namespace", "istio-ingress",
           "--workload-selector", "app=gateway,istio=ingress", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return r.stdout


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def env_names(config: dict) -> list[str]:
    names = [b["api_key_env"] for b in config["backends"] if "api_key_env" in b]
    names += [c["key_env"] for c in config.get("clients", []) if "key_env" in c]
    return list(dict.fromkeys(names))


# --- what istiod would do ---------------------------------------------------------------

def proto_merge(dst: dict, src: dict) -> None:
    """Protobuf merge of JSON-shaped messages (EnvoyFilter MERGE): maps merge, lists
    append, scalars replace; setting a member of the route's cluster oneof clears the others."""
    oneof = {"cluster", "cluster_header", "weighted_clusters", "cluster_specifier_plugin",
             "inline_cluster_specifier_plugin"}
    if oneof & src.keys():
        for k in oneof - src.keys():
            dst.pop(k, None)
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            proto_merge(dst[k], v)
        elif isinstance(v, list) and isinstance(dst.get(k), list):
            dst[k] = dst[k] + copy.deepcopy(v)
        else:
            dst[k] = copy.deepcopy(v)


OTHER_HOST = "other.example.com"
ISTIO_OWN_FILTER = "envoy.filters.http.cors"  # stands for the gateway's own filters (authn, stats, ...)


def istio_bootstrap(docs: list[dict], listen_port: int, admin_port: int,
                    other_app: str = "127.0.0.1:9", wasm_file: Path | None = None) -> dict:
    """The gateway's Envoy config as istiod would build it from the manifests. `other_app`
    (HOST:PORT) serves another application's virtual host on the same gateway;
    `wasm_file` replaces remote Wasm code (for configs whose URL is not reachable here)."""
    vs = by_kind(docs, "VirtualService")[0]["spec"]
    routes = {http_route["name"]: vs_route(http_route) for http_route in vs["http"]}
    other_cluster = f"outbound|80||{OTHER_HOST}"
    other_host, other_port = other_app.rsplit(":", 1)
    clusters = [{"name": other_cluster, "type": "STATIC", "connect_timeout": "1s",
                 "load_assignment": {"cluster_name": other_cluster, "endpoints": [{"lb_endpoints": [{"endpoint": {
                     "address": {"socket_address": {"address": other_host, "port_value": int(other_port)}}}}]}]}}]
    router = {"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    http_filters = [{"name": ISTIO_OWN_FILTER, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}}, router]
    ef = by_kind(docs, "EnvoyFilter")[0]["spec"]
    for p in ef["configPatches"]:
        assert p["match"]["context"] == "GATEWAY"
        if p["applyTo"] == "CLUSTER":
            assert p["patch"]["operation"] == "ADD"
            clusters.append(copy.deepcopy(p["patch"]["value"]))
        elif p["applyTo"] == "HTTP_ROUTE":
            assert p["patch"]["operation"] == "MERGE"
            proto_merge(routes[p["match"]["routeConfiguration"]["vhost"]["route"]["name"]], p["patch"]["value"])
        elif p["applyTo"] == "HTTP_FILTER":
            listener_filter = p["match"]["listener"]["filterChain"]["filter"]
            assert listener_filter["name"] == "envoy.filters.network.http_connection_manager"
            assert listener_filter["subFilter"]["name"] == router["name"]
            assert p["patch"]["operation"] == "INSERT_BEFORE"
            http_filters.insert(http_filters.index(router), copy.deepcopy(p["patch"]["value"]))
        else:
            raise AssertionError(f"unexpected patch {p['applyTo']}")
    if wasm_file is not None:
        _local_code(clusters, wasm_file)
        _local_code(http_filters, wasm_file)
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "outbound_0.0.0.0_8080",
        "upgrade_configs": [{"upgrade_type": "websocket"}],  # Istio's gateways allow websockets
        "route_config": {"name": "http.8080", "virtual_hosts": [
            {"name": f"{vs['hosts'][0]}:8080", "domains": vs["hosts"], "routes": list(routes.values())},
            {"name": f"{OTHER_HOST}:8080", "domains": [OTHER_HOST],
             "routes": [{"name": "other", "match": {"prefix": "/"}, "route": {"cluster": other_cluster}}]}]},
        "http_filters": http_filters,
    }
    return {
        "node": {"id": "router~10.0.0.1~gateway.istio-ingress~istio-ingress.svc.cluster.local",
                 "cluster": "gateway.istio-ingress"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{"name": "0.0.0.0_8080", "address": {"socket_address": {
                "address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}]}],
            "clusters": clusters,
        },
    }


def vs_route(http_route: dict) -> dict:
    """A VirtualService HTTP route as istiod writes it: its name, its header matches, Istio's
    cluster for its destination."""
    dest = http_route["route"][0]["destination"]
    match: dict = {"prefix": "/"}
    headers = [{"name": name, "string_match": {"safe_regex": {"regex": m["regex"]}} if "regex" in m
                else {"exact": m["exact"]}}
               for rule in http_route.get("match", []) for name, m in rule.get("headers", {}).items()]
    if headers:
        match["headers"] = headers
    return {"name": http_route["name"], "match": match,
            "route": {"cluster": f"outbound|{dest['port']['number']}||{dest['host']}",
                      "timeout": http_route["timeout"]}}


def _local_code(node, wasm_file: Path) -> None:
    if isinstance(node, dict):
        if "remote" in node.get("code", {}):
            node["code"] = {"local": {"filename": str(wasm_file)}}
        for v in node.values():
            _local_code(v, wasm_file)
    elif isinstance(node, list):
        for v in node:
            _local_code(v, wasm_file)


def wasm_configs(docs: list[dict]) -> dict[str, dict]:
    """Every Wasm plugin config in the EnvoyFilter, by where it sits."""
    out = {}
    for p in by_kind(docs, "EnvoyFilter")[0]["spec"]["configPatches"]:
        value = p["patch"]["value"]
        if p["applyTo"] == "HTTP_FILTER" and value["typed_config"]["@type"] == WASM_TYPE:
            out[value["name"]] = value["typed_config"]["config"]
        elif p["applyTo"] == "CLUSTER" and "typed_extension_protocol_options" in value:
            attempt = value["typed_extension_protocol_options"][HPO]["http_filters"][0]
            out[value["name"]] = attempt["typed_config"]["config"]
    return out


def validate_bootstrap(bootstrap: dict, env: dict[str, str]) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="spillway-istio-") as d:
        path = Path(d) / "envoy.yaml"
        path.write_text(json.dumps(bootstrap))
        return subprocess.run(
            [str(ENVOY), "--mode", "validate", "-c", str(path), "--disable-hot-restart",
             "--base-id", str(random.randint(1000, 10_000_000))],
            capture_output=True, text=True, env={**os.environ, **env}, timeout=60)


# --- the committed example ---------------------------------------------------------------

def test_committed_example_is_a_fresh_render():
    r = subprocess.run(["bash", str(ROOT / "istio" / "render-example.sh"), "--check"],
                       capture_output=True, text=True, env={**os.environ, "SPILLWAY_RENDER": str(RENDER)})
    assert r.returncode == 0, r.stderr + r.stdout


def test_example_manifests_are_complete_and_consistent():
    config = json.loads(EXAMPLE_FILTER.read_text())
    text = EXAMPLE_MANIFESTS.read_text()
    docs = list(yaml.safe_load_all(text))
    assert [d["kind"] for d in docs] == ["EnvoyFilter", "VirtualService",
                                         "ServiceEntry", "DestinationRule", "ServiceEntry", "DestinationRule"]
    for d in docs:
        assert d["metadata"]["namespace"] == "istio-ingress" and d["metadata"]["name"]
    api = {d["kind"]: d["apiVersion"] for d in docs}
    assert api["EnvoyFilter"] == "networking.istio.io/v1alpha3"
    assert "EASTUS_KEY, SWC_KEY, WEB_APP_GATEWAY_KEY" in text.splitlines()[2]

    ef = docs[0]["spec"]
    assert ef["workloadSelector"]["labels"] == {"app": "gateway"}
    patches = ef["configPatches"]

    # Spillway's filters, right before the gateway's router, each off by default.
    filters = [p for p in patches if p["applyTo"] == "HTTP_FILTER"]
    names = [p["patch"]["value"]["name"] for p in filters]
    assert names == ["spillway.buffer", "spillway.request"]
    for p in filters:
        assert p["patch"]["operation"] == "INSERT_BEFORE"
        assert p["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
        assert p["patch"]["value"]["disabled"] is True
    assert filters[0]["patch"]["value"]["typed_config"]["max_request_bytes"] == 32 * 1024 * 1024

    # Both roles: Spillway's own vm_id, one VM config, the filter JSON, keys from the environment.
    plugins = wasm_configs(docs)
    backend_clusters = [f"spillway_{b['name']}" for b in config["backends"]]
    assert list(plugins) == backend_clusters + ["spillway.request"]
    request = plugins["spillway.request"]
    assert request["root_id"] == "spillway_request" and request["failure_policy"] == "FAIL_RELOAD"
    # It holds a JSON request's headers while it reads the body's fields.
    assert request["allow_on_headers_stop_iteration"] is True
    vm = request["vm_config"]
    assert vm["vm_id"] == "spillway"
    assert vm["environment_variables"]["host_env_keys"] == env_names(config)
    remote = vm["code"]["remote"]
    assert remote["http_uri"]["uri"] == "https://downloads.example.com/spillway/0.1.0/spillway.wasm"
    assert remote["http_uri"]["cluster"] == "spillway_wasm_fetch"
    assert remote["sha256"] == SHA
    for name in backend_clusters:
        attempt = plugins[name]
        assert attempt["root_id"] == "spillway_attempt"
        assert attempt["vm_config"] == vm
        assert json.loads(attempt["configuration"]["value"]) == json.loads(request["configuration"]["value"]) == config

    # Attempt role: one cluster per backend, named as the matcher map names them.
    clusters = {p["patch"]["value"]["name"]: p["patch"]["value"]
                for p in patches if p["applyTo"] == "CLUSTER"}
    assert list(clusters) == ["spillway_wasm_fetch"] + backend_clusters
    [realtime_patch, route_patch] = [p for p in patches if p["applyTo"] == "HTTP_ROUTE"]
    action = route_patch["patch"]["value"]["route"]
    tree = action["inline_cluster_specifier_plugin"]["extension"]["typed_config"]["cluster_matcher"]["matcher_tree"]
    assert tree["input"]["typed_config"]["header_name"] == "x-spillway-cluster"
    assert {k: v["action"]["typed_config"]["cluster"] for k, v in tree["exact_match_map"]["map"].items()} \
        == {c: c for c in backend_clusters}
    retry = action["retry_policy"]
    assert retry["refresh_cluster_on_retry"] is True
    assert retry["retry_on"] == "reset,connect-failure,refused-stream,retriable-headers"
    assert retry["retriable_headers"] == [{"name": "x-spillway-retry", "present_match": True}]
    assert route_patch["patch"]["value"]["request_body_buffer_limit"] > 1024 * 1024
    # ... and the route turns Spillway's filters on, for itself only; the websocket route
    # (same action) only the request role, as the bootstrap's upgrade chain.
    on = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {}}
    assert route_patch["patch"]["value"]["typed_per_filter_config"] == {n: on for n in names}
    assert realtime_patch["patch"]["value"]["typed_per_filter_config"] == {"spillway.request": on}
    assert realtime_patch["patch"]["value"]["route"] == action
    for name in backend_clusters:
        filters = clusters[name]["typed_extension_protocol_options"][HPO]["http_filters"]
        assert [f["name"] for f in filters] == ["spillway.attempt", "envoy.filters.http.upstream_codec"]
        assert clusters[name]["transport_socket"]["typed_config"]["sni"].endswith(".openai.azure.com")

    # The route the EnvoyFilter patches exists, without Istio's own retries.
    vs = docs[1]["spec"]
    assert vs["hosts"] == ["openai.example.com"] and vs["gateways"] == ["istio-ingress/gateway"]
    assert [r["name"] for r in vs["http"]] == [
        p["match"]["routeConfiguration"]["vhost"]["route"]["name"] for p in (realtime_patch, route_patch)]
    assert vs["http"][0]["match"] == [{"headers": {"upgrade": {"regex": "(?i)websocket"}}}]
    assert all(r["retries"] == {"attempts": 0} for r in vs["http"])

    # One ServiceEntry + DestinationRule (TLS with SNI) per https host.
    hosts = list(dict.fromkeys(b["url"].removeprefix("https://") for b in config["backends"]))
    assert [se["spec"]["hosts"] for se in by_kind(docs, "ServiceEntry")] == [[h] for h in hosts]
    for se, dr in zip(by_kind(docs, "ServiceEntry"), by_kind(docs, "DestinationRule")):
        host = se["spec"]["hosts"][0]
        assert se["spec"]["location"] == "MESH_EXTERNAL" and se["spec"]["resolution"] == "DNS"
        assert se["spec"]["ports"] == [{"number": 443, "name": "https", "protocol": "HTTPS"}]
        assert dr["spec"]["host"] == host
        assert dr["spec"]["trafficPolicy"]["portLevelSettings"] == [
            {"port": {"number": 443}, "tls": {"mode": "SIMPLE", "sni": host}}]


def test_example_envoy_config_is_accepted_by_envoy():
    config = json.loads(EXAMPLE_FILTER.read_text())
    docs = list(yaml.safe_load_all(EXAMPLE_MANIFESTS.read_text()))
    # The example's download URL is not reachable here: the same config with the local module.
    bootstrap = istio_bootstrap(docs, harness.free_port(), harness.free_port(), wasm_file=WASM)
    r = validate_bootstrap(bootstrap, {n: f"value-of-{n.lower()}" for n in env_names(config)})
    assert r.returncode == 0, r.stderr[-3000:]


def test_renderer_refuses_incomplete_istio_options(tmp_path):
    cfg = tmp_path / "f.json"
    cfg.write_text(json.dumps({"backends": [{"name": "a", "url": "https://a.openai.azure.com"}]}))
    cases = [
        (["--istio", "--namespace", "n", "--workload-selector", "app=g"], "--wasm-url"),
        (["--istio", "--namespace", "n", "--workload-selector", "app=g", "--wasm-url", "oci://r/s:1"],
         "cannot pull OCI images"),
        (["--istio", "--namespace", "n", "--workload-selector", "app=g", "--wasm-url", "https://h/s.wasm"],
         "--wasm-sha256"),
        (["--istio", "--namespace", "n", "--wasm-url", "https://h/s.wasm", "--wasm-sha256", SHA],
         "--workload-selector"),
        (["--namespace", "n"], "required arguments were not provided:\n  --istio"),
        (["--istio", "--lds", "/tmp/x"], "'--istio' cannot be used with:\n  --lds"),
        (["--istio", "--request-timeout-s", "5"], "'--istio' cannot be used with:\n  --request-timeout-s"),
    ]
    for args, message in cases:
        r = subprocess.run([str(RENDER), str(cfg), *args], capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr and r.stdout == "", (args, r.stderr)


# --- the manifests' Envoy config, running --------------------------------------------------

@pytest.fixture
def wasm_server():
    """Serves the built module over HTTP, the way Envoy fetches the attempt role's code."""
    directory = WASM.parent

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(directory), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{WASM.name}"
    server.shutdown()
    server.server_close()


def start_istio_envoy(monkeypatch, tmp_path, wasm_server, config: dict, other_app: str = "127.0.0.1:9",
                      *extra: str) -> harness.Envoy:
    """Envoy running the gateway config istiod would build from `--istio` manifests for
    `config`; both roles' code comes over HTTP from `wasm_server`, checked by sha256."""
    (tmp_path / "filter.json").write_text(json.dumps(config))
    sha = hashlib.sha256(WASM.read_bytes()).hexdigest()
    docs = list(yaml.safe_load_all(render_istio(tmp_path / "filter.json", "--wasm-url", wasm_server,
                                                "--wasm-sha256", sha, *extra)))

    def fake_render(filter_config, workdir, listen_port, admin_port, extra_args=None, edit=None):
        out = workdir / "envoy.yaml"
        out.write_text(json.dumps(istio_bootstrap(docs, listen_port, admin_port, other_app)))
        return out

    monkeypatch.setattr(harness, "render", fake_render)
    return harness.Envoy(config)


def test_istio_config_fails_over_and_shares_state_between_the_roles(start_mock, wasm_server,
                                                                    monkeypatch, tmp_path):
    east, west = start_mock("east", "key-east"), start_mock("west", "key-west")
    config = {"backends": [backend_entry(east), backend_entry(west, priority=2)],
              "api_version": "2024-10-21"}
    envoy = start_istio_envoy(monkeypatch, tmp_path, wasm_server, config)
    try:
        # Both roles' code came over HTTP (remote), checked against the sha256.
        east.configure(fail_next=[{"status": 429, "retry_after": "30"}])
        r = envoy.chat()
        assert r.status_code == 200, r.text
        assert (r.headers["x-spillway-backend"], r.headers["x-spillway-attempts"]) == ("west", "2")
        assert west.requests()[-1]["headers"]["api-key"] == "key-west"
        # The attempt role recorded the throttle where the request role (same vm_id
        # "spillway") reads it: the next request goes straight to west.
        r = envoy.chat()
        assert (r.headers["x-spillway-backend"], r.headers["x-spillway-attempts"]) == ("west", "1")
        assert east.count() == 1
    finally:
        envoy.stop()


def test_spillway_runs_only_on_its_own_route(start_mock, wasm_server, monkeypatch, tmp_path):
    """Another application on the same gateway: none of Spillway's filters touches its
    requests (no backend pick, no path check, bodies not held), while Spillway's host
    gets all of them."""
    east = start_mock("east", "key-east")
    other = start_mock("other")  # stands for any other service behind the gateway
    config = {"backends": [backend_entry(east)], "api_version": "2024-10-21"}
    envoy = start_istio_envoy(monkeypatch, tmp_path, wasm_server, config, other.address,
                              "--host", "openai.example.com", "--body-limit-bytes", "65536")
    try:
        spillway = {"host": "openai.example.com"}
        r = envoy.chat(headers=spillway)
        assert (r.status_code, r.headers["x-spillway-backend"]) == (200, "east")
        assert east.requests()[-1]["headers"]["api-key"] == "key-east"
        # Spillway's request role and buffer run there: a path outside the API is
        # refused, a body over the limit is refused by the buffer.
        assert envoy.client.get("/healthz", headers=spillway).status_code == 404
        big = {"file": ("a.wav", b"\0" * 100_000, "audio/x-wav")}
        audio = "/openai/deployments/whisper/audio/transcriptions?api-version=2024-10-21"
        assert envoy.client.post(audio, files=big, headers=spillway).status_code == 413
        assert east.count() == 1

        # The other application: the request goes out as the client sent it.
        r = envoy.chat(headers={"host": OTHER_HOST, "api-key": "the-clients-own"})
        assert r.status_code == 200 and "x-spillway-backend" not in r.headers, r.headers
        seen = other.requests()[-1]
        assert seen["headers"]["api-key"] == "the-clients-own"
        assert not [h for h in seen["headers"] if h.startswith("x-spillway-")], seen["headers"]
        assert envoy.client.post(audio, files=big, headers={"host": OTHER_HOST}).status_code == 200
        assert other.count() == 2 and east.count() == 1
    finally:
        envoy.stop()


def test_realtime_websockets_pass_on_spillways_host(start_mock, wasm_server, monkeypatch, tmp_path):
    """An upgrade has no body to wait for: on the websocket route only the request role
    runs, as in the plain bootstrap's upgrade chain."""
    east = start_mock("east", "key-east", "--deployments", "rt-east")
    config = {"backends": [backend_entry(east, deployments={"gpt-realtime": "rt-east"})]}
    envoy = start_istio_envoy(monkeypatch, tmp_path, wasm_server, config)
    try:
        client = openai.OpenAI(base_url=f"{envoy.url}/openai/v1/", api_key="unused", max_retries=0)
        with client.realtime.connect(model="gpt-realtime") as connection:
            connection.response.create()
            for event in connection:
                if event.type == "response.done":
                    break
        [record] = [r for r in east.requests() if r["path"].endswith("/realtime")]
        assert record["status"] == 101 and record["deployment"] == "rt-east"
        assert record["headers"]["api-key"] == "key-east"
    finally:
        envoy.stop()
