//! The mock's mutable state (runtime settings, quota, injected faults, stats)
//! and the synchronous request decision. No I/O happens here: the server layer
//! turns an [`Outcome`] into bytes on the wire (sleeping for latency/stream
//! delays, cutting bodies short, hanging), so the whole decision logic is
//! unit-testable with a fake clock.
//!
//! A data-plane request goes through, in order: the route (unknown path, or
//! a method the path does not take: 404, no fault used), the next queued
//! [`Fault`] (see [`crate::fault`]), then the normal checks — key,
//! `api-version`, body (JSON object, or `multipart/form-data` for uploads,
//! audio and image edits), model, deployment allow-list, the operation's own
//! checks (a Responses API create's `previous_response_id`, an audio or image
//! edit form's parts), quota — and finally the generated answer. Requests on
//! this backend's stored objects (`.../responses/{id}...`, `.../files...`,
//! `.../batches...`) check the key, `api-version` and their body, and use no
//! quota (see [`crate::responses`], [`crate::files`], [`crate::batches`]).
//! Faults that keep the request on the normal path (`hang_ms`,
//! `reset_after_events`, `status` < 400, and for a stream request
//! `stream_error_before_content`, `first_content_delay_ms`) shape how that
//! answer is delivered.
//!
//! Rate-limit headers: every answer to a data-plane request reports what is
//! left of each quota limit that is set and (`limit_headers`) the limit
//! itself; a `provisioned` mock adds its utilisation to successes and quota
//! 429s (see [`Quota::used_permille`]).
//!
//! Every data-plane request is recorded for `/_mock/stats`, faulted ones too:
//! the record's `status` is what the response head said (0 when no head was
//! sent: `reset`, `hang`) and `fault` names the `fail_next` kind it used
//! ([`Fault::kind`]; `null` when the queue was empty). A form's record shows
//! its fields as `body_json` ([`Form::summary`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hyper::header::{HeaderName, HeaderValue, RETRY_AFTER};
use serde::Serialize;
use serde_json::{json, Value};

use crate::audio;
use crate::batches::{BatchStore, Runner};
use crate::fault::{self, Fault, Headers};
use crate::files::FileStore;
use crate::multipart::Form;
use crate::openai::{self, Ctx, Operation, Route, StreamPlan};
use crate::quota::{LimitKind, Quota, Remaining};
use crate::realtime::{RealtimeRoute, Session};
use crate::responses::ResponseStore;
use crate::usage::Tally;

/// Request records kept for `/_mock/stats`.
pub const MAX_RECORDS: usize = 2000;
/// Bodies larger than this are counted but not stored in stats (for a form:
/// when its text fields are larger).
pub const MAX_STORED_BODY: usize = 64 * 1024;

/// Runtime-changeable behaviour (besides the quota limits, which live in [`Quota`]).
#[derive(Debug, Clone)]
pub struct Settings {
    pub name: String,
    pub api_key: Option<String>,
    pub deployments: Option<Vec<String>>,
    pub latency_ms: u64,
    pub stream_chunks: usize,
    pub stream_chunk_delay_ms: u64,
    /// false = omit `retry-after`/`retry-after-ms` on quota 429s.
    pub retry_after_header: bool,
    /// Send `x-ratelimit-limit-*` next to `x-ratelimit-remaining-*`.
    pub limit_headers: bool,
    /// Act as a provisioned (PTU) deployment: successes and quota 429s carry
    /// `azure-openai-deployment-utilization`.
    pub provisioned: bool,
}

impl Settings {
    pub fn new(name: &str) -> Self {
        Settings {
            name: name.to_string(),
            api_key: None,
            deployments: None,
            latency_ms: 0,
            stream_chunks: 5,
            stream_chunk_delay_ms: 0,
            retry_after_header: true,
            limit_headers: true,
            provisioned: false,
        }
    }
}

/// One request as seen by `/_mock/stats`.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub ts_ms: u64,
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: BTreeMap<String, String>,
    pub body_len: usize,
    pub body_json: Value,
    pub deployment: Option<String>,
    /// The response head's status; 0 when none was sent (`reset`, `hang`).
    pub status: u16,
    pub stream: bool,
    /// The `fail_next` kind this request used ([`Fault::kind`]), if any.
    pub fault: Option<&'static str>,
    /// Realtime connections that were upgraded (status 101): the client
    /// events (text or binary frames) received so far; null otherwise.
    #[serde(serialize_with = "serialize_counter")]
    pub ws_events: Option<Arc<AtomicU64>>,
}

fn serialize_counter<S: serde::Serializer>(c: &Option<Arc<AtomicU64>>, s: S) -> Result<S::Ok, S::Error> {
    match c {
        Some(c) => s.serialize_u64(c.load(Ordering::Relaxed)),
        None => s.serialize_none(),
    }
}

/// A data-plane request, already fully read.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    /// Wall-clock time of arrival (unix ms), for stats.
    pub ts_ms: u64,
    pub method: String,
    pub path: String,
    pub query: String,
    /// Lowercased names; repeated headers joined with ", "; values decoded
    /// lossily (bytes that are not UTF-8 become U+FFFD).
    pub headers: BTreeMap<String, String>,
    pub body: bytes::Bytes,
}

#[derive(Debug)]
pub enum ReplyBody {
    Json(Value),
    Stream(StreamPlan),
    /// Sent as it is: a file's content, a plain-text transcription.
    Raw {
        content_type: &'static str,
        bytes: bytes::Bytes,
    },
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// Sent after the mock's own `content-type` etc.; a later one replaces an
    /// earlier one of the same name.
    pub headers: Headers,
    pub body: ReplyBody,
    /// Sleep before sending the response head.
    pub latency_ms: u64,
    /// Sleep before each stream content event.
    pub stream_delay_ms: u64,
    /// Abort the connection mid-body (`reset_after_events`): after this many
    /// events of a stream; after half the bytes of any other body.
    pub reset_after_events: Option<usize>,
    /// `(i, ms)`: sleep `ms` more before the stream's event `i`, once the
    /// ones before it are sent (`first_content_delay_ms`: a slow first token
    /// after an early head).
    pub stream_pause: Option<(usize, u64)>,
}

#[derive(Debug)]
pub enum Outcome {
    Reply(Reply),
    /// Drop the connection (after `latency_ms`) without responding.
    Reset {
        latency_ms: u64,
    },
    /// Never respond; keep the connection until the client closes it.
    Hang,
    /// Switch a realtime request to the websocket protocol (101).
    Upgrade(Upgrade),
}

/// An accepted realtime connection.
#[derive(Debug)]
pub struct Upgrade {
    /// Sent with the 101, after the mock's own headers.
    pub headers: Headers,
    /// Sleep before sending the 101.
    pub latency_ms: u64,
    pub session: Session,
    /// Close the connection abruptly (no close frame) after this many server
    /// events (`reset_after_events`).
    pub reset_after_events: Option<usize>,
    /// Client events received; shown as the record's `ws_events`.
    pub events: Arc<AtomicU64>,
}

impl Outcome {
    /// The status recorded in stats: 0 when no response head is sent.
    fn status(&self) -> u16 {
        match self {
            Outcome::Reply(r) => r.status,
            Outcome::Reset { .. } | Outcome::Hang => 0,
            Outcome::Upgrade(_) => 101,
        }
    }
}

/// Everything mutable, behind one mutex in the server.
#[derive(Debug)]
pub struct Mock {
    pub settings: Settings,
    pub quota: Quota,
    faults: VecDeque<Fault>,
    total: u64,
    by_status: BTreeMap<String, u64>,
    records: VecDeque<Record>,
    next_id: u64,
    next_image: u64,
    /// Responses API responses created here; kept across `/_mock/reset`.
    responses: ResponseStore,
    /// Files uploaded here (and batch outputs); kept across `/_mock/reset`.
    files: FileStore,
    /// Batches created here; kept across `/_mock/reset`.
    batches: BatchStore,
    /// Tokens billed in answers, per deployment (`usage` in stats).
    usage: Tally,
}

/// What a data-plane route implies for one request.
struct Call {
    op: Operation,
    /// `/openai/deployments/...` routes require `api-version`.
    needs_api_version: bool,
    api_version: Option<String>,
    /// From the path, or the body's (form's) `model` on v1 routes.
    deployment: Option<String>,
    /// A request on this backend's stored objects (no deployment, no quota).
    stored: bool,
    /// The stored object the route names (`.../responses/{id}`, ...).
    object_id: Option<String>,
    /// A stream was asked for: the body's `stream`, or `?stream=true` on a
    /// response GET.
    stream: bool,
    /// The body, when it is a `multipart/form-data` form.
    form: Option<Form>,
}

impl Call {
    fn new(route: Route, query: &str, parsed: Option<&Value>, form: Option<Form>) -> Self {
        let (op, needs_api_version) = (route.op(), route.needs_api_version());
        let api_version = openai::query_param(query, "api-version").filter(|v| !v.is_empty()).map(str::to_string);
        let (deployment, stored, object_id) = match route {
            Route::Classic { deployment, .. } => (Some(deployment), false, None),
            Route::ModelInBody { .. } => {
                (parsed.and_then(|b| b.get("model")).and_then(Value::as_str).map(str::to_string), false, None)
            }
            Route::Stored { id, .. } => (None, true, id),
        };
        let stream = match op {
            Operation::GetResponse => openai::query_param(query, "stream") == Some("true"),
            _ => parsed.is_some_and(openai::wants_stream),
        };
        Call { op, needs_api_version, api_version, deployment, stored, object_id, stream, form }
    }

    /// Whether a 200 answer is a stream (what the stream faults act on).
    fn streams(&self) -> bool {
        self.stream && (self.op.can_stream() || self.op == Operation::GetResponse)
    }

    /// The `api-version` named in error messages.
    fn api_version_text(&self) -> &str {
        self.api_version.as_deref().unwrap_or(openai::DEFAULT_API_VERSION)
    }
}

/// A decided status, headers and body, before delivery (latency, cuts).
struct Answer {
    status: u16,
    headers: Headers,
    body: ReplyBody,
}

impl Answer {
    fn json(status: u16, headers: Headers, body: Value) -> Self {
        Answer { status, headers, body: ReplyBody::Json(body) }
    }
}

/// A request the normal checks turned down: status and error body.
pub type Refusal = (u16, Value);

/// A provisioned deployment's share of its quota in use, e.g. `87.5%`.
pub const UTILIZATION_HEADER: &str = "azure-openai-deployment-utilization";

fn remaining_headers(r: Remaining) -> Headers {
    let mut headers = Headers::new();
    if let Some(n) = r.requests {
        headers.push((HeaderName::from_static("x-ratelimit-remaining-requests"), HeaderValue::from(n)));
    }
    if let Some(n) = r.tokens {
        headers.push((HeaderName::from_static("x-ratelimit-remaining-tokens"), HeaderValue::from(n)));
    }
    headers
}

/// `x-ratelimit-limit-*` for the limits that are set (the same ones
/// `x-ratelimit-remaining-*` reports on).
fn limit_headers(quota: &Quota) -> Headers {
    let mut headers = Headers::new();
    if let Some(n) = quota.requests_per_window {
        headers.push((HeaderName::from_static("x-ratelimit-limit-requests"), HeaderValue::from(n)));
    }
    if let Some(n) = quota.tokens_per_window {
        headers.push((HeaderName::from_static("x-ratelimit-limit-tokens"), HeaderValue::from(n)));
    }
    headers
}

/// A realtime request may also carry the key as the `api-key` query parameter.
fn authorized_realtime(key: &str, req: &RequestInfo) -> bool {
    authorized(key, &req.headers) || openai::query_param(&req.query, "api-key") == Some(key)
}

fn authorized(key: &str, headers: &BTreeMap<String, String>) -> bool {
    if headers.get("api-key").is_some_and(|v| v == key) {
        return true;
    }
    headers.get("authorization").is_some_and(|v| {
        v.split_once(' ').is_some_and(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer") && token.trim() == key)
    })
}

/// An injected error (`fail_next` `status` >= 400); `quota_headers`: the
/// rate-limit headers, nothing charged.
fn injected_answer(status: u16, fault_headers: &Headers, call: &Call, quota_headers: Headers) -> Answer {
    let mut headers = quota_headers;
    headers.push((HeaderName::from_static("x-mock-injected"), HeaderValue::from_static("true")));
    headers.extend(fault_headers.iter().cloned());
    let retry_after = fault::last_retry_after(fault_headers);
    let body = openai::injected_error(status, call.op, call.api_version_text(), retry_after);
    Answer::json(status, headers, body)
}

/// The checks every route makes first: key, then `api-version`.
fn check_access(settings: &Settings, req: &RequestInfo, call: &Call) -> Result<(), Refusal> {
    if let Some(key) = &settings.api_key {
        if !authorized(key, &req.headers) {
            return Err((401, openai::access_denied()));
        }
    }
    if call.needs_api_version && call.api_version.is_none() {
        return Err((404, openai::resource_not_found()));
    }
    Ok(())
}

/// The form of a form operation.
fn form_of(call: &Call) -> Result<&Form, Refusal> {
    call.form.as_ref().ok_or_else(|| (400, openai::not_multipart()))
}

/// The body as the operation takes it: a JSON object, or for a form
/// operation ([`Operation::takes_form`]) a form (its fields, as an object).
fn body_of<'a>(parsed: Option<&'a Value>, call: &Call) -> Result<&'a Value, Refusal> {
    if call.op.takes_form() {
        form_of(call)?;
    } else if call.form.is_some() {
        return Err((400, openai::error_body("BadRequest", NOT_JSON)));
    }
    match parsed {
        Some(b @ Value::Object(_)) => Ok(b),
        Some(_) => Err((400, openai::error_body("BadRequest", "The request body must be a JSON object."))),
        None => Err((400, openai::error_body("BadRequest", NOT_JSON))),
    }
}

/// The normal checks, in Azure's order: key, `api-version`, body (JSON
/// object or form), model, deployment allow-list. Returns the body and the model.
fn check<'a>(
    settings: &Settings,
    req: &RequestInfo,
    parsed: Option<&'a Value>,
    call: &'a Call,
) -> Result<(&'a Value, &'a str), Refusal> {
    check_access(settings, req, call)?;
    let body = body_of(parsed, call)?;
    let Some(model) = call.deployment.as_deref() else {
        return Err((400, openai::error_body("BadRequest", "you must provide a model parameter")));
    };
    if settings.deployments.as_ref().is_some_and(|list| !list.iter().any(|d| d == model)) {
        return Err((404, openai::deployment_not_found()));
    }
    Ok((body, model))
}

/// A realtime request's checks, in order: key, `api-version` (preview),
/// deployment (present, allow-list), the websocket upgrade headers.
fn check_realtime(settings: &Settings, req: &RequestInfo, call: &Call, upgrade: bool) -> Result<(), Refusal> {
    if let Some(key) = &settings.api_key {
        if !authorized_realtime(key, req) {
            return Err((401, openai::access_denied()));
        }
    }
    if call.needs_api_version && call.api_version.is_none() {
        return Err((404, openai::resource_not_found()));
    }
    let Some(model) = call.deployment.as_deref() else {
        let param = if call.needs_api_version { "deployment" } else { "model" };
        return Err((400, openai::missing_parameter(param)));
    };
    if settings.deployments.as_ref().is_some_and(|list| !list.iter().any(|d| d == model)) {
        return Err((404, openai::deployment_not_found()));
    }
    if !upgrade {
        let msg = "This endpoint takes a websocket upgrade (Connection: Upgrade, Upgrade: websocket).";
        return Err((400, openai::error_body("BadRequest", msg)));
    }
    Ok(())
}

/// What a stats record shows of a body: its JSON, or a form's fields
/// ([`Form::summary`]); null when not JSON or too large to keep.
fn shown_body(req: &RequestInfo, parsed: Option<&Value>, form: Option<&Form>) -> Value {
    let kept = form.map_or(req.body.len(), Form::text_len);
    if kept <= MAX_STORED_BODY {
        parsed.cloned().unwrap_or(Value::Null)
    } else {
        Value::Null
    }
}

const NOT_JSON: &str = "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)";

impl Mock {
    pub fn new(settings: Settings, quota: Quota) -> Self {
        let responses = ResponseStore::new(&settings.name);
        let (files, batches) = (FileStore::new(&settings.name), BatchStore::new(&settings.name));
        Mock {
            settings,
            quota,
            faults: VecDeque::new(),
            total: 0,
            by_status: BTreeMap::new(),
            records: VecDeque::new(),
            next_id: 1,
            next_image: 1,
            responses,
            files,
            batches,
            usage: Tally::default(),
        }
    }

    /// `/_mock/reset`: clear stats, quota window and fault queue (stored
    /// responses, files and batches stay, as on Azure).
    pub fn reset(&mut self) {
        self.quota.reset();
        self.faults.clear();
        self.total = 0;
        self.by_status.clear();
        self.records.clear();
        self.usage.clear();
    }

    pub fn stats_json(&self) -> Value {
        json!({
            "name": self.settings.name,
            "requests_total": self.total,
            "by_status": self.by_status,
            "requests": self.records,
            "responses_stored": self.responses.len(),
            "files_stored": self.files.len(),
            "batches_stored": self.batches.len(),
            "usage": self.usage.to_json(),
        })
    }

    pub fn config_json(&self) -> Value {
        let s = &self.settings;
        json!({
            "name": s.name,
            "requests_per_window": self.quota.requests_per_window,
            "tokens_per_window": self.quota.tokens_per_window,
            "window_ms": self.quota.window_ms,
            "latency_ms": s.latency_ms,
            "stream_chunks": s.stream_chunks,
            "stream_chunk_delay_ms": s.stream_chunk_delay_ms,
            "api_key": s.api_key,
            "deployments": s.deployments,
            "retry_after_header": if s.retry_after_header { "keep" } else { "omit" },
            "limit_headers": s.limit_headers,
            "provisioned": s.provisioned,
            "fail_next_pending": self.faults.len(),
        })
    }

    /// Apply a `/_mock/config` body. Validates everything before changing anything.
    pub fn apply_config(&mut self, body: &Value) -> Result<(), String> {
        let obj = body.as_object().ok_or("config body must be a JSON object")?;
        let mut staged = StagedConfig {
            settings: self.settings.clone(),
            quota: self.quota.clone(),
            faults: Vec::new(),
            limits_changed: false,
        };
        for (key, v) in obj {
            staged.apply(key, v)?;
        }
        self.settings = staged.settings;
        self.quota = staged.quota;
        if staged.limits_changed {
            self.quota.reset();
        }
        self.faults.extend(staged.faults);
        Ok(())
    }

    /// Record a request; `call` is `None` when it named no data-plane route.
    fn record(
        &mut self,
        req: RequestInfo,
        parsed: Option<&Value>,
        body_json: Value,
        call: Option<Call>,
        outcome: &Outcome,
        fault: Option<&'static str>,
    ) {
        let status = outcome.status();
        self.total += 1;
        *self.by_status.entry(status.to_string()).or_insert(0) += 1;
        let stream = call.as_ref().map_or_else(|| parsed.is_some_and(openai::wants_stream), |c| c.stream);
        let deployment = call.and_then(|c| c.deployment);
        if self.records.len() >= MAX_RECORDS {
            self.records.pop_front();
        }
        self.records.push_back(Record {
            ts_ms: req.ts_ms,
            method: req.method,
            path: req.path,
            query: req.query,
            headers: req.headers,
            body_len: req.body.len(),
            body_json,
            deployment,
            status,
            stream,
            fault,
            ws_events: match outcome {
                Outcome::Upgrade(u) => Some(Arc::clone(&u.events)),
                _ => None,
            },
        });
    }

    /// Decide a realtime (websocket) connection request and record it.
    /// `upgrade`: the request asked for a websocket upgrade. In order: the
    /// next fault, the key (header, `Authorization: Bearer` or `api-key`
    /// query parameter), `api-version` (preview route), deployment (present,
    /// allow-list), the upgrade headers, quota (one request, no tokens).
    pub fn handle_realtime(&mut self, req: RequestInfo, route: RealtimeRoute, upgrade: bool, now_ms: u64) -> Outcome {
        let call = Call {
            op: Operation::Realtime,
            needs_api_version: route.preview,
            api_version: openai::query_param(&req.query, "api-version").filter(|v| !v.is_empty()).map(str::to_string),
            deployment: route.deployment.clone(),
            stored: false,
            object_id: None,
            stream: false,
            form: None,
        };
        let fault = self.faults.pop_front();
        let kind = fault.as_ref().map(Fault::kind);
        // A websocket is no SSE stream: the stream faults act as on any plain answer.
        let fault = fault.map(|f| f.for_plain_answer());
        let outcome = match &fault {
            Some(Fault::Reset) => Outcome::Reset { latency_ms: self.settings.latency_ms },
            Some(Fault::Hang) => Outcome::Hang,
            Some(Fault::Status { status, headers }) if *status >= 400 => {
                let quota_headers = self.quota_headers(now_ms);
                self.deliver(injected_answer(*status, headers, &call, quota_headers))
            }
            _ => {
                let mut outcome = match self.admit_realtime(&req, &call, upgrade, now_ms) {
                    Ok(headers) => {
                        let id = self.next_id;
                        self.next_id += 1;
                        let s = &self.settings;
                        let deployment = call.deployment.as_deref().unwrap_or_default();
                        let session = Session::new(
                            &s.name,
                            deployment,
                            route.preview,
                            id,
                            s.stream_chunks,
                            s.stream_chunk_delay_ms,
                        );
                        Outcome::Upgrade(Upgrade {
                            headers,
                            latency_ms: s.latency_ms,
                            session,
                            reset_after_events: None,
                            events: Arc::new(AtomicU64::new(0)),
                        })
                    }
                    Err(answer) => self.deliver(answer),
                };
                match (&mut outcome, &fault) {
                    (Outcome::Reply(r), Some(Fault::Status { headers, .. })) => {
                        r.headers.extend(headers.iter().cloned())
                    }
                    (Outcome::Upgrade(u), Some(Fault::Status { headers, .. })) => {
                        u.headers.extend(headers.iter().cloned())
                    }
                    (Outcome::Reply(r), Some(Fault::HangMs(ms))) => r.latency_ms = r.latency_ms.saturating_add(*ms),
                    (Outcome::Upgrade(u), Some(Fault::HangMs(ms))) => u.latency_ms = u.latency_ms.saturating_add(*ms),
                    (Outcome::Reply(r), Some(Fault::ResetAfterEvents(n))) => r.reset_after_events = Some(*n),
                    (Outcome::Upgrade(u), Some(Fault::ResetAfterEvents(n))) => u.reset_after_events = Some(*n),
                    _ => {}
                }
                outcome
            }
        };
        self.record(req, None, Value::Null, Some(call), &outcome, kind);
        outcome
    }

    /// The checks of a realtime request and its quota charge: the
    /// remaining-quota headers for the 101, or the error answer.
    fn admit_realtime(
        &mut self,
        req: &RequestInfo,
        call: &Call,
        upgrade: bool,
        now_ms: u64,
    ) -> Result<Headers, Answer> {
        if let Err((status, err)) = check_realtime(&self.settings, req, call, upgrade) {
            return Err(Answer::json(status, self.quota_headers(now_ms), err));
        }
        self.admit(call, &Value::Null, now_ms)
    }

    /// Decide how to answer a data-plane request and record it in stats.
    /// `now_ms` is the quota clock, `unix_s` the `created` timestamp.
    pub fn handle(&mut self, req: RequestInfo, now_ms: u64, unix_s: u64) -> Outcome {
        let form = Form::from_request(&req.headers, &req.body);
        let parsed: Option<Value> = form.as_ref().map(Form::summary).or_else(|| serde_json::from_slice(&req.body).ok());
        let body_json = shown_body(&req, parsed.as_ref(), form.as_ref());
        let (call, fault, outcome) = match openai::parse_route(&req.method, &req.path) {
            Some(route) => {
                let call = Call::new(route, &req.query, parsed.as_ref(), form);
                let fault = self.faults.pop_front();
                let mut outcome = self.decide(&req, parsed.as_ref(), &call, fault.as_ref(), now_ms, unix_s);
                if let Outcome::Reply(reply) = &mut outcome {
                    apply_delay_headers(reply, &req.headers);
                }
                (Some(call), fault, outcome)
            }
            // Not a data-plane route: no fault is used up.
            None => (None, None, self.deliver(Answer::json(404, Headers::new(), openai::resource_not_found()))),
        };
        self.record(req, parsed.as_ref(), body_json, call, &outcome, fault.as_ref().map(Fault::kind));
        outcome
    }

    /// The outcome of a routed request, with the queued `fault` (if any) applied.
    fn decide(
        &mut self,
        req: &RequestInfo,
        parsed: Option<&Value>,
        call: &Call,
        fault: Option<&Fault>,
        now_ms: u64,
        unix_s: u64,
    ) -> Outcome {
        // The stream faults only shape a stream; without one they act as
        // their plain counterparts (a 500, a `hang_ms`).
        let plain = fault.filter(|_| !call.streams()).map(Fault::for_plain_answer);
        let fault = plain.as_ref().or(fault);
        match fault {
            Some(Fault::Reset) => return Outcome::Reset { latency_ms: self.settings.latency_ms },
            Some(Fault::Hang) => return Outcome::Hang,
            Some(Fault::Status { status, headers }) if *status >= 400 => {
                let quota_headers = self.quota_headers(now_ms);
                return self.deliver(injected_answer(*status, headers, call, quota_headers));
            }
            _ => {}
        }
        let answer = self.serve(req, parsed, call, now_ms, unix_s);
        let generated = answer.status == 200 && !call.stored;
        let mut outcome = self.deliver(answer);
        if let Outcome::Reply(reply) = &mut outcome {
            match fault {
                Some(Fault::Status { headers, .. }) => reply.headers.extend(headers.iter().cloned()),
                Some(Fault::HangMs(ms)) => reply.latency_ms = reply.latency_ms.saturating_add(*ms),
                Some(Fault::ResetAfterEvents(n)) => reply.reset_after_events = Some(*n),
                Some(Fault::StreamErrorBeforeContent) => fail_stream(reply, call.op),
                Some(Fault::FirstContentDelayMs(ms)) => delay_first_content(reply, call.op, *ms),
                _ => {}
            }
            // After the stream faults: a failed stream bills nothing.
            if generated {
                let deployment = call.deployment.as_deref().unwrap_or_default();
                self.usage.count(deployment, &reply.body, reply.reset_after_events);
            }
        }
        outcome
    }

    /// Wrap an answer with the configured delays.
    fn deliver(&self, answer: Answer) -> Outcome {
        Outcome::Reply(Reply {
            status: answer.status,
            headers: answer.headers,
            body: answer.body,
            latency_ms: self.settings.latency_ms,
            stream_delay_ms: self.settings.stream_chunk_delay_ms,
            reset_after_events: None,
            stream_pause: None,
        })
    }

    /// The rate-limit headers every data-plane answer carries: what is left
    /// of each limit that is set and, with `limit_headers`, the limit itself.
    fn ratelimit_headers(&self, left: Remaining) -> Headers {
        let mut headers = remaining_headers(left);
        if self.settings.limit_headers {
            headers.extend(limit_headers(&self.quota));
        }
        headers
    }

    /// [`Self::ratelimit_headers`] at `now_ms`, nothing charged.
    fn quota_headers(&mut self, now_ms: u64) -> Headers {
        let left = self.quota.remaining(now_ms);
        self.ratelimit_headers(left)
    }

    /// A provisioned mock's `azure-openai-deployment-utilization`: the share
    /// of the window's quota used so far, one decimal (`87.5%`); none
    /// without `provisioned` or without limits.
    fn utilization_header(&mut self, now_ms: u64) -> Option<(HeaderName, HeaderValue)> {
        if !self.settings.provisioned {
            return None;
        }
        let permille = self.quota.used_permille(now_ms)?;
        let value = HeaderValue::from_str(&format!("{}.{}%", permille / 10, permille % 10)).ok()?;
        Some((HeaderName::from_static(UTILIZATION_HEADER), value))
    }

    /// The fault-free answer: checks, quota admission, then the generated body.
    fn serve(&mut self, req: &RequestInfo, parsed: Option<&Value>, call: &Call, now_ms: u64, unix_s: u64) -> Answer {
        if call.stored {
            return self.serve_stored(req, parsed, call, now_ms, unix_s);
        }
        let checked = check(&self.settings, req, parsed, call).and_then(|(body, model)| {
            self.validate(call, body)?;
            Ok((body, model))
        });
        let (body, model) = match checked {
            Ok(checked) => checked,
            // Every data-plane response reports the remaining quota.
            Err((status, err)) => return Answer::json(status, self.quota_headers(now_ms), err),
        };
        match self.admit(call, body, now_ms) {
            Ok(headers) => Answer { status: 200, headers, body: self.generate(call, body, model, unix_s) },
            Err(answer) => answer,
        }
    }

    /// The operation's own checks, after the common ones and before quota.
    fn validate(&self, call: &Call, body: &Value) -> Result<(), Refusal> {
        match call.op {
            Operation::CreateResponse => self.responses.validate(body),
            Operation::AudioTranscriptions | Operation::AudioTranslations => audio::validate(form_of(call)?),
            Operation::ImageEdits => openai::validate_image_edit(form_of(call)?),
            _ => Ok(()),
        }
    }

    /// A request on this backend's stored objects: the key and `api-version`
    /// checks, then the store's answer; no quota is used (the headers report
    /// what is left and, for a success, the utilisation).
    fn serve_stored(
        &mut self,
        req: &RequestInfo,
        parsed: Option<&Value>,
        call: &Call,
        now_ms: u64,
        unix_s: u64,
    ) -> Answer {
        let mut headers = self.quota_headers(now_ms);
        let (status, body) = match check_access(&self.settings, req, call) {
            Ok(()) => self.act_stored(req, parsed, call, unix_s),
            Err((status, err)) => (status, ReplyBody::Json(err)),
        };
        if status == 200 {
            headers.extend(self.utilization_header(now_ms));
        }
        Answer { status, headers, body }
    }

    /// The store's answer to a request on a stored object.
    fn act_stored(&mut self, req: &RequestInfo, parsed: Option<&Value>, call: &Call, unix_s: u64) -> (u16, ReplyBody) {
        let id = call.object_id.as_deref();
        let runner = Runner { name: &self.settings.name, chunks: self.settings.stream_chunks.max(1), now: unix_s };
        let created = match call.op {
            Operation::CreateFile => body_of(parsed, call).and_then(|_| self.files.upload(form_of(call)?, unix_s)),
            Operation::CreateBatch => body_of(parsed, call).and_then(|b| self.batches.create(b, &self.files, unix_s)),
            Operation::ListFiles | Operation::GetFile | Operation::DeleteFile | Operation::GetFileContent => {
                return self.files.act(call.op, id, &req.query)
            }
            Operation::ListBatches | Operation::GetBatch | Operation::CancelBatch => {
                return self.batches.act(call.op, id, &req.query, &mut self.files, runner)
            }
            _ => return self.responses.act(call.op, id.unwrap_or_default(), &req.query),
        };
        match created {
            Ok(object) => (200, ReplyBody::Json(object)),
            Err((status, err)) => (status, ReplyBody::Json(err)),
        }
    }

    /// Charge the quota; the rate-limit headers (and the utilisation after
    /// this charge), or Azure's 429 (utilisation without this request).
    fn admit(&mut self, call: &Call, body: &Value, now_ms: u64) -> Result<Headers, Answer> {
        let charge = openai::quota_charge(call.op, body);
        let rej = match self.quota.try_admit(now_ms, charge) {
            Ok(after) => {
                let mut headers = self.ratelimit_headers(after);
                headers.extend(self.utilization_header(now_ms));
                return Ok(headers);
            }
            Err(rej) => rej,
        };
        let mut headers = self.ratelimit_headers(rej.remaining);
        headers.extend(self.utilization_header(now_ms));
        let secs = rej.retry_after_secs();
        if self.settings.retry_after_header {
            headers.push((RETRY_AFTER, HeaderValue::from(secs)));
            headers.push((HeaderName::from_static("retry-after-ms"), HeaderValue::from(rej.reset_in_ms)));
        }
        let err = openai::rate_limited(call.op, call.api_version_text(), rej.kind == LimitKind::Requests, secs);
        Err(Answer::json(429, headers, err))
    }

    /// The 200 body for an admitted request.
    fn generate(&mut self, call: &Call, body: &Value, model: &str, unix_s: u64) -> ReplyBody {
        let op = call.op;
        let id = self.next_id;
        self.next_id += 1;
        let chunks = self.settings.stream_chunks.max(1);
        let ctx = Ctx { name: &self.settings.name, id, created: unix_s, model };
        let prompt = openai::estimate_prompt_tokens(op, body);
        let stream = op.can_stream() && openai::wants_stream(body);
        match (op, stream) {
            (Operation::ChatCompletions, true) => ReplyBody::Stream(openai::chat_stream(&ctx, body, prompt, chunks)),
            (Operation::ChatCompletions, false) => ReplyBody::Json(openai::chat_completion(&ctx, prompt, chunks)),
            (Operation::Completions, true) => ReplyBody::Stream(openai::completion_stream(&ctx, body, prompt, chunks)),
            (Operation::Completions, false) => ReplyBody::Json(openai::text_completion(&ctx, prompt, chunks)),
            (Operation::Embeddings, _) => ReplyBody::Json(openai::embeddings(&ctx, body, prompt)),
            (Operation::ImageGenerations | Operation::ImageEdits, _) => {
                let edit = (op == Operation::ImageEdits).then(|| openai::image_edit_request(body));
                let body = edit.as_ref().unwrap_or(body);
                let first = self.next_image;
                self.next_image += openai::image_count(body);
                ReplyBody::Json(openai::images(&ctx, body, first))
            }
            (Operation::CreateResponse, _) => self.responses.create(&ctx, body, prompt, chunks),
            (Operation::AudioTranscriptions | Operation::AudioTranslations, _) => match &call.form {
                Some(form) => audio::answer(op, ctx.name, form),
                None => ReplyBody::Json(openai::not_multipart()),
            },
            // Stored-object requests: served by `serve_stored`, never admitted.
            _ => ReplyBody::Json(openai::resource_not_found()),
        }
    }
}

/// `stream_error_before_content` on a served request: a stream gets Azure's
/// error event instead of its content (the quota stays charged, as on
/// Azure); any other answer (an error to a stream request) stays as it is.
fn fail_stream(reply: &mut Reply, op: Operation) {
    if matches!(reply.body, ReplyBody::Stream(_)) {
        reply.body = ReplyBody::Stream(openai::failed_stream(op));
    }
}

/// `first_content_delay_ms`: the head (and a chat stream's metadata-only
/// chunk) go out at once, every later event waits `ms` more, so a client
/// sees a live stream without a first token. An answer without a stream
/// waits before its head instead, as with `hang_ms`.
fn delay_first_content(reply: &mut Reply, op: Operation, ms: u64) {
    let ReplyBody::Stream(plan) = &mut reply.body else {
        reply.latency_ms = reply.latency_ms.saturating_add(ms);
        return;
    };
    let (prefixed, lead) = openai::with_prompt_filter_chunk(op, std::mem::take(plan));
    *plan = prefixed;
    reply.stream_pause = Some((lead, ms));
}

/// Request header adding this many ms to the delay before the response head.
pub const LATENCY_HEADER: &str = "x-mock-latency-ms";
/// Request header replacing `stream_chunk_delay_ms` for this request.
pub const STREAM_DELAY_HEADER: &str = "x-mock-stream-chunk-delay-ms";

/// Per-request delays from the request's own headers (a client that wants to
/// hang up before the answer or in the middle of a stream, whatever the
/// mock's settings); values that are not a whole number are ignored.
fn apply_delay_headers(reply: &mut Reply, headers: &BTreeMap<String, String>) {
    let ms = |name: &str| headers.get(name).and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(extra) = ms(LATENCY_HEADER) {
        reply.latency_ms = reply.latency_ms.saturating_add(extra);
    }
    if let Some(delay) = ms(STREAM_DELAY_HEADER) {
        reply.stream_delay_ms = delay;
    }
}

/// A `/_mock/config` being applied: copies that replace the live state only
/// when every key was valid.
struct StagedConfig {
    settings: Settings,
    quota: Quota,
    faults: Vec<Fault>,
    limits_changed: bool,
}

impl StagedConfig {
    fn apply(&mut self, key: &str, v: &Value) -> Result<(), String> {
        let s = &mut self.settings;
        match key {
            "requests_per_window" => self.quota.requests_per_window = opt_u64(key, v)?,
            "tokens_per_window" => self.quota.tokens_per_window = opt_u64(key, v)?,
            "window_ms" => self.quota.window_ms = req_u64(key, v)?.max(1),
            "latency_ms" => s.latency_ms = req_u64(key, v)?,
            "stream_chunks" => {
                s.stream_chunks = usize::try_from(req_u64(key, v)?.clamp(1, 100_000))
                    .map_err(|_| "stream_chunks out of range".to_string())?
            }
            "stream_chunk_delay_ms" => s.stream_chunk_delay_ms = req_u64(key, v)?,
            "api_key" => s.api_key = opt_string(v).ok_or("api_key must be a string or null")?,
            "deployments" => {
                s.deployments = opt_string_list(v).ok_or("deployments must be an array of strings or null")?
            }
            "retry_after_header" => {
                s.retry_after_header = match v.as_str() {
                    Some("keep") => true,
                    Some("omit") => false,
                    _ => return Err("retry_after_header must be \"keep\" or \"omit\"".into()),
                }
            }
            "limit_headers" => s.limit_headers = req_bool(key, v)?,
            "provisioned" => s.provisioned = req_bool(key, v)?,
            "fail_next" => self.faults.extend(fault::parse_faults(v)?),
            other => return Err(format!("unknown config key: {other}")),
        }
        if matches!(key, "requests_per_window" | "tokens_per_window" | "window_ms") {
            self.limits_changed = true;
        }
        Ok(())
    }
}

fn req_bool(key: &str, v: &Value) -> Result<bool, String> {
    v.as_bool().ok_or_else(|| format!("{key} must be true or false"))
}

fn req_u64(key: &str, v: &Value) -> Result<u64, String> {
    v.as_u64().ok_or_else(|| format!("{key} must be a non-negative integer"))
}

fn opt_u64(key: &str, v: &Value) -> Result<Option<u64>, String> {
    match v {
        Value::Null => Ok(None),
        _ => req_u64(key, v).map(Some).map_err(|e| format!("{e} or null")),
    }
}

/// A string or null; `None` for anything else.
fn opt_string(v: &Value) -> Option<Option<String>> {
    match v {
        Value::Null => Some(None),
        Value::String(s) => Some(Some(s.clone())),
        _ => None,
    }
}

/// An array of strings or null; `None` for anything else.
fn opt_string_list(v: &Value) -> Option<Option<Vec<String>>> {
    match v {
        Value::Null => Some(None),
        Value::Array(items) => {
            items.iter().map(|i| i.as_str().map(str::to_string)).collect::<Option<Vec<_>>>().map(Some)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mock() -> Mock {
        Mock::new(Settings::new("eastus"), Quota::new(None, None, 60_000))
    }

    fn req(path_and_query: &str, body: Value) -> RequestInfo {
        let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
        RequestInfo {
            ts_ms: 1,
            method: "POST".into(),
            path: path.into(),
            query: query.into(),
            headers: BTreeMap::from([("content-type".to_string(), "application/json".to_string())]),
            body: bytes::Bytes::from(body.to_string()),
        }
    }

    const CHAT: &str = "/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21";

    fn chat_body() -> Value {
        json!({"messages": [{"role": "user", "content": "12345678"}], "max_tokens": 10})
    }

    fn reply(o: Outcome) -> Reply {
        match o {
            Outcome::Reply(r) => r,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// The value a client sees: the last one of that name.
    fn header<'a>(r: &'a Reply, name: &str) -> Option<&'a str> {
        r.headers.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.to_str().unwrap())
    }

    fn json_body(r: &Reply) -> &Value {
        match &r.body {
            ReplyBody::Json(v) => v,
            other => panic!("not JSON: {other:?}"),
        }
    }

    #[test]
    fn usage_is_tallied_per_deployment_and_delay_headers_apply() {
        let mut m = mock();
        let stream = json!({"messages": [{"role": "user", "content": "12345678"}], "stream": true,
                            "stream_options": {"include_usage": true}});
        m.handle(req(CHAT, chat_body()), 0, 0);
        m.apply_config(&json!({"fail_next": [{"reset_after_events": 1}, {"status": 500}, {"reset": true}]})).unwrap();
        m.handle(req(CHAT, stream.clone()), 0, 0); // cut before its usage chunk
        m.handle(req(CHAT, chat_body()), 0, 0); // injected 500: no answer, no usage
        m.handle(req(CHAT, chat_body()), 0, 0); // reset: no usage
        let mut slow = req("/openai/v1/responses", json!({"model": "r", "input": "12345678"}));
        slow.headers.insert(LATENCY_HEADER.into(), "250".into());
        slow.headers.insert(STREAM_DELAY_HEADER.into(), "40".into());
        let r = reply(m.handle(slow, 0, 0));
        assert_eq!((r.latency_ms, r.stream_delay_ms), (250, 40));
        let mut bad = req(CHAT, chat_body());
        bad.headers.insert(LATENCY_HEADER.into(), "soon".into());
        assert_eq!(reply(m.handle(bad, 0, 0)).latency_ms, 0);
        let id = m.stats_json()["requests"][4]["path"].clone();
        assert_eq!(id, "/openai/v1/responses");
        assert_eq!(
            m.stats_json()["usage"],
            json!({
                "gpt4o": {"answers": 3, "prompt_tokens": 6, "completion_tokens": 15,
                          "cut": {"answers": 1, "prompt_tokens": 2, "completion_tokens": 5}},
                "r": {"answers": 1, "prompt_tokens": 2, "completion_tokens": 5,
                      "cut": {"answers": 0, "prompt_tokens": 0, "completion_tokens": 0}}
            })
        );
        m.reset();
        assert_eq!(m.stats_json()["usage"], json!({}));
    }

    #[test]
    fn chat_ok_and_stats() {
        let mut m = mock();
        let r = reply(m.handle(req(CHAT, chat_body()), 0, 100));
        assert_eq!(r.status, 200);
        let v = json_body(&r);
        assert_eq!(v["model"], "gpt4o");
        assert_eq!(v["choices"][0]["message"]["content"], "Hello from eastus part3 part4");
        assert_eq!(v["usage"]["prompt_tokens"], 2);
        assert!(r.headers.is_empty(), "no limits -> no ratelimit headers");
        let s = m.stats_json();
        assert_eq!(s["requests_total"], 1);
        assert_eq!(s["by_status"]["200"], 1);
        let rec = &s["requests"][0];
        assert_eq!(rec["path"], "/openai/deployments/gpt4o/chat/completions");
        assert_eq!(rec["query"], "api-version=2024-10-21");
        assert_eq!(rec["deployment"], "gpt4o");
        assert_eq!(rec["body_json"]["max_tokens"], 10);
        assert_eq!(rec["headers"]["content-type"], "application/json");
        assert_eq!(rec["stream"], false);
    }

    #[test]
    fn routing_errors() {
        let mut m = mock();
        let r = reply(m.handle(req("/openai/deployments/gpt4o/chat/completions", chat_body()), 0, 0));
        assert_eq!((r.status, json_body(&r)), (404, &openai::resource_not_found()));
        let r = reply(m.handle(req("/nope", chat_body()), 0, 0));
        assert_eq!(r.status, 404);
        let mut get = req(CHAT, chat_body());
        get.method = "GET".into();
        assert_eq!(reply(m.handle(get, 0, 0)).status, 404);
        let mut bad = req(CHAT, json!({}));
        bad.body = bytes::Bytes::from_static(b"{not json");
        let r = reply(m.handle(bad, 0, 0));
        assert_eq!(r.status, 400);
        assert_eq!(json_body(&r)["error"]["code"], "BadRequest");
        // v1 routes take the deployment from the body.
        let r = reply(m.handle(req("/v1/chat/completions", json!({"messages": []})), 0, 0));
        assert_eq!(r.status, 400);
        let r = reply(m.handle(req("/openai/v1/chat/completions", json!({"model": "m1", "messages": []})), 0, 0));
        assert_eq!(r.status, 200);
        assert_eq!(json_body(&r)["model"], "m1");
        assert_eq!(m.stats_json()["by_status"]["404"], 3);
    }

    #[test]
    fn deployment_allow_list() {
        let mut m = mock();
        m.settings.deployments = Some(vec!["gpt4o".into()]);
        assert_eq!(reply(m.handle(req(CHAT, chat_body()), 0, 0)).status, 200);
        let r = reply(m.handle(req("/openai/deployments/other/chat/completions?api-version=1", chat_body()), 0, 0));
        assert_eq!(r.status, 404);
        assert_eq!(json_body(&r)["error"]["code"], "DeploymentNotFound");
        let r = reply(m.handle(req("/v1/chat/completions", json!({"model": "other"})), 0, 0));
        assert_eq!(r.status, 404);
    }

    #[test]
    fn auth() {
        let mut m = mock();
        m.settings.api_key = Some("k1".into());
        let r = reply(m.handle(req(CHAT, chat_body()), 0, 0));
        assert_eq!(r.status, 401);
        assert_eq!(json_body(&r), &openai::access_denied());
        let mut ok = req(CHAT, chat_body());
        ok.headers.insert("api-key".into(), "k1".into());
        assert_eq!(reply(m.handle(ok, 0, 0)).status, 200);
        let mut ok = req(CHAT, chat_body());
        ok.headers.insert("authorization".into(), "Bearer k1".into());
        assert_eq!(reply(m.handle(ok, 0, 0)).status, 200);
        let mut bad = req(CHAT, chat_body());
        bad.headers.insert("authorization".into(), "Bearer k2".into());
        assert_eq!(reply(m.handle(bad, 0, 0)).status, 401);
    }

    #[test]
    fn quota_429_and_headers() {
        let mut m = mock();
        m.apply_config(&json!({"requests_per_window": 2, "tokens_per_window": 1000, "window_ms": 10_000})).unwrap();
        // charge = 2 prompt + 10 max_tokens = 12
        let r = reply(m.handle(req(CHAT, chat_body()), 1000, 0));
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("1"));
        assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), Some("988"));
        let r = reply(m.handle(req(CHAT, chat_body()), 2000, 0));
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("0"));
        let r = reply(m.handle(req(CHAT, chat_body()), 3500, 0));
        assert_eq!(r.status, 429);
        assert_eq!(header(&r, "retry-after"), Some("8"));
        assert_eq!(header(&r, "retry-after-ms"), Some("7500"));
        assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), Some("976"));
        let msg = json_body(&r)["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains("call rate limit") && msg.contains("retry after 8 seconds"), "{msg}");
        // Window resets.
        assert_eq!(reply(m.handle(req(CHAT, chat_body()), 11_000, 0)).status, 200);

        // Token limit, and "omit" mode.
        m.apply_config(&json!({"requests_per_window": null, "tokens_per_window": 20, "retry_after_header": "omit"}))
            .unwrap();
        assert_eq!(reply(m.handle(req(CHAT, chat_body()), 0, 0)).status, 200);
        let r = reply(m.handle(req(CHAT, chat_body()), 10, 0));
        assert_eq!(r.status, 429);
        assert!(header(&r, "retry-after").is_none());
        assert!(header(&r, "x-ratelimit-remaining-requests").is_none());
        assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), Some("8"));
        assert!(json_body(&r)["error"]["message"].as_str().unwrap().contains("token rate limit"));
        assert_eq!(m.stats_json()["by_status"]["429"], 2);
    }

    /// Remaining requests, remaining tokens, limit requests, limit tokens.
    fn ratelimit(r: &Reply) -> [Option<&str>; 4] {
        [
            "x-ratelimit-remaining-requests",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-limit-requests",
            "x-ratelimit-limit-tokens",
        ]
        .map(|name| header(r, name))
    }

    #[test]
    fn limit_headers_on_answers_and_quota_429s() {
        let mut m = mock();
        let c = m.config_json();
        assert_eq!((&c["limit_headers"], &c["provisioned"]), (&json!(true), &json!(false)));
        m.apply_config(&json!({"requests_per_window": 1, "tokens_per_window": 100})).unwrap();
        // charge = 2 prompt + 10 max_tokens = 12
        let r = reply(m.handle(req(CHAT, chat_body()), 0, 0));
        assert_eq!((r.status, ratelimit(&r)), (200, [Some("0"), Some("88"), Some("1"), Some("100")]));
        let r = reply(m.handle(req(CHAT, chat_body()), 0, 0));
        assert_eq!((r.status, ratelimit(&r)), (429, [Some("0"), Some("88"), Some("1"), Some("100")]));
        assert_eq!((header(&r, "retry-after"), header(&r, "retry-after-ms")), (Some("60"), Some("60000")));
        assert!(r.headers.iter().all(|(n, _)| !n.as_str().starts_with("x-ratelimit-reset")), "{:?}", r.headers);
        // Refusals and injected errors report the quota the same way.
        faults(&mut m, json!([{"status": 503}]));
        assert_eq!(ratelimit(&reply(m.handle(req(CHAT, chat_body()), 0, 0)))[2..], [Some("1"), Some("100")]);
        let r = reply(m.handle(req("/openai/deployments/d/chat/completions", chat_body()), 0, 0));
        assert_eq!((r.status, ratelimit(&r)[2]), (404, Some("1")));
        // Only for the limits that are set; off with limit_headers false.
        m.apply_config(&json!({"requests_per_window": null})).unwrap();
        assert_eq!(ratelimit(&reply(m.handle(req(CHAT, chat_body()), 0, 0))), [None, Some("88"), None, Some("100")]);
        m.apply_config(&json!({"limit_headers": false})).unwrap();
        assert_eq!(ratelimit(&reply(m.handle(req(CHAT, chat_body()), 0, 0))), [None, Some("76"), None, None]);
        assert_eq!(m.config_json()["limit_headers"], false);
        assert!(m.apply_config(&json!({"limit_headers": "yes"})).is_err());
        assert!(m.apply_config(&json!({"limit_headers": null})).is_err());
    }

    #[test]
    fn provisioned_mock_reports_its_utilization() {
        let mut m = mock();
        m.apply_config(&json!({"tokens_per_window": 32})).unwrap();
        let util = |m: &mut Mock, body: Value| {
            let r = reply(m.handle(req(CHAT, body), 0, 0));
            (r.status, header(&r, UTILIZATION_HEADER).map(str::to_string))
        };
        assert_eq!(util(&mut m, chat_body()), (200, None), "not provisioned");
        m.apply_config(&json!({"provisioned": true, "tokens_per_window": 32})).unwrap();
        assert_eq!(m.config_json()["provisioned"], true);
        // 12 tokens per request, after this request's charge.
        assert_eq!(util(&mut m, chat_body()), (200, Some("37.5%".into())));
        assert_eq!(util(&mut m, chat_body()), (200, Some("75.0%".into())));
        // Does not fit: the window's share without this request.
        assert_eq!(util(&mut m, chat_body()), (429, Some("75.0%".into())));
        let eight = json!({"messages": [], "max_tokens": 7});
        assert_eq!(util(&mut m, eight.clone()), (200, Some("100.0%".into())));
        let r = reply(m.handle(req(CHAT, eight), 0, 0));
        assert_eq!((r.status, header(&r, UTILIZATION_HEADER)), (429, Some("100.0%")));
        assert_eq!(header(&r, "retry-after-ms"), Some("60000"), "a provisioned 429 keeps retry-after-ms");
        // Not on refusals or injected errors.
        faults(&mut m, json!([{"status": 500}]));
        assert_eq!(util(&mut m, chat_body()), (500, None));
        m.settings.api_key = Some("k".into());
        assert_eq!(util(&mut m, chat_body()), (401, None));
        m.settings.api_key = None;
        // Without a token limit: requests; stored-object successes show it uncharged.
        m.apply_config(&json!({"tokens_per_window": null, "requests_per_window": 3})).unwrap();
        assert_eq!(util(&mut m, chat_body()), (200, Some("33.3%".into())));
        let r = reply(m.handle(req(RESPONSES, json!({"model": "gpt4o", "input": "x"})), 0, 0));
        assert_eq!(header(&r, UTILIZATION_HEADER), Some("66.6%"));
        let r = reply(m.handle(bare("GET", &at(json_body(&r))), 0, 0));
        assert_eq!((r.status, header(&r, UTILIZATION_HEADER)), (200, Some("66.6%")));
        m.apply_config(&json!({"requests_per_window": null})).unwrap();
        assert_eq!(util(&mut m, chat_body()), (200, None), "no limits");
        assert!(m.apply_config(&json!({"provisioned": 1})).is_err());
    }

    #[test]
    fn stream_error_before_content_fails_an_admitted_stream() {
        let mut m = mock();
        m.apply_config(&json!({"requests_per_window": 10})).unwrap();
        let stream = json!({"messages": [], "stream": true, "stream_options": {"include_usage": true}});
        let entry = json!({"stream_error_before_content": true});
        faults(&mut m, json!([entry, entry, entry, entry]));
        let r = reply(m.handle(req(CHAT, stream.clone()), 0, 0));
        assert_eq!(r.status, 200);
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("9"), "admitted: the quota is used");
        let ReplyBody::Stream(plan) = &r.body else { panic!("not a stream") };
        let events: Vec<&[u8]> = plan.all().map(|b| b.as_ref()).collect();
        assert_eq!(events, [openai::AZURE_PROMPT_FILTER_CHUNK, openai::STREAM_SERVER_ERROR]);
        // A Responses API stream: the error event only.
        let r = reply(m.handle(req(RESPONSES, json!({"model": "gpt4o", "input": "x", "stream": true})), 0, 0));
        let ReplyBody::Stream(plan) = &r.body else { panic!("not a stream") };
        assert_eq!(plan.all().map(|b| b.as_ref()).collect::<Vec<&[u8]>>(), [openai::STREAM_SERVER_ERROR]);
        // Without a stream: an injected 500, no quota used.
        let r = reply(m.handle(req(CHAT, chat_body()), 0, 0));
        assert_eq!((r.status, header(&r, "x-mock-injected")), (500, Some("true")));
        assert_eq!(json_body(&r)["error"]["code"], "InternalServerError");
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("8"));
        // A stream request that fails its checks gets that error.
        m.settings.api_key = Some("k".into());
        assert_eq!(reply(m.handle(req(CHAT, stream), 0, 0)).status, 401);
        let s = m.stats_json();
        let recs = s["requests"].as_array().unwrap();
        let got: Vec<(Value, Value)> = recs.iter().map(|r| (r["status"].clone(), r["fault"].clone())).collect();
        let kind = json!("stream_error_before_content");
        assert_eq!(got, [200, 200, 500, 401].map(|st| (json!(st), kind.clone())));
        assert_eq!(s["usage"], json!({}), "the failed streams carried no usage");
    }

    #[test]
    fn first_content_delay_ms_pauses_a_stream_after_its_head() {
        let mut m = mock();
        m.settings.latency_ms = 5;
        let stream = json!({"messages": [], "stream": true});
        let ReplyBody::Stream(normal) = reply(m.handle(req(CHAT, stream.clone()), 0, 0)).body else { panic!() };
        let entry = json!({"first_content_delay_ms": 300});
        faults(&mut m, json!([entry, entry, entry]));
        let r = reply(m.handle(req(CHAT, stream), 0, 0));
        assert_eq!((r.status, r.latency_ms, r.stream_pause), (200, 5, Some((1, 300))));
        let ReplyBody::Stream(plan) = &r.body else { panic!("not a stream") };
        // The metadata-only chunk, then the normal stream.
        assert_eq!(plan.head[0], openai::AZURE_PROMPT_FILTER_CHUNK);
        assert_eq!(
            (plan.head.len(), plan.content.len(), plan.tail.len()),
            (normal.head.len() + 1, normal.content.len(), normal.tail.len())
        );
        assert!(String::from_utf8_lossy(&plan.head[1]).contains(r#""role":"assistant""#));
        // A Responses API stream waits before its first event.
        let r = reply(m.handle(req(RESPONSES, json!({"model": "gpt4o", "input": "x", "stream": true})), 0, 0));
        assert_eq!((r.latency_ms, r.stream_pause), (5, Some((0, 300))));
        // Without a stream: a later head, as with hang_ms.
        let r = reply(m.handle(req(CHAT, chat_body()), 0, 0));
        assert_eq!((r.status, r.latency_ms, r.stream_pause), (200, 305, None));
        let recs = m.stats_json()["requests"].clone();
        let kinds: Vec<&Value> = recs.as_array().unwrap().iter().map(|r| &r["fault"]).collect();
        let kind = json!("first_content_delay_ms");
        assert_eq!(kinds, [&Value::Null, &kind, &kind, &kind]);
        assert!(recs.as_array().unwrap().iter().all(|r| r["status"] == 200));
        assert_eq!(m.stats_json()["usage"]["gpt4o"]["answers"], 2, "streams without usage count none");
    }

    #[test]
    fn faults_fifo() {
        let mut m = mock();
        m.apply_config(&json!({"fail_next": [
            {"status": 500},
            {"reset": true},
            {"status": 429, "retry_after": "3", "retry_after_ms": 2500},
            {"status": 200}
        ]}))
        .unwrap();
        assert_eq!(m.config_json()["fail_next_pending"], 4);
        let r = reply(m.handle(req(CHAT, chat_body()), 0, 0));
        assert_eq!(r.status, 500);
        assert_eq!(json_body(&r)["error"]["code"], "InternalServerError");
        assert!(matches!(m.handle(req(CHAT, chat_body()), 0, 0), Outcome::Reset { .. }));
        let r = reply(m.handle(req(CHAT, chat_body()), 0, 0));
        assert_eq!(r.status, 429);
        assert_eq!(header(&r, "retry-after"), Some("3"));
        assert_eq!(header(&r, "retry-after-ms"), Some("2500"));
        assert!(json_body(&r)["error"]["message"].as_str().unwrap().contains("retry after 3 seconds"));
        assert_eq!(reply(m.handle(req(CHAT, chat_body()), 0, 0)).status, 200);
        assert_eq!(reply(m.handle(req(CHAT, chat_body()), 0, 0)).status, 200);
        let s = m.stats_json();
        assert_eq!(s["by_status"]["0"], 1);
        assert_eq!(s["requests_total"], 5);
        m.reset();
        let s = m.stats_json();
        assert_eq!(s["requests_total"], 0);
        assert_eq!(s["requests"], json!([]));
    }

    fn faults(m: &mut Mock, list: Value) {
        m.apply_config(&json!({ "fail_next": list })).unwrap();
    }

    fn raw_header<'a>(r: &'a Reply, name: &str) -> Option<&'a [u8]> {
        r.headers.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.as_bytes())
    }

    #[test]
    fn injected_404_and_401_have_azure_bodies() {
        let mut m = mock();
        faults(&mut m, json!([{"status": 404}, {"status": 401}]));
        let r = reply(m.handle(req(CHAT, chat_body()), 0, 0));
        assert_eq!((r.status, json_body(&r)), (404, &openai::deployment_not_found()));
        assert_eq!(json_body(&r)["error"]["code"], "DeploymentNotFound");
        let r = reply(m.handle(req(CHAT, chat_body()), 0, 0));
        assert_eq!((r.status, json_body(&r)), (401, &openai::access_denied()));
        assert_eq!(header(&r, "x-mock-injected"), Some("true"));
    }

    #[test]
    fn injected_error_with_extra_headers() {
        let mut m = mock();
        m.apply_config(&json!({"requests_per_window": 10})).unwrap();
        faults(
            &mut m,
            json!([{
                "status": 429,
                "retry_after": 3,
                "headers": {"retry-after": "9", "x-ms-region": "East US"},
                "raw_headers": [["x-bin", "ff fe"]]
            }]),
        );
        let r = reply(m.handle(req(CHAT, chat_body()), 0, 0));
        assert_eq!(r.status, 429);
        assert_eq!(header(&r, "retry-after"), Some("9"));
        assert_eq!(header(&r, "x-ms-region"), Some("East US"));
        assert_eq!(raw_header(&r, "x-bin"), Some(&[0xff, 0xfe][..]));
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("10"), "no quota used");
        assert!(json_body(&r)["error"]["message"].as_str().unwrap().contains("retry after 9 seconds"));
        assert_eq!(m.stats_json()["requests"][0]["fault"], "status");
    }

    #[test]
    fn pass_with_raw_headers_serves_normally() {
        let mut m = mock();
        faults(&mut m, json!([{"status": 200, "raw_headers": [["x-weird", "6f6b ff"]], "headers": {"x-a": 1}}]));
        let r = reply(m.handle(req(CHAT, chat_body()), 0, 0));
        assert_eq!(r.status, 200);
        assert_eq!(json_body(&r)["choices"][0]["message"]["content"], "Hello from eastus part3 part4");
        assert_eq!(raw_header(&r, "x-weird"), Some(&b"ok\xff"[..]));
        assert_eq!(header(&r, "x-a"), Some("1"));
        assert_eq!(header(&r, "x-mock-injected"), None);
        // The normal checks still apply: here the headers ride on a 401.
        m.settings.api_key = Some("k".into());
        faults(&mut m, json!([{"status": 204, "headers": {"x-a": "2"}}]));
        let r = reply(m.handle(req(CHAT, chat_body()), 0, 0));
        assert_eq!((r.status, header(&r, "x-a")), (401, Some("2")));
        let recs = m.stats_json()["requests"].clone();
        assert_eq!((recs[0]["fault"].clone(), recs[0]["status"].clone()), (json!("pass"), json!(200)));
        assert_eq!((recs[1]["fault"].clone(), recs[1]["status"].clone()), (json!("pass"), json!(401)));
    }

    #[test]
    fn reset_after_events_serves_then_marks_the_cut() {
        let mut m = mock();
        m.apply_config(&json!({"requests_per_window": 5})).unwrap();
        faults(&mut m, json!([{"reset_after_events": 2}, {"reset_after_events": 0}]));
        let r = reply(m.handle(req(CHAT, json!({"messages": [], "stream": true})), 0, 0));
        assert_eq!((r.status, r.reset_after_events), (200, Some(2)));
        assert!(matches!(r.body, ReplyBody::Stream(_)));
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("4"), "the quota is used");
        let r = reply(m.handle(req(CHAT, chat_body()), 0, 0));
        assert_eq!(r.reset_after_events, Some(0));
        assert!(matches!(r.body, ReplyBody::Json(_)));
        let r = reply(m.handle(req(CHAT, chat_body()), 0, 0));
        assert_eq!(r.reset_after_events, None);
        let s = m.stats_json();
        let rec = &s["requests"][0];
        assert_eq!(
            (&rec["status"], &rec["fault"], &rec["stream"]),
            (&json!(200), &json!("reset_after_events"), &json!(true))
        );
        assert_eq!(s["requests"][2]["fault"], Value::Null);
    }

    #[test]
    fn hang_and_reset_are_recorded_with_status_0() {
        let mut m = mock();
        m.settings.latency_ms = 7;
        faults(&mut m, json!([{"hang": true}, {"reset": true}, {"hang_ms": 300}]));
        // Not a data-plane route: no fault is used up.
        assert_eq!(reply(m.handle(req("/nope", chat_body()), 0, 0)).status, 404);
        assert!(matches!(m.handle(req(CHAT, chat_body()), 0, 0), Outcome::Hang));
        assert!(matches!(m.handle(req(CHAT, chat_body()), 0, 0), Outcome::Reset { latency_ms: 7 }));
        let r = reply(m.handle(req(CHAT, chat_body()), 0, 0));
        assert_eq!((r.status, r.latency_ms), (200, 307));
        assert_eq!(reply(m.handle(req(CHAT, chat_body()), 0, 0)).latency_ms, 7);
        let s = m.stats_json();
        let got: Vec<(Value, Value)> =
            s["requests"].as_array().unwrap().iter().map(|r| (r["status"].clone(), r["fault"].clone())).collect();
        let want =
            [(404, Value::Null), (0, json!("hang")), (0, json!("reset")), (200, json!("hang_ms")), (200, Value::Null)];
        assert_eq!(got, want.map(|(st, f)| (json!(st), f)));
        assert_eq!(s["by_status"]["0"], 2);
        assert_eq!(s["requests"][1]["path"], "/openai/deployments/gpt4o/chat/completions");
        assert_eq!(s["requests"][1]["body_json"]["max_tokens"], 10);
    }

    #[test]
    fn config_validation_is_atomic() {
        let mut m = mock();
        assert!(m.apply_config(&json!({"latency_ms": 5, "bogus": 1})).is_err());
        assert_eq!(m.settings.latency_ms, 0);
        assert!(m.apply_config(&json!({"fail_next": [{"status": 1000}]})).is_err());
        assert!(m.apply_config(&json!({"fail_next": [{}]})).is_err());
        assert!(m.apply_config(&json!({"retry_after_header": "x"})).is_err());
        assert!(m.apply_config(&json!([1])).is_err());
        m.apply_config(&json!({"latency_ms": 5, "api_key": "k", "stream_chunks": 3, "deployments": ["a"]})).unwrap();
        let c = m.config_json();
        assert_eq!(c["latency_ms"], 5);
        assert_eq!(c["api_key"], "k");
        assert_eq!(c["stream_chunks"], 3);
        assert_eq!(c["deployments"], json!(["a"]));
        m.apply_config(&json!({"api_key": null})).unwrap();
        assert_eq!(m.config_json()["api_key"], Value::Null);
    }

    #[test]
    fn stream_and_other_ops() {
        let mut m = mock();
        let r = reply(m.handle(req(CHAT, json!({"messages": [], "stream": true})), 0, 0));
        assert!(matches!(r.body, ReplyBody::Stream(ref p) if p.content.len() == 5));
        assert_eq!(m.stats_json()["requests"][0]["stream"], true);
        let r =
            reply(m.handle(req("/openai/deployments/e/embeddings?api-version=1", json!({"input": ["a", "b"]})), 0, 0));
        assert_eq!(json_body(&r)["data"].as_array().unwrap().len(), 2);
        // Embeddings never stream.
        let r = reply(m.handle(
            req("/openai/deployments/e/embeddings?api-version=1", json!({"input": "a", "stream": true})),
            0,
            0,
        ));
        assert!(matches!(r.body, ReplyBody::Json(_)));
        let img = "/openai/deployments/dalle/images/generations?api-version=1";
        let r = reply(m.handle(req(img, json!({"prompt": "cat", "n": 2})), 0, 0));
        assert_eq!(json_body(&r)["data"][1]["url"], "https://mock.invalid/eastus/image-2.png");
        let r = reply(m.handle(req(img, json!({"prompt": "cat"})), 0, 0));
        assert_eq!(json_body(&r)["data"][0]["url"], "https://mock.invalid/eastus/image-3.png");
    }

    #[test]
    fn images_cost_requests_only() {
        let mut m = mock();
        m.apply_config(&json!({"requests_per_window": 5, "tokens_per_window": 1})).unwrap();
        let img = "/openai/deployments/dalle/images/generations?api-version=1";
        let r = reply(m.handle(req(img, json!({"prompt": "a long prompt here"})), 0, 0));
        assert_eq!(r.status, 200);
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("4"));
        assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), Some("1"));
    }

    #[test]
    fn large_bodies_not_stored() {
        let mut m = mock();
        let big = "x".repeat(MAX_STORED_BODY + 10);
        let r = reply(m.handle(req(CHAT, json!({"messages": [{"role": "user", "content": big}]})), 0, 0));
        assert_eq!(r.status, 200);
        let s = m.stats_json();
        assert_eq!(s["requests"][0]["body_json"], Value::Null);
        assert!(s["requests"][0]["body_len"].as_u64().unwrap() > MAX_STORED_BODY as u64);
    }

    #[test]
    fn record_cap() {
        let mut m = mock();
        for _ in 0..(MAX_RECORDS + 5) {
            m.handle(req("/x", json!({})), 0, 0);
        }
        let s = m.stats_json();
        assert_eq!(s["requests_total"], (MAX_RECORDS + 5) as u64);
        assert_eq!(s["requests"].as_array().unwrap().len(), MAX_RECORDS);
    }

    const RESPONSES: &str = "/openai/v1/responses";

    /// A request with `method` and no body.
    fn bare(method: &str, path_and_query: &str) -> RequestInfo {
        let mut r = req(path_and_query, json!({}));
        r.method = method.into();
        r.body = bytes::Bytes::new();
        r
    }

    /// A JSON answer with its status.
    fn answer(m: &mut Mock, r: RequestInfo) -> (u16, Value) {
        let r = reply(m.handle(r, 0, 100));
        (r.status, json_body(&r).clone())
    }

    fn create(m: &mut Mock, body: Value) -> (u16, Value) {
        answer(m, req(RESPONSES, body))
    }

    /// The path of a stored response.
    fn at(response: &Value) -> String {
        format!("{RESPONSES}/{}", response["id"].as_str().unwrap())
    }

    fn text_of(response: &Value) -> &str {
        response["output"][0]["content"][0]["text"].as_str().unwrap()
    }

    #[test]
    fn responses_create_retrieve_and_follow_up() {
        let mut m = mock();
        let (status, first) = create(&mut m, json!({"model": "gpt4o", "input": "Say hi", "max_output_tokens": 20}));
        assert_eq!(status, 200);
        let id = first["id"].as_str().unwrap().to_string();
        assert!(id.starts_with("resp_") && !id.contains("eastus"), "{id}");
        assert_eq!((&first["model"], &first["status"]), (&json!("gpt4o"), &json!("completed")));
        assert_eq!(text_of(&first), "Hello from eastus part3 part4");
        assert_eq!(first["usage"]["input_tokens"], 2);
        assert_eq!(answer(&mut m, bare("GET", &format!("{RESPONSES}/{id}"))), (200, first.clone()));
        let follow =
            json!({"model": "gpt4o", "input": [{"role": "user", "content": "again"}], "previous_response_id": id});
        let (status, second) = create(&mut m, follow);
        assert_eq!(status, 200);
        assert_eq!(second["previous_response_id"], id.as_str());
        assert_eq!(text_of(&second), "Hello from eastus part3 part4 (turn 2)");
        // The classic path (api-version required) reaches the same store.
        let classic = "/openai/responses?api-version=2025-04-01-preview";
        let (status, third) =
            answer(&mut m, req(classic, json!({"model": "gpt4o", "previous_response_id": second["id"]})));
        assert_eq!((status, text_of(&third)), (200, "Hello from eastus part3 part4 (turn 3)"));
        let (status, _) = answer(&mut m, req("/openai/responses", json!({"model": "gpt4o", "input": "x"})));
        assert_eq!(status, 404, "classic path without api-version");
        let path = format!("/openai/responses/{}?api-version=preview", third["id"].as_str().unwrap());
        assert_eq!(answer(&mut m, bare("GET", &path)).0, 200);
        let s = m.stats_json();
        assert_eq!(s["responses_stored"], 3);
        let recs = s["requests"].as_array().unwrap();
        assert_eq!((&recs[0]["deployment"], &recs[0]["path"]), (&json!("gpt4o"), &json!(RESPONSES)));
        assert_eq!((&recs[1]["method"], &recs[1]["deployment"]), (&json!("GET"), &Value::Null));
        assert_eq!(recs[2]["body_json"]["previous_response_id"], id.as_str());
    }

    #[test]
    fn responses_unknown_ids_fail_as_on_azure() {
        let mut m = mock();
        m.apply_config(&json!({"tokens_per_window": 1000})).unwrap();
        let (status, err) = create(&mut m, json!({"model": "gpt4o", "input": "x", "previous_response_id": "resp_abc"}));
        assert_eq!(status, 400);
        let want = json!({"error": {
            "message": "Previous response with id 'resp_abc' not found.",
            "type": "invalid_request_error",
            "param": "previous_response_id",
            "code": "previous_response_not_found"
        }});
        assert_eq!(err, want);
        assert_eq!(m.quota.remaining(0).tokens, Some(1000), "a refused follow-up uses no quota");
        let want = json!({"error": {
            "message": "Response with id 'resp_x' not found.", "type": "invalid_request_error", "param": null, "code": null
        }});
        for (method, path) in [
            ("GET", "/v1/responses/resp_x"),
            ("DELETE", "/openai/v1/responses/resp_x"),
            ("POST", "/openai/v1/responses/resp_x/cancel"),
            ("GET", "/openai/v1/responses/resp_x/input_items"),
        ] {
            assert_eq!(answer(&mut m, bare(method, path)), (404, want.clone()), "{method} {path}");
        }
        // Another backend's response is unknown here.
        let mut west = Mock::new(Settings::new("west"), Quota::new(None, None, 60_000));
        let (_, theirs) = create(&mut west, json!({"model": "gpt4o", "input": "x"}));
        let (status, err) = create(&mut m, json!({"model": "gpt4o", "previous_response_id": theirs["id"]}));
        assert_eq!((status, &err["error"]["code"]), (400, &json!("previous_response_not_found")));
    }

    #[test]
    fn responses_delete_and_store_false() {
        let mut m = mock();
        let (_, v) = create(&mut m, json!({"model": "gpt4o", "input": "x"}));
        let path = at(&v);
        let (status, deleted) = answer(&mut m, bare("DELETE", &path));
        assert_eq!((status, deleted), (200, json!({"id": v["id"], "object": "response.deleted", "deleted": true})));
        assert_eq!(answer(&mut m, bare("GET", &path)).0, 404);
        assert_eq!(answer(&mut m, bare("DELETE", &path)).0, 404);

        let (status, unstored) = create(&mut m, json!({"model": "gpt4o", "input": "x", "store": false}));
        assert_eq!((status, &unstored["store"]), (200, &json!(false)));
        assert_eq!(answer(&mut m, bare("GET", &at(&unstored))).0, 404);
        let (status, err) = create(&mut m, json!({"model": "gpt4o", "previous_response_id": unstored["id"]}));
        assert_eq!((status, &err["error"]["code"]), (400, &json!("previous_response_not_found")));
        assert_eq!(m.stats_json()["responses_stored"], 0);
    }

    #[test]
    fn responses_stream() {
        let mut m = mock();
        m.settings.stream_chunk_delay_ms = 4;
        let r = reply(m.handle(req("/v1/responses", json!({"model": "gpt4o", "input": "hi", "stream": true})), 0, 100));
        assert_eq!((r.status, r.stream_delay_ms), (200, 4));
        let ReplyBody::Stream(plan) = &r.body else { panic!("not a stream") };
        assert_eq!(plan.content.len(), 5, "one delta per stream chunk");
        let ev = crate::responses::parse_events(plan);
        assert_eq!(ev.first().unwrap().0, "response.created");
        let created_id = ev[0].1["response"]["id"].clone();
        let (last, done) = ev.last().unwrap();
        assert_eq!((last.as_str(), &done["response"]["id"]), ("response.completed", &created_id));
        assert_eq!(done["response"]["usage"]["output_tokens"], 5);
        assert_eq!(m.stats_json()["requests"][0]["stream"], true);
        // Stored: retrievable, and replayable as a stream.
        let path = at(&ev[0].1["response"]);
        assert_eq!(answer(&mut m, bare("GET", &path)), (200, done["response"].clone()));
        let r = reply(m.handle(bare("GET", &format!("{path}?stream=true&starting_after=8")), 0, 0));
        let ReplyBody::Stream(replay) = &r.body else { panic!("not a stream") };
        let names: Vec<String> = crate::responses::parse_events(replay).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        assert_eq!(m.stats_json()["requests"][2]["stream"], true);
    }

    #[test]
    fn responses_background() {
        let mut m = mock();
        let (status, queued) = create(&mut m, json!({"model": "gpt4o", "input": "x", "background": true}));
        assert_eq!((status, &queued["status"], &queued["usage"]), (200, &json!("queued"), &Value::Null));
        assert_eq!(queued["output"], json!([]));
        let path = at(&queued);
        let (status, done) = answer(&mut m, bare("GET", &path));
        assert_eq!((status, &done["status"], &done["id"]), (200, &json!("completed"), &queued["id"]));
        assert_eq!(text_of(&done), "Hello from eastus part3 part4");
        // Finished: cancel leaves it as it is.
        assert_eq!(answer(&mut m, bare("POST", &format!("{path}/cancel"))), (200, done));
        let (_, queued) = create(&mut m, json!({"model": "gpt4o", "input": "x", "background": true}));
        let path = at(&queued);
        let (status, cancelled) = answer(&mut m, bare("POST", &format!("{path}/cancel")));
        assert_eq!((status, &cancelled["status"]), (200, &json!("cancelled")));
        assert_eq!(answer(&mut m, bare("GET", &path)).1["status"], "cancelled");
        let (status, err) = create(&mut m, json!({"model": "gpt4o", "background": true, "store": false}));
        assert_eq!((status, &err["error"]["param"]), (400, &json!("background")));
    }

    #[test]
    fn responses_input_items() {
        let mut m = mock();
        let (_, v) = create(&mut m, json!({"model": "gpt4o", "input": "question"}));
        let path = format!("/v1/responses/{}/input_items", v["id"].as_str().unwrap());
        let (status, list) = answer(&mut m, bare("GET", &path));
        assert_eq!((status, &list["object"], &list["has_more"]), (200, &json!("list"), &json!(false)));
        assert_eq!(list["data"][0]["content"][0]["text"], "question");
        assert_eq!((&list["first_id"], &list["last_id"]), (&list["data"][0]["id"], &list["data"][0]["id"]));
    }

    #[test]
    fn responses_share_checks_quota_and_faults() {
        let mut m = mock();
        m.apply_config(&json!({"api_key": "k", "deployments": ["gpt4o"], "tokens_per_window": 30})).unwrap();
        let keyed = |path: &str, body: Value| {
            let mut r = req(path, body);
            r.headers.insert("api-key".into(), "k".into());
            r
        };
        assert_eq!(create(&mut m, json!({"model": "gpt4o", "input": "x"})).0, 401);
        let (status, err) = answer(&mut m, keyed(RESPONSES, json!({"model": "other", "input": "x"})));
        assert_eq!((status, err), (404, openai::deployment_not_found()));
        assert_eq!(answer(&mut m, keyed(RESPONSES, json!({"input": "x"}))).0, 400, "no model");
        // Charge: ceil(8 / 4) input + 20 max_output_tokens.
        let r = reply(m.handle(
            keyed(RESPONSES, json!({"model": "gpt4o", "input": "12345678", "max_output_tokens": 20})),
            0,
            0,
        ));
        assert_eq!((r.status, header(&r, "x-ratelimit-remaining-tokens")), (200, Some("8")));
        let id = json_body(&r)["id"].as_str().unwrap().to_string();
        let r = reply(m.handle(keyed(RESPONSES, json!({"model": "gpt4o", "input": "x"})), 0, 0));
        assert_eq!(r.status, 429);
        assert!(json_body(&r)["error"]["message"].as_str().unwrap().contains("Responses_Create"));
        // Stored-response requests use no quota but need the key.
        let mut get = keyed(&format!("{RESPONSES}/{id}"), json!({}));
        get.method = "GET".into();
        let r = reply(m.handle(get.clone(), 0, 0));
        assert_eq!((r.status, header(&r, "x-ratelimit-remaining-tokens")), (200, Some("8")));
        get.headers.remove("api-key");
        assert_eq!(reply(m.handle(get.clone(), 0, 0)).status, 401);
        get.headers.insert("api-key".into(), "k".into());
        faults(&mut m, json!([{"status": 503}, {"reset_after_events": 3}]));
        assert_eq!(reply(m.handle(get, 0, 0)).status, 503);
        // In the next quota window.
        let r = reply(m.handle(keyed(RESPONSES, json!({"model": "gpt4o", "stream": true})), 60_000, 0));
        assert_eq!((r.status, r.reset_after_events), (200, Some(3)));
        let faults: Vec<Value> =
            m.stats_json()["requests"].as_array().unwrap().iter().map(|r| r["fault"].clone()).collect();
        assert_eq!(faults[faults.len() - 2..], [json!("status"), json!("reset_after_events")]);
    }

    #[test]
    fn v1_chat_applies_the_allow_list_to_the_body_model() {
        let mut m = mock();
        m.settings.deployments = Some(vec!["gpt4o".into()]);
        for path in ["/openai/v1/chat/completions", "/v1/chat/completions"] {
            let (status, v) = answer(&mut m, req(path, json!({"model": "gpt4o", "messages": []})));
            assert_eq!((status, &v["model"]), (200, &json!("gpt4o")), "{path}");
            let (status, err) = answer(&mut m, req(path, json!({"model": "gpt-4o-mini", "messages": []})));
            assert_eq!((status, err), (404, openai::deployment_not_found()), "{path}");
        }
        let recs = m.stats_json()["requests"].clone();
        assert_eq!((&recs[1]["deployment"], &recs[1]["status"]), (&json!("gpt-4o-mini"), &json!(404)));
    }

    use crate::multipart::tests::{content_type, httpx_body};

    /// A POST with a form body built as httpx builds one.
    fn form_req(path_and_query: &str, fields: &[(&str, &str)], files: &[(&str, &str, &str, &[u8])]) -> RequestInfo {
        let mut r = req(path_and_query, json!({}));
        r.headers.insert("content-type".into(), content_type());
        r.body = bytes::Bytes::from(httpx_body(fields, files));
        r
    }

    fn upload(m: &mut Mock, path: &str, data: &[u8]) -> (u16, Value) {
        answer(m, form_req(path, &[("purpose", "batch")], &[("file", "in.jsonl", "application/octet-stream", data)]))
    }

    /// A JSONL line that is also valid with CRLF line ends.
    const JSONL: &[u8] =
        b"{\"custom_id\":\"a\",\"method\":\"POST\",\"url\":\"/chat/completions\",\"body\":{\"model\":\"gpt4o\",\"messages\":[]}}\r\n";

    fn raw_body(r: &Reply) -> (&'static str, &[u8]) {
        match &r.body {
            ReplyBody::Raw { content_type, bytes } => (content_type, bytes.as_ref()),
            other => panic!("not raw: {other:?}"),
        }
    }

    #[test]
    fn files_upload_list_retrieve_content_delete() {
        let mut m = mock();
        m.apply_config(&json!({"requests_per_window": 10})).unwrap();
        let (status, file) = upload(&mut m, "/openai/v1/files", JSONL);
        assert_eq!((status, &file["object"], &file["status"]), (200, &json!("file"), &json!("processed")));
        assert_eq!(
            (&file["bytes"], &file["filename"], &file["purpose"]),
            (&json!(JSONL.len()), &json!("in.jsonl"), &json!("batch"))
        );
        let id = file["id"].as_str().unwrap().to_string();
        assert!(id.starts_with("file-") && !id.contains("eastus"), "{id}");
        // Classic paths (api-version required) and /v1 reach the same store.
        let (status, list) = answer(&mut m, bare("GET", "/openai/files?api-version=2024-10-21"));
        assert_eq!((status, &list["object"], &list["data"]), (200, &json!("list"), &json!([file.clone()])));
        assert_eq!(answer(&mut m, bare("GET", &format!("/v1/files/{id}"))), (200, file.clone()));
        let r = reply(m.handle(bare("GET", &format!("/openai/files/{id}/content?api-version=1")), 0, 0));
        assert_eq!((r.status, raw_body(&r)), (200, ("application/octet-stream", JSONL)));
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("10"), "no quota used");
        assert_eq!(answer(&mut m, bare("GET", "/openai/files")).0, 404, "classic path without api-version");
        let (status, deleted) = answer(&mut m, bare("DELETE", &format!("/openai/v1/files/{id}")));
        assert_eq!((status, deleted), (200, json!({"id": id, "object": "file", "deleted": true})));
        let (status, err) = answer(&mut m, bare("GET", &format!("/openai/v1/files/{id}")));
        assert_eq!((status, err), (404, crate::files::file_not_found(&id)));
        let s = m.stats_json();
        assert_eq!(s["files_stored"], 0);
        let rec = &s["requests"][0];
        assert_eq!(rec["body_json"], json!({"purpose": "batch", "file": format!("in.jsonl ({} bytes)", JSONL.len())}));
        assert_eq!((&rec["deployment"], &rec["status"]), (&Value::Null, &json!(200)));
        assert_eq!(
            rec["body_len"],
            httpx_body(&[("purpose", "batch")], &[("file", "in.jsonl", "application/octet-stream", JSONL)]).len()
        );
    }

    #[test]
    fn files_are_per_backend_and_checked() {
        let mut m = mock();
        let mut west = Mock::new(Settings::new("west"), Quota::new(None, None, 60_000));
        let (_, theirs) = upload(&mut west, "/v1/files", b"x");
        let path = format!("/v1/files/{}", theirs["id"].as_str().unwrap());
        assert_eq!(answer(&mut m, bare("GET", &path)).0, 404, "another backend's file");
        assert_eq!(answer(&mut m, bare("GET", "/v1/files")).1["data"], json!([]));
        // Not a form; a form without purpose.
        let (status, err) = answer(&mut m, req("/v1/files", json!({"purpose": "batch"})));
        assert_eq!((status, err), (400, openai::not_multipart()));
        let (status, err) = answer(&mut m, form_req("/v1/files", &[], &[("file", "a", "text/plain", b"x")]));
        assert_eq!((status, err), (400, openai::missing_parameter("purpose")));
        // Key, and faults as on any data-plane request.
        m.settings.api_key = Some("k".into());
        assert_eq!(upload(&mut m, "/v1/files", b"x").0, 401);
        m.settings.api_key = None;
        faults(&mut m, json!([{"status": 503}]));
        assert_eq!(upload(&mut m, "/v1/files", b"x").0, 503);
        assert_eq!(m.stats_json()["files_stored"], 0);
        assert_eq!(m.stats_json()["requests"][5]["fault"], "status");
    }

    #[test]
    fn batches_run_on_this_backends_files() {
        let mut m = mock();
        let mut west = Mock::new(Settings::new("west"), Quota::new(None, None, 60_000));
        let (_, file) = upload(&mut m, "/openai/v1/files", JSONL);
        let create = json!({"input_file_id": file["id"], "endpoint": "/chat/completions", "completion_window": "24h"});
        let (status, err) = answer(&mut west, req("/openai/v1/batches", create.clone()));
        assert_eq!((status, err), (400, crate::batches::invalid_file(file["id"].as_str().unwrap())));
        let (status, batch) = answer(&mut m, req("/openai/batches?api-version=2024-10-21", create));
        assert_eq!((status, &batch["status"], &batch["input_file_id"]), (200, &json!("validating"), &file["id"]));
        let path = format!("/openai/v1/batches/{}", batch["id"].as_str().unwrap());
        assert_eq!(answer(&mut west, bare("GET", &path)).0, 404, "another backend's batch");
        let (status, done) = answer(&mut m, bare("GET", &path));
        assert_eq!(
            (status, &done["status"], &done["request_counts"]["completed"]),
            (200, &json!("completed"), &json!(1))
        );
        let output = format!("/v1/files/{}/content", done["output_file_id"].as_str().unwrap());
        let r = reply(m.handle(bare("GET", &output), 0, 0));
        let line: Value = serde_json::from_slice(raw_body(&r).1).unwrap();
        assert_eq!(line["response"]["body"]["choices"][0]["message"]["content"], "Hello from eastus part3 part4");
        let (status, list) = answer(&mut m, bare("GET", "/v1/batches"));
        assert_eq!((status, &list["data"]), (200, &json!([done.clone()])));
        assert_eq!(answer(&mut m, bare("POST", &format!("{path}/cancel"))), (200, done));
        let (status, err) = answer(&mut m, req("/v1/batches", json!({"input_file_id": file["id"]})));
        assert_eq!((status, &err["error"]["param"]), (400, &json!("endpoint")));
        let mut bad = req("/v1/batches", json!({}));
        bad.body = bytes::Bytes::from_static(b"{not json");
        assert_eq!(answer(&mut m, bad).1["error"]["code"], "BadRequest");
        let s = m.stats_json();
        assert_eq!((&s["batches_stored"], &s["files_stored"]), (&json!(1), &json!(2)));
    }

    const WAV: &[u8] = b"RIFF\x00\x00\r\n--\r\n\xff";

    fn audio(path: &str, model: Option<&str>, format: Option<&str>) -> RequestInfo {
        let fields: Vec<(&str, &str)> =
            [("model", model), ("response_format", format)].into_iter().filter_map(|(k, v)| Some((k, v?))).collect();
        form_req(path, &fields, &[("file", "talk.wav", "audio/x-wav", WAV)])
    }

    #[test]
    fn audio_on_both_planes_with_the_allow_list() {
        let mut m = mock();
        m.apply_config(&json!({"deployments": ["whisper"], "requests_per_window": 5, "tokens_per_window": 1})).unwrap();
        let classic = "/openai/deployments/whisper/audio/transcriptions?api-version=2024-10-21";
        let r = reply(m.handle(audio(classic, Some("whisper"), None), 0, 0));
        assert_eq!(
            (r.status, json_body(&r)),
            (200, &json!({"text": "Transcribed by eastus from talk.wav (13 bytes)"}))
        );
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("4"));
        assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), Some("1"), "audio counts requests only");
        let other = "/openai/deployments/other/audio/translations?api-version=2024-10-21";
        assert_eq!(answer(&mut m, audio(other, Some("whisper"), None)), (404, openai::deployment_not_found()));
        let (status, v) = answer(&mut m, audio("/openai/v1/audio/translations", Some("whisper"), None));
        assert_eq!((status, v), (200, json!({"text": "Translated by eastus from talk.wav (13 bytes)"})));
        let r = reply(m.handle(audio("/v1/audio/transcriptions", Some("whisper"), Some("text")), 0, 0));
        assert_eq!(raw_body(&r), ("text/plain; charset=utf-8", &b"Transcribed by eastus from talk.wav (13 bytes)"[..]));
        let v1 = "/openai/v1/audio/transcriptions";
        assert_eq!(answer(&mut m, audio(v1, Some("other"), None)), (404, openai::deployment_not_found()));
        assert_eq!(answer(&mut m, audio(v1, None, None)).0, 400, "no model");
        assert_eq!(answer(&mut m, audio(v1, Some("whisper"), Some("mp3"))).1["error"]["param"], "response_format");
        let (status, err) = answer(&mut m, req(v1, json!({"model": "whisper"})));
        assert_eq!((status, err), (400, openai::not_multipart()));
        let recs = m.stats_json()["requests"].clone();
        assert_eq!((&recs[0]["deployment"], &recs[2]["deployment"]), (&json!("whisper"), &json!("whisper")));
        assert_eq!(recs[2]["body_json"], json!({"model": "whisper", "file": "talk.wav (13 bytes)"}));
        assert_eq!((&recs[4]["deployment"], &recs[4]["status"]), (&json!("other"), &json!(404)));
    }

    #[test]
    fn image_edits_on_both_planes_with_the_allow_list() {
        let mut m = mock();
        m.settings.deployments = Some(vec!["dalle".into()]);
        let png: &[u8] = b"\x89PNG\r\n\x1a\n";
        let edit =
            |path: &str, fields: &[(&str, &str)]| form_req(path, fields, &[("image", "cat.png", "image/png", png)]);
        let classic = "/openai/deployments/dalle/images/edits?api-version=2025-04-01-preview";
        let (status, v) = answer(&mut m, edit(classic, &[("prompt", "a hat"), ("n", "2")]));
        assert_eq!((status, &v["created"]), (200, &json!(100)));
        assert_eq!(v["data"][1]["url"], "https://mock.invalid/eastus/image-2.png");
        assert_eq!(v["data"][0]["revised_prompt"], "a hat (by eastus)");
        let fields = [("prompt", "a hat"), ("model", "dalle"), ("response_format", "b64_json")];
        let (status, v) = answer(&mut m, edit("/openai/v1/images/edits", &fields));
        assert_eq!((status, &v["data"][0]["b64_json"]), (200, &json!(openai::TINY_PNG_B64)));
        let (status, err) = answer(&mut m, edit("/v1/images/edits", &[("prompt", "a hat"), ("model", "gpt-image")]));
        assert_eq!((status, err), (404, openai::deployment_not_found()));
        let classic_other = "/openai/deployments/other/images/edits?api-version=1";
        assert_eq!(answer(&mut m, edit(classic_other, &[("prompt", "p")])).0, 404);
        let (status, err) = answer(&mut m, edit(classic, &[("n", "1")]));
        assert_eq!((status, err), (400, openai::missing_parameter("prompt")));
        let no_image = form_req(classic, &[("prompt", "p")], &[]);
        assert_eq!(answer(&mut m, no_image), (400, openai::missing_parameter("image")));
        let recs = m.stats_json()["requests"].clone();
        assert_eq!(recs[0]["body_json"], json!({"prompt": "a hat", "n": "2", "image": "cat.png (8 bytes)"}));
        // The next generation continues the image numbering.
        let img = "/openai/deployments/dalle/images/generations?api-version=1";
        assert_eq!(
            answer(&mut m, req(img, json!({"prompt": "x"}))).1["data"][0]["url"],
            "https://mock.invalid/eastus/image-4.png"
        );
    }

    #[test]
    fn large_forms_keep_their_fields_in_stats() {
        let mut m = mock();
        let big = vec![b'\n'; MAX_STORED_BODY + 10];
        assert_eq!(upload(&mut m, "/v1/files", &big).0, 200);
        let rec = &m.stats_json()["requests"][0];
        assert_eq!(rec["body_json"], json!({"purpose": "batch", "file": format!("in.jsonl ({} bytes)", big.len())}));
        assert!(rec["body_len"].as_u64().unwrap() > big.len() as u64);
        let long_prompt = "p".repeat(MAX_STORED_BODY + 1);
        let path = "/openai/deployments/dalle/images/edits?api-version=1";
        let r = form_req(path, &[("prompt", &long_prompt)], &[("image", "a.png", "image/png", b"x")]);
        assert_eq!(answer(&mut m, r).0, 200);
        assert_eq!(m.stats_json()["requests"][1]["body_json"], Value::Null, "large text fields are not kept");
        // A form sent to a JSON operation is not JSON.
        let chat = form_req(CHAT, &[("messages", "[]")], &[]);
        assert_eq!(answer(&mut m, chat).1["error"]["code"], "BadRequest");
    }

    /// A realtime connection request (`upgrade`: it asks for a websocket).
    fn realtime(m: &mut Mock, path_and_query: &str, headers: &[(&str, &str)], upgrade: bool) -> Outcome {
        let mut r = bare("GET", path_and_query);
        r.headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let route = crate::realtime::parse_route(&r.method, &r.path, &r.query).unwrap();
        m.handle_realtime(r, route, upgrade, 0)
    }

    fn refused(o: Outcome) -> (u16, Value) {
        let r = reply(o);
        (r.status, json_body(&r).clone())
    }

    const GA_RT: &str = "/openai/v1/realtime?model=gpt-rt";

    #[test]
    fn realtime_auth_forms() {
        let mut m = mock();
        m.settings.api_key = Some("k".into());
        assert_eq!(refused(realtime(&mut m, GA_RT, &[], true)), (401, openai::access_denied()));
        assert_eq!(refused(realtime(&mut m, GA_RT, &[("api-key", "bad")], true)).0, 401);
        assert_eq!(refused(realtime(&mut m, &format!("{GA_RT}&api-key=bad"), &[], true)).0, 401);
        for (path, headers) in [
            (GA_RT.to_string(), vec![("api-key", "k")]),
            (GA_RT.to_string(), vec![("authorization", "Bearer k")]),
            (format!("{GA_RT}&api-key=k"), vec![]),
            ("/openai/realtime?api-key=k&api-version=2024-10-01-preview&deployment=gpt-rt".to_string(), vec![]),
        ] {
            let Outcome::Upgrade(u) = realtime(&mut m, &path, &headers, true) else { panic!("{path} {headers:?}") };
            assert_eq!(u.reset_after_events, None);
        }
        let s = m.stats_json();
        assert_eq!((&s["by_status"]["101"], &s["by_status"]["401"]), (&json!(4), &json!(3)));
        let rec = &s["requests"][5];
        assert_eq!(
            (&rec["method"], &rec["path"], &rec["query"]),
            (&json!("GET"), &json!("/openai/v1/realtime"), &json!("model=gpt-rt&api-key=k"))
        );
        assert_eq!((&rec["deployment"], &rec["status"], &rec["ws_events"]), (&json!("gpt-rt"), &json!(101), &json!(0)));
        assert_eq!(s["requests"][0]["ws_events"], Value::Null, "not upgraded");
        assert_eq!(s["requests"][4]["headers"]["authorization"], "Bearer k");
    }

    #[test]
    fn realtime_deployment_api_version_and_upgrade_checks() {
        let mut m = mock();
        m.settings.deployments = Some(vec!["gpt-rt".into()]);
        assert!(matches!(realtime(&mut m, GA_RT, &[], true), Outcome::Upgrade(_)));
        let other = "/openai/v1/realtime?model=gpt-4o";
        assert_eq!(refused(realtime(&mut m, other, &[], true)), (404, openai::deployment_not_found()));
        let preview = "/openai/realtime?api-version=2024-10-01-preview&deployment=";
        assert_eq!(refused(realtime(&mut m, &format!("{preview}gpt-4o"), &[], true)).0, 404);
        let (status, err) = refused(realtime(&mut m, preview, &[], true));
        assert_eq!((status, &err["error"]["param"]), (400, &json!("deployment")));
        let (status, err) = refused(realtime(&mut m, "/openai/realtime?deployment=gpt-rt", &[], true));
        assert_eq!((status, err), (404, openai::resource_not_found()), "preview needs api-version");
        assert_eq!(refused(realtime(&mut m, "/openai/v1/realtime", &[], true)).1["error"]["param"], "model");
        assert_eq!(refused(realtime(&mut m, GA_RT, &[], false)).0, 400, "no upgrade headers");
        let Outcome::Upgrade(u) = realtime(&mut m, &format!("{preview}gpt-rt"), &[], true) else { panic!() };
        assert!(format!("{:?}", u.session).contains("preview: true"));
        let recs = m.stats_json()["requests"].clone();
        assert_eq!((&recs[1]["deployment"], &recs[1]["status"]), (&json!("gpt-4o"), &json!(404)));
    }

    #[test]
    fn realtime_takes_the_stream_faults_as_plain_ones() {
        let mut m = mock();
        faults(&mut m, json!([{"stream_error_before_content": true}, {"first_content_delay_ms": 40}]));
        let r = reply(realtime(&mut m, GA_RT, &[], true));
        assert_eq!((r.status, header(&r, "x-mock-injected")), (500, Some("true")));
        let Outcome::Upgrade(u) = realtime(&mut m, GA_RT, &[], true) else { panic!("not upgraded") };
        assert_eq!(u.latency_ms, 40);
        let recs = m.stats_json()["requests"].clone();
        assert_eq!(
            (&recs[0]["status"], &recs[0]["fault"], &recs[1]["status"], &recs[1]["fault"]),
            (&json!(500), &json!("stream_error_before_content"), &json!(101), &json!("first_content_delay_ms"))
        );
    }

    #[test]
    fn realtime_faults_and_quota_apply_before_upgrading() {
        let mut m = mock();
        m.apply_config(&json!({"requests_per_window": 2, "tokens_per_window": 5, "api_key": "k"})).unwrap();
        faults(
            &mut m,
            json!([{"status": 429, "retry_after": "7"}, {"reset": true}, {"hang": true}, {"status": 200, "headers": {"x-a": "b"}},
                   {"hang_ms": 30}, {"reset_after_events": 2}]),
        );
        // An injected error needs no key and uses no quota.
        let r = reply(realtime(&mut m, GA_RT, &[], true));
        assert_eq!(
            (r.status, header(&r, "retry-after"), header(&r, "x-mock-injected")),
            (429, Some("7"), Some("true"))
        );
        assert!(json_body(&r)["error"]["message"].as_str().unwrap().contains("Realtime_Connect"));
        assert!(matches!(realtime(&mut m, GA_RT, &[("api-key", "k")], true), Outcome::Reset { .. }));
        assert!(matches!(realtime(&mut m, GA_RT, &[("api-key", "k")], true), Outcome::Hang));
        let Outcome::Upgrade(u) = realtime(&mut m, GA_RT, &[("api-key", "k")], true) else { panic!() };
        let names: Vec<&str> = u.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"x-a") && names.contains(&"x-ratelimit-remaining-requests"), "{names:?}");
        assert!(u.headers.iter().any(|(n, v)| n == "x-ratelimit-remaining-tokens" && v == "5"), "no tokens charged");
        // The quota is spent: one request per connection.
        let Outcome::Upgrade(u) = realtime(&mut m, GA_RT, &[("api-key", "k")], true) else { panic!() };
        assert_eq!(u.latency_ms, 30, "hang_ms delays the 101");
        let r = reply(realtime(&mut m, GA_RT, &[("api-key", "k")], true));
        assert_eq!(r.status, 429);
        let s = m.stats_json();
        let kinds: Vec<Value> = s["requests"].as_array().unwrap().iter().map(|r| r["fault"].clone()).collect();
        assert_eq!(
            kinds,
            [
                json!("status"),
                json!("reset"),
                json!("hang"),
                json!("pass"),
                json!("hang_ms"),
                json!("reset_after_events")
            ]
        );
        let statuses: Vec<Value> = s["requests"].as_array().unwrap().iter().map(|r| r["status"].clone()).collect();
        assert_eq!(statuses, [json!(429), json!(0), json!(0), json!(101), json!(101), json!(429)]);
    }
}
