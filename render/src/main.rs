//! `spillway-render FILTER.json [options]`: a complete Envoy bootstrap
//! (YAML) for a filter JSON, or with `--istio` the Istio manifests.

mod bootstrap;
mod envoy;
mod istio;
mod yaml;

use bootstrap::{BootstrapOptions, Rendered};
use clap::{Args, Parser};
use envoy::RouteOptions;
use istio::IstioOptions;
use spillway::config::{Config, Keys};
use std::path::PathBuf;
use std::process::ExitCode;

/// Renders an Envoy bootstrap (listener, route with retry policy, one cluster
/// per backend, both Spillway filter roles) for a filter JSON, as YAML.
///
/// With --lds FILE the listener (and so the request role's config) is written
/// to FILE, which Envoy watches: render again and the new config applies
/// without a restart; a config the filter rejects is refused by Envoy, which
/// keeps serving the previous one.
///
/// With --istio it writes Istio manifests instead (see istio/README.md): a
/// WasmPlugin for the request role, an EnvoyFilter adding the spillway_<name>
/// clusters (attempt role as an upstream filter, code fetched by Envoy from
/// --wasm-url or --attempt-wasm-url, checked with --wasm-sha256) and patching
/// the VirtualService route `spillway`, that VirtualService, and a
/// ServiceEntry + DestinationRule per https host.
#[derive(Debug, Parser)]
#[command(name = "spillway-render", version, args_override_self = true)]
struct Cli {
    /// The filter JSON.
    #[arg(value_name = "FILTER.json")]
    filter: PathBuf,

    /// Write the output here instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,

    /// Timeout of a whole request, retries included, in seconds.
    #[arg(long, value_name = "N", default_value_t = RouteOptions::default().timeout_s)]
    route_timeout_s: u64,

    /// Requests up to this size can be retried (Envoy buffers them).
    #[arg(long, value_name = "N", default_value_t = RouteOptions::default().request_body_limit_bytes)]
    body_limit_bytes: u64,

    /// Write Istio manifests instead of an Envoy bootstrap.
    #[arg(long)]
    istio: bool,

    #[command(flatten, next_help_heading = "Envoy bootstrap options")]
    bootstrap: BootstrapArgs,

    #[command(flatten, next_help_heading = "Istio options (with --istio)")]
    istio_args: IstioArgs,
}

/// Options of the Envoy bootstrap; none of them applies with --istio.
#[derive(Debug, Args)]
#[group(id = "bootstrap_options", multiple = true, conflicts_with = "istio")]
struct BootstrapArgs {
    /// Path of spillway.wasm as Envoy sees it.
    #[arg(long, value_name = "PATH", default_value = "/etc/envoy/spillway.wasm")]
    wasm: String,

    /// Address the listener serves clients on.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:10000", value_parser = parse_addr)]
    listen: (String, u16),

    /// Address of Envoy's admin interface.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9901", value_parser = parse_addr)]
    admin: (String, u16),

    /// No access log lines on stdout.
    #[arg(long)]
    no_access_log: bool,

    /// Serve the listener from FILE (watched by Envoy) instead of the bootstrap.
    #[arg(long, value_name = "FILE")]
    lds: Option<String>,
}

/// Options of the Istio manifests; each needs --istio.
#[derive(Debug, Args)]
#[group(id = "istio_options", multiple = true, requires = "istio")]
struct IstioArgs {
    /// Namespace of the gateway workload.
    #[arg(long, value_name = "NS")]
    namespace: Option<String>,

    /// Where Istio pulls the module: oci://..., https://... or file://...
    #[arg(long, value_name = "URL")]
    wasm_url: Option<String>,

    /// sha256 of spillway.wasm (64 hex digits).
    #[arg(long, value_name = "HEX")]
    wasm_sha256: Option<String>,

    /// Where Envoy fetches the module for the attempt role when --wasm-url is
    /// an OCI image: https://... or file:///PATH mounted into the proxy.
    #[arg(long, value_name = "URL")]
    attempt_wasm_url: Option<String>,

    /// Labels selecting the gateway pods: KEY=VALUE[,KEY=VALUE].
    #[arg(long, value_name = "KEY=VALUE,...", value_parser = parse_labels)]
    workload_selector: Option<Labels>,

    /// Gateway the VirtualService binds to: [NAMESPACE/]NAME.
    #[arg(long, value_name = "NAME", default_value = "spillway-gateway")]
    gateway: String,

    /// Host clients call (repeat for several). Default: '*'.
    #[arg(long = "host", value_name = "HOST")]
    hosts: Vec<String>,
}

/// Label pairs (one value for clap, which reads a bare `Vec` as repeated values).
#[derive(Debug, Clone)]
struct Labels(Vec<(String, String)>);

fn parse_labels(v: &str) -> Result<Labels, String> {
    istio::parse_selector(v).map(Labels)
}

fn parse_addr(v: &str) -> Result<(String, u16), String> {
    let (host, port) = v.rsplit_once(':').ok_or_else(|| format!("{v}: expected ADDR:PORT"))?;
    let port = port.parse().map_err(|_| format!("{v}: bad port"))?;
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), port))
}

impl Cli {
    fn route(&self) -> RouteOptions {
        RouteOptions { timeout_s: self.route_timeout_s, request_body_limit_bytes: self.body_limit_bytes }
    }

    fn bootstrap_options(&self) -> BootstrapOptions {
        let b = &self.bootstrap;
        BootstrapOptions {
            listen_address: b.listen.0.clone(),
            listen_port: b.listen.1,
            admin_address: b.admin.0.clone(),
            admin_port: b.admin.1,
            wasm_path: b.wasm.clone(),
            access_log: !b.no_access_log,
            lds_path: b.lds.clone(),
            route: self.route(),
        }
    }

    fn istio_options(&self) -> Result<IstioOptions, String> {
        let a = &self.istio_args;
        let wasm_url = a.wasm_url.clone().ok_or("--istio needs --wasm-url")?;
        Ok(IstioOptions {
            namespace: a.namespace.clone().unwrap_or_default(),
            wasm_url,
            wasm_sha256: a.wasm_sha256.as_ref().map(|s| s.to_ascii_lowercase()),
            attempt_wasm_url: a.attempt_wasm_url.clone(),
            workload_selector: a.workload_selector.clone().map(|l| l.0).unwrap_or_default(),
            gateway: a.gateway.clone(),
            hosts: if a.hosts.is_empty() { vec!["*".to_string()] } else { a.hosts.clone() },
            route: self.route(),
        })
    }
}

/// The filter JSON, checked as the filter would (key variables by name
/// only), and compacted: one line in the output, same meaning.
fn read_filter(path: &PathBuf) -> Result<(Config, String), String> {
    let name = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{name}: {e}"))?;
    let config = Config::parse(text.as_bytes(), Keys::NamesOnly).map_err(|e| format!("{name}: {e}"))?;
    let compact = serde_json::from_str::<serde_json::Value>(&text).map_err(|e| format!("{name}: {e}"))?.to_string();
    Ok((config, compact))
}

fn write_output(output: Option<&PathBuf>, text: &str) -> Result<(), String> {
    match output {
        Some(path) => std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display())),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

fn render_istio(cli: &Cli, config: &Config, filter_json: &str) -> Result<String, String> {
    let docs = istio::render_istio(config, filter_json, &cli.istio_options()?)?;
    let vars = istio::env_vars(&docs);
    let mut yaml = format!(
        "# Rendered by spillway-render --istio from {}; edit the filter JSON and render again.\n",
        cli.filter.display()
    );
    if !vars.is_empty() {
        yaml.push_str(&format!(
            "# The istio-proxy container of the selected pods needs these environment variables\n\
             # (e.g. valueFrom.secretKeyRef): {}\n",
            vars.join(", ")
        ));
    }
    yaml.push_str(&istio::to_multi_yaml(&docs));
    Ok(yaml)
}

fn render_bootstrap(cli: &Cli, config: &Config, filter_json: &str) -> Result<String, String> {
    let opts = cli.bootstrap_options();
    let Rendered { bootstrap, lds } = bootstrap::render(config, filter_json, &opts);
    let header = format!(
        "# Rendered by spillway-render from {}; edit the filter JSON and render again.\n",
        cli.filter.display()
    );
    if let (Some(path), Some(lds)) = (&opts.lds_path, &lds) {
        // Write next to the target and rename: Envoy must never read half a file.
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, format!("{header}{}", yaml::to_yaml(lds))).map_err(|e| format!("{tmp}: {e}"))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(format!("{header}{}", yaml::to_yaml(&bootstrap)))
}

fn run(cli: &Cli) -> Result<(), String> {
    let (config, filter_json) = read_filter(&cli.filter)?;
    let text = if cli.istio {
        render_istio(cli, &config, &filter_json)?
    } else {
        render_bootstrap(cli, &config, &filter_json)?
    };
    write_output(cli.output.as_ref(), &text)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spillway-render: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("spillway-render").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bootstrap_defaults_and_options() {
        let cli = parse(&["f.json"]).unwrap();
        let o = cli.bootstrap_options();
        assert_eq!((o.listen_address.as_str(), o.listen_port), ("0.0.0.0", 10000));
        assert_eq!((o.admin_address.as_str(), o.admin_port), ("127.0.0.1", 9901));
        assert_eq!(o.route, RouteOptions::default());
        assert!(o.access_log && o.lds_path.is_none());
        let cli = parse(&["f.json", "--listen", "[::1]:8080", "--no-access-log", "--route-timeout-s", "5"]).unwrap();
        let o = cli.bootstrap_options();
        assert_eq!((o.listen_address.as_str(), o.listen_port, o.access_log), ("::1", 8080, false));
        assert_eq!(o.route.timeout_s, 5);
        assert!(parse(&["f.json", "--listen", "nope"]).is_err());
        // As with most tools, a repeated option's last value wins (scripts append overrides).
        assert_eq!(parse(&["f.json", "--wasm", "/a.wasm", "--wasm", "/b.wasm"]).unwrap().bootstrap.wasm, "/b.wasm");
    }

    #[test]
    fn option_groups_exclude_each_other() {
        let e = parse(&["f.json", "--namespace", "n"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(e.to_string().contains("--istio"), "{e}");
        let e = parse(&["f.json", "--istio", "--lds", "/tmp/x"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        assert!(e.to_string().contains("--lds"), "{e}");
        let cli = parse(&[
            "f.json",
            "--istio",
            "--wasm-url",
            "https://h/s.wasm",
            "--workload-selector",
            "app=gw,istio=ingress",
            "--host",
            "a",
            "--host",
            "b",
        ])
        .unwrap();
        let o = cli.istio_options().unwrap();
        assert_eq!(o.hosts, ["a", "b"]);
        assert_eq!(o.workload_selector.len(), 2);
        assert_eq!(o.gateway, "spillway-gateway");
        assert!(parse(&["f.json", "--istio"]).unwrap().istio_options().unwrap_err().contains("--wasm-url"));
    }
}
