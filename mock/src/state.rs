//! The mock's mutable state (runtime settings, quota, injected faults, stats)
//! and the synchronous request decision. No I/O happens here: the server layer
//! turns an [`Outcome`] into bytes on the wire (sleeping for latency/stream
//! delays), so the whole decision logic is unit-testable with a fake clock.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::openai::{self, Ctx, Operation, Route, StreamPlan};
use crate::quota::{LimitKind, Quota, Remaining};

/// Request records kept for `/_mock/stats`.
pub const MAX_RECORDS: usize = 2000;
/// Bodies larger than this are counted but not stored in stats.
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
        }
    }
}

/// One queued fault (`fail_next` entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and an Azure-style error body.
    /// A status below 400 means "no fault": the request is served normally.
    Status { status: u16, retry_after: Option<String>, retry_after_ms: Option<String> },
    /// Close the connection without any response.
    Reset,
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
    pub status: u16,
    pub stream: bool,
}

/// A data-plane request, already fully read.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    /// Wall-clock time of arrival (unix ms), for stats.
    pub ts_ms: u64,
    pub method: String,
    pub path: String,
    pub query: String,
    /// Lowercased names; repeated headers joined with ", ".
    pub headers: BTreeMap<String, String>,
    pub body: bytes::Bytes,
}

#[derive(Debug)]
pub enum ReplyBody {
    Json(Value),
    Stream(StreamPlan),
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: ReplyBody,
    /// Sleep before sending the response head.
    pub latency_ms: u64,
    /// Sleep before each stream content event.
    pub stream_delay_ms: u64,
}

#[derive(Debug)]
pub enum Outcome {
    Reply(Reply),
    /// Drop the connection (after `latency_ms`) without responding.
    Reset {
        latency_ms: u64,
    },
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
}

fn remaining_headers(r: Remaining, headers: &mut Vec<(&'static str, String)>) {
    if let Some(n) = r.requests {
        headers.push(("x-ratelimit-remaining-requests", n.to_string()));
    }
    if let Some(n) = r.tokens {
        headers.push(("x-ratelimit-remaining-tokens", n.to_string()));
    }
}

fn authorized(key: &str, headers: &BTreeMap<String, String>) -> bool {
    if headers.get("api-key").is_some_and(|v| v == key) {
        return true;
    }
    headers.get("authorization").is_some_and(|v| {
        v.split_once(' ').is_some_and(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer") && token.trim() == key)
    })
}

impl Mock {
    pub fn new(settings: Settings, quota: Quota) -> Self {
        Mock {
            settings,
            quota,
            faults: VecDeque::new(),
            total: 0,
            by_status: BTreeMap::new(),
            records: VecDeque::new(),
            next_id: 1,
            next_image: 1,
        }
    }

    /// `/_mock/reset`: clear stats, quota window and fault queue.
    pub fn reset(&mut self) {
        self.quota.reset();
        self.faults.clear();
        self.total = 0;
        self.by_status.clear();
        self.records.clear();
    }

    pub fn stats_json(&self) -> Value {
        json!({
            "name": self.settings.name,
            "requests_total": self.total,
            "by_status": self.by_status,
            "requests": self.records,
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
            "fail_next_pending": self.faults.len(),
        })
    }

    /// Apply a `/_mock/config` body. Validates everything before changing anything.
    pub fn apply_config(&mut self, body: &Value) -> Result<(), String> {
        let obj = body.as_object().ok_or("config body must be a JSON object")?;
        let mut settings = self.settings.clone();
        let mut quota = self.quota.clone();
        let mut faults = Vec::new();
        let mut limits_changed = false;
        for (key, v) in obj {
            match key.as_str() {
                "requests_per_window" => {
                    quota.requests_per_window = opt_u64(key, v)?;
                    limits_changed = true;
                }
                "tokens_per_window" => {
                    quota.tokens_per_window = opt_u64(key, v)?;
                    limits_changed = true;
                }
                "window_ms" => {
                    quota.window_ms = req_u64(key, v)?.max(1);
                    limits_changed = true;
                }
                "latency_ms" => settings.latency_ms = req_u64(key, v)?,
                "stream_chunks" => {
                    settings.stream_chunks = usize::try_from(req_u64(key, v)?.clamp(1, 100_000))
                        .map_err(|_| "stream_chunks out of range".to_string())?
                }
                "stream_chunk_delay_ms" => settings.stream_chunk_delay_ms = req_u64(key, v)?,
                "api_key" => {
                    settings.api_key = match v {
                        Value::Null => None,
                        Value::String(s) => Some(s.clone()),
                        _ => return Err("api_key must be a string or null".into()),
                    }
                }
                "deployments" => {
                    settings.deployments = match v {
                        Value::Null => None,
                        Value::Array(items) => Some(
                            items
                                .iter()
                                .map(|i| i.as_str().map(str::to_string))
                                .collect::<Option<Vec<_>>>()
                                .ok_or("deployments must be an array of strings or null")?,
                        ),
                        _ => return Err("deployments must be an array of strings or null".into()),
                    }
                }
                "retry_after_header" => {
                    settings.retry_after_header = match v.as_str() {
                        Some("keep") => true,
                        Some("omit") => false,
                        _ => return Err("retry_after_header must be \"keep\" or \"omit\"".into()),
                    }
                }
                "fail_next" => {
                    let items = v.as_array().ok_or("fail_next must be an array")?;
                    for item in items {
                        faults.push(parse_fault(item)?);
                    }
                }
                other => return Err(format!("unknown config key: {other}")),
            }
        }
        self.settings = settings;
        self.quota = quota;
        if limits_changed {
            self.quota.reset();
        }
        self.faults.extend(faults);
        Ok(())
    }

    fn record(&mut self, req: RequestInfo, parsed: Option<&Value>, deployment: Option<String>, status: u16) {
        self.total += 1;
        *self.by_status.entry(status.to_string()).or_insert(0) += 1;
        let body_json =
            if req.body.len() <= MAX_STORED_BODY { parsed.cloned().unwrap_or(Value::Null) } else { Value::Null };
        let stream = parsed.is_some_and(openai::wants_stream);
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
        });
    }

    /// Decide how to answer a data-plane request and record it in stats.
    /// `now_ms` is the quota clock, `unix_s` the `created` timestamp.
    pub fn handle(&mut self, req: RequestInfo, now_ms: u64, unix_s: u64) -> Outcome {
        let parsed: Option<Value> = serde_json::from_slice(&req.body).ok();
        let latency_ms = self.settings.latency_ms;
        let stream_delay_ms = self.settings.stream_chunk_delay_ms;
        let mut headers: Vec<(&'static str, String)> = Vec::new();

        macro_rules! reply {
            ($status:expr, $body:expr, $deployment:expr) => {{
                let status: u16 = $status;
                self.record(req, parsed.as_ref(), $deployment, status);
                return Outcome::Reply(Reply {
                    status,
                    headers,
                    body: ReplyBody::Json($body),
                    latency_ms,
                    stream_delay_ms,
                });
            }};
        }

        let route = match (req.method.as_str(), openai::parse_path(&req.path)) {
            ("POST", Some(route)) => route,
            _ => reply!(404, openai::resource_not_found(), None),
        };
        let op = route.op();
        let api_version = openai::query_param(&req.query, "api-version").filter(|v| !v.is_empty()).map(str::to_string);
        let api_version_text = api_version.clone().unwrap_or_else(|| openai::DEFAULT_API_VERSION.into());
        let deployment: Option<String> = match &route {
            Route::Classic { deployment, .. } => Some(deployment.clone()),
            Route::ModelInBody { .. } => {
                parsed.as_ref().and_then(|b| b.get("model")).and_then(Value::as_str).map(str::to_string)
            }
        };

        // Every data-plane response reports the remaining quota; admission
        // below replaces these with the post-admission numbers.
        let before = self.quota.remaining(now_ms);

        match self.faults.pop_front() {
            Some(Fault::Reset) => {
                self.record(req, parsed.as_ref(), deployment, 0);
                return Outcome::Reset { latency_ms };
            }
            Some(Fault::Status { status, retry_after, retry_after_ms }) if status >= 400 => {
                remaining_headers(before, &mut headers);
                headers.push(("x-mock-injected", "true".into()));
                if let Some(r) = &retry_after {
                    headers.push(("retry-after", r.clone()));
                }
                if let Some(r) = retry_after_ms {
                    headers.push(("retry-after-ms", r));
                }
                let body = openai::injected_error(status, op, &api_version_text, retry_after.as_deref());
                reply!(status, body, deployment)
            }
            _ => {}
        }

        remaining_headers(before, &mut headers);
        if let Some(key) = &self.settings.api_key {
            if !authorized(key, &req.headers) {
                reply!(401, openai::access_denied(), deployment)
            }
        }
        if matches!(route, Route::Classic { .. }) && api_version.is_none() {
            reply!(404, openai::resource_not_found(), deployment)
        }
        let body = match &parsed {
            Some(b @ Value::Object(_)) => b.clone(),
            Some(_) => reply!(
                400,
                openai::error_body("BadRequest", "The request body must be a JSON object."),
                deployment
            ),
            None => reply!(
                400,
                openai::error_body(
                    "BadRequest",
                    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
                ),
                deployment
            ),
        };
        let Some(model) = deployment.clone() else {
            reply!(400, openai::error_body("BadRequest", "you must provide a model parameter"), None)
        };
        if let Some(list) = &self.settings.deployments {
            if !list.iter().any(|d| d == &model) {
                reply!(404, openai::deployment_not_found(), deployment)
            }
        }

        let charge = openai::quota_charge(op, &body);
        match self.quota.try_admit(now_ms, charge) {
            Ok(after) => {
                headers.clear();
                remaining_headers(after, &mut headers);
            }
            Err(rej) => {
                headers.clear();
                remaining_headers(rej.remaining, &mut headers);
                let secs = rej.retry_after_secs();
                if self.settings.retry_after_header {
                    headers.push(("retry-after", secs.to_string()));
                    headers.push(("retry-after-ms", rej.reset_in_ms.to_string()));
                }
                let err = openai::rate_limited(op, &api_version_text, rej.kind == LimitKind::Requests, secs);
                reply!(429, err, deployment)
            }
        }

        let id = self.next_id;
        self.next_id += 1;
        let name = self.settings.name.clone();
        let chunks = self.settings.stream_chunks.max(1);
        let ctx = Ctx { name: &name, id, created: unix_s, model: &model };
        let prompt = openai::estimate_prompt_tokens(op, &body);
        let stream = op.can_stream() && openai::wants_stream(&body);
        let reply_body = match (op, stream) {
            (Operation::ChatCompletions, true) => ReplyBody::Stream(openai::chat_stream(&ctx, &body, prompt, chunks)),
            (Operation::ChatCompletions, false) => ReplyBody::Json(openai::chat_completion(&ctx, prompt, chunks)),
            (Operation::Completions, true) => ReplyBody::Stream(openai::completion_stream(&ctx, &body, prompt, chunks)),
            (Operation::Completions, false) => ReplyBody::Json(openai::text_completion(&ctx, prompt, chunks)),
            (Operation::Embeddings, _) => ReplyBody::Json(openai::embeddings(&ctx, &body, prompt)),
            (Operation::ImageGenerations, _) => {
                let first = self.next_image;
                self.next_image += openai::image_count(&body);
                ReplyBody::Json(openai::images(&ctx, &body, first))
            }
        };
        self.record(req, parsed.as_ref(), deployment, 200);
        Outcome::Reply(Reply { status: 200, headers, body: reply_body, latency_ms, stream_delay_ms })
    }
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

/// A header value given as a string or a number.
fn header_value(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(format!("fail_next.{key} must be a string or number")),
    }
}

fn parse_fault(v: &Value) -> Result<Fault, String> {
    let obj = v.as_object().ok_or("fail_next entries must be objects")?;
    for k in obj.keys() {
        if !matches!(k.as_str(), "status" | "reset" | "retry_after" | "retry_after_ms") {
            return Err(format!("unknown fail_next key: {k}"));
        }
    }
    if obj.get("reset").and_then(Value::as_bool) == Some(true) {
        return Ok(Fault::Reset);
    }
    let status = obj
        .get("status")
        .and_then(Value::as_u64)
        .filter(|s| (100..=599).contains(s))
        .ok_or("fail_next entry needs \"status\" (100-599) or \"reset\": true")?;
    Ok(Fault::Status {
        status: u16::try_from(status).map_err(|_| "bad status".to_string())?,
        retry_after: header_value(obj, "retry_after")?,
        retry_after_ms: header_value(obj, "retry_after_ms")?,
    })
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
            Outcome::Reset { .. } => panic!("unexpected reset"),
        }
    }

    fn header<'a>(r: &'a Reply, name: &str) -> Option<&'a str> {
        r.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    fn json_body(r: &Reply) -> &Value {
        match &r.body {
            ReplyBody::Json(v) => v,
            ReplyBody::Stream(_) => panic!("unexpected stream"),
        }
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
}
