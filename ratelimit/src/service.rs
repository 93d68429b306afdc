//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`.
//!
//! The limits are not configured here: every descriptor that carries a
//! `limit` override is limited by that override, and descriptors without one
//! are not limited. limitador does the counting.
//!
//! # How a descriptor becomes a limitador limit
//!
//! Namespace = the request's domain; max value = `requests_per_unit`;
//! window = the unit in seconds; variables = the descriptor's entry keys
//! (written `descriptors[0]["key"]`, the descriptor's entries being bound as a
//! one-element `descriptors` list in the context), so each distinct set of
//! entry values gets its own counter.
//!
//! limitador applies to a context every limit of the namespace whose
//! conditions hold and whose variables resolve, and a limit's identity
//! leaves out its max value. So each limit also gets one condition,
//! `spillway_limit == "<max>/<window>/<keys>"`, and each descriptor's context
//! sets `spillway_limit` to its own override: a descriptor only ever matches
//! the limit built from it, a descriptor with more keys does not also count
//! against a limit on fewer keys, and a changed override is a new limit with
//! a counter of its own.
//!
//! # Charging, and how atomic it is
//!
//! A descriptor's cost is its own `hits_addend` when set, else the request's
//! `hits_addend` when non-zero, else 1. As in envoyproxy/ratelimit, every
//! cost is added to its counter, fitting or not, and a descriptor is over
//! its limit when its counter has passed the limit after the addition. So a
//! refused request still counts until the window ends, and hits added after
//! the fact (a client's usage beyond what it was charged at admission) are
//! never dropped because the counter is already full.
//!
//! Adding first and reading the count after makes each decision safe under
//! concurrency without a transaction: the addition is atomic (an increment in
//! Redis), and a request sees a count that includes its own hits and any
//! others' added before its read, so concurrent requests can both be refused
//! near the limit but never both admitted past it.
//!
//! A cost of 0 only checks: the descriptor is over its limit when nothing is
//! left (limitador's check for one more hit), and nothing is charged.
//! Descriptors with `is_negative_hits` are only checked as well: limitador's
//! counters only grow.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use limitador::limit::{Context, Expression, Limit, Namespace, Predicate};
use tonic::{Request, Response, Status};

use crate::backend::{Backend, BackendError, Outcome};

/// Context variable naming the override a descriptor carries.
const LIMIT_VAR: &str = "spillway_limit";
/// Context variable holding the descriptor's entries (a one-element list).
const DESCRIPTORS_VAR: &str = "descriptors";

/// A whole `ShouldRateLimit` call must be answered within this; past it the
/// call fails with UNAVAILABLE (the Redis client's own timeouts are shorter).
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(900);

/// The rate-limit service.
pub struct RateLimitServer {
    backend: Backend,
    /// (domain, override identity) of the limits already given to limitador.
    added: Mutex<HashSet<(String, String)>>,
    deadline: Duration,
}

impl RateLimitServer {
    pub fn new(backend: Backend) -> Self {
        RateLimitServer { backend, added: Mutex::new(HashSet::new()), deadline: DEFAULT_DEADLINE }
    }

    /// A server whose counters live in this process.
    pub fn in_memory() -> Self {
        Self::new(Backend::in_memory())
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Replaces the per-call deadline.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The tonic service wrapping this server.
    pub fn into_service(self) -> RateLimitServiceServer<RateLimitServer> {
        RateLimitServiceServer::new(self)
    }

    /// Answers one request (the handler, minus the deadline).
    pub async fn decide(&self, request: &RateLimitRequest) -> Result<RateLimitResponse, Status> {
        let namespace = Namespace::from(request.domain.as_str());
        let plans: Vec<Option<Planned>> =
            request.descriptors.iter().map(|d| Planned::from_descriptor(d, request.hits_addend)).collect();

        for plan in plans.iter().flatten() {
            self.ensure_limit(&request.domain, plan)?;
        }
        let contexts: Vec<Option<Context<'static>>> = plans.iter().map(|p| p.as_ref().map(Planned::context)).collect();

        let mut outcomes: Vec<Option<Outcome>> = vec![None; plans.len()];
        let mut over = false;
        for ((plan, ctx), outcome) in plans.iter().zip(&contexts).zip(outcomes.iter_mut()) {
            if let (Some(plan), Some(ctx)) = (plan, ctx) {
                let result = if plan.cost == 0 {
                    self.backend.check(&namespace, ctx, 1).await.map_err(to_status)?
                } else {
                    self.backend.update(&namespace, ctx, plan.cost).await.map_err(to_status)?;
                    // Limited when the count after the addition has passed the limit.
                    self.backend.check(&namespace, ctx, 0).await.map_err(to_status)?
                };
                over |= result.limited;
                *outcome = Some(result);
            }
        }

        let statuses = plans.iter().zip(&outcomes).map(|(plan, outcome)| status(plan.as_ref(), *outcome)).collect();
        Ok(RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            ..Default::default()
        })
    }

    /// Gives limitador the limit for `plan` the first time it is seen.
    fn ensure_limit(&self, domain: &str, plan: &Planned) -> Result<(), Status> {
        let key = (domain.to_string(), plan.identity.clone());
        if self.added.lock().unwrap_or_else(|p| p.into_inner()).contains(&key) {
            return Ok(());
        }
        let limit = plan.limit(domain).map_err(|e| Status::internal(format!("cannot express the limit: {e}")))?;
        self.backend.add_limit(limit).map_err(to_status)?;
        self.added.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
        Ok(())
    }
}

#[tonic::async_trait]
impl RateLimitService for RateLimitServer {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let request = request.into_inner();
        match tokio::time::timeout(self.deadline, self.decide(&request)).await {
            Ok(answer) => answer.map(Response::new),
            Err(_) => Err(Status::unavailable(format!(
                "rate-limit counter storage did not answer within {} ms",
                self.deadline.as_millis()
            ))),
        }
    }
}

fn to_status(e: BackendError) -> Status {
    match e {
        BackendError::Unavailable(msg) => Status::unavailable(format!("rate-limit counter storage unavailable: {msg}")),
        BackendError::Internal(msg) => Status::internal(format!("rate-limit evaluation failed: {msg}")),
    }
}

/// A descriptor that is limited by its override.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Planned {
    requests_per_unit: u32,
    /// The override's unit, echoed in `current_limit`.
    unit: i32,
    seconds: u64,
    /// `<max>/<window>/<keys>`: what tells this limit from any other.
    identity: String,
    /// The entries, keys made unique, sorted by key.
    entries: Vec<(String, String)>,
    /// Hits to charge; 0 checks only.
    cost: u64,
}

impl Planned {
    /// `None` when the descriptor is not limited (no override, or a unit
    /// this service does not know).
    fn from_descriptor(d: &RateLimitDescriptor, request_hits: u32) -> Option<Planned> {
        let limit = d.limit.as_ref()?;
        let seconds = unit_seconds(limit.unit)?;
        let cost = if d.is_negative_hits {
            // Refunds cannot be expressed: limitador's counters only grow.
            // Such a descriptor is checked, never charged.
            0
        } else {
            match (&d.hits_addend, request_hits) {
                (Some(h), _) => h.value,
                (None, 0) => 1,
                (None, n) => u64::from(n),
            }
        };

        let mut seen = HashSet::with_capacity(d.entries.len());
        let mut entries = Vec::with_capacity(d.entries.len());
        for e in &d.entries {
            // Repeated keys are kept apart as `key#2`, `key#3`, ...
            let mut key = e.key.clone();
            let mut n = 2u32;
            while seen.contains(&key) {
                key = format!("{}#{n}", e.key);
                n = n.saturating_add(1);
            }
            seen.insert(key.clone());
            entries.push((key, e.value.clone()));
        }
        entries.sort();

        let mut identity = format!("{}/{seconds}/", limit.requests_per_unit);
        for (i, (k, _)) in entries.iter().enumerate() {
            let _ = write!(identity, "{}{}:{k}", if i == 0 { "" } else { "," }, k.len());
        }

        Some(Planned { requests_per_unit: limit.requests_per_unit, unit: limit.unit, seconds, identity, entries, cost })
    }

    fn limit(&self, domain: &str) -> Result<Limit, limitador::limit::ParseError> {
        let condition = Predicate::parse(format!("{LIMIT_VAR} == {}", cel_string(&self.identity)))?;
        let variables = self
            .entries
            .iter()
            .map(|(k, _)| Expression::parse(format!("{DESCRIPTORS_VAR}[0][{}]", cel_string(k))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Limit::new(domain, u64::from(self.requests_per_unit), self.seconds, [condition], variables))
    }

    fn context(&self) -> Context<'static> {
        let mut ctx = Context::from(HashMap::from([(LIMIT_VAR.to_string(), self.identity.clone())]));
        ctx.list_binding(DESCRIPTORS_VAR.to_string(), vec![self.entries.iter().cloned().collect()]);
        ctx
    }
}

/// The window of a `RateLimitUnit`, in seconds. The override's enum has
/// SECOND..YEAR; WEEK (7) exists in the response's enum and is accepted too.
/// Months are 30 days and years 365 days.
fn unit_seconds(unit: i32) -> Option<u64> {
    const DAY: u64 = 24 * 60 * 60;
    match Unit::try_from(unit).ok()? {
        Unit::Second => Some(1),
        Unit::Minute => Some(60),
        Unit::Hour => Some(60 * 60),
        Unit::Day => Some(DAY),
        Unit::Week => Some(7 * DAY),
        Unit::Month => Some(30 * DAY),
        Unit::Year => Some(365 * DAY),
        Unit::Unknown => None,
    }
}

/// A CEL string literal for `s`: anything but a few plain characters is
/// written as a unicode escape, so no key or value can break out of it.
fn cel_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || " _-./:@+=,#".contains(c) {
            out.push(c);
        } else if u32::from(c) <= 0xFFFF {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            let _ = write!(out, "\\U{:08x}", u32::from(c));
        }
    }
    out.push('"');
    out
}

fn status(plan: Option<&Planned>, outcome: Option<Outcome>) -> DescriptorStatus {
    let Some(plan) = plan else {
        return DescriptorStatus { code: Code::Ok as i32, ..Default::default() };
    };
    let current_limit =
        Some(RateLimit { name: String::new(), requests_per_unit: plan.requests_per_unit, unit: plan.unit });
    let Some(outcome) = outcome else {
        // Not reached: every limited descriptor is checked or charged.
        return DescriptorStatus {
            code: Code::Ok as i32,
            current_limit,
            limit_remaining: plan.requests_per_unit,
            ..Default::default()
        };
    };
    let remaining = if outcome.limited { 0 } else { outcome.remaining.unwrap_or(u64::from(plan.requests_per_unit)) };
    DescriptorStatus {
        code: if outcome.limited { Code::OverLimit } else { Code::Ok } as i32,
        current_limit,
        limit_remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
        duration_until_reset: outcome.expires_in.map(pb_duration),
        quota: None,
    }
}

fn pb_duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{Entry, RateLimitOverride};
    use envoy_types::pb::google::protobuf::UInt64Value;

    const SECOND: i32 = Unit::Second as i32;
    const MINUTE: i32 = Unit::Minute as i32;
    const HOUR: i32 = Unit::Hour as i32;

    fn entries(kv: &[(&str, &str)]) -> Vec<Entry> {
        kv.iter().map(|(k, v)| Entry { key: k.to_string(), value: v.to_string() }).collect()
    }

    /// A descriptor limited to `rpu` per `unit`, charging `hits` when given.
    fn limited(kv: &[(&str, &str)], rpu: u32, unit: i32, hits: Option<u64>) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: entries(kv),
            limit: Some(RateLimitOverride { requests_per_unit: rpu, unit }),
            hits_addend: hits.map(|value| UInt64Value { value }),
            is_negative_hits: false,
        }
    }

    fn unlimited(kv: &[(&str, &str)]) -> RateLimitDescriptor {
        RateLimitDescriptor { entries: entries(kv), ..Default::default() }
    }

    fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>, hits_addend: u32) -> RateLimitRequest {
        RateLimitRequest { domain: domain.to_string(), descriptors, hits_addend }
    }

    async fn call(server: &RateLimitServer, req: RateLimitRequest) -> RateLimitResponse {
        server.should_rate_limit(Request::new(req)).await.expect("answered").into_inner()
    }

    /// (code, limit_remaining) per descriptor.
    fn summary(r: &RateLimitResponse) -> Vec<(Code, u32)> {
        r.statuses.iter().map(|s| (Code::try_from(s.code).unwrap(), s.limit_remaining)).collect()
    }

    fn overall(r: &RateLimitResponse) -> Code {
        Code::try_from(r.overall_code).unwrap()
    }

    #[tokio::test]
    async fn each_descriptor_is_charged_its_own_cost() {
        let s = RateLimitServer::in_memory();
        let r = call(
            &s,
            request(
                "d",
                vec![
                    limited(&[("k", "a")], 10, MINUTE, Some(3)),
                    limited(&[("k", "b")], 10, MINUTE, Some(5)),
                    // No own hits: the request's hits_addend (2).
                    limited(&[("k", "c")], 10, MINUTE, None),
                ],
                2,
            ),
        )
        .await;
        assert_eq!(overall(&r), Code::Ok);
        assert_eq!(summary(&r), vec![(Code::Ok, 7), (Code::Ok, 5), (Code::Ok, 8)]);

        // Neither set: 1 (a request hits_addend of 0 means "not set").
        let r = call(&s, request("d", vec![limited(&[("k", "c")], 10, MINUTE, None)], 0)).await;
        assert_eq!(summary(&r), vec![(Code::Ok, 7)]);
    }

    #[tokio::test]
    async fn every_hit_counts_and_a_descriptor_is_over_once_past_its_limit() {
        let s = RateLimitServer::in_memory();
        let a = |hits| limited(&[("k", "a")], 10, MINUTE, Some(hits));
        let b = |hits| limited(&[("k", "b")], 5, MINUTE, Some(hits));
        let r = call(&s, request("d", vec![a(4), b(6)], 0)).await;
        assert_eq!(overall(&r), Code::OverLimit);
        assert_eq!(summary(&r), vec![(Code::Ok, 6), (Code::OverLimit, 0)]);
        assert!(r.statuses[1].current_limit.is_some());

        // Both were charged, the one over its limit too (as envoyproxy/ratelimit does).
        let r = call(&s, request("d", vec![a(0), b(0)], 0)).await;
        assert_eq!(summary(&r), vec![(Code::Ok, 6), (Code::OverLimit, 0)]);

        // Exactly at the limit is within it; past it, hits are still added.
        let r = call(&s, request("d", vec![a(6)], 0)).await;
        assert_eq!((overall(&r), summary(&r)), (Code::Ok, vec![(Code::Ok, 0)]));
        let r = call(&s, request("d", vec![a(5)], 0)).await;
        assert_eq!(overall(&r), Code::OverLimit);
        let r = call(&s, request("d", vec![a(0)], 0)).await;
        assert_eq!(summary(&r), vec![(Code::OverLimit, 0)]);
    }

    #[tokio::test]
    async fn zero_hits_only_checks() {
        let s = RateLimitServer::in_memory();
        let check = || limited(&[("user", "u")], 3, HOUR, Some(0));
        for _ in 0..3 {
            let r = call(&s, request("d", vec![check()], 0)).await;
            assert_eq!((overall(&r), summary(&r)), (Code::Ok, vec![(Code::Ok, 3)]));
        }
        let r = call(&s, request("d", vec![limited(&[("user", "u")], 3, HOUR, Some(3))], 0)).await;
        assert_eq!(summary(&r), vec![(Code::Ok, 0)]);
        // Nothing left: the check reports OVER_LIMIT, still charging nothing.
        let r = call(&s, request("d", vec![check()], 0)).await;
        assert_eq!((overall(&r), summary(&r)), (Code::OverLimit, vec![(Code::OverLimit, 0)]));
    }

    #[tokio::test]
    async fn a_refund_is_only_checked() {
        let s = RateLimitServer::in_memory();
        call(&s, request("d", vec![limited(&[("k", "v")], 5, MINUTE, Some(2))], 0)).await;
        let mut refund = limited(&[("k", "v")], 5, MINUTE, Some(2));
        refund.is_negative_hits = true;
        let r = call(&s, request("d", vec![refund], 0)).await;
        assert_eq!(summary(&r), vec![(Code::Ok, 3)]);
    }

    #[tokio::test]
    async fn descriptors_without_a_usable_override_are_unlimited() {
        let s = RateLimitServer::in_memory();
        let unknown_unit = limited(&[("k", "x")], 1, 0, None);
        let bad_unit = limited(&[("k", "y")], 1, 99, None);
        for _ in 0..3 {
            let r =
                call(&s, request("d", vec![unlimited(&[("k", "v")]), unknown_unit.clone(), bad_unit.clone()], 0)).await;
            assert_eq!(overall(&r), Code::Ok);
            assert_eq!(r.statuses.len(), 3);
            assert!(r.statuses.iter().all(|st| st.code == Code::Ok as i32
                && st.current_limit.is_none()
                && st.duration_until_reset.is_none()));
        }
        // Next to a descriptor that is over, they stay OK.
        let r =
            call(&s, request("d", vec![unlimited(&[("k", "v")]), limited(&[("k", "w")], 1, MINUTE, Some(2))], 0)).await;
        assert_eq!(overall(&r), Code::OverLimit);
        assert_eq!(summary(&r), vec![(Code::Ok, 0), (Code::OverLimit, 0)]);
        assert!(r.statuses[0].current_limit.is_none());
    }

    #[tokio::test]
    async fn empty_request_is_ok() {
        let r = call(&RateLimitServer::in_memory(), request("", vec![], 0)).await;
        assert_eq!(overall(&r), Code::Ok);
        assert!(r.statuses.is_empty());
    }

    #[tokio::test]
    async fn each_value_set_has_its_own_counter() {
        let s = RateLimitServer::in_memory();
        let d = |user: &str| limited(&[("model", "gpt"), ("user", user)], 2, MINUTE, None);
        call(&s, request("d", vec![d("a")], 0)).await;
        call(&s, request("d", vec![d("a")], 0)).await;
        let r = call(&s, request("d", vec![d("a")], 0)).await;
        assert_eq!(overall(&r), Code::OverLimit);
        let r = call(&s, request("d", vec![d("b")], 0)).await;
        assert_eq!(summary(&r), vec![(Code::Ok, 1)]);
        // Fewer keys, same override: another limit, not the two-key one.
        let r = call(&s, request("d", vec![limited(&[("model", "gpt")], 2, MINUTE, None)], 0)).await;
        assert_eq!(summary(&r), vec![(Code::Ok, 1)]);
        // Another domain: another namespace.
        let r = call(&s, request("other", vec![d("a")], 0)).await;
        assert_eq!(summary(&r), vec![(Code::Ok, 1)]);
        // Same keys, other unit: another limit.
        let r = call(&s, request("d", vec![limited(&[("model", "gpt"), ("user", "a")], 2, HOUR, None)], 0)).await;
        assert_eq!(summary(&r), vec![(Code::Ok, 1)]);
    }

    #[tokio::test]
    async fn reports_limit_remaining_and_reset() {
        let s = RateLimitServer::in_memory();
        let r = call(&s, request("d", vec![limited(&[("k", "v")], 5, MINUTE, Some(2))], 0)).await;
        let st = &r.statuses[0];
        assert_eq!(st.current_limit, Some(RateLimit { name: String::new(), requests_per_unit: 5, unit: MINUTE }));
        assert_eq!(st.limit_remaining, 3);
        let reset = st.duration_until_reset.expect("reset reported");
        assert!(reset.seconds <= 60 && (reset.seconds > 50), "{reset:?}");

        // Over: remaining 0, reset still reported.
        let r = call(&s, request("d", vec![limited(&[("k", "v")], 5, MINUTE, Some(4))], 0)).await;
        assert_eq!(summary(&r), vec![(Code::OverLimit, 0)]);
        assert!(r.statuses[0].duration_until_reset.is_some());
    }

    #[tokio::test]
    async fn a_changed_override_starts_a_new_counter() {
        let s = RateLimitServer::in_memory();
        let r = call(&s, request("d", vec![limited(&[("k", "v")], 2, MINUTE, Some(2))], 0)).await;
        assert_eq!(summary(&r), vec![(Code::Ok, 0)]);
        let r = call(&s, request("d", vec![limited(&[("k", "v")], 2, MINUTE, None)], 0)).await;
        assert_eq!(overall(&r), Code::OverLimit);
        let r = call(&s, request("d", vec![limited(&[("k", "v")], 3, MINUTE, None)], 0)).await;
        assert_eq!(summary(&r), vec![(Code::Ok, 2)]);
        // And the old override still sees its own, full counter.
        let r = call(&s, request("d", vec![limited(&[("k", "v")], 2, MINUTE, Some(0))], 0)).await;
        assert_eq!(summary(&r), vec![(Code::OverLimit, 0)]);
    }

    #[tokio::test]
    async fn the_window_starts_at_the_first_hit_and_then_resets() {
        let s = RateLimitServer::in_memory();
        let d = |hits| limited(&[("k", "v")], 1, SECOND, Some(hits));
        assert_eq!(overall(&call(&s, request("d", vec![d(1)], 0)).await), Code::Ok);
        assert_eq!(overall(&call(&s, request("d", vec![d(1)], 0)).await), Code::OverLimit);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let r = call(&s, request("d", vec![d(1)], 0)).await;
        assert_eq!(summary(&r), vec![(Code::Ok, 0)]);
    }

    #[tokio::test]
    async fn odd_keys_and_values_are_counted_apart_and_never_break() {
        let s = RateLimitServer::in_memory();
        let odd = [
            ("", ""),
            ("a\"b", "v\\"),
            ("x-user.id", "\n"),
            ("descriptors", "spillway_limit"),
            ("spillway_limit", "'); drop"),
            ("ключ", "🙂"),
        ];
        let d = |v: &str| limited(&[odd[0], odd[1], odd[2], odd[3], odd[4], odd[5], ("last", v)], 1, MINUTE, None);
        assert_eq!(summary(&call(&s, request("d", vec![d("1")], 0)).await), vec![(Code::Ok, 0)]);
        assert_eq!(summary(&call(&s, request("d", vec![d("1")], 0)).await), vec![(Code::OverLimit, 0)]);
        assert_eq!(summary(&call(&s, request("d", vec![d("2")], 0)).await), vec![(Code::Ok, 0)]);

        // Repeated keys are distinct variables, in order of appearance.
        let dup = |a: &str, b: &str| limited(&[("k", a), ("k", b)], 1, MINUTE, None);
        assert_eq!(overall(&call(&s, request("d", vec![dup("1", "2")], 0)).await), Code::Ok);
        assert_eq!(overall(&call(&s, request("d", vec![dup("1", "3")], 0)).await), Code::Ok);
        assert_eq!(overall(&call(&s, request("d", vec![dup("1", "2")], 0)).await), Code::OverLimit);
    }

    #[tokio::test]
    async fn extreme_numbers_do_not_panic() {
        let s = RateLimitServer::in_memory();
        let r =
            call(&s, request("d", vec![limited(&[("k", "v")], u32::MAX, Unit::Year as i32, Some(u64::MAX))], 0)).await;
        assert_eq!(summary(&r), vec![(Code::OverLimit, 0)]);
        let r = call(&s, request("d", vec![limited(&[("k", "v")], 0, Unit::Week as i32, None)], u32::MAX)).await;
        assert_eq!(summary(&r), vec![(Code::OverLimit, 0)]);
        let r =
            call(&s, request("d", vec![limited(&[("k", "v")], u32::MAX, Unit::Month as i32, None)], u32::MAX)).await;
        assert_eq!(summary(&r), vec![(Code::Ok, 0)]);
        assert_eq!(r.statuses[0].current_limit.as_ref().map(|l| l.unit), Some(Unit::Month as i32));
    }

    #[test]
    fn units_map_to_seconds() {
        assert_eq!(unit_seconds(Unit::Second as i32), Some(1));
        assert_eq!(unit_seconds(Unit::Minute as i32), Some(60));
        assert_eq!(unit_seconds(Unit::Hour as i32), Some(3600));
        assert_eq!(unit_seconds(Unit::Day as i32), Some(86_400));
        assert_eq!(unit_seconds(Unit::Week as i32), Some(604_800));
        assert_eq!(unit_seconds(Unit::Month as i32), Some(2_592_000));
        assert_eq!(unit_seconds(Unit::Year as i32), Some(31_536_000));
        assert_eq!(unit_seconds(0), None);
        assert_eq!(unit_seconds(-1), None);
        assert_eq!(unit_seconds(8), None);
    }

    #[test]
    fn cel_strings_escape_everything_unusual() {
        assert_eq!(cel_string("model"), "\"model\"");
        assert_eq!(cel_string("a\"b\\c"), "\"a\\u0022b\\u005cc\"");
        assert_eq!(cel_string("🙂"), "\"\\U0001f642\"");
    }
}
