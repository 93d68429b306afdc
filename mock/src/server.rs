//! HTTP layer: hyper service, control plane (`/_mock/*`), streaming bodies,
//! and the wire side of injected faults (resets, hangs, cut bodies).
//!
//! # Data plane
//!
//! | request | deployment |
//! | --- | --- |
//! | `POST /openai/deployments/{d}/{chat/completions, completions, embeddings, images/generations}?api-version=` | `{d}` |
//! | `POST /openai/deployments/{d}/{audio/transcriptions, audio/translations, images/edits}?api-version=` (`multipart/form-data`) | `{d}` |
//! | `POST /openai/v1/{op}`, `POST /v1/{op}` (same ops) | body (form) `model` |
//! | `POST /openai/v1/responses`, `POST /v1/responses`, `POST /openai/responses?api-version=` | body `model` |
//! | `GET`, `DELETE .../responses/{id}`; `POST .../responses/{id}/cancel`; `GET .../responses/{id}/input_items` (under the three response prefixes) | none |
//! | `POST .../files` (form: `purpose`, `file`); `GET .../files`; `GET`, `DELETE .../files/{id}`; `GET .../files/{id}/content` (under `/openai/v1`, `/v1`, `/openai` + `api-version`) | none |
//! | `POST .../batches`; `GET .../batches`; `GET .../batches/{id}`; `POST .../batches/{id}/cancel` (same prefixes) | none |
//!
//! Audio (see [`crate::audio`]) and image edits take a
//! `multipart/form-data` body (a JSON body gets 400 `invalid_content_type`):
//! audio a `file` part (answer: `{"text": "Transcribed by NAME from FILE (N
//! bytes)"}`, or plain text for `response_format` `text`, `srt`, `vtt`),
//! image edits an `image` (or `image[]`) part and a `prompt` (answered like
//! an image generation). They are checked against the deployment allow-list
//! and charged one request (no tokens).
//!
//! Files and batches (see [`crate::files`], [`crate::batches`]) are stored
//! in this process like responses: a file or batch id is unknown to any
//! other mock (404), and a batch can only be created on a file uploaded here
//! (else 400 `invalid_file_id`). They check the key and `api-version`
//! (classic prefix), use no quota, and take faults.
//!
//! The Responses API (see [`crate::responses`]): a create is checked, charged
//! and faulted like a chat completion; its response is stored in this process
//! (unless `"store": false`), so a follow-up (`previous_response_id`) or a
//! request on `{id}` sent to another mock fails as on Azure (400
//! `previous_response_not_found`, 404). Requests on `{id}` check the key and
//! `api-version` (classic prefix) and use no quota; faults apply to them too.
//!
//! # Realtime API (websocket)
//!
//! `GET /openai/v1/realtime?model={d}` (also `/v1/realtime`) and the preview
//! `GET /openai/realtime?api-version=...&deployment={d}`, as a websocket
//! upgrade (`Connection: Upgrade`, `Upgrade: websocket`,
//! `Sec-WebSocket-Version: 13`, `Sec-WebSocket-Key`). Before upgrading, in
//! order: the next `fail_next` entry (as for any data-plane request: an
//! error status, reset or hang instead of the 101; `status` < 400 adds its
//! headers to the 101, `hang_ms` delays it, `reset_after_events` N drops the
//! socket without a close frame after N server events; the stream kinds act
//! as on a request without a stream), the key (`api-key`
//! header, `Authorization: Bearer`, or an `api-key` query parameter; else
//! 401), `api-version` (preview route; else 404), the deployment (missing:
//! 400; not in `deployments`: 404 `DeploymentNotFound`), the upgrade headers
//! (else 400), quota (one request per connection, no tokens; else 429).
//! Refusals are ordinary HTTP answers. The protocol after the 101 is in
//! [`crate::realtime`]; pings are answered, a close frame is answered and
//! ends the session. The connection's record has status 101 and
//! `ws_events`: the client events (text or binary frames, not control
//! frames) received so far.
//!
//! # Control API
//!
//! All bodies are JSON.
//!
//! | request | effect |
//! | --- | --- |
//! | `GET /_mock/health` | `{"ok": true}` |
//! | `GET /_mock/stats` | `name`, `requests_total`, `by_status` (`{"200": n, ...}`), `requests`: the last 2000 data-plane request records, `responses_stored` (Responses API responses kept), `files_stored`, `batches_stored`, `usage`: tokens billed per deployment (see [`crate::usage`]) |
//! | `POST /_mock/reset` | clear stats, the quota window and the `fail_next` queue (stored responses, files and batches stay) |
//! | `GET /_mock/config` | the current settings and `fail_next_pending` |
//! | `POST /_mock/config` | change settings; the body is validated whole (400 and no change on any error) |
//!
//! `POST /_mock/config` keys: `requests_per_window`, `tokens_per_window`
//! (integer or null = unlimited; changing a limit restarts the window),
//! `window_ms`, `latency_ms`, `stream_chunks`, `stream_chunk_delay_ms`,
//! `api_key` (string or null), `deployments` (array of strings or null = any),
//! `retry_after_header` (`"keep"` or `"omit"` on quota 429s), `limit_headers`
//! (bool, default true), `provisioned` (bool, default false; see
//! [Rate-limit headers](#rate-limit-headers)), and `fail_next`.
//!
//! A stats record has `ts_ms`, `method`, `path`, `query`, `headers` (request
//! headers; values that are not UTF-8 are decoded lossily), `body_len`,
//! `body_json` (null when not JSON or over 64 KiB; for a `multipart/form-data`
//! body its fields: text fields as strings, a file as `"NAME (N bytes)"`, a
//! repeated name as an array; null when the text fields are over 64 KiB),
//! `deployment`, `status` (of
//! the response head; 0 when none was sent), `stream` (the body asked for
//! one; on a response GET, `?stream=true`), `fault` (the `fail_next` kind
//! the request used, else null) and `ws_events` (an upgraded realtime
//! connection's client events so far, else null).
//!
//! Two request headers shape one answer's delivery, so a client can hang up
//! before the answer or in the middle of a stream on purpose:
//! `x-mock-latency-ms: N` adds N ms before the response head,
//! `x-mock-stream-chunk-delay-ms: N` replaces `stream_chunk_delay_ms`.
//!
//! # Rate-limit headers
//!
//! No `x-ratelimit-reset-*` headers are sent.
//!
//! | header | on | value |
//! | --- | --- | --- |
//! | `x-ratelimit-remaining-requests`, `x-ratelimit-remaining-tokens` | every answer to a data-plane request (successes, refusals, quota 429s, injected errors, a realtime 101), each only while its limit is set | what is left of the current window, after this request's charge when admitted |
//! | `x-ratelimit-limit-requests`, `x-ratelimit-limit-tokens` | with `limit_headers` (the default), next to each remaining header | `requests_per_window`, `tokens_per_window` |
//! | `azure-openai-deployment-utilization` | with `provisioned`: successes (200, also on stored-object requests; a realtime 101) and quota 429s; none when no limit is set | the share of the current window used, `N.N%` (one decimal, rounded down, at most `100.0%`): tokens used / `tokens_per_window`, or without a token limit requests used / `requests_per_window` (a limit of 0: `100.0%`); after this request's charge when admitted, without it on a quota 429 |
//! | `retry-after`, `retry-after-ms` | quota 429s, unless `retry_after_header` is `"omit"` | seconds (rounded up, at least 1) and ms until the window resets |
//!
//! # `fail_next`
//!
//! `"fail_next": [entry, ...]` appends to a queue; each data-plane request
//! (a known route with a method it takes) takes the next entry, in order. An entry is an object
//! with exactly one of the kind keys below; unknown keys, wrong types and
//! mixed kinds are rejected. The record's `fault` is the name in the first
//! column.
//!
//! | entry | `fault` | effect |
//! | --- | --- | --- |
//! | `{"status": N}`, N >= 400 | `status` | answer N with an Azure-style error body (404: `DeploymentNotFound`, 401: access denied, 429: rate-limit message, 500/502/503/504/408/400: Azure's texts) and `x-mock-injected: true`; no auth or quota check, no quota used |
//! | `{"status": N}`, N < 400 | `pass` | no error: serve the request normally (checks and quota apply), with any extra headers below added |
//! | `{"reset": true}` | `reset` | close the connection without any response (after `latency_ms`); status 0 |
//! | `{"reset_after_events": N}` | `reset_after_events` | serve normally, then abort the connection mid-body: a stream stops after its first N SSE events (0: right after the head), without `[DONE]` or the closing chunk; any other body (JSON, file content, plain text) stops after half its bytes (`content-length` announces all of them). Status: the head's |
//! | `{"hang": true}` | `hang` | read the request and never answer; the connection stays open until the client closes it; status 0 |
//! | `{"hang_ms": N}` | `hang_ms` | wait N ms (on top of `latency_ms`), then serve normally: a slow backend |
//! | `{"stream_error_before_content": true}` | `stream_error_before_content` | a stream request (`"stream": true` on a chat completion, a completion or a Responses API create; a response GET with `?stream=true`) is served normally (checks apply, quota is used) but its 200 `text/event-stream` body is, for a chat completion, Azure's metadata-only first chunk `data: {"id":"","object":"","created":0,"model":"","choices":[],"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}]}` at once, then (after the chunk delay) the one event `data: {"error":{"code":"server_error","message":"The server had an error while processing your request. Sorry about that!","param":null,"type":"server_error"}}`, then the normal end of the body (no `[DONE]`, no usage counted); other streams get the error event only. A stream request that fails a check or quota gets that error. Any other request: as `{"status": 500}`. Status: the head's |
//! | `{"first_content_delay_ms": N}` | `first_content_delay_ms` | a stream request is served normally, except that only the head (and for a chat completion the metadata-only first chunk above) is sent at once: every later event waits N ms more, so the first content (and a chat completion's role chunk before it) comes N ms (plus the chunk delay) after the head. Any other answer (also an error to a stream request): N ms before the head, as `hang_ms`. Status: the head's |
//!
//! Extra response headers, only together with `status` (for N >= 400 on the
//! error, for N < 400 on the normal answer); later ones replace earlier ones
//! of the same name, in this order:
//!
//! - `"retry_after": "S"` / `"retry_after_ms": "MS"` (string or number):
//!   `retry-after` / `retry-after-ms`.
//! - `"headers": {"name": "value", ...}` (string or number values).
//! - `"raw_headers": [["name", "hex bytes"], ...]`: a value given as hex
//!   (whitespace ignored), e.g. `"ff fe"`, so it can be bytes that are not
//!   UTF-8. Control bytes other than tab cannot be sent. `content-length` and
//!   `transfer-encoding` cannot be injected.
//!
//! An injected 429's message names the last `retry-after` value (default 1 s).

use std::collections::BTreeMap;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::openai::{self, StreamPlan};
use crate::realtime;
use crate::realtime::{RealtimeRoute, Session};
use crate::state::{Mock, Outcome, Reply, ReplyBody, RequestInfo, Upgrade};

/// Largest request body accepted (bigger → 413).
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// Before aborting a cut body: time for hyper to flush what was already sent.
const ABORT_GRACE: Duration = Duration::from_millis(20);

/// A response body; its only error is an injected abort.
pub type Body = BoxBody<Bytes, ResetConnection>;

/// Returned to hyper (from the service or a body) to make it drop the
/// connection: without a response, or in the middle of one.
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
/// (one HTTP/1.1 chunk), so SSE events are flushed individually. An `Err`
/// message aborts the connection. `len` is announced as `content-length`.
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, ResetConnection>>,
    len: Option<u64>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = ResetConnection;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResetConnection>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }

    fn size_hint(&self) -> SizeHint {
        self.len.map(SizeHint::with_exact).unwrap_or_default()
    }
}

/// A body sent piece by piece by a task, each piece after its delay (ms);
/// then the end, or with `abort` a dropped connection.
fn paced_body(pieces: Vec<(Bytes, u64)>, abort: bool, len: Option<u64>) -> Body {
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        for (bytes, delay_ms) in pieces {
            sleep_ms(delay_ms).await;
            if tx.send(Ok(bytes)).await.is_err() {
                return;
            }
        }
        if abort {
            // hyper drops its unflushed buffer with the connection.
            tokio::time::sleep(ABORT_GRACE).await;
            let _ = tx.send(Err(ResetConnection)).await;
        }
    });
    ChannelBody { rx, len }.boxed()
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

fn response(shared: &Shared, status: u16, content_type: &'static str, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert("x-mock-backend", shared.name.clone());
    resp
}

fn json_response(shared: &Shared, status: u16, v: &Value) -> Response<Body> {
    response(shared, status, "application/json", full(v.to_string()))
}

/// A body cut after half its bytes, then an abort.
fn cut_response(shared: &Shared, status: u16, content_type: &'static str, all: Bytes) -> Response<Body> {
    let half = all.slice(..all.len() / 2);
    let len = u64::try_from(all.len()).ok();
    response(shared, status, content_type, paced_body(vec![(half, 0)], true, len))
}

/// An SSE stream: content events after `delay_ms` each, `pause` (event
/// index, ms) waits more before one event; `reset_after_events` cuts it
/// after that many events.
fn stream_response(
    shared: &Shared,
    status: u16,
    plan: StreamPlan,
    delay_ms: u64,
    pause: Option<(usize, u64)>,
    reset_after_events: Option<usize>,
) -> Response<Body> {
    let pieces = plan
        .head
        .into_iter()
        .map(|b| (b, 0))
        .chain(plan.content.into_iter().map(|b| (b, delay_ms)))
        .chain(plan.tail.into_iter().map(|b| (b, 0)))
        .enumerate()
        .map(|(i, (b, delay))| match pause {
            Some((at, extra)) if at == i => (b, delay.saturating_add(extra)),
            _ => (b, delay),
        })
        .take(reset_after_events.unwrap_or(usize::MAX))
        .collect();
    let mut resp =
        response(shared, status, "text/event-stream", paced_body(pieces, reset_after_events.is_some(), None));
    resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Request headers for stats: repeated names joined with ", ", values that
/// are not UTF-8 (a proxy may forward any bytes) decoded lossily.
fn header_map(headers: &hyper::HeaderMap) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let v = String::from_utf8_lossy(value.as_bytes());
        out.entry(name.as_str().to_string())
            .and_modify(|e| {
                e.push_str(", ");
                e.push_str(&v);
            })
            .or_insert_with(|| v.into_owned());
    }
    out
}

/// Serve one accepted TCP connection (HTTP/1.1 with keep-alive) to completion.
pub async fn serve_connection(shared: Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| handle(Arc::clone(&shared), req));
    // Errors here are client disconnects or injected resets.
    let _ =
        http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), service).with_upgrades().await;
}

/// The hyper service function.
pub async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, ResetConnection> {
    let ts_ms = u64::try_from(unix_now().as_millis()).unwrap_or(0);
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let headers = header_map(req.headers());

    if let Some(route) = realtime::parse_route(&method, &path, &query) {
        let info = RequestInfo { ts_ms, method, path, query, headers, body: Bytes::new() };
        return realtime_connect(shared, req, info, route).await;
    }

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
        // hyper drops this future when the client closes the connection.
        Outcome::Hang => std::future::pending().await,
        Outcome::Reply(reply) => {
            sleep_ms(reply.latency_ms).await;
            Ok(reply_response(&shared, reply))
        }
        // Only realtime requests are upgraded.
        Outcome::Upgrade(_) => Ok(json_response(&shared, 404, &openai::resource_not_found())),
    }
}

/// Whether a comma-separated header holds `token` (case-insensitively).
fn header_has_token(headers: &hyper::HeaderMap, name: hyper::header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// The `Sec-WebSocket-Key` of a well-formed websocket upgrade request.
fn websocket_key(req: &Request<Incoming>) -> Option<HeaderValue> {
    use hyper::header::{CONNECTION, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE};
    let h = req.headers();
    let ok = req.version() == hyper::Version::HTTP_11
        && header_has_token(h, CONNECTION, "upgrade")
        && header_has_token(h, UPGRADE, "websocket")
        && h.get(SEC_WEBSOCKET_VERSION).is_some_and(|v| v == "13");
    ok.then(|| h.get(SEC_WEBSOCKET_KEY).cloned()).flatten()
}

/// A realtime request: decided by [`Mock::handle_realtime`]; when accepted,
/// a 101 and the websocket session on a task of its own.
async fn realtime_connect(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    info: RequestInfo,
    route: RealtimeRoute,
) -> Result<Response<Body>, ResetConnection> {
    let key = websocket_key(&req);
    let now_ms = shared.now_ms();
    let outcome = shared.lock().handle_realtime(info, route, key.is_some(), now_ms);
    let (upgrade, key) = match (outcome, key) {
        (Outcome::Upgrade(u), Some(key)) => (u, key),
        (Outcome::Reset { latency_ms }, _) => {
            sleep_ms(latency_ms).await;
            return Err(ResetConnection);
        }
        (Outcome::Hang, _) => std::future::pending().await,
        (Outcome::Reply(reply), _) => {
            sleep_ms(reply.latency_ms).await;
            return Ok(reply_response(&shared, reply));
        }
        // handle_realtime upgrades only requests with a key.
        (Outcome::Upgrade(_), None) => return Err(ResetConnection),
    };
    let Upgrade { headers, latency_ms, session, reset_after_events, events } = upgrade;
    sleep_ms(latency_ms).await;
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            run_session(ws, session, reset_after_events, &events).await;
        }
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(hyper::header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(hyper::header::UPGRADE, HeaderValue::from_static("websocket"));
    let accept = derive_accept_key(key.as_bytes());
    h.insert(hyper::header::SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&accept).map_err(|_| ResetConnection)?);
    h.insert("x-mock-backend", shared.name.clone());
    for (name, value) in headers {
        h.insert(name, value);
    }
    Ok(resp)
}

/// Speak the realtime protocol (see [`crate::realtime`]) until the client
/// closes; with `reset_after`, drop the connection (no close frame) once
/// that many server events were sent.
async fn run_session<S>(
    mut ws: WebSocketStream<S>,
    mut session: Session,
    reset_after: Option<usize>,
    events: &AtomicU64,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut sent = 0usize;
    let mut pending = vec![(session.created(), 0)];
    loop {
        for (event, delay_ms) in pending.drain(..) {
            sleep_ms(delay_ms).await;
            if reset_after == Some(sent) {
                return;
            }
            if ws.send(Message::text(event.to_string())).await.is_err() {
                return;
            }
            sent += 1;
        }
        let Some(Ok(msg)) = ws.next().await else { return };
        pending = match msg {
            Message::Text(text) => {
                events.fetch_add(1, Ordering::Relaxed);
                session.on_text(text.as_str())
            }
            Message::Binary(_) => {
                events.fetch_add(1, Ordering::Relaxed);
                session.on_binary()
            }
            // tungstenite queues the pong (or the close reply); send it now.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {
                if ws.flush().await.is_err() {
                    return;
                }
                Vec::new()
            }
        };
    }
}

fn reply_response(shared: &Shared, reply: Reply) -> Response<Body> {
    let mut resp = match (reply.body, reply.reset_after_events) {
        (ReplyBody::Json(v), None) => json_response(shared, reply.status, &v),
        (ReplyBody::Json(v), Some(_)) => {
            cut_response(shared, reply.status, "application/json", Bytes::from(v.to_string()))
        }
        (ReplyBody::Raw { content_type, bytes }, None) => response(shared, reply.status, content_type, full(bytes)),
        (ReplyBody::Raw { content_type, bytes }, Some(_)) => cut_response(shared, reply.status, content_type, bytes),
        (ReplyBody::Stream(plan), cut) => {
            stream_response(shared, reply.status, plan, reply.stream_delay_ms, reply.stream_pause, cut)
        }
    };
    for (name, value) in reply.headers {
        resp.headers_mut().insert(name, value);
    }
    resp
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
            let result = match serde_json::from_slice::<Value>(body) {
                Ok(parsed) => {
                    let mut mock = shared.lock();
                    mock.apply_config(&parsed).map(|()| mock.config_json())
                }
                Err(e) => Err(format!("invalid JSON: {e}")),
            };
            match result {
                Ok(v) => json_response(shared, 200, &v),
                Err(msg) => json_response(shared, 400, &openai::error_body("BadRequest", &msg)),
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

    /// One control request on its own connection; the JSON answer.
    async fn control_call(addr: std::net::SocketAddr, request: String) -> Value {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let text = read_response(&mut s).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap()
    }

    async fn fail_next(addr: std::net::SocketAddr, list: Value) {
        control_call(addr, post("/_mock/config", &json!({ "fail_next": list }).to_string())).await;
    }

    async fn stats(addr: std::net::SocketAddr) -> Value {
        control_call(addr, "GET /_mock/stats HTTP/1.1\r\nhost: x\r\n\r\n".to_string()).await
    }

    /// Everything the server sends until it closes the connection (EOF or reset).
    async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
        let mut all = Vec::new();
        let mut tmp = [0u8; 4096];
        loop {
            let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut tmp)).await;
            match read.expect("server did not close the connection") {
                Ok(0) | Err(_) => return all,
                Ok(n) => all.extend_from_slice(&tmp[..n]),
            }
        }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[tokio::test]
    async fn reset_after_events_cuts_a_stream() {
        let addr = start(Settings::new("eastus")).await;
        fail_next(addr, json!([{"reset_after_events": 2}])).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(post(CHAT, r#"{"messages":[],"stream":true}"#).as_bytes()).await.unwrap();
        let raw = read_until_closed(&mut s).await;
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("transfer-encoding: chunked"), "{text}");
        assert_eq!(text.matches("data: ").count(), 2, "{text}");
        assert!(!text.contains("[DONE]"), "{text}");
        assert!(!text.ends_with("0\r\n\r\n"), "no terminating chunk: {text:?}");
        let rec = &stats(addr).await["requests"][0];
        assert_eq!((&rec["status"], &rec["fault"]), (&json!(200), &json!("reset_after_events")));
    }

    #[tokio::test]
    async fn reset_after_events_cuts_a_json_body() {
        let addr = start(Settings::new("eastus")).await;
        fail_next(addr, json!([{"reset_after_events": 0}])).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(post(CHAT, r#"{"messages":[]}"#).as_bytes()).await.unwrap();
        let raw = read_until_closed(&mut s).await;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{text}");
        let announced: usize = head.lines().find_map(|l| l.strip_prefix("content-length: ")).unwrap().parse().unwrap();
        assert!(!body.is_empty() && body.len() < announced, "{} of {announced}: {body}", body.len());
        assert!(body.starts_with('{') && serde_json::from_str::<Value>(body).is_err(), "{body}");
    }

    #[tokio::test]
    async fn hang_holds_the_connection_and_hang_ms_delays() {
        let addr = start(Settings::new("eastus")).await;
        fail_next(addr, json!([{"hang": true}, {"hang_ms": 150}])).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(post(CHAT, r#"{"messages":[]}"#).as_bytes()).await.unwrap();
        let mut tmp = [0u8; 64];
        let waited = tokio::time::timeout(Duration::from_millis(300), s.read(&mut tmp)).await;
        assert!(waited.is_err(), "expected silence with the connection open, got {waited:?}");
        let rec = &stats(addr).await["requests"][0];
        assert_eq!((&rec["status"], &rec["fault"]), (&json!(0), &json!("hang")));
        drop(s);

        let mut s = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        s.write_all(post(CHAT, r#"{"messages":[]}"#).as_bytes()).await.unwrap();
        let r = read_response(&mut s).await;
        assert!(r.starts_with("HTTP/1.1 200") && r.contains("Hello from eastus"), "{r}");
        assert!(started.elapsed() >= Duration::from_millis(140), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn injected_headers_reach_the_wire_even_when_not_utf8() {
        let addr = start(Settings::new("eastus")).await;
        fail_next(
            addr,
            json!([
                {"status": 503, "headers": {"x-ms-region": "East US"}, "raw_headers": [["x-bin", "ff fe"]]},
                {"status": 200, "raw_headers": [["x-bin", "41 ff"]]}
            ]),
        )
        .await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(post(CHAT, r#"{"messages":[]}"#).as_bytes()).await.unwrap();
        let r = read_response(&mut s).await;
        assert!(r.starts_with("HTTP/1.1 503") && r.contains("ServiceUnavailable"), "{r}");
        assert!(r.contains("x-ms-region: East US\r\n") && r.contains("x-mock-injected: true"), "{r}");
        assert!(r.contains("x-bin: \u{fffd}\u{fffd}\r\n"), "{r}");
        // Raw bytes: read again and look at the bytes themselves.
        s.write_all(post(CHAT, r#"{"messages":[]}"#).as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let mut tmp = [0u8; 4096];
        while !contains(&raw, b"Hello from eastus") {
            let n = s.read(&mut tmp).await.unwrap();
            assert!(n > 0);
            raw.extend_from_slice(&tmp[..n]);
        }
        assert!(raw.starts_with(b"HTTP/1.1 200"));
        assert!(contains(&raw, b"\r\nx-bin: A\xff\r\n"), "{:?}", String::from_utf8_lossy(&raw));
    }

    #[tokio::test]
    async fn request_headers_that_are_not_utf8_are_served_and_recorded() {
        let addr = start(Settings::new("eastus")).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let body = r#"{"messages":[]}"#;
        let mut request = format!(
            "POST {CHAT} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(b"x-proxy-said: caf\xe9 \xff\xfe\r\nx-proxy-said: ok\r\n\r\n");
        request.extend_from_slice(body.as_bytes());
        s.write_all(&request).await.unwrap();
        let r = read_response(&mut s).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let rec = &stats(addr).await["requests"][0];
        assert_eq!(rec["headers"]["x-proxy-said"], "caf\u{fffd} \u{fffd}\u{fffd}, ok");
        assert_eq!(rec["fault"], Value::Null);
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

    /// Read one chunked response until its terminating chunk.
    async fn read_chunked(s: &mut TcpStream) -> String {
        let mut all = Vec::new();
        let mut tmp = [0u8; 4096];
        while !all.ends_with(b"\r\n0\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut tmp)).await.unwrap().unwrap();
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&all));
            all.extend_from_slice(&tmp[..n]);
        }
        String::from_utf8(all).unwrap()
    }

    #[tokio::test]
    async fn stream_error_before_content_on_the_wire() {
        let mut settings = Settings::new("eastus");
        settings.provisioned = true;
        let addr = start(settings).await;
        control_call(addr, post("/_mock/config", r#"{"requests_per_window": 4}"#)).await;
        fail_next(addr, json!([{"stream_error_before_content": true}])).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(post(CHAT, r#"{"messages":[],"stream":true}"#).as_bytes()).await.unwrap();
        // The body ends with its terminating chunk: a normal end, no reset.
        let text = read_chunked(&mut s).await;
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200") && head.contains("content-type: text/event-stream"), "{head}");
        assert!(head.contains("x-ratelimit-remaining-requests: 3\r\n"), "{head}");
        assert!(head.contains("x-ratelimit-limit-requests: 4\r\n"), "{head}");
        assert!(head.contains("azure-openai-deployment-utilization: 25.0%\r\n"), "{head}");
        let events: Vec<&str> = body.lines().filter(|l| l.starts_with("data: ")).collect();
        assert_eq!(
            events,
            [
                r#"data: {"id":"","object":"","created":0,"model":"","choices":[],"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}]}"#,
                r#"data: {"error":{"code":"server_error","message":"The server had an error while processing your request. Sorry about that!","param":null,"type":"server_error"}}"#
            ]
        );
        assert!(body.contains("\"type\":\"server_error\"}}\n\n"), "a blank line ends the event: {body:?}");
        let rec = &stats(addr).await["requests"][0];
        assert_eq!((&rec["status"], &rec["fault"]), (&json!(200), &json!("stream_error_before_content")));
    }

    #[tokio::test]
    async fn first_content_delay_ms_sends_the_head_then_waits() {
        let addr = start(Settings::new("eastus")).await;
        fail_next(addr, json!([{"first_content_delay_ms": 300}])).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        s.write_all(post(CHAT, r#"{"messages":[],"stream":true}"#).as_bytes()).await.unwrap();
        let mut all = Vec::new();
        let mut tmp = [0u8; 4096];
        let (mut metadata_at, mut role_at) = (None, None);
        while !contains(&all, b"data: [DONE]") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut tmp)).await.unwrap().unwrap();
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&all));
            all.extend_from_slice(&tmp[..n]);
            if metadata_at.is_none() && contains(&all, b"prompt_filter_results") {
                metadata_at = Some(started.elapsed());
                assert!(!contains(&all, b"chat.completion.chunk"), "only the metadata chunk comes at once");
            }
            if role_at.is_none() && contains(&all, b"\"role\":\"assistant\"") {
                role_at = Some(started.elapsed());
            }
        }
        let text = String::from_utf8_lossy(&all);
        assert!(text.starts_with("HTTP/1.1 200") && text.contains("Hello ") && text.contains("eastus "), "{text}");
        assert!(metadata_at.unwrap() < Duration::from_millis(250), "{metadata_at:?}");
        assert!(role_at.unwrap() >= Duration::from_millis(290), "{role_at:?}");
        let rec = &stats(addr).await["requests"][0];
        assert_eq!((&rec["status"], &rec["fault"]), (&json!(200), &json!("first_content_delay_ms")));
    }

    #[tokio::test]
    async fn responses_stream_over_http_then_follow_up() {
        let mut settings = Settings::new("eastus");
        settings.stream_chunks = 3;
        let addr = start(settings).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let create = r#"{"model":"gpt-4o","input":"hi","stream":true}"#;
        s.write_all(post("/openai/v1/responses", create).as_bytes()).await.unwrap();
        let text = read_chunked(&mut s).await;
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200") && head.contains("content-type: text/event-stream"), "{head}");
        assert!(head.contains("transfer-encoding: chunked") && head.contains("x-mock-backend: eastus"), "{head}");
        let names: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
        assert_eq!(names.len(), 4 + 3 + 4, "{body}");
        assert_eq!(
            (names[0], names[4], names[10]),
            ("response.created", "response.output_text.delta", "response.completed")
        );
        assert!(!body.contains("[DONE]"), "{body}");
        let completed: Value = body
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .unwrap();
        let id = completed["response"]["id"].as_str().unwrap().to_string();
        assert_eq!(completed["response"]["usage"]["output_tokens"], 3);

        // Same connection: a follow-up continues the conversation.
        let follow = json!({"model": "gpt-4o", "input": "more", "previous_response_id": id}).to_string();
        s.write_all(post("/v1/responses", &follow).as_bytes()).await.unwrap();
        let r = read_response(&mut s).await;
        assert!(r.starts_with("HTTP/1.1 200") && r.contains("Hello from eastus (turn 2)"), "{r}");
        let recs = stats(addr).await["requests"].clone();
        assert_eq!(
            (&recs[0]["stream"], &recs[0]["status"], &recs[0]["deployment"]),
            (&json!(true), &json!(200), &json!("gpt-4o"))
        );
        assert_eq!(recs[1]["body_json"]["previous_response_id"], id.as_str());
    }

    #[tokio::test]
    async fn multipart_upload_over_http_then_download() {
        let addr = start(Settings::new("eastus")).await;
        let data: &[u8] = b"{\"a\":1}\r\n--\r\n\x00\xff{\"b\":2}\n";
        let body = crate::multipart::tests::httpx_body(
            &[("purpose", "batch")],
            &[("file", "batch.jsonl", "application/octet-stream", data)],
        );
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /openai/files?api-version=2024-10-21 HTTP/1.1\r\nhost: x\r\ncontent-type: {}\r\ncontent-length: {}\r\n\r\n",
            crate::multipart::tests::content_type(),
            body.len()
        );
        s.write_all(&[head.as_bytes(), &body].concat()).await.unwrap();
        let r = read_response(&mut s).await;
        assert!(r.starts_with("HTTP/1.1 200") && r.contains("content-type: application/json"), "{r}");
        let file: Value = serde_json::from_str(r.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!((&file["bytes"], &file["filename"]), (&json!(data.len()), &json!("batch.jsonl")));

        // Same connection: the content comes back byte for byte.
        let get = format!("GET /v1/files/{}/content HTTP/1.1\r\nhost: x\r\n\r\n", file["id"].as_str().unwrap());
        s.write_all(get.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let mut tmp = [0u8; 4096];
        while !raw.ends_with(data) {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut tmp)).await.unwrap().unwrap();
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&raw));
            raw.extend_from_slice(&tmp[..n]);
        }
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 200") && text.contains("content-type: application/octet-stream"), "{text}");
        assert!(text.contains(&format!("content-length: {}\r\n", data.len())), "{text}");
        let rec = &stats(addr).await["requests"][0];
        assert_eq!(
            rec["body_json"],
            json!({"purpose": "batch", "file": format!("batch.jsonl ({} bytes)", data.len())})
        );
        assert_eq!((&rec["body_len"], &rec["status"]), (&json!(body.len()), &json!(200)));
    }

    /// The next text frame as JSON (skipping anything else).
    async fn next_event<S>(ws: &mut WebSocketStream<S>) -> Value
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
            if let Message::Text(t) = msg {
                return serde_json::from_str(t.as_str()).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn realtime_over_a_websocket() {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut settings = Settings::new("eastus");
        settings.stream_chunks = 4;
        settings.api_key = Some("k".into());
        settings.deployments = Some(vec!["gpt-rt".into()]);
        let addr = start(settings).await;
        let url = format!("ws://{addr}/openai/v1/realtime?model=gpt-rt");

        // No key: a plain 401 instead of the upgrade.
        let refused = tokio_tungstenite::client_async(url.as_str(), TcpStream::connect(addr).await.unwrap()).await;
        match refused {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
            other => panic!("{other:?}"),
        }

        let mut request = url.as_str().into_client_request().unwrap();
        request.headers_mut().insert("api-key", "k".parse().unwrap());
        let (mut ws, resp) =
            tokio_tungstenite::client_async(request, TcpStream::connect(addr).await.unwrap()).await.unwrap();
        assert_eq!(resp.status(), 101);
        assert_eq!(resp.headers()["x-mock-backend"], "eastus");
        let created = next_event(&mut ws).await;
        assert_eq!((&created["type"], &created["session"]["model"]), (&json!("session.created"), &json!("gpt-rt")));
        ws.send(Message::Ping(Bytes::from_static(b"hi"))).await.unwrap();
        let pong = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(pong, Message::Pong(Bytes::from_static(b"hi")));
        let item = json!({"type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello there"}]}});
        ws.send(Message::text(item.to_string())).await.unwrap();
        assert_eq!(next_event(&mut ws).await["type"], "conversation.item.created");
        ws.send(Message::text(r#"{"type":"response.create"}"#)).await.unwrap();
        assert_eq!(next_event(&mut ws).await["type"], "response.created");
        let mut text = String::new();
        let done = loop {
            let ev = next_event(&mut ws).await;
            match ev["type"].as_str().unwrap() {
                "response.output_text.delta" => text.push_str(ev["delta"].as_str().unwrap()),
                "response.output_text.done" => {}
                "response.done" => break ev,
                other => panic!("unexpected {other}: {ev}"),
            }
        };
        assert_eq!(text, "Hello from eastus part3 ");
        let usage = &done["response"]["usage"];
        assert_eq!(usage["output_tokens"], 4);
        assert_eq!(usage["total_tokens"], usage["input_tokens"].as_u64().unwrap() + 4);
        ws.close(None).await.unwrap();
        // The server answers the close frame, then the stream ends.
        let end = tokio::time::timeout(Duration::from_secs(5), async { while let Some(Ok(_)) = ws.next().await {} });
        end.await.unwrap();

        let recs = stats(addr).await["requests"].clone();
        assert_eq!((&recs[0]["status"], &recs[0]["ws_events"]), (&json!(401), &Value::Null));
        let rec = &recs[1];
        assert_eq!(
            (&rec["method"], &rec["path"], &rec["query"]),
            (&json!("GET"), &json!("/openai/v1/realtime"), &json!("model=gpt-rt"))
        );
        assert_eq!(
            (&rec["status"], &rec["deployment"], &rec["headers"]["api-key"]),
            (&json!(101), &json!("gpt-rt"), &json!("k"))
        );
        assert_eq!(rec["ws_events"], 2, "item create and response create");
    }

    #[tokio::test]
    async fn realtime_reset_after_events_drops_the_socket() {
        let addr = start(Settings::new("eastus")).await;
        fail_next(addr, json!([{"reset_after_events": 1}])).await;
        let url = format!("ws://{addr}/openai/realtime?api-version=2024-10-01-preview&deployment=d");
        let (mut ws, _) =
            tokio_tungstenite::client_async(url.as_str(), TcpStream::connect(addr).await.unwrap()).await.unwrap();
        assert_eq!(next_event(&mut ws).await["type"], "session.created");
        let _ = ws.send(Message::text(r#"{"type":"response.create"}"#)).await;
        let next = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap();
        let clean = matches!(next, Some(Ok(Message::Text(_) | Message::Close(_))));
        assert!(!clean, "expected an abrupt end: {next:?}");
    }
}
