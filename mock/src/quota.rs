//! Azure-like fixed-window quota accounting (requests and tokens per window).
//!
//! Time is passed in explicitly (`now_ms`, any monotonic millisecond clock) so
//! the logic is deterministic under test.

/// Which limit rejected a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// The per-window request ("call") limit.
    Requests,
    /// The per-window token limit.
    Tokens,
}

/// Remaining quota after a decision; `None` means that limit is not set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Remaining {
    pub requests: Option<u64>,
    pub tokens: Option<u64>,
}

/// A rejected admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub kind: LimitKind,
    /// Milliseconds until the current window resets (>= 1).
    pub reset_in_ms: u64,
    pub remaining: Remaining,
}

impl Rejection {
    /// `retry-after` value: whole seconds until reset, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        self.reset_in_ms.div_ceil(1000).max(1)
    }
}

/// Fixed-window quota. A window starts at the first request after the previous
/// window expired (or after a reset) and lasts `window_ms`.
#[derive(Debug, Clone)]
pub struct Quota {
    pub requests_per_window: Option<u64>,
    pub tokens_per_window: Option<u64>,
    pub window_ms: u64,
    window_start: Option<u64>,
    used_requests: u64,
    used_tokens: u64,
}

impl Quota {
    pub fn new(requests_per_window: Option<u64>, tokens_per_window: Option<u64>, window_ms: u64) -> Self {
        Quota {
            requests_per_window,
            tokens_per_window,
            window_ms: window_ms.max(1),
            window_start: None,
            used_requests: 0,
            used_tokens: 0,
        }
    }

    /// Forget the current window (next request opens a new one).
    pub fn reset(&mut self) {
        self.window_start = None;
        self.used_requests = 0;
        self.used_tokens = 0;
    }

    fn roll(&mut self, now_ms: u64) {
        if let Some(start) = self.window_start {
            if now_ms >= start.saturating_add(self.window_ms) {
                self.reset();
            }
        }
    }

    /// Remaining quota at `now_ms` without consuming anything.
    pub fn remaining(&mut self, now_ms: u64) -> Remaining {
        self.roll(now_ms);
        Remaining {
            requests: self.requests_per_window.map(|l| l.saturating_sub(self.used_requests)),
            tokens: self.tokens_per_window.map(|l| l.saturating_sub(self.used_tokens)),
        }
    }

    /// How much of the current window's quota is used, in tenths of a
    /// percent (875 = 87.5 %), rounded down and capped at 1000: of the token
    /// limit when one is set, else of the request limit; `None` without
    /// limits. A limit of 0 counts as full (nothing more fits).
    pub fn used_permille(&mut self, now_ms: u64) -> Option<u64> {
        self.roll(now_ms);
        let (used, limit) = match (self.tokens_per_window, self.requests_per_window) {
            (Some(limit), _) => (self.used_tokens, limit),
            (None, Some(limit)) => (self.used_requests, limit),
            (None, None) => return None,
        };
        if limit == 0 {
            return Some(1000);
        }
        // u128: `used * 1000` must not overflow for any u64 count.
        let permille = (u128::from(used) * 1000 / u128::from(limit)).min(1000);
        Some(u64::try_from(permille).unwrap_or(1000))
    }

    /// Try to admit one request charging `tokens`. On success the quota is
    /// consumed and the remaining quota returned; on rejection nothing is consumed.
    pub fn try_admit(&mut self, now_ms: u64, tokens: u64) -> Result<Remaining, Rejection> {
        self.roll(now_ms);
        let start = *self.window_start.get_or_insert(now_ms);
        let over_requests = self.requests_per_window.is_some_and(|l| self.used_requests.saturating_add(1) > l);
        let over_tokens = self.tokens_per_window.is_some_and(|l| self.used_tokens.saturating_add(tokens) > l);
        if over_requests || over_tokens {
            let reset_in_ms = start.saturating_add(self.window_ms).saturating_sub(now_ms).max(1);
            let remaining = self.remaining(now_ms);
            return Err(Rejection {
                kind: if over_requests { LimitKind::Requests } else { LimitKind::Tokens },
                reset_in_ms,
                remaining,
            });
        }
        self.used_requests += 1;
        self.used_tokens = self.used_tokens.saturating_add(tokens);
        Ok(self.remaining(now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_admits_everything() {
        let mut q = Quota::new(None, None, 1000);
        for i in 0..100 {
            assert_eq!(q.try_admit(i, 1_000_000), Ok(Remaining::default()));
        }
    }

    #[test]
    fn request_limit_and_window_reset() {
        let mut q = Quota::new(Some(2), None, 1000);
        assert_eq!(q.try_admit(100, 5).map(|r| r.requests), Ok(Some(1)));
        assert_eq!(q.try_admit(200, 5).map(|r| r.requests), Ok(Some(0)));
        let rej = q.try_admit(600, 5).unwrap_err();
        assert_eq!(rej.kind, LimitKind::Requests);
        assert_eq!(rej.reset_in_ms, 500); // window started at 100
        assert_eq!(rej.retry_after_secs(), 1);
        assert_eq!(rej.remaining.requests, Some(0));
        // Still rejected just before the boundary, admitted at it.
        assert!(q.try_admit(1099, 5).is_err());
        assert_eq!(q.try_admit(1100, 5).map(|r| r.requests), Ok(Some(1)));
    }

    #[test]
    fn token_limit_and_rejection_consumes_nothing() {
        let mut q = Quota::new(None, Some(100), 60_000);
        assert_eq!(q.try_admit(0, 60).map(|r| r.tokens), Ok(Some(40)));
        let rej = q.try_admit(1500, 41).unwrap_err();
        assert_eq!(rej.kind, LimitKind::Tokens);
        assert_eq!(rej.reset_in_ms, 58_500);
        assert_eq!(rej.retry_after_secs(), 59);
        assert_eq!(rej.remaining.tokens, Some(40));
        // The rejected request did not consume anything: 40 still fits exactly.
        assert_eq!(q.try_admit(1600, 40).map(|r| r.tokens), Ok(Some(0)));
        assert!(q.try_admit(1700, 1).is_err());
    }

    #[test]
    fn request_limit_reported_before_token_limit() {
        let mut q = Quota::new(Some(1), Some(10), 1000);
        q.try_admit(0, 1).unwrap();
        assert_eq!(q.try_admit(1, 100).unwrap_err().kind, LimitKind::Requests);
    }

    #[test]
    fn used_share_of_tokens_else_requests() {
        assert_eq!(Quota::new(None, None, 1000).used_permille(0), None);
        let mut q = Quota::new(Some(3), Some(32), 1000);
        assert_eq!(q.used_permille(0), Some(0));
        q.try_admit(0, 28).unwrap();
        assert_eq!(q.used_permille(1), Some(875), "tokens first: 28 of 32");
        // A rejected request changes nothing.
        assert!(q.try_admit(2, 5).is_err());
        assert_eq!(q.used_permille(3), Some(875));
        q.try_admit(4, 4).unwrap();
        assert_eq!(q.used_permille(5), Some(1000));
        assert_eq!(q.used_permille(1000), Some(0), "a new window");

        let mut q = Quota::new(Some(3), None, 1000);
        q.try_admit(0, 99).unwrap();
        assert_eq!(q.used_permille(0), Some(333), "requests: 1 of 3, rounded down");
        q.try_admit(0, 0).unwrap();
        assert_eq!(q.used_permille(0), Some(666));
        assert_eq!(Quota::new(None, Some(0), 1000).used_permille(0), Some(1000), "a zero limit is full");
    }

    #[test]
    fn reset_and_remaining() {
        let mut q = Quota::new(Some(3), Some(30), 1000);
        q.try_admit(0, 10).unwrap();
        assert_eq!(q.remaining(10), Remaining { requests: Some(2), tokens: Some(20) });
        q.reset();
        assert_eq!(q.remaining(20), Remaining { requests: Some(3), tokens: Some(30) });
        // Window expiry also refills.
        q.try_admit(20, 30).unwrap();
        assert_eq!(q.remaining(1019), Remaining { requests: Some(2), tokens: Some(0) });
        assert_eq!(q.remaining(1020), Remaining { requests: Some(3), tokens: Some(30) });
    }
}
