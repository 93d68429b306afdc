//! A complete Envoy bootstrap for a filter JSON: one listener with the
//! request role, one cluster per backend with the attempt role, stats tags
//! for the metric labels, the admin interface. Optionally the listener goes
//! to its own file that Envoy watches (LDS), so a new filter JSON applies
//! without a restart.

use crate::envoy::{self, RouteOptions};
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
    let plugin =
        |role| envoy::plugin(role, filter_json, &env_keys, envoy::local_code(&opts.wasm_path), envoy::default_vm_id());
    let attempt_plugin = plugin(Role::Attempt);
    let clusters: Vec<Value> = config.backends.iter().map(|b| envoy::backend_cluster(b, &attempt_plugin)).collect();
    let mut route = envoy::route_action(config, &opts.route);
    if let Some(obj) = route.as_object_mut() {
        obj.insert("match".into(), json!({ "prefix": "/" }));
    }
    let hcm = envoy::http_connection_manager(route, &plugin(Role::Request), opts.access_log);
    let listener = envoy::listener(hcm, &opts.listen_address, opts.listen_port);
    let mut bootstrap = json!({
        "node": { "id": "spillway", "cluster": "spillway" },
        "stats_config": envoy::stats_config(),
        "admin": { "address": { "socket_address": { "address": opts.admin_address, "port_value": opts.admin_port } } },
        "static_resources": { "clusters": clusters },
    });
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
        let b = rendered(&BootstrapOptions::default()).bootstrap;
        let clusters = b["static_resources"]["clusters"].as_array().unwrap();
        let names: Vec<&str> = clusters.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["spillway_eastus", "spillway_local", "spillway_eastus2"]);
        let hcm = &b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
        let route = &hcm["route_config"]["virtual_hosts"][0]["routes"][0];
        assert_eq!(route["match"]["prefix"], "/");
        // Envoy reads the body's fields first, then the request role, then the router.
        let filters: Vec<&str> =
            hcm["http_filters"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
        assert_eq!(filters, ["spillway.body_fields", "spillway.request", "envoy.filters.http.router"]);
        let request = &hcm["http_filters"][1]["typed_config"]["config"];
        assert_eq!(request["root_id"], "spillway_request");
        assert_eq!(request["vm_config"]["code"]["local"]["filename"], "/etc/envoy/spillway.wasm");
        assert!(hcm.get("access_log").is_some());
    }

    #[test]
    fn key_env_vars_are_passed_to_the_vm_and_literal_keys_stay_in_the_config() {
        let text = rendered(&BootstrapOptions::default()).bootstrap.to_string();
        assert!(text.contains(r#""host_env_keys":["EASTUS_KEY","TEAM_KEY"]"#), "{text}");
    }
}
