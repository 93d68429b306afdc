//! Renders a complete Envoy bootstrap from a filter JSON, so a user writes
//! only the filter JSON. The shape of the retry machinery lives here:
//!
//! * the route picks its cluster with the matcher cluster specifier on the
//!   `x-spillway-cluster` request header and re-evaluates it on every retry
//!   (`refresh_cluster_on_retry`);
//! * retries happen on connection failures and when the attempt role marks a
//!   response with `x-spillway-retry` (never on raw status codes, so the
//!   filter decides, e.g. it does not retry a 429 when no backend is left);
//! * every backend cluster runs the attempt role as an upstream HTTP filter.

use crate::config::{Backend, Config, Scheme};
use crate::gateway::header;
use serde_json::{json, Value};

pub const VM_ID: &str = "spillway";
pub const REQUEST_ROOT_ID: &str = "spillway_request";
pub const ATTEMPT_ROOT_ID: &str = "spillway_attempt";

#[derive(Debug, Clone)]
pub struct RenderOptions {
    pub listen_address: String,
    pub listen_port: u16,
    pub admin_address: String,
    pub admin_port: u16,
    pub wasm_path: String,
    /// Route timeout for a whole request, retries included; long because
    /// streamed completions can run for minutes.
    pub route_timeout_s: u64,
    /// Requests up to this size can be retried (Envoy buffers them).
    pub request_body_limit_bytes: u64,
    /// Access log lines on stdout.
    pub access_log: bool,
    /// Serve the listener from this file (LDS) instead of the bootstrap, so a
    /// new filter JSON can be applied without restarting Envoy.
    pub lds_path: Option<String>,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            listen_address: "0.0.0.0".to_string(),
            listen_port: 10000,
            admin_address: "127.0.0.1".to_string(),
            admin_port: 9901,
            wasm_path: "/etc/envoy/spillway.wasm".to_string(),
            route_timeout_s: 600,
            request_body_limit_bytes: 32 * 1024 * 1024,
            access_log: true,
            lds_path: None,
        }
    }
}

fn plugin(root_id: &str, filter_json: &str, env_keys: &[String], wasm_path: &str) -> Value {
    json!({
        "name": root_id,
        "root_id": root_id,
        "vm_config": {
            "vm_id": VM_ID,
            "runtime": "envoy.wasm.runtime.v8",
            "code": { "local": { "filename": wasm_path } },
            "environment_variables": { "host_env_keys": env_keys },
        },
        "configuration": {
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": filter_json,
        },
        // A broken VM must fail requests, not silently skip the key rewrite.
        "fail_open": false,
    })
}

fn cluster(b: &Backend, attempt_plugin: &Value) -> Value {
    let mut c = json!({
        "name": b.cluster,
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": b.cluster,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": {
                "address": { "socket_address": { "address": b.host, "port_value": b.port } },
                "hostname": b.host,
            } }] }],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": { "http_protocol_options": {} },
                "http_filters": [
                    {
                        "name": "spillway.attempt",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                            "config": attempt_plugin,
                        },
                    },
                    {
                        "name": "envoy.filters.http.upstream_codec",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec",
                        },
                    },
                ],
            },
        },
    });
    if b.scheme == Scheme::Https {
        if let Some(obj) = c.as_object_mut() {
            obj.insert(
                "transport_socket".to_string(),
                json!({
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                        "sni": b.host,
                        "common_tls_context": {
                            "validation_context": {
                                "trusted_ca": { "filename": "/etc/ssl/certs/ca-certificates.crt" },
                                "match_typed_subject_alt_names": [{
                                    "san_type": "DNS",
                                    "matcher": { "exact": b.host },
                                }],
                            },
                        },
                    },
                }),
            );
        }
    }
    c
}

fn cluster_action(cluster: &str) -> Value {
    json!({ "action": {
        "name": "cluster",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.router.cluster_specifiers.matcher.v3.ClusterAction",
            "cluster": cluster,
        },
    } })
}

/// The bootstrap (and listener file) as JSON values.
pub fn render(config: &Config, filter_json: &str, opts: &RenderOptions) -> Rendered {
    let mut env_keys: Vec<String> = Vec::new();
    for var in config
        .backends
        .iter()
        .filter_map(|b| b.api_key_env.clone())
        .chain(config.clients.iter().filter_map(|c| c.key_env.clone()))
    {
        // Envoy refuses a VM config that lists a variable twice.
        if !env_keys.contains(&var) {
            env_keys.push(var);
        }
    }
    let request_plugin = plugin(REQUEST_ROOT_ID, filter_json, &env_keys, &opts.wasm_path);
    let attempt_plugin = plugin(ATTEMPT_ROOT_ID, filter_json, &env_keys, &opts.wasm_path);
    let mut map = serde_json::Map::new();
    for b in &config.backends {
        map.insert(b.cluster.clone(), cluster_action(&b.cluster));
    }
    let num_retries = config.backends.len().saturating_sub(1).max(1);
    let per_try_timeout = config.attempt_timeout_s.map(|s| format!("{s}s"));
    let mut hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "spillway",
        "codec_type": "AUTO",
        // Streams can be quiet while a model thinks.
        "stream_idle_timeout": "600s",
        "route_config": {
            "name": "spillway",
            "virtual_hosts": [{
                "name": "spillway",
                "domains": ["*"],
                "routes": [{
                    "match": { "prefix": "/" },
                    // Envoy can only retry a request whose body it still holds.
                    "request_body_buffer_limit": opts.request_body_limit_bytes,
                    "route": {
                        "inline_cluster_specifier_plugin": { "extension": {
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
                        } },
                        "timeout": format!("{}s", opts.route_timeout_s),
                        "retry_policy": {
                            "retry_on": "reset,connect-failure,refused-stream,retriable-headers",
                            "num_retries": num_retries,
                            "retriable_headers": [{ "name": header::RETRY, "present_match": true }],
                            "refresh_cluster_on_retry": true,
                            // Only until the answer starts: a stream may run longer.
                            "per_try_timeout": per_try_timeout.clone(),
                            // Failover goes to another region: no reason to wait.
                            "retry_back_off": { "base_interval": "0.001s", "max_interval": "0.002s" },
                        },
                    },
                }],
            }],
        },
        // Envoy's own error answers (no backend reachable, timeouts) in the
        // OpenAI error shape clients already parse.
        "local_reply_config": { "mappers": [{
            "filter": { "response_flag_filter": { "flags": ["UF", "URX", "UH", "UO", "UT", "UC", "UR", "UMSDR", "NR"] } },
            "body_format_override": {
                "json_format": { "error": {
                    "message": "%LOCAL_REPLY_BODY%",
                    "type": "server_error",
                    "code": "%RESPONSE_CODE%",
                    "param": null,
                } },
                "content_type": "application/json",
            },
        }] },
        "http_filters": [
            {
                "name": "spillway.request",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                    "config": request_plugin,
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" },
            },
        ],
    });
    if per_try_timeout.is_none() {
        let policy = hcm.pointer_mut("/route_config/virtual_hosts/0/routes/0/route/retry_policy");
        if let Some(Value::Object(policy)) = policy {
            policy.remove("per_try_timeout");
        }
    }
    if opts.access_log {
        if let Some(obj) = hcm.as_object_mut() {
            obj.insert(
                "access_log".to_string(),
                json!([{
                    "name": "envoy.access_loggers.stdout",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                        "log_format": { "text_format_source": { "inline_string":
                            "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%\" %RESPONSE_CODE% %RESPONSE_FLAGS% attempts=%UPSTREAM_REQUEST_ATTEMPT_COUNT% cluster=%UPSTREAM_CLUSTER% %DURATION%ms\n"
                        } },
                    },
                }]),
            );
        }
    }
    let attempt_plugin_ref = &attempt_plugin;
    let clusters: Vec<Value> = config.backends.iter().map(|b| cluster(b, attempt_plugin_ref)).collect();
    let listener = json!({
        "name": "spillway",
        "address": { "socket_address": { "address": opts.listen_address, "port_value": opts.listen_port } },
        "per_connection_buffer_limit_bytes": 1_048_576,
        "filter_chains": [{ "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": hcm,
        }] }],
    });
    let stats_config = json!({
        "stats_tags": crate::metrics::stats_tags()
            .into_iter()
            .map(|(tag, regex)| json!({ "tag_name": tag, "regex": regex }))
            .collect::<Vec<_>>(),
    });
    let admin =
        json!({ "address": { "socket_address": { "address": opts.admin_address, "port_value": opts.admin_port } } });
    match &opts.lds_path {
        None => Rendered {
            bootstrap: json!({
                "node": { "id": "spillway", "cluster": "spillway" },
                "stats_config": stats_config,
                "admin": admin,
                "static_resources": { "listeners": [listener], "clusters": clusters },
            }),
            lds: None,
        },
        Some(path) => {
            // Listener from a watched file: re-render and move the new file in
            // place to change the request role's config without a restart.
            let dir = std::path::Path::new(path)
                .parent()
                .map(|d| d.to_string_lossy().into_owned())
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| ".".to_string());
            let mut listener = listener;
            if let Some(obj) = listener.as_object_mut() {
                obj.insert("@type".to_string(), json!("type.googleapis.com/envoy.config.listener.v3.Listener"));
            }
            Rendered {
                bootstrap: json!({
                    "node": { "id": "spillway", "cluster": "spillway" },
                    "stats_config": stats_config,
                    "admin": admin,
                    "static_resources": { "clusters": clusters },
                    "dynamic_resources": { "lds_config": {
                        "resource_api_version": "V3",
                        "path_config_source": { "path": path, "watched_directory": { "path": dir } },
                    } },
                }),
                lds: Some(json!({ "resources": [listener] })),
            }
        }
    }
}

/// A bootstrap, and the listener discovery file when `lds_path` is set.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub bootstrap: Value,
    pub lds: Option<Value>,
}

/// YAML for a JSON value: block style, strings always double-quoted (JSON
/// string syntax is valid YAML), so no value can change type on the way.
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    write_yaml(value, 0, &mut out);
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => Value::String(s.clone()).to_string(),
        Value::Array(a) if a.is_empty() => "[]".to_string(),
        Value::Object(o) if o.is_empty() => "{}".to_string(),
        other => other.to_string(),
    }
}

fn is_block(v: &Value) -> bool {
    match v {
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => false,
    }
}

fn write_yaml(value: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let key = Value::String(k.clone()).to_string();
                if is_block(v) {
                    out.push_str(&format!("{pad}{key}:\n"));
                    write_yaml(v, indent + 2, out);
                } else {
                    out.push_str(&format!("{pad}{key}: {}\n", scalar(v)));
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                if is_block(item) {
                    // First line of the item shares the dash.
                    let mut inner = String::new();
                    write_yaml(item, indent + 2, &mut inner);
                    let trimmed = inner.get(indent + 2..).unwrap_or("");
                    out.push_str(&format!("{pad}- {trimmed}"));
                } else {
                    out.push_str(&format!("{pad}- {}\n", scalar(item)));
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Keys;

    const JSON: &str = r#"{"backends":[
        {"name":"eastus","url":"https://eastus.openai.azure.com","api_key_env":"EASTUS_KEY"},
        {"name":"local","url":"http://127.0.0.1:8001","api_key":"k","priority":2},
        {"name":"eastus2","url":"https://eastus.openai.azure.com","api_key_env":"EASTUS_KEY","priority":3}],
        "clients":[{"name":"team","key_env":"TEAM_KEY"}]}"#;

    fn render_default() -> Value {
        let cfg = Config::parse(JSON.as_bytes(), Keys::NamesOnly).unwrap();
        render(&cfg, JSON, &RenderOptions::default()).bootstrap
    }

    #[test]
    fn lds_mode_moves_the_listener_to_its_own_file() {
        let cfg = Config::parse(JSON.as_bytes(), Keys::NamesOnly).unwrap();
        let opts = RenderOptions { lds_path: Some("/run/spillway/lds.yaml".into()), ..Default::default() };
        let r = render(&cfg, JSON, &opts);
        assert!(r.bootstrap["static_resources"].get("listeners").is_none());
        let source = &r.bootstrap["dynamic_resources"]["lds_config"]["path_config_source"];
        assert_eq!(source["path"], "/run/spillway/lds.yaml");
        assert_eq!(source["watched_directory"]["path"], "/run/spillway");
        let lds = r.lds.unwrap();
        assert_eq!(lds["resources"][0]["@type"], "type.googleapis.com/envoy.config.listener.v3.Listener");
    }

    #[test]
    fn every_backend_gets_a_cluster_and_a_matcher_entry() {
        let b = render_default();
        let clusters = b["static_resources"]["clusters"].as_array().unwrap();
        let names: Vec<&str> = clusters.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["spillway_eastus", "spillway_local", "spillway_eastus2"]);
        let route = &b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["route_config"]["virtual_hosts"][0]["routes"][0]["route"];
        let map = &route["inline_cluster_specifier_plugin"]["extension"]["typed_config"]["cluster_matcher"]
            ["matcher_tree"]["exact_match_map"]["map"];
        assert_eq!(map["spillway_local"]["action"]["typed_config"]["cluster"], "spillway_local");
        assert_eq!(route["retry_policy"]["num_retries"], 2);
        assert_eq!(route["retry_policy"]["refresh_cluster_on_retry"], true);
        assert!(route["retry_policy"].get("per_try_timeout").is_none());
    }

    #[test]
    fn https_backends_get_tls_with_sni_and_http_ones_do_not() {
        let b = render_default();
        let clusters = b["static_resources"]["clusters"].as_array().unwrap();
        assert_eq!(clusters[0]["transport_socket"]["typed_config"]["sni"], "eastus.openai.azure.com");
        assert_eq!(
            clusters[0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
                ["port_value"],
            443
        );
        assert!(clusters[1].get("transport_socket").is_none());
    }

    #[test]
    fn key_env_vars_are_passed_to_the_vm_and_literal_keys_stay_in_the_config() {
        let b = render_default();
        let text = b.to_string();
        assert!(text.contains(r#""host_env_keys":["EASTUS_KEY","TEAM_KEY"]"#), "{text}");
    }

    #[test]
    fn yaml_quotes_strings_and_nests_lists() {
        let v = json!({"a": [{"b": 1, "c": "x: y"}, 2], "d": {}, "e": "true"});
        assert_eq!(to_yaml(&v), "\"a\":\n  - \"b\": 1\n    \"c\": \"x: y\"\n  - 2\n\"d\": {}\n\"e\": \"true\"\n");
    }
}
