"""Envoy bootstraps and LiteLLM configs for the benchmark setups.

Every Envoy variant starts from the bootstrap `spillway-render` writes for the
same three mock backends, so listener, HTTP connection manager options, route
(timeout, body buffer limit) and upstream protocol options are identical; a
variant only removes or swaps what it must:

* ``plain``       no wasm at all: the route's cluster-specifier plugin becomes a
                  plain ``cluster`` (one cluster holding the three mocks, round
                  robin), the Spillway retry policy stays as rendered (minus
                  ``refresh_cluster_on_retry``, which needs a cluster specifier);
* ``trivial``     ``plain`` + the trivial proxy-wasm filter (sets one response
                  header) before the router;
* ``trivial2``    ``trivial`` + the same trivial filter as an upstream filter of
                  the cluster, i.e. two wasm filter passes per request like
                  Spillway's request role + attempt role;
* ``spillway``    the rendered bootstrap unchanged (access log off);
* ablations of ``spillway``: Envoy's ``wasm`` log component at warning (no
  per-request JSON log line written), and the request role alone;
* ``envoy_retry`` ``plain`` with Envoy's native 429 retry policy (goodput and
  quota parts).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

WASM_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
UPSTREAM_CODEC = {
    "name": "envoy.filters.http.upstream_codec",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"
    },
}
POOL_CLUSTER = "bench_pool"


def spillway_filter(mock_ports: list[int]) -> dict:
    """The filter JSON: three equal backends (priority 1, weight 1), each with
    its own key, default retry_on (429, 5xx), Azure API version."""
    return {
        "backends": [
            {"name": f"mock{i}", "url": f"http://127.0.0.1:{p}", "api_key": f"bench-key-{i}"}
            for i, p in enumerate(mock_ports)
        ],
        "api_version": "2024-10-21",
    }


def spillway_quota_filter(mock_ports: list[int], routing: str, headroom_window_s: int | None = None) -> dict:
    """The filter JSON for the quota part: the same three backends, priority 1
    and weight 1 spelled out (the comparison is about what Spillway learns,
    not about weights), with `routing` "reactive" (learn from 429s only) or
    "quota_aware" (also from the rate-limit headers, over
    `headroom_window_s`, which must match the mocks' window)."""
    cfg = spillway_filter(mock_ports)
    for b in cfg["backends"]:
        b |= {"priority": 1, "weight": 1}
    cfg["routing"] = routing
    if headroom_window_s is not None:
        cfg["headroom_window_s"] = headroom_window_s
    return cfg


def _hcm(boot: dict) -> dict:
    return boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _route(boot: dict) -> dict:
    return _hcm(boot)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]


def trivial_filter(wasm_path: str, root_id: str = "bench_trivial") -> dict:
    return {
        "name": "bench.trivial",
        "typed_config": {
            "@type": WASM_FILTER_TYPE,
            "config": {
                "name": root_id,
                "root_id": root_id,
                "vm_config": {
                    "vm_id": "bench_trivial",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": wasm_path}},
                },
                "fail_open": False,
            },
        },
    }


def plain(rendered: dict, mock_ports: list[int]) -> dict:
    """The rendered bootstrap without any wasm: one round-robin cluster of the
    three mocks; same listener, HCM, route options and retry policy."""
    boot = copy.deepcopy(rendered)
    hcm = _hcm(boot)
    # Only the router: no wasm, and not Spillway's body-fields filter either.
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.router"]
    hcm.pop("upgrade_configs", None)
    # One route: the first, the one the benchmark's classic-path request
    # takes (with its per-route filter settings, which name no filter here).
    vhost = _hcm(boot)["route_config"]["virtual_hosts"][0]
    vhost["routes"] = vhost["routes"][:1]
    route = _route(boot)
    route.pop("inline_cluster_specifier_plugin")
    route["cluster"] = POOL_CLUSTER
    route["retry_policy"].pop("refresh_cluster_on_retry", None)
    template = boot["static_resources"]["clusters"][0]
    cluster = copy.deepcopy(template)
    cluster["name"] = POOL_CLUSTER
    cluster["lb_policy"] = "ROUND_ROBIN"
    cluster["load_assignment"] = {
        "cluster_name": POOL_CLUSTER,
        "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}},
                          "hostname": "127.0.0.1"}}
            for p in mock_ports
        ]}],
    }
    opts = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    opts.pop("http_filters", None)
    boot["static_resources"]["clusters"] = [cluster]
    # Stats tags only name Spillway metrics; harmless, but nothing to tag here.
    boot.pop("stats_config", None)
    return boot


def with_trivial(plain_boot: dict, wasm_path: str, upstream_too: bool = False) -> dict:
    boot = copy.deepcopy(plain_boot)
    hcm = _hcm(boot)
    hcm["http_filters"] = [trivial_filter(wasm_path)] + hcm["http_filters"]
    if upstream_too:
        opts = boot["static_resources"]["clusters"][0]["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        opts["http_filters"] = [trivial_filter(wasm_path, "bench_trivial_upstream"), UPSTREAM_CODEC]
    return boot


def plain_with_native_filters(rendered: dict, plain_boot: dict) -> dict:
    """Plain Envoy + the native filter Spillway's bootstrap puts before its
    wasm: the buffer filter, which holds every request body until complete."""
    boot = copy.deepcopy(plain_boot)
    native = [f for f in _hcm(rendered)["http_filters"] if f["name"] == "spillway.buffer"]
    _hcm(boot)["http_filters"] = copy.deepcopy(native) + _hcm(boot)["http_filters"]
    return boot


def with_wasm(rendered: dict, old_path: str, new_path: str) -> dict:
    """The same bootstrap running another build of the filter."""
    return json.loads(json.dumps(rendered).replace(old_path, new_path))


# Envoy's json_to_metadata filter as the renderer put it before the request
# role until the request role read body fields itself: the baseline filter
# reads its body fields from the metadata this filter writes.
BASELINE_BODY_FIELDS_FILTER = Path(__file__).resolve().parent / "baseline-body-fields.json"


def with_baseline_body_fields(rendered: dict) -> dict:
    """The bootstrap of the baseline's day: json_to_metadata right before the
    request role, on every path (one route)."""
    boot = copy.deepcopy(rendered)
    hcm = _hcm(boot)
    filters = hcm["http_filters"]
    at = next(i for i, f in enumerate(filters) if f["name"] == "spillway.request")
    hcm["http_filters"] = filters[:at] + [json.loads(BASELINE_BODY_FIELDS_FILTER.read_text())] + filters[at:]
    return boot


def with_hostcall_probe(plain_boot: dict, wasm_path: str, kind: str, count: int) -> dict:
    """Plain Envoy + the host-call probe (`bench/hostcall-cost`) before the
    router, making `count` calls of `kind` on every request's headers."""
    boot = copy.deepcopy(plain_boot)
    probe = trivial_filter(wasm_path, "bench_hostcall_probe")
    probe["name"] = "bench.hostcall_probe"
    probe["typed_config"]["config"]["vm_config"]["vm_id"] = "bench_hostcall_probe"
    probe["typed_config"]["config"]["configuration"] = {
        "@type": "type.googleapis.com/google.protobuf.StringValue", "value": f"{kind}:{count}"}
    _hcm(boot)["http_filters"] = [probe] + _hcm(boot)["http_filters"]
    return boot


def spillway_request_role_only(rendered: dict) -> dict:
    """Ablation, not a working gateway: the rendered Spillway bootstrap without
    the attempt role (the clusters' upstream wasm filter), to split Spillway's
    cost between its two roles. Requests still reach the mock the request
    role picked, with the client's path and key."""
    boot = copy.deepcopy(rendered)
    for c in boot["static_resources"]["clusters"]:
        opts = c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        opts["http_filters"] = [f for f in opts["http_filters"] if f["typed_config"]["@type"] != WASM_FILTER_TYPE]
    return boot


def envoy_native_retry(plain_boot: dict, num_retries: int = 2) -> dict:
    """Envoy alone in front of the three mocks: retry a 429 on another host."""
    boot = copy.deepcopy(plain_boot)
    route = _route(boot)
    route["retry_policy"] = {
        "retry_on": "retriable-status-codes,reset,connect-failure,refused-stream",
        "retriable_status_codes": [429],
        "num_retries": num_retries,
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            },
        }],
        "host_selection_retry_max_attempts": 5,
        # Same back-off as Spillway's rendered policy: the comparison is about
        # where a retry goes, not how long it waits.
        "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.002s"},
    }
    return boot


def with_ports(rendered: dict, listen_port: int, admin_port: int) -> dict:
    boot = copy.deepcopy(rendered)
    boot["admin"]["address"]["socket_address"]["port_value"] = admin_port
    boot["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = listen_port
    return boot


def write(boot: dict, path: Path) -> Path:
    # JSON is YAML: Envoy reads it as a .yaml bootstrap.
    path.write_text(json.dumps(boot, indent=1))
    return path


MASTER_KEY = "sk-bench-0123456789abcdef0123456789abcdef"


def litellm_config(mock_ports: list[int], num_retries: int) -> str:
    """LiteLLM proxy config: the three mocks as Azure deployments of one model
    group `gpt-4o`; router retries (`num_retries`) fail over between them;
    the SDK-level retries are off (`max_retries: 0`) so every retry is the
    router's. No database; a master key because LiteLLM refuses to start
    without one."""
    lines = ["model_list:"]
    for i, p in enumerate(mock_ports):
        lines += [
            "  - model_name: gpt-4o",
            "    litellm_params:",
            "      model: azure/gpt-4o",
            f"      api_base: http://127.0.0.1:{p}",
            f"      api_key: bench-key-{i}",
            "      api_version: '2024-10-21'",
            "      max_retries: 0",
        ]
    lines += [
        "router_settings:",
        "  routing_strategy: simple-shuffle",
        f"  num_retries: {num_retries}",
        "litellm_settings:",
        "  telemetry: false",
        "  drop_params: true",
        "  json_logs: false",
        "general_settings:",
        f"  master_key: {MASTER_KEY}",
        "  disable_spend_logs: true",
    ]
    return "\n".join(lines) + "\n"


def load_rendered(path: Path) -> dict[str, Any]:
    import yaml  # from the bench venv (litellm depends on PyYAML)

    return yaml.safe_load(path.read_text())
