//! Istio manifests for a filter JSON (`spillway-render --istio`): the same
//! retry machinery as the plain Envoy bootstrap (`render`), expressed as
//! resources istiod turns into the gateway's Envoy config.
//!
//! * `EnvoyFilter` (networking.istio.io/v1alpha3):
//!   - `HTTP_FILTER` `INSERT_BEFORE` the router, in every HTTP connection
//!     manager of the gateway: Spillway's downstream filters (request buffer,
//!     the request role), each **disabled by default**
//!     (`HttpFilter.disabled`), so routes of other applications on the same
//!     gateway never run them; the request role is a plain Wasm filter here,
//!     not a `WasmPlugin`, so it carries Spillway's own `vm_id` (istiod
//!     leaves a WasmPlugin's empty) and shares it with the attempt role and
//!     no other module;
//!   - `CLUSTER` `ADD` of one `spillway_<name>` cluster per backend, the very
//!     clusters the bootstrap has, with the attempt role as an upstream HTTP
//!     filter; Istio's own `outbound|443||HOST` clusters are not used on this
//!     path: two backends may share a host (one Azure resource, two
//!     deployments), and the attempt role tells backends apart by cluster name;
//!   - `CLUSTER` `ADD` of `spillway_wasm_fetch`, the cluster Envoy fetches
//!     the module through (both roles' code is `vm_config.code.remote`);
//!   - `HTTP_ROUTE` `MERGE` on the routes named `spillway` and
//!     `spillway-realtime`: the matcher cluster specifier on
//!     `x-spillway-cluster`, the retry policy with `refresh_cluster_on_retry`,
//!     the timeout, the request body buffer, and `typed_per_filter_config`
//!     turning Spillway's filters on for these routes (on the websocket
//!     route only the request role: the buffer would hold an upgrade, as the
//!     bootstrap's upgrade chain knows).
//! * `VirtualService`: binds the gateway hosts to those two routes (websocket
//!   upgrades first), with Istio's own retries off.
//! * `ServiceEntry` + `DestinationRule` (TLS `SIMPLE`, SNI) per https host:
//!   register the Azure hosts with the mesh (needed with
//!   `outboundTrafficPolicy: REGISTRY_ONLY`, visible to telemetry) and give
//!   the VirtualService a valid destination.
//!
//! Clusters, route and filters come from the same builders as the bootstrap
//! (`envoy`), so both outputs stay one design.

use crate::envoy::{self, RouteOptions};
use crate::yaml::to_yaml;
use serde_json::{json, Value};
use spillway::config::{Config, Scheme};
use spillway::contract::Role;
use url::Url;

/// Cluster both roles' remote code is fetched through.
pub const FETCH_CLUSTER: &str = "spillway_wasm_fetch";
/// Name of the VirtualService HTTP route the EnvoyFilter patches.
pub const ROUTE_NAME: &str = "spillway";
/// The route for websocket upgrades (Realtime API), matched first: only the
/// request role runs there (an upgrade has no body to hold).
pub const REALTIME_ROUTE_NAME: &str = "spillway-realtime";
/// The gateway's router, which Spillway's filters go right before.
const ROUTER: &str = "envoy.filters.http.router";
const HCM: &str = "envoy.filters.network.http_connection_manager";
pub const ENVOY_FILTER_NAME: &str = "spillway";

#[derive(Debug, Clone)]
pub struct IstioOptions {
    /// Namespace of the gateway workload (EnvoyFilter `workloadSelector`
    /// only applies in the workload's own namespace).
    pub namespace: String,
    /// Where Envoy fetches the module for both roles: `https://` (or
    /// `http://`), or `file://` for a file mounted into the proxy.
    pub wasm_url: String,
    /// sha256 of the `.wasm` file (hex).
    pub wasm_sha256: Option<String>,
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

/// Both roles' code: fetched by Envoy (`remote`, through `FETCH_CLUSTER`)
/// or a file mounted into the proxy.
fn wasm_code(opts: &IstioOptions) -> Result<(Value, Option<Remote>), String> {
    let url = opts.wasm_url.as_str();
    if let Some(path) = url.strip_prefix("file://") {
        return Ok((envoy::local_code(path), None));
    }
    if url.starts_with("oci://") || !url.contains("://") {
        return Err(format!(
            "{url}: both roles are Wasm filters in the EnvoyFilter, whose code Envoy fetches \
             itself, and Envoy cannot pull OCI images; pass --wasm-url with an https:// URL of \
             spillway.wasm (or file:///PATH mounted into the proxy)"
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
    let mut docs = vec![envoy_filter(config, filter_json, opts)?, virtual_service(config, opts)?];
    docs.extend(external_hosts(config, opts));
    Ok(docs)
}

/// An HTTP filter that runs only on routes that turn it on.
fn disabled_by_default(mut filter: Value) -> Value {
    if let Some(obj) = filter.as_object_mut() {
        obj.insert("disabled".into(), json!(true));
    }
    filter
}

/// Turns each named filter on for one route (an empty `config` enables a
/// filter that is disabled by default, with its listener config).
fn enable_filters(names: &[&str]) -> Value {
    Value::Object(
        names
            .iter()
            .map(|n| {
                let on = json!({ "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {} });
                (n.to_string(), on)
            })
            .collect(),
    )
}

/// Spillway's filters (off except on its route), the backend clusters
/// (attempt role), the fetch cluster and the route patch (cluster matcher,
/// retry policy, the filters turned on).
fn envoy_filter(config: &Config, filter_json: &str, opts: &IstioOptions) -> Result<Value, String> {
    let (code, remote) = wasm_code(opts)?;
    let env_keys = envoy::env_keys(config);
    let plugin = |role| envoy::plugin(role, filter_json, &env_keys, code.clone());
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
    let attempt_plugin = plugin(Role::Attempt);
    patches.extend(config.backends.iter().map(|b| add_cluster(envoy::backend_cluster(b, &attempt_plugin))));
    patches.extend(envoy::rate_limit_cluster(config).map(add_cluster));
    // Right before the router, in order (buffer, request role):
    // after the gateway's own filters (authentication, authorization), so a
    // refused request is not buffered first.
    let filters = envoy::spillway_http_filters(&opts.route, &plugin(Role::Request));
    let names: Vec<&str> = filters.iter().filter_map(|f| f["name"].as_str()).collect();
    patches.extend(filters.iter().map(|f| {
        json!({
            "applyTo": "HTTP_FILTER",
            "match": {
                "context": "GATEWAY",
                "listener": { "filterChain": { "filter": { "name": HCM, "subFilter": { "name": ROUTER } } } },
            },
            "patch": { "operation": "INSERT_BEFORE", "value": disabled_by_default(f.clone()) },
        })
    }));
    // The VirtualService owns the matches; the patches bring the rest.
    for (route_name, enabled) in [(REALTIME_ROUTE_NAME, vec![envoy::REQUEST_FILTER_NAME]), (ROUTE_NAME, names)] {
        let mut route = envoy::route_action(config, &opts.route);
        if let Some(obj) = route.as_object_mut() {
            obj.insert("typed_per_filter_config".into(), enable_filters(&enabled));
        }
        patches.push(json!({
            "applyTo": "HTTP_ROUTE",
            "match": {
                "context": "GATEWAY",
                "routeConfiguration": { "vhost": { "route": { "name": route_name } } },
            },
            "patch": { "operation": "MERGE", "value": route },
        }));
    }
    Ok(json!({
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": metadata(ENVOY_FILTER_NAME, opts),
        "spec": { "workloadSelector": { "labels": labels(opts) }, "configPatches": patches },
    }))
}

/// The routes the EnvoyFilter patches: websocket upgrades, then everything
/// else. Their destination only matters if the patch is not applied: the
/// preferred https backend's host.
fn virtual_service(config: &Config, opts: &IstioOptions) -> Result<Value, String> {
    let first = config
        .backends
        .iter()
        .find(|b| b.scheme == Scheme::Https)
        .or_else(|| config.backends.first())
        .ok_or_else(|| "no backends".to_string())?;
    let route = |name: &str, matches: Option<Value>| {
        let mut r = json!({
            "name": name,
            "route": [{ "destination": { "host": first.host, "port": { "number": first.port } } }],
            "timeout": format!("{}s", opts.route.timeout_s),
            // Istio's retries off: the EnvoyFilter brings Spillway's.
            "retries": { "attempts": 0 },
        });
        if let (Some(m), Some(obj)) = (matches, r.as_object_mut()) {
            obj.insert("match".into(), m);
        }
        r
    };
    let websocket = json!([{ "headers": { "upgrade": { "regex": "(?i)websocket" } } }]);
    let http = [route(REALTIME_ROUTE_NAME, Some(websocket)), route(ROUTE_NAME, None)];
    Ok(json!({
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "VirtualService",
        "metadata": metadata("spillway", opts),
        "spec": {
            "hosts": opts.hosts,
            "gateways": [opts.gateway],
            "http": http,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy::{BUFFER_FILTER_NAME, REQUEST_FILTER_NAME};
    use spillway::config::Keys;
    use spillway::contract::VM_ID;

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

    fn patches<'a>(d: &'a [Value], apply_to: &str) -> Vec<&'a Value> {
        d[0]["spec"]["configPatches"].as_array().unwrap().iter().filter(|p| p["applyTo"] == apply_to).collect()
    }

    #[test]
    fn one_service_entry_per_https_host() {
        let d = docs(&opts("https://example.com/spillway.wasm")).unwrap();
        assert_eq!(kinds(&d), ["EnvoyFilter", "VirtualService", "ServiceEntry", "DestinationRule"]);
        assert_eq!(d[2]["metadata"]["name"], "spillway-eastus-openai-azure-com");
        assert_eq!(d[3]["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"]["sni"], "eastus.openai.azure.com");
    }

    #[test]
    fn the_filters_are_off_by_default_and_on_only_on_spillways_route() {
        let d = docs(&opts("https://example.com/spillway.wasm")).unwrap();
        let filters = patches(&d, "HTTP_FILTER");
        let names: Vec<&str> = filters.iter().map(|p| p["patch"]["value"]["name"].as_str().unwrap()).collect();
        assert_eq!(names, [BUFFER_FILTER_NAME, REQUEST_FILTER_NAME]);
        for p in &filters {
            // Inserted one after the other right before the gateway's router: order kept.
            assert_eq!(p["patch"]["operation"], "INSERT_BEFORE");
            let filter = &p["match"]["listener"]["filterChain"]["filter"];
            assert_eq!(filter["name"], "envoy.filters.network.http_connection_manager");
            assert_eq!(filter["subFilter"]["name"], "envoy.filters.http.router");
            assert_eq!(p["patch"]["value"]["disabled"], true);
        }
        let on = json!({ "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {} });
        let [realtime, route] = patches(&d, "HTTP_ROUTE")[..] else { panic!("two route patches") };
        assert_eq!(route["match"]["routeConfiguration"]["vhost"]["route"]["name"], ROUTE_NAME);
        let enabled = route["patch"]["value"]["typed_per_filter_config"].as_object().unwrap();
        assert_eq!(enabled.len(), names.len());
        for name in &names {
            assert_eq!(enabled[*name], on);
        }
        // Websocket upgrades: only the request role (the buffer would hold them).
        assert_eq!(realtime["match"]["routeConfiguration"]["vhost"]["route"]["name"], REALTIME_ROUTE_NAME);
        assert_eq!(realtime["patch"]["value"]["typed_per_filter_config"], json!({ REQUEST_FILTER_NAME: on }));
        assert_eq!(realtime["patch"]["value"]["route"], route["patch"]["value"]["route"]);
        // The VirtualService names both routes, upgrades first.
        let http = &d[1]["spec"]["http"];
        assert_eq!((&http[0]["name"], &http[1]["name"]), (&json!(REALTIME_ROUTE_NAME), &json!(ROUTE_NAME)));
        assert_eq!(http[0]["match"], json!([{ "headers": { "upgrade": { "regex": "(?i)websocket" } } }]));
        assert!(http[1].get("match").is_none());
        assert_eq!(http[0]["retries"], json!({ "attempts": 0 }));
        // Streaming bodies: no buffer filter, nothing to turn on for it.
        let mut o = opts("https://example.com/spillway.wasm");
        o.route.buffer_request_bodies = false;
        let d = docs(&o).unwrap();
        let names: Vec<&str> =
            patches(&d, "HTTP_FILTER").iter().map(|p| p["patch"]["value"]["name"].as_str().unwrap()).collect();
        assert_eq!(names, [REQUEST_FILTER_NAME]);
        let route = patches(&d, "HTTP_ROUTE")[1];
        assert!(route["patch"]["value"]["typed_per_filter_config"].get(BUFFER_FILTER_NAME).is_none());
    }

    #[test]
    fn both_roles_share_spillways_own_vm_id_config_and_keys() {
        let d = docs(&opts("https://example.com/spillway.wasm")).unwrap();
        let request = &patches(&d, "HTTP_FILTER")[1]["patch"]["value"]["typed_config"]["config"];
        let clusters = patches(&d, "CLUSTER");
        let attempt = &clusters[1]["patch"]["value"]["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"][0]["typed_config"]["config"];
        assert_eq!(request["root_id"], "spillway_request");
        assert_eq!(attempt["root_id"], "spillway_attempt");
        // One VM config for both: same vm_id (shared data), code and keys.
        assert_eq!(request["vm_config"], attempt["vm_config"]);
        assert_eq!(request["vm_config"]["vm_id"], VM_ID);
        assert_eq!(request["vm_config"]["environment_variables"]["host_env_keys"], json!(["EASTUS_KEY", "TEAM_KEY"]));
        assert_eq!(request["configuration"]["value"], JSON);
        assert_eq!(request["failure_policy"], "FAIL_RELOAD");
    }

    #[test]
    fn clusters_carry_the_attempt_role_with_remote_code() {
        let d = docs(&opts("https://example.com:8443/spillway.wasm")).unwrap();
        let clusters = patches(&d, "CLUSTER");
        let names: Vec<&str> = clusters.iter().map(|p| p["patch"]["value"]["name"].as_str().unwrap()).collect();
        assert_eq!(names, [FETCH_CLUSTER, "spillway_eastus", "spillway_eastus-mini", "spillway_local"]);
        let fetch = &clusters[0]["patch"]["value"];
        assert_eq!(
            fetch["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
                ["port_value"],
            8443
        );
        let filters = &clusters[1]["patch"]["value"]["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"];
        let vm = &filters[0]["typed_config"]["config"]["vm_config"];
        assert_eq!(vm["code"]["remote"]["http_uri"]["uri"], "https://example.com:8443/spillway.wasm");
        assert_eq!(vm["code"]["remote"]["http_uri"]["cluster"], FETCH_CLUSTER);
        assert_eq!(vm["code"]["remote"]["sha256"], "ab".repeat(32));
        assert_eq!(filters[1]["name"], "envoy.filters.http.upstream_codec");
        let route = &patches(&d, "HTTP_ROUTE")[1]["patch"]["value"];
        assert!(route.get("match").is_none());
        assert_eq!(route["route"]["retry_policy"]["refresh_cluster_on_retry"], true);
    }

    #[test]
    fn oci_is_refused_and_a_mounted_file_needs_no_fetch_cluster() {
        let e = docs(&opts("oci://ghcr.io/x/spillway:1")).unwrap_err();
        assert!(e.contains("cannot pull OCI images") && e.contains("https://"), "{e}");
        let d = docs(&opts("file:///var/lib/spillway/spillway.wasm")).unwrap();
        let clusters = patches(&d, "CLUSTER");
        assert_eq!(clusters[0]["patch"]["value"]["name"], "spillway_eastus");
        let request = &patches(&d, "HTTP_FILTER")[1]["patch"]["value"]["typed_config"]["config"];
        assert_eq!(request["vm_config"]["code"]["local"]["filename"], "/var/lib/spillway/spillway.wasm");
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
