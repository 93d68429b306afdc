//! `spillway-mock`: a mock Azure OpenAI backend for Spillway's integration
//! tests and benchmarks. See `--help`.

mod audio;
mod batches;
mod fault;
mod files;
mod multipart;
mod openai;
mod quota;
mod realtime;
mod responses;
mod server;
mod state;
mod store;
mod usage;

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use clap::builder::NonEmptyStringValueParser;
use clap::Parser;
use tokio::net::TcpListener;

use crate::quota::Quota;
use crate::server::Shared;
use crate::state::{Mock, Settings};

/// Shown by `--help` (details in the `server` module docs).
const CONTROL_API: &str = r#"Data plane:
  POST /openai/deployments/{d}/{chat/completions,completions,embeddings,images/generations}?api-version=
  POST /openai/deployments/{d}/{audio/transcriptions,audio/translations,images/edits}?api-version=
                        multipart/form-data: "file" (audio) or "image" and "prompt" (edits)
  POST /openai/v1/{op}, /v1/{op}       the same ops; deployment = body (or form) "model"
  POST /openai/v1/responses, /v1/responses, /openai/responses?api-version=
                        Responses API (deployment = body "model"); responses are stored
                        in this process: previous_response_id, GET/DELETE .../responses/{id},
                        POST .../{id}/cancel, GET .../{id}/input_items only work here
                        (elsewhere 400 previous_response_not_found / 404)
  POST .../files (multipart "purpose", "file"), GET .../files, GET/DELETE .../files/{id},
  GET .../files/{id}/content    under /openai/v1, /v1, /openai (api-version); files are stored
                        in this process (elsewhere 404)
  POST .../batches {"input_file_id","endpoint","completion_window"}, GET .../batches,
  GET .../batches/{id}, POST .../batches/{id}/cancel    same prefixes; the input file must
                        be stored here (else 400 invalid_file_id); a batch completes when
                        first retrieved, its answers in an output file stored here
  GET /openai/v1/realtime?model={d}, /v1/realtime?model={d},
  GET /openai/realtime?api-version=&deployment={d}
                        Realtime API: websocket upgrade (key also as ?api-key=); then
                        session.created, and session.updated / conversation.item.created /
                        response.created + text deltas + response.done (usage) per client
                        event; one quota request per connection, faults before upgrading

Control API (JSON), under /_mock/:
  GET  /_mock/health    {"ok": true}
  GET  /_mock/stats     requests_total, by_status, requests: one record per data-plane
                        request (method, path, query, headers, body_len, body_json,
                        deployment, status: 0 = no response head, 101 = websocket, stream,
                        fault, ws_events: client events on an upgraded realtime connection
                        (else null); a form's body_json: its fields, a file as "NAME (N bytes)"),
                        responses_stored, files_stored, batches_stored,
                        usage: per deployment, the tokens put into answers
                        ({answers, prompt_tokens, completion_tokens, cut: the same for
                        answers a reset_after_events fault cut before their usage})
  POST /_mock/reset     clear stats, quota window and the fail_next queue (not the
                        stored responses, files, batches)
  GET  /_mock/config    current settings
  POST /_mock/config    change any of: requests_per_window, tokens_per_window, window_ms,
                        latency_ms, stream_chunks, stream_chunk_delay_ms, api_key,
                        deployments, retry_after_header ("keep"|"omit"),
                        limit_headers (true: x-ratelimit-limit-requests/-tokens next to
                        x-ratelimit-remaining-*), provisioned (true: successes and quota
                        429s carry azure-openai-deployment-utilization: N.N%, the window's
                        tokens (else requests) used / limit), fail_next

fail_next: [entry, ...], one entry per later data-plane request, in order:
  {"status": N}               N >= 400: Azure-style error (404 DeploymentNotFound,
                              401 access denied, 429 rate limit, ...); N < 400: serve
                              normally. Extra headers (status only): "retry_after",
                              "retry_after_ms", "headers": {"name": "value"},
                              "raw_headers": [["name", "hex bytes, e.g. ff fe"]]
  {"reset": true}             close the connection without a response
  {"reset_after_events": N}   serve, then abort mid-body: after N SSE events of a
                              stream, after half of a JSON body
  {"hang": true}              never answer; hold the connection until the client closes
  {"hang_ms": N}              answer normally after N more ms (a slow backend)
  {"stream_error_before_content": true}
                              a stream is admitted, then sends (chat: Azure's
                              prompt_filter_results chunk and) one error event
                              {"error":{"code":"server_error",...}}, no [DONE];
                              without a stream: as {"status": 500}
  {"first_content_delay_ms": N}
                              a stream sends its head (chat: and the
                              prompt_filter_results chunk) at once, the rest N ms
                              later; without a stream: as {"hang_ms": N}

Request headers (data plane), for clients that hang up on purpose:
  x-mock-latency-ms: N                 N more ms before this request's response head
  x-mock-stream-chunk-delay-ms: N      this request's stream_chunk_delay_ms"#;

/// Mock Azure OpenAI backend for Spillway's integration tests and benchmarks.
///
/// Prints `LISTENING ADDR:PORT` on stdout once bound.
#[derive(Debug, Clone, PartialEq, Parser)]
#[command(
    name = "spillway-mock",
    version,
    args_override_self = true,
    after_help = "Control API under /_mock/ (see --help).",
    after_long_help = CONTROL_API
)]
struct Cli {
    /// Backend name: in answers ("Hello from NAME") and the x-mock-backend header
    #[arg(long, value_name = "NAME", default_value = "mock", value_parser = NonEmptyStringValueParser::new())]
    name: String,
    /// Address to listen on (port 0: any free port)
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Require this key in `api-key` or `Authorization: Bearer` (else 401)
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Requests allowed per quota window (default: unlimited)
    #[arg(long, value_name = "N")]
    requests_per_window: Option<u64>,
    /// Tokens allowed per quota window (default: unlimited)
    #[arg(long, value_name = "N")]
    tokens_per_window: Option<u64>,
    /// Quota window length in milliseconds (0 counts as 1)
    #[arg(long, value_name = "MS", default_value_t = 60_000, value_parser = at_least_one::<u64>)]
    window_ms: u64,
    /// Comma-separated deployments that exist; others get 404 DeploymentNotFound (default: any)
    #[arg(long, value_name = "A,B,C", value_parser = name_list)]
    deployments: Option<std::vec::Vec<String>>,
    /// Delay before each data-plane response, in milliseconds
    #[arg(long, value_name = "MS", default_value_t = 0)]
    latency_ms: u64,
    /// Content events per answer (stream events; words of a non-stream answer; 0 counts as 1)
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = at_least_one::<usize>)]
    stream_chunks: usize,
    /// Delay before each streamed content event, in milliseconds
    #[arg(long, value_name = "MS", default_value_t = 0)]
    stream_chunk_delay_ms: u64,
}

/// A number where 0 means 1.
fn at_least_one<T: std::str::FromStr + Ord + From<u8>>(v: &str) -> Result<T, T::Err> {
    v.parse().map(|n: T| n.max(T::from(1)))
}

/// `a, b,,c` → `["a", "b", "c"]`.
fn name_list(v: &str) -> Result<Vec<String>, Infallible> {
    Ok(v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect())
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
    let cli = Cli::parse();

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
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    fn parse_args(s: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("spillway-mock").chain(s.split_whitespace()))
    }

    #[test]
    fn command_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let cli = parse_args("--name eastus").unwrap();
        assert_eq!(cli.name, "eastus");
        assert_eq!(cli.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(cli.window_ms, 60_000);
        assert_eq!(cli.stream_chunks, 5);
        assert_eq!(cli.stream_chunk_delay_ms, 0);
        assert_eq!(cli.latency_ms, 0);
        assert_eq!(cli.requests_per_window, None);
        assert_eq!(cli.tokens_per_window, None);
        assert_eq!(cli.api_key, None);
        assert_eq!(cli.deployments, None);
        assert_eq!(parse_args("").unwrap().name, "mock");
    }

    #[test]
    fn all_flags() {
        let cli = parse_args(
            "--name w --listen 127.0.0.1:8080 --api-key k --requests-per-window 3 --tokens-per-window=100 \
             --window-ms 500 --deployments a,b --latency-ms 7 --stream-chunks 2 --stream-chunk-delay-ms 9",
        )
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
    fn clamps_and_lists() {
        let cli = parse_args("--window-ms 0 --stream-chunks 0 --deployments a,,b,").unwrap();
        assert_eq!(cli.window_ms, 1);
        assert_eq!(cli.stream_chunks, 1);
        assert_eq!(cli.deployments, Some(vec!["a".to_string(), "b".to_string()]));
        // The last occurrence wins, as with any other flag.
        let cli = parse_args("--deployments a --deployments b,c").unwrap();
        assert_eq!(cli.deployments, Some(vec!["b".to_string(), "c".to_string()]));
    }

    #[test]
    fn errors_and_help() {
        for bad in ["--bogus 1", "--latency-ms x", "--latency-ms -1", "--name", "--listen nope", "--window-ms 1.5"] {
            assert!(parse_args(bad).is_err(), "{bad}");
        }
        assert!(Cli::try_parse_from(["spillway-mock", "--name", ""]).is_err());
        assert_eq!(parse_args("--help").unwrap_err().kind(), ErrorKind::DisplayHelp);
        assert_eq!(parse_args("-h").unwrap_err().kind(), ErrorKind::DisplayHelp);
        let help = Cli::command().render_long_help().to_string();
        for needle in [
            "--stream-chunk-delay-ms <MS>",
            "[default: 60000]",
            "reset_after_events",
            "raw_headers",
            "audio/transcriptions",
            "files/{id}/content",
            "batches/{id}/cancel",
            "files_stored",
            "realtime?model=",
            "ws_events",
        ] {
            assert!(help.contains(needle), "{needle} not in help:\n{help}");
        }
    }
}
