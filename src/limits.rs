//! Per-client request and token limits: two token buckets per client (refilled
//! continuously at the per-minute rate, holding at most one minute's worth),
//! kept in shared data and changed only by CAS, so all worker threads share
//! them and concurrent requests cannot both spend the same tokens.
//!
//! Tokens are charged at admission from an estimate (prompt size plus
//! `max_tokens`) and corrected when the real usage is known. A request is
//! admitted only while its estimate fits, so the limit can be overshot only by
//! what in-flight requests use beyond their estimates.

use crate::contract::shared_data::LIMITS_PREFIX;
use crate::store::{self, SharedStore};

const MINUTE_MS: f64 = 60_000.0;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Buckets {
    pub requests: f64,
    pub tokens: f64,
    pub updated_ms: u64,
}

impl Buckets {
    fn full(limits: &Limits, now_ms: u64) -> Buckets {
        Buckets {
            requests: limits.requests_per_minute.unwrap_or(0) as f64,
            tokens: limits.tokens_per_minute.unwrap_or(0) as f64,
            updated_ms: now_ms,
        }
    }

    pub fn decode(bytes: Option<&[u8]>, limits: &Limits, now_ms: u64) -> Buckets {
        let parsed = bytes.and_then(|b| std::str::from_utf8(b).ok()).and_then(|s| {
            let mut it = s.split(' ');
            Some(Buckets {
                requests: it.next()?.parse().ok()?,
                tokens: it.next()?.parse().ok()?,
                updated_ms: it.next()?.parse().ok()?,
            })
        });
        parsed.unwrap_or_else(|| Buckets::full(limits, now_ms))
    }

    pub fn encode(&self) -> Vec<u8> {
        format!("{} {} {}", self.requests, self.tokens, self.updated_ms).into_bytes()
    }

    fn refill(&mut self, limits: &Limits, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.updated_ms) as f64;
        if let Some(rpm) = limits.requests_per_minute {
            let cap = rpm as f64;
            self.requests = (self.requests + elapsed * cap / MINUTE_MS).min(cap);
        }
        if let Some(tpm) = limits.tokens_per_minute {
            let cap = tpm as f64;
            self.tokens = (self.tokens + elapsed * cap / MINUTE_MS).min(cap);
        }
        self.updated_ms = self.updated_ms.max(now_ms);
    }

    fn remaining(&self, limits: &Limits) -> Remaining {
        Remaining {
            requests: limits.requests_per_minute.map(|_| self.requests.max(0.0).floor() as u64),
            tokens: limits.tokens_per_minute.map(|_| self.tokens.max(0.0).floor() as u64),
        }
    }
}

/// What is left after a decision, for `x-ratelimit-remaining-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Remaining {
    pub requests: Option<u64>,
    pub tokens: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted(Remaining),
    /// Over a limit: retry after this many ms (when the bucket holds enough).
    Limited {
        retry_after_ms: u64,
        remaining: Remaining,
        by_tokens: bool,
    },
}

/// Shared-data key of a client's buckets; includes the limits so a changed
/// limit starts from a full bucket.
pub fn key(client: &str, limits: &Limits) -> String {
    format!(
        "{LIMITS_PREFIX}{client}.{}.{}",
        limits.requests_per_minute.unwrap_or(0),
        limits.tokens_per_minute.unwrap_or(0)
    )
}

/// Admits one request costing `tokens` (estimate) or says how long to wait.
/// A request larger than the whole token bucket is admitted when the bucket
/// is full (and leaves it in debt), so it is slow rather than impossible.
pub fn admit(store: &dyn SharedStore, key: &str, limits: &Limits, now_ms: u64, tokens: u64) -> Admission {
    if limits.requests_per_minute.is_none() && limits.tokens_per_minute.is_none() {
        return Admission::Admitted(Remaining::default());
    }
    let cost = tokens as f64;
    let decision = store::update(store, key, |current| {
        let mut b = Buckets::decode(current, limits, now_ms);
        b.refill(limits, now_ms);
        let mut wait_ms: f64 = 0.0;
        let mut by_tokens = false;
        if let Some(rpm) = limits.requests_per_minute {
            if b.requests < 1.0 {
                wait_ms = wait_ms.max((1.0 - b.requests) * MINUTE_MS / rpm as f64);
            }
        }
        if let Some(tpm) = limits.tokens_per_minute {
            let cap = tpm as f64;
            let need = cost.min(cap);
            if b.tokens < need {
                let w = (need - b.tokens) * MINUTE_MS / cap;
                if w > wait_ms {
                    by_tokens = true;
                }
                wait_ms = wait_ms.max(w);
            }
        }
        if wait_ms > 0.0 {
            // Refill is not worth a write; the next decision recomputes it.
            let remaining = b.remaining(limits);
            let retry_after_ms = (wait_ms.ceil() as u64).max(1);
            return (Admission::Limited { retry_after_ms, remaining, by_tokens }, None);
        }
        if limits.requests_per_minute.is_some() {
            b.requests -= 1.0;
        }
        if limits.tokens_per_minute.is_some() {
            b.tokens -= cost;
        }
        (Admission::Admitted(b.remaining(limits)), Some(b.encode()))
    });
    // Every CAS try lost to other workers (16 in a row: sustained contention
    // on this one client's key) or the store failed: admit without charging.
    // Failing the request over bookkeeping would turn contention into an
    // outage; the overshoot is bounded by the requests in that window.
    decision.unwrap_or(Admission::Admitted(Remaining::default()))
}

/// What a request turned out to cost, against what admission charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    /// Tokens admission (and later estimates) took from the bucket.
    pub charged_tokens: u64,
    /// Tokens the request really used (0: refund them all).
    pub used_tokens: u64,
    /// Give the request itself back (it was never served).
    pub refund_request: bool,
}

/// Corrects the buckets once a request's cost is known: the difference
/// between used and charged tokens is taken (or given back).
pub fn settle(store: &dyn SharedStore, key: &str, limits: &Limits, now_ms: u64, s: Settlement) {
    let tokens = limits.tokens_per_minute.is_some() && s.used_tokens != s.charged_tokens;
    let requests = limits.requests_per_minute.is_some() && s.refund_request;
    if !tokens && !requests {
        return;
    }
    let token_delta = s.used_tokens as f64 - s.charged_tokens as f64;
    store::update(store, key, |current| {
        let mut b = Buckets::decode(current, limits, now_ms);
        b.refill(limits, now_ms);
        if let (true, Some(tpm)) = (tokens, limits.tokens_per_minute) {
            b.tokens = (b.tokens - token_delta).min(tpm as f64);
        }
        if let (true, Some(rpm)) = (requests, limits.requests_per_minute) {
            b.requests = (b.requests + 1.0).min(rpm as f64);
        }
        ((), Some(b.encode()))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemoryStore;

    const RPM: Limits = Limits { requests_per_minute: Some(3), tokens_per_minute: None };
    const TPM: Limits = Limits { requests_per_minute: None, tokens_per_minute: Some(1_000) };

    fn admitted(a: Admission) -> bool {
        matches!(a, Admission::Admitted(_))
    }

    #[test]
    fn request_limit_admits_a_minutes_worth_then_waits_for_refill() {
        let s = MemoryStore::default();
        let k = key("c", &RPM);
        for left in [2, 1, 0] {
            assert_eq!(
                admit(&s, &k, &RPM, 0, 0),
                Admission::Admitted(Remaining { requests: Some(left), tokens: None })
            );
        }
        // 3 per minute: one more request every 20 s.
        match admit(&s, &k, &RPM, 5_000, 0) {
            Admission::Limited { retry_after_ms, by_tokens, .. } => {
                assert_eq!(retry_after_ms, 15_000);
                assert!(!by_tokens);
            }
            other => panic!("{other:?}"),
        }
        assert!(admitted(admit(&s, &k, &RPM, 20_000, 0)));
        assert!(!admitted(admit(&s, &k, &RPM, 20_001, 0)));
    }

    #[test]
    fn token_limit_charges_estimates_and_never_overshoots_at_admission() {
        let s = MemoryStore::default();
        let k = key("c", &TPM);
        let admitted_count = (0..20).filter(|_| admitted(admit(&s, &k, &TPM, 0, 101))).count();
        assert_eq!(admitted_count, 9); // 9 x 101 = 909 <= 1000 < 1010
        match admit(&s, &k, &TPM, 0, 101) {
            Admission::Limited { retry_after_ms, by_tokens, remaining } => {
                assert!(by_tokens);
                assert_eq!(remaining.tokens, Some(91));
                // 10 more tokens at 1000/min = 600 ms.
                assert_eq!(retry_after_ms, 600);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn corrections_refund_and_charge() {
        let s = MemoryStore::default();
        let k = key("c", &TPM);
        assert!(admitted(admit(&s, &k, &TPM, 0, 900)));
        assert!(!admitted(admit(&s, &k, &TPM, 0, 200)));
        let used = |charged_tokens, used_tokens| Settlement { charged_tokens, used_tokens, refund_request: false };
        settle(&s, &k, &TPM, 0, used(900, 50));
        assert!(admitted(admit(&s, &k, &TPM, 0, 200)));
        settle(&s, &k, &TPM, 0, used(0, 5_000)); // used far more than estimated: debt
        assert!(!admitted(admit(&s, &k, &TPM, 0, 1)));
    }

    #[test]
    fn unserved_requests_are_refunded() {
        let s = MemoryStore::default();
        let k = key("c", &RPM);
        for _ in 0..3 {
            assert!(admitted(admit(&s, &k, &RPM, 0, 0)));
        }
        settle(&s, &k, &RPM, 0, Settlement { charged_tokens: 0, used_tokens: 0, refund_request: true });
        assert!(admitted(admit(&s, &k, &RPM, 0, 0)));
        assert!(!admitted(admit(&s, &k, &RPM, 0, 0)));
    }

    #[test]
    fn oversized_request_passes_only_on_a_full_bucket() {
        let s = MemoryStore::default();
        let k = key("c", &TPM);
        assert!(admitted(admit(&s, &k, &TPM, 0, 5_000)));
        match admit(&s, &k, &TPM, 1_000, 5_000) {
            Admission::Limited { retry_after_ms, .. } => assert!(retry_after_ms > 59_000),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn admission_fails_open_when_every_cas_try_conflicts() {
        let s = MemoryStore::default();
        let k = key("c", &RPM);
        s.conflicts_to_inject.set(store::CAS_ATTEMPTS as u32);
        assert_eq!(admit(&s, &k, &RPM, 0, 0), Admission::Admitted(Remaining::default()));
        // Nothing was charged: the bucket is still full afterwards.
        for _ in 0..3 {
            assert!(admitted(admit(&s, &k, &RPM, 0, 0)));
        }
        assert!(!admitted(admit(&s, &k, &RPM, 0, 0)));
    }

    #[test]
    fn no_limits_admit_without_touching_the_store() {
        let s = MemoryStore::default();
        let none = Limits { requests_per_minute: None, tokens_per_minute: None };
        assert!(admitted(admit(&s, "k", &none, 0, 10)));
        assert_eq!(s.get("k"), (None, None));
    }
}
