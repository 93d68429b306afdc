//! One client request as the request role sees it, from headers to the log
//! line: authentication, client limits, routing, token accounting. Pure: the
//! glue feeds it what the host reports and applies what it returns.

use crate::clients::{self, Auth};
use crate::gateway::{Gateway, LocalReply, RequestDecision};
use crate::limits::{self, Admission, Limits, Remaining};
use crate::metrics::{self, Metrics};
use crate::paths;
use crate::store::{Clock, SharedStore};
use crate::usage::{self, RequestFacts, SseScanner, Usage};
use serde::Serialize;
use serde_json::Value;

/// Request headers the decisions read.
#[derive(Debug, Clone, Default)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub api_key: Option<&'a str>,
    pub apim_key: Option<&'a str>,
    pub authorization: Option<&'a str>,
    pub content_length: Option<u64>,
    /// False when the headers ended the request (no body follows).
    pub has_body: bool,
}

/// What the request role does with the request headers. Everything is
/// decided here: in Envoy, a wasm filter that holds the headers does not see
/// the body until it lets them go, so the body can only be looked at (and
/// rewritten) on its way to the already chosen backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Forward {
        cluster: String,
        path: String,
        /// Buffer the body and hand it to `on_request_body`.
        inspect_body: bool,
        /// Remove `content-length`: the body may change size.
        drop_content_length: bool,
    },
    Reply(LocalReply),
}

/// Largest JSON answer kept to read its `usage` (answers are small; a huge
/// one is passed on without accounting rather than held in memory).
const MAX_JSON_ANSWER: usize = 4 << 20;

#[derive(Debug, Default)]
pub struct Exchange {
    started_ms: u64,
    method: String,
    path: String,
    client: Option<usize>,
    facts: RequestFacts,
    charged_tokens: u64,
    admitted: bool,
    remaining: Remaining,
    local_reason: Option<&'static str>,
    status: u32,
    backend: Option<String>,
    attempts: Option<u32>,
    sse: Option<SseScanner>,
    json_answer: Option<Vec<u8>>,
    strip_usage: bool,
    prompt: Option<String>,
    answer_model: Option<String>,
    usage: Option<Usage>,
}

impl Exchange {
    pub fn new(now_ms: u64) -> Exchange {
        Exchange { started_ms: now_ms, ..Exchange::default() }
    }

    fn client_limits(&self, gw: &Gateway) -> Option<(String, Limits)> {
        let c = gw.config.clients.get(self.client?)?;
        let limits = Limits { requests_per_minute: c.requests_per_minute, tokens_per_minute: c.tokens_per_minute };
        (limits.requests_per_minute.is_some() || limits.tokens_per_minute.is_some())
            .then(|| (limits::key(&c.name, &limits), limits))
    }

    fn client_name<'g>(&self, gw: &'g Gateway) -> &'g str {
        self.client.and_then(|i| gw.config.clients.get(i)).map_or("", |c| c.name.as_str())
    }

    fn reply(&mut self, metrics: &dyn Metrics, reason: &'static str, reply: LocalReply) -> Step {
        self.local_reason = Some(reason);
        self.status = reply.status;
        metrics.add(&metrics::name(metrics::LOCAL_REPLIES, &[("reason", reason)]), 1);
        Step::Reply(reply)
    }

    pub fn on_request_headers(
        &mut self,
        gw: &Gateway,
        store: &dyn SharedStore,
        clock: &dyn Clock,
        metrics: &dyn Metrics,
        head: &RequestHead<'_>,
    ) -> Step {
        self.method = head.method.to_string();
        self.path = head.path.to_string();
        if !paths::is_api_path(head.path) {
            let reply = LocalReply::error(
                404,
                "404",
                "Resource not found: Spillway serves /openai/... (Azure OpenAI) and /v1/... (OpenAI) paths",
            );
            return self.reply(metrics, "not_found", reply);
        }
        let presented = clients::presented_key(head.api_key, head.apim_key, head.authorization);
        match clients::authenticate(&gw.config.clients, presented) {
            Auth::Open => {}
            Auth::Client(i) => self.client = Some(i),
            Auth::Missing | Auth::Invalid => {
                metrics.add(metrics::AUTH_FAILURES, 1);
                let reply = LocalReply::error(
                    401,
                    "401",
                    "Access denied due to a missing or invalid key. Send your gateway key in the api-key header (or Authorization: Bearer).",
                );
                return self.reply(metrics, "unauthorized", reply);
            }
        }
        let now = clock.now_ms();
        let limits = self.client_limits(gw);
        let tokens_limited = limits.as_ref().is_some_and(|(_, l)| l.tokens_per_minute.is_some());
        if let Some((key, limits)) = &limits {
            // The prompt cannot be larger than the body: its size is the
            // estimate until the body has been read.
            let cost =
                if tokens_limited { head.content_length.unwrap_or(0).div_ceil(usage::CHARS_PER_TOKEN) } else { 0 };
            match limits::admit(store, key, limits, now, cost) {
                Admission::Admitted(remaining) => {
                    self.remaining = remaining;
                    self.charged_tokens = cost;
                    self.admitted = true;
                }
                Admission::Limited { retry_after_ms, remaining, by_tokens } => {
                    self.remaining = remaining;
                    let secs = retry_after_ms.div_ceil(1000).max(1);
                    let what = if by_tokens { "token" } else { "request" };
                    let mut reply = LocalReply::error(
                        429,
                        "429",
                        &format!(
                            "Client {} exceeded its {what} rate limit. Please retry after {secs} seconds.",
                            self.client_name(gw)
                        ),
                    );
                    reply.headers.push(("retry-after", secs.to_string()));
                    reply.headers.push(("retry-after-ms", retry_after_ms.to_string()));
                    reply.headers.extend(self.remaining_headers());
                    let reason = if by_tokens { "client_tokens" } else { "client_requests" };
                    return self.reply(metrics, reason, reply);
                }
            }
        }
        match gw.route_request(store, clock, &self.path) {
            RequestDecision::Forward { cluster, path } => {
                let may_add_usage = gw.config.stream_usage && is_chat(&self.path);
                Step::Forward {
                    cluster,
                    path,
                    inspect_body: head.has_body && (tokens_limited || may_add_usage || gw.config.log_bodies),
                    drop_content_length: head.has_body && may_add_usage,
                }
            }
            RequestDecision::Reply(mut reply) => {
                // Not served: give the client its request and tokens back.
                self.refund(gw, store, now);
                reply.headers.extend(self.remaining_headers());
                let reason = if reply.status == 429 { "all_throttled" } else { "not_found" };
                self.reply(metrics, reason, reply)
            }
        }
    }

    /// The whole request body, when `inspect_body` asked for it. Charges the
    /// client the rest of the estimate and returns a replacement body when
    /// usage must be requested from the backend.
    pub fn on_request_body(
        &mut self,
        gw: &Gateway,
        store: &dyn SharedStore,
        clock: &dyn Clock,
        body: &[u8],
    ) -> Option<Vec<u8>> {
        self.facts = usage::request_facts(body);
        if gw.config.log_bodies {
            let mut prompt = String::new();
            usage::push_capped(&mut prompt, &prompt_text(body), gw.config.log_body_max_bytes);
            self.prompt = Some(prompt);
        }
        if let (true, Some((key, limits))) = (self.admitted, self.client_limits(gw)) {
            if limits.tokens_per_minute.is_some() {
                let estimate = self.facts.estimated_tokens;
                let delta = i64::try_from(estimate).unwrap_or(i64::MAX)
                    - i64::try_from(self.charged_tokens).unwrap_or(i64::MAX);
                limits::correct(store, &key, &limits, clock.now_ms(), delta, false);
                self.charged_tokens = estimate;
            }
        }
        if gw.config.stream_usage && self.facts.stream && !self.facts.include_usage && is_chat(&self.path) {
            let new_body = usage::with_include_usage(body);
            self.strip_usage = new_body.is_some();
            return new_body;
        }
        None
    }

    fn refund(&mut self, gw: &Gateway, store: &dyn SharedStore, now: u64) {
        if let (true, Some((key, limits))) = (self.admitted, self.client_limits(gw)) {
            let delta = -i64::try_from(self.charged_tokens).unwrap_or(i64::MAX);
            limits::correct(store, &key, &limits, now, delta, true);
            self.admitted = false;
            self.charged_tokens = 0;
        }
    }

    /// Azure-style remaining-quota headers for the client's limits.
    pub fn remaining_headers(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(r) = self.remaining.requests {
            out.push(("x-ratelimit-remaining-requests", r.to_string()));
        }
        if let Some(t) = self.remaining.tokens {
            out.push(("x-ratelimit-remaining-tokens", t.to_string()));
        }
        out
    }

    pub fn is_local_reply(&self) -> bool {
        self.local_reason.is_some()
    }

    /// Response headers arrived. Returns the headers to set on the response
    /// (the backend's own rate-limit headers are replaced by the client's).
    pub fn on_response_headers(
        &mut self,
        gw: &Gateway,
        status: u32,
        content_type: Option<&str>,
        backend: Option<&str>,
        attempts: Option<&str>,
    ) -> Vec<(&'static str, String)> {
        if self.is_local_reply() {
            return Vec::new();
        }
        self.status = status;
        self.backend = backend.map(str::to_string);
        self.attempts = attempts.and_then(|a| a.parse().ok());
        let text_cap = if gw.config.log_bodies { gw.config.log_body_max_bytes } else { 0 };
        if content_type.is_some_and(|c| c.starts_with("text/event-stream")) {
            self.sse = Some(SseScanner::new(self.strip_usage, text_cap));
        } else if content_type.is_some_and(|c| c.contains("json")) {
            self.json_answer = Some(Vec::new());
        }
        let mut headers = self.remaining_headers();
        if self.client_limits(gw).is_none() {
            headers.clear();
        }
        headers
    }

    /// A response body chunk passes. Returns a replacement when the chunk
    /// must change (the usage-only SSE chunk removed).
    pub fn on_response_body(&mut self, chunk: &[u8], end_of_stream: bool) -> Option<Vec<u8>> {
        if let Some(sse) = &mut self.sse {
            let out = sse.feed(chunk, end_of_stream);
            return self.strip_usage.then_some(out);
        }
        if let Some(buf) = &mut self.json_answer {
            if buf.len() + chunk.len() <= MAX_JSON_ANSWER {
                buf.extend_from_slice(chunk);
            } else {
                self.json_answer = None;
            }
        }
        None
    }

    /// The exchange is over: settle the client's tokens, count, and return
    /// the structured log line.
    pub fn finish(
        &mut self,
        gw: &Gateway,
        store: &dyn SharedStore,
        clock: &dyn Clock,
        metrics: &dyn Metrics,
    ) -> String {
        let now = clock.now_ms();
        let mut answer_text = None;
        if let Some(sse) = &self.sse {
            self.usage = sse.usage;
            self.answer_model = sse.model.clone();
            answer_text = Some(sse.text.clone());
        } else if let Some(body) = &self.json_answer {
            let (u, model) = usage::json_answer(body);
            self.usage = u;
            self.answer_model = model;
            if gw.config.log_bodies {
                let mut text = String::new();
                usage::push_capped(&mut text, &answer_json_text(body), gw.config.log_body_max_bytes);
                answer_text = Some(text);
            }
        }
        if self.admitted {
            if (200..300).contains(&self.status) {
                if let (Some(u), Some((key, limits))) = (self.usage, self.client_limits(gw)) {
                    let delta = i64::try_from(u.total).unwrap_or(i64::MAX)
                        - i64::try_from(self.charged_tokens).unwrap_or(i64::MAX);
                    limits::correct(store, &key, &limits, now, delta, false);
                }
            } else {
                // Failed answers are not billed by the backend: refund the estimate.
                self.refund(gw, store, now);
            }
        }
        let client = self.client_name(gw).to_string();
        let deployment = paths::deployment(&self.path)
            .map(str::to_string)
            .or_else(|| self.facts.model.clone())
            .or_else(|| self.answer_model.clone())
            .unwrap_or_default();
        let backend = self.backend.clone().unwrap_or_default();
        metrics.add(
            &metrics::name(metrics::REQUESTS, &[("client", &client), ("class", &metrics::status_class(self.status))]),
            1,
        );
        if let Some(u) = self.usage {
            for (kind, n) in [("prompt", u.prompt), ("completion", u.completion)] {
                let labels =
                    [("backend", backend.as_str()), ("client", &client), ("deployment", &deployment), ("kind", kind)];
                metrics.add(&metrics::name(metrics::TOKENS, &labels), n);
            }
        }
        let line = LogLine {
            msg: "request",
            client: &client,
            method: &self.method,
            path: self.path.split('?').next().unwrap_or(""),
            deployment: &deployment,
            backend: self.backend.as_deref(),
            attempts: self.attempts.unwrap_or(0),
            status: self.status,
            stream: self.facts.stream || self.sse.is_some(),
            prompt_tokens: self.usage.map(|u| u.prompt),
            completion_tokens: self.usage.map(|u| u.completion),
            total_tokens: self.usage.map(|u| u.total),
            duration_ms: now.saturating_sub(self.started_ms),
            local_reply: self.local_reason,
            prompt: if gw.config.log_bodies { Some(self.prompt.as_deref()) } else { None },
            answer: if gw.config.log_bodies { Some(answer_text.as_deref()) } else { None },
        };
        serde_json::to_string(&line).unwrap_or_default()
    }
}

/// The per-request log line.
#[derive(Serialize)]
struct LogLine<'a> {
    msg: &'static str,
    client: &'a str,
    method: &'a str,
    path: &'a str,
    deployment: &'a str,
    backend: Option<&'a str>,
    attempts: u32,
    status: u32,
    stream: bool,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
    duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    local_reply: Option<&'static str>,
    /// Outer `None`: body logging off (field absent); inner `None`: nothing captured.
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    answer: Option<Option<&'a str>>,
}

fn is_chat(path: &str) -> bool {
    path.split('?').next().is_some_and(|p| p.ends_with("/chat/completions"))
}

/// The text a request asks about: message contents, `prompt` or `input`.
fn prompt_text(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<Value>(body) else { return String::new() };
    let mut parts: Vec<String> = Vec::new();
    if let Some(messages) = v.get("messages").and_then(Value::as_array) {
        for m in messages {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("");
            match m.get("content") {
                Some(Value::String(s)) => parts.push(format!("{role}: {s}")),
                Some(Value::Array(items)) => {
                    for t in items.iter().filter_map(|i| i.get("text").and_then(Value::as_str)) {
                        parts.push(format!("{role}: {t}"));
                    }
                }
                _ => {}
            }
        }
    }
    for field in ["prompt", "input"] {
        match v.get(field) {
            Some(Value::String(s)) => parts.push(s.clone()),
            Some(Value::Array(items)) => parts.extend(items.iter().filter_map(Value::as_str).map(str::to_string)),
            _ => {}
        }
    }
    parts.join("\n")
}

fn answer_json_text(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<Value>(body) else { return String::new() };
    v.pointer("/choices/0/message/content")
        .or_else(|| v.pointer("/choices/0/text"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

/// Request headers a client may use for its credentials; the request role
/// removes them when clients are configured so no client key goes upstream.
pub const CLIENT_CREDENTIAL_HEADERS: [&str; 3] = ["api-key", "ocp-apim-subscription-key", "authorization"];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Keys};
    use crate::metrics::Recorder;
    use crate::store::{ManualClock, MemoryStore};

    fn gateway(extra: &str) -> Gateway {
        let json = format!(
            r#"{{"backends":[{{"name":"east","url":"http://127.0.0.1:1"}}],
                "clients":[{{"name":"team-a","key":"key-of-team-a","requests_per_minute":2,"tokens_per_minute":1000}},
                           {{"name":"team-b","key":"key-of-team-b"}},
                           {{"name":"team-c","key":"key-of-team-c","tokens_per_minute":1000}}]{extra}}}"#
        );
        Gateway::new(Config::parse(json.as_bytes(), Keys::NamesOnly).unwrap())
    }

    const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=1";

    fn head<'a>(key: Option<&'a str>, has_body: bool) -> RequestHead<'a> {
        RequestHead { method: "POST", path: CHAT, api_key: key, has_body, ..RequestHead::default() }
    }

    struct World {
        gw: Gateway,
        store: MemoryStore,
        clock: ManualClock,
        metrics: Recorder,
    }

    impl World {
        fn new(extra: &str) -> World {
            World {
                gw: gateway(extra),
                store: MemoryStore::default(),
                clock: ManualClock::at(0),
                metrics: Recorder::default(),
            }
        }
        /// Headers, then the body if the step asks for it; returns the
        /// replacement body as `Step::Forward`'s companion.
        fn start(&self, key: Option<&str>, body: &[u8]) -> (Exchange, Step, Option<Vec<u8>>) {
            let mut ex = Exchange::new(self.clock.now_ms());
            let mut h = head(key, !body.is_empty());
            h.content_length = Some(body.len() as u64);
            let step = ex.on_request_headers(&self.gw, &self.store, &self.clock, &self.metrics, &h);
            let new_body = match &step {
                Step::Forward { inspect_body: true, .. } => {
                    ex.on_request_body(&self.gw, &self.store, &self.clock, body)
                }
                _ => None,
            };
            (ex, step, new_body)
        }
    }

    #[test]
    fn missing_and_wrong_keys_get_401() {
        let w = World::new("");
        for key in [None, Some("nope-nope-nope")] {
            let (_, step, _) = w.start(key, b"{}");
            let Step::Reply(r) = step else { panic!("{step:?}") };
            assert_eq!(r.status, 401);
            assert_eq!(serde_json::from_str::<Value>(&r.body).unwrap()["error"]["type"], "authentication_error");
        }
        assert_eq!(w.metrics.get("spillway_auth_failures_total"), 2);
        assert_eq!(w.metrics.get("spillway_local_replies_total.reason.unauthorized"), 2);
    }

    #[test]
    fn request_limit_gives_429_with_retry_after_and_remaining() {
        let w = World::new("");
        for left in ["1", "0"] {
            let (ex, step, _) = w.start(Some("key-of-team-a"), b"");
            assert!(matches!(step, Step::Forward { .. }), "{step:?}");
            assert!(ex.remaining_headers().contains(&("x-ratelimit-remaining-requests", left.to_string())));
        }
        let (_, step, _) = w.start(Some("key-of-team-a"), b"");
        let Step::Reply(r) = step else { panic!("{step:?}") };
        assert_eq!(r.status, 429);
        // 2 per minute: the next one in 30 s.
        assert!(r.headers.contains(&("retry-after", "30".to_string())), "{:?}", r.headers);
        assert!(r.headers.contains(&("x-ratelimit-remaining-requests", "0".to_string())));
        // team-b has no limits.
        for _ in 0..5 {
            assert!(matches!(w.start(Some("key-of-team-b"), b"").1, Step::Forward { .. }));
        }
    }

    #[test]
    fn token_limit_admits_on_body_size_then_settles_on_real_usage() {
        let w = World::new("");
        let body = format!(r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(1800));
        let body = body.as_bytes();
        // ~460 tokens by size each: two fit in 1000, the third does not.
        let (mut first, step, _) = w.start(Some("key-of-team-c"), body);
        assert!(matches!(step, Step::Forward { inspect_body: true, .. }), "{step:?}");
        assert!(matches!(w.start(Some("key-of-team-c"), body).1, Step::Forward { .. }));
        let (_, step, _) = w.start(Some("key-of-team-c"), body);
        let Step::Reply(r) = step else { panic!("{step:?}") };
        assert_eq!(r.status, 429);
        assert!(r.headers.iter().any(|(k, _)| *k == "x-ratelimit-remaining-tokens"));
        // The first answer used 52 tokens: the rest of its estimate comes back.
        first.on_response_headers(&w.gw, 200, Some("application/json"), Some("east"), Some("1"));
        first.on_response_body(
            br#"{"model":"gpt-4o","usage":{"prompt_tokens":2,"completion_tokens":50,"total_tokens":52}}"#,
            true,
        );
        let line: Value = serde_json::from_str(&first.finish(&w.gw, &w.store, &w.clock, &w.metrics)).unwrap();
        assert_eq!(line["total_tokens"], 52);
        assert_eq!(line["client"], "team-c");
        assert_eq!(line["deployment"], "gpt-4o");
        assert!(matches!(w.start(Some("key-of-team-c"), body).1, Step::Forward { .. }));
        assert_eq!(
            w.metrics.get("spillway_tokens_total.backend.east.client.team-c.deployment.gpt-4o.kind.completion"),
            50
        );
        assert_eq!(w.metrics.get("spillway_local_replies_total.reason.client_tokens"), 1);
    }

    #[test]
    fn completion_budget_is_charged_once_the_body_is_read() {
        let w = World::new("");
        let body = br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":990}"#;
        assert!(matches!(w.start(Some("key-of-team-c"), body).1, Step::Forward { .. }));
        // 991 of 1000 are now reserved: a request of ~16 tokens by size waits.
        let (_, step, _) = w.start(Some("key-of-team-c"), body);
        assert!(matches!(step, Step::Reply(LocalReply { status: 429, .. })), "{step:?}");
    }

    #[test]
    fn failed_answers_refund_the_estimate() {
        let w = World::new("");
        let body = br#"{"messages":[{"role":"user","content":"1234"}],"max_tokens":900}"#;
        let (mut ex, _, _) = w.start(Some("key-of-team-c"), body);
        ex.on_response_headers(&w.gw, 503, Some("application/json"), Some("east"), Some("1"));
        ex.finish(&w.gw, &w.store, &w.clock, &w.metrics);
        let (next, step, _) = w.start(Some("key-of-team-c"), body);
        assert!(matches!(step, Step::Forward { .. }));
        // Without the refund only ~99 tokens would be left before this one.
        let left: u64 = next
            .remaining_headers()
            .iter()
            .find(|(k, _)| *k == "x-ratelimit-remaining-tokens")
            .map(|(_, v)| v.parse().unwrap())
            .unwrap();
        assert!(left > 900, "{left}");
    }

    #[test]
    fn stream_usage_adds_include_usage_and_strips_the_chunk() {
        let w = World::new(r#","stream_usage":true"#);
        let (mut ex, step, body) = w.start(Some("key-of-team-b"), br#"{"stream":true,"messages":[]}"#);
        assert!(matches!(step, Step::Forward { inspect_body: true, drop_content_length: true, .. }), "{step:?}");
        let body = body.unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["stream_options"]["include_usage"], true);
        ex.on_response_headers(&w.gw, 200, Some("text/event-stream"), Some("east"), Some("1"));
        let out = ex.on_response_body(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}\n\ndata: [DONE]\n\n",
            true,
        );
        let out = String::from_utf8(out.unwrap()).unwrap();
        assert!(!out.contains("usage") && out.ends_with("[DONE]\n\n"));
        let line: Value = serde_json::from_str(&ex.finish(&w.gw, &w.store, &w.clock, &w.metrics)).unwrap();
        assert_eq!(line["total_tokens"], 2);
        assert_eq!(line["stream"], true);
    }

    #[test]
    fn a_client_that_asked_for_usage_keeps_it() {
        let w = World::new(r#","stream_usage":true"#);
        let (mut ex, step, body) =
            w.start(Some("key-of-team-b"), br#"{"stream":true,"stream_options":{"include_usage":true}}"#);
        assert!(matches!(step, Step::Forward { .. }));
        assert_eq!(body, None);
        ex.on_response_headers(&w.gw, 200, Some("text/event-stream"), None, None);
        assert_eq!(ex.on_response_body(b"data: {\"choices\":[],\"usage\":{\"total_tokens\":2}}\n\n", true), None);
    }

    #[test]
    fn log_line_has_no_secrets_and_caps_bodies() {
        let w = World::new(r#","log_bodies":true,"log_body_max_bytes":10"#);
        let (mut ex, _, _) =
            w.start(Some("key-of-team-b"), br#"{"messages":[{"role":"user","content":"a very long prompt indeed"}]}"#);
        ex.on_response_headers(&w.gw, 200, Some("application/json"), Some("east"), Some("1"));
        ex.on_response_body(br#"{"choices":[{"message":{"content":"a long long answer"}}]}"#, true);
        let text = ex.finish(&w.gw, &w.store, &w.clock, &w.metrics);
        let line: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(line["prompt"], "user: a ve");
        assert_eq!(line["answer"], "a long lon");
        assert!(!text.contains("key-of-team"));
    }

    #[test]
    fn open_gateway_does_not_buffer_bodies() {
        let gw = Gateway::new(
            Config::parse(br#"{"backends":[{"name":"east","url":"http://127.0.0.1:1"}]}"#, Keys::NamesOnly).unwrap(),
        );
        let mut ex = Exchange::new(0);
        let step = ex.on_request_headers(
            &gw,
            &MemoryStore::default(),
            &ManualClock::at(0),
            &Recorder::default(),
            &head(None, true),
        );
        assert!(matches!(step, Step::Forward { inspect_body: false, drop_content_length: false, .. }), "{step:?}");
    }
}
