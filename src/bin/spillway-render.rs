//! `spillway-render FILTER.json [options]`: prints a complete Envoy bootstrap
//! (YAML) for the filter JSON. Run with `--help` for the options.

use spillway::config::{Config, Keys};
use spillway::render::{render, to_yaml, RenderOptions};
use std::process::ExitCode;

const USAGE: &str = "usage: spillway-render FILTER.json [--wasm PATH] [--listen ADDR:PORT] [--admin ADDR:PORT]
                       [--route-timeout-s N] [--body-limit-bytes N] [--no-access-log] [--output FILE]
                       [--lds FILE]

Renders an Envoy bootstrap (listener, route with retry policy, one cluster per backend,
both Spillway filter roles) for the filter JSON and prints it as YAML.
With --lds FILE the listener (and so the request role's config) is written to FILE, which
Envoy watches: render again and the new config applies without a restart; a config the
filter rejects is refused by Envoy, which keeps serving the previous one.
Defaults: --wasm /etc/envoy/spillway.wasm --listen 0.0.0.0:10000 --admin 127.0.0.1:9901";

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
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            "--wasm" => opts.wasm_path = value("--wasm")?,
            "--listen" => (opts.listen_address, opts.listen_port) = split_addr(&value("--listen")?)?,
            "--admin" => (opts.admin_address, opts.admin_port) = split_addr(&value("--admin")?)?,
            "--route-timeout-s" => {
                opts.route_timeout_s = value("--route-timeout-s")?.parse().map_err(|_| "--route-timeout-s: not a number")?
            }
            "--body-limit-bytes" => {
                opts.request_body_limit_bytes =
                    value("--body-limit-bytes")?.parse().map_err(|_| "--body-limit-bytes: not a number")?
            }
            "--no-access-log" => opts.access_log = false,
            "--lds" => opts.lds_path = Some(value("--lds")?),
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
    let compact = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| format!("{input}: {e}"))?
        .to_string();
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
