//! `spillway-render FILTER.json [options]`: prints a complete Envoy bootstrap
//! (YAML) for the filter JSON. Run with `--help` for the options.

use spillway::config::{Config, Keys};
use spillway::istio::{env_vars, parse_selector, render_istio, to_multi_yaml, IstioOptions};
use spillway::render::{render, to_yaml, RenderOptions};
use std::process::ExitCode;

const USAGE: &str = "usage: spillway-render FILTER.json [--wasm PATH] [--listen ADDR:PORT] [--admin ADDR:PORT]
                       [--route-timeout-s N] [--body-limit-bytes N] [--no-access-log] [--output FILE]
                       [--lds FILE]
       spillway-render FILTER.json --istio --namespace NS --wasm-url oci://...|https://...
                       --workload-selector KEY=VALUE[,KEY=VALUE] [--wasm-sha256 HEX]
                       [--attempt-wasm-url https://...|file:///PATH] [--gateway [NS/]NAME]
                       [--host HOST]... [--route-timeout-s N] [--body-limit-bytes N] [--output FILE]

Renders an Envoy bootstrap (listener, route with retry policy, one cluster per backend,
both Spillway filter roles) for the filter JSON and prints it as YAML.
With --lds FILE the listener (and so the request role's config) is written to FILE, which
Envoy watches: render again and the new config applies without a restart; a config the
filter rejects is refused by Envoy, which keeps serving the previous one.
Defaults: --wasm /etc/envoy/spillway.wasm --listen 0.0.0.0:10000 --admin 127.0.0.1:9901

With --istio it writes Istio manifests instead (see istio/README.md): a WasmPlugin for the
request role, an EnvoyFilter adding the spillway_<name> clusters (attempt role as an upstream
filter, code fetched by Envoy from --wasm-url or --attempt-wasm-url, checked with
--wasm-sha256) and patching the VirtualService route `spillway` (cluster matcher, retry
policy), that VirtualService, and a ServiceEntry + DestinationRule per https host.
Istio defaults: --gateway spillway-gateway --host '*'";

fn split_addr(v: &str) -> Result<(String, u16), String> {
    let (host, port) = v.rsplit_once(':').ok_or_else(|| format!("{v}: expected ADDR:PORT"))?;
    let port = port.parse().map_err(|_| format!("{v}: bad port"))?;
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), port))
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut opts = RenderOptions::default();
    let mut input: Option<String> = None;
    let mut output: Option<String> = None;
    let mut istio = false;
    let mut istio_opts = IstioOptions {
        namespace: String::new(),
        wasm_url: String::new(),
        wasm_sha256: None,
        attempt_wasm_url: None,
        workload_selector: Vec::new(),
        gateway: "spillway-gateway".to_string(),
        hosts: Vec::new(),
    };
    // Istio-only options given without --istio are an error, not ignored.
    let mut istio_only: Vec<String> = Vec::new();
    // And bootstrap-only ones with --istio.
    let mut bootstrap_only: Vec<String> = Vec::new();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            "--wasm" => {
                bootstrap_only.push(arg.clone());
                opts.wasm_path = value("--wasm")?
            }
            "--listen" => {
                bootstrap_only.push(arg.clone());
                (opts.listen_address, opts.listen_port) = split_addr(&value("--listen")?)?
            }
            "--admin" => {
                bootstrap_only.push(arg.clone());
                (opts.admin_address, opts.admin_port) = split_addr(&value("--admin")?)?
            }
            "--istio" => istio = true,
            "--namespace" => {
                istio_only.push(arg.clone());
                istio_opts.namespace = value("--namespace")?
            }
            "--wasm-url" => {
                istio_only.push(arg.clone());
                istio_opts.wasm_url = value("--wasm-url")?
            }
            "--wasm-sha256" => {
                istio_only.push(arg.clone());
                istio_opts.wasm_sha256 = Some(value("--wasm-sha256")?.to_ascii_lowercase())
            }
            "--attempt-wasm-url" => {
                istio_only.push(arg.clone());
                istio_opts.attempt_wasm_url = Some(value("--attempt-wasm-url")?)
            }
            "--workload-selector" => {
                istio_only.push(arg.clone());
                istio_opts.workload_selector = parse_selector(&value("--workload-selector")?)?
            }
            "--gateway" => {
                istio_only.push(arg.clone());
                istio_opts.gateway = value("--gateway")?
            }
            "--host" => {
                istio_only.push(arg.clone());
                istio_opts.hosts.push(value("--host")?)
            }
            "--route-timeout-s" => {
                opts.route_timeout_s =
                    value("--route-timeout-s")?.parse().map_err(|_| "--route-timeout-s: not a number")?
            }
            "--body-limit-bytes" => {
                opts.request_body_limit_bytes =
                    value("--body-limit-bytes")?.parse().map_err(|_| "--body-limit-bytes: not a number")?
            }
            "--no-access-log" => {
                bootstrap_only.push(arg.clone());
                opts.access_log = false
            }
            "--lds" => {
                bootstrap_only.push(arg.clone());
                opts.lds_path = Some(value("--lds")?)
            }
            "--output" | "-o" => output = Some(value("--output")?),
            other if other.starts_with('-') => return Err(format!("unknown option {other}\n{USAGE}")),
            other if input.is_none() => input = Some(other.to_string()),
            other => return Err(format!("unexpected argument {other}\n{USAGE}")),
        }
    }
    let input = input.ok_or_else(|| USAGE.to_string())?;
    let text = std::fs::read_to_string(&input).map_err(|e| format!("{input}: {e}"))?;
    let config = Config::parse(text.as_bytes(), Keys::NamesOnly).map_err(|e| format!("{input}: {e}"))?;
    // The filter gets the JSON compacted: one line in the bootstrap, same meaning.
    let compact = serde_json::from_str::<serde_json::Value>(&text).map_err(|e| format!("{input}: {e}"))?.to_string();
    if istio {
        if let Some(flag) = bootstrap_only.first() {
            return Err(format!("{flag} does not apply with --istio\n{USAGE}"));
        }
        if istio_opts.wasm_url.is_empty() {
            return Err(format!("--istio needs --wasm-url\n{USAGE}"));
        }
        if istio_opts.hosts.is_empty() {
            istio_opts.hosts.push("*".to_string());
        }
        let docs = render_istio(&config, &compact, &istio_opts, &opts)?;
        let vars = env_vars(&docs);
        let mut yaml =
            format!("# Rendered by spillway-render --istio from {input}; edit the filter JSON and render again.\n");
        if !vars.is_empty() {
            yaml.push_str(&format!(
                "# The istio-proxy container of the selected pods needs these environment variables\n\
                 # (e.g. valueFrom.secretKeyRef): {}\n",
                vars.join(", ")
            ));
        }
        yaml.push_str(&to_multi_yaml(&docs));
        return match output {
            Some(path) => std::fs::write(&path, yaml).map_err(|e| format!("{path}: {e}")),
            None => {
                print!("{yaml}");
                Ok(())
            }
        };
    }
    if let Some(flag) = istio_only.first() {
        return Err(format!("{flag} needs --istio\n{USAGE}"));
    }
    let rendered = render(&config, &compact, &opts);
    let header = format!("# Rendered by spillway-render from {input}; edit the filter JSON and render again.\n");
    if let (Some(path), Some(lds)) = (&opts.lds_path, &rendered.lds) {
        // Write next to the target and rename: Envoy must never read half a file.
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, format!("{header}{}", to_yaml(lds))).map_err(|e| format!("{tmp}: {e}"))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("{path}: {e}"))?;
    }
    let yaml = format!("{header}{}", to_yaml(&rendered.bootstrap));
    match output {
        Some(path) => std::fs::write(&path, yaml).map_err(|e| format!("{path}: {e}")),
        None => {
            print!("{yaml}");
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spillway-render: {e}");
            ExitCode::from(2)
        }
    }
}
