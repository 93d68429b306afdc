//! `spillway-mock`: a mock Azure OpenAI backend for Spillway's integration
//! tests and benchmarks. See `--help`.

mod openai;
mod quota;
mod server;
mod state;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::quota::Quota;
use crate::server::Shared;
use crate::state::{Mock, Settings};

const USAGE: &str = "\
usage: spillway-mock --name NAME [--listen ADDR:PORT (default 127.0.0.1:0)]
                     [--api-key KEY] [--requests-per-window N] [--tokens-per-window N]
                     [--window-ms MS (default 60000)] [--deployments a,b,c]
                     [--latency-ms N] [--stream-chunks N (default 5)]
                     [--stream-chunk-delay-ms N (default 0)]
Prints `LISTENING ADDR:PORT` on stdout once bound. Control API under /_mock/.";

#[derive(Debug, Clone, PartialEq)]
struct Cli {
    name: String,
    listen: SocketAddr,
    api_key: Option<String>,
    requests_per_window: Option<u64>,
    tokens_per_window: Option<u64>,
    window_ms: u64,
    deployments: Option<Vec<String>>,
    latency_ms: u64,
    stream_chunks: usize,
    stream_chunk_delay_ms: u64,
}

fn num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("{flag}: invalid number {v:?}"))
}

/// Parse arguments (without the program name). `Ok(None)` means `--help`.
fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Option<Cli>, String> {
    let mut cli = Cli {
        name: "mock".into(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        api_key: None,
        requests_per_window: None,
        tokens_per_window: None,
        window_ms: 60_000,
        deployments: None,
        latency_ms: 0,
        stream_chunks: 5,
        stream_chunk_delay_ms: 0,
    };
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(None);
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next()).ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--name" => cli.name = value()?,
            "--listen" => {
                let v = value()?;
                cli.listen = v.parse().map_err(|_| format!("--listen: invalid address {v:?}"))?;
            }
            "--api-key" => cli.api_key = Some(value()?),
            "--requests-per-window" => cli.requests_per_window = Some(num(&flag, &value()?)?),
            "--tokens-per-window" => cli.tokens_per_window = Some(num(&flag, &value()?)?),
            "--window-ms" => cli.window_ms = num::<u64>(&flag, &value()?)?.max(1),
            "--deployments" => {
                let v = value()?;
                cli.deployments =
                    Some(v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect());
            }
            "--latency-ms" => cli.latency_ms = num(&flag, &value()?)?,
            "--stream-chunks" => cli.stream_chunks = num::<usize>(&flag, &value()?)?.max(1),
            "--stream-chunk-delay-ms" => cli.stream_chunk_delay_ms = num(&flag, &value()?)?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if cli.name.is_empty() {
        return Err("--name must not be empty".into());
    }
    Ok(Some(cli))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() {
    let cli = match parse_args(std::env::args().skip(1)) {
        Ok(Some(cli)) => cli,
        Ok(None) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("spillway-mock: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };

    let mut settings = Settings::new(&cli.name);
    settings.api_key = cli.api_key;
    settings.deployments = cli.deployments;
    settings.latency_ms = cli.latency_ms;
    settings.stream_chunks = cli.stream_chunks;
    settings.stream_chunk_delay_ms = cli.stream_chunk_delay_ms;
    let quota = Quota::new(cli.requests_per_window, cli.tokens_per_window, cli.window_ms);
    let shared = Shared::new(Mock::new(settings, quota));

    let listener = match TcpListener::bind(cli.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("spillway-mock: cannot listen on {}: {e}", cli.listen);
            std::process::exit(1);
        }
    };
    let addr = listener.local_addr().expect("local_addr");
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "LISTENING {addr}").expect("write stdout");
        out.flush().expect("flush stdout");
    }

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    tokio::spawn(server::serve_connection(Arc::clone(&shared), stream));
                }
                Err(e) => {
                    // e.g. EMFILE: back off briefly instead of spinning.
                    eprintln!("spillway-mock: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            },
        }
    }
    eprintln!("spillway-mock {}: shutting down", cli.name);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn defaults() {
        let cli = parse_args(args("--name eastus")).unwrap().unwrap();
        assert_eq!(cli.name, "eastus");
        assert_eq!(cli.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(cli.window_ms, 60_000);
        assert_eq!(cli.stream_chunks, 5);
        assert_eq!(cli.stream_chunk_delay_ms, 0);
        assert_eq!(cli.requests_per_window, None);
        assert_eq!(cli.deployments, None);
    }

    #[test]
    fn all_flags() {
        let cli = parse_args(args(
            "--name w --listen 127.0.0.1:8080 --api-key k --requests-per-window 3 --tokens-per-window=100 \
             --window-ms 500 --deployments a,b --latency-ms 7 --stream-chunks 2 --stream-chunk-delay-ms 9",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(cli.listen.port(), 8080);
        assert_eq!(cli.api_key.as_deref(), Some("k"));
        assert_eq!(cli.requests_per_window, Some(3));
        assert_eq!(cli.tokens_per_window, Some(100));
        assert_eq!(cli.window_ms, 500);
        assert_eq!(cli.deployments, Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(cli.latency_ms, 7);
        assert_eq!(cli.stream_chunks, 2);
        assert_eq!(cli.stream_chunk_delay_ms, 9);
    }

    #[test]
    fn errors_and_help() {
        assert!(parse_args(args("--bogus 1")).is_err());
        assert!(parse_args(args("--latency-ms x")).is_err());
        assert!(parse_args(args("--name")).is_err());
        assert!(parse_args(args("--listen nope")).is_err());
        assert_eq!(parse_args(args("--help")).unwrap(), None);
    }
}
