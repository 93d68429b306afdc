//! Istio manifests for a filter JSON (`spillway-render --istio`): the same
//! retry machinery as the plain Envoy bootstrap (`render`), expressed as
//! resources istiod turns into the gateway's Envoy config.
//!
//! * `WasmPlugin` (extensions.istio.io/v1alpha1): the request role, as a
//!   downstream HTTP filter right before the router (`UNSPECIFIED_PHASE`),
//!   `pluginConfig` = the filter JSON, key env vars read from the proxy's
//!   environment (`valueFrom: HOST`).
//! * `EnvoyFilter` (networking.istio.io/v1alpha3):
//!   - `CLUSTER` `ADD` of one `spillway_<name>` cluster per backend, the very
//!     clusters the bootstrap has, with the attempt role as an upstream HTTP
//!     filter whose code Envoy fetches itself (`vm_config.code.remote`);
//!     Istio's own `outbound|443||HOST` clusters are not used on this path:
//!     two backends may share a host (one Azure resource, two deployments),
//!     and the attempt role tells backends apart by cluster name;
//!   - `CLUSTER` `ADD` of `spillway_wasm_fetch`, the cluster Envoy fetches
//!     the attempt role's code through;
//!   - `HTTP_ROUTE` `MERGE` on the route named `spillway`: the matcher
//!     cluster specifier on `x-spillway-cluster`, the retry policy with
//!     `refresh_cluster_on_retry`, the timeout and the request body buffer.
//! * `VirtualService`: binds the gateway host to a route named `spillway`
//!   (the one the EnvoyFilter patches), with Istio's own retries off.
//! * `ServiceEntry` + `DestinationRule` (TLS `SIMPLE`, SNI) per https host:
//!   register the Azure hosts with the mesh (needed with
//!   `outboundTrafficPolicy: REGISTRY_ONLY`, visible to telemetry) and give
//!   the VirtualService a valid destination.
//!
//! Clusters, route and plugin come from the same builders as the bootstrap
//! (`envoy`), so both outputs stay one design.

use crate::envoy::{self, RouteOptions};
use crate::yaml::to_yaml;
use serde_json::{json, Map, Value};
use spillway::config::{Config, Scheme};
use spillway::contract::{Role, REQUEST_ROOT_ID};
use url::Url;

/// Cluster the attempt role's remote code is fetched through.
pub const FETCH_CLUSTER: &str = "spillway_wasm_fetch";
/// Name of the VirtualService HTTP route the EnvoyFilter patches.
pub const ROUTE_NAME: &str = "spillway";
pub const WASM_PLUGIN_NAME: &str = "spillway-request";
pub const ENVOY_FILTER_NAME: &str = "spillway";

#[derive(Debug, Clone)]
pub struct IstioOptions {
    /// Namespace of the gateway workload (EnvoyFilter `workloadSelector`
    /// only applies in the workload's own namespace).
    pub namespace: String,
    /// Where Istio pulls the module for the request role: `oci://`,
    /// `https://` (or `http://`, `file://`).
    pub wasm_url: String,
    /// sha256 of the `.wasm` file (hex).
    pub wasm_sha256: Option<String>,
    /// Where Envoy itself fetches the module for the attempt role, when
    /// `wasm_url` is an OCI image (Envoy cannot pull OCI images).
    pub attempt_wasm_url: Option<String>,
    /// Labels selecting the gateway pods.
    pub workload_selector: Vec<(String, String)>,
    /// Gateway the VirtualService binds to (`[NAMESPACE/]NAME`).
    pub gateway: String,
    /// Hosts clients call.
    pub hosts: Vec<String>,
    pub route: RouteOptions,
}

/// `app=gateway,istio=ingress` -> label pairs.
pub fn parse_selector(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| format!("--workload-selector: {part}: expected KEY=VALUE"))?;
        if k.is_empty() {
            return Err(format!("--workload-selector: {part}: empty label name"));
        }
        out.push((k.to_string(), v.to_string()));
    }
    if out.is_empty() {
        return Err("--workload-selector: needs at least one KEY=VALUE".to_string());
    }
    Ok(out)
}

#[derive(Debug, PartialEq, Eq)]
struct Remote {
    tls: bool,
    host: String,
    port: u16,
}

fn parse_remote(url: &str) -> Result<Remote, String> {
    let parsed = Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
    let tls = match parsed.scheme() {
        "https" => true,
        "http" => false,
        _ => return Err(format!("{url}: expected an https:// URL")),
    };
    let host = match parsed.host() {
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        Some(h) => h.to_string(),
        None => return Err(format!("{url}: no host")),
    };
    let port = parsed.port_or_known_default().ok_or_else(|| format!("{url}: no port"))?;
    Ok(Remote { tls, host, port })
}

fn valid_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| c.is_ascii_hexdigit())
}

fn labels(opts: &IstioOptions) -> Value {
    Value::Object(opts.workload_selector.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
}

fn metadata(name: &str, opts: &IstioOptions) -> Value {
    json!({
        "name": name,
        "namespace": opts.namespace,
        "labels": { "app.kubernetes.io/managed-by": "spillway-render" },
    })
}

/// Kubernetes name for a host: lower case, dots to dashes, at most 63 chars.
fn k8s_name(prefix: &str, host: &str) -> String {
    let mut s: String = format!("{prefix}{host}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect();
    s.truncate(63);
    s.trim_end_matches('-').to_string()
}

/// The attempt role's code: fetched by Envoy (`remote`, through
/// `FETCH_CLUSTER`) or a file mounted into the proxy.
fn attempt_code(opts: &IstioOptions) -> Result<(Value, Option<Remote>), String> {
    let url = opts.attempt_wasm_url.as_deref().unwrap_or(&opts.wasm_url);
    if let Some(path) = url.strip_prefix("file://") {
        return Ok((json!({ "local": { "filename": path } }), None));
    }
    if url.starts_with("oci://") || !url.contains("://") {
        return Err(format!(
            "{url}: the attempt role runs inside the backend clusters, where Envoy fetches \
             Wasm code itself and cannot pull OCI images; pass --attempt-wasm-url with an \
             https:// URL of the same .wasm file (or file:///PATH mounted into the proxy)"
        ));
    }
    let remote = parse_remote(url)?;
    let sha = opts.wasm_sha256.as_deref().ok_or_else(|| {
        "--wasm-sha256 is required: Envoy only fetches remote Wasm code with a checksum \
         (sha256sum spillway.wasm)"
            .to_string()
    })?;
    let code = json!({ "remote": {
        "http_uri": { "uri": url, "cluster": FETCH_CLUSTER, "timeout": "30s" },
        "sha256": sha,
        "retry_policy": { "num_retries": 5 },
    } });
    Ok((code, Some(remote)))
}

fn fetch_cluster(remote: &Remote) -> Value {
    envoy::dns_cluster(FETCH_CLUSTER, &remote.host, remote.port, "10s", remote.tls)
}

/// The manifests, in apply order.
pub fn render_istio(config: &Config, filter_json: &str, opts: &IstioOptions) -> Result<Vec<Value>, String> {
    if opts.namespace.is_empty() {
        return Err("--namespace is required".to_string());
    }
    if opts.workload_selector.is_empty() {
        return Err("--workload-selector is required".to_string());
    }
    if let Some(sha) = &opts.wasm_sha256 {
        if !valid_sha256(sha) {
            return Err("--wasm-sha256: expected 64 hex digits".to_string());
        }
    }
    let plugin_config: Value = serde_json::from_str(filter_json).map_err(|e| format!("filter JSON: {e}"))?;
    let env_keys = envoy::env_keys(config);
    let mut docs =
        vec![wasm_plugin(opts, &env_keys, plugin_config), envoy_filter(config, filter_json, opts, &env_keys)?];
    docs.push(virtual_service(config, opts)?);
    docs.extend(external_hosts(config, opts));
    Ok(docs)
}

/// The request role, as a WasmPlugin istiod places before the router.
fn wasm_plugin(opts: &IstioOptions, env_keys: &[String], plugin_config: Value) -> Value {
    let mut plugin = Map::new();
    plugin.insert("selector".into(), json!({ "matchLabels": labels(opts) }));
    plugin.insert("url".into(), json!(opts.wasm_url));
    if let (Some(sha), false) = (&opts.wasm_sha256, opts.wasm_url.starts_with("oci://")) {
        // For OCI images Istio checks this against the image digest, not
        // the module: pin those with `@sha256:` in the URL instead.
        plugin.insert("sha256".into(), json!(sha));
    }
    plugin.insert("imagePullPolicy".into(), json!("IfNotPresent"));
    plugin.insert("pluginName".into(), json!(REQUEST_ROOT_ID));
    // Istio puts UNSPECIFIED_PHASE plugins last, right before the router.
    plugin.insert("phase".into(), json!("UNSPECIFIED_PHASE"));
    plugin.insert("type".into(), json!("HTTP"));
    // A broken VM must fail requests, not silently skip the key rewrite.
    plugin.insert("failStrategy".into(), json!("FAIL_CLOSE"));
    if !env_keys.is_empty() {
        let env: Vec<Value> = env_keys.iter().map(|k| json!({ "name": k, "valueFrom": "HOST" })).collect();
        plugin.insert("vmConfig".into(), json!({ "env": env }));
    }
    plugin.insert("pluginConfig".into(), plugin_config);
    json!({
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": metadata(WASM_PLUGIN_NAME, opts),
        "spec": Value::Object(plugin),
    })
}

/// The backend clusters (attempt role, code fetched by Envoy) and the route
/// patch (cluster matcher, retry policy).
fn envoy_filter(config: &Config, filter_json: &str, opts: &IstioOptions, env_keys: &[String]) -> Result<Value, String> {
    let (code, remote) = attempt_code(opts)?;
    // Istio leaves vm_id empty for WasmPlugins; the same (empty) vm_id puts
    // both roles on one shared-data namespace.
    let attempt_plugin = envoy::plugin(Role::Attempt, filter_json, env_keys, code, None);
    let add_cluster = |value: Value| {
        json!({
            "applyTo": "CLUSTER",
            "match": { "context": "GATEWAY" },
            "patch": { "operation": "ADD", "value": value },
        })
    };
    let mut patches = Vec::new();
    if let Some(r) = &remote {
        patches.push(add_cluster(fetch_cluster(r)));
    }
    patches.extend(config.backends.iter().map(|b| add_cluster(envoy::backend_cluster(b, &attempt_plugin))));
    // The VirtualService owns the match; the patch brings the rest.
    let route = envoy::route_action(config, &opts.route);
    patches.push(json!({
        "applyTo": "HTTP_ROUTE",
        "match": {
            "context": "GATEWAY",
            "routeConfiguration": { "vhost": { "route": { "name": ROUTE_NAME } } },
        },
        "patch": { "operation": "MERGE", "value": route },
    }));
    // The body's fields, read by Envoy before the request role (first in the
    // gateway's HTTP filters; it holds JSON request bodies until complete).
    patches.push(json!({
        "applyTo": "HTTP_FILTER",
        "match": {
            "context": "GATEWAY",
            "listener": { "filterChain": { "filter": { "name": "envoy.filters.network.http_connection_manager" } } },
        },
        "patch": { "operation": "INSERT_FIRST", "value": envoy::body_fields_filter() },
    }));
    Ok(json!({
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": metadata(ENVOY_FILTER_NAME, opts),
        "spec": { "workloadSelector": { "labels": labels(opts) }, "configPatches": patches },
    }))
}

/// The route the EnvoyFilter patches. Its destination only matters if the
/// patch is not applied: the preferred https backend's host.
fn virtual_service(config: &Config, opts: &IstioOptions) -> Result<Value, String> {
    let first = config
        .backends
        .iter()
        .find(|b| b.scheme == Scheme::Https)
        .or_else(|| config.backends.first())
        .ok_or_else(|| "no backends".to_string())?;
    Ok(json!({
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "VirtualService",
        "metadata": metadata("spillway", opts),
        "spec": {
            "hosts": opts.hosts,
            "gateways": [opts.gateway],
            "http": [{
                "name": ROUTE_NAME,
                "route": [{ "destination": { "host": first.host, "port": { "number": first.port } } }],
                "timeout": format!("{}s", opts.route.timeout_s),
                // Istio's retries off: the EnvoyFilter brings Spillway's.
                "retries": { "attempts": 0 },
            }],
        },
    }))
}

/// A ServiceEntry and a DestinationRule (TLS with SNI) per https host, once each.
fn external_hosts(config: &Config, opts: &IstioOptions) -> Vec<Value> {
    let mut seen: Vec<(&str, u16)> = Vec::new();
    let mut docs = Vec::new();
    for b in config.backends.iter().filter(|b| b.scheme == Scheme::Https) {
        if seen.contains(&(b.host.as_str(), b.port)) {
            continue;
        }
        seen.push((b.host.as_str(), b.port));
        let name = k8s_name("spillway-", &b.host);
        docs.push(json!({
            "apiVersion": "networking.istio.io/v1beta1",
            "kind": "ServiceEntry",
            "metadata": metadata(&name, opts),
            "spec": {
                "hosts": [b.host],
                "location": "MESH_EXTERNAL",
                "resolution": "DNS",
                "ports": [{ "number": b.port, "name": "https", "protocol": "HTTPS" }],
                "exportTo": ["."],
            },
        }));
        docs.push(json!({
            "apiVersion": "networking.istio.io/v1beta1",
            "kind": "DestinationRule",
            "metadata": metadata(&name, opts),
            "spec": {
                "host": b.host,
                "exportTo": ["."],
                "trafficPolicy": { "portLevelSettings": [{
                    "port": { "number": b.port },
                    "tls": { "mode": "SIMPLE", "sni": b.host },
                }] },
            },
        }));
    }
    docs
}

/// Multi-document YAML (same quoting as the bootstrap).
pub fn to_multi_yaml(docs: &[Value]) -> String {
    docs.iter().map(|d| format!("---\n{}", to_yaml(d))).collect()
}

/// Environment variables the proxy must have (for the YAML header).
pub fn env_vars(docs: &[Value]) -> Vec<String> {
    docs.iter()
        .filter_map(|d| d.pointer("/spec/vmConfig/env").and_then(Value::as_array))
        .flatten()
        .filter_map(|e| e.get("name").and_then(Value::as_str).map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway::config::Keys;

    const JSON: &str = r#"{"backends":[
        {"name":"eastus","url":"https://eastus.openai.azure.com","api_key_env":"EASTUS_KEY"},
        {"name":"eastus-mini","url":"https://eastus.openai.azure.com","api_key_env":"EASTUS_KEY","deployments":{"gpt-4o":"mini"}},
        {"name":"local","url":"http://10.0.0.7:8001","api_key":"k","priority":2}],
        "clients":[{"name":"team","key_env":"TEAM_KEY"}]}"#;

    fn opts(url: &str) -> IstioOptions {
        IstioOptions {
            namespace: "gw".into(),
            wasm_url: url.into(),
            wasm_sha256: Some("ab".repeat(32)),
            attempt_wasm_url: None,
            workload_selector: vec![("app".into(), "gateway".into())],
            gateway: "gw/spillway-gateway".into(),
            hosts: vec!["*".into()],
            route: RouteOptions::default(),
        }
    }

    fn docs(o: &IstioOptions) -> Result<Vec<Value>, String> {
        let cfg = Config::parse(JSON.as_bytes(), Keys::NamesOnly).unwrap();
        render_istio(&cfg, JSON, o)
    }

    fn kinds(d: &[Value]) -> Vec<&str> {
        d.iter().map(|d| d["kind"].as_str().unwrap()).collect()
    }

    #[test]
    fn one_service_entry_per_https_host() {
        let d = docs(&opts("https://example.com/spillway.wasm")).unwrap();
        assert_eq!(kinds(&d), ["WasmPlugin", "EnvoyFilter", "VirtualService", "ServiceEntry", "DestinationRule"]);
        assert_eq!(d[3]["metadata"]["name"], "spillway-eastus-openai-azure-com");
        assert_eq!(d[4]["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"]["sni"], "eastus.openai.azure.com");
    }

    #[test]
    fn plugin_config_is_the_filter_json_and_keys_come_from_the_host() {
        let d = docs(&opts("https://example.com/spillway.wasm")).unwrap();
        let spec = &d[0]["spec"];
        assert_eq!(spec["pluginConfig"], serde_json::from_str::<Value>(JSON).unwrap());
        assert_eq!(spec["pluginName"], "spillway_request");
        assert_eq!(
            spec["vmConfig"]["env"],
            json!([{"name": "EASTUS_KEY", "valueFrom": "HOST"}, {"name": "TEAM_KEY", "valueFrom": "HOST"}])
        );
        assert_eq!(env_vars(&d), ["EASTUS_KEY", "TEAM_KEY"]);
    }

    #[test]
    fn clusters_carry_the_attempt_role_with_remote_code() {
        let d = docs(&opts("https://example.com:8443/spillway.wasm")).unwrap();
        let patches = d[1]["spec"]["configPatches"].as_array().unwrap();
        let names: Vec<&str> = patches
            .iter()
            .filter(|p| p["applyTo"] == "CLUSTER")
            .map(|p| p["patch"]["value"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, [FETCH_CLUSTER, "spillway_eastus", "spillway_eastus-mini", "spillway_local"]);
        let fetch = &patches[0]["patch"]["value"];
        assert_eq!(
            fetch["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
                ["port_value"],
            8443
        );
        let filters = &patches[1]["patch"]["value"]["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"];
        let vm = &filters[0]["typed_config"]["config"]["vm_config"];
        assert!(vm.get("vm_id").is_none());
        assert_eq!(vm["code"]["remote"]["http_uri"]["uri"], "https://example.com:8443/spillway.wasm");
        assert_eq!(vm["code"]["remote"]["sha256"], "ab".repeat(32));
        assert_eq!(filters[1]["name"], "envoy.filters.http.upstream_codec");
        let route = &patches[4]["patch"]["value"];
        assert_eq!(patches[4]["applyTo"], "HTTP_ROUTE");
        assert!(route.get("match").is_none());
        assert_eq!(route["route"]["retry_policy"]["refresh_cluster_on_retry"], true);
        assert_eq!(patches[5]["applyTo"], "HTTP_FILTER");
        assert_eq!(patches[5]["patch"]["operation"], "INSERT_FIRST");
        assert_eq!(patches[5]["patch"]["value"]["name"], "spillway.body_fields");
    }

    #[test]
    fn oci_needs_a_url_envoy_can_fetch_for_the_attempt_role() {
        let e = docs(&opts("oci://ghcr.io/x/spillway:1")).unwrap_err();
        assert!(e.contains("--attempt-wasm-url"), "{e}");
        let mut o = opts("oci://ghcr.io/x/spillway:1");
        o.attempt_wasm_url = Some("file:///var/lib/spillway/spillway.wasm".into());
        let d = docs(&o).unwrap();
        assert!(d[0]["spec"].get("sha256").is_none());
        let patches = d[1]["spec"]["configPatches"].as_array().unwrap();
        assert_eq!(patches[0]["patch"]["value"]["name"], "spillway_eastus");
    }

    #[test]
    fn remote_code_needs_a_checksum() {
        let mut o = opts("https://example.com/spillway.wasm");
        o.wasm_sha256 = None;
        assert!(docs(&o).unwrap_err().contains("--wasm-sha256"));
        o.wasm_sha256 = Some("xyz".into());
        assert!(docs(&o).unwrap_err().contains("64 hex"));
    }

    #[test]
    fn urls_and_selectors_parse() {
        assert_eq!(
            parse_remote("http://[::1]:9000/a.wasm").unwrap(),
            Remote { tls: false, host: "::1".into(), port: 9000 }
        );
        assert_eq!(parse_remote("https://h/x").unwrap().port, 443);
        assert!(parse_remote("ftp://h/x").is_err());
        assert_eq!(
            parse_selector("app=gateway, istio=ingress").unwrap(),
            [("app".to_string(), "gateway".to_string()), ("istio".to_string(), "ingress".to_string())]
        );
        assert!(parse_selector("app").is_err());
        assert!(parse_selector("").is_err());
        assert_eq!(k8s_name("spillway-", "A.b_c"), "spillway-a-b-c");
    }
}
