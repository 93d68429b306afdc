//! proxy-wasm glue: host adapters for the `store` traits and the two HTTP
//! contexts. Every host call goes through `host`, which returns errors
//! instead of panicking; an error is logged and the request goes on (or is
//! answered), never a trap.

use crate::body_fields::{is_json, BodyFields};
use crate::clients::CLIENT_CREDENTIAL_HEADERS;
use crate::config::{Config, Keys, Tier};
use crate::contract::{header, Role};
use crate::credentials::{self, ClientCredential, PassThrough};
use crate::exchange::{Exchange, RequestHead, Step};
use crate::first_event::{self, Verdict};
use crate::footprint;
use crate::gateway::{AttemptAnswer, AttemptRef, AttemptRequest, Gateway, Left, ResponseDecision, Stored};
use crate::global_limits::{self, FailureMode, LogGate, Pending};
use crate::headroom::{self, Observation};
use crate::host::{self, Body, Headers, MetricKind, SetError};
use crate::metrics::{self, Metrics, NameHash};
use crate::replies::LocalReply;
use crate::rls;
use crate::store::{Clock, SharedStore, StoreError};
use crate::stream_end::{self, LostAttempt};
use crate::usage;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};

proxy_wasm::main! {{
    host::install_logger();
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { role: None, gateway: None, reported_ms: 0 })
    });
}}

struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        host::shared_data(key).unwrap_or_else(|e| {
            log::warn!("cannot read shared data {key}: {e:?}");
            (None, None)
        })
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match host::set_shared_data(key, value, cas) {
            Ok(()) => {
                if cas.is_none() {
                    // A create-only write that won made a new key.
                    footprint::count_created_key(self, key);
                }
                Ok(())
            }
            Err(SetError::CasMismatch) => Err(StoreError::CasMismatch),
            Err(SetError::Host(e)) => {
                log::warn!("cannot write shared data {key}: {e:?}");
                Err(StoreError::Unavailable)
            }
        }
    }
}

/// Envoy metrics; ids are defined once per name and worker.
struct HostMetrics;

thread_local! {
    static METRIC_IDS: RefCell<HashMap<String, u32, NameHash>> = RefCell::new(HashMap::default());
}

impl HostMetrics {
    fn id(name: &str, kind: MetricKind) -> Option<u32> {
        METRIC_IDS.with(|ids| {
            if let Some(id) = ids.borrow().get(name) {
                return Some(*id);
            }
            let id = host::define_metric(kind, name).ok()?;
            ids.borrow_mut().insert(name.to_string(), id);
            Some(id)
        })
    }
}

impl Metrics for HostMetrics {
    fn add(&self, name: &str, value: u64) {
        if let Some(id) = Self::id(name, MetricKind::Counter) {
            let _ = host::increment_metric(id, i64::try_from(value).unwrap_or(i64::MAX));
        }
    }

    fn set(&self, name: &str, value: u64) {
        if let Some(id) = Self::id(name, MetricKind::Gauge) {
            let _ = host::record_metric(id, value);
        }
    }

    fn record(&self, name: &str, value: u64) {
        if let Some(id) = Self::id(name, MetricKind::Histogram) {
            let _ = host::record_metric(id, value);
        }
    }
}

struct HostClock;

thread_local! {
    /// The last steady time handed out, for hosts without a monotonic clock.
    static LAST_NOW_MS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

impl Clock for HostClock {
    /// The host's monotonic clock; without one, the wall clock clamped so
    /// that it never runs backwards (a forward step cannot be told apart).
    fn now_ms(&self) -> u64 {
        let now = host::monotonic_ms().or_else(|_| host::now_ms()).unwrap_or(0);
        LAST_NOW_MS.with(|last| {
            let now = now.max(last.get());
            last.set(now);
            now
        })
    }

    fn wall_ms(&self) -> u64 {
        host::now_ms().unwrap_or(0)
    }
}

struct Root {
    /// Set by `on_configure` from the plugin's root id.
    role: Option<Role>,
    gateway: Option<Rc<Gateway>>,
    /// When the gauges were last refreshed.
    reported_ms: u64,
}

/// How often the gauges are refreshed.
const REPORT_EVERY_MS: u64 = 1000;
/// The tick while requests may wait for a backend.
const WAKE_TICK_MS: u32 = 100;

thread_local! {
    /// Host calls counted up to the end of the last tick, for the whole VM
    /// (both roles' plugins share one VM when their VM config is the same).
    static REPORTED_CALLS: std::cell::Cell<[u64; host::CALL_KINDS]> =
        const { std::cell::Cell::new([0; host::CALL_KINDS]) };
}

impl Context for Root {
    /// The answer to a correction sent from the tick: only its failure matters.
    fn on_grpc_call_response(&mut self, _token_id: u32, status_code: u32, _response_size: usize) {
        if status_code != GRPC_OK {
            HostMetrics.add(&metrics::name(metrics::LIMIT_SERVICE_FAILURES, &[("reason", "correction")]), 1);
            log_limit_service_failure(&format!("a usage correction failed (gRPC status {status_code})"));
        }
    }
}

const GRPC_OK: u32 = 0;

thread_local! {
    /// Usage beyond admission estimates, sent to the rate-limit service by
    /// the request root's tick (global client limits).
    static UNSENT: RefCell<Pending> = RefCell::new(Pending::default());
    static FAILURE_LOG: RefCell<LogGate> = RefCell::new(LogGate::default());
}

/// One warning per second at most while the rate-limit service fails.
fn log_limit_service_failure(what: &str) {
    let now = HostClock.now_ms();
    if let Some(suppressed) = FAILURE_LOG.with(|g| g.borrow_mut().pass(now)) {
        log::warn!("rate-limit service: {what} ({suppressed} more failures since the last line)");
    }
}

/// Sends the usage corrections this worker collected, one call per client.
fn send_corrections(gateway: &Gateway) {
    let Some(global) = &gateway.config.global_limits else { return };
    let pending = UNSENT.with(|u| u.borrow_mut().take());
    if pending.is_empty() {
        return;
    }
    let target = rls::grpc_service(&global.cluster);
    for (name, tokens) in pending {
        // A client the current config no longer has (reloaded) is dropped.
        let Some(index) = gateway.config.clients.iter().position(|c| c.name == name) else { continue };
        let Some((_, limits)) = gateway.client_limits(index) else { continue };
        let Some(message) = global_limits::correction(&global.domain, &name, limits, tokens) else { continue };
        if let Err(e) = host::dispatch_grpc(&target, rls::SERVICE, rls::METHOD, &message, global.timeout_ms) {
            HostMetrics.add(&metrics::name(metrics::LIMIT_SERVICE_FAILURES, &[("reason", "correction")]), 1);
            log_limit_service_failure(&format!("cannot send a usage correction ({e:?})"));
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let root_id = host::property(&["plugin_root_id"])
            .ok()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let Some(role) = Role::from_root_id(&root_id) else {
            log::error!(
                "invalid spillway config: root_id \"{root_id}\" is neither \"{}\" nor \"{}\"",
                Role::Request.root_id(),
                Role::Attempt.root_id()
            );
            return false;
        };
        self.role = Some(role);
        let bytes = match host::body(Body::PluginConfiguration, 0, usize::MAX) {
            Ok(b) if !b.is_empty() => b,
            _ => {
                log::error!("invalid spillway config: the plugin configuration is empty");
                return false;
            }
        };
        let env = |var: &str| std::env::var(var).ok();
        match Config::parse(&bytes, Keys::Resolve(&env)) {
            Ok(config) => {
                let gateway = Gateway::new(config);
                let agreed = match role {
                    Role::Attempt => {
                        gateway.publish_backend_set(&HostStore);
                        Ok(())
                    }
                    Role::Request => gateway.check_backend_set(&HostStore),
                };
                if let Err(e) = agreed {
                    log::error!("{e}");
                    return false;
                }
                log::info!("{role:?} role configured with {} backends", gateway.config.backends.len());
                // Refreshes the gauges: backends out (request role), memory;
                // wakes requests waiting for a backend, often enough that
                // they go within a tenth of a second of its return.
                let waits = role == Role::Request
                    && (gateway.config.wait_for_backend_ms.is_some() || gateway.config.global_limits.is_some());
                self.gateway = Some(Rc::new(gateway));
                if let Err(e) = host::set_tick_period_ms(if waits { WAKE_TICK_MS } else { REPORT_EVERY_MS as u32 }) {
                    log::warn!("cannot set tick period: {e:?}");
                }
                true
            }
            Err(e) => {
                log::error!("{e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(role) = self.role else { return };
        // Calls made serving requests up to this tick; the tick's own are
        // never counted as theirs.
        let before = host::calls();
        let now = HostClock.now_ms();
        if role == Role::Request {
            wake_due(now);
            if let Some(g) = &self.gateway {
                send_corrections(g);
            }
        }
        let reported = REPORTED_CALLS.with(std::cell::Cell::get);
        if now.saturating_sub(self.reported_ms) < REPORT_EVERY_MS.saturating_sub(WAKE_TICK_MS.into()) {
            let mut skipped = reported;
            for ((r, after), b) in skipped.iter_mut().zip(host::calls()).zip(before) {
                *r = r.wrapping_add(after.wrapping_sub(b));
            }
            REPORTED_CALLS.with(|c| c.set(skipped));
            return;
        }
        self.reported_ms = now;
        let served: Vec<(&str, u64)> = host::Call::ALL
            .iter()
            .zip(before.iter().zip(reported))
            .map(|(c, (n, r))| (c.name(), n.wrapping_sub(r)))
            .collect();
        if let (Some(g), Role::Request) = (&self.gateway, role) {
            g.report_health(&HostStore, &HostClock, &HostMetrics);
        }
        footprint::report(&HostStore, &HostMetrics, role, host::memory_bytes());
        footprint::count_host_calls(&HostMetrics, &served);
        REPORTED_CALLS.with(|r| r.set(host::calls()));
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // The SDK panics on `None`: a plugin without a usable config answers
        // every request with a 503 instead (Envoy normally refuses such a
        // config before any request arrives).
        let (Some(gateway), Some(role)) = (self.gateway.clone(), self.role) else {
            return Some(Box::new(Unconfigured));
        };
        Some(match role {
            Role::Request => Box::new(RequestFilter {
                context_id,
                core: Rc::new(RefCell::new(RequestCore {
                    gateway,
                    exchange: Exchange::new(HostClock.now_ms()),
                    inspect_body: false,
                    credential_stash: None,
                    wait_until: None,
                    limits_call: None,
                    held_head: None,
                    body_held: false,
                })),
            }),
            Role::Attempt => Box::new(AttemptFilter {
                gateway,
                attempt: None,
                body_model: None,
                answered: false,
                complete: false,
                holding: false,
            }),
        })
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// A header value as text. Values that are not UTF-8 are decoded lossily:
/// they can then match nothing (a key, a number), which is the right answer.
fn header_text(map: Headers, name: &str) -> Option<String> {
    match host::header(map, name) {
        Ok(value) => {
            value.map(|v| String::from_utf8(v).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
        }
        Err(e) => {
            log::warn!("cannot read header {name}: {e:?}");
            None
        }
    }
}

/// Sets (`Some`) or removes a header; a refusal is logged, never fatal.
fn set_header(map: Headers, name: &str, value: Option<&[u8]>) {
    if let Err(e) = host::set_header(map, name, value) {
        log::warn!("cannot set header {name}: {e:?}");
    }
}

/// A header map read once: all of it in one host call (one copy into the VM
/// instead of one per header), or, should the host refuse that, header by
/// header.
enum HeaderMap {
    Whole(host::PairMap, Headers),
    OneByOne(Headers),
}

impl HeaderMap {
    fn read(map: Headers) -> HeaderMap {
        match host::header_pairs(map).map(host::PairMap::decode) {
            Ok(Some(pairs)) => HeaderMap::Whole(pairs, map),
            Ok(None) => {
                log::warn!("the {map:?} headers came in a form not understood: reading them one by one");
                HeaderMap::OneByOne(map)
            }
            Err(e) => {
                log::warn!("cannot read the {map:?} headers at once ({e:?}): reading them one by one");
                HeaderMap::OneByOne(map)
            }
        }
    }

    fn text(&self, name: &str) -> Option<String> {
        match self {
            HeaderMap::Whole(pairs, _) => pairs.text(name),
            HeaderMap::OneByOne(map) => header_text(*map, name),
        }
    }

    fn has(&self, name: &str) -> bool {
        match self {
            HeaderMap::Whole(pairs, _) => pairs.get(name).is_some(),
            HeaderMap::OneByOne(map) => matches!(host::header(*map, name), Ok(Some(_))),
        }
    }

    /// Removes a header only when the map read says it is there (an absent
    /// removal still costs a host call).
    fn clear(&self, name: &str) {
        if self.has(name) {
            let map = match self {
                HeaderMap::Whole(_, map) | HeaderMap::OneByOne(map) => *map,
            };
            set_header(map, name, None);
        }
    }
}

/// Removes a header only when it is there: asking costs the host less than
/// removing, and the headers cleared here are almost always absent.
fn clear_header(map: Headers, name: &str) {
    if matches!(host::header(map, name), Ok(Some(_))) {
        set_header(map, name, None);
    }
}

fn set_request_header(name: &str, value: Option<&str>) {
    set_header(Headers::Request, name, value.map(str::as_bytes))
}

fn response_header(name: &str) -> Option<String> {
    header_text(Headers::Response, name)
}

fn set_response_header(name: &str, value: Option<&str>) {
    set_header(Headers::Response, name, value.map(str::as_bytes))
}

fn send_reply(reply: &LocalReply) -> Action {
    let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    match host::send_reply(reply.status, &headers, reply.body.as_bytes()) {
        Ok(()) => Action::Pause,
        Err(e) => {
            log::warn!("cannot send local reply: {e:?}");
            Action::Continue
        }
    }
}

/// Stands in for a filter whose plugin has no usable config.
struct Unconfigured;

impl Context for Unconfigured {}

impl HttpContext for Unconfigured {
    fn on_http_request_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        send_reply(&LocalReply::error(503, "503", "Spillway is not configured (see Envoy's log)."))
    }
}

/// The request role's state for one request. It lives behind an `Rc` so
/// the root context can reach a request it holds waiting for a backend.
struct RequestCore {
    gateway: Rc<Gateway>,
    exchange: Exchange,
    /// Buffer the request body and show it to the exchange.
    inspect_body: bool,
    /// The stash header of the client's credential, cleared at the end.
    credential_stash: Option<String>,
    /// `Step::Wait` asked to hold the request until then.
    wait_until: Option<u64>,
    /// The token of the rate-limit service call the request waits for.
    limits_call: Option<u32>,
    /// The request headers, held until the body is complete: the body's
    /// fields are read before the request is decided.
    held_head: Option<HeldHead>,
    /// The whole body passed this filter while the request was held (for
    /// its fields, or paused at the headers): inspecting it then reads what
    /// Envoy buffered.
    body_held: bool,
}

/// What the request role keeps of the request headers while it holds them
/// for the body.
struct HeldHead {
    method: String,
    path: String,
    api_key: Option<String>,
    apim_key: Option<String>,
    authorization: Option<String>,
    content_length: Option<u64>,
}

/// A request held for a backend to come back (`wait_for_backend_ms`).
struct Waiter {
    context_id: u32,
    until_ms: u64,
    request: Weak<RefCell<RequestCore>>,
}

thread_local! {
    /// The requests this worker holds waiting; the request root's tick wakes them.
    static WAITING: RefCell<Vec<Waiter>> = const { RefCell::new(Vec::new()) };
}

/// Registers a request that asked to wait, or refuses it when the worker
/// already holds `max_waiting_requests`. Returns what a refused request does
/// instead: go on (true) or not (its reply is sent); `None` when it waits
/// or never asked to.
fn hold(context_id: u32, core: &Rc<RefCell<RequestCore>>) -> Option<bool> {
    let until_ms = core.borrow_mut().wait_until.take()?;
    let max = core.borrow().gateway.config.max_waiting_requests;
    let admitted = WAITING.with(|w| {
        let mut waiting = w.borrow_mut();
        waiting.retain(|x| x.request.strong_count() > 0);
        let room = waiting.len() < max;
        if room {
            waiting.push(Waiter { context_id, until_ms, request: Rc::downgrade(core) });
        }
        room
    });
    if admitted {
        return None;
    }
    let forward = core.borrow_mut().refuse_wait();
    // Refused, it may be told to wait again only by a bug: never hold it.
    core.borrow_mut().wait_until = None;
    Some(forward)
}

/// Lets a request that waited go on, outside any borrow of its state (the
/// host may call the filter back for its held body).
fn resume_if(forward: bool) {
    if forward {
        if let Err(e) = host::resume_request() {
            log::warn!("cannot resume a request that waited: {e:?}");
        }
    }
}

/// Wakes the waiting requests whose time has come.
fn wake_due(now_ms: u64) {
    let due: Vec<Waiter> = WAITING.with(|w| {
        let mut waiting = w.borrow_mut();
        let (due, later): (Vec<Waiter>, Vec<Waiter>) = waiting.drain(..).partition(|x| x.until_ms <= now_ms);
        *waiting = later;
        due
    });
    for waiter in due {
        let Some(core) = waiter.request.upgrade() else { continue };
        if let Err(e) = host::set_effective_context(waiter.context_id) {
            log::warn!("a waiting request is gone: {e:?}");
            continue;
        }
        let resume = core.borrow_mut().wake();
        resume_if(resume);
        if let Some(forward) = hold(waiter.context_id, &core) {
            resume_if(forward);
        }
    }
}

/// The request role's HTTP context: the host's callbacks go to the shared core.
struct RequestFilter {
    context_id: u32,
    core: Rc<RefCell<RequestCore>>,
}

impl Context for RequestFilter {
    /// The rate-limit service answered (or the call failed or timed out).
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let forward = self.core.borrow_mut().on_limits_answer(token_id, status_code, response_size);
        resume_if(forward);
        if let Some(forward) = hold(self.context_id, &self.core) {
            resume_if(forward);
        }
    }
}

impl RequestFilter {
    /// A request decided in this callback that asked to wait is held (or
    /// refused the wait); otherwise `action` stands.
    fn held(&self, action: Action) -> Action {
        match hold(self.context_id, &self.core) {
            // No room to wait: it goes on now, or its reply is on the way.
            Some(true) => Action::Continue,
            Some(false) => Action::Pause,
            None => action,
        }
    }
}

impl HttpContext for RequestFilter {
    fn on_http_request_headers(&mut self, n: usize, end_of_stream: bool) -> Action {
        let action = self.core.borrow_mut().on_http_request_headers(n, end_of_stream);
        self.held(action)
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let action = self.core.borrow_mut().on_http_request_body(size, end_of_stream);
        self.held(action)
    }

    fn on_http_request_trailers(&mut self, n: usize) -> Action {
        let action = self.core.borrow_mut().on_http_request_trailers(n);
        self.held(action)
    }

    fn on_http_response_headers(&mut self, n: usize, end_of_stream: bool) -> Action {
        self.core.borrow_mut().on_http_response_headers(n, end_of_stream)
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.core.borrow_mut().on_http_response_body(size, end_of_stream)
    }

    fn on_http_response_trailers(&mut self, n: usize) -> Action {
        self.core.borrow_mut().on_http_response_trailers(n)
    }

    fn on_log(&mut self) {
        self.core.borrow_mut().on_log();
    }
}

/// 128 random bits, hex: names a stash no client can guess.
fn random_token() -> Option<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).ok()?;
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn header_bytes(name: &str) -> Option<Vec<u8>> {
    host::header(Headers::Request, name).unwrap_or_else(|e| {
        log::warn!("cannot read header {name}: {e:?}");
        None
    })
}

/// The buffered request body (`size` bytes, or all); empty, with a warning,
/// should the host refuse it.
fn request_body(size: usize) -> Vec<u8> {
    host::body(Body::Request, 0, size).unwrap_or_else(|e| {
        log::warn!("cannot read the request body: {e:?}");
        Vec::new()
    })
}

impl RequestCore {
    /// Keeps the client's own credential for pass-through attempts that may
    /// follow an attempt on a keyed backend (see `credentials`).
    fn stash_client_credential(&mut self) {
        let credential =
            ClientCredential { api_key: header_bytes("api-key"), authorization: header_bytes("authorization") };
        let Some(token) = random_token() else {
            log::warn!("no randomness for a credential stash: pass-through failovers send no credential");
            return;
        };
        if let Some(stash) = credentials::stash(&HostStore, &token, &credential) {
            set_request_header(header::CREDENTIAL, Some(&stash));
            self.credential_stash = Some(stash);
        }
    }

    /// Shows the buffered body (`size` bytes, or all) to the exchange and
    /// puts back the replacement it returns.
    fn inspect_whole_body(&mut self, size: usize) {
        self.inspect_body = false;
        self.inspect(request_body(size));
    }

    fn inspect(&mut self, body: Vec<u8>) {
        if let Some(new_body) = self.exchange.on_request_body(&self.gateway, &HostStore, &HostClock, &body) {
            if let Err(e) = host::set_body(Body::Request, 0, body.len(), &new_body) {
                log::warn!("cannot replace request body: {e:?}");
            }
        }
        // The rest of the estimate goes to the rate-limit service on the next
        // tick, not when the (maybe long) answer ends.
        self.queue_unsent_tokens();
    }

    fn apply(&mut self, step: Step) -> Action {
        match step {
            Step::Forward {
                cluster,
                path,
                inspect_body,
                drop_content_length,
                stored,
                model,
                estimate,
                first_token_timeout_ms,
                tier,
                first_attempt,
            } => {
                if self.gateway.stashes_client_credentials() {
                    self.stash_client_credential();
                }
                set_request_header(header::CLUSTER, Some(&cluster));
                set_request_header(header::PATH, Some(&path));
                if let Some(model) = &model {
                    set_request_header(header::MODEL, Some(model));
                }
                if let Some(tokens) = estimate {
                    set_request_header(header::ESTIMATE, Some(&tokens.to_string()));
                }
                if tier == Tier::Low {
                    set_request_header(header::TIER, Some("low"));
                }
                if let Some(plan) = &first_attempt {
                    set_request_header(header::FIRST_ATTEMPT, Some(plan));
                }
                if let Some(ms) = first_token_timeout_ms {
                    let limit = self.gateway.config.attempt_timeout_s.map_or(ms, |s| ms.min(s.saturating_mul(1000)));
                    set_request_header(header::ENVOY_PER_TRY_TIMEOUT, Some(&limit.to_string()));
                }
                match stored {
                    Stored::No => {}
                    Stored::Pinned => set_request_header(header::PINNED, Some("1")),
                    Stored::Lookup => set_request_header(header::LOOKUP, Some("1")),
                }
                if drop_content_length {
                    // The body may grow (stream_options added); Envoy re-frames it.
                    set_request_header("content-length", None);
                }
                self.inspect_body = inspect_body;
                if inspect_body && self.body_held {
                    // Decided after a wait or the rate-limit service: the
                    // body is complete and held by Envoy, never shown again.
                    self.inspect_whole_body(usize::MAX);
                }
                // The route (and its cluster) may already be cached from
                // before our header existed.
                if let Err(e) = host::call_foreign("clear_route_cache", &[]) {
                    log::warn!("clear_route_cache failed: {e:?}");
                }
                Action::Continue
            }
            Step::Reply(reply) => send_reply(&reply),
            Step::Wait { until_ms } => {
                self.wait_until = Some(until_ms);
                Action::Pause
            }
            Step::AskLimits { message } => self.ask_limits(&message),
        }
    }

    /// Hands usage the rate-limit service has not been charged to the tick.
    fn queue_unsent_tokens(&mut self) {
        if let Some((client, tokens)) = self.exchange.take_unsent_tokens(&self.gateway) {
            UNSENT.with(|u| u.borrow_mut().add(client, tokens));
        }
    }

    /// Sends the admission question to the rate-limit service and holds the
    /// request until `on_limits_answer`; a call that cannot start is a
    /// failure of the service.
    fn ask_limits(&mut self, message: &[u8]) -> Action {
        let gateway = Rc::clone(&self.gateway);
        let Some(global) = &gateway.config.global_limits else { return self.limits_answered(None, "no service") };
        let target = rls::grpc_service(&global.cluster);
        match host::dispatch_grpc(&target, rls::SERVICE, rls::METHOD, message, global.timeout_ms) {
            Ok(token) => {
                self.limits_call = Some(token);
                Action::Pause
            }
            Err(e) => self.limits_answered(None, &format!("cannot call it ({e:?})")),
        }
    }

    /// The answer to `ask_limits`' call; true when the request goes on.
    fn on_limits_answer(&mut self, token: u32, status: u32, size: usize) -> bool {
        if self.limits_call != Some(token) {
            return false;
        }
        self.limits_call = None;
        let body = if status == GRPC_OK {
            host::body(Body::GrpcReceive, 0, size).map_err(|e| format!("cannot read its answer ({e:?})"))
        } else {
            Err(format!("gRPC status {status}"))
        };
        let action = match body {
            Ok(body) => self.limits_answered(Some(&body), "an answer that is not a rate-limit response"),
            Err(why) => self.limits_answered(None, &why),
        };
        action == Action::Continue
    }

    /// Applies the exchange's decision on the service's answer (`None`: no
    /// answer; `why` describes a failure for the log).
    fn limits_answered(&mut self, answer: Option<&[u8]>, why: &str) -> Action {
        let step = self.exchange.on_limits_answer(&self.gateway, &HostStore, &HostClock, &HostMetrics, answer);
        if self.exchange.limit_service_failed() {
            let outcome = match self.gateway.config.global_limits.as_ref().map(|g| g.failure_mode) {
                Some(FailureMode::Closed) => "refusing requests (failure_mode closed)",
                _ => "admitting requests uncharged (failure_mode open)",
            };
            log_limit_service_failure(&format!("{why}; {outcome}"));
        }
        self.apply(step)
    }

    /// The root context's tick: the wait is over (the effective context is
    /// this request's). Routes again; true when the request goes on.
    fn wake(&mut self) -> bool {
        let step = self.exchange.on_wait_over(&self.gateway, &HostStore, &HostClock, &HostMetrics);
        self.apply_after_wait(step)
    }

    /// The worker holds as many waiting requests as it may; true when the
    /// request goes on after all.
    fn refuse_wait(&mut self) -> bool {
        let step = self.exchange.on_wait_refused(&self.gateway, &HostStore, &HostClock, &HostMetrics);
        self.apply_after_wait(step)
    }

    /// A reply is sent by `apply`; a new wait is registered by the caller.
    fn apply_after_wait(&mut self, step: Step) -> bool {
        let forward = matches!(step, Step::Forward { .. });
        let _ = self.apply(step);
        forward
    }
}

impl RequestCore {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        // Clients must not steer routing or fake bookkeeping: of the internal
        // headers the filter reads, CLUSTER and PATH are always overwritten
        // before the request goes on; the others must go.
        let headers = HeaderMap::read(Headers::Request);
        for internal in [
            header::TRIED,
            header::CREDENTIAL,
            header::MODEL,
            header::PINNED,
            header::LOOKUP,
            header::ESTIMATE,
            header::TIER,
            header::FIRST_ATTEMPT,
        ] {
            headers.clear(internal);
        }
        let config = &self.gateway.config;
        let (api_key, apim_key, authorization) = if config.clients.is_empty() {
            (None, None, None)
        } else {
            (headers.text("api-key"), headers.text("ocp-apim-subscription-key"), headers.text("authorization"))
        };
        let path = headers.text(":path").unwrap_or_default();
        let method = headers.text(":method").unwrap_or_default();
        // A JSON body is held until complete and its fields read first. An
        // upgrade (websocket) has no body to wait for, whatever it declares.
        let upgrade = headers.has("upgrade") || method == "CONNECT";
        let hold_for_body = !end_of_stream
            && !upgrade
            && config.reads_body_fields(&path)
            && headers.text("content-type").is_some_and(|t| is_json(&t));
        let head = HeldHead {
            method,
            path,
            api_key,
            apim_key,
            authorization,
            // The estimate counts the body's size: for a client's token
            // limit, and for the backends' quotas (quota-aware routing).
            content_length: headers.text("content-length").and_then(|v| v.parse().ok()),
        };
        if !config.clients.is_empty() {
            // A gateway key is for the gateway only.
            for name in CLIENT_CREDENTIAL_HEADERS {
                headers.clear(name);
            }
        }
        if hold_for_body {
            self.held_head = Some(head);
            // Envoy goes on feeding the body to this filter
            // (`allow_on_headers_stop_iteration`), holding the headers.
            return Action::Pause;
        }
        self.decide(&head, !end_of_stream, None)
    }

    /// Decides the request: admission, the backend, and the headers that
    /// carry the decision. `fields` when the body was read first.
    fn decide(&mut self, head: &HeldHead, has_body: bool, fields: Option<BodyFields>) -> Action {
        let request = RequestHead {
            method: &head.method,
            path: &head.path,
            api_key: head.api_key.as_deref(),
            apim_key: head.apim_key.as_deref(),
            authorization: head.authorization.as_deref(),
            content_length: head.content_length,
            has_body,
            fields,
        };
        let step = self.exchange.on_request_headers(&self.gateway, &HostStore, &HostClock, &HostMetrics, &request);
        self.apply(step)
    }

    /// The held body is complete: read its fields, decide, and go on with
    /// the headers and the body (or answer, or wait).
    fn decide_with_body(&mut self, size: usize) -> Action {
        let Some(mut head) = self.held_head.take() else { return Action::Continue };
        let body = request_body(size);
        head.content_length = head.content_length.or(u64::try_from(body.len()).ok());
        let fields = BodyFields::from_json(&body);
        let action = self.decide(&head, true, fields);
        // Should the request wait, what it then forwards reads the body
        // from Envoy's buffer.
        self.body_held = true;
        if self.inspect_body {
            self.inspect_body = false;
            self.inspect(body);
        }
        action
    }

    /// Paused at the headers with the decision not made or not to be sent
    /// on: waiting for a backend or for the rate-limit service, or answered.
    fn paused_at_headers(&self) -> bool {
        self.limits_call.is_some() || self.exchange.is_waiting() || self.exchange.is_local_reply()
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.held_head.is_some() {
            // Buffered by Envoy until the body is complete.
            return if end_of_stream { self.decide_with_body(size) } else { Action::Pause };
        }
        if self.paused_at_headers() {
            // Envoy hands a paused request's body to this filter all the same
            // (`allow_on_headers_stop_iteration`): it stays buffered until
            // the request goes on, and is never shown to it again.
            self.body_held |= end_of_stream;
            return Action::Pause;
        }
        if !self.inspect_body {
            return Action::Continue;
        }
        if !end_of_stream {
            // Buffer until the whole body is here.
            return Action::Pause;
        }
        self.inspect_whole_body(size);
        Action::Continue
    }

    /// A body followed by trailers (HTTP/2) ends here, not with an
    /// end-of-stream body callback.
    fn on_http_request_trailers(&mut self, _n: usize) -> Action {
        if self.held_head.is_some() {
            return self.decide_with_body(usize::MAX);
        }
        if self.paused_at_headers() {
            self.body_held = true;
            return Action::Pause;
        }
        if self.inspect_body {
            self.inspect_whole_body(usize::MAX);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        if self.exchange.is_local_reply() {
            return Action::Continue;
        }
        if end_of_stream {
            self.exchange.on_response_complete();
        }
        let headers = HeaderMap::read(Headers::Response);
        headers.clear(header::RETRY);
        let status: u32 = headers.text(":status").and_then(|s| s.parse().ok()).unwrap_or(0);
        let (content_type, backend, attempts) =
            (headers.text("content-type"), headers.text(header::BACKEND), headers.text(header::ATTEMPTS));
        let seen = Observation::read(&|name: &str| headers.text(name), status);
        let reported = Left { requests: seen.requests, tokens: seen.tokens };
        let extra = self.exchange.on_response_headers(
            &self.gateway,
            status,
            content_type.as_deref(),
            backend.as_deref(),
            attempts.as_deref(),
            reported,
        );
        if !extra.is_empty() {
            // One backend's limits next to the pool's remaining would mislead.
            for name in [headroom::LIMIT_REQUESTS, headroom::LIMIT_TOKENS] {
                headers.clear(name);
            }
        }
        for (name, value) in extra {
            set_response_header(name, Some(&value));
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.exchange.is_local_reply() {
            return Action::Continue;
        }
        let wanted = if self.exchange.reads_response_body() { size } else { 0 };
        let chunk = host::body(Body::Response, 0, wanted).unwrap_or_else(|e| {
            log::warn!("cannot read a response body chunk: {e:?}");
            Vec::new()
        });
        if let Some(replacement) = self.exchange.on_response_body(&chunk, end_of_stream) {
            if let Err(e) = host::set_body(Body::Response, 0, size, &replacement) {
                log::warn!("cannot replace response body: {e:?}");
            }
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _n: usize) -> Action {
        self.exchange.on_response_complete();
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Some(stash) = &self.credential_stash {
            credentials::clear(&HostStore, stash);
        }
        // How the stream ended matters only when it did not end with a
        // backend's whole answer (the common case asks the host nothing).
        if !self.exchange.ended_as_answered() {
            let (flags, details) = stream_flags();
            if details == "no_healthy_upstream" {
                // Envoy found no host for the chosen cluster: no attempt ran.
                if let Ok(Some(cluster)) = host::property(&["xds", "cluster_name"]) {
                    let cluster = String::from_utf8_lossy(&cluster);
                    self.gateway.on_no_healthy_upstream(&HostStore, &HostClock, &HostMetrics, &cluster);
                }
            }
            if stream_end::classify(flags, &details) == LostAttempt::ClientSide {
                self.exchange.on_client_gone();
            }
            if stream_end::upstream_may_have_worked(flags) {
                self.exchange.on_upstream_may_have_worked();
            }
        }
        let line = self.exchange.finish(&self.gateway, &HostStore, &HostClock, &HostMetrics);
        self.queue_unsent_tokens();
        log::info!("{line}");
    }
}

struct Attempt {
    backend: usize,
    has_fallback: bool,
    stored: Stored,
    attempts: usize,
    /// The answer's status shows the backend works.
    healthy: bool,
    /// See `AttemptPlan::lookup_blocked_ms`.
    lookup_blocked_ms: Option<u64>,
    /// See `AttemptPlan::clean_at_start`.
    clean_at_start: bool,
    estimate: Option<u64>,
    tier: Tier,
}

impl Attempt {
    fn reference(&self) -> AttemptRef {
        AttemptRef {
            backend: self.backend,
            has_fallback: self.has_fallback,
            stored: self.stored,
            estimate: self.estimate,
            tier: self.tier,
        }
    }
}

struct AttemptFilter {
    gateway: Rc<Gateway>,
    attempt: Option<Attempt>,
    /// Rewrite the body's `model` to this for this backend.
    body_model: Option<String>,
    /// Response headers arrived.
    answered: bool,
    /// The answer's last byte arrived.
    complete: bool,
    /// A stream's head is held until its first content (see `first_event`).
    holding: bool,
}

/// Envoy's response flags and code details for the request so far.
fn stream_flags() -> (u64, String) {
    let flags = host::property(&["response", "flags"]).ok().flatten().map_or(0, |b| stream_end::decode_flags(&b));
    let details = host::property(&["response", "code_details"]).ok().flatten().unwrap_or_default();
    (flags, String::from_utf8_lossy(&details).into_owned())
}

impl AttemptFilter {
    /// Sets the buffered body's `model` to this backend's deployment name.
    fn rename_body_model(&self, size: usize) {
        let Some(model) = &self.body_model else { return };
        let body = host::body(Body::Request, 0, size).unwrap_or_default();
        match usage::with_model(&body, model) {
            Some(renamed) => {
                if let Err(e) = host::set_body(Body::Request, 0, body.len(), &renamed) {
                    log::warn!("cannot rename the body's model: {e:?}");
                }
            }
            None => log::warn!("the request body is not a JSON object: its model is not renamed"),
        }
    }
}

/// Why the request's stream is ending, from what Envoy recorded on it so far.
fn stream_end() -> LostAttempt {
    let (flags, details) = stream_flags();
    stream_end::classify(flags, &details)
}

impl Context for AttemptFilter {
    fn on_done(&mut self) -> bool {
        let Some(a) = &self.attempt else { return true };
        if !self.answered || self.holding {
            // No response headers (or a held stream head never let through):
            // refused, reset, timed out, or the client left.
            self.gateway.on_attempt_lost(&HostStore, &HostClock, &HostMetrics, a.backend, stream_end());
        } else if !self.complete {
            // The answer started and broke off (the client sees it end broken).
            self.gateway.on_answer_cut(&HostStore, &HostClock, &HostMetrics, a.backend, stream_end());
        } else if a.healthy {
            self.gateway.on_answer_complete(&HostStore, a.backend, a.clean_at_start);
        }
        self.attempt = None;
        true
    }
}

impl HttpContext for AttemptFilter {
    fn on_http_request_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        let cluster = host::property(&["xds", "cluster_name"])
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        // Several request headers per attempt: the whole map at once is
        // cheaper than one host call each (most of them are absent).
        let headers = HeaderMap::read(Headers::Request);
        let original_path = headers.text(header::PATH).or_else(|| headers.text(":path")).unwrap_or_default();
        let tried = headers.text(header::TRIED);
        let stored = if headers.has(header::PINNED) {
            Stored::Pinned
        } else if headers.has(header::LOOKUP) {
            Stored::Lookup
        } else {
            Stored::No
        };
        let gateway = Rc::clone(&self.gateway);
        let model = headers.text(header::MODEL);
        let (estimate, tier) = if gateway.config.quota_aware {
            let low = gateway.config.clients.iter().any(|c| c.tier == Tier::Low)
                && headers.text(header::TIER).is_some_and(|t| t == "low");
            (headers.text(header::ESTIMATE).and_then(|v| v.parse().ok()), if low { Tier::Low } else { Tier::High })
        } else {
            (None, Tier::High)
        };
        let first_attempt = headers.text(header::FIRST_ATTEMPT);
        let request = AttemptRequest {
            cluster: &cluster,
            original_path: &original_path,
            tried: tried.as_deref(),
            stored,
            model: model.as_deref(),
            estimate,
            tier,
            first_attempt: first_attempt.as_deref(),
        };
        let Some(plan) = gateway.plan_attempt(&HostStore, &HostClock, &HostMetrics, &request) else {
            return Action::Continue;
        };
        // The path stays as it is unless this backend renames it or an
        // earlier attempt left another backend's name in it.
        if headers.text(":path").as_deref() != Some(plan.path.as_str()) {
            set_request_header(":path", Some(&plan.path));
        }
        if headers.text(":authority").as_deref() != Some(plan.authority) {
            set_request_header(":authority", Some(plan.authority));
        }
        if let Some(new_model) = plan.body_model {
            // The body changes size: Envoy frames it anew.
            set_request_header("content-length", None);
            self.body_model = Some(new_model.to_string());
        }
        // Exactly this backend's credential: its key, or the client's own.
        match plan.api_key {
            Some(key) => {
                set_request_header("api-key", Some(key.expose()));
                headers.clear("authorization");
            }
            None => {
                let stash = headers.text(header::CREDENTIAL);
                match gateway.pass_through_credential(&HostStore, stash.as_deref()) {
                    PassThrough::Leave => {}
                    PassThrough::Restore(own) => {
                        set_header(Headers::Request, "api-key", own.api_key.as_deref());
                        set_header(Headers::Request, "authorization", own.authorization.as_deref());
                    }
                    PassThrough::Strip => {
                        set_request_header("api-key", None);
                        set_request_header("authorization", None);
                    }
                }
            }
        }
        set_request_header(header::TRIED, Some(&plan.tried));
        // Steers Envoy's next attempt (the route re-selects the cluster on retry).
        let own_cluster = cluster.as_str();
        set_request_header(header::CLUSTER, Some(plan.fallback_cluster.unwrap_or(own_cluster)));
        self.attempt = Some(Attempt {
            backend: plan.backend,
            has_fallback: plan.fallback_cluster.is_some(),
            stored,
            attempts: plan.attempts,
            healthy: false,
            lookup_blocked_ms: plan.lookup_blocked_ms,
            clean_at_start: plan.clean_at_start,
            estimate,
            tier,
        });
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.body_model.is_none() {
            return Action::Continue;
        }
        if !end_of_stream {
            // The whole body, then the rename.
            return Action::Pause;
        }
        self.rename_body_model(size);
        Action::Continue
    }

    /// A body followed by trailers (HTTP/2) ends here.
    fn on_http_request_trailers(&mut self, _n: usize) -> Action {
        self.rename_body_model(usize::MAX);
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.complete |= end_of_stream;
        if !self.holding {
            return Action::Continue;
        }
        let held = host::body(Body::Response, 0, size).unwrap_or_else(|e| {
            log::warn!("cannot read a held stream: {e:?}");
            Vec::new()
        });
        let verdict = first_event::verdict(&held);
        let rate_limited = match verdict {
            Verdict::Pending if !end_of_stream => return Action::Pause,
            Verdict::Content => {
                self.holding = false;
                return Action::Continue;
            }
            Verdict::Failed { rate_limited } => rate_limited,
            // Ended with nothing but metadata: no answer at all.
            Verdict::Pending => false,
        };
        self.holding = false;
        let Some(attempt) = &mut self.attempt else { return Action::Continue };
        let at = attempt.reference();
        attempt.healthy = false;
        if self.gateway.on_stream_failed_before_content(&HostStore, &HostClock, &HostMetrics, &at, rate_limited) {
            // The head goes to the router now, marked: Envoy retries and
            // drops this attempt's answer unread.
            set_response_header(header::RETRY, Some("1"));
            self.complete = true;
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _n: usize) -> Action {
        self.complete = true;
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        let Some(attempt) = &mut self.attempt else { return Action::Continue };
        self.answered = true;
        self.complete = end_of_stream;
        // Quota-aware routing reads several headers of every answer: the
        // whole map at once is cheaper than one call each.
        let headers = self.gateway.config.quota_aware.then(|| HeaderMap::read(Headers::Response));
        let read = |name: &str| match &headers {
            Some(map) => map.text(name),
            None => response_header(name),
        };
        let status: u32 = read(":status").and_then(|s| s.parse().ok()).unwrap_or(0);
        let (retry_after_ms, retry_after) =
            if status == 429 { (read("retry-after-ms"), read("retry-after")) } else { (None, None) };
        let quota = if headers.is_some() { Observation::read(&read, status) } else { Observation::default() };
        let ResponseDecision { retry, retry_after_ms: wait, healthy } = self.gateway.on_attempt_response(
            &HostStore,
            &HostClock,
            &HostMetrics,
            &attempt.reference(),
            &AttemptAnswer {
                status,
                retry_after_ms: retry_after_ms.as_deref(),
                retry_after: retry_after.as_deref(),
                quota,
            },
        );
        // A backend's own retry header must not steer Envoy.
        if retry {
            set_response_header(header::RETRY, Some("1"));
        } else {
            match &headers {
                Some(map) => map.clear(header::RETRY),
                None => clear_header(Headers::Response, header::RETRY),
            }
        }
        // Envoy drops a retried answer unread: that is not a broken answer.
        // Nor is the end of an upgraded (websocket) connection: it has no
        // complete form to break.
        self.complete |= retry || status == 101;
        attempt.healthy = healthy;
        if let Some(ms) = wait {
            for (name, value) in crate::replies::retry_after_headers(ms) {
                set_response_header(name, Some(&value));
            }
        }
        if let Some(b) = self.gateway.config.backends.get(attempt.backend) {
            set_response_header(header::BACKEND, Some(&b.name));
        }
        set_response_header(header::ATTEMPTS, Some(&attempt.attempts.to_string()));
        if !retry {
            if let Some(reply) = self.gateway.lookup_verdict(attempt.lookup_blocked_ms, status) {
                // The backend's own "not found" would tell the client its
                // stored state is gone; it may only be out of reach.
                return send_reply(&reply);
            }
        }
        // A stream that could still go elsewhere is held until its first
        // content: should it fail first, the client never sees it.
        let event_stream = read("content-type").is_some_and(|c| c.starts_with("text/event-stream"));
        if !retry && status == 200 && attempt.has_fallback && !end_of_stream && event_stream {
            self.holding = true;
            return Action::Pause;
        }
        Action::Continue
    }
}
