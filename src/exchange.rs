//! One client request as the request role sees it, from headers to the log
//! line: authentication, client limits, routing, token accounting. Pure: the
//! glue feeds it what the host reports and applies what it returns.

use crate::affinity;
use crate::answer_capture::JsonCapture;
use crate::body_fields::BodyFields;
use crate::clients::{self, Auth};
use crate::config::{Backend, Tier};
use crate::gateway::{FirstAttempt, FirstPick, Gateway, Left, PoolLeft, Stored};
use crate::gen_ai;
use crate::global_limits::{self, Asked, FailureMode};
use crate::headroom;
use crate::limits::{self, Admission, Limits, Remaining, Settlement};
use crate::metrics::{self, Metrics};
use crate::paths::{self, PathProblem};
use crate::replies::LocalReply;
use crate::rls;
use crate::stateful::{self, Target};
use crate::store::{Clock, SharedStore};
use crate::usage::{self, AnswerFacts, RequestFacts, SseScanner, Usage};
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
    /// The body's size: its `content-length`, or the bytes the request role
    /// held when it read the body before deciding.
    pub content_length: Option<u64>,
    /// False when the headers ended the request (no body follows).
    pub has_body: bool,
    /// The body's fields, when the request role held the body to read them.
    pub fields: Option<BodyFields>,
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
        /// Whether the request names stored state, and where it lives.
        stored: Stored,
        /// The model the body names, for the attempts; `None` when the path
        /// names it (the attempts read the path).
        model: Option<String>,
        /// The request's token estimate, for the attempts' fallback picks
        /// (quota-aware routing with the body's fields known).
        estimate: Option<u64>,
        /// A stream with a first-token timeout: each attempt's time limit
        /// until its first content.
        first_token_timeout_ms: Option<u64>,
        /// The client's tier, for the attempts' fallback picks.
        tier: Tier,
        /// `header::FIRST_ATTEMPT`: the first attempt's plan, when made.
        first_attempt: Option<String>,
    },
    Reply(LocalReply),
    /// Hold the request until this (monotonic) time, then call
    /// `Exchange::on_wait_over`.
    Wait {
        until_ms: u64,
    },
    /// Ask the rate-limit service (global client limits) with this
    /// `ShouldRateLimit` message, then call `Exchange::on_limits_answer`.
    AskLimits {
        message: Vec<u8>,
    },
}

/// A request waiting for the rate-limit service's answer.
#[derive(Debug)]
struct Asking {
    routing: Routing,
    asked: Asked,
    cost: u64,
}

/// What routing a request needs, kept while it waits for a backend.
#[derive(Debug, Clone, Default)]
struct Routing {
    fields: Option<BodyFields>,
    has_body: bool,
    tokens: u64,
}

/// Longest model name accepted (Azure deployment names have at most 64
/// characters): it travels in a header and labels metrics.
const MAX_MODEL_LEN: usize = 256;

/// The client's side of the request: who it is and what its limits were charged.
#[derive(Debug, Default)]
struct ClientCharge {
    /// Index into `Config::clients`.
    client: Option<usize>,
    /// Charged against the client's limits: settled when the exchange ends.
    admitted: bool,
    charged_tokens: u64,
    remaining: Remaining,
}

/// What the request body told us (when it was read).
#[derive(Debug, Default)]
struct BodyFacts {
    facts: RequestFacts,
    /// `facts` came from the body's fields at the headers (Envoy read them):
    /// the estimate admission charged is final until real usage.
    known_at_headers: bool,
    /// Capped prompt text, with `log_bodies`.
    prompt: Option<String>,
    /// The body was changed to ask for a usage chunk the client did not ask
    /// for: remove that chunk from the answer.
    strip_usage: bool,
}

/// How an answer's body is read on its way to the client.
#[derive(Debug)]
enum Capture {
    /// Neither JSON nor SSE.
    Nothing,
    Sse(SseScanner),
    Json(JsonCapture),
}

/// Where the answer stands: nothing yet, the gateway's own, or a backend's.
#[derive(Debug, Default)]
enum Answer {
    #[default]
    Pending,
    Local {
        reason: &'static str,
        status: u32,
    },
    Upstream {
        status: u32,
        backend: Option<String>,
        attempts: Option<u32>,
        capture: Capture,
    },
}

#[derive(Debug, Default)]
pub struct Exchange {
    started_ms: u64,
    method: String,
    path: String,
    charge: ClientCharge,
    body: BodyFacts,
    answer: Answer,
    /// The client disconnected or its time ran out before the end.
    client_gone: bool,
    /// An attempt timed out or was reset after reaching its backend.
    upstream_may_have_worked: bool,
    /// The answer's last byte passed on to the client.
    answer_complete: bool,
    /// What the backends had left when the request was routed.
    pool_left: PoolLeft,
    /// The request waits for a backend (see `Step::Wait`).
    waiting: Option<Routing>,
    /// The worker could not hold it: no more waiting.
    wait_refused: bool,
    /// Waiting for the rate-limit service (see `Step::AskLimits`).
    asking: Option<Asking>,
    /// Tokens used beyond what the rate-limit service was charged, not yet
    /// sent (global client limits).
    unsent_tokens: u64,
    /// The rate-limit service gave no usable answer for this request.
    limit_service_failed: bool,
}

/// What a finished request is charged.
enum Cost {
    Used(u64),
    /// The estimate admission charged stands.
    AsCharged,
    /// Never served, nothing billed: the request and its tokens come back.
    Nothing,
}

impl Exchange {
    pub fn new(now_ms: u64) -> Exchange {
        Exchange { started_ms: now_ms, ..Exchange::default() }
    }

    fn client_name<'g>(&self, gw: &'g Gateway) -> &'g str {
        self.charge.client.and_then(|i| gw.config.clients.get(i)).map_or("", |c| c.name.as_str())
    }

    fn reply(&mut self, gw: &Gateway, metrics: &dyn Metrics, reason: &'static str, reply: LocalReply) -> Step {
        self.answer = Answer::Local { reason, status: reply.status };
        let labels = [("client", self.client_name(gw)), ("reason", reason)];
        metrics.add(&metrics::name(metrics::LOCAL_REPLIES, &labels), 1);
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
        match paths::check(head.path) {
            Ok(()) => {}
            Err(PathProblem::NotApi) => return self.reply(gw, metrics, "not_found", LocalReply::not_found()),
            Err(PathProblem::Ambiguous) => return self.reply(gw, metrics, "bad_path", LocalReply::ambiguous_path()),
            Err(PathProblem::BadDeployment) => {
                return self.reply(gw, metrics, "bad_path", LocalReply::bad_deployment_name());
            }
        }
        // Browsers cannot set headers on a websocket: realtime clients may
        // send the key as the `api-key` query parameter instead.
        let api_key = head.api_key.or_else(|| paths::realtime_query_key(head.path));
        let presented = clients::presented_key(api_key, head.apim_key, head.authorization);
        match clients::authenticate(&gw.config.clients, presented) {
            Auth::Open => {}
            Auth::Client(i) => self.charge.client = Some(i),
            Auth::Missing | Auth::Invalid => {
                metrics.add(metrics::AUTH_FAILURES, 1);
                return self.reply(gw, metrics, "unauthorized", LocalReply::unauthorized());
            }
        }
        if self.model(head.fields.as_ref()).is_some_and(|m| m.len() > MAX_MODEL_LEN) {
            return self.reply(gw, metrics, "bad_model", LocalReply::model_name_too_long(MAX_MODEL_LEN));
        }
        if let Some(fields) = &head.fields {
            self.body.facts = fields.facts(head.content_length.unwrap_or(0));
            self.body.known_at_headers = head.content_length.is_some() || !self.tokens_limited(gw);
        } else if head.has_body && head.content_length.is_none() && self.tokens_limited(gw) {
            // Its size is known only once it has gone on to a backend: too
            // late to refuse it, and a way around the limit.
            return self.reply(gw, metrics, "length_required", LocalReply::length_required());
        }
        let now = clock.now_ms();
        // What the backends' quotas are charged for this request: the body's
        // estimate, else (no fields) its size.
        let tokens = match &head.fields {
            Some(_) => self.body.facts.estimated_tokens,
            None => head.content_length.unwrap_or(0).div_ceil(usage::CHARS_PER_TOKEN),
        };
        let routing = Routing { fields: head.fields.clone(), has_body: head.has_body, tokens };
        if let (Some(global), Some((_, limits))) =
            (&gw.config.global_limits, self.charge.client.and_then(|c| gw.client_limits(c)))
        {
            let cost = self.admission_cost(limits, head.content_length);
            let (message, asked) = global_limits::admission(&global.domain, self.client_name(gw), limits, cost);
            self.asking = Some(Asking { routing, asked, cost });
            return Step::AskLimits { message };
        }
        if let Err(LimitedReply { reason, reply }) = self.admit(gw, store, now, head.content_length) {
            return self.reply(gw, metrics, reason, reply);
        }
        self.route(gw, store, clock, metrics, now, routing)
    }

    /// The rate-limit service answered (`Some`: the `RateLimitResponse`
    /// bytes) or could not be asked or did not answer in time (`None`).
    /// Admitted: routed as usual; over a limit: the client's 429; no answer:
    /// `failure_mode` decides.
    pub fn on_limits_answer(
        &mut self,
        gw: &Gateway,
        store: &dyn SharedStore,
        clock: &dyn Clock,
        metrics: &dyn Metrics,
        answer: Option<&[u8]>,
    ) -> Step {
        let (Some(Asking { routing, asked, cost }), Some(global), Some((_, limits))) =
            (self.asking.take(), &gw.config.global_limits, self.charge.client.and_then(|c| gw.client_limits(c)))
        else {
            return self.reply(gw, metrics, "limit_service", LocalReply::limit_service_unavailable());
        };
        let verdict = answer
            .and_then(rls::decode_response)
            .and_then(|r| global_limits::verdict(asked, &r, gw.config.default_retry_after_ms));
        match verdict {
            Some(Admission::Admitted(remaining)) => {
                self.charge.remaining = remaining;
                self.charge.charged_tokens = global_limits::charged(limits, cost);
                self.charge.admitted = true;
                self.route(gw, store, clock, metrics, clock.now_ms(), routing)
            }
            Some(Admission::Limited { retry_after_ms, remaining, by_tokens }) => {
                self.charge.remaining = remaining;
                let LimitedReply { reason, reply } = self.limited_reply(gw, retry_after_ms, by_tokens);
                self.reply(gw, metrics, reason, reply)
            }
            None => self.on_limit_service_failure(gw, store, clock, metrics, global.failure_mode, routing),
        }
    }

    /// No usable answer from the rate-limit service: `failure_mode` open
    /// forwards the request uncharged, closed answers 503.
    fn on_limit_service_failure(
        &mut self,
        gw: &Gateway,
        store: &dyn SharedStore,
        clock: &dyn Clock,
        metrics: &dyn Metrics,
        mode: FailureMode,
        routing: Routing,
    ) -> Step {
        self.limit_service_failed = true;
        match mode {
            FailureMode::Open => {
                metrics.add(&metrics::name(metrics::LIMIT_SERVICE_FAILURES, &[("reason", "admitted")]), 1);
                self.route(gw, store, clock, metrics, clock.now_ms(), routing)
            }
            FailureMode::Closed => {
                metrics.add(&metrics::name(metrics::LIMIT_SERVICE_FAILURES, &[("reason", "refused")]), 1);
                self.reply(gw, metrics, "limit_service", LocalReply::limit_service_unavailable())
            }
        }
    }

    /// The rate-limit service gave no usable answer (the glue logs it).
    pub fn limit_service_failed(&self) -> bool {
        self.limit_service_failed
    }

    /// Tokens to charge the rate-limit service for usage beyond what it was
    /// charged so far, once, with the client's name (the glue sends them,
    /// merged per client).
    pub fn take_unsent_tokens(&mut self, gw: &Gateway) -> Option<(String, u64)> {
        let tokens = std::mem::take(&mut self.unsent_tokens);
        let client = self.charge.client.and_then(|c| gw.config.clients.get(c))?;
        (tokens > 0).then(|| (client.name.clone(), tokens))
    }

    /// Picks the first backend and says how to forward; or, when every
    /// backend is out and one is back within the configured wait, how long
    /// to hold the request; or the 429.
    fn route(
        &mut self,
        gw: &Gateway,
        store: &dyn SharedStore,
        clock: &dyn Clock,
        metrics: &dyn Metrics,
        now: u64,
        routing: Routing,
    ) -> Step {
        match self.choose_backend(gw, store, clock, now, routing.fields.as_ref(), routing.tokens) {
            Ok((backend, stored, first_attempt)) => {
                let cluster = backend.cluster.clone();
                self.forward(gw, cluster, stored, first_attempt, &routing)
            }
            Err(("all_throttled", reply)) if self.may_wait(gw, now, &reply) => {
                let until_ms = now.saturating_add(reply.retry_after_ms().unwrap_or(0));
                self.waiting = Some(routing);
                metrics.add(metrics::WAITS, 1);
                Step::Wait { until_ms }
            }
            Err((reason, mut reply)) => {
                // Not served: give the client its request and tokens back.
                self.refund(gw, store, now);
                reply.headers.extend(self.remaining_headers());
                self.reply(gw, metrics, reason, reply)
            }
        }
    }

    /// Every backend is out, and the first back frees before this request
    /// has waited `wait_for_backend_ms` in all.
    fn may_wait(&self, gw: &Gateway, now: u64, reply: &LocalReply) -> bool {
        let (Some(max), Some(wait)) = (gw.config.wait_for_backend_ms, reply.retry_after_ms()) else {
            return false;
        };
        if self.wait_refused {
            return false;
        }
        now.saturating_add(wait) <= self.started_ms.saturating_add(max)
    }

    /// The wait `Step::Wait` asked for is over: route again.
    pub fn on_wait_over(
        &mut self,
        gw: &Gateway,
        store: &dyn SharedStore,
        clock: &dyn Clock,
        metrics: &dyn Metrics,
    ) -> Step {
        match self.waiting.take() {
            Some(routing) => self.route(gw, store, clock, metrics, clock.now_ms(), routing),
            None => self.reply(gw, metrics, "all_throttled", LocalReply::all_busy(1_000)),
        }
    }

    /// The worker holds as many waiting requests as it may: route again
    /// without waiting (the 429, unless a backend is back meanwhile).
    pub fn on_wait_refused(
        &mut self,
        gw: &Gateway,
        store: &dyn SharedStore,
        clock: &dyn Clock,
        metrics: &dyn Metrics,
    ) -> Step {
        self.wait_refused = true;
        self.on_wait_over(gw, store, clock, metrics)
    }

    fn forward(
        &self,
        gw: &Gateway,
        cluster: String,
        stored: Stored,
        first_attempt: Option<FirstAttempt>,
        routing: &Routing,
    ) -> Step {
        let tokens_limited = self.tokens_limited(gw);
        let facts = &self.body.facts;
        let fields = routing.fields.as_ref();
        // Only a streamed chat request that did not ask for usage is
        // rewritten (unknown fields: any chat request may be).
        let may_add_usage = gw.config.stream_usage
            && is_chat(&self.path)
            && (!self.body.known_at_headers || (facts.stream && !facts.include_usage));
        let estimate_pending = tokens_limited && !self.body.known_at_headers;
        Step::Forward {
            cluster,
            path: self.forwarded_path(gw),
            inspect_body: routing.has_body && (estimate_pending || may_add_usage || gw.config.log_bodies),
            drop_content_length: routing.has_body && may_add_usage,
            stored,
            model: match paths::model_in_path(&self.path) {
                Some(_) => None,
                None => self.model(fields).map(str::to_string),
            },
            estimate: gw.config.quota_aware.then_some(routing.tokens).filter(|&t| t > 1),
            first_token_timeout_ms: gw
                .config
                .first_token_timeout_s
                .filter(|_| fields.is_some_and(|f| f.stream))
                .map(|s| s.saturating_mul(1000)),
            tier: if gw.config.quota_aware { self.tier(gw) } else { Tier::High },
            first_attempt: first_attempt.map(|plan| plan.encode()),
        }
    }

    /// The path the attempts start from: `api-version` added where needed,
    /// and a gateway key sent as a realtime query parameter removed (it is
    /// for the gateway only).
    fn forwarded_path(&self, gw: &Gateway) -> String {
        let path = paths::with_api_version(&self.path, gw.config.api_version.as_deref());
        if gw.config.clients.is_empty() || paths::realtime_query_key(&path).is_none() {
            return path;
        }
        paths::realtime_for_backend(&path, &Default::default(), true)
    }

    /// The model the request names: the classic path's deployment, else
    /// the body's `model`.
    pub fn model<'a>(&'a self, fields: Option<&'a BodyFields>) -> Option<&'a str> {
        paths::model_in_path(&self.path).or_else(|| fields.and_then(|f| f.model.as_deref()))
    }

    /// The first backend: the owner of the stored state the request names
    /// (its path, or the body's `previous_response_id`), else balanced.
    fn choose_backend<'g>(
        &mut self,
        gw: &'g Gateway,
        store: &dyn SharedStore,
        clock: &dyn Clock,
        now: u64,
        fields: Option<&BodyFields>,
        tokens: u64,
    ) -> Result<(&'g Backend, Stored, Option<FirstAttempt>), (&'static str, LocalReply)> {
        let stored_id = match stateful::classify(&self.path) {
            Target::Object(id) => Some(id),
            // Creations and lists of most kinds live on the home backend.
            Target::Collection(kind) if kind.at_home => {
                return gw
                    .home(store, clock)
                    .map(|home| (home, Stored::Pinned, None))
                    .map_err(|r| ("owner_throttled", r));
            }
            Target::Collection(_) | Target::Stateless => {
                fields.and_then(|f| f.previous_response_id.as_deref()).filter(|id| stateful::is_object_id(id))
            }
        };
        let stored = match stored_id.map(|id| gw.owner_of(store, clock, id)) {
            None => Stored::No,
            Some(Ok(Some(owner))) => return Ok((owner, Stored::Pinned, None)),
            Some(Ok(None)) => Stored::Lookup,
            Some(Err(reply)) => return Err(("owner_throttled", reply)),
        };
        let FirstPick { picked, pool_left, first_attempt } =
            gw.pick(store, now, self.model(fields), tokens, self.tier(gw));
        self.pool_left = pool_left;
        // A lookup's attempts plan their own way (see `Gateway::plan_attempt`).
        let first_attempt = first_attempt.filter(|_| stored == Stored::No);
        match picked {
            Ok(backend) => Ok((backend, stored, first_attempt)),
            Err(reply) if reply.status == 404 => Err(("model_not_found", reply)),
            Err(reply) => Err(("all_throttled", reply)),
        }
    }

    /// The client's tier (an open gateway's requests are all high tier).
    pub fn tier(&self, gw: &Gateway) -> Tier {
        self.charge.client.and_then(|c| gw.config.clients.get(c)).map_or(Tier::High, |c| c.tier)
    }

    fn tokens_limited(&self, gw: &Gateway) -> bool {
        self.charge.client.and_then(|c| gw.client_limits(c)).is_some_and(|(_, l)| l.tokens_per_minute.is_some())
    }

    /// Charges the client's limits for one request with the best estimate at
    /// hand: from the body's fields when Envoy read them, else from the
    /// body's size until the body itself is read. `Err` is the 429 to answer.
    fn admit(
        &mut self,
        gw: &Gateway,
        store: &dyn SharedStore,
        now: u64,
        content_length: Option<u64>,
    ) -> Result<(), LimitedReply> {
        let Some((key, limits)) = self.charge.client.and_then(|c| gw.client_limits(c)) else { return Ok(()) };
        let cost = self.admission_cost(limits, content_length);
        match limits::admit(store, key, limits, now, cost) {
            Admission::Admitted(remaining) => {
                self.charge.remaining = remaining;
                self.charge.charged_tokens = cost;
                self.charge.admitted = true;
                Ok(())
            }
            Admission::Limited { retry_after_ms, remaining, by_tokens } => {
                self.charge.remaining = remaining;
                Err(self.limited_reply(gw, retry_after_ms, by_tokens))
            }
        }
    }

    /// The tokens admission charges: the body's estimate when Envoy read its
    /// fields; else its size (the prompt cannot be larger) until the body
    /// itself is read.
    fn admission_cost(&self, limits: &Limits, content_length: Option<u64>) -> u64 {
        match (limits.tokens_per_minute, self.body.known_at_headers) {
            (None, _) => 0,
            (Some(_), true) => self.body.facts.estimated_tokens,
            (Some(_), false) => content_length.unwrap_or(0).div_ceil(usage::CHARS_PER_TOKEN),
        }
    }

    fn limited_reply(&self, gw: &Gateway, retry_after_ms: u64, by_tokens: bool) -> LimitedReply {
        let mut reply = LocalReply::client_limited(self.client_name(gw), by_tokens, retry_after_ms);
        reply.headers.extend(self.remaining_headers());
        let reason = if by_tokens { "client_tokens" } else { "client_requests" };
        LimitedReply { reason, reply }
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
        if !self.body.known_at_headers {
            self.body.facts = usage::request_facts(body);
        }
        if gw.config.log_bodies {
            let mut prompt = String::new();
            usage::push_capped(&mut prompt, &prompt_text(body), gw.config.log_body_max_bytes);
            self.body.prompt = Some(prompt);
        }
        if self.tokens_limited(gw) && !self.body.known_at_headers {
            let estimate = self.body.facts.estimated_tokens;
            self.settle(gw, store, clock.now_ms(), estimate, false);
            if gw.config.global_limits.is_none() {
                // Locally the bucket now holds the estimate; a service keeps
                // what it counted (`settle` raised the charge, never lowers it).
                self.charge.charged_tokens = estimate;
            }
        }
        let facts = &self.body.facts;
        if gw.config.stream_usage && facts.stream && !facts.include_usage && is_chat(&self.path) {
            let new_body = usage::with_include_usage(body);
            self.body.strip_usage = new_body.is_some();
            return new_body;
        }
        None
    }

    /// Brings the client's token charge to `used_tokens` (and gives the
    /// request back with `refund_request`), if it was admitted.
    fn settle(&mut self, gw: &Gateway, store: &dyn SharedStore, now: u64, used_tokens: u64, refund_request: bool) {
        let Some((key, limits)) = self.charge.client.and_then(|c| gw.client_limits(c)) else { return };
        if self.charge.admitted && gw.config.global_limits.is_some() {
            // The protocol only adds: usage beyond the charge is sent; what
            // was charged and not used stays counted until the window ends.
            if limits.tokens_per_minute.is_some() {
                let more = used_tokens.saturating_sub(self.charge.charged_tokens);
                self.unsent_tokens = self.unsent_tokens.saturating_add(more);
                self.charge.charged_tokens = self.charge.charged_tokens.max(used_tokens);
            }
            return;
        }
        if self.charge.admitted {
            let settlement = Settlement { charged_tokens: self.charge.charged_tokens, used_tokens, refund_request };
            limits::settle(store, key, limits, now, settlement);
        }
    }

    fn refund(&mut self, gw: &Gateway, store: &dyn SharedStore, now: u64) {
        self.settle(gw, store, now, 0, true);
        self.charge.admitted = false;
        self.charge.charged_tokens = 0;
    }

    /// Azure-style remaining-quota headers for the client's limits.
    pub fn remaining_headers(&self) -> Vec<(&'static str, String)> {
        remaining_headers(self.client_left())
    }

    fn client_left(&self) -> Left {
        Left { requests: self.charge.remaining.requests, tokens: self.charge.remaining.tokens }
    }

    /// The client left (disconnect, reset, route timeout) before the answer
    /// was complete: what it asked for is still charged.
    pub fn on_client_gone(&mut self) {
        self.client_gone = true;
    }

    /// An attempt ended after its request reached a backend, without an
    /// answer (timeout, reset): the backend may have billed it.
    pub fn on_upstream_may_have_worked(&mut self) {
        self.upstream_may_have_worked = true;
    }

    /// The answer's headers ended it (no body follows).
    pub fn on_response_complete(&mut self) {
        self.answer_complete = true;
    }

    /// A backend's answer with a success status passed on whole: nothing
    /// about how the stream ended can change what the request costs or how
    /// it is counted, so the host need not be asked.
    pub fn ended_as_answered(&self) -> bool {
        self.answer_complete && matches!(self.answer, Answer::Upstream { status: 100..=299, .. })
    }

    pub fn is_local_reply(&self) -> bool {
        matches!(self.answer, Answer::Local { .. })
    }

    /// The request waits for a backend (`Step::Wait`, not yet over).
    pub fn is_waiting(&self) -> bool {
        self.waiting.is_some()
    }

    /// Whether `on_response_body` looks at the chunks' bytes (a JSON or SSE
    /// answer); otherwise an empty chunk serves and nothing is copied.
    pub fn reads_response_body(&self) -> bool {
        matches!(self.answer, Answer::Upstream { capture: Capture::Sse(_) | Capture::Json(_), .. })
    }

    /// Response headers arrived. Returns the headers to set on the response:
    /// the backend's own rate-limit headers are replaced by what the pool
    /// has left (`quota`: what the answering backend reported), lowered to
    /// the client's own limits where those are lower.
    pub fn on_response_headers(
        &mut self,
        gw: &Gateway,
        status: u32,
        content_type: Option<&str>,
        backend: Option<&str>,
        attempts: Option<&str>,
        quota: Left,
    ) -> Vec<(&'static str, String)> {
        if self.is_local_reply() {
            return Vec::new();
        }
        let text_cap = if gw.config.log_bodies { gw.config.log_body_max_bytes } else { 0 };
        let capture = match content_type {
            Some(c) if c.starts_with("text/event-stream") => {
                Capture::Sse(SseScanner::new(self.body.strip_usage, text_cap))
            }
            Some(c) if c.contains("json") => Capture::Json(JsonCapture::new(text_cap)),
            _ => Capture::Nothing,
        };
        self.answer = Answer::Upstream {
            status,
            backend: backend.map(str::to_string),
            attempts: attempts.and_then(|a| a.parse().ok()),
            capture,
        };
        let answered = backend.and_then(|b| gw.config.backend_by_name(b));
        let pool = self.pool_left.after(answered, quota);
        let client = match self.charge.client.and_then(|c| gw.client_limits(c)) {
            Some(_) => self.client_left(),
            None => Left::default(),
        };
        remaining_headers(pool.lower(client))
    }

    /// A response body chunk passes. Returns a replacement when the chunk
    /// must change (the usage-only SSE chunk removed).
    pub fn on_response_body(&mut self, chunk: &[u8], end_of_stream: bool) -> Option<Vec<u8>> {
        self.answer_complete |= end_of_stream;
        let Answer::Upstream { capture, .. } = &mut self.answer else { return None };
        match capture {
            Capture::Sse(sse) => {
                let out = sse.feed(chunk, end_of_stream);
                self.body.strip_usage.then_some(out)
            }
            Capture::Json(capture) => {
                capture.feed(chunk);
                None
            }
            Capture::Nothing => None,
        }
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
        let read = self.read_answer(gw);
        let status = self.status();
        match self.cost(&read, status) {
            Cost::Used(tokens) => self.settle(gw, store, now, tokens, false),
            Cost::AsCharged => {}
            Cost::Nothing => self.refund(gw, store, now),
        }
        if let (true, Some(id), Some(backend)) =
            ((200..300).contains(&status), read.facts.object_id.as_deref(), self.backend())
        {
            // Stored state answered by this backend lives there.
            affinity::remember(store, id, backend, now);
        }
        let client = self.client_name(gw).to_string();
        let deployment = paths::model_in_path(&self.path)
            .map(str::to_string)
            .or_else(|| self.body.facts.model.clone())
            .or(read.facts.model.clone())
            .unwrap_or_default();
        let deployment_label = gw.deployment_labels.label(&deployment);
        self.count(metrics, &client, &deployment_label, read.facts.usage);
        self.log_line(gw, now, &client, &deployment, &read)
    }

    /// What the request cost, for the client's token limit.
    fn cost(&self, read: &AnswerRead, status: u32) -> Cost {
        // Still waiting for a backend when the client left: never sent.
        if self.waiting.is_some() {
            return Cost::Nothing;
        }
        // What the backend says it billed, whatever the status.
        if let Some(u) = read.facts.usage {
            return Cost::Used(u.total);
        }
        // 101: a realtime connection was opened (and is served).
        let served = (200..300).contains(&status) || status == 101;
        match read.streamed_tokens {
            // A stream without usage (not asked for, or cut before it): the
            // prompt and what was streamed.
            Some(streamed) if served || streamed > 0 => {
                Cost::Used(self.body.facts.prompt_tokens.saturating_add(streamed))
            }
            _ if served => Cost::AsCharged,
            // A backend that answered with an error billed nothing; one that
            // timed out, reset or was left by its client may well have
            // worked: giving up must not be a way around the limit.
            _ if self.client_gone || self.upstream_may_have_worked => Cost::AsCharged,
            _ => Cost::Nothing,
        }
    }

    fn status(&self) -> u32 {
        match &self.answer {
            Answer::Pending => 0,
            Answer::Local { status, .. } | Answer::Upstream { status, .. } => *status,
        }
    }

    fn backend(&self) -> Option<&str> {
        match &self.answer {
            Answer::Upstream { backend, .. } => backend.as_deref(),
            _ => None,
        }
    }

    /// Usage, model and (with `log_bodies`) text of the captured answer.
    fn read_answer(&self, gw: &Gateway) -> AnswerRead {
        let Answer::Upstream { capture, .. } = &self.answer else { return AnswerRead::default() };
        match capture {
            Capture::Sse(sse) => AnswerRead {
                facts: AnswerFacts { usage: sse.usage, model: sse.model.clone(), object_id: sse.object_id.clone() },
                text: Some(sse.text.clone()),
                streamed_tokens: Some(sse.streamed_tokens),
            },
            Capture::Json(capture) => {
                let text = gw.config.log_bodies.then(|| {
                    let mut text = String::new();
                    usage::push_capped(&mut text, &capture.text(), gw.config.log_body_max_bytes);
                    text
                });
                let stateful = stateful::classify(&self.path) != Target::Stateless;
                AnswerRead { facts: capture.facts(stateful), text, streamed_tokens: None }
            }
            Capture::Nothing => AnswerRead::default(),
        }
    }

    fn count(&self, metrics: &dyn Metrics, client: &str, deployment: &str, usage: Option<Usage>) {
        let class = match self.status() {
            0 if self.client_gone => "client_gone".to_string(),
            status => metrics::status_class(status),
        };
        metrics.add(&metrics::name(metrics::REQUESTS, &[("client", client), ("class", &class)]), 1);
        if let Some(u) = usage {
            let backend = self.backend().unwrap_or_default();
            let operation = gen_ai::operation(&self.path);
            for (kind, token_type, n) in [("prompt", "input", u.prompt), ("completion", "output", u.completion)] {
                let labels = [("backend", backend), ("client", client), ("deployment", deployment), ("kind", kind)];
                metrics.add(&metrics::name(metrics::TOKENS, &labels), n);
                let labels = [
                    ("gen_ai_operation_name", operation),
                    ("gen_ai_request_model", deployment),
                    ("gen_ai_token_type", token_type),
                    ("server_address", backend),
                ];
                metrics.record(&metrics::name(gen_ai::TOKEN_USAGE, &labels), n);
            }
        }
    }

    fn log_line(&self, gw: &Gateway, now: u64, client: &str, deployment: &str, read: &AnswerRead) -> String {
        let (usage, answer_text) = (read.facts.usage, read.text.as_deref());
        let (attempts, streamed, local_reply) = match &self.answer {
            Answer::Upstream { attempts, capture, .. } => (*attempts, matches!(capture, Capture::Sse(_)), None),
            Answer::Local { reason, .. } => (None, false, Some(*reason)),
            Answer::Pending => (None, false, None),
        };
        let line = LogLine {
            msg: "request",
            client,
            method: &self.method,
            path: self.path.split('?').next().unwrap_or(""),
            deployment,
            backend: self.backend(),
            attempts: attempts.unwrap_or(0),
            status: self.status(),
            stream: self.body.facts.stream || streamed,
            prompt_tokens: usage.map(|u| u.prompt),
            completion_tokens: usage.map(|u| u.completion),
            total_tokens: usage.map(|u| u.total),
            duration_ms: now.saturating_sub(self.started_ms),
            client_gone: self.client_gone,
            local_reply,
            prompt: gw.config.log_bodies.then_some(self.body.prompt.as_deref()),
            answer: gw.config.log_bodies.then_some(answer_text),
            gen_ai_operation_name: gen_ai::operation(&self.path),
            gen_ai_provider_name: gen_ai::PROVIDER,
            gen_ai_request_model: deployment,
            gen_ai_response_model: read.facts.model.as_deref(),
            gen_ai_usage_input_tokens: usage.map(|u| u.prompt),
            gen_ai_usage_output_tokens: usage.map(|u| u.completion),
        };
        serde_json::to_string(&line).unwrap_or_default()
    }
}

/// A client over its own limit: the 429 and the reason it is counted under.
struct LimitedReply {
    reason: &'static str,
    reply: LocalReply,
}

/// What the captured answer said.
#[derive(Debug, Default)]
struct AnswerRead {
    facts: AnswerFacts,
    text: Option<String>,
    /// Tokens streamed, for an SSE answer.
    streamed_tokens: Option<u64>,
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
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    client_gone: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    local_reply: Option<&'static str>,
    /// Outer `None`: body logging off (field absent); inner `None`: nothing captured.
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    answer: Option<Option<&'a str>>,
    // The same facts under OpenTelemetry's GenAI attribute names.
    #[serde(rename = "gen_ai.operation.name")]
    gen_ai_operation_name: &'static str,
    #[serde(rename = "gen_ai.provider.name")]
    gen_ai_provider_name: &'static str,
    #[serde(rename = "gen_ai.request.model")]
    gen_ai_request_model: &'a str,
    #[serde(rename = "gen_ai.response.model", skip_serializing_if = "Option::is_none")]
    gen_ai_response_model: Option<&'a str>,
    #[serde(rename = "gen_ai.usage.input_tokens", skip_serializing_if = "Option::is_none")]
    gen_ai_usage_input_tokens: Option<u64>,
    #[serde(rename = "gen_ai.usage.output_tokens", skip_serializing_if = "Option::is_none")]
    gen_ai_usage_output_tokens: Option<u64>,
}

/// Azure-style remaining-quota headers for what is known of `left`.
fn remaining_headers(left: Left) -> Vec<(&'static str, String)> {
    let pairs = [(headroom::REMAINING_REQUESTS, left.requests), (headroom::REMAINING_TOKENS, left.tokens)];
    pairs.into_iter().filter_map(|(name, n)| n.map(|n| (name, n.to_string()))).collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Keys};
    use crate::testing::Recorder;
    use crate::testing::{ManualClock, MemoryStore};

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
        assert_eq!(w.metrics.get("spillway_local_replies_total.client.none.reason.unauthorized"), 2);
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
        first.on_response_headers(&w.gw, 200, Some("application/json"), Some("east"), Some("1"), Left::default());
        first.on_response_body(
            br#"{"model":"gpt-4o","usage":{"prompt_tokens":2,"completion_tokens":50,"total_tokens":52}}"#,
            true,
        );
        let line: Value = serde_json::from_str(&first.finish(&w.gw, &w.store, &w.clock, &w.metrics)).unwrap();
        assert_eq!(line["total_tokens"], 52);
        assert_eq!(line["client"], "team-c");
        assert_eq!(line["deployment"], "gpt-4o");
        // The same under the GenAI conventions' names.
        assert_eq!(line["gen_ai.request.model"], "gpt-4o");
        assert_eq!(line["gen_ai.operation.name"], "chat");
        assert_eq!(
            (line["gen_ai.usage.input_tokens"].as_u64(), line["gen_ai.usage.output_tokens"].as_u64()),
            (Some(2), Some(50))
        );
        assert_eq!(
            w.metrics.get("gen_ai_client_token_usage.gen_ai_operation_name.chat.gen_ai_request_model.gpt-4o.gen_ai_token_type.output.server_address.east"),
            50
        );
        assert!(matches!(w.start(Some("key-of-team-c"), body).1, Step::Forward { .. }));
        assert_eq!(
            w.metrics.get("spillway_tokens_total.backend.east.client.team-c.deployment.gpt-4o.kind.completion"),
            50
        );
        assert_eq!(w.metrics.get("spillway_local_replies_total.client.team-c.reason.client_tokens"), 1);
    }

    const GLOBAL: &str = r#","global_limits":{"service":"127.0.0.1:8081"}"#;
    const GLOBAL_CLOSED: &str = r#","global_limits":{"service":"127.0.0.1:8081","failure_mode":"closed"}"#;

    /// A `RateLimitResponse` (values below 128: one varint byte each).
    fn rls_answer(overall: u8, statuses: &[(u8, u8, Option<u8>)]) -> Vec<u8> {
        let mut out = vec![0x08, overall];
        for &(code, remaining, reset_s) in statuses {
            let mut st = vec![0x08, code, 0x18, remaining];
            if let Some(secs) = reset_s {
                st.extend([0x22, 2, 0x08, secs]);
            }
            out.extend([0x12, st.len() as u8]);
            out.extend(st);
        }
        out
    }

    #[test]
    fn global_limits_ask_the_service_once_and_route_on_its_answer() {
        let w = World::new(GLOBAL);
        let body = br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":40}"#;
        let (mut ex, step, _) = w.start(Some("key-of-team-a"), body);
        let Step::AskLimits { message } = step else { panic!("{step:?}") };
        // Requests (1) and tokens (the body's size: its fields were not read).
        let (expected, _) = global_limits::admission(
            "spillway",
            "team-a",
            &Limits { requests_per_minute: Some(2), tokens_per_minute: Some(1000) },
            (body.len() as u64).div_ceil(usage::CHARS_PER_TOKEN),
        );
        assert_eq!(message, expected);
        // Nothing was charged locally.
        assert_eq!(w.store.get("spillway.limit.team-a.2.1000"), (None, None));
        let answer = rls_answer(1, &[(1, 1, None), (1, 100, None)]);
        let step = ex.on_limits_answer(&w.gw, &w.store, &w.clock, &w.metrics, Some(&answer));
        let Step::Forward { cluster, inspect_body: true, .. } = step else { panic!("{step:?}") };
        assert_eq!(cluster, "spillway_east");
        assert!(!ex.limit_service_failed());
        // The body's estimate (prompt + 40) is more than its size charged:
        // the rest is sent later, and usage beyond the estimate after that.
        assert_eq!(ex.on_request_body(&w.gw, &w.store, &w.clock, body), None);
        let after_body = ex.take_unsent_tokens(&w.gw);
        let estimate = usage::request_facts(body).estimated_tokens;
        assert_eq!(
            after_body,
            Some(("team-a".to_string(), estimate - (body.len() as u64).div_ceil(usage::CHARS_PER_TOKEN)))
        );
        let extra =
            ex.on_response_headers(&w.gw, 200, Some("application/json"), Some("east"), Some("1"), Left::default());
        assert!(extra.contains(&("x-ratelimit-remaining-requests", "1".to_string())), "{extra:?}");
        ex.on_response_body(br#"{"usage":{"prompt_tokens":30,"completion_tokens":40,"total_tokens":70}}"#, true);
        let line = ex.finish(&w.gw, &w.store, &w.clock, &w.metrics);
        assert_eq!(ex.take_unsent_tokens(&w.gw), Some(("team-a".to_string(), 70 - estimate)), "{line}");
        assert_eq!(ex.take_unsent_tokens(&w.gw), None);
    }

    #[test]
    fn global_limits_over_limit_is_the_clients_429_with_the_services_wait() {
        let w = World::new(GLOBAL);
        let (mut ex, step, _) = w.start(Some("key-of-team-a"), b"");
        assert!(matches!(step, Step::AskLimits { .. }), "{step:?}");
        let answer = rls_answer(2, &[(2, 0, Some(42)), (1, 90, Some(42))]);
        let Step::Reply(r) = ex.on_limits_answer(&w.gw, &w.store, &w.clock, &w.metrics, Some(&answer)) else {
            panic!()
        };
        assert_eq!(r.status, 429);
        assert!(r.headers.contains(&("retry-after", "42".to_string())), "{:?}", r.headers);
        assert!(r.headers.contains(&("x-ratelimit-remaining-requests", "0".to_string())));
        assert_eq!(w.metrics.get("spillway_local_replies_total.client.team-a.reason.client_requests"), 1);
        // A client without limits is never asked.
        assert!(matches!(w.start(Some("key-of-team-b"), b"").1, Step::Forward { .. }));
    }

    #[test]
    fn global_limits_failure_modes() {
        for (extra, open) in [(GLOBAL, true), (GLOBAL_CLOSED, false)] {
            let w = World::new(extra);
            for answer in [None, Some(&b"\xff\xff"[..]), Some(&[0x08, 0x00][..])] {
                let (mut ex, _, _) = w.start(Some("key-of-team-a"), b"");
                let step = ex.on_limits_answer(&w.gw, &w.store, &w.clock, &w.metrics, answer);
                assert!(ex.limit_service_failed());
                match (open, step) {
                    (true, Step::Forward { .. }) => {}
                    (false, Step::Reply(r)) => {
                        assert_eq!(r.status, 503);
                        assert!(r.body.contains("rate_limit_service_unavailable"));
                    }
                    (_, other) => panic!("{other:?}"),
                }
                ex.finish(&w.gw, &w.store, &w.clock, &w.metrics);
                // Admitted uncharged: nothing to correct.
                assert_eq!(ex.take_unsent_tokens(&w.gw), None);
            }
            let reason = if open { "admitted" } else { "refused" };
            assert_eq!(w.metrics.get(&format!("spillway_limit_service_failures_total.reason.{reason}")), 3);
        }
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
        ex.on_response_headers(&w.gw, 503, Some("application/json"), Some("east"), Some("1"), Left::default());
        ex.finish(&w.gw, &w.store, &w.clock, &w.metrics);
        let (next, step, _) = w.start(Some("key-of-team-c"), body);
        assert!(matches!(step, Step::Forward { .. }));
        // Without the refund only ~99 tokens would be left before this one.
        let left = remaining_tokens(&next);
        assert!(left > 900, "{left}");
    }

    #[test]
    fn a_request_its_client_abandoned_keeps_its_charge() {
        let w = World::new("");
        let body = br#"{"messages":[{"role":"user","content":"1234"}],"max_tokens":900}"#;
        let (mut gone, _, _) = w.start(Some("key-of-team-c"), body);
        gone.on_client_gone();
        let line: Value = serde_json::from_str(&gone.finish(&w.gw, &w.store, &w.clock, &w.metrics)).unwrap();
        assert_eq!(line["client_gone"], true);
        assert_eq!(w.metrics.get("spillway_requests_total.client.team-c.class.client_gone"), 1);
        let (next, _, _) = w.start(Some("key-of-team-c"), body);
        let left = remaining_tokens(&next);
        // Two estimates of ~902 tokens each were charged: none came back.
        assert!(left < 100, "{left}");
    }

    fn remaining_tokens(ex: &Exchange) -> u64 {
        let headers = ex.remaining_headers();
        let value = headers.iter().find(|(k, _)| *k == "x-ratelimit-remaining-tokens").map(|(_, v)| v.as_str());
        value.unwrap().parse().unwrap()
    }

    fn fields(json: &str) -> BodyFields {
        BodyFields::from_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn with_the_fields_at_the_headers_admission_charges_the_real_estimate() {
        let w = World::new("");
        let body = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":900}"#;
        let mut h = head(Some("key-of-team-c"), true);
        h.content_length = Some(body.len() as u64);
        h.fields = Some(fields(body));
        let mut first = Exchange::new(0);
        let step = first.on_request_headers(&w.gw, &w.store, &w.clock, &w.metrics, &h);
        // Nothing left to learn from the body: it is not held.
        assert!(matches!(step, Step::Forward { inspect_body: false, drop_content_length: false, .. }), "{step:?}");
        // ~916 of 1000 are charged already: the next one waits, before any upstream call.
        let step = Exchange::new(0).on_request_headers(&w.gw, &w.store, &w.clock, &w.metrics, &h);
        assert!(matches!(step, Step::Reply(LocalReply { status: 429, .. })), "{step:?}");
    }

    #[test]
    fn stream_usage_rewrites_only_streamed_chat_that_did_not_ask() {
        let w = World::new(r#","stream_usage":true"#);
        for (body, rewritten) in [
            (r#"{"stream":true,"messages":[]}"#, true),
            (r#"{"stream":false,"messages":[]}"#, false),
            (r#"{"messages":[]}"#, false),
            (r#"{"stream":true,"stream_options":{"include_usage":true},"messages":[]}"#, false),
        ] {
            let mut h = head(Some("key-of-team-b"), true);
            h.fields = Some(fields(body));
            let step = Exchange::new(0).on_request_headers(&w.gw, &w.store, &w.clock, &w.metrics, &h);
            let Step::Forward { inspect_body, drop_content_length, .. } = step else { panic!("{step:?}") };
            assert_eq!((inspect_body, drop_content_length), (rewritten, rewritten), "{body}");
        }
    }

    #[test]
    fn a_realtime_connection_may_carry_its_key_in_the_query_which_goes_no_further() {
        let w = World::new("");
        let path = "/openai/v1/realtime?model=gpt-realtime&api-key=key-of-team-b";
        let h = RequestHead { method: "GET", path, ..RequestHead::default() };
        let mut ex = Exchange::new(0);
        let step = ex.on_request_headers(&w.gw, &w.store, &w.clock, &w.metrics, &h);
        let Step::Forward { path, model, .. } = step else { panic!("{step:?}") };
        assert_eq!(path, "/openai/v1/realtime?model=gpt-realtime");
        // The attempts read the model from the path.
        assert_eq!(model, None);
        assert_eq!(paths::model_in_path(&path), Some("gpt-realtime"));
        let wrong = RequestHead { path: "/openai/v1/realtime?model=x&api-key=nope-nope-nope", ..h };
        let step = Exchange::new(0).on_request_headers(&w.gw, &w.store, &w.clock, &w.metrics, &wrong);
        assert!(matches!(step, Step::Reply(LocalReply { status: 401, .. })));
    }

    #[test]
    fn stream_usage_adds_include_usage_and_strips_the_chunk() {
        let w = World::new(r#","stream_usage":true"#);
        let (mut ex, step, body) = w.start(Some("key-of-team-b"), br#"{"stream":true,"messages":[]}"#);
        assert!(matches!(step, Step::Forward { inspect_body: true, drop_content_length: true, .. }), "{step:?}");
        let body = body.unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["stream_options"]["include_usage"], true);
        ex.on_response_headers(&w.gw, 200, Some("text/event-stream"), Some("east"), Some("1"), Left::default());
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
        ex.on_response_headers(&w.gw, 200, Some("text/event-stream"), None, None, Left::default());
        assert_eq!(ex.on_response_body(b"data: {\"choices\":[],\"usage\":{\"total_tokens\":2}}\n\n", true), None);
    }

    #[test]
    fn log_line_has_no_secrets_and_caps_bodies() {
        let w = World::new(r#","log_bodies":true,"log_body_max_bytes":10"#);
        let (mut ex, _, _) =
            w.start(Some("key-of-team-b"), br#"{"messages":[{"role":"user","content":"a very long prompt indeed"}]}"#);
        ex.on_response_headers(&w.gw, 200, Some("application/json"), Some("east"), Some("1"), Left::default());
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

    #[test]
    fn with_every_backend_out_a_request_waits_if_one_is_back_soon_enough() {
        let w = World::new(r#","wait_for_backend_ms":2000"#);
        let throttle = |ms| {
            w.gw.update_health(&w.store, |t| {
                t.entries[0].record_throttle(w.clock.now_ms(), ms);
                true
            });
        };
        throttle(1_500);
        let (mut ex, step, _) = w.start(Some("key-of-team-b"), b"");
        assert_eq!(step, Step::Wait { until_ms: 1_500 });
        assert_eq!(w.metrics.get("spillway_waits_total"), 1);
        w.clock.advance(1_500);
        let step = ex.on_wait_over(&w.gw, &w.store, &w.clock, &w.metrics);
        assert!(matches!(step, Step::Forward { .. }), "{step:?}");
        // Past what the request may wait in all: the 429 at once.
        throttle(5_000);
        let (_, step, _) = w.start(Some("key-of-team-b"), b"");
        assert!(matches!(step, Step::Reply(LocalReply { status: 429, .. })), "{step:?}");
        // A worker with no room left: the 429, and the client's request back.
        let w = World::new(r#","wait_for_backend_ms":2000"#);
        w.gw.update_health(&w.store, |t| {
            t.entries[0].record_throttle(0, 1_000);
            true
        });
        let (mut ex, step, _) = w.start(Some("key-of-team-a"), b"");
        assert!(matches!(step, Step::Wait { .. }));
        let step = ex.on_wait_refused(&w.gw, &w.store, &w.clock, &w.metrics);
        assert!(matches!(step, Step::Reply(LocalReply { status: 429, .. })), "{step:?}");
        assert_eq!(w.metrics.get("spillway_local_replies_total.client.team-a.reason.all_throttled"), 1);
    }
}
