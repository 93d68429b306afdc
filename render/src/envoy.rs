//! Builders for the Envoy resources Spillway needs, shared by the plain
//! bootstrap (`bootstrap`) and the Istio manifests (`istio`). The shape of
//! the retry machinery lives here:
//!
//! * the route picks its cluster with the matcher cluster specifier on the
//!   `x-spillway-cluster` request header and re-evaluates it on every retry
//!   (`refresh_cluster_on_retry`);
//! * retries happen on connection failures and when the attempt role marks a
//!   response with `x-spillway-retry` (never on raw status codes, so the
//!   filter decides, e.g. it does not retry a 429 when no backend is left);
//! * every backend cluster runs the attempt role as an upstream HTTP filter.

use serde_json::{json, Map, Value};
use spillway::config::{Backend, Config, Scheme};
use spillway::contract::{header, metric, Role, VM_ID};

/// Route and request-body settings both outputs share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteOptions {
    /// Timeout for a whole request, retries included; long because streamed
    /// completions can run for minutes.
    pub timeout_s: u64,
    /// Requests up to this size can be retried (Envoy buffers them); with
    /// `buffer_request_bodies`, larger ones are refused (413).
    pub request_body_limit_bytes: u64,
    /// Hold every request body in Envoy until it is complete before the
    /// request goes upstream (the request role holds JSON bodies anyway):
    /// a slow uploader then never holds a backend connection.
    pub buffer_request_bodies: bool,
}

impl Default for RouteOptions {
    fn default() -> Self {
        RouteOptions { timeout_s: 600, request_body_limit_bytes: 32 * 1024 * 1024, buffer_request_bodies: true }
    }
}

/// What the listener does with request headers whose names contain `_`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UnderscoreHeaders {
    /// Pass them on.
    Allow,
    /// Remove the header, serve the request.
    Drop,
    /// Answer 400 (Envoy's edge guidance).
    Reject,
}

impl UnderscoreHeaders {
    fn envoy_action(self) -> &'static str {
        match self {
            UnderscoreHeaders::Allow => "ALLOW",
            UnderscoreHeaders::Drop => "DROP_HEADER",
            UnderscoreHeaders::Reject => "REJECT_REQUEST",
        }
    }
}

/// Settings of the HTTP connection manager clients talk to (Envoy's
/// "Configuring Envoy as an edge proxy", adapted to LLM traffic). Timeouts in
/// seconds, 0 turns one off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeOptions {
    /// A client must have sent its whole request headers within this time.
    pub request_headers_timeout_s: u64,
    /// A client must have sent its whole request (headers and body) within
    /// this time; the answer, however long, is not limited by it.
    pub request_timeout_s: u64,
    /// A stream with nothing sent either way for this long is closed. Long:
    /// a model can think for minutes before its first token.
    pub stream_idle_timeout_s: u64,
    pub max_request_headers_kb: u32,
    pub max_headers_count: u32,
    pub headers_with_underscores: UnderscoreHeaders,
    pub http2_max_concurrent_streams: u32,
    pub http2_initial_stream_window_bytes: u32,
    pub http2_initial_connection_window_bytes: u32,
    /// Take the client address from the connection, not from a client-sent
    /// `x-forwarded-for` (the request is then external: Envoy removes
    /// client-sent `x-envoy-*` headers before they reach a backend).
    pub use_remote_address: bool,
    /// Proxies in front of Envoy whose `x-forwarded-for` entries are trusted.
    pub xff_num_trusted_hops: u32,
}

impl Default for EdgeOptions {
    fn default() -> Self {
        EdgeOptions {
            request_headers_timeout_s: 10,
            request_timeout_s: 300,
            stream_idle_timeout_s: 600,
            max_request_headers_kb: 32,
            max_headers_count: 100,
            headers_with_underscores: UnderscoreHeaders::Reject,
            http2_max_concurrent_streams: 100,
            http2_initial_stream_window_bytes: 1024 * 1024,
            http2_initial_connection_window_bytes: 4 * 1024 * 1024,
            use_remote_address: true,
            xff_num_trusted_hops: 0,
        }
    }
}

/// Name of the attempt role's upstream HTTP filter in each cluster.
pub const ATTEMPT_FILTER_NAME: &str = "spillway.attempt";
/// Name of the request role's HTTP filter in the listener.
pub const REQUEST_FILTER_NAME: &str = "spillway.request";

/// Environment variables the VM must see: every `api_key_env` and `key_env`,
/// once each (Envoy refuses a VM config that lists a variable twice).
pub fn env_keys(config: &Config) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    let vars = config
        .backends
        .iter()
        .filter_map(|b| b.api_key_env.as_ref())
        .chain(config.clients.iter().filter_map(|c| c.key_env.as_ref()));
    for var in vars {
        if !keys.contains(var) {
            keys.push(var.clone());
        }
    }
    keys
}

/// Where the VM gets its code.
pub fn local_code(wasm_path: &str) -> Value {
    json!({ "local": { "filename": wasm_path } })
}

/// A Wasm plugin config for one role. Both roles name Spillway's own
/// `vm_id`: Envoy scopes shared data by it, so the roles share the health
/// table and counters with each other and with no other Wasm module.
pub fn plugin(role: Role, filter_json: &str, env_keys: &[String], code: Value) -> Value {
    let mut plugin = json!({
        "name": role.root_id(),
        "root_id": role.root_id(),
        "vm_config": {
            "vm_id": VM_ID,
            "runtime": "envoy.wasm.runtime.v8",
            "code": code,
            "environment_variables": { "host_env_keys": env_keys },
        },
        "configuration": {
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": filter_json,
        },
        // A VM that fails (it should not: nothing in it can trap) is
        // reloaded, with backoff; meanwhile requests fail rather than skip
        // the key rewrite. Envoy counts reloads in wasm.<root id>.vm_reload.
        "failure_policy": "FAIL_RELOAD",
    });
    if let Some(obj) = plugin.as_object_mut() {
        // Both roles hold headers while they read the body that follows:
        // the request role a JSON request's fields before it routes it, the
        // attempt role a stream's first events (first-token failover).
        // Without this, a paused head also stops the body from reaching the
        // filter (proxy-wasm turns StopIteration into StopAll).
        obj.insert("allow_on_headers_stop_iteration".into(), json!(true));
    }
    plugin
}

/// The backend keys and client keys written into the config itself
/// (`api_key`, `key`), by field and name; never their values. Such a key is
/// readable by anyone who can read the rendered file or Envoy's
/// `/config_dump`; `api_key_env` / `key_env` keep it in the environment.
pub fn literal_keys(config: &Config) -> Vec<String> {
    let backends = config
        .backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.api_key.is_some())
        .map(|(i, b)| format!("backends[{i}].api_key ({})", b.name));
    let clients = config
        .clients
        .iter()
        .enumerate()
        .filter(|(_, c)| c.key.is_some())
        .map(|(i, c)| format!("clients[{i}].key ({})", c.name));
    backends.chain(clients).collect()
}

pub fn wasm_filter(name: &str, plugin: &Value) -> Value {
    json!({
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": plugin,
        },
    })
}

/// TLS to `host`, with SNI and a certificate check against the system CAs.
pub fn upstream_tls(host: &str) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": host,
            "common_tls_context": {
                "validation_context": {
                    "trusted_ca": { "filename": "/etc/ssl/certs/ca-certificates.crt" },
                    "match_typed_subject_alt_names": [{
                        "san_type": "DNS",
                        "matcher": { "exact": host },
                    }],
                },
            },
        },
    })
}

/// A DNS cluster with one endpoint, TLS when `tls`.
pub fn dns_cluster(name: &str, host: &str, port: u16, connect_timeout: &str, tls: bool) -> Value {
    let mut c = json!({
        "name": name,
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": connect_timeout,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": {
                "address": { "socket_address": { "address": host, "port_value": port } },
                "hostname": host,
            } }] }],
        },
    });
    if let (true, Some(obj)) = (tls, c.as_object_mut()) {
        obj.insert("transport_socket".into(), upstream_tls(host));
    }
    c
}

/// Envoy's own per-cluster limits, sized so that Spillway, not Envoy,
/// decides when a backend is too busy (its 429 says so). Envoy's defaults
/// allow only 3 concurrent retries per cluster: beyond that it silently
/// declines a failover and the client gets the raw error. A retry budget
/// instead lets every active request fail over once, with at least
/// `min_retry_concurrency` retries in flight.
fn circuit_breakers() -> Value {
    json!({ "thresholds": [{
        "priority": "DEFAULT",
        "max_connections": 100_000,
        "max_pending_requests": 100_000,
        "max_requests": 100_000,
        "retry_budget": { "budget_percent": { "value": 100.0 }, "min_retry_concurrency": 1_000 },
    }] })
}

/// A backend's cluster, with the attempt role as its upstream HTTP filter.
pub fn backend_cluster(b: &Backend, attempt_plugin: &Value) -> Value {
    let mut c = dns_cluster(&b.cluster, &b.host, b.port, "5s", b.scheme == Scheme::Https);
    if let Some(obj) = c.as_object_mut() {
        obj.insert("circuit_breakers".into(), circuit_breakers());
        let mut options = protocol_options(json!({ "http_protocol_options": {} }));
        if let Some(o) = options.pointer_mut(&format!("/{HTTP_PROTOCOL_OPTIONS}")).and_then(Value::as_object_mut) {
            o.insert(
                "http_filters".into(),
                json!([
                    wasm_filter(ATTEMPT_FILTER_NAME, attempt_plugin),
                    {
                        "name": "envoy.filters.http.upstream_codec",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec",
                        },
                    },
                ]),
            );
        }
        obj.insert("typed_extension_protocol_options".into(), options);
    }
    c
}

const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// A cluster's `typed_extension_protocol_options` with this
/// `explicit_http_config` (HTTP/1.1 or HTTP/2 to the upstream).
fn protocol_options(explicit_http_config: Value) -> Value {
    json!({
        HTTP_PROTOCOL_OPTIONS: {
            "@type": format!("type.googleapis.com/{HTTP_PROTOCOL_OPTIONS}"),
            "explicit_http_config": explicit_http_config,
        },
    })
}

/// The cluster that reaches the rate-limit service (global client limits):
/// gRPC, so HTTP/2. `None` when there is none to make (local limits, or
/// the operator named a cluster of their own).
pub fn rate_limit_cluster(config: &Config) -> Option<Value> {
    let global = config.global_limits.as_ref().filter(|g| g.rendered_cluster())?;
    let (host, port) = global.address();
    let mut c = dns_cluster(&global.cluster, host, port, "1s", false);
    if let Some(obj) = c.as_object_mut() {
        // Envoy's default allows 1,024 calls at once; past that every
        // request would meet the failure mode.
        obj.insert("circuit_breakers".into(), circuit_breakers());
        obj.insert(
            "typed_extension_protocol_options".into(),
            protocol_options(json!({ "http2_protocol_options": {} })),
        );
    }
    Some(c)
}

fn cluster_matcher(config: &Config) -> Value {
    let map: Map<String, Value> = config
        .backends
        .iter()
        .map(|b| {
            let action = json!({ "action": {
                "name": "cluster",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.router.cluster_specifiers.matcher.v3.ClusterAction",
                    "cluster": b.cluster,
                },
            } });
            (b.cluster.clone(), action)
        })
        .collect();
    json!({ "extension": {
        "name": "envoy.router.cluster_specifier_plugin.matcher",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.router.cluster_specifiers.matcher.v3.MatcherClusterSpecifier",
            "cluster_matcher": { "matcher_tree": {
                "input": {
                    "name": "request-headers",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
                        "header_name": header::CLUSTER,
                    },
                },
                "exact_match_map": { "map": map },
            } },
        },
    } })
}

fn retry_policy(config: &Config) -> Value {
    let mut policy = json!({
        "retry_on": "reset,connect-failure,refused-stream,retriable-headers",
        "num_retries": config.backends.len().saturating_sub(1).max(1),
        "retriable_headers": [{ "name": header::RETRY, "present_match": true }],
        "refresh_cluster_on_retry": true,
        // Failover goes to another region: no reason to wait.
        "retry_back_off": { "base_interval": "0.001s", "max_interval": "0.002s" },
    });
    if let (Some(s), Some(obj)) = (config.attempt_timeout_s, policy.as_object_mut()) {
        // Only until the answer starts: a stream may run longer.
        obj.insert("per_try_timeout".into(), json!(format!("{s}s")));
    }
    if let (Some(s), Some(obj)) = (config.attempt_idle_timeout_s, policy.as_object_mut()) {
        obj.insert("per_try_idle_timeout".into(), json!(format!("{s}s")));
    }
    policy
}

/// The one route: every path to the cluster the request role chose, with the
/// retry policy that fails over. No `match`: callers add their own.
pub fn route_action(config: &Config, opts: &RouteOptions) -> Value {
    json!({
        // Envoy can only retry a request whose body it still holds.
        "request_body_buffer_limit": opts.request_body_limit_bytes,
        "route": {
            "inline_cluster_specifier_plugin": cluster_matcher(config),
            "timeout": format!("{}s", opts.timeout_s),
            "retry_policy": retry_policy(config),
        },
    })
}

/// Envoy's own error answers (no backend reachable, timeouts, a request that
/// took too long to arrive or is too large) in the OpenAI error shape clients
/// already parse. The filter's own answers keep their bodies: none of them
/// has one of these flags or statuses. (Envoy's overload 503 carries no flag
/// to tell it from the filter's own 503: it stays plain text.)
fn local_reply_config() -> Value {
    let body = json!({
        "json_format": { "error": {
            "message": "%LOCAL_REPLY_BODY%",
            "type": "server_error",
            "code": "%RESPONSE_CODE%",
            "param": null,
        } },
        "content_type": "application/json",
    });
    let status = |code: u32| {
        json!({ "status_code_filter": { "comparison": { "op": "EQ", "value": {
        "default_value": code, "runtime_key": format!("spillway.local_reply.status_{code}"),
    } } } })
    };
    json!({ "mappers": [
        {
            "filter": { "response_flag_filter": { "flags": ["UF", "URX", "UH", "UO", "UT", "UC", "UR", "UMSDR", "NR"] } },
            "body_format_override": body,
        },
        {
            // 408: the request did not arrive in time; 413: larger than the body limit.
            "filter": { "or_filter": { "filters": [status(408), status(413)] } },
            "body_format_override": body,
        },
    ] })
}

fn stdout_access_log() -> Value {
    json!([{
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": { "text_format_source": { "inline_string":
                "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%\" %RESPONSE_CODE% %RESPONSE_FLAGS% attempts=%UPSTREAM_REQUEST_ATTEMPT_COUNT% cluster=%UPSTREAM_CLUSTER% %DURATION%ms client=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%\n"
            } },
        },
    }])
}

/// The route: every path to the cluster the request role chose.
pub fn routes(config: &Config, opts: &RouteOptions) -> Vec<Value> {
    let mut route = route_action(config, opts);
    if let Some(obj) = route.as_object_mut() {
        obj.insert("match".into(), json!({ "prefix": "/" }));
    }
    vec![route]
}

/// Name of the buffer filter that holds request bodies until complete.
pub const BUFFER_FILTER_NAME: &str = "spillway.buffer";

/// Envoy's buffer filter: the request goes on (to the request role and the
/// router) only once its whole body has arrived;
/// a body over `max_bytes` gets a 413. A slow uploader then costs Envoy
/// memory for at most the HCM's `request_timeout`, never a backend connection.
pub fn request_buffer_filter(max_bytes: u64) -> Value {
    json!({
        "name": BUFFER_FILTER_NAME,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": max_bytes,
        },
    })
}

pub fn router_filter() -> Value {
    json!({
        "name": "envoy.filters.http.router",
        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" },
    })
}

/// Spillway's HTTP filters in order, without the router: the request buffer
/// (unless bodies stream), the request role.
pub fn spillway_http_filters(route: &RouteOptions, request_plugin: &Value) -> Vec<Value> {
    let mut filters = Vec::new();
    if route.buffer_request_bodies {
        filters.push(request_buffer_filter(route.request_body_limit_bytes));
    }
    filters.push(wasm_filter(REQUEST_FILTER_NAME, request_plugin));
    filters
}

fn seconds(s: u64) -> Value {
    json!(format!("{s}s"))
}

/// The HTTP connection manager: the route, Spillway's filters, the router,
/// and the edge settings.
pub fn http_connection_manager(
    routes: Vec<Value>,
    request_plugin: &Value,
    access_log: bool,
    route_opts: &RouteOptions,
    edge: &EdgeOptions,
) -> Value {
    let mut http_filters = spillway_http_filters(route_opts, request_plugin);
    http_filters.push(router_filter());
    let mut hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "spillway",
        "codec_type": "AUTO",
        // Realtime API connections are websockets. Their chain leaves out the
        // buffer filter: an upgrade has no body to wait for, and it would
        // hold the upgrade request for ever.
        "upgrade_configs": [{
            "upgrade_type": "websocket",
            "filters": [wasm_filter(REQUEST_FILTER_NAME, request_plugin), router_filter()],
        }],
        // Only API paths may reach a backend with its key: resolve `.`/`..`
        // (also percent-encoded) and merge `//` before the filter and the
        // route look at the path. Encoded slashes are left for the filter,
        // which refuses them with an OpenAI-style 400.
        "normalize_path": true,
        "merge_slashes": true,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        // The client's address is the connection's (plus trusted proxies'
        // x-forwarded-for entries); Envoy then also removes client-sent
        // x-envoy-* headers, which are meant for Envoy itself.
        "use_remote_address": edge.use_remote_address,
        "xff_num_trusted_hops": edge.xff_num_trusted_hops,
        // A client that never finishes its headers, or its body, is cut
        // (408); the answer, however long, is not bounded by these.
        "request_headers_timeout": seconds(edge.request_headers_timeout_s),
        "request_timeout": seconds(edge.request_timeout_s),
        // Streams can be quiet for minutes while a model thinks.
        "stream_idle_timeout": seconds(edge.stream_idle_timeout_s),
        "max_request_headers_kb": edge.max_request_headers_kb,
        "common_http_protocol_options": {
            "max_headers_count": edge.max_headers_count,
            "headers_with_underscores_action": edge.headers_with_underscores.envoy_action(),
        },
        "http2_protocol_options": {
            "max_concurrent_streams": edge.http2_max_concurrent_streams,
            "initial_stream_window_size": edge.http2_initial_stream_window_bytes,
            "initial_connection_window_size": edge.http2_initial_connection_window_bytes,
        },
        "route_config": {
            "name": "spillway",
            "virtual_hosts": [{ "name": "spillway", "domains": ["*"], "routes": routes }],
        },
        "local_reply_config": local_reply_config(),
        "http_filters": http_filters,
    });
    if let (true, Some(obj)) = (access_log, hcm.as_object_mut()) {
        obj.insert("access_log".into(), stdout_access_log());
    }
    hcm
}

/// A listener serving `hcm` on `address:port`.
pub fn listener(hcm: Value, address: &str, port: u16) -> Value {
    json!({
        "name": "spillway",
        "address": { "socket_address": { "address": address, "port_value": port } },
        "per_connection_buffer_limit_bytes": 1_048_576,
        "filter_chains": [{ "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": hcm,
        }] }],
    })
}

/// Envoy `stats_tags` that turn the `.key.value` pairs of Spillway's metric
/// names back into Prometheus labels. RE2 syntax: the first group is cut
/// from the name, the second is the label value.
pub fn stats_config() -> Value {
    let tags: Vec<Value> = metric::LABELS
        .iter()
        .map(|k| {
            json!({
                "tag_name": k,
                "regex": format!(
                    r"^wasmcustom\.(?:{}|{})\w+(?:\.\w+\.[\w-]+)*?(\.{k}\.([\w-]+))",
                    metric::PREFIX,
                    metric::GEN_AI_PREFIX
                ),
            })
        })
        .collect();
    json!({ "stats_tags": tags })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use spillway::config::Keys;

    /// A filter JSON with https and http backends, key variables and a client.
    pub(crate) const JSON: &str = r#"{"backends":[
        {"name":"eastus","url":"https://eastus.openai.azure.com","api_key_env":"EASTUS_KEY"},
        {"name":"local","url":"http://127.0.0.1:8001","api_key":"k","priority":2},
        {"name":"eastus2","url":"https://eastus.openai.azure.com","api_key_env":"EASTUS_KEY","priority":3}],
        "clients":[{"name":"team","key_env":"TEAM_KEY"}]}"#;

    fn config(json: &str) -> Config {
        Config::parse(json.as_bytes(), Keys::NamesOnly).unwrap()
    }

    #[test]
    fn env_keys_are_listed_once() {
        assert_eq!(env_keys(&config(JSON)), ["EASTUS_KEY", "TEAM_KEY"]);
    }

    #[test]
    fn the_route_matches_every_backend_cluster_and_retries_on_the_filters_word() {
        let route = route_action(&config(JSON), &RouteOptions::default());
        let map = &route["route"]["inline_cluster_specifier_plugin"]["extension"]["typed_config"]["cluster_matcher"]
            ["matcher_tree"]["exact_match_map"]["map"];
        assert_eq!(map.as_object().unwrap().len(), 3);
        assert_eq!(map["spillway_local"]["action"]["typed_config"]["cluster"], "spillway_local");
        let policy = &route["route"]["retry_policy"];
        assert_eq!(policy["num_retries"], 2);
        assert_eq!(policy["refresh_cluster_on_retry"], true);
        assert_eq!(policy["retriable_headers"][0]["name"], header::RETRY);
        assert!(policy.get("per_try_timeout").is_none());
        assert_eq!(route["request_body_buffer_limit"], 32 * 1024 * 1024);
        let timed =
            config(r#"{"backends":[{"name":"a","url":"http://x"}],"attempt_timeout_s":7,"attempt_idle_timeout_s":3}"#);
        let route = route_action(&timed, &RouteOptions::default());
        assert_eq!(route["route"]["retry_policy"]["per_try_timeout"], "7s");
        assert_eq!(route["route"]["retry_policy"]["per_try_idle_timeout"], "3s");
        assert_eq!(route["route"]["retry_policy"]["num_retries"], 1);
    }

    #[test]
    fn https_backends_get_tls_with_sni_and_http_ones_do_not() {
        let cfg = config(JSON);
        let plugin = plugin(Role::Attempt, JSON, &[], local_code("/x.wasm"));
        let east = backend_cluster(&cfg.backends[0], &plugin);
        assert_eq!(east["transport_socket"]["typed_config"]["sni"], "eastus.openai.azure.com");
        assert_eq!(
            east["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
                ["port_value"],
            443
        );
        let local = backend_cluster(&cfg.backends[1], &plugin);
        assert!(local.get("transport_socket").is_none());
        let filters = &local["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"];
        assert_eq!(filters[0]["typed_config"]["config"]["root_id"], "spillway_attempt");
        assert_eq!(filters[1]["name"], "envoy.filters.http.upstream_codec");
        let limits = &local["circuit_breakers"]["thresholds"][0];
        assert_eq!(limits["retry_budget"]["budget_percent"]["value"], 100.0);
        assert!(limits["max_pending_requests"].as_u64().unwrap() >= 100_000);
    }

    #[test]
    fn global_limits_get_an_http2_cluster_to_their_service() {
        let clients = r#""clients":[{"name":"t","key":"key-of-team-t","requests_per_minute":5}]"#;
        let local = config(&format!(r#"{{"backends":[{{"name":"a","url":"http://x"}}],{clients}}}"#));
        assert_eq!(rate_limit_cluster(&local), None);
        let global = config(&format!(
            r#"{{"backends":[{{"name":"a","url":"http://x"}}],{clients},"global_limits":{{"service":"rls.internal:8081"}}}}"#
        ));
        let c = rate_limit_cluster(&global).expect("a cluster");
        assert_eq!(c["name"], "spillway.ratelimit");
        let address = &c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
        assert_eq!((address["address"].as_str(), address["port_value"].as_u64()), (Some("rls.internal"), Some(8081)));
        let options = &c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
        assert!(options["explicit_http_config"]["http2_protocol_options"].is_object());
        let named = config(&format!(
            r#"{{"backends":[{{"name":"a","url":"http://x"}}],{clients},"global_limits":{{"service":"rls:1","cluster":"outbound|1||rls"}}}}"#
        ));
        assert_eq!(rate_limit_cluster(&named), None);
    }

    #[test]
    fn plugins_name_their_role_and_vm() {
        let p = plugin(Role::Request, "{}", &["K".to_string()], local_code("/x.wasm"));
        assert_eq!(p["root_id"], "spillway_request");
        assert_eq!(p["vm_config"]["vm_id"], "spillway");
        assert_eq!(p["vm_config"]["environment_variables"]["host_env_keys"], json!(["K"]));
        assert_eq!(p["failure_policy"], "FAIL_RELOAD");
        let a = plugin(Role::Attempt, "{}", &["K".to_string()], local_code("/x.wasm"));
        assert_eq!(a["vm_config"], p["vm_config"]);
        // Both hold headers while they read a body (see `plugin`).
        assert_eq!(a["allow_on_headers_stop_iteration"], true);
        assert_eq!(p["allow_on_headers_stop_iteration"], true);
    }

    #[test]
    fn literal_keys_are_named_by_field_never_by_value() {
        let keys = literal_keys(&config(JSON));
        assert_eq!(keys, ["backends[1].api_key (local)"]);
        let both = config(
            r#"{"backends":[{"name":"a","url":"http://x","api_key_env":"A"},{"name":"b","url":"http://y","api_key":"sk-b-123"}],
                "clients":[{"name":"c","key":"client-key-1"},{"name":"d","key_env":"D"}]}"#,
        );
        let keys = literal_keys(&both);
        assert_eq!(keys, ["backends[1].api_key (b)", "clients[0].key (c)"]);
        assert!(!keys.concat().contains("sk-b-123") && !keys.concat().contains("client-key-1"));
        let none =
            config(r#"{"backends":[{"name":"a","url":"http://x","api_key_env":"A"},{"name":"b","url":"http://y"}]}"#);
        assert!(literal_keys(&none).is_empty());
    }

    fn hcm(route: &RouteOptions, edge: &EdgeOptions) -> Value {
        let p = plugin(Role::Request, "{}", &[], local_code("/x.wasm"));
        http_connection_manager(vec![json!({})], &p, true, route, edge)
    }

    fn filter_names(filters: &Value) -> Vec<&str> {
        filters.as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect()
    }

    #[test]
    fn the_listener_has_the_edge_defaults() {
        let h = hcm(&RouteOptions::default(), &EdgeOptions::default());
        assert_eq!(h["request_headers_timeout"], "10s");
        assert_eq!(h["request_timeout"], "300s");
        assert_eq!(h["stream_idle_timeout"], "600s");
        assert_eq!(h["max_request_headers_kb"], 32);
        assert_eq!(h["common_http_protocol_options"]["max_headers_count"], 100);
        assert_eq!(h["common_http_protocol_options"]["headers_with_underscores_action"], "REJECT_REQUEST");
        let h2 = &h["http2_protocol_options"];
        assert_eq!(h2["max_concurrent_streams"], 100);
        assert_eq!(h2["initial_stream_window_size"], 1024 * 1024);
        assert_eq!(h2["initial_connection_window_size"], 4 * 1024 * 1024);
        assert_eq!(h["use_remote_address"], true);
        assert_eq!(h["xff_num_trusted_hops"], 0);
        // Bodies are held until complete (buffer first), websockets skip the buffer.
        assert_eq!(
            filter_names(&h["http_filters"]),
            [BUFFER_FILTER_NAME, REQUEST_FILTER_NAME, "envoy.filters.http.router"]
        );
        assert_eq!(h["http_filters"][0]["typed_config"]["max_request_bytes"], 32 * 1024 * 1024);
        assert_eq!(
            filter_names(&h["upgrade_configs"][0]["filters"]),
            [REQUEST_FILTER_NAME, "envoy.filters.http.router"]
        );
    }

    #[test]
    fn every_edge_setting_follows_its_option() {
        let edge = EdgeOptions {
            request_headers_timeout_s: 0,
            request_timeout_s: 7,
            stream_idle_timeout_s: 0,
            max_request_headers_kb: 8,
            max_headers_count: 20,
            headers_with_underscores: UnderscoreHeaders::Drop,
            http2_max_concurrent_streams: 5,
            http2_initial_stream_window_bytes: 65_535,
            http2_initial_connection_window_bytes: 70_000,
            use_remote_address: false,
            xff_num_trusted_hops: 2,
        };
        let route = RouteOptions { request_body_limit_bytes: 1000, buffer_request_bodies: false, ..Default::default() };
        let h = hcm(&route, &edge);
        assert_eq!((&h["request_headers_timeout"], &h["request_timeout"]), (&json!("0s"), &json!("7s")));
        assert_eq!(h["stream_idle_timeout"], "0s");
        assert_eq!(h["max_request_headers_kb"], 8);
        assert_eq!(h["common_http_protocol_options"]["max_headers_count"], 20);
        assert_eq!(h["common_http_protocol_options"]["headers_with_underscores_action"], "DROP_HEADER");
        let h2 = &h["http2_protocol_options"];
        assert_eq!(
            (&h2["max_concurrent_streams"], &h2["initial_stream_window_size"], &h2["initial_connection_window_size"]),
            (&json!(5), &json!(65_535), &json!(70_000))
        );
        assert_eq!((&h["use_remote_address"], &h["xff_num_trusted_hops"]), (&json!(false), &json!(2)));
        assert_eq!(filter_names(&h["http_filters"])[0], REQUEST_FILTER_NAME);
        let buffered = hcm(&RouteOptions { request_body_limit_bytes: 1000, ..Default::default() }, &edge);
        assert_eq!(buffered["http_filters"][0]["typed_config"]["max_request_bytes"], 1000);
        assert_eq!(UnderscoreHeaders::Allow.envoy_action(), "ALLOW");
    }

    #[test]
    fn envoys_own_errors_are_openai_shaped() {
        let h = hcm(&RouteOptions::default(), &EdgeOptions::default());
        let mappers = h["local_reply_config"]["mappers"].as_array().unwrap();
        let flags = &mappers[0]["filter"]["response_flag_filter"]["flags"];
        assert!(flags.as_array().unwrap().contains(&json!("UF")));
        let statuses: Vec<&Value> = mappers[1]["filter"]["or_filter"]["filters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| &f["status_code_filter"]["comparison"]["value"]["default_value"])
            .collect();
        assert_eq!(statuses, [&json!(408), &json!(413)]);
        for m in mappers {
            assert_eq!(m["body_format_override"]["json_format"]["error"]["type"], "server_error");
        }
    }

    #[test]
    fn one_tag_regex_per_label() {
        let tags = stats_config()["stats_tags"].as_array().unwrap().clone();
        assert_eq!(tags.len(), metric::LABELS.len());
        assert_eq!(tags[0]["tag_name"], "backend");
        assert!(tags[0]["regex"].as_str().unwrap().contains(r"(\.backend\.([\w-]+))"));
    }
}
