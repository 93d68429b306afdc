//! The decisions of both filter roles, free of proxy-wasm:
//!
//! * request role (downstream HTTP filter, once per client request): picks
//!   the first backend, whose cluster the route's matcher then selects;
//! * attempt role (upstream HTTP filter, once per attempt, Envoy retries
//!   included): rewrites key, Host and deployment for the attempt's backend,
//!   names the fallback cluster for the next attempt, and after the answer
//!   updates health and tells Envoy whether to retry.
//!
//! State that must survive from one attempt to the next travels in request
//! headers: Envoy shares one header map across attempts.

use crate::affinity;
use crate::config::ConfigError;
use crate::config::{Backend, Config, Secret, Tier};
use crate::contract::shared_data::{BACKEND_SET, HEALTH};
use crate::credentials::{self, PassThrough};
use crate::headroom::{Fit, Observation};
use crate::health::{Availability, HealthTable};
use crate::limits::{self, Limits};
use crate::metrics::{self, Metrics};
use crate::paths;
use crate::replies::LocalReply;
use crate::retry_after::RetryAfterPolicy;
use crate::selection::{Group, Pick, Pool};
use crate::store::{self, Clock, SharedStore};
use crate::stream_end::LostAttempt;

/// How soon a low-tier request kept off a provisioned backend's reserve may
/// look again (what a local 429 tells it when nothing else can serve it).
const RESERVE_RECHECK_MS: u64 = 1_000;

/// What the attempt role does to one attempt's request headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptPlan<'a> {
    pub backend: usize,
    pub backend_name: &'a str,
    pub path: String,
    pub authority: &'a str,
    /// `Some`: set `api-key` to it and drop `authorization`. `None`: leave the
    /// client's credentials alone (backends without a key).
    pub api_key: Option<&'a Secret>,
    /// New value of `TRIED`.
    pub tried: String,
    pub attempts: usize,
    /// Cluster for the next attempt, if another backend can take it.
    pub fallback_cluster: Option<&'a str>,
    /// The body's `model` becomes this for this backend (v1 paths carry the
    /// deployment in the body; `deployments` renames it per backend).
    pub body_model: Option<&'a str>,
    /// Looking for the holder of stored state, this is the last backend that
    /// can be asked, and others that may hold it are out for this long: a
    /// "not found" here is answered with 429 and that wait instead.
    pub lookup_blocked_ms: Option<u64>,
    /// The backend had no failure run or open circuit when the attempt
    /// started (see `on_answer_complete`).
    pub clean_at_start: bool,
}

/// Whether a request names stored state (a Responses API `resp_...` id)
/// and what is known of where it lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Stored {
    /// No stored state: balanced and failed over as usual.
    #[default]
    No,
    /// Its owner is known: only that backend can answer, no failover.
    Pinned,
    /// No one is known to hold it: the backends are tried in turn until one
    /// knows it (404, and 400 for an unknown `previous_response_id`, fail over).
    Lookup,
}

/// What the attempt role reads from an attempt's request headers.
#[derive(Debug, Clone, Copy)]
pub struct AttemptRequest<'h> {
    /// The attempt's Envoy cluster.
    pub cluster: &'h str,
    /// The path as the client sent it (plus `api-version`).
    pub original_path: &'h str,
    /// Backends already tried, comma separated.
    pub tried: Option<&'h str>,
    pub stored: Stored,
    /// The model the body names (v1); one the path names is read from
    /// `original_path`.
    pub model: Option<&'h str>,
    /// The request's token estimate, when the request role knew it.
    pub estimate: Option<u64>,
    pub tier: Tier,
    /// `header::FIRST_ATTEMPT` as the request role wrote it.
    pub first_attempt: Option<&'h str>,
}

/// The first attempt's plan as the request role worked it out with the
/// health table and rotation it had just read for its pick: the fallback
/// and whether the backend was clean. The first attempt starts moments
/// later, so reading both again there would cost two shared-data copies per
/// request for the same answer. Retries plan afresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstAttempt {
    /// The cluster it was worked out for (an attempt elsewhere ignores it).
    pub cluster: String,
    pub fallback: Option<String>,
    pub clean: bool,
}

impl FirstAttempt {
    /// `<cluster> <fallback cluster or -> <1 clean|0>`: cluster names are
    /// `spillway_<name>` with `[A-Za-z0-9_-]` names, never `-` or a space.
    pub fn encode(&self) -> String {
        let fallback = self.fallback.as_deref().unwrap_or("-");
        format!("{} {fallback} {}", self.cluster, u8::from(self.clean))
    }

    pub fn decode(text: &str) -> Option<FirstAttempt> {
        let mut parts = text.split(' ');
        let (cluster, fallback, clean) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || cluster.is_empty() || fallback.is_empty() {
            return None;
        }
        Some(FirstAttempt {
            cluster: cluster.to_string(),
            fallback: (fallback != "-").then(|| fallback.to_string()),
            clean: match clean {
                "1" => true,
                "0" => false,
                _ => return None,
            },
        })
    }
}

/// The request role's pick: the backend (or the 429 / 404 to answer), what
/// the pool was known to have left, and the first attempt's plan.
#[derive(Debug)]
pub struct FirstPick<'g> {
    pub picked: Result<&'g Backend, LocalReply>,
    pub pool_left: PoolLeft,
    pub first_attempt: Option<FirstAttempt>,
}

/// One attempt, as the attempt role's response decision needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptRef {
    pub backend: usize,
    /// Another backend can take the request if this one fails.
    pub has_fallback: bool,
    pub stored: Stored,
    /// The request's estimate and tier (for the wait a 429 tells).
    pub estimate: Option<u64>,
    pub tier: Tier,
}

/// The parts of an attempt's response headers the decision reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttemptAnswer<'a> {
    pub status: u32,
    pub retry_after_ms: Option<&'a str>,
    pub retry_after: Option<&'a str>,
    /// The answer's rate-limit headers.
    pub quota: Observation,
}

/// Requests and tokens a backend has left (`None`: not known).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Left {
    pub requests: Option<u64>,
    pub tokens: Option<u64>,
}

impl Left {
    /// The lower of the two where both are known, else whichever is.
    pub fn lower(self, other: Left) -> Left {
        let lower = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Left { requests: lower(self.requests, other.requests), tokens: lower(self.tokens, other.tokens) }
    }
}

/// What the backends that could serve a request were known to have left
/// when it was routed, by backend index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolLeft {
    pub backends: Vec<(usize, Left)>,
}

impl PoolLeft {
    /// The pool's remaining requests and tokens once `answered` (a backend
    /// index) reported `fresh` in its answer: its own fresh numbers plus
    /// what the others were known to have. `None` where nothing is known.
    pub fn after(&self, answered: Option<usize>, fresh: Left) -> Left {
        let mut total = Left::default();
        // Nothing routed on the pool (reactive routing, pinned state): the
        // answering backend's own headers stand.
        if self.backends.is_empty() {
            return total;
        }
        let add = |sum: &mut Option<u64>, part: Option<u64>| {
            if let Some(n) = part {
                *sum = Some(sum.unwrap_or(0).saturating_add(n));
            }
        };
        for &(i, left) in &self.backends {
            let left = if Some(i) == answered {
                Left { requests: fresh.requests.or(left.requests), tokens: fresh.tokens.or(left.tokens) }
            } else {
                left
            };
            add(&mut total.requests, left.requests);
            add(&mut total.tokens, left.tokens);
        }
        if answered.is_some_and(|a| !self.backends.iter().any(|&(i, _)| i == a)) {
            add(&mut total.requests, fresh.requests);
            add(&mut total.tokens, fresh.tokens);
        }
        total
    }
}

/// What the attempt role does with one attempt's response headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseDecision {
    /// Mark the response retriable: Envoy sends the request to the fallback.
    pub retry: bool,
    /// Replace `retry-after` / `retry-after-ms` with this wait (ms): set when
    /// a 429 reaches the client, to the time until any backend frees.
    pub retry_after_ms: Option<u64>,
    /// The answer shows the backend works: once its last byte arrives
    /// (`on_answer_complete`), the backend's failure run is over.
    pub healthy: bool,
}

pub struct Gateway {
    pub config: Config,
    pool: Pool,
    names: Vec<String>,
    retry_after: RetryAfterPolicy,
    /// Per client (same index as `config.clients`): its limits and their
    /// shared-data key, `None` for clients without limits.
    client_limits: Vec<Option<(String, Limits)>>,
    /// Some backends have a key and some pass the client's credential on:
    /// an attempt on a keyed backend rewrites headers a later pass-through
    /// attempt must put back.
    mixed_credentials: bool,
    /// Index of the home backend.
    home: usize,
    /// Deployment label values in this worker's metrics.
    pub deployment_labels: crate::metrics::ClientLabels,
}

impl Gateway {
    pub fn new(config: Config) -> Gateway {
        let pool = Pool::new(&config.backends);
        let names = config.backends.iter().map(|b| b.name.clone()).collect();
        let retry_after =
            RetryAfterPolicy { default_ms: config.default_retry_after_ms, max_ms: config.max_retry_after_ms };
        let client_limits = config
            .clients
            .iter()
            .map(|c| {
                let limits =
                    Limits { requests_per_minute: c.requests_per_minute, tokens_per_minute: c.tokens_per_minute };
                (limits.requests_per_minute.is_some() || limits.tokens_per_minute.is_some())
                    .then(|| (limits::key(&c.name, &limits), limits))
            })
            .collect();
        let keyed = config.backends.iter().filter(|b| b.api_key.is_some()).count();
        let mixed_credentials = keyed > 0 && keyed < config.backends.len();
        let first_by_priority = (0..config.backends.len()).min_by_key(|&i| config.backends.get(i).map(|b| b.priority));
        let home =
            config.home_backend.as_deref().and_then(|h| config.backend_by_name(h)).or(first_by_priority).unwrap_or(0);
        Gateway {
            config,
            pool,
            names,
            retry_after,
            client_limits,
            mixed_credentials,
            home,
            deployment_labels: Default::default(),
        }
    }

    /// The request role keeps the client's own credential for pass-through
    /// attempts: only when some backends are keyed, and never a gateway key
    /// (with `clients`, client credentials are not forwarded at all).
    pub fn stashes_client_credentials(&self) -> bool {
        self.mixed_credentials && self.config.clients.is_empty()
    }

    /// Attempt role, pass-through backend: what to do with the credential
    /// headers, given the request's stash header.
    pub fn pass_through_credential(&self, store: &dyn SharedStore, stash: Option<&str>) -> PassThrough {
        if !self.mixed_credentials {
            return PassThrough::Leave;
        }
        match stash.and_then(|h| credentials::recall(store, h)) {
            Some(credential) => PassThrough::Restore(credential),
            None => PassThrough::Strip,
        }
    }

    /// The backend names, sorted: what both roles must agree on.
    fn backend_set(&self) -> String {
        let mut names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        names.sort_unstable();
        names.join(",")
    }

    /// Attempt role, on configure: publishes the backend set its clusters
    /// serve, for the request role to check against.
    pub fn publish_backend_set(&self, store: &dyn SharedStore) {
        let set = self.backend_set().into_bytes();
        store::update(store, BACKEND_SET, |_| ((), Some(set.clone())));
    }

    /// Request role, on configure: a config whose backends differ from the
    /// clusters' (an LDS reload that changed names; clusters only change on
    /// a restart) would pick clusters that do not exist. `Err` names both sets.
    pub fn check_backend_set(&self, store: &dyn SharedStore) -> Result<(), ConfigError> {
        let mine = self.backend_set();
        match store.get(BACKEND_SET).0 {
            Some(theirs) if !theirs.is_empty() && theirs != mine.as_bytes() => Err(ConfigError(format!(
                "backends: [{mine}] differ from the backends the clusters serve [{}]; backends can change only with \
                 the clusters (render the bootstrap again and restart Envoy)",
                String::from_utf8_lossy(&theirs)
            ))),
            _ => Ok(()),
        }
    }

    /// A client's limits and their shared-data key; `None` when unlimited.
    pub fn client_limits(&self, client: usize) -> Option<(&str, &Limits)> {
        self.client_limits.get(client)?.as_ref().map(|(key, limits)| (key.as_str(), limits))
    }

    fn name_refs(&self) -> Vec<&str> {
        self.names.iter().map(String::as_str).collect()
    }

    pub fn read_health(&self, store: &dyn SharedStore) -> HealthTable {
        match store.get(HEALTH).0 {
            Some(bytes) => HealthTable::decode(&bytes, &self.name_refs()),
            None => HealthTable::new(self.names.len()),
        }
    }

    /// CAS-updates the health table; `change` returns whether it changed
    /// anything (no write otherwise). Returns the table as written.
    pub fn update_health(
        &self,
        store: &dyn SharedStore,
        mut change: impl FnMut(&mut HealthTable) -> bool,
    ) -> Option<HealthTable> {
        let names = self.name_refs();
        store::update(store, HEALTH, |bytes| {
            let mut table = match bytes {
                Some(b) => HealthTable::decode(b, &names),
                None => HealthTable::new(names.len()),
            };
            let changed = change(&mut table);
            let encoded = changed.then(|| table.encode(&names));
            (table, encoded)
        })
    }

    /// Request role: the backend a client request goes to first, or the
    /// 429 to answer when every backend is throttled or open.
    /// With `model`, only backends serving it are candidates; none at all is
    /// a 404 `DeploymentNotFound` naming it, without an upstream call.
    /// `tokens` is the request's estimate: with quota-aware routing a
    /// backend whose reported headroom is short of it is not asked. The
    /// `PoolLeft` is what the backends that could serve the request were
    /// known to have left, for the answer's rate-limit headers.
    pub fn pick_first(
        &self,
        store: &dyn SharedStore,
        clock: &dyn Clock,
        model: Option<&str>,
        tokens: u64,
        tier: Tier,
    ) -> (Result<&Backend, LocalReply>, PoolLeft) {
        let FirstPick { picked, pool_left, .. } = self.pick(store, clock.now_ms(), model, tokens, tier);
        (picked, pool_left)
    }

    /// `pick_first`, plus the first attempt's plan (see `FirstAttempt`),
    /// worked out from the same health table: the fallback the attempt role
    /// would pick, reading the rotation this pick has just advanced.
    /// `now`: the request's monotonic time (the caller has read the clock).
    pub fn pick<'g>(
        &'g self,
        store: &dyn SharedStore,
        now: u64,
        model: Option<&str>,
        tokens: u64,
        tier: Tier,
    ) -> FirstPick<'g> {
        let mut excluded = self.not_serving(model);
        if excluded.len() == self.config.backends.len() {
            let reply = LocalReply::model_not_found(model.unwrap_or_default());
            return FirstPick { picked: Err(reply), pool_left: PoolLeft::default(), first_attempt: None };
        }
        let health = self.read_health(store);
        let cb = self.config.circuit_breaker;
        let pool_left = self.pool_left(&health, now, &excluded);
        let fit = self.fit(&health, tokens, tier, now);
        let mut advanced: Vec<(String, u64)> = Vec::new();
        let mut rotate = |g: &Group| {
            let turn = store::fetch_increment(store, &g.counter_key);
            advanced.push((g.counter_key.clone(), turn.wrapping_add(1)));
            turn
        };
        let mut lease_probe = |i: usize| self.lease_probe(store, now, i);
        let first = match self.pool.pick(&health, &cb, now, &excluded, &fit, &mut rotate, Some(&mut lease_probe)) {
            Pick::Backend(i) => i,
            Pick::NoneUntil(until) => {
                let reply = LocalReply::all_busy(until.saturating_sub(now));
                return FirstPick { picked: Err(reply), pool_left, first_attempt: None };
            }
        };
        let Some(backend) = self.config.backends.get(first) else {
            return FirstPick { picked: Err(LocalReply::all_busy(1_000)), pool_left, first_attempt: None };
        };
        // As `plan_attempt` would: the model's backends, this one excluded,
        // the rotation read without advancing it.
        excluded.push(first);
        let fallback_fit = self.fit(&health, tokens.max(1), tier, now);
        let mut peek = |g: &Group| match advanced.iter().find(|(key, _)| *key == g.counter_key) {
            Some((_, turn)) => *turn,
            None => store::read_counter(store, &g.counter_key),
        };
        let fallback = match self.pool.pick(&health, &cb, now, &excluded, &fallback_fit, &mut peek, None) {
            Pick::Backend(i) => self.config.backends.get(i).map(|b| b.cluster.clone()),
            Pick::NoneUntil(_) => None,
        };
        let first_attempt =
            FirstAttempt { cluster: backend.cluster.clone(), fallback, clean: health.get(first).is_clean() };
        FirstPick { picked: Ok(backend), pool_left, first_attempt: Some(first_attempt) }
    }

    /// How a request estimated at `tokens` fits each backend's reported
    /// headroom (always `Unknown` with reactive routing). A low-tier
    /// request does not fit a provisioned backend whose reported
    /// utilisation (else the share of its limits left) has reached its
    /// reserve; it looks again a second later.
    fn fit<'t>(&'t self, health: &'t HealthTable, tokens: u64, tier: Tier, now: u64) -> impl Fn(usize) -> Fit + 't {
        let (on, window) = (self.config.quota_aware, self.config.headroom_window_ms);
        move |i| {
            if !on {
                return Fit::Unknown;
            }
            let headroom = health.get(i).headroom;
            let fit = headroom.fit(tokens, now, window);
            let reserve = self.config.backends.get(i).and_then(|b| b.reserve_permille);
            if let (Tier::Low, Some(reserve)) = (tier, reserve) {
                let left = match (headroom.utilization(now, window), fit) {
                    (Some(used), _) => Some(1000u32.saturating_sub(used)),
                    (None, Fit::Covers { share }) => Some(share),
                    _ => None,
                };
                if left.is_some_and(|left| left <= reserve) {
                    return Fit::Short { at_ms: now.saturating_add(RESERVE_RECHECK_MS) };
                }
            }
            fit
        }
    }

    /// What the backends not `excluded` and not out are known to have left.
    fn pool_left(&self, health: &HealthTable, now: u64, excluded: &[usize]) -> PoolLeft {
        if !self.config.quota_aware {
            return PoolLeft::default();
        }
        let cb = self.config.circuit_breaker;
        let backends = (0..self.names.len())
            .filter(|i| !excluded.contains(i))
            .filter(|&i| !matches!(health.get(i).availability(now, &cb), Availability::Unavailable { .. }))
            .map(|i| {
                let h = health.get(i).headroom;
                let (requests, tokens) = h.now(now, self.config.headroom_window_ms);
                (i, Left { requests, tokens })
            })
            .collect();
        PoolLeft { backends }
    }

    /// Request role: the home backend, where creations and lists of stored
    /// objects go (`home_backend`, else the first by priority and order);
    /// a 429 with its wait while it is throttled or open.
    pub fn home(&self, store: &dyn SharedStore, clock: &dyn Clock) -> Result<&Backend, LocalReply> {
        let now = clock.now_ms();
        let i = self.home;
        match self.read_health(store).get(i).availability(now, &self.config.circuit_breaker) {
            Availability::Unavailable { until_ms } => Err(LocalReply::owner_busy(until_ms.saturating_sub(now))),
            _ => self.config.backends.get(i).ok_or_else(|| LocalReply::all_busy(1_000)),
        }
    }

    /// Backends that declare their models and do not list `model`.
    fn not_serving(&self, model: Option<&str>) -> Vec<usize> {
        let Some(model) = model else { return Vec::new() };
        let declines = |b: &Backend| b.models.as_ref().is_some_and(|m| !m.iter().any(|name| name == model));
        self.config.backends.iter().enumerate().filter(|(_, b)| declines(b)).map(|(i, _)| i).collect()
    }

    /// Request role, for a request naming stored state `id`: its owner when
    /// known (`Ok(Some)`), or `Ok(None)` to look it up by trying backends.
    /// An owner that is throttled or open gets the request nowhere else: a
    /// 429 with its wait.
    pub fn owner_of(
        &self,
        store: &dyn SharedStore,
        clock: &dyn Clock,
        id: &str,
    ) -> Result<Option<&Backend>, LocalReply> {
        let now = clock.now_ms();
        let Some(i) = affinity::owner(store, id, now).and_then(|name| self.config.backend_by_name(&name)) else {
            return Ok(None);
        };
        match self.read_health(store).get(i).availability(now, &self.config.circuit_breaker) {
            Availability::Unavailable { until_ms } => Err(LocalReply::owner_busy(until_ms.saturating_sub(now))),
            _ => Ok(self.config.backends.get(i)),
        }
    }

    /// Takes the single probe of a half-open backend; false if another
    /// request holds it already.
    fn lease_probe(&self, store: &dyn SharedStore, now: u64, i: usize) -> bool {
        let cb = self.config.circuit_breaker;
        // A probe that never reports back (worker restart) must not keep the
        // backend out for ever: the lease ends after one open period.
        let lease_until = now.saturating_add(cb.open_ms);
        let mut won = false;
        self.update_health(store, |t| {
            won = false;
            match t.get_mut(i) {
                Some(h) if h.availability(now, &cb) == Availability::NeedsProbe => {
                    h.probe_until_ms = lease_until;
                    won = true;
                    true
                }
                _ => false,
            }
        });
        won
    }

    /// Attempt role, request headers. `cluster` is the attempt's Envoy
    /// cluster; `None` when it is not one of ours (leave the request alone).
    /// A failover is counted here, when the next backend's attempt really
    /// starts, not when it is asked for (Envoy may decline a retry).
    pub fn plan_attempt<'a>(
        &'a self,
        store: &dyn SharedStore,
        clock: &dyn Clock,
        metrics: &dyn Metrics,
        request: &AttemptRequest<'_>,
    ) -> Option<AttemptPlan<'a>> {
        let AttemptRequest { cluster, original_path, tried, stored, model, first_attempt, .. } = *request;
        // The request role passes on only a model the body names.
        let model = model.or_else(|| paths::model_in_path(original_path));
        let backend_index = self.config.backend_by_cluster(cluster)?;
        let backend = self.config.backends.get(backend_index)?;
        let mut tried_indices: Vec<usize> =
            tried.unwrap_or("").split(',').filter_map(|n| self.config.backend_by_name(n.trim())).collect();
        if let Some(previous) = tried_indices.last().filter(|&&p| p != backend_index) {
            let name = self.names.get(*previous).map_or("", String::as_str);
            metrics.add(&metrics::name(metrics::FAILOVERS, &[("backend", name)]), 1);
        }
        if !tried_indices.contains(&backend_index) {
            tried_indices.push(backend_index);
        }
        let tried_value =
            tried_indices.iter().filter_map(|&i| self.names.get(i).map(String::as_str)).collect::<Vec<_>>().join(",");
        // The first attempt of a request with no stored state: the request
        // role's plan, when it was made for this cluster.
        let planned = first_attempt
            .filter(|_| tried.is_none() && stored == Stored::No)
            .and_then(FirstAttempt::decode)
            .filter(|plan| plan.cluster == backend.cluster);
        let (fallback_cluster, lookup_blocked_ms, clean_at_start) = match planned {
            Some(plan) => {
                let fallback = plan.fallback.and_then(|c| self.config.backend_by_cluster(&c));
                let cluster = fallback.and_then(|i| self.config.backends.get(i)).map(|b| b.cluster.as_str());
                (cluster, None, plan.clean)
            }
            None => self.plan_fallback(store, clock, backend_index, model, &tried_indices, request),
        };
        Some(AttemptPlan {
            backend: backend_index,
            backend_name: &backend.name,
            path: if paths::is_realtime(original_path) {
                paths::realtime_for_backend(original_path, &backend.deployments, backend.api_key.is_some())
            } else {
                paths::rename_deployment(original_path, &backend.deployments)
            },
            authority: &backend.authority,
            api_key: backend.api_key.as_ref(),
            attempts: tried_indices.len(),
            tried: tried_value,
            fallback_cluster,
            // Classic paths carry the deployment in the path, realtime ones in
            // the query: only v1 bodies name it.
            body_model: model
                .filter(|_| paths::deployment(original_path).is_none() && !paths::is_realtime(original_path))
                .and_then(|m| backend.deployments.get(m))
                .map(String::as_str),
            lookup_blocked_ms,
            clean_at_start,
        })
    }

    /// An attempt's fallback (none for pinned stored state), how long a
    /// stored-state lookup is blocked when no backend is left, and whether
    /// its own backend is clean, from the health table as it is now.
    fn plan_fallback<'a>(
        &'a self,
        store: &dyn SharedStore,
        clock: &dyn Clock,
        backend_index: usize,
        model: Option<&str>,
        tried_indices: &[usize],
        request: &AttemptRequest<'_>,
    ) -> (Option<&'a str>, Option<u64>, bool) {
        let AttemptRequest { stored, estimate, tier, .. } = *request;
        let now = clock.now_ms();
        let health = self.read_health(store);
        let cb = self.config.circuit_breaker;
        // Fallbacks read the rotation without advancing it: an attempt that
        // succeeds must not shift the round robin.
        let mut peek = |g: &Group| store::read_counter(store, &g.counter_key);
        // Failover stays among the backends serving the request's model.
        let mut excluded = self.not_serving(model);
        excluded.extend_from_slice(tried_indices);
        let fit = self.fit(&health, estimate.unwrap_or(1), tier, now);
        let pick = self.pool.pick(&health, &cb, now, &excluded, &fit, &mut peek, None);
        let fallback_cluster = match pick {
            // Stored state lives on one backend: nowhere else to go.
            _ if stored == Stored::Pinned => None,
            Pick::Backend(i) => self.config.backends.get(i).map(|b| b.cluster.as_str()),
            Pick::NoneUntil(_) => None,
        };
        let lookup_blocked_ms = match pick {
            Pick::NoneUntil(until) if stored == Stored::Lookup && until > now => Some(until - now),
            _ => None,
        };
        (fallback_cluster, lookup_blocked_ms, health.get(backend_index).is_clean())
    }

    /// Attempt role: the answer of the last backend a stored-state lookup
    /// could ask. "Not found" while a backend that may hold the state is out
    /// means "try later" (429 with its wait), not "it does not exist".
    pub fn lookup_verdict(&self, plan_blocked_ms: Option<u64>, status: u32) -> Option<LocalReply> {
        let blocked = plan_blocked_ms?;
        matches!(status, 400 | 404).then(|| LocalReply::owner_busy(blocked))
    }

    /// Attempt role, response headers: record what the answer says about the
    /// backend and decide whether Envoy should retry elsewhere.
    pub fn on_attempt_response(
        &self,
        store: &dyn SharedStore,
        clock: &dyn Clock,
        metrics: &dyn Metrics,
        attempt: &AttemptRef,
        answer: &AttemptAnswer<'_>,
    ) -> ResponseDecision {
        let AttemptAnswer { status, retry_after_ms, retry_after, quota } = *answer;
        let AttemptRef { backend, has_fallback, stored, estimate, tier } = *attempt;
        let now = clock.now_ms();
        let cb = self.config.circuit_breaker;
        let name = self.names.get(backend).map_or("", String::as_str);
        // A backend that refuses its own configured key (rotated, wrong) is
        // broken like a 5xx one. With no key configured the credential is
        // the client's, and so is the 401.
        let keyed = self.config.backends.get(backend).is_some_and(|b| b.api_key.is_some());
        let key_refused = keyed && matches!(status, 401 | 403);
        if key_refused {
            log::warn!("backend {name} refused its configured key ({status})");
        }
        // A 404 (deployment or stored object missing here) may be served by
        // another backend; it says nothing about this backend's health, and
        // a client can cause it, so it never counts as a failure.
        // Looking for the holder of stored state, a 400 is how a backend says
        // it does not know a `previous_response_id`.
        let retriable = u16::try_from(status).is_ok_and(|s| self.config.retry_on.contains(&s))
            || key_refused
            || status == 404
            || (stored == Stored::Lookup && status == 400);
        let class = metrics::status_class(status);
        metrics.add(&metrics::name(metrics::UPSTREAM_REQUESTS, &[("backend", name), ("class", &class)]), 1);
        let learn = self.config.quota_aware && !quota.is_empty();
        let window = self.config.headroom_window_ms;
        // With requests and tokens left, a 429 refused this request's size:
        // the headroom it reports keeps requests of that size away, and the
        // backend stays in rotation for smaller ones.
        let sized_out = status == 429 && self.config.quota_aware && quota.refused_for_size();
        let table = if status == 429 {
            let kind = if sized_out { metrics::SIZED_OUT_EVENTS } else { metrics::THROTTLE_EVENTS };
            metrics.add(&metrics::name(kind, &[("backend", name)]), 1);
            let wait = self.retry_after.wait_ms(retry_after_ms, retry_after, clock.wall_ms());
            self.update_health(store, |t| match t.get_mut(backend) {
                Some(h) => {
                    if learn {
                        h.headroom.learn(&quota, now, window);
                    }
                    if sized_out {
                        h.headroom.refused(now, wait, estimate);
                    } else {
                        h.record_throttle(now, wait);
                    }
                    true
                }
                None => false,
            })
        } else if status >= 500 || key_refused {
            self.record_failure(store, metrics, now, backend)
        } else if learn {
            self.update_health(store, |t| match t.get_mut(backend) {
                Some(h) => {
                    h.headroom.learn(&quota, now, window);
                    true
                }
                None => false,
            })
        } else {
            None
        };
        let healthy = !(status == 429 || status >= 500 || key_refused);
        // A 429 carries the wait until any backend frees even when a retry
        // is asked for: should Envoy decline the retry, the client still
        // gets an honest retry-after (the next attempt counts the failover).
        // Pinned to its owner, the request can only wait for that backend.
        let retry_after_ms = (status == 429).then(|| {
            let table = table.unwrap_or_else(|| self.read_health(store));
            // When a backend could take this request again: its throttle or
            // circuit, and its headroom for the request's size.
            let fit = self.fit(&table, estimate.unwrap_or(1), tier, now);
            let until = |i: usize| {
                let health = match table.get(i).availability(now, &cb) {
                    Availability::Unavailable { until_ms } => until_ms,
                    _ => now,
                };
                match fit(i) {
                    Fit::Short { at_ms: 0 } => u64::MAX,
                    Fit::Short { at_ms } => health.max(at_ms),
                    _ => health,
                }
            };
            let soonest =
                if stored == Stored::Pinned { Some(until(backend)) } else { (0..self.names.len()).map(until).min() };
            soonest
                .filter(|&u| u != u64::MAX)
                .map_or(self.config.default_retry_after_ms, |u| u.saturating_sub(now))
                .max(1)
        });
        ResponseDecision { retry: retriable && has_fallback, retry_after_ms, healthy }
    }

    /// Attempt role: a healthy answer arrived whole. Healthy answers are the
    /// common case: shared data is written only when a failure run or an
    /// open circuit needs clearing. (Success counts at the end, not at the
    /// headers: a backend that breaks off its answers is not healthy.)
    ///
    /// An attempt that started on a clean backend skips even the read: a
    /// failure another request recorded meanwhile is then cleared by the
    /// next success instead of this one.
    pub fn on_answer_complete(&self, store: &dyn SharedStore, backend: usize, clean_at_start: bool) {
        if !clean_at_start && !self.read_health(store).get(backend).is_clean() {
            self.update_health(store, |t| match t.get_mut(backend) {
                Some(h) if !h.is_clean() => {
                    h.record_success();
                    true
                }
                _ => false,
            });
        }
    }

    /// Attempt role: a stream whose head the attempt role held failed before
    /// its first content (an error event, or it ended without any). Counted
    /// like the status it stands for: a quota error throttles the backend
    /// for the default wait, any other is a failure towards its circuit.
    /// Returns whether Envoy should retry (another backend can take it).
    pub fn on_stream_failed_before_content(
        &self,
        store: &dyn SharedStore,
        clock: &dyn Clock,
        metrics: &dyn Metrics,
        attempt: &AttemptRef,
        rate_limited: bool,
    ) -> bool {
        let now = clock.now_ms();
        let name = self.names.get(attempt.backend).map_or("", String::as_str);
        let reason = if rate_limited { "rate_limited" } else { "error" };
        metrics.add(&metrics::name(metrics::FIRST_TOKEN_FAILOVERS, &[("backend", name), ("reason", reason)]), 1);
        if rate_limited {
            metrics.add(&metrics::name(metrics::THROTTLE_EVENTS, &[("backend", name)]), 1);
            let wait = self.config.default_retry_after_ms;
            self.update_health(store, |t| match t.get_mut(attempt.backend) {
                Some(h) => {
                    h.record_throttle(now, wait);
                    true
                }
                None => false,
            });
        } else {
            self.record_failure(store, metrics, now, attempt.backend);
        }
        log::warn!("backend {name}: the stream failed before its first content ({reason}); failing over");
        attempt.has_fallback
    }

    /// Attempt role: the attempt ended without response headers. Refused,
    /// reset or timed-out attempts count as failures for the circuit
    /// breaker; one the client abandoned says nothing about the backend and
    /// gives back a half-open probe it may have held, so another request
    /// can probe at once.
    pub fn on_attempt_lost(
        &self,
        store: &dyn SharedStore,
        clock: &dyn Clock,
        metrics: &dyn Metrics,
        backend: usize,
        why: LostAttempt,
    ) {
        let name = self.names.get(backend).map_or("", String::as_str);
        let now = clock.now_ms();
        match why {
            LostAttempt::Backend => {
                metrics.add(&metrics::name(metrics::UPSTREAM_REQUESTS, &[("backend", name), ("class", "reset")]), 1);
                self.record_failure(store, metrics, now, backend);
            }
            LostAttempt::ClientSide => {
                let labels = [("backend", name), ("class", "client_gone")];
                metrics.add(&metrics::name(metrics::UPSTREAM_REQUESTS, &labels), 1);
                let cb = self.config.circuit_breaker;
                self.update_health(store, |t| match t.get_mut(backend) {
                    Some(h) if h.consecutive_failures >= cb.consecutive_failures && h.probe_until_ms > now => {
                        h.probe_until_ms = 0;
                        true
                    }
                    _ => false,
                });
            }
        }
    }

    /// Attempt role: an answer that had started ended before its last byte.
    /// The client got a broken answer either way (Envoy resets its stream);
    /// the backend is charged with a failure unless the client left first.
    pub fn on_answer_cut(
        &self,
        store: &dyn SharedStore,
        clock: &dyn Clock,
        metrics: &dyn Metrics,
        backend: usize,
        why: LostAttempt,
    ) {
        let name = self.names.get(backend).map_or("", String::as_str);
        match why {
            LostAttempt::Backend => {
                metrics.add(&metrics::name(metrics::ANSWERS_CUT, &[("backend", name), ("class", "backend")]), 1);
                log::warn!("backend {name} broke off an answer");
                self.record_failure(store, metrics, clock.now_ms(), backend);
            }
            LostAttempt::ClientSide => {
                metrics.add(&metrics::name(metrics::ANSWERS_CUT, &[("backend", name), ("class", "client_gone")]), 1);
            }
        }
    }

    /// Request role: Envoy answered "no healthy upstream" for `cluster` (its
    /// host name does not resolve, so no attempt ever ran). The backend
    /// leaves rotation at once, like an open circuit, until a probe finds a
    /// host again.
    pub fn on_no_healthy_upstream(
        &self,
        store: &dyn SharedStore,
        clock: &dyn Clock,
        metrics: &dyn Metrics,
        cluster: &str,
    ) {
        let Some(backend) = self.config.backend_by_cluster(cluster) else { return };
        let name = self.names.get(backend).map_or("", String::as_str);
        metrics.add(&metrics::name(metrics::UPSTREAM_REQUESTS, &[("backend", name), ("class", "no_host")]), 1);
        let (now, cb) = (clock.now_ms(), self.config.circuit_breaker);
        let mut opened = false;
        self.update_health(store, |t| match t.get_mut(backend) {
            Some(h) => {
                opened = h.consecutive_failures < cb.consecutive_failures;
                h.record_unreachable(now, &cb);
                true
            }
            None => false,
        });
        if opened {
            metrics.add(&metrics::name(metrics::CIRCUIT_OPENS, &[("backend", name)]), 1);
        }
        log::warn!("backend {name}: Envoy has no host for it (does its name resolve?); out of rotation");
    }

    fn record_failure(
        &self,
        store: &dyn SharedStore,
        metrics: &dyn Metrics,
        now: u64,
        backend: usize,
    ) -> Option<HealthTable> {
        let cb = self.config.circuit_breaker;
        let mut opened = false;
        let table = self.update_health(store, |t| match t.get_mut(backend) {
            Some(h) => {
                let was_open = h.consecutive_failures >= cb.consecutive_failures;
                h.record_failure(now, &cb);
                opened = !was_open && h.consecutive_failures >= cb.consecutive_failures;
                true
            }
            None => false,
        });
        if opened {
            let name = self.names.get(backend).map_or("", String::as_str);
            metrics.add(&metrics::name(metrics::CIRCUIT_OPENS, &[("backend", name)]), 1);
            log::warn!("circuit opened for backend {name}");
        }
        table
    }

    /// Gauges of what is out right now; refreshed periodically.
    pub fn report_health(&self, store: &dyn SharedStore, clock: &dyn Clock, metrics: &dyn Metrics) {
        let now = clock.now_ms();
        let cb = self.config.circuit_breaker;
        let table = self.read_health(store);
        for (i, name) in self.names.iter().enumerate() {
            let h = table.get(i);
            let throttled = u64::from(h.throttled_until_ms > now);
            let open = u64::from(h.consecutive_failures >= cb.consecutive_failures);
            metrics.set(&metrics::name(metrics::BACKEND_THROTTLED, &[("backend", name)]), throttled);
            metrics.set(&metrics::name(metrics::BACKEND_CIRCUIT_OPEN, &[("backend", name)]), open);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Keys;
    use crate::testing::Recorder;
    use crate::testing::{ManualClock, MemoryStore};

    fn gateway(extra: &str) -> Gateway {
        let json = format!(
            r#"{{"backends":[
                {{"name":"east","url":"http://127.0.0.1:1","api_key":"k-east","deployments":{{"gpt-4o":"gpt-4o-ptu"}}}},
                {{"name":"west","url":"http://127.0.0.1:2","api_key":"k-west"}},
                {{"name":"paygo","url":"https://paygo.example.com","priority":2}}
            ],"api_version":"2024-10-21","circuit_breaker":{{"consecutive_failures":2,"open_s":30}}{extra}}}"#
        );
        Gateway::new(Config::parse(json.as_bytes(), Keys::NamesOnly).unwrap())
    }

    const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions";

    fn gateway_with(json: &str) -> Gateway {
        Gateway::new(Config::parse(json.as_bytes(), Keys::NamesOnly).unwrap())
    }

    fn req<'h>(cluster: &'h str, tried: Option<&'h str>) -> AttemptRequest<'h> {
        AttemptRequest {
            cluster,
            original_path: CHAT,
            tried,
            stored: Stored::No,
            model: None,
            estimate: None,
            tier: Tier::High,
            first_attempt: None,
        }
    }

    fn at(backend: usize, has_fallback: bool) -> AttemptRef {
        AttemptRef { backend, has_fallback, stored: Stored::No, estimate: None, tier: Tier::High }
    }

    /// The first pick's cluster.
    fn forward(g: &Gateway, s: &MemoryStore, c: &ManualClock) -> String {
        match g.pick_first(s, c, None, 1, Tier::High).0 {
            Ok(backend) => backend.cluster.clone(),
            Err(reply) => panic!("expected a backend, got {reply:?}"),
        }
    }

    #[test]
    fn requests_rotate_within_the_first_priority() {
        let (g, s, c) = (gateway(""), MemoryStore::default(), ManualClock::at(1_000));
        let clusters: Vec<String> = (0..4).map(|_| forward(&g, &s, &c)).collect();
        assert_eq!(clusters, ["spillway_east", "spillway_west", "spillway_east", "spillway_west"]);
    }

    #[test]
    fn attempt_rewrites_for_its_backend_and_names_a_different_fallback() {
        let (g, s, c) = (gateway(""), MemoryStore::default(), ManualClock::at(0));
        let plan = g.plan_attempt(&s, &c, &Recorder::default(), &req("spillway_east", None)).unwrap();
        assert_eq!(plan.path, "/openai/deployments/gpt-4o-ptu/chat/completions");
        assert_eq!(plan.authority, "127.0.0.1:1");
        assert_eq!(plan.api_key.unwrap().expose(), "k-east");
        assert_eq!((plan.tried.as_str(), plan.attempts), ("east", 1));
        assert_eq!(plan.fallback_cluster, Some("spillway_west"));

        let second = g.plan_attempt(&s, &c, &Recorder::default(), &req("spillway_west", Some(&plan.tried))).unwrap();
        assert_eq!(second.path, CHAT);
        assert_eq!((second.tried.as_str(), second.attempts), ("east,west", 2));
        assert_eq!(second.fallback_cluster, Some("spillway_paygo"));

        let third = g.plan_attempt(&s, &c, &Recorder::default(), &req("spillway_paygo", Some(&second.tried))).unwrap();
        assert_eq!(third.api_key, None);
        assert_eq!(third.authority, "paygo.example.com");
        assert_eq!(third.fallback_cluster, None);
        assert!(g.plan_attempt(&s, &c, &Recorder::default(), &req("some_other_cluster", None)).is_none());
    }

    #[test]
    fn the_first_attempt_plan_is_what_the_attempt_would_work_out() {
        let (g, s, c, m) = (gateway(""), MemoryStore::default(), ManualClock::at(10_000), Recorder::default());
        let answer = |status, retry_after| AttemptAnswer { status, retry_after, ..AttemptAnswer::default() };
        let mut seen = Vec::new();
        for round in 0..9 {
            match round {
                // West throttled: from east the fallback is the next priority.
                3 => {
                    g.on_attempt_response(&s, &c, &m, &at(1, true), &answer(429, Some("20")));
                }
                // East one failure short of open: not clean.
                6 => {
                    c.advance(30_000);
                    g.on_attempt_response(&s, &c, &m, &at(0, true), &answer(500, None));
                }
                _ => {}
            }
            let pick = g.pick(&s, c.now_ms(), None, 1, Tier::High);
            let cluster = pick.picked.unwrap().cluster.clone();
            let plan = pick.first_attempt.unwrap();
            assert_eq!(plan.cluster, cluster);
            let encoded = plan.encode();
            assert_eq!(FirstAttempt::decode(&encoded), Some(plan.clone()));
            let fresh = g.plan_attempt(&s, &c, &m, &req(&cluster, None)).unwrap();
            let planned =
                g.plan_attempt(&s, &c, &m, &AttemptRequest { first_attempt: Some(&encoded), ..req(&cluster, None) });
            let planned = planned.unwrap();
            assert_eq!(
                (planned.fallback_cluster, planned.clean_at_start),
                (fresh.fallback_cluster, fresh.clean_at_start)
            );
            assert_eq!(plan.fallback.as_deref(), fresh.fallback_cluster);
            seen.push((cluster, plan.fallback, plan.clean));
        }
        let s = |x: &str| Some(x.to_string());
        assert_eq!(seen[0], ("spillway_east".to_string(), s("spillway_west"), true));
        assert_eq!(seen[1], ("spillway_west".to_string(), s("spillway_east"), true));
        assert_eq!(seen[3], ("spillway_east".to_string(), s("spillway_paygo"), true));
        assert!(seen.iter().any(|(cluster, _, clean)| cluster == "spillway_east" && !clean), "{seen:?}");
    }

    #[test]
    fn a_first_attempt_plan_counts_only_for_its_own_first_attempt() {
        let (g, s, c, m) = (gateway(""), MemoryStore::default(), ManualClock::at(10_000), Recorder::default());
        // Made when west was free; west is throttled since.
        let plan =
            FirstAttempt { cluster: "spillway_east".into(), fallback: Some("spillway_west".into()), clean: true }
                .encode();
        g.on_attempt_response(
            &s,
            &c,
            &m,
            &at(1, true),
            &AttemptAnswer { status: 429, retry_after: Some("20"), ..AttemptAnswer::default() },
        );
        let with =
            |cluster, tried, stored| AttemptRequest { first_attempt: Some(&plan), stored, ..req(cluster, tried) };
        let fallback = |r: &AttemptRequest| g.plan_attempt(&s, &c, &m, r).unwrap().fallback_cluster;
        // Its own first attempt takes it as it is.
        assert_eq!(fallback(&with("spillway_east", None, Stored::No)), Some("spillway_west"));
        // Another cluster, a retry, or stored state: planned afresh.
        assert_eq!(fallback(&with("spillway_paygo", None, Stored::No)), Some("spillway_east"));
        assert_eq!(fallback(&with("spillway_east", Some("paygo"), Stored::No)), None);
        assert_eq!(fallback(&with("spillway_east", None, Stored::Lookup)), Some("spillway_paygo"));
        // A plan that does not parse is no plan.
        for bad in ["", "spillway_east", "spillway_east - 2", "spillway_east  1", "a b 1 x"] {
            assert_eq!(FirstAttempt::decode(bad), None, "{bad:?}");
        }
        let unknown = "spillway_east spillway_gone 1";
        let r = AttemptRequest { first_attempt: Some(unknown), ..req("spillway_east", None) };
        assert_eq!(fallback(&r), None);
    }

    #[test]
    fn a_429_throttles_the_backend_and_retries_elsewhere() {
        let (g, s, c) = (gateway(""), MemoryStore::default(), ManualClock::at(10_000));
        let d = g.on_attempt_response(
            &s,
            &c,
            &Recorder::default(),
            &at(0, true),
            &AttemptAnswer { status: 429, retry_after_ms: None, retry_after: Some("20"), ..AttemptAnswer::default() },
        );
        // West is free now: should Envoy decline the retry, the client may come back at once.
        assert_eq!(d, ResponseDecision { retry: true, retry_after_ms: Some(1), healthy: false });
        // East is now skipped by every new request until its deadline.
        for _ in 0..4 {
            assert_eq!(forward(&g, &s, &c), "spillway_west");
        }
        c.advance(20_000);
        let clusters: Vec<String> = (0..2).map(|_| forward(&g, &s, &c)).collect();
        assert!(clusters.contains(&"spillway_east".to_string()));
    }

    #[test]
    fn last_429_reaches_the_client_with_the_soonest_wait() {
        let (g, s, c) = (gateway(""), MemoryStore::default(), ManualClock::at(0));
        let throttle = |attempt: AttemptRef, retry_after_ms, retry_after| {
            let answer = AttemptAnswer { status: 429, retry_after_ms, retry_after, ..AttemptAnswer::default() };
            g.on_attempt_response(&s, &c, &Recorder::default(), &attempt, &answer)
        };
        throttle(at(0, true), Some("30000"), None);
        throttle(at(1, true), None, Some("8"));
        let d = throttle(at(2, false), None, Some("60"));
        assert_eq!(d, ResponseDecision { retry: false, retry_after_ms: Some(8_000), healthy: false });
        // A new request is answered locally with the same soonest wait.
        c.advance(500);
        let r = g.pick_first(&s, &c, None, 1, Tier::High).0.unwrap_err();
        assert_eq!(r.status, 429);
        assert!(r.headers.contains(&("retry-after", "8".to_string())), "{:?}", r.headers);
        assert!(r.headers.contains(&("retry-after-ms", "7500".to_string())));
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["error"]["code"], "429");
    }

    #[test]
    fn a_backend_refusing_its_key_fails_over_and_counts_as_broken() {
        let (g, s, c, m) = (gateway(""), MemoryStore::default(), ManualClock::at(0), Recorder::default());
        let answer =
            |status| AttemptAnswer { status, retry_after_ms: None, retry_after: None, ..AttemptAnswer::default() };
        assert!(g.on_attempt_response(&s, &c, &m, &at(0, true), &answer(401)).retry);
        assert!(g.on_attempt_response(&s, &c, &m, &at(0, true), &answer(403)).retry);
        // consecutive_failures = 2: east is out.
        assert_eq!(m.get("spillway_circuit_opens_total.backend.east"), 1);
        // paygo has no key: its 401 is the client's own, passed back, not a failure.
        assert!(!g.on_attempt_response(&s, &c, &m, &at(2, false), &answer(401)).retry);
        g.on_attempt_response(&s, &c, &m, &at(2, false), &answer(401));
        assert_eq!(m.get("spillway_circuit_opens_total.backend.paygo"), 0);
    }

    #[test]
    fn a_404_fails_over_without_hurting_the_backend() {
        let (g, s, c, m) = (gateway(""), MemoryStore::default(), ManualClock::at(0), Recorder::default());
        let answer = AttemptAnswer { status: 404, retry_after_ms: None, retry_after: None, ..AttemptAnswer::default() };
        for _ in 0..3 {
            assert!(g.on_attempt_response(&s, &c, &m, &at(0, true), &answer).retry);
        }
        assert!(!g.on_attempt_response(&s, &c, &m, &at(0, false), &answer).retry);
        assert_eq!(m.get("spillway_circuit_opens_total.backend.east"), 0);
        assert!(g.read_health(&s).get(0).is_clean());
    }

    #[test]
    fn status_not_in_retry_on_is_not_retried() {
        let (g, s, c) = (gateway(r#","retry_on":[429]"#), MemoryStore::default(), ManualClock::at(0));
        let d = g.on_attempt_response(
            &s,
            &c,
            &Recorder::default(),
            &at(0, true),
            &AttemptAnswer { status: 500, retry_after_ms: None, retry_after: None, ..AttemptAnswer::default() },
        );
        assert!(!d.retry);
        let d = g.on_attempt_response(
            &s,
            &c,
            &Recorder::default(),
            &at(0, true),
            &AttemptAnswer { status: 400, retry_after_ms: None, retry_after: None, ..AttemptAnswer::default() },
        );
        assert_eq!(d, ResponseDecision { retry: false, retry_after_ms: None, healthy: true });
    }

    #[test]
    fn failures_open_the_circuit_and_a_probe_closes_it() {
        let (g, s, c) = (gateway(""), MemoryStore::default(), ManualClock::at(0));
        assert!(
            g.on_attempt_response(
                &s,
                &c,
                &Recorder::default(),
                &at(0, true),
                &AttemptAnswer { status: 503, retry_after_ms: None, retry_after: None, ..AttemptAnswer::default() }
            )
            .retry
        );
        g.on_attempt_lost(&s, &c, &Recorder::default(), 0, LostAttempt::Backend);
        for _ in 0..4 {
            assert_eq!(forward(&g, &s, &c), "spillway_west");
        }
        c.advance(30_000);
        // Exactly one request probes east; the others keep going west.
        let clusters: Vec<String> = (0..4).map(|_| forward(&g, &s, &c)).collect();
        assert_eq!(clusters.iter().filter(|c| *c == "spillway_east").count(), 1, "{clusters:?}");
        // The probe answers 200, to the last byte: east is back in rotation.
        let d = g.on_attempt_response(
            &s,
            &c,
            &Recorder::default(),
            &at(0, false),
            &AttemptAnswer { status: 200, retry_after_ms: None, retry_after: None, ..AttemptAnswer::default() },
        );
        assert!(d.healthy);
        // The probe started on a backend that was not clean.
        g.on_answer_complete(&s, 0, false);
        let clusters: Vec<String> = (0..4).map(|_| forward(&g, &s, &c)).collect();
        assert_eq!(clusters.iter().filter(|c| *c == "spillway_east").count(), 2, "{clusters:?}");
    }

    #[test]
    fn an_attempt_knows_whether_its_backend_was_clean_when_it_started() {
        let (g, s, c, m) = (gateway(""), MemoryStore::default(), ManualClock::at(0), Recorder::default());
        assert!(g.plan_attempt(&s, &c, &m, &req("spillway_east", None)).unwrap().clean_at_start);
        g.on_attempt_response(
            &s,
            &c,
            &m,
            &at(0, true),
            &AttemptAnswer { status: 503, retry_after_ms: None, retry_after: None, ..AttemptAnswer::default() },
        );
        let plan = g.plan_attempt(&s, &c, &m, &req("spillway_east", None)).unwrap();
        assert!(!plan.clean_at_start, "a failure run is not clean");
        // Its success clears the run, so the next attempt starts clean.
        g.on_answer_complete(&s, plan.backend, plan.clean_at_start);
        assert!(g.plan_attempt(&s, &c, &m, &req("spillway_east", None)).unwrap().clean_at_start);
    }

    #[test]
    fn attempt_metrics() {
        let (g, s, c, m) = (gateway(""), MemoryStore::default(), ManualClock::at(0), Recorder::default());
        let answer =
            |status| AttemptAnswer { status, retry_after_ms: None, retry_after: Some("5"), ..AttemptAnswer::default() };
        // One request: east 429, west 503, paygo 200; failovers count when
        // the next attempt starts.
        let first = g.plan_attempt(&s, &c, &m, &req("spillway_east", None)).unwrap();
        g.on_attempt_response(&s, &c, &m, &at(0, true), &answer(429));
        assert_eq!(m.get("spillway_failovers_total.backend.east"), 0);
        let second = g.plan_attempt(&s, &c, &m, &req("spillway_west", Some(&first.tried))).unwrap();
        g.on_attempt_response(&s, &c, &m, &at(1, true), &answer(503));
        g.plan_attempt(&s, &c, &m, &req("spillway_paygo", Some(&second.tried))).unwrap();
        g.on_attempt_response(&s, &c, &m, &at(2, false), &answer(200));
        // Another request's attempt on west is lost; a retry on the same
        // backend is not a failover.
        let lost = g.plan_attempt(&s, &c, &m, &req("spillway_west", None)).unwrap();
        g.on_attempt_lost(&s, &c, &m, 1, LostAttempt::Backend);
        g.plan_attempt(&s, &c, &m, &req("spillway_west", Some(&lost.tried))).unwrap();
        assert_eq!(m.get("spillway_upstream_requests_total.backend.east.class.4xx"), 1);
        assert_eq!(m.get("spillway_upstream_requests_total.backend.west.class.5xx"), 1);
        assert_eq!(m.get("spillway_upstream_requests_total.backend.west.class.reset"), 1);
        assert_eq!(m.get("spillway_upstream_requests_total.backend.paygo.class.2xx"), 1);
        assert_eq!(m.get("spillway_throttle_events_total.backend.east"), 1);
        assert_eq!(m.get("spillway_failovers_total.backend.east"), 1);
        assert_eq!(m.get("spillway_failovers_total.backend.west"), 1);
        // consecutive_failures = 2: the second west failure opened the circuit, once.
        assert_eq!(m.get("spillway_circuit_opens_total.backend.west"), 1);
        g.on_attempt_lost(&s, &c, &m, 1, LostAttempt::Backend);
        assert_eq!(m.get("spillway_circuit_opens_total.backend.west"), 1);
        g.report_health(&s, &c, &m);
        assert_eq!(m.get("spillway_backend_throttled.backend.east"), 1);
        assert_eq!(m.get("spillway_backend_circuit_open.backend.west"), 1);
        assert_eq!(m.get("spillway_backend_circuit_open.backend.east"), 0);
    }

    #[test]
    fn clients_that_give_up_open_no_circuit_and_free_the_probe() {
        let (g, s, c, m) = (gateway(""), MemoryStore::default(), ManualClock::at(0), Recorder::default());
        for _ in 0..10 {
            g.on_attempt_lost(&s, &c, &m, 0, LostAttempt::ClientSide);
        }
        assert!(g.read_health(&s).get(0).is_clean());
        assert_eq!(m.get("spillway_upstream_requests_total.backend.east.class.client_gone"), 10);
        // East's circuit opens (two real failures); after the open period one
        // request takes the probe, and its client leaves before an answer.
        g.on_attempt_lost(&s, &c, &m, 0, LostAttempt::Backend);
        g.on_attempt_lost(&s, &c, &m, 0, LostAttempt::Backend);
        c.advance(30_000);
        let probes = (0..4).map(|_| forward(&g, &s, &c)).filter(|c| c == "spillway_east").count();
        assert_eq!(probes, 1);
        g.on_attempt_lost(&s, &c, &m, 0, LostAttempt::ClientSide);
        // The probe is free again: the next request may take it.
        let probes = (0..4).map(|_| forward(&g, &s, &c)).filter(|c| c == "spillway_east").count();
        assert_eq!(probes, 1);
    }

    #[test]
    fn pass_through_attempts_get_the_clients_credential_back_or_none() {
        use crate::credentials::{stash, ClientCredential};
        let (g, s) = (gateway(""), MemoryStore::default());
        assert!(g.stashes_client_credentials());
        let own = ClientCredential { api_key: None, authorization: Some(b"Bearer client".to_vec()) };
        let header = stash(&s, "tok", &own).unwrap();
        assert_eq!(g.pass_through_credential(&s, Some(&header)), PassThrough::Restore(own));
        assert_eq!(g.pass_through_credential(&s, Some("1.forged")), PassThrough::Strip);
        assert_eq!(g.pass_through_credential(&s, None), PassThrough::Strip);
        // With gateway keys nothing is stashed; with one kind of backend nothing is rewritten.
        let with_clients = gateway(r#","clients":[{"name":"c","key":"client-key-1"}]"#);
        assert!(!with_clients.stashes_client_credentials());
        let all_pass_through = Gateway::new(
            Config::parse(
                br#"{"backends":[{"name":"a","url":"http://x"},{"name":"b","url":"http://y"}]}"#,
                Keys::NamesOnly,
            )
            .unwrap(),
        );
        assert_eq!(all_pass_through.pass_through_credential(&s, None), PassThrough::Leave);
    }

    #[test]
    fn an_answer_the_backend_breaks_off_counts_against_it() {
        let (g, s, c, m) = (gateway(""), MemoryStore::default(), ManualClock::at(0), Recorder::default());
        g.on_answer_cut(&s, &c, &m, 1, LostAttempt::ClientSide);
        assert!(g.read_health(&s).get(1).is_clean());
        g.on_answer_cut(&s, &c, &m, 1, LostAttempt::Backend);
        g.on_answer_cut(&s, &c, &m, 1, LostAttempt::Backend);
        assert_eq!(m.get("spillway_circuit_opens_total.backend.west"), 1);
        assert_eq!(m.get("spillway_answers_cut_total.backend.west.class.backend"), 2);
        assert_eq!(m.get("spillway_answers_cut_total.backend.west.class.client_gone"), 1);
    }

    #[test]
    fn a_backend_without_hosts_leaves_rotation_at_once() {
        let (g, s, c, m) = (gateway(""), MemoryStore::default(), ManualClock::at(0), Recorder::default());
        g.on_no_healthy_upstream(&s, &c, &m, "spillway_east");
        assert_eq!(m.get("spillway_circuit_opens_total.backend.east"), 1);
        assert_eq!(m.get("spillway_upstream_requests_total.backend.east.class.no_host"), 1);
        for _ in 0..4 {
            assert_eq!(forward(&g, &s, &c), "spillway_west");
        }
        g.on_no_healthy_upstream(&s, &c, &m, "not_ours");
        assert_eq!(m.0.borrow().len(), 2);
    }

    #[test]
    fn both_roles_must_serve_the_same_backends() {
        let s = MemoryStore::default();
        let g = gateway("");
        assert!(g.check_backend_set(&s).is_ok(), "nothing published yet");
        g.publish_backend_set(&s);
        assert!(g.check_backend_set(&s).is_ok());
        let reordered = Gateway::new(
            Config::parse(
                br#"{"backends":[{"name":"west","url":"http://b"},{"name":"paygo","url":"http://c"},{"name":"east","url":"http://a"}]}"#,
                Keys::NamesOnly,
            )
            .unwrap(),
        );
        assert!(reordered.check_backend_set(&s).is_ok(), "order and settings may change");
        let other = Gateway::new(
            Config::parse(
                br#"{"backends":[{"name":"east","url":"http://a"},{"name":"north","url":"http://n"}]}"#,
                Keys::NamesOnly,
            )
            .unwrap(),
        );
        let e = other.check_backend_set(&s).unwrap_err().to_string();
        assert!(e.contains("[east,north]") && e.contains("[east,paygo,west]"), "{e}");
    }

    #[test]
    fn stored_state_is_pinned_to_its_owner_or_looked_up() {
        let (g, s, c, m) = (gateway(""), MemoryStore::default(), ManualClock::at(0), Recorder::default());
        assert!(g.owner_of(&s, &c, "resp_1").unwrap().is_none(), "unknown: look it up");
        affinity::remember(&s, "resp_1", "west", 0);
        assert_eq!(g.owner_of(&s, &c, "resp_1").unwrap().unwrap().name, "west");
        // Pinned: no fallback, and a 429 waits for the owner only.
        let pinned = AttemptRequest {
            cluster: "spillway_west",
            original_path: CHAT,
            tried: None,
            stored: Stored::Pinned,
            model: None,
            estimate: None,
            tier: Tier::High,
            first_attempt: None,
        };
        assert_eq!(g.plan_attempt(&s, &c, &m, &pinned).unwrap().fallback_cluster, None);
        let answer =
            AttemptAnswer { status: 429, retry_after_ms: None, retry_after: Some("20"), ..AttemptAnswer::default() };
        let d = g.on_attempt_response(
            &s,
            &c,
            &m,
            &AttemptRef { backend: 1, has_fallback: false, stored: Stored::Pinned, estimate: None, tier: Tier::High },
            &answer,
        );
        assert_eq!(d.retry_after_ms, Some(20_000));
        // While the owner is out, the request is answered locally with its wait.
        let busy = g.owner_of(&s, &c, "resp_1").unwrap_err();
        assert_eq!(busy.status, 429);
        assert!(busy.headers.contains(&("retry-after", "20".to_string())));
        // Looking up: a 400 (unknown previous_response_id) fails over; otherwise it does not.
        let bad = AttemptAnswer { status: 400, retry_after_ms: None, retry_after: None, ..AttemptAnswer::default() };
        let lookup =
            AttemptRef { backend: 0, has_fallback: true, stored: Stored::Lookup, estimate: None, tier: Tier::High };
        assert!(g.on_attempt_response(&s, &c, &m, &lookup, &bad).retry);
        assert!(!g.on_attempt_response(&s, &c, &m, &at(0, true), &bad).retry);
    }

    #[test]
    fn requests_go_only_to_backends_serving_their_model() {
        let (s, c, m) = (MemoryStore::default(), ManualClock::at(0), Recorder::default());
        let g = gateway_with(
            r#"{"backends":[
                {"name":"east","url":"http://127.0.0.1:1","models":["gpt-4o","gpt-4o-mini"]},
                {"name":"west","url":"http://127.0.0.1:2","models":["gpt-4o-mini"]},
                {"name":"any","url":"http://127.0.0.1:3","priority":2}]}"#,
        );
        let first = |model| {
            (0..4).map(|_| g.pick_first(&s, &c, Some(model), 1, Tier::High).0.unwrap().name.clone()).collect::<Vec<_>>()
        };
        assert_eq!(first("gpt-4o"), ["east"; 4]);
        assert!(first("gpt-4o-mini").contains(&"west".to_string()));
        assert_eq!(first("dall-e-3"), ["any"; 4], "a backend without a list serves everything");
        // Failover stays among them: after east, only "any" (priority 2) serves gpt-4o.
        let req = AttemptRequest {
            cluster: "spillway_east",
            original_path: CHAT,
            tried: None,
            stored: Stored::No,
            model: Some("gpt-4o"),
            estimate: None,
            tier: Tier::High,
            first_attempt: None,
        };
        assert_eq!(g.plan_attempt(&s, &c, &m, &req).unwrap().fallback_cluster, Some("spillway_any"));
        let only_listed =
            gateway_with(r#"{"backends":[{"name":"east","url":"http://127.0.0.1:1","models":["gpt-4o"]}]}"#);
        let none = only_listed.pick_first(&s, &c, Some("gpt-5"), 1, Tier::High).0.unwrap_err();
        assert_eq!(none.status, 404);
        assert!(none.body.contains("DeploymentNotFound") && none.body.contains("gpt-5"), "{}", none.body);
        assert!(only_listed.pick_first(&s, &c, None, 1, Tier::High).0.is_ok(), "no model named: any backend");
    }

    #[test]
    fn v1_bodies_get_each_backends_deployment_name() {
        let (g, s, c, m) = (gateway(""), MemoryStore::default(), ManualClock::at(0), Recorder::default());
        let v1 = |cluster, model| AttemptRequest {
            cluster,
            original_path: "/openai/v1/chat/completions",
            tried: None,
            stored: Stored::No,
            model,
            estimate: None,
            tier: Tier::High,
            first_attempt: None,
        };
        assert_eq!(
            g.plan_attempt(&s, &c, &m, &v1("spillway_east", Some("gpt-4o"))).unwrap().body_model,
            Some("gpt-4o-ptu")
        );
        assert_eq!(g.plan_attempt(&s, &c, &m, &v1("spillway_west", Some("gpt-4o"))).unwrap().body_model, None);
        assert_eq!(g.plan_attempt(&s, &c, &m, &v1("spillway_east", Some("other"))).unwrap().body_model, None);
        // A realtime connection is renamed in its query, never in its frames.
        let realtime =
            AttemptRequest { original_path: "/openai/v1/realtime?model=gpt-4o", ..v1("spillway_east", Some("gpt-4o")) };
        let plan = g.plan_attempt(&s, &c, &m, &realtime).unwrap();
        assert_eq!((plan.body_model, plan.path.as_str()), (None, "/openai/v1/realtime?model=gpt-4o-ptu"));
        // Classic paths are renamed in the path, never in the body.
        let classic = AttemptRequest { original_path: CHAT, ..v1("spillway_east", Some("gpt-4o")) };
        let plan = g.plan_attempt(&s, &c, &m, &classic).unwrap();
        assert_eq!((plan.body_model, plan.path.as_str()), (None, "/openai/deployments/gpt-4o-ptu/chat/completions"));
    }

    #[test]
    fn the_home_backend_is_configured_or_the_first_by_priority() {
        let (s, c) = (MemoryStore::default(), ManualClock::at(0));
        let json = r#"{"backends":[{"name":"a","url":"http://x","priority":2},{"name":"b","url":"http://y"}]}"#;
        assert_eq!(gateway_with(json).home(&s, &c).unwrap().name, "b");
        let json = r#"{"backends":[{"name":"a","url":"http://x"},{"name":"b","url":"http://y"}],"home_backend":"b"}"#;
        let g = gateway_with(json);
        assert_eq!(g.home(&s, &c).unwrap().name, "b");
        // A throttled home: a 429 with its wait, never another backend.
        let answer =
            AttemptAnswer { status: 429, retry_after_ms: None, retry_after: Some("9"), ..AttemptAnswer::default() };
        g.on_attempt_response(&s, &c, &Recorder::default(), &at(1, false), &answer);
        let busy = g.home(&s, &c).unwrap_err();
        assert!(busy.headers.contains(&("retry-after", "9".to_string())), "{:?}", busy.headers);
    }

    #[test]
    fn healthy_answers_do_not_write_shared_data() {
        let (g, s, c) = (gateway(""), MemoryStore::default(), ManualClock::at(0));
        g.on_attempt_response(
            &s,
            &c,
            &Recorder::default(),
            &at(0, true),
            &AttemptAnswer { status: 200, retry_after_ms: None, retry_after: None, ..AttemptAnswer::default() },
        );
        assert_eq!(s.get(HEALTH), (None, None));
    }

    #[test]
    fn client_cannot_smuggle_unknown_backends_into_tried() {
        let (g, s, c) = (gateway(""), MemoryStore::default(), ManualClock::at(0));
        let plan = g.plan_attempt(&s, &c, &Recorder::default(), &req("spillway_east", Some("bogus,,west"))).unwrap();
        assert_eq!(plan.tried, "west,east");
    }

    fn quota(requests: u64, tokens: u64, limit_tokens: Option<u64>) -> Observation {
        Observation { requests: Some(requests), tokens: Some(tokens), limit_tokens, ..Observation::default() }
    }

    fn answer(g: &Gateway, s: &MemoryStore, c: &ManualClock, backend: usize, status: u32, seen: Observation) -> bool {
        let a = AttemptAnswer { status, quota: seen, ..AttemptAnswer::default() };
        g.on_attempt_response(s, c, &Recorder::default(), &at(backend, true), &a).retry
    }

    #[test]
    fn requests_go_where_the_reported_headroom_covers_them() {
        let (g, s, c) = (gateway(""), MemoryStore::default(), ManualClock::at(1_000));
        // east has 50 tokens left of 100,000 a minute; west said nothing.
        answer(&g, &s, &c, 0, 200, quota(100, 50, Some(100_000)));
        let first = |tokens| g.pick_first(&s, &c, None, tokens, Tier::High).0.unwrap().name.clone();
        assert_eq!((0..6).map(|_| first(400)).collect::<Vec<_>>(), ["west"; 6]);
        // Small requests still fit east (it has some of its turns: 50 of
        // 100,000 left counts as a sliver next to west's unknown).
        assert!((0..6).all(|_| ["east", "west"].contains(&first(40).as_str())));
        // The fallback after west is paygo for the large request, east for a small one.
        let plan = |estimate| {
            let r = AttemptRequest { estimate: Some(estimate), ..req("spillway_west", None) };
            g.plan_attempt(&s, &c, &Recorder::default(), &r).unwrap().fallback_cluster
        };
        assert_eq!(plan(400), Some("spillway_paygo"));
        assert_eq!(plan(40), Some("spillway_east"));
        // Until east says it has more (its window reset), it keeps what it said.
        c.advance(30_000);
        assert_eq!(plan(400), Some("spillway_paygo"));
        answer(&g, &s, &c, 0, 200, quota(100, 100_000, Some(100_000)));
        assert_eq!(plan(400), Some("spillway_east"));
        // Reactive routing ignores all of it.
        let reactive = gateway(r#","routing":"reactive""#);
        answer(&reactive, &s, &c, 0, 200, quota(100, 50, Some(100_000)));
        let r = AttemptRequest { estimate: Some(400), ..req("spillway_west", None) };
        assert_eq!(
            reactive.plan_attempt(&s, &c, &Recorder::default(), &r).unwrap().fallback_cluster,
            Some("spillway_east")
        );
    }

    #[test]
    fn a_429_about_one_requests_size_throttles_no_one() {
        let (g, s, c) = (gateway(""), MemoryStore::default(), ManualClock::at(1_000));
        let m = Recorder::default();
        // east refuses a huge request but still has 300 tokens and requests.
        let a =
            AttemptAnswer { status: 429, retry_after: Some("30"), quota: quota(5, 300, None), ..Default::default() };
        let d = g.on_attempt_response(&s, &c, &m, &at(0, true), &a);
        assert!(d.retry, "failed over like any 429");
        assert_eq!(g.read_health(&s).get(0).availability(1_000, &g.config.circuit_breaker), Availability::Available);
        assert_eq!(m.get("spillway_sized_out_total.backend.east"), 1);
        assert_eq!(m.get("spillway_throttle_events_total.backend.east"), 0);
        // Small requests keep going to east; large ones do not.
        let first = |tokens| g.pick_first(&s, &c, None, tokens, Tier::High).0.unwrap().name.clone();
        assert!((0..4).map(|_| first(100)).any(|n| n == "east"));
        assert!((0..4).all(|_| first(1_000) != "east"));
        // A 429 with nothing left is a throttle for everyone, as before.
        let a =
            AttemptAnswer { status: 429, retry_after: Some("30"), quota: quota(0, 300, None), ..Default::default() };
        g.on_attempt_response(&s, &c, &m, &at(1, true), &a);
        assert!(matches!(
            g.read_health(&s).get(1).availability(1_000, &g.config.circuit_breaker),
            Availability::Unavailable { until_ms: 31_000 }
        ));
        // Reactive routing throttles on every 429.
        let reactive = gateway(r#","routing":"reactive""#);
        let s2 = MemoryStore::default();
        let a =
            AttemptAnswer { status: 429, retry_after: Some("30"), quota: quota(5, 300, None), ..Default::default() };
        reactive.on_attempt_response(&s2, &c, &m, &at(0, true), &a);
        assert_eq!(reactive.read_health(&s2).get(0).throttled_until_ms, 31_000);
    }

    #[test]
    fn when_every_backend_is_short_the_client_waits_for_the_first_reset() {
        let (g, s, c) = (gateway(""), MemoryStore::default(), ManualClock::at(1_000));
        let reset_in = |ms: u64| Observation { reset_ms: Some(ms), ..quota(10, 0, Some(60_000)) };
        answer(&g, &s, &c, 0, 200, reset_in(9_000));
        answer(&g, &s, &c, 1, 200, reset_in(4_000));
        // paygo said nothing about when: it is asked only when nobody else
        // can take a request, which is now (its answer will tell).
        answer(&g, &s, &c, 2, 200, quota(10, 0, Some(60_000)));
        assert_eq!(g.pick_first(&s, &c, None, 500, Tier::High).0.unwrap().name, "paygo");
        let reply = AttemptAnswer {
            status: 429,
            retry_after_ms: Some("20000"),
            quota: quota(10, 0, Some(60_000)),
            ..Default::default()
        };
        g.on_attempt_response(&s, &c, &Recorder::default(), &at(2, false), &reply);
        let reply = g.pick_first(&s, &c, None, 500, Tier::High).0.unwrap_err();
        assert_eq!(reply.status, 429);
        assert!(reply.headers.contains(&("retry-after-ms", "4000".to_string())), "{:?}", reply.headers);
        c.advance(4_000);
        assert_eq!(g.pick_first(&s, &c, None, 500, Tier::High).0.unwrap().name, "west");
    }

    #[test]
    fn the_pool_reports_what_every_available_backend_has_left() {
        let (g, s, c) = (gateway(""), MemoryStore::default(), ManualClock::at(1_000));
        answer(&g, &s, &c, 0, 200, quota(10, 1_000, None));
        answer(&g, &s, &c, 1, 200, quota(20, 2_000, None));
        let (_, pool) = g.pick_first(&s, &c, None, 1, Tier::High);
        // west answers this one and reports its fresh numbers; paygo is unknown.
        let left = pool.after(Some(1), Left { requests: Some(19), tokens: Some(1_900) });
        assert_eq!(left, Left { requests: Some(29), tokens: Some(2_900) });
        // A throttled backend has nothing to offer.
        let a = AttemptAnswer { status: 429, retry_after: Some("30"), quota: quota(0, 0, None), ..Default::default() };
        g.on_attempt_response(&s, &c, &Recorder::default(), &at(0, true), &a);
        let (_, pool) = g.pick_first(&s, &c, None, 1, Tier::High);
        assert_eq!(pool.after(Some(1), Left::default()), Left { requests: Some(20), tokens: Some(2_000) });
    }

    #[test]
    fn low_tiers_leave_a_provisioned_backends_reserve_to_the_others() {
        let g = gateway_with(
            r#"{"backends":[
                {"name":"ptu","url":"http://127.0.0.1:1","provisioned":true,"reserve_percent":30},
                {"name":"paygo","url":"http://127.0.0.1:2","priority":2}]}"#,
        );
        let (s, c) = (MemoryStore::default(), ManualClock::at(1_000));
        let first = |tier| g.pick_first(&s, &c, None, 10, tier).0.map(|b| b.name.clone());
        let utilization = |permille| Observation { utilization_permille: Some(permille), ..Observation::default() };
        // Nothing known, or well below the reserve: both tiers use the PTU.
        assert_eq!(first(Tier::Low).unwrap(), "ptu");
        answer(&g, &s, &c, 0, 200, utilization(650));
        assert_eq!(first(Tier::Low).unwrap(), "ptu");
        // At 70 % the last 30 % are for high tiers; low spills to paygo.
        answer(&g, &s, &c, 0, 200, utilization(700));
        assert_eq!((first(Tier::High).unwrap(), first(Tier::Low).unwrap()), ("ptu".into(), "paygo".into()));
        // Without utilisation, the share of the limits left counts.
        answer(&g, &s, &c, 0, 200, quota(100, 2_500, Some(10_000)));
        assert_eq!((first(Tier::High).unwrap(), first(Tier::Low).unwrap()), ("ptu".into(), "paygo".into()));
        // With nowhere else to go, low tiers wait a second rather than take the reserve.
        let only = gateway_with(r#"{"backends":[{"name":"ptu","url":"http://127.0.0.1:1","provisioned":true}]}"#);
        answer(&only, &s, &c, 0, 200, utilization(900));
        let reply = only.pick_first(&s, &c, None, 10, Tier::Low).0.unwrap_err();
        assert!(reply.headers.contains(&("retry-after-ms", "1000".to_string())), "{:?}", reply.headers);
    }
}
