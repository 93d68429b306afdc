"""`spillway-render --istio`: the manifests are well formed, match the filter JSON, and
the Envoy config inside them is accepted by (and works in) a real Envoy.

There is no Kubernetes here, so `istio_bootstrap` does what istiod would do with the
manifests for the gateway: the WasmPlugin becomes the request role's filter right before
the router (code from a local file, as istio-agent hands it over), the VirtualService
becomes the route named `spillway`, the EnvoyFilter's HTTP_ROUTE MERGE is applied to it
and its CLUSTER ADD values become clusters.
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


def istio_bootstrap(docs: list[dict], wasm_file: Path, listen_port: int, admin_port: int) -> dict:
    plugin = by_kind(docs, "WasmPlugin")[0]
    spec, meta = plugin["spec"], plugin["metadata"]
    assert spec.get("phase", "UNSPECIFIED_PHASE") == "UNSPECIFIED_PHASE"  # last, before the router
    request_filter = {
        "name": f"{meta['namespace']}.{meta['name']}",
        "typed_config": {"@type": WASM_TYPE, "config": {
            "name": f"{meta['namespace']}.{meta['name']}",
            "root_id": spec["pluginName"],
            # istiod: protojson of the pluginConfig Struct, as a StringValue.
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                              "value": json.dumps(spec["pluginConfig"])},
            "vm_config": {
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"local": {"filename": str(wasm_file)}},
                "environment_variables": {
                    "key_values": {"ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION": "1"},
                    "host_env_keys": [e["name"] for e in spec.get("vmConfig", {}).get("env", [])
                                      if e.get("valueFrom") == "HOST"],
                },
            },
            "fail_open": spec.get("failStrategy") == "FAIL_OPEN",
        }},
    }
    vs = by_kind(docs, "VirtualService")[0]["spec"]
    http_route = vs["http"][0]
    dest = http_route["route"][0]["destination"]
    route = {"name": http_route["name"], "match": {"prefix": "/"},
             "route": {"cluster": f"outbound|{dest['port']['number']}||{dest['host']}",
                       "timeout": http_route["timeout"]}}
    clusters = []
    first_filters = []
    ef = by_kind(docs, "EnvoyFilter")[0]["spec"]
    for p in ef["configPatches"]:
        assert p["match"]["context"] == "GATEWAY"
        if p["applyTo"] == "CLUSTER":
            assert p["patch"]["operation"] == "ADD"
            clusters.append(copy.deepcopy(p["patch"]["value"]))
        elif p["applyTo"] == "HTTP_ROUTE":
            assert p["match"]["routeConfiguration"]["vhost"]["route"]["name"] == route["name"]
            assert p["patch"]["operation"] == "MERGE"
            proto_merge(route, p["patch"]["value"])
        elif p["applyTo"] == "HTTP_FILTER":
            assert p["match"]["listener"]["filterChain"]["filter"]["name"] == \
                "envoy.filters.network.http_connection_manager"
            assert p["patch"]["operation"] == "INSERT_FIRST"
            first_filters.insert(0, copy.deepcopy(p["patch"]["value"]))
        else:
            raise AssertionError(f"unexpected patch {p['applyTo']}")
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "outbound_0.0.0.0_8080",
        "route_config": {"name": "http.8080", "virtual_hosts": [
            {"name": f"{vs['hosts'][0]}:8080", "domains": ["*"], "routes": [route]}]},
        "http_filters": [*first_filters, request_filter, {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
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
    assert [d["kind"] for d in docs] == ["WasmPlugin", "EnvoyFilter", "VirtualService",
                                         "ServiceEntry", "DestinationRule", "ServiceEntry", "DestinationRule"]
    for d in docs:
        assert d["metadata"]["namespace"] == "istio-ingress" and d["metadata"]["name"]
    api = {d["kind"]: d["apiVersion"] for d in docs}
    assert api["WasmPlugin"] == "extensions.istio.io/v1alpha1"
    assert api["EnvoyFilter"] == "networking.istio.io/v1alpha3"

    # Request role: the filter JSON itself, keys from the proxy's environment.
    plugin = docs[0]["spec"]
    assert plugin["pluginConfig"] == config
    assert plugin["pluginName"] == "spillway_request"
    assert plugin["selector"]["matchLabels"] == {"app": "gateway"}
    assert plugin["url"].startswith("oci://") and "sha256" not in plugin  # OCI: pin by digest
    assert plugin["failStrategy"] == "FAIL_CLOSE" and plugin["type"] == "HTTP"
    assert [e["name"] for e in plugin["vmConfig"]["env"]] == env_names(config)
    assert all(e["valueFrom"] == "HOST" for e in plugin["vmConfig"]["env"])
    assert "EASTUS_KEY, SWC_KEY, WEB_APP_GATEWAY_KEY" in text.splitlines()[2]

    # Attempt role: one cluster per backend, named as the matcher map names them.
    ef = docs[1]["spec"]
    assert ef["workloadSelector"]["labels"] == {"app": "gateway"}
    clusters = {p["patch"]["value"]["name"]: p["patch"]["value"]
                for p in ef["configPatches"] if p["applyTo"] == "CLUSTER"}
    backend_clusters = [f"spillway_{b['name']}" for b in config["backends"]]
    assert list(clusters) == ["spillway_wasm_fetch"] + backend_clusters
    [route_patch] = [p for p in ef["configPatches"] if p["applyTo"] == "HTTP_ROUTE"]
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
    for name in backend_clusters:
        filters = clusters[name]["typed_extension_protocol_options"][HPO]["http_filters"]
        assert [f["name"] for f in filters] == ["spillway.attempt", "envoy.filters.http.upstream_codec"]
        attempt = filters[0]["typed_config"]["config"]
        assert attempt["root_id"] == "spillway_attempt"
        assert json.loads(attempt["configuration"]["value"]) == config
        remote = attempt["vm_config"]["code"]["remote"]
        assert remote["http_uri"]["uri"] == "https://downloads.example.com/spillway/0.1.0/spillway.wasm"
        assert remote["http_uri"]["cluster"] == "spillway_wasm_fetch"
        assert remote["sha256"] == SHA
        assert "vm_id" not in attempt["vm_config"]  # same (empty) vm_id as Istio gives the WasmPlugin
        assert attempt["vm_config"]["environment_variables"]["host_env_keys"] == env_names(config)
        assert clusters[name]["transport_socket"]["typed_config"]["sni"].endswith(".openai.azure.com")

    # The route the EnvoyFilter patches exists, without Istio's own retries.
    vs = docs[2]["spec"]
    assert vs["hosts"] == ["openai.example.com"] and vs["gateways"] == ["istio-ingress/gateway"]
    assert vs["http"][0]["name"] == route_patch["match"]["routeConfiguration"]["vhost"]["route"]["name"]
    assert vs["http"][0]["retries"] == {"attempts": 0}

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
    bootstrap = istio_bootstrap(docs, WASM, harness.free_port(), harness.free_port())
    r = validate_bootstrap(bootstrap, {n: f"value-of-{n.lower()}" for n in env_names(config)})
    assert r.returncode == 0, r.stderr[-3000:]


def test_renderer_refuses_incomplete_istio_options(tmp_path):
    cfg = tmp_path / "f.json"
    cfg.write_text(json.dumps({"backends": [{"name": "a", "url": "https://a.openai.azure.com"}]}))
    cases = [
        (["--istio", "--namespace", "n", "--workload-selector", "app=g"], "--wasm-url"),
        (["--istio", "--namespace", "n", "--workload-selector", "app=g", "--wasm-url", "oci://r/s:1"],
         "--attempt-wasm-url"),
        (["--istio", "--namespace", "n", "--workload-selector", "app=g", "--wasm-url", "https://h/s.wasm"],
         "--wasm-sha256"),
        (["--istio", "--namespace", "n", "--wasm-url", "https://h/s.wasm", "--wasm-sha256", SHA],
         "--workload-selector"),
        (["--namespace", "n"], "required arguments were not provided:\n  --istio"),
        (["--istio", "--lds", "/tmp/x"], "'--istio' cannot be used with:\n  --lds"),
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


def test_istio_config_fails_over_and_shares_state_between_the_roles(start_mock, wasm_server,
                                                                    monkeypatch, tmp_path):
    east, west = start_mock("east", "key-east"), start_mock("west", "key-west")
    config = {"backends": [backend_entry(east), backend_entry(west, priority=2)],
              "api_version": "2024-10-21"}
    (tmp_path / "filter.json").write_text(json.dumps(config))
    sha = hashlib.sha256(WASM.read_bytes()).hexdigest()
    docs = list(yaml.safe_load_all(render_istio(tmp_path / "filter.json", "--wasm-url", wasm_server,
                                                "--wasm-sha256", sha)))
    assert docs[0]["spec"]["sha256"] == sha

    def fake_render(filter_config, workdir, listen_port, admin_port, extra_args=None, edit=None):
        out = workdir / "envoy.yaml"
        out.write_text(json.dumps(istio_bootstrap(docs, WASM, listen_port, admin_port)))
        return out

    monkeypatch.setattr(harness, "render", fake_render)
    envoy = harness.Envoy(config)
    try:
        # The attempt role's code came over HTTP (remote), checked against the sha256.
        east.configure(fail_next=[{"status": 429, "retry_after": "30"}])
        r = envoy.chat()
        assert r.status_code == 200, r.text
        assert (r.headers["x-spillway-backend"], r.headers["x-spillway-attempts"]) == ("west", "2")
        assert west.requests()[-1]["headers"]["api-key"] == "key-west"
        # The attempt role recorded the throttle where the request role (a WasmPlugin: no
        # vm_id) reads it: the next request goes straight to west.
        r = envoy.chat()
        assert (r.headers["x-spillway-backend"], r.headers["x-spillway-attempts"]) == ("west", "1")
        assert east.count() == 1
    finally:
        envoy.stop()
