//! Client limits held across Envoy replicas: instead of the per-process
//! buckets in shared data (`limits`), each request asks a rate-limit service
//! (Envoy's RLS protocol, counters in Redis) once at admission, and the
//! difference between real usage and the estimate charged is sent later.
//!
//! The protocol only adds to counters: a request that used fewer tokens than
//! its estimate is not given the difference back, and an unserved request
//! stays counted, until the service's window ends.

use crate::limits::{Admission, Limits, Remaining};
use crate::rls::{self, Code, Descriptor, Response};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// The service cannot answer: admit the request, uncharged.
    Open,
    /// The service cannot answer: refuse the request (503).
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalLimits {
    /// `host:port` of the service (for the renderer's cluster).
    pub service: String,
    /// The Envoy cluster that reaches it.
    pub cluster: String,
    pub domain: String,
    pub timeout_ms: u64,
    pub failure_mode: FailureMode,
}

impl GlobalLimits {
    /// The service's host and port (validated when the config was parsed).
    pub fn address(&self) -> (&str, u16) {
        let (host, port) = self.service.rsplit_once(':').unwrap_or((self.service.as_str(), ""));
        (host, port.parse().unwrap_or(0))
    }

    /// Whether the renderer makes the cluster (the default name), rather
    /// than the operator naming one that exists (Istio's `outbound|…`).
    pub fn rendered_cluster(&self) -> bool {
        self.cluster == crate::contract::RATE_LIMIT_CLUSTER
    }
}

/// Descriptor keys: one counter per client and kind of limit.
pub const CLIENT_KEY: &str = "client";
pub const LIMIT_KEY: &str = "limit";
const REQUESTS: &str = "requests_per_minute";
const TOKENS: &str = "tokens_per_minute";

/// Which descriptors an admission asked about, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Asked {
    pub requests: bool,
    pub tokens: bool,
}

/// The admission call for one request of `client`, costing `tokens` (its
/// estimate). A request larger than the whole token limit is charged the
/// limit, as the local buckets do: it waits for an untouched window rather
/// than never passing.
pub fn admission(domain: &str, client: &str, limits: &Limits, tokens: u64) -> (Vec<u8>, Asked) {
    let mut descriptors = Vec::with_capacity(2);
    if let Some(rpm) = limits.requests_per_minute {
        descriptors.push(Descriptor {
            entries: vec![(CLIENT_KEY, client), (LIMIT_KEY, REQUESTS)],
            per_minute: rpm,
            hits: 1,
        });
    }
    if let Some(tpm) = limits.tokens_per_minute {
        descriptors.push(Descriptor {
            entries: vec![(CLIENT_KEY, client), (LIMIT_KEY, TOKENS)],
            per_minute: tpm,
            hits: tokens.min(tpm),
        });
    }
    let asked = Asked { requests: limits.requests_per_minute.is_some(), tokens: limits.tokens_per_minute.is_some() };
    (rls::encode_request(domain, &descriptors), asked)
}

/// What the tokens charged at admission are (the estimate, capped at the limit).
pub fn charged(limits: &Limits, tokens: u64) -> u64 {
    limits.tokens_per_minute.map_or(0, |tpm| tokens.min(tpm))
}

/// The service's answer as an admission; `None` when it is no answer (an
/// `UNKNOWN` overall code or a status list that does not match the
/// question), which the failure mode decides.
pub fn verdict(asked: Asked, response: &Response, default_wait_ms: u64) -> Option<Admission> {
    let expected = usize::from(asked.requests) + usize::from(asked.tokens);
    if response.statuses.len() != expected {
        return None;
    }
    let mut statuses = response.statuses.iter();
    let requests = if asked.requests { statuses.next() } else { None };
    let tokens = if asked.tokens { statuses.next() } else { None };
    let remaining = Remaining { requests: requests.map(|s| s.remaining), tokens: tokens.map(|s| s.remaining) };
    match response.overall {
        Code::Ok => Some(Admission::Admitted(remaining)),
        Code::OverLimit => {
            let wait = |s: &rls::Status| s.reset_ms.filter(|&ms| ms > 0).unwrap_or(default_wait_ms);
            let requests_wait = requests.filter(|s| s.code == Code::OverLimit).map(wait);
            let tokens_wait = tokens.filter(|s| s.code == Code::OverLimit).map(wait);
            let retry_after_ms = requests_wait.max(tokens_wait).unwrap_or(default_wait_ms).max(1);
            let by_tokens = tokens_wait.is_some_and(|t| requests_wait.is_none_or(|r| t > r));
            Some(Admission::Limited { retry_after_ms, remaining, by_tokens })
        }
        Code::Unknown => None,
    }
}

/// The call that charges `tokens` more to `client`'s token limit (usage
/// above what admission charged); `None` without a token limit or tokens.
pub fn correction(domain: &str, client: &str, limits: &Limits, tokens: u64) -> Option<Vec<u8>> {
    let tpm = limits.tokens_per_minute?;
    if tokens == 0 {
        return None;
    }
    let d = Descriptor { entries: vec![(CLIENT_KEY, client), (LIMIT_KEY, TOKENS)], per_minute: tpm, hits: tokens };
    Some(rls::encode_request(domain, &[d]))
}

/// Corrections waiting to be sent, merged per client (by name: the list
/// outlives a config reload): one call per client per tick however many
/// requests finished.
#[derive(Debug, Default)]
pub struct Pending(Vec<(String, u64)>);

impl Pending {
    pub fn add(&mut self, client: String, tokens: u64) {
        if tokens == 0 {
            return;
        }
        match self.0.iter_mut().find(|(c, _)| *c == client) {
            Some((_, t)) => *t = t.saturating_add(tokens),
            None => self.0.push((client, tokens)),
        }
    }

    pub fn take(&mut self) -> Vec<(String, u64)> {
        std::mem::take(&mut self.0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Lets one failure log line through per second, counting the rest, so an
/// outage of the service is reported without a line per request.
#[derive(Debug, Default)]
pub struct LogGate {
    last_ms: Option<u64>,
    suppressed: u64,
}

impl LogGate {
    /// `Some(n)`: log now, mentioning the `n` failures not logged since the
    /// last line.
    pub fn pass(&mut self, now_ms: u64) -> Option<u64> {
        if self.last_ms.is_some_and(|last| now_ms.saturating_sub(last) < 1000) {
            self.suppressed = self.suppressed.saturating_add(1);
            return None;
        }
        self.last_ms = Some(now_ms);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rls::Status;

    const BOTH: Limits = Limits { requests_per_minute: Some(10), tokens_per_minute: Some(1_000) };

    #[test]
    fn admission_asks_one_counter_per_limit_with_its_cost() {
        let (bytes, asked) = admission("spillway", "team-a", &BOTH, 5_000);
        assert_eq!(asked, Asked { requests: true, tokens: true });
        let expected = rls::encode_request(
            "spillway",
            &[
                Descriptor {
                    entries: vec![("client", "team-a"), ("limit", "requests_per_minute")],
                    per_minute: 10,
                    hits: 1,
                },
                Descriptor {
                    entries: vec![("client", "team-a"), ("limit", "tokens_per_minute")],
                    per_minute: 1_000,
                    hits: 1_000,
                },
            ],
        );
        assert_eq!(bytes, expected);
        assert_eq!(charged(&BOTH, 5_000), 1_000);
        let tokens_only = Limits { requests_per_minute: None, tokens_per_minute: Some(50) };
        assert_eq!(admission("d", "c", &tokens_only, 7).1, Asked { requests: false, tokens: true });
    }

    fn status(code: Code, remaining: u64, reset_ms: Option<u64>) -> Status {
        Status { code, remaining, reset_ms }
    }

    #[test]
    fn verdicts_carry_remaining_and_the_longest_wait_of_what_is_over() {
        let asked = Asked { requests: true, tokens: true };
        let ok = Response { overall: Code::Ok, statuses: vec![status(Code::Ok, 9, None), status(Code::Ok, 400, None)] };
        assert_eq!(
            verdict(asked, &ok, 10_000),
            Some(Admission::Admitted(Remaining { requests: Some(9), tokens: Some(400) }))
        );
        let over = Response {
            overall: Code::OverLimit,
            statuses: vec![status(Code::Ok, 3, Some(50_000)), status(Code::OverLimit, 0, Some(20_000))],
        };
        assert_eq!(
            verdict(asked, &over, 10_000),
            Some(Admission::Limited {
                retry_after_ms: 20_000,
                remaining: Remaining { requests: Some(3), tokens: Some(0) },
                by_tokens: true
            })
        );
        let both_over = Response {
            overall: Code::OverLimit,
            statuses: vec![status(Code::OverLimit, 0, Some(30_000)), status(Code::OverLimit, 0, None)],
        };
        match verdict(asked, &both_over, 10_000) {
            Some(Admission::Limited { retry_after_ms: 30_000, by_tokens: false, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn answers_that_do_not_fit_the_question_are_no_answer() {
        let asked = Asked { requests: true, tokens: false };
        assert_eq!(verdict(asked, &Response { overall: Code::Ok, statuses: vec![] }, 1), None);
        let unknown = Response { overall: Code::Unknown, statuses: vec![status(Code::Unknown, 0, None)] };
        assert_eq!(verdict(asked, &unknown, 1), None);
    }

    #[test]
    fn corrections_charge_only_tokens_and_merge_per_client() {
        assert_eq!(correction("d", "c", &BOTH, 0), None);
        let requests_only = Limits { requests_per_minute: Some(5), tokens_per_minute: None };
        assert_eq!(correction("d", "c", &requests_only, 10), None);
        let bytes = correction("d", "c", &BOTH, 250).expect("a call");
        let expected = rls::encode_request(
            "d",
            &[Descriptor {
                entries: vec![("client", "c"), ("limit", "tokens_per_minute")],
                per_minute: 1_000,
                hits: 250,
            }],
        );
        assert_eq!(bytes, expected);
        let mut pending = Pending::default();
        pending.add("a".into(), 10);
        pending.add("b".into(), 5);
        pending.add("a".into(), 7);
        pending.add("c".into(), 0);
        assert_eq!(pending.take(), vec![("a".to_string(), 17), ("b".to_string(), 5)]);
        assert!(pending.is_empty());
    }

    #[test]
    fn failures_are_logged_once_a_second_with_the_count_in_between() {
        let mut gate = LogGate::default();
        assert_eq!(gate.pass(5_000), Some(0));
        assert_eq!(gate.pass(5_100), None);
        assert_eq!(gate.pass(5_900), None);
        assert_eq!(gate.pass(6_000), Some(2));
    }
}
