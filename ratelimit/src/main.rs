//! `spillway-ratelimit --listen ADDR [--redis URL]`

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use spillway_ratelimit::{Backend, RateLimitServer};

/// Envoy rate-limit service (envoy.service.ratelimit.v3) for Spillway.
///
/// Every descriptor carrying a `limit` override is limited by that override
/// (namespace = domain, one counter per distinct set of entry values);
/// descriptors without one are not limited. Counters are kept by limitador,
/// in Redis when --redis is given, else in this process.
#[derive(Parser, Debug)]
#[command(name = "spillway-ratelimit", version)]
struct Args {
    /// Address to serve gRPC on, e.g. 127.0.0.1:8081
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,

    /// Keep the counters in Redis at this URL (e.g. redis://127.0.0.1:6379),
    /// shared by every instance using it; in memory when absent
    #[arg(long, value_name = "URL", value_parser = parse_redis_url)]
    redis: Option<String>,
}

fn parse_redis_url(s: &str) -> Result<String, String> {
    Backend::redis(s).map(|_| s.to_string())
}

fn main() -> ExitCode {
    // clap prints usage and exits with 2 on bad arguments, 0 for --help.
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("spillway-ratelimit: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let backend = match &args.redis {
        Some(url) => match Backend::redis(url) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("spillway-ratelimit: {e}");
                return ExitCode::from(2);
            }
        },
        None => Backend::in_memory(),
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("spillway-ratelimit: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let shown = listener.local_addr().unwrap_or(args.listen);
    eprintln!("spillway-ratelimit: listening on {shown}, counters {}", backend.describe());
    if let Backend::Redis(redis) = &backend {
        redis.spawn_connector();
    }

    match spillway_ratelimit::serve(listener, RateLimitServer::new(backend), shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spillway-ratelimit: server error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
