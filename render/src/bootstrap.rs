//! A complete Envoy bootstrap for a filter JSON: one listener with the
//! request role, one cluster per backend with the attempt role, stats tags
//! for the metric labels, the admin interface (loopback unless asked), an
//! overload manager with a heap limit. Optionally the listener goes
//! to its own file that Envoy watches (LDS), so a new filter JSON applies
//! without a restart.

use crate::envoy::{self, EdgeOptions, RouteOptions};
use serde_json::{json, Value};
use spillway::config::Config;
use spillway::contract::Role;

#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    pub listen_address: String,
    pub listen_port: u16,
    pub admin_address: String,
    pub admin_port: u16,
    pub wasm_path: String,
    /// Access log lines on stdout.
    pub access_log: bool,
    /// Serve the listener from this file (LDS) instead of the bootstrap.
    pub lds_path: Option<String>,
    pub route: RouteOptions,
    pub edge: EdgeOptions,
    pub overload: OverloadOptions,
}

/// Envoy's overload manager: what Envoy does before it runs out of memory
/// or connections. 0 leaves a limit out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverloadOptions {
    /// Heap Envoy may use, in MiB: at 95 % it returns free memory to the
    /// system, at 98 % it answers new requests with 503 until it is below.
    pub max_heap_mb: u64,
    /// Client connections Envoy accepts at once (all listeners).
    pub max_connections: u64,
}

impl Default for OverloadOptions {
    fn default() -> Self {
        OverloadOptions { max_heap_mb: 1024, max_connections: 50_000 }
    }
}

const FIXED_HEAP: &str = "envoy.resource_monitors.fixed_heap";

/// The overload manager for `opts`, or `None` when both limits are off.
pub fn overload_manager(opts: &OverloadOptions) -> Option<Value> {
    let mut monitors = Vec::new();
    let mut actions = Vec::new();
    if opts.max_heap_mb > 0 {
        monitors.push(json!({
            "name": FIXED_HEAP,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                "max_heap_size_bytes": opts.max_heap_mb.saturating_mul(1024 * 1024),
            },
        }));
        let action = |name: &str, threshold: f64| json!({ "name": name, "triggers": [{ "name": FIXED_HEAP, "threshold": { "value": threshold } }] });
        actions.push(action("envoy.overload_actions.shrink_heap", 0.95));
        actions.push(action("envoy.overload_actions.stop_accepting_requests", 0.98));
    }
    if opts.max_connections > 0 {
        monitors.push(json!({
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": opts.max_connections,
            },
        }));
    }
    if monitors.is_empty() {
        return None;
    }
    Some(json!({ "refresh_interval": "0.25s", "resource_monitors": monitors, "actions": actions }))
}

/// Whether `address` (of the admin interface) is reachable only from this host.
pub fn is_loopback(address: &str) -> bool {
    address == "localhost" || address.parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false)
}

impl Default for BootstrapOptions {
    fn default() -> Self {
        BootstrapOptions {
            listen_address: "0.0.0.0".to_string(),
            listen_port: 10000,
            admin_address: "127.0.0.1".to_string(),
            admin_port: 9901,
            wasm_path: "/etc/envoy/spillway.wasm".to_string(),
            access_log: true,
            lds_path: None,
            route: RouteOptions::default(),
            edge: EdgeOptions::default(),
            overload: OverloadOptions::default(),
        }
    }
}

/// A bootstrap, and the listener discovery file when `lds_path` is set.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub bootstrap: Value,
    pub lds: Option<Value>,
}

pub fn render(config: &Config, filter_json: &str, opts: &BootstrapOptions) -> Rendered {
    let env_keys = envoy::env_keys(config);
    let plugin = |role| envoy::plugin(role, filter_json, &env_keys, envoy::local_code(&opts.wasm_path));
    let attempt_plugin = plugin(Role::Attempt);
    let mut clusters: Vec<Value> = config.backends.iter().map(|b| envoy::backend_cluster(b, &attempt_plugin)).collect();
    clusters.extend(envoy::rate_limit_cluster(config));
    let routes = envoy::routes(config, &opts.route);
    let hcm = envoy::http_connection_manager(routes, &plugin(Role::Request), opts.access_log, &opts.route, &opts.edge);
    let listener = envoy::listener(hcm, &opts.listen_address, opts.listen_port);
    let mut bootstrap = json!({
        "node": { "id": "spillway", "cluster": "spillway" },
        "stats_config": envoy::stats_config(),
        "admin": { "address": { "socket_address": { "address": opts.admin_address, "port_value": opts.admin_port } } },
        "static_resources": { "clusters": clusters },
    });
    if let (Some(overload), Some(obj)) = (overload_manager(&opts.overload), bootstrap.as_object_mut()) {
        obj.insert("overload_manager".into(), overload);
    }
    let Some(path) = &opts.lds_path else {
        if let Some(resources) = bootstrap.pointer_mut("/static_resources").and_then(Value::as_object_mut) {
            resources.insert("listeners".into(), json!([listener]));
        }
        return Rendered { bootstrap, lds: None };
    };
    // Listener from a watched file: re-render and move the new file in place
    // to change the request role's config without a restart.
    let dir = std::path::Path::new(path)
        .parent()
        .map(|d| d.to_string_lossy().into_owned())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| ".".to_string());
    if let Some(obj) = bootstrap.as_object_mut() {
        obj.insert(
            "dynamic_resources".into(),
            json!({ "lds_config": {
                "resource_api_version": "V3",
                "path_config_source": { "path": path, "watched_directory": { "path": dir } },
            } }),
        );
    }
    let mut listener = listener;
    if let Some(obj) = listener.as_object_mut() {
        obj.insert("@type".into(), json!("type.googleapis.com/envoy.config.listener.v3.Listener"));
    }
    Rendered { bootstrap, lds: Some(json!({ "resources": [listener] })) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy::tests::JSON;
    use spillway::config::Keys;

    fn rendered(opts: &BootstrapOptions) -> Rendered {
        let cfg = Config::parse(JSON.as_bytes(), Keys::NamesOnly).unwrap();
        render(&cfg, JSON, opts)
    }

    #[test]
    fn lds_mode_moves_the_listener_to_its_own_file() {
        let opts = BootstrapOptions { lds_path: Some("/run/spillway/lds.yaml".into()), ..Default::default() };
        let r = rendered(&opts);
        assert!(r.bootstrap["static_resources"].get("listeners").is_none());
        let source = &r.bootstrap["dynamic_resources"]["lds_config"]["path_config_source"];
        assert_eq!(source["path"], "/run/spillway/lds.yaml");
        assert_eq!(source["watched_directory"]["path"], "/run/spillway");
        let lds = r.lds.unwrap();
        assert_eq!(lds["resources"][0]["@type"], "type.googleapis.com/envoy.config.listener.v3.Listener");
    }

    #[test]
    fn every_backend_gets_a_cluster_and_the_listener_runs_the_request_role() {
        let json = JSON.replacen('{', r#"{"routing":"reactive","#, 1);
        let cfg = Config::parse(json.as_bytes(), Keys::NamesOnly).unwrap();
        let b = render(&cfg, &json, &BootstrapOptions::default()).bootstrap;
        let clusters = b["static_resources"]["clusters"].as_array().unwrap();
        let names: Vec<&str> = clusters.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["spillway_eastus", "spillway_local", "spillway_eastus2"]);
        let hcm = &b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
        // One route for every path: the request role itself reads the body
        // fields where the config needs them.
        let routes = hcm["route_config"]["virtual_hosts"][0]["routes"].as_array().unwrap();
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0]["match"]["prefix"], "/");
        // Envoy holds the body until complete, then the request role, then the router.
        let filters: Vec<&str> =
            hcm["http_filters"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
        assert_eq!(filters, ["spillway.buffer", "spillway.request", "envoy.filters.http.router"]);
        let request = &hcm["http_filters"][1]["typed_config"]["config"];
        assert_eq!(request["root_id"], "spillway_request");
        assert_eq!(request["vm_config"]["code"]["local"]["filename"], "/etc/envoy/spillway.wasm");
        assert!(hcm.get("access_log").is_some());
    }

    #[test]
    fn the_overload_manager_limits_heap_and_connections() {
        let b = rendered(&BootstrapOptions::default()).bootstrap;
        let om = &b["overload_manager"];
        assert_eq!(om["refresh_interval"], "0.25s");
        let heap = &om["resource_monitors"][0];
        assert_eq!(heap["name"], FIXED_HEAP);
        assert_eq!(heap["typed_config"]["max_heap_size_bytes"], 1024_u64 * 1024 * 1024);
        assert_eq!(om["resource_monitors"][1]["typed_config"]["max_active_downstream_connections"], 50_000);
        let actions: Vec<(&str, f64)> = om["actions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (a["name"].as_str().unwrap(), a["triggers"][0]["threshold"]["value"].as_f64().unwrap()))
            .collect();
        assert_eq!(
            actions,
            [("envoy.overload_actions.shrink_heap", 0.95), ("envoy.overload_actions.stop_accepting_requests", 0.98)]
        );
        for a in om["actions"].as_array().unwrap() {
            assert_eq!(a["triggers"][0]["name"], FIXED_HEAP);
        }
        // Each limit can be changed or left out; the LDS bootstrap has it too.
        let small = OverloadOptions { max_heap_mb: 64, max_connections: 0 };
        let om = overload_manager(&small).unwrap();
        assert_eq!(om["resource_monitors"].as_array().unwrap().len(), 1);
        assert_eq!(om["resource_monitors"][0]["typed_config"]["max_heap_size_bytes"], 64 * 1024 * 1024);
        let conns = overload_manager(&OverloadOptions { max_heap_mb: 0, max_connections: 10 }).unwrap();
        assert_eq!(conns["actions"], json!([]));
        assert!(overload_manager(&OverloadOptions { max_heap_mb: 0, max_connections: 0 }).is_none());
        let opts = BootstrapOptions {
            lds_path: Some("/x/l.yaml".into()),
            overload: OverloadOptions { max_heap_mb: 0, max_connections: 0 },
            ..Default::default()
        };
        assert!(rendered(&opts).bootstrap.get("overload_manager").is_none());
        let lds = BootstrapOptions { lds_path: Some("/x/l.yaml".into()), ..Default::default() };
        assert!(rendered(&lds).bootstrap.get("overload_manager").is_some());
    }

    #[test]
    fn admin_stays_on_loopback_by_default() {
        let b = rendered(&BootstrapOptions::default()).bootstrap;
        assert_eq!(b["admin"]["address"]["socket_address"]["address"], "127.0.0.1");
        for a in ["127.0.0.1", "127.0.0.2", "::1", "localhost"] {
            assert!(is_loopback(a), "{a}");
        }
        for a in ["0.0.0.0", "::", "10.0.0.1", "envoy.internal"] {
            assert!(!is_loopback(a), "{a}");
        }
    }

    #[test]
    fn key_env_vars_are_passed_to_the_vm_and_literal_keys_stay_in_the_config() {
        let text = rendered(&BootstrapOptions::default()).bootstrap.to_string();
        assert!(text.contains(r#""host_env_keys":["EASTUS_KEY","TEAM_KEY"]"#), "{text}");
        assert!(text.contains(r#"\"api_key\":\"k\""#), "{text}");
        // Keys by variable: the renderer never reads the variables, the
        // output names them only.
        let json = r#"{"backends":[{"name":"a","url":"https://a.example.com","api_key_env":"A_KEY"}]}"#;
        let cfg = Config::parse(json.as_bytes(), Keys::NamesOnly).unwrap();
        let text = render(&cfg, json, &BootstrapOptions::default()).bootstrap.to_string();
        assert!(!text.contains("api_key\\\":") && text.contains("A_KEY"), "{text}");
    }
}
