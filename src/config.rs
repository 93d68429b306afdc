//! The filter JSON: parsed strictly (unknown fields are errors) and validated
//! once, so the per-request code never meets an invalid value.

use crate::contract::{cluster_name, RATE_LIMIT_CLUSTER};
pub use crate::global_limits::{FailureMode, GlobalLimits};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    backends: Vec<RawBackend>,
    #[serde(default = "default_retry_on")]
    retry_on: Vec<u16>,
    #[serde(default = "default_retry_after_s")]
    default_retry_after_s: u64,
    #[serde(default = "default_max_retry_after_s")]
    max_retry_after_s: u64,
    #[serde(default)]
    circuit_breaker: Option<RawCircuitBreaker>,
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    attempt_timeout_s: Option<u64>,
    #[serde(default)]
    attempt_idle_timeout_s: Option<u64>,
    #[serde(default)]
    home_backend: Option<String>,
    #[serde(default)]
    clients: Vec<RawClient>,
    #[serde(default)]
    stream_usage: bool,
    #[serde(default)]
    log_bodies: bool,
    #[serde(default = "default_log_body_max_bytes")]
    log_body_max_bytes: usize,
    #[serde(default)]
    routing: Option<String>,
    #[serde(default = "default_headroom_window_s")]
    headroom_window_s: u64,
    #[serde(default)]
    first_token_timeout_s: Option<u64>,
    #[serde(default)]
    wait_for_backend_ms: Option<u64>,
    #[serde(default = "default_max_waiting_requests")]
    max_waiting_requests: usize,
    #[serde(default)]
    global_limits: Option<RawGlobalLimits>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGlobalLimits {
    service: String,
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    domain: Option<String>,
    #[serde(default = "default_global_timeout_ms")]
    timeout_ms: u64,
    #[serde(default)]
    failure_mode: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    name: String,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    key_env: Option<String>,
    #[serde(default)]
    requests_per_minute: Option<u64>,
    #[serde(default)]
    tokens_per_minute: Option<u64>,
    #[serde(default)]
    tier: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: String,
    url: String,
    #[serde(default)]
    api_key: Option<String>,
    #[serde(default)]
    api_key_env: Option<String>,
    #[serde(default = "one")]
    priority: u32,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    deployments: BTreeMap<String, String>,
    #[serde(default)]
    models: Option<Vec<String>>,
    #[serde(default)]
    provisioned: bool,
    #[serde(default)]
    reserve_percent: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCircuitBreaker {
    #[serde(default = "default_consecutive_failures")]
    consecutive_failures: u32,
    #[serde(default = "default_open_s")]
    open_s: u64,
}

fn default_global_timeout_ms() -> u64 {
    100
}
fn default_max_waiting_requests() -> usize {
    100
}
fn default_headroom_window_s() -> u64 {
    60
}
fn default_log_body_max_bytes() -> usize {
    2048
}
fn one() -> u32 {
    1
}
fn default_retry_on() -> Vec<u16> {
    vec![429, 500, 502, 503, 504]
}
fn default_retry_after_s() -> u64 {
    10
}
fn default_max_retry_after_s() -> u64 {
    300
}
fn default_consecutive_failures() -> u32 {
    5
}
fn default_open_s() -> u64 {
    30
}

/// Largest accepted weight; keeps the round-robin schedule small.
pub const MAX_WEIGHT: u32 = 1000;

/// A backend key. Its `Debug` never shows the value, so a key cannot reach a
/// log line through `{:?}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

#[derive(Debug, Clone)]
pub struct Backend {
    pub name: String,
    pub cluster: String,
    pub scheme: Scheme,
    /// Host name or IP literal, without brackets or port.
    pub host: String,
    pub port: u16,
    /// Value for `:authority` on requests to this backend.
    pub authority: String,
    /// Where the key comes from, for the renderer (`api_key_env`).
    pub api_key_env: Option<String>,
    /// `None` when the backend takes no key: the client's own credentials pass through.
    pub api_key: Option<Secret>,
    pub priority: u32,
    pub weight: u32,
    pub deployments: BTreeMap<String, String>,
    /// The models / deployments (as clients name them) this backend serves;
    /// `None`: all of them.
    pub models: Option<Vec<String>>,
    /// Provisioned (PTU) capacity: the share of it, in thousandths, that
    /// low-tier clients leave to the others (`reserve_percent`).
    pub reserve_permille: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreaker {
    pub consecutive_failures: u32,
    pub open_ms: u64,
}

/// A gateway client (subscription key), with optional per-minute limits.
#[derive(Debug, Clone)]
pub struct Client {
    pub name: String,
    /// `None` only in names-only parsing (the renderer).
    pub key: Option<Secret>,
    pub key_env: Option<String>,
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub tier: Tier,
}

/// Who gets provisioned capacity when it runs short.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Tier {
    /// May use all of it (the default, and every request of an open gateway).
    #[default]
    High,
    /// Leaves each provisioned backend's reserve to high-tier clients and
    /// spills to the next priority earlier.
    Low,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub backends: Vec<Backend>,
    /// Empty: the gateway is open. Otherwise every request needs a client key.
    pub clients: Vec<Client>,
    /// Ask streamed chat answers for a usage chunk and hide it from clients that did not ask.
    pub stream_usage: bool,
    /// Log (capped) prompts and answers in the per-request log line.
    pub log_bodies: bool,
    pub log_body_max_bytes: usize,
    pub retry_on: Vec<u16>,
    pub default_retry_after_ms: u64,
    pub max_retry_after_ms: u64,
    pub circuit_breaker: CircuitBreaker,
    pub api_version: Option<String>,
    /// Give up on an attempt that has not started answering after this long
    /// and fail over (Envoy's per-try timeout). Off by default: a long
    /// non-streamed completion sends nothing until it is done.
    pub attempt_timeout_s: Option<u64>,
    /// Cut an attempt that sends nothing for this long, before or during its
    /// answer (Envoy's per-try idle timeout): a hung backend is failed over
    /// before it answers, and a stream it stops feeding ends visibly and
    /// counts against it. Off by default for the same reason.
    pub attempt_idle_timeout_s: Option<u64>,
    /// Where creations and lists of stored objects (files, batches, ...) go;
    /// `None`: the first backend by priority and order.
    pub home_backend: Option<String>,
    /// Route on the quota each backend reports (`routing: "quota_aware"`,
    /// the default) or only react to its 429s (`"reactive"`).
    pub quota_aware: bool,
    /// How long a backend's reported headroom counts without news (its
    /// limits' window); it is forgotten after.
    pub headroom_window_ms: u64,
    /// A streamed answer whose first content has not come this long after
    /// the attempt started is failed over (Envoy's per-try timeout for that
    /// request, while the attempt role holds the stream's head).
    pub first_token_timeout_s: Option<u64>,
    /// When every backend is out and one is back within this long, a
    /// request waits for it instead of getting a 429.
    pub wait_for_backend_ms: Option<u64>,
    /// Requests one worker holds waiting at most; more get the 429.
    pub max_waiting_requests: usize,
    /// Client limits kept by a rate-limit service instead of per process.
    pub global_limits: Option<GlobalLimits>,
}

/// A rejected configuration; `Display` names the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid spillway config: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

/// How `api_key_env` is handled: the filter resolves it from its environment;
/// the renderer only needs the variable names.
pub enum Keys<'a> {
    Resolve(&'a dyn Fn(&str) -> Option<String>),
    NamesOnly,
}

fn err(field: impl Into<String>, why: impl fmt::Display) -> ConfigError {
    ConfigError(format!("{}: {why}", field.into()))
}

impl Config {
    pub fn parse(json: &[u8], keys: Keys<'_>) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_json::from_slice(json).map_err(|e| ConfigError(e.to_string()))?;
        if raw.backends.is_empty() {
            return Err(err("backends", "must list at least one backend"));
        }
        let mut backends: Vec<Backend> = Vec::with_capacity(raw.backends.len());
        for (i, rb) in raw.backends.into_iter().enumerate() {
            let backend = parse_backend(i, rb, &keys)?;
            if backends.iter().any(|b| b.name == backend.name) {
                return Err(err(format!("backends[{i}].name"), format!("duplicate backend name \"{}\"", backend.name)));
            }
            backends.push(backend);
        }
        let mut clients: Vec<Client> = Vec::with_capacity(raw.clients.len());
        for (i, rc) in raw.clients.into_iter().enumerate() {
            let client = parse_client(i, rc, &keys)?;
            if clients.iter().any(|c| c.name == client.name) {
                return Err(err(format!("clients[{i}].name"), format!("duplicate client name \"{}\"", client.name)));
            }
            if client.key.is_some() && clients.iter().any(|c| c.key == client.key) {
                return Err(err(format!("clients[{i}].key"), "the same key is already used by another client"));
            }
            clients.push(client);
        }
        validate_globals(&raw.retry_on, raw.default_retry_after_s, raw.max_retry_after_s, &raw.api_version)?;
        let circuit_breaker = parse_circuit_breaker(raw.circuit_breaker)?;
        if raw.attempt_timeout_s == Some(0) {
            return Err(err("attempt_timeout_s", "must be at least 1 (omit it for no per-attempt timeout)"));
        }
        if let Some(home) = &raw.home_backend {
            if !backends.iter().any(|b| &b.name == home) {
                return Err(err("home_backend", format!("\"{home}\" is not one of the backends")));
            }
        }
        if raw.attempt_idle_timeout_s == Some(0) {
            return Err(err("attempt_idle_timeout_s", "must be at least 1 (omit it for no idle timeout)"));
        }
        if raw.log_body_max_bytes > 1 << 20 {
            return Err(err("log_body_max_bytes", "must be at most 1048576"));
        }
        let quota_aware = match raw.routing.as_deref() {
            None | Some("quota_aware") => true,
            Some("reactive") => false,
            Some(other) => {
                return Err(err("routing", format!("\"{other}\" is not \"quota_aware\" or \"reactive\"")));
            }
        };
        if raw.first_token_timeout_s == Some(0) {
            return Err(err("first_token_timeout_s", "must be at least 1 (omit it for no first-token timeout)"));
        }
        if raw.wait_for_backend_ms.is_some_and(|ms| !(1..=30_000).contains(&ms)) {
            return Err(err("wait_for_backend_ms", "must be between 1 and 30000 (omit it to answer 429 at once)"));
        }
        if !(1..=10_000).contains(&raw.max_waiting_requests) {
            return Err(err("max_waiting_requests", "must be between 1 and 10000"));
        }
        if !(1..=3600).contains(&raw.headroom_window_s) {
            return Err(err("headroom_window_s", "must be between 1 and 3600"));
        }
        let global_limits = raw.global_limits.map(|g| parse_global_limits(g, &clients)).transpose()?;
        Ok(Config {
            backends,
            clients,
            stream_usage: raw.stream_usage,
            log_bodies: raw.log_bodies,
            log_body_max_bytes: raw.log_body_max_bytes,
            retry_on: raw.retry_on,
            default_retry_after_ms: raw.default_retry_after_s.saturating_mul(1000),
            max_retry_after_ms: raw.max_retry_after_s.saturating_mul(1000),
            circuit_breaker,
            api_version: raw.api_version,
            attempt_timeout_s: raw.attempt_timeout_s,
            attempt_idle_timeout_s: raw.attempt_idle_timeout_s,
            home_backend: raw.home_backend,
            quota_aware,
            headroom_window_ms: raw.headroom_window_s.saturating_mul(1000),
            first_token_timeout_s: raw.first_token_timeout_s,
            wait_for_backend_ms: raw.wait_for_backend_ms,
            max_waiting_requests: raw.max_waiting_requests,
            global_limits,
        })
    }

    /// Whether a request on a classic deployment path
    /// (`/openai/deployments/{name}/...`) needs its body's fields before it is
    /// routed: the path names the model, and such APIs keep no stored state,
    /// so only quota-aware routing or a token limit (the completion budget)
    /// or `stream_usage` / `first_token_timeout_s` (is it a stream, did it
    /// ask for usage) reads them. Where nothing does, those requests go on
    /// at their headers, unparsed.
    /// Whether a request to `path` with a JSON body is held until its body
    /// is complete and its fields read before it is routed.
    pub fn reads_body_fields(&self, path: &str) -> bool {
        !crate::paths::is_deployment_path(path) || self.reads_body_fields_on_deployment_paths()
    }

    pub fn reads_body_fields_on_deployment_paths(&self) -> bool {
        self.quota_aware
            || self.stream_usage
            || self.first_token_timeout_s.is_some()
            || self.clients.iter().any(|c| c.tokens_per_minute.is_some())
    }

    pub fn backend_by_cluster(&self, cluster: &str) -> Option<usize> {
        self.backends.iter().position(|b| b.cluster == cluster)
    }

    pub fn backend_by_name(&self, name: &str) -> Option<usize> {
        self.backends.iter().position(|b| b.name == name)
    }
}

fn parse_global_limits(raw: RawGlobalLimits, clients: &[Client]) -> Result<GlobalLimits, ConfigError> {
    let field = |f: &str| format!("global_limits.{f}");
    let (host, port) = raw.service.rsplit_once(':').unwrap_or((raw.service.as_str(), ""));
    if host.is_empty() || host.bytes().any(|c| c <= b' ' || c == b'/') || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(err(field("service"), "must be host:port of the rate-limit service (e.g. \"127.0.0.1:8081\")"));
    }
    if !clients.iter().any(|c| c.requests_per_minute.is_some() || c.tokens_per_minute.is_some()) {
        return Err(err(
            "global_limits",
            "no client has requests_per_minute or tokens_per_minute: there is nothing to keep globally",
        ));
    }
    let cluster = raw.cluster.unwrap_or_else(|| RATE_LIMIT_CLUSTER.to_string());
    // At most 100 ASCII characters: the call's target message stays text.
    if cluster.is_empty() || cluster.len() > 100 || cluster.bytes().any(|c| c <= b' ' || c >= 0x7f) {
        return Err(err(field("cluster"), "must be an Envoy cluster name: 1-100 ASCII characters without whitespace"));
    }
    let domain = raw.domain.unwrap_or_else(|| "spillway".to_string());
    if domain.is_empty() || domain.len() > 64 || domain.bytes().any(|c| c <= b' ') {
        return Err(err(field("domain"), "must be 1-64 characters without whitespace"));
    }
    if !(1..=10_000).contains(&raw.timeout_ms) {
        return Err(err(field("timeout_ms"), "must be between 1 and 10000"));
    }
    let failure_mode = match raw.failure_mode.as_deref() {
        None | Some("open") => FailureMode::Open,
        Some("closed") => FailureMode::Closed,
        Some(other) => return Err(err(field("failure_mode"), format!("\"{other}\" is not \"open\" or \"closed\""))),
    };
    Ok(GlobalLimits { service: raw.service, cluster, domain, timeout_ms: raw.timeout_ms, failure_mode })
}

const NAME_RULE: &str = "must be 1-48 characters of a-z, A-Z, 0-9, '-' or '_'";

fn parse_backend(i: usize, rb: RawBackend, keys: &Keys<'_>) -> Result<Backend, ConfigError> {
    let field = |f: &str| format!("backends[{i}].{f}");
    if !valid_name(&rb.name) {
        return Err(err(field("name"), NAME_RULE));
    }
    let url = parse_url(&rb.url).map_err(|why| err(field("url"), why))?;
    if rb.weight == 0 || rb.weight > MAX_WEIGHT {
        return Err(err(field("weight"), format!("must be between 1 and {MAX_WEIGHT}")));
    }
    let source = SecretSource {
        literal: rb.api_key,
        env: rb.api_key_env.clone(),
        literal_field: "api_key",
        env_field: "api_key_env",
    };
    let api_key = resolve_secret(source, keys, 1, &field)?;
    for (from, to) in &rb.deployments {
        if !valid_deployment(from) || !valid_deployment(to) {
            return Err(err(
                field(&format!("deployments.{from}")),
                "deployment names must be non-empty URL path segments other than '.' and '..', without '/', '\\', '?', '%', '#', whitespace or control characters",
            ));
        }
    }
    if let Some(models) = &rb.models {
        if models.is_empty() {
            return Err(err(field("models"), "must name at least one model (omit it to serve every model)"));
        }
        if let Some(bad) = models.iter().find(|m| !valid_deployment(m)) {
            return Err(err(field("models"), format!("\"{bad}\" is not a plain model or deployment name")));
        }
    }
    let reserve_permille = match (rb.provisioned, rb.reserve_percent) {
        (false, Some(_)) => return Err(err(field("reserve_percent"), "applies only with \"provisioned\": true")),
        (false, None) => None,
        (true, Some(p)) if p > 90 => return Err(err(field("reserve_percent"), "must be between 0 and 90")),
        (true, p) => Some(p.unwrap_or(DEFAULT_RESERVE_PERCENT) * 10),
    };
    Ok(Backend {
        cluster: cluster_name(&rb.name),
        name: rb.name,
        scheme: url.scheme,
        authority: url.authority,
        host: url.host,
        port: url.port,
        api_key_env: rb.api_key_env,
        api_key,
        priority: rb.priority,
        weight: rb.weight,
        deployments: rb.deployments,
        models: rb.models,
        reserve_permille,
    })
}

/// Share of a provisioned backend low-tier clients leave to the others,
/// unless `reserve_percent` says otherwise.
pub const DEFAULT_RESERVE_PERCENT: u32 = 20;

/// Shortest accepted client key.
const MIN_CLIENT_KEY: usize = 8;

fn parse_client(i: usize, rc: RawClient, keys: &Keys<'_>) -> Result<Client, ConfigError> {
    let field = |f: &str| format!("clients[{i}].{f}");
    if !valid_name(&rc.name) {
        return Err(err(field("name"), NAME_RULE));
    }
    if rc.key.is_none() && rc.key_env.is_none() {
        return Err(err(field("key"), "set key or key_env"));
    }
    let source = SecretSource { literal: rc.key, env: rc.key_env.clone(), literal_field: "key", env_field: "key_env" };
    let key = resolve_secret(source, keys, MIN_CLIENT_KEY, &field)?;
    if rc.requests_per_minute == Some(0) {
        return Err(err(field("requests_per_minute"), "must be at least 1 (omit it for no limit)"));
    }
    if rc.tokens_per_minute == Some(0) {
        return Err(err(field("tokens_per_minute"), "must be at least 1 (omit it for no limit)"));
    }
    let tier = match rc.tier.as_deref() {
        None | Some("high") => Tier::High,
        Some("low") => Tier::Low,
        Some(other) => return Err(err(field("tier"), format!("\"{other}\" is not \"high\" or \"low\""))),
    };
    Ok(Client {
        name: rc.name,
        key,
        key_env: rc.key_env,
        requests_per_minute: rc.requests_per_minute,
        tokens_per_minute: rc.tokens_per_minute,
        tier,
    })
}

/// Where a secret comes from: a literal or an environment variable, and the
/// field names to report either under.
struct SecretSource {
    literal: Option<String>,
    env: Option<String>,
    literal_field: &'static str,
    env_field: &'static str,
}

/// A key from its literal or its environment variable (never both), at least
/// `min_len` bytes, without whitespace or control characters (they would end
/// or split a header). `None` when neither is set, or when only the variable
/// name is wanted (`Keys::NamesOnly`).
fn resolve_secret(
    src: SecretSource,
    keys: &Keys<'_>,
    min_len: usize,
    field: &dyn Fn(&str) -> String,
) -> Result<Option<Secret>, ConfigError> {
    let too_short =
        if min_len <= 1 { "is empty".to_string() } else { format!("must be at least {min_len} characters") };
    let check = |value: String, at: &str, what: &str| -> Result<Option<Secret>, ConfigError> {
        if value.len() < min_len {
            return Err(err(field(at), format!("{what}{too_short}")));
        }
        if value.bytes().any(|c| c <= b' ' || c == 0x7f) {
            return Err(err(field(at), format!("{what}must not contain whitespace or control characters")));
        }
        Ok(Some(Secret::new(value)))
    };
    match (src.literal, src.env, keys) {
        (Some(_), Some(_), _) => {
            Err(err(field(src.literal_field), format!("set {} or {}, not both", src.literal_field, src.env_field)))
        }
        (Some(literal), None, _) => check(literal, src.literal_field, ""),
        (None, Some(var), _) if var.is_empty() => Err(err(field(src.env_field), "is empty")),
        (None, Some(_), Keys::NamesOnly) | (None, None, _) => Ok(None),
        (None, Some(var), Keys::Resolve(lookup)) => match lookup(&var) {
            Some(value) => check(value, src.env_field, &format!("the value of environment variable {var} ")),
            None => Err(err(
                field(src.env_field),
                format!("environment variable {var} is not set in the Envoy process (list it in vm_config.environment_variables.host_env_keys)"),
            )),
        },
    }
}

fn validate_globals(
    retry_on: &[u16],
    default_retry_after_s: u64,
    max_retry_after_s: u64,
    api_version: &Option<String>,
) -> Result<(), ConfigError> {
    if retry_on.iter().any(|s| !(400..=599).contains(s)) {
        return Err(err("retry_on", "status codes must be between 400 and 599"));
    }
    if default_retry_after_s == 0 {
        return Err(err("default_retry_after_s", "must be at least 1"));
    }
    if max_retry_after_s < default_retry_after_s {
        return Err(err("max_retry_after_s", "must be at least default_retry_after_s"));
    }
    if let Some(v) = api_version {
        if v.is_empty() || !v.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.') {
            return Err(err("api_version", "must look like 2024-10-21"));
        }
    }
    Ok(())
}

fn parse_circuit_breaker(raw: Option<RawCircuitBreaker>) -> Result<CircuitBreaker, ConfigError> {
    let cb = raw.unwrap_or(RawCircuitBreaker {
        consecutive_failures: default_consecutive_failures(),
        open_s: default_open_s(),
    });
    if cb.consecutive_failures == 0 {
        return Err(err("circuit_breaker.consecutive_failures", "must be at least 1"));
    }
    if cb.open_s == 0 {
        return Err(err("circuit_breaker.open_s", "must be at least 1"));
    }
    Ok(CircuitBreaker { consecutive_failures: cb.consecutive_failures, open_ms: cb.open_s.saturating_mul(1000) })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 48 && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// A deployment or model name as one path segment: a rename to a dot
/// segment or a backslash would make a checked path ambiguous again.
fn valid_deployment(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.bytes().any(|c| matches!(c, b'/' | b'\\' | b'?' | b'#' | b'%') || c <= b' ' || c == 0x7f)
}

struct ParsedUrl {
    scheme: Scheme,
    host: String,
    port: u16,
    authority: String,
}

/// The URL as an error message may show it: credentials (`user:pass@`)
/// replaced, so a rejected config never echoes them into Envoy's log.
fn shown_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}{tail}"),
        None => url.to_string(),
    }
}

fn parse_url(url: &str) -> Result<ParsedUrl, String> {
    let shown = shown_url(url);
    let (scheme, rest) = if let Some(r) = url.strip_prefix("https://") {
        (Scheme::Https, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (Scheme::Http, r)
    } else {
        return Err(format!("\"{shown}\" must start with http:// or https://"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() {
        return Err(format!("\"{shown}\" has no host"));
    }
    if authority.bytes().any(|c| matches!(c, b'/' | b'?' | b'#' | b'@') || c <= b' ' || c == 0x7f) {
        return Err(format!("\"{shown}\" must be scheme://host[:port] only (no path, query or credentials)"));
    }
    let default_port = if scheme == Scheme::Https { 443 } else { 80 };
    let bad_port = || format!("\"{shown}\" has a bad port");
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| format!("\"{shown}\" has a bad IPv6 host"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(p).ok_or_else(bad_port)?,
            None if after.is_empty() => default_port,
            None => return Err(format!("\"{shown}\" has a bad IPv6 host")),
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), parse_port(p).ok_or_else(bad_port)?),
            None => (authority.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err(format!("\"{shown}\" has no host"));
    }
    Ok(ParsedUrl { scheme, host, port, authority: authority.to_string() })
}

fn parse_port(p: &str) -> Option<u16> {
    p.parse::<u16>().ok().filter(|&port| port > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(var: &str) -> Option<String> {
        (var == "EASTUS_KEY").then(|| "k-east".to_string())
    }

    fn parse(json: &str) -> Result<Config, ConfigError> {
        Config::parse(json.as_bytes(), Keys::Resolve(&env))
    }

    const ISSUE_EXAMPLE: &str = r#"{
      "backends": [
        { "name": "eastus", "url": "https://eastus.openai.azure.com", "api_key_env": "EASTUS_KEY",
          "priority": 1, "weight": 2, "deployments": { "gpt-4o": "gpt-4o-ptu" } },
        { "name": "swedencentral", "url": "https://swc.openai.azure.com", "api_key": "literal-key",
          "priority": 2, "weight": 1 }
      ],
      "retry_on": [429, 500, 502, 503, 504],
      "default_retry_after_s": 10,
      "max_retry_after_s": 300,
      "circuit_breaker": { "consecutive_failures": 5, "open_s": 30 },
      "api_version": "2024-10-21"
    }"#;

    #[test]
    fn parses_the_documented_example() {
        let c = parse(ISSUE_EXAMPLE).unwrap();
        assert_eq!(c.backends.len(), 2);
        let east = &c.backends[0];
        assert_eq!(east.cluster, "spillway_eastus");
        assert_eq!(east.scheme, Scheme::Https);
        assert_eq!((east.host.as_str(), east.port), ("eastus.openai.azure.com", 443));
        assert_eq!(east.api_key.as_ref().unwrap().expose(), "k-east");
        assert_eq!(east.deployments["gpt-4o"], "gpt-4o-ptu");
        assert_eq!(c.backends[1].priority, 2);
        assert_eq!(c.default_retry_after_ms, 10_000);
        assert_eq!(c.circuit_breaker, CircuitBreaker { consecutive_failures: 5, open_ms: 30_000 });
        assert_eq!(c.api_version.as_deref(), Some("2024-10-21"));
    }

    #[test]
    fn defaults_apply() {
        let c = parse(r#"{"backends":[{"name":"a","url":"http://127.0.0.1:8001"}]}"#).unwrap();
        let a = &c.backends[0];
        assert_eq!((a.priority, a.weight), (1, 1));
        assert_eq!((a.host.as_str(), a.port, a.authority.as_str()), ("127.0.0.1", 8001, "127.0.0.1:8001"));
        assert!(a.api_key.is_none());
        assert_eq!(c.retry_on, vec![429, 500, 502, 503, 504]);
        assert_eq!(c.max_retry_after_ms, 300_000);
        assert!(c.quota_aware);
        assert_eq!(c.headroom_window_ms, 60_000);
        assert_eq!(a.reserve_permille, None);
        let ptu = parse(r#"{"backends":[{"name":"a","url":"http://x","provisioned":true}]}"#).unwrap();
        assert_eq!(ptu.backends[0].reserve_permille, Some(200));
    }

    #[test]
    fn only_quota_aware_routing_token_limits_and_stream_usage_read_body_fields_on_deployment_paths() {
        let with = |extra: &str| {
            parse(&format!(r#"{{"backends":[{{"name":"a","url":"http://127.0.0.1:8001"}}]{extra}}}"#))
                .unwrap()
                .reads_body_fields_on_deployment_paths()
        };
        assert!(with(""));
        assert!(!with(r#","routing":"reactive""#));
        assert!(!with(
            r#","routing":"reactive","clients":[{"name":"t","key":"key-of-team-t","requests_per_minute":5}]"#
        ));
        assert!(!with(r#","routing":"reactive","log_bodies":true"#));
        assert!(with(r#","routing":"reactive","stream_usage":true"#));
        assert!(with(r#","routing":"reactive","first_token_timeout_s":5"#));
        assert!(with(r#","clients":[{"name":"t","key":"key-of-team-t","tokens_per_minute":5000}]"#));
    }

    fn rejects(json: &str, field: &str) {
        let e = parse(json).unwrap_err().to_string();
        assert!(e.contains(field), "error {e:?} should name {field:?}");
    }

    #[test]
    fn rejects_bad_configs_naming_the_field() {
        rejects("{", "EOF");
        rejects(r#"{"backends":[]}"#, "backends");
        rejects(r#"{"backends":[{"name":"a","url":"http://x"}],"colour":1}"#, "colour");
        rejects(r#"{"backends":[{"name":"a","url":"http://x","wieght":2}]}"#, "wieght");
        rejects(r#"{"backends":[{"name":"a","url":"http://x"},{"name":"a","url":"http://y"}]}"#, "backends[1].name");
        rejects(r#"{"backends":[{"name":"a","url":"http://x","weight":0}]}"#, "backends[0].weight");
        rejects(r#"{"backends":[{"name":"a","url":"ftp://x"}]}"#, "backends[0].url");
        rejects(r#"{"backends":[{"name":"a","url":"http://x/openai"}]}"#, "backends[0].url");
        rejects(r#"{"backends":[{"name":"a","url":"http://x:99999"}]}"#, "backends[0].url");
        rejects(r#"{"backends":[{"name":"a b","url":"http://x"}]}"#, "backends[0].name");
        rejects(r#"{"backends":[{"name":"a","url":"http://x","api_key_env":"NOPE"}]}"#, "backends[0].api_key_env");
        rejects(
            r#"{"backends":[{"name":"a","url":"http://x","api_key":"k","api_key_env":"EASTUS_KEY"}]}"#,
            "backends[0].api_key",
        );
        rejects(
            r#"{"backends":[{"name":"a","url":"http://x","deployments":{"g":"a/b"}}]}"#,
            "backends[0].deployments.g",
        );
        // Found by fuzz/ (config target): a rename must not turn a checked
        // path into an ambiguous one for the backend.
        for to in ["..", ".", r"a\\b"] {
            let json = format!(r#"{{"backends":[{{"name":"a","url":"http://x","deployments":{{"g":"{to}"}}}}]}}"#);
            rejects(&json, "backends[0].deployments.g");
        }
        rejects(r#"{"backends":[{"name":"a","url":"http://x"}],"retry_on":[200]}"#, "retry_on");
        rejects(
            r#"{"backends":[{"name":"a","url":"http://x"}],"circuit_breaker":{"consecutive_failures":0}}"#,
            "circuit_breaker.consecutive_failures",
        );
        rejects(r#"{"backends":[{"name":"a","url":"http://x"}],"default_retry_after_s":0}"#, "default_retry_after_s");
        rejects(r#"{"backends":[{"name":"a","url":"http://x"}],"api_version":"x y"}"#, "api_version");
        rejects(r#"{"backends":[{"name":"a","url":"http://x"}],"attempt_timeout_s":0}"#, "attempt_timeout_s");
        rejects(r#"{"backends":[{"name":"a","url":"http://x","models":[]}]}"#, "backends[0].models");
        rejects(r#"{"backends":[{"name":"a","url":"http://x"}],"home_backend":"b"}"#, "home_backend");
        rejects(r#"{"backends":[{"name":"a","url":"http://x","models":["a/b"]}]}"#, "backends[0].models");
        rejects(r#"{"backends":[{"name":"a","url":"http://x"}],"attempt_idle_timeout_s":0}"#, "attempt_idle_timeout_s");
        rejects(r#"{"backends":[{"name":"a","url":"http://x"}],"routing":"smart"}"#, "routing");
        rejects(r#"{"backends":[{"name":"a","url":"http://x"}],"headroom_window_s":0}"#, "headroom_window_s");
        rejects(r#"{"backends":[{"name":"a","url":"http://x"}],"first_token_timeout_s":0}"#, "first_token_timeout_s");
        rejects(r#"{"backends":[{"name":"a","url":"http://x","reserve_percent":10}]}"#, "backends[0].reserve_percent");
        rejects(r#"{"backends":[{"name":"a","url":"http://x"}],"wait_for_backend_ms":60000}"#, "wait_for_backend_ms");
        rejects(r#"{"backends":[{"name":"a","url":"http://x"}],"max_waiting_requests":0}"#, "max_waiting_requests");
        rejects(
            r#"{"backends":[{"name":"a","url":"http://x","provisioned":true,"reserve_percent":95}]}"#,
            "backends[0].reserve_percent",
        );
        rejects(
            r#"{"backends":[{"name":"a","url":"http://x"}],"clients":[{"name":"t","key":"key-of-team-t","tier":"gold"}]}"#,
            "clients[0].tier",
        );
    }

    #[test]
    fn global_limits_parse_with_defaults_and_name_their_bad_fields() {
        let with = |g: &str| {
            format!(
                r#"{{"backends":[{{"name":"a","url":"http://x"}}],"clients":[{{"name":"t","key":"key-of-team-t","requests_per_minute":5}}],"global_limits":{g}}}"#
            )
        };
        let c = parse(&with(r#"{"service":"127.0.0.1:8081"}"#)).unwrap();
        assert_eq!(
            c.global_limits,
            Some(GlobalLimits {
                service: "127.0.0.1:8081".into(),
                cluster: RATE_LIMIT_CLUSTER.into(),
                domain: "spillway".into(),
                timeout_ms: 100,
                failure_mode: FailureMode::Open,
            })
        );
        let c = parse(&with(
            r#"{"service":"rls.example:81","cluster":"outbound|81||rls.example","domain":"gw","timeout_ms":30,"failure_mode":"closed"}"#,
        ))
        .unwrap();
        let g = c.global_limits.unwrap();
        assert_eq!((g.cluster.as_str(), g.domain.as_str(), g.timeout_ms), ("outbound|81||rls.example", "gw", 30));
        assert_eq!(g.failure_mode, FailureMode::Closed);
        for (g, field) in [
            (r#"{"service":"127.0.0.1"}"#, "global_limits.service"),
            (r#"{"service":":80"}"#, "global_limits.service"),
            (r#"{"service":"h:0"}"#, "global_limits.service"),
            (r#"{"service":"h:1","timeout_ms":0}"#, "global_limits.timeout_ms"),
            (r#"{"service":"h:1","failure_mode":"maybe"}"#, "global_limits.failure_mode"),
            (r#"{"service":"h:1","domain":""}"#, "global_limits.domain"),
            (r#"{"service":"h:1","cluster":"a b"}"#, "global_limits.cluster"),
            (r#"{"service":"h:1","redis":"x"}"#, "redis"),
        ] {
            rejects(&with(g), field);
        }
        rejects(
            r#"{"backends":[{"name":"a","url":"http://x"}],"clients":[{"name":"t","key":"key-of-team-t"}],"global_limits":{"service":"h:1"}}"#,
            "global_limits",
        );
    }

    #[test]
    fn clients_parse_and_validate() {
        let env = |v: &str| (v == "TEAM_A_KEY").then(|| "team-a-secret".to_string());
        let ok = r#"{"backends":[{"name":"a","url":"http://x"}],"clients":[
            {"name":"team-a","key_env":"TEAM_A_KEY","requests_per_minute":60,"tokens_per_minute":120000},
            {"name":"team-b","key":"team-b-secret"}]}"#;
        let c = Config::parse(ok.as_bytes(), Keys::Resolve(&env)).unwrap();
        assert_eq!(c.clients[0].key.as_ref().unwrap().expose(), "team-a-secret");
        assert_eq!(c.clients[0].tokens_per_minute, Some(120_000));
        assert_eq!(c.clients[1].requests_per_minute, None);
        let base = r#"{"backends":[{"name":"a","url":"http://x"}],"clients":"#;
        for (clients, field) in [
            (r#"[{"name":"x"}]"#, "clients[0].key"),
            (r#"[{"name":"x","key":"short"}]"#, "clients[0].key"),
            (r#"[{"name":"x","key":"long-enough","requests_per_minute":0}]"#, "clients[0].requests_per_minute"),
            (r#"[{"name":"x","key":"long-enough"},{"name":"y","key":"long-enough"}]"#, "clients[1].key"),
            (r#"[{"name":"x","key":"long-enough"},{"name":"x","key":"other-key-1"}]"#, "clients[1].name"),
            (r#"[{"name":"x","key_env":"MISSING"}]"#, "clients[0].key_env"),
            (r#"[{"name":"x","key":"long-enough","rpm":1}]"#, "unknown field `rpm`"),
        ] {
            let e = Config::parse(format!("{base}{clients}}}").as_bytes(), Keys::Resolve(&env)).unwrap_err();
            assert!(e.to_string().contains(field), "{e} should name {field}");
        }
    }

    #[test]
    fn names_only_mode_does_not_need_the_environment() {
        let c = Config::parse(
            br#"{"backends":[{"name":"a","url":"http://x","api_key_env":"UNSET_VAR"}]}"#,
            Keys::NamesOnly,
        )
        .unwrap();
        assert_eq!(c.backends[0].api_key_env.as_deref(), Some("UNSET_VAR"));
    }

    #[test]
    fn debug_output_hides_keys() {
        let c = parse(ISSUE_EXAMPLE).unwrap();
        let dump = format!("{c:?}");
        assert!(!dump.contains("literal-key") && !dump.contains("k-east"), "{dump}");
    }

    #[test]
    fn url_errors_never_show_credentials() {
        for url in ["https://user:s3cret@host.example.com", "ftp://user:s3cret@host/x", "http://u:s3cret@h:99999"] {
            let e = parse(&format!(r#"{{"backends":[{{"name":"a","url":"{url}"}}]}}"#)).unwrap_err().to_string();
            assert!(e.contains("backends[0].url") && !e.contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn keys_and_names_with_whitespace_or_control_characters_are_refused() {
        for (json, field) in [
            (r#"{"backends":[{"name":"a","url":"http://x","api_key":"k\r\nx-evil: 1"}]}"#, "backends[0].api_key"),
            (r#"{"backends":[{"name":"a","url":"http://x","api_key":"k k"}]}"#, "backends[0].api_key"),
            (r#"{"backends":[{"name":"a","url":"http://x","deployments":{"g":"a\tb"}}]}"#, "backends[0].deployments.g"),
            (r#"{"backends":[{"name":"a","url":"http://x\n"}]}"#, "backends[0].url"),
            (
                r#"{"backends":[{"name":"a","url":"http://x"}],"clients":[{"name":"c","key":"long-key\n123"}]}"#,
                "clients[0].key",
            ),
        ] {
            rejects(json, field);
        }
        let env = |_: &str| Some("key-with\nnewline".to_string());
        let e =
            Config::parse(br#"{"backends":[{"name":"a","url":"http://x","api_key_env":"K"}]}"#, Keys::Resolve(&env))
                .unwrap_err()
                .to_string();
        assert!(e.contains("backends[0].api_key_env") && !e.contains("newline"), "{e}");
    }

    #[test]
    fn ipv6_urls() {
        let c = parse(r#"{"backends":[{"name":"a","url":"http://[::1]:9000/"}]}"#).unwrap();
        assert_eq!((c.backends[0].host.as_str(), c.backends[0].port), ("::1", 9000));
        assert_eq!(c.backends[0].authority, "[::1]:9000");
    }
}
