//! `spillway-render FILTER.json [options]`: a complete Envoy bootstrap
//! (YAML) for a filter JSON, or with `--istio` the Istio manifests.

mod bootstrap;
mod envoy;
mod istio;
mod yaml;

use bootstrap::{BootstrapOptions, OverloadOptions, Rendered};
use clap::{Args, Parser};
use envoy::{EdgeOptions, RouteOptions, UnderscoreHeaders};
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
/// With --istio it writes Istio manifests instead (see istio/README.md): an
/// EnvoyFilter adding Spillway's HTTP filters to the gateway (off except on
/// the VirtualService routes `spillway` and `spillway-realtime`, which it
/// patches), the
/// spillway_<name> clusters with the attempt role, code fetched by Envoy from
/// --wasm-url and checked with --wasm-sha256; that VirtualService, and a
/// ServiceEntry + DestinationRule per https host.
///
/// A key written into the filter JSON (api_key, key) ends up in the output
/// and in Envoy's /config_dump: the renderer warns about each one; use
/// api_key_env / key_env.
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

    /// Largest request body, in bytes: Envoy holds request bodies up to this
    /// size until complete (larger: 413) and can retry them on another backend.
    #[arg(long, value_name = "N", default_value_t = RouteOptions::default().request_body_limit_bytes,
          value_parser = clap::value_parser!(u64).range(1..=u64::from(u32::MAX)))]
    body_limit_bytes: u64,

    /// Pass request bodies that are not JSON (multipart uploads) to the backend
    /// as they arrive instead of holding them until complete: bodies over
    /// --body-limit-bytes then pass (without failover), but a slow uploader
    /// holds a backend connection for up to --request-timeout-s.
    #[arg(long)]
    stream_request_bodies: bool,

    /// Write Istio manifests instead of an Envoy bootstrap.
    #[arg(long)]
    istio: bool,

    #[command(flatten, next_help_heading = "Envoy bootstrap options")]
    bootstrap: BootstrapArgs,

    #[command(flatten, next_help_heading = "Client-facing listener options (Envoy bootstrap)")]
    edge: EdgeArgs,

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

    /// Address of Envoy's admin interface. Keep it on loopback: it shows the
    /// whole config (/config_dump) and can stop Envoy.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9901", value_parser = parse_addr)]
    admin: (String, u16),

    /// Heap Envoy may use, in MiB (overload manager): at 95 % it returns free
    /// memory to the system, at 98 % it answers new requests 503. 0 = no limit.
    #[arg(long, value_name = "MIB", default_value_t = OverloadOptions::default().max_heap_mb)]
    max_heap_mb: u64,

    /// Client connections Envoy accepts at once. 0 = no limit.
    #[arg(long, value_name = "N", default_value_t = OverloadOptions::default().max_connections)]
    max_connections: u64,

    /// No access log lines on stdout.
    #[arg(long)]
    no_access_log: bool,

    /// Serve the listener from FILE (watched by Envoy) instead of the bootstrap.
    #[arg(long, value_name = "FILE")]
    lds: Option<String>,
}

/// Settings of the listener clients connect to; none of them applies with
/// --istio (the gateway's listener is Istio's).
#[derive(Debug, Args)]
#[group(id = "edge_options", multiple = true, conflicts_with = "istio")]
struct EdgeArgs {
    /// A client must send its request headers within N seconds (else 408). 0 = no limit.
    #[arg(long, value_name = "N", default_value_t = EdgeOptions::default().request_headers_timeout_s)]
    request_headers_timeout_s: u64,

    /// A client must send its whole request, headers and body, within N seconds
    /// (else 408); the answer is not limited by it. 0 = no limit.
    #[arg(long, value_name = "N", default_value_t = EdgeOptions::default().request_timeout_s)]
    request_timeout_s: u64,

    /// Close a stream when nothing was sent either way for N seconds. 0 = never.
    #[arg(long, value_name = "N", default_value_t = EdgeOptions::default().stream_idle_timeout_s)]
    stream_idle_timeout_s: u64,

    /// Largest request headers, in KiB (else 431).
    #[arg(long, value_name = "KIB", default_value_t = EdgeOptions::default().max_request_headers_kb,
          value_parser = clap::value_parser!(u32).range(1..=8192))]
    max_request_headers_kb: u32,

    /// Most request headers (else 431).
    #[arg(long, value_name = "N", default_value_t = EdgeOptions::default().max_headers_count,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_headers_count: u32,

    /// Request headers with '_' in their name.
    #[arg(long, value_name = "ACTION", value_enum, default_value_t = EdgeOptions::default().headers_with_underscores)]
    headers_with_underscores: UnderscoreHeaders,

    /// HTTP/2: most concurrent streams per client connection.
    #[arg(long, value_name = "N", default_value_t = EdgeOptions::default().http2_max_concurrent_streams,
          value_parser = clap::value_parser!(u32).range(1..=2_147_483_647))]
    http2_max_concurrent_streams: u32,

    /// HTTP/2: bytes a client may send on one stream before Envoy reads them.
    #[arg(long, value_name = "BYTES", default_value_t = EdgeOptions::default().http2_initial_stream_window_bytes,
          value_parser = clap::value_parser!(u32).range(65_535..=2_147_483_647))]
    http2_initial_stream_window_bytes: u32,

    /// HTTP/2: bytes a client may send on one connection before Envoy reads them.
    #[arg(long, value_name = "BYTES", default_value_t = EdgeOptions::default().http2_initial_connection_window_bytes,
          value_parser = clap::value_parser!(u32).range(65_535..=2_147_483_647))]
    http2_initial_connection_window_bytes: u32,

    /// The client's address is the connection's peer (true), or whatever the
    /// client's x-forwarded-for says (false: only behind a proxy that sets it).
    #[arg(long, value_name = "BOOL", default_value_t = EdgeOptions::default().use_remote_address,
          action = clap::ArgAction::Set)]
    use_remote_address: bool,

    /// Proxies in front of Envoy (load balancers) whose x-forwarded-for
    /// entries are trusted for the client's address.
    #[arg(long, value_name = "N", default_value_t = EdgeOptions::default().xff_num_trusted_hops)]
    xff_num_trusted_hops: u32,
}

/// Options of the Istio manifests; each needs --istio.
#[derive(Debug, Args)]
#[group(id = "istio_options", multiple = true, requires = "istio")]
struct IstioArgs {
    /// Namespace of the gateway workload.
    #[arg(long, value_name = "NS")]
    namespace: Option<String>,

    /// Where Envoy fetches spillway.wasm for both roles: https://... or
    /// file:///PATH mounted into the gateway's proxy.
    #[arg(long, value_name = "URL")]
    wasm_url: Option<String>,

    /// sha256 of spillway.wasm (64 hex digits).
    #[arg(long, value_name = "HEX")]
    wasm_sha256: Option<String>,

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
        RouteOptions {
            timeout_s: self.route_timeout_s,
            request_body_limit_bytes: self.body_limit_bytes,
            buffer_request_bodies: !self.stream_request_bodies,
        }
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
            edge: self.edge_options(),
            overload: OverloadOptions { max_heap_mb: b.max_heap_mb, max_connections: b.max_connections },
        }
    }

    fn edge_options(&self) -> EdgeOptions {
        let e = &self.edge;
        EdgeOptions {
            request_headers_timeout_s: e.request_headers_timeout_s,
            request_timeout_s: e.request_timeout_s,
            stream_idle_timeout_s: e.stream_idle_timeout_s,
            max_request_headers_kb: e.max_request_headers_kb,
            max_headers_count: e.max_headers_count,
            headers_with_underscores: e.headers_with_underscores,
            http2_max_concurrent_streams: e.http2_max_concurrent_streams,
            http2_initial_stream_window_bytes: e.http2_initial_stream_window_bytes,
            http2_initial_connection_window_bytes: e.http2_initial_connection_window_bytes,
            use_remote_address: e.use_remote_address,
            xff_num_trusted_hops: e.xff_num_trusted_hops,
        }
    }

    fn istio_options(&self) -> Result<IstioOptions, String> {
        let a = &self.istio_args;
        let wasm_url = a.wasm_url.clone().ok_or("--istio needs --wasm-url")?;
        Ok(IstioOptions {
            namespace: a.namespace.clone().unwrap_or_default(),
            wasm_url,
            wasm_sha256: a.wasm_sha256.as_ref().map(|s| s.to_ascii_lowercase()),
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
    let vars = envoy::env_keys(config);
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

/// What the output exposes that the user may not mean to: keys written into
/// it, an admin interface reachable from other hosts.
fn warnings(cli: &Cli, config: &Config) -> Vec<String> {
    let mut out: Vec<String> = envoy::literal_keys(config)
        .into_iter()
        .map(|field| {
            format!(
                "{field} is a literal key: it is written into the output and shown by Envoy's \
                 /config_dump; name an environment variable instead (api_key_env / key_env)"
            )
        })
        .collect();
    let (address, port) = &cli.bootstrap.admin;
    if !cli.istio && !bootstrap::is_loopback(address) {
        out.push(format!(
            "the admin interface listens on {address}:{port}, beyond this host: whoever reaches it \
             can read the whole config (/config_dump) and stop Envoy; keep it on 127.0.0.1 or \
             restrict who can reach that port"
        ));
    }
    out
}

fn run(cli: &Cli) -> Result<(), String> {
    let (config, filter_json) = read_filter(&cli.filter)?;
    for warning in warnings(cli, &config) {
        eprintln!("spillway-render: warning: {warning}");
    }
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
    fn edge_and_overload_defaults_and_options() {
        let o = parse(&["f.json"]).unwrap().bootstrap_options();
        assert_eq!(o.edge, EdgeOptions::default());
        assert_eq!(o.overload, OverloadOptions::default());
        assert!(o.route.buffer_request_bodies);
        let cli = parse(&[
            "f.json",
            "--request-headers-timeout-s",
            "3",
            "--request-timeout-s",
            "0",
            "--stream-idle-timeout-s",
            "1200",
            "--max-request-headers-kb",
            "96",
            "--max-headers-count",
            "50",
            "--headers-with-underscores",
            "drop",
            "--http2-max-concurrent-streams",
            "10",
            "--http2-initial-stream-window-bytes",
            "65535",
            "--http2-initial-connection-window-bytes",
            "131072",
            "--use-remote-address",
            "false",
            "--xff-num-trusted-hops",
            "1",
            "--max-heap-mb",
            "512",
            "--max-connections",
            "0",
            "--stream-request-bodies",
        ])
        .unwrap();
        let o = cli.bootstrap_options();
        let want = EdgeOptions {
            request_headers_timeout_s: 3,
            request_timeout_s: 0,
            stream_idle_timeout_s: 1200,
            max_request_headers_kb: 96,
            max_headers_count: 50,
            headers_with_underscores: UnderscoreHeaders::Drop,
            http2_max_concurrent_streams: 10,
            http2_initial_stream_window_bytes: 65_535,
            http2_initial_connection_window_bytes: 131_072,
            use_remote_address: false,
            xff_num_trusted_hops: 1,
        };
        assert_eq!(o.edge, want);
        assert_eq!(o.overload, OverloadOptions { max_heap_mb: 512, max_connections: 0 });
        assert!(!o.route.buffer_request_bodies);
        // Envoy's own bounds are checked here, not by a failing Envoy later.
        for bad in [
            &["--max-request-headers-kb", "0"][..],
            &["--max-request-headers-kb", "8193"],
            &["--max-headers-count", "0"],
            &["--http2-initial-stream-window-bytes", "1000"],
            &["--http2-max-concurrent-streams", "0"],
            &["--headers-with-underscores", "maybe"],
            &["--use-remote-address", "perhaps"],
            &["--body-limit-bytes", "0"],
            &["--body-limit-bytes", "4294967296"],
        ] {
            let args: Vec<&str> = std::iter::once("f.json").chain(bad.iter().copied()).collect();
            assert!(parse(&args).is_err(), "{bad:?}");
        }
        // The listener's settings are not Istio's to set.
        let e = parse(&["f.json", "--istio", "--request-timeout-s", "5"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        // Request bodies are held in both outputs unless asked.
        let cli = parse(&["f.json", "--istio", "--wasm-url", "https://h/s.wasm", "--stream-request-bodies"]).unwrap();
        assert!(!cli.istio_options().unwrap().route.buffer_request_bodies);
    }

    fn config(json: &str) -> Config {
        Config::parse(json.as_bytes(), Keys::NamesOnly).unwrap()
    }

    #[test]
    fn literal_keys_and_an_open_admin_are_warned_about() {
        let env_only = config(r#"{"backends":[{"name":"a","url":"http://x","api_key_env":"A"}]}"#);
        let literal = config(r#"{"backends":[{"name":"a","url":"http://x","api_key":"sk-literal-1"}]}"#);
        assert!(warnings(&parse(&["f.json"]).unwrap(), &env_only).is_empty());
        let w = warnings(&parse(&["f.json"]).unwrap(), &literal);
        assert_eq!(w.len(), 1);
        assert!(w[0].starts_with("backends[0].api_key (a) is a literal key") && w[0].contains("/config_dump"), "{w:?}");
        assert!(!w[0].contains("sk-literal-1"));
        let w = warnings(&parse(&["f.json", "--admin", "0.0.0.0:9901"]).unwrap(), &env_only);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("0.0.0.0:9901") && w[0].contains("/config_dump"), "{w:?}");
        let istio = parse(&["f.json", "--istio", "--wasm-url", "https://h/s.wasm"]).unwrap();
        assert_eq!(warnings(&istio, &literal).len(), 1);
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
