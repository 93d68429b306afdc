//! HTTP layer: hyper service, control plane (`/_mock/*`), streaming bodies.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::openai::{self, StreamPlan};
use crate::state::{Mock, Outcome, ReplyBody, RequestInfo};

/// Largest request body accepted (bigger → 413).
pub const MAX_BODY: usize = 64 * 1024 * 1024;

pub type Body = BoxBody<Bytes, Infallible>;

/// Returned to hyper to make it drop the connection without a response.
#[derive(Debug)]
pub struct ResetConnection;

impl fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("injected connection reset")
    }
}

impl std::error::Error for ResetConnection {}

/// Shared server state.
pub struct Shared {
    mock: Mutex<Mock>,
    epoch: Instant,
    name: HeaderValue,
}

impl Shared {
    pub fn new(mock: Mock) -> Arc<Self> {
        let name = HeaderValue::from_str(&mock.settings.name).unwrap_or(HeaderValue::from_static("mock"));
        Arc::new(Shared { mock: Mutex::new(mock), epoch: Instant::now(), name })
    }

    fn lock(&self) -> MutexGuard<'_, Mock> {
        // A panic while holding the lock cannot leave the state invalid in a
        // way that matters for a mock; keep serving.
        self.mock.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A response body fed by a channel; each message becomes one body frame
/// (one HTTP/1.1 chunk), so SSE events are flushed individually.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(shared: &Shared, status: u16, v: &Value) -> Response<Body> {
    let mut resp = Response::new(full(v.to_string()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert("x-mock-backend", shared.name.clone());
    resp
}

fn stream_response(shared: &Shared, plan: StreamPlan, delay_ms: u64) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    tokio::spawn(async move {
        for b in plan.head {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        for b in plan.content {
            if delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            }
            if tx.send(b).await.is_err() {
                return;
            }
        }
        for b in plan.tail {
            if tx.send(b).await.is_err() {
                return;
            }
        }
    });
    let mut resp = Response::new(ChannelBody { rx }.boxed());
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    h.insert("x-mock-backend", shared.name.clone());
    resp
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

fn header_map(req: &Request<Incoming>) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in req.headers() {
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        out.entry(name.as_str().to_string())
            .and_modify(|e| {
                e.push_str(", ");
                e.push_str(&v);
            })
            .or_insert(v);
    }
    out
}

/// Serve one accepted TCP connection (HTTP/1.1 with keep-alive) to completion.
pub async fn serve_connection(shared: Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| handle(Arc::clone(&shared), req));
    // Errors here are client disconnects or injected resets.
    let _ = http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), service).await;
}

/// The hyper service function.
pub async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, ResetConnection> {
    let ts_ms = u64::try_from(unix_now().as_millis()).unwrap_or(0);
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let headers = header_map(&req);

    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                let err = openai::error_body("RequestEntityTooLarge", "Request body too large.");
                return Ok(json_response(&shared, 413, &err));
            }
            // The client went away or sent a malformed body: nothing to answer.
            return Err(ResetConnection);
        }
    };

    if let Some(cmd) = path.strip_prefix("/_mock/") {
        return Ok(control(&shared, &method, cmd, &body));
    }

    let info = RequestInfo { ts_ms, method, path, query, headers, body };
    let now_ms = shared.now_ms();
    let outcome = shared.lock().handle(info, now_ms, unix_now().as_secs());
    match outcome {
        Outcome::Reset { latency_ms } => {
            sleep_ms(latency_ms).await;
            Err(ResetConnection)
        }
        Outcome::Reply(reply) => {
            sleep_ms(reply.latency_ms).await;
            let mut resp = match reply.body {
                ReplyBody::Json(v) => json_response(&shared, reply.status, &v),
                ReplyBody::Stream(plan) => stream_response(&shared, plan, reply.stream_delay_ms),
            };
            *resp.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            for (name, value) in reply.headers {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    resp.headers_mut().insert(name, v);
                }
            }
            Ok(resp)
        }
    }
}

async fn sleep_ms(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

fn control(shared: &Shared, method: &str, cmd: &str, body: &[u8]) -> Response<Body> {
    match (method, cmd) {
        ("GET", "health") => json_response(shared, 200, &json!({"ok": true})),
        ("GET", "stats") => {
            let v = shared.lock().stats_json();
            json_response(shared, 200, &v)
        }
        ("POST", "reset") => {
            shared.lock().reset();
            json_response(shared, 200, &json!({"ok": true}))
        }
        ("GET", "config") => {
            let v = shared.lock().config_json();
            json_response(shared, 200, &v)
        }
        ("POST", "config") => {
            let parsed: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => {
                    let err = openai::error_body("BadRequest", &format!("invalid JSON: {e}"));
                    return json_response(shared, 400, &err);
                }
            };
            let mut mock = shared.lock();
            match mock.apply_config(&parsed) {
                Ok(()) => {
                    let v = mock.config_json();
                    drop(mock);
                    json_response(shared, 200, &v)
                }
                Err(msg) => {
                    drop(mock);
                    json_response(shared, 400, &openai::error_body("BadRequest", &msg))
                }
            }
        }
        _ => json_response(shared, 404, &openai::resource_not_found()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::Quota;
    use crate::state::Settings;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Start a server on an ephemeral port; returns its address.
    async fn start(settings: Settings) -> std::net::SocketAddr {
        let shared = Shared::new(Mock::new(settings, Quota::new(None, None, 60_000)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve_connection(Arc::clone(&shared), s));
            }
        });
        addr
    }

    fn post(path: &str, body: &str) -> String {
        format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    /// Read one response with a content-length body.
    async fn read_response(s: &mut TcpStream) -> String {
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        loop {
            let n = s.read(&mut tmp).await.unwrap();
            assert!(n > 0, "connection closed early: {:?}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&tmp[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap();
                if body.len() >= len {
                    return text;
                }
            }
        }
    }

    const CHAT: &str = "/openai/deployments/d/chat/completions?api-version=2024-10-21";

    #[tokio::test]
    async fn keep_alive_and_reset() {
        let addr = start(Settings::new("eastus")).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        for _ in 0..2 {
            s.write_all(post(CHAT, r#"{"messages":[]}"#).as_bytes()).await.unwrap();
            let r = read_response(&mut s).await;
            assert!(r.starts_with("HTTP/1.1 200"), "{r}");
            assert!(r.contains("x-mock-backend: eastus"));
            assert!(r.contains("Hello from eastus"));
        }
        s.write_all(post("/_mock/config", r#"{"fail_next":[{"reset":true}]}"#).as_bytes()).await.unwrap();
        assert!(read_response(&mut s).await.contains("\"fail_next_pending\":1"));
        s.write_all(post(CHAT, r#"{"messages":[]}"#).as_bytes()).await.unwrap();
        let mut rest = Vec::new();
        // The server closes without a response (EOF, or a reset error).
        let _ = s.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    }

    #[tokio::test]
    async fn stream_events_are_spaced() {
        let mut settings = Settings::new("west");
        settings.stream_chunks = 3;
        settings.stream_chunk_delay_ms = 60;
        let addr = start(settings).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(post(CHAT, r#"{"messages":[],"stream":true}"#).as_bytes()).await.unwrap();
        let started = Instant::now();
        let mut all = Vec::new();
        let mut first_content_at = None;
        let mut tmp = [0u8; 4096];
        while !String::from_utf8_lossy(&all).contains("data: [DONE]") {
            let n = s.read(&mut tmp).await.unwrap();
            assert!(n > 0);
            all.extend_from_slice(&tmp[..n]);
            if first_content_at.is_none() && String::from_utf8_lossy(&all).contains("Hello ") {
                first_content_at = Some(started.elapsed());
            }
        }
        let total = started.elapsed();
        let text = String::from_utf8_lossy(&all);
        assert!(text.contains("transfer-encoding: chunked"), "{text}");
        assert!(text.contains("content-type: text/event-stream"));
        assert!(text.contains("west "));
        // 3 delayed chunks of 60 ms; the first arrives only after one delay.
        assert!(first_content_at.unwrap() >= Duration::from_millis(50), "{first_content_at:?}");
        assert!(total >= Duration::from_millis(170), "{total:?}");
    }
}
