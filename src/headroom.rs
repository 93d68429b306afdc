//! What each backend says it has left of its quota, learned from the
//! rate-limit headers on every answer (`x-ratelimit-remaining-requests`,
//! `x-ratelimit-remaining-tokens`, the `x-ratelimit-limit-*` pair when sent,
//! and a provisioned deployment's `azure-openai-deployment-utilization`).
//!
//! A record is a snapshot with the time it was learned. Azure counts a
//! deployment's tokens in a window that resets each minute (requests over
//! shorter ones), so what a backend has left stays as it said until its
//! window resets: when that is, a 429's `retry-after` or an
//! `x-ratelimit-reset-*` header tells; otherwise the record is forgotten —
//! "unknown", which routes like a backend that never said anything — once a
//! whole window has passed without news, and the next answer tells again.

/// Response headers that carry a backend's quota; see [`Observation::read`].
pub const REMAINING_REQUESTS: &str = "x-ratelimit-remaining-requests";
pub const REMAINING_TOKENS: &str = "x-ratelimit-remaining-tokens";
pub const LIMIT_REQUESTS: &str = "x-ratelimit-limit-requests";
pub const LIMIT_TOKENS: &str = "x-ratelimit-limit-tokens";
pub const UTILIZATION: &str = "azure-openai-deployment-utilization";
pub const RESET_REQUESTS: &str = "x-ratelimit-reset-requests";
pub const RESET_TOKENS: &str = "x-ratelimit-reset-tokens";

/// One answer's rate-limit headers, with nonsense already dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observation {
    pub requests: Option<u64>,
    pub tokens: Option<u64>,
    pub limit_requests: Option<u64>,
    pub limit_tokens: Option<u64>,
    /// Provisioned utilisation in tenths of a percent (875 = 87.5 %).
    pub utilization_permille: Option<u32>,
    /// How long until the limits reset (`x-ratelimit-reset-*`, the later).
    pub reset_ms: Option<u64>,
}

impl Observation {
    /// Reads the headers through `header`. `-1`, negative, fractional or
    /// garbage values are unknown; a remaining `0` is believed only when the
    /// answer is a 429 or names a limit (some APIs send `0` when they do not
    /// count at all).
    pub fn read(header: &dyn Fn(&str) -> Option<String>, status: u32) -> Observation {
        let number = |name: &str| header(name).and_then(|v| v.trim().parse::<u64>().ok());
        let limit_requests = number(LIMIT_REQUESTS).filter(|&n| n > 0);
        let limit_tokens = number(LIMIT_TOKENS).filter(|&n| n > 0);
        let believed = |value: Option<u64>, limit: Option<u64>| {
            value.filter(|&n| n > 0 || status == 429 || limit.is_some()).map(|n| limit.map_or(n, |l| n.min(l)))
        };
        Observation {
            requests: believed(number(REMAINING_REQUESTS), limit_requests),
            tokens: believed(number(REMAINING_TOKENS), limit_tokens),
            limit_requests,
            limit_tokens,
            utilization_permille: header(UTILIZATION).and_then(|v| parse_percent(&v)),
            reset_ms: [RESET_REQUESTS, RESET_TOKENS]
                .iter()
                .filter_map(|name| header(name).and_then(|v| parse_duration_ms(&v)))
                .max(),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Observation::default()
    }

    /// The backend still had requests and tokens, just not enough tokens for
    /// the request it refused: a 429 about that request's size, not a
    /// throttle for everyone.
    pub fn refused_for_size(&self) -> bool {
        self.requests.is_none_or(|n| n > 0) && self.tokens.is_some_and(|n| n > 0)
    }
}

/// `x-ratelimit-reset-*` values: `6m0s`, `1.5s`, `20ms`, `1h2m3s`, or plain
/// seconds; at most a day. Anything else is unknown.
fn parse_duration_ms(value: &str) -> Option<u64> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return secs.checked_mul(1000).filter(|&ms| ms <= DAY_MS);
    }
    let (mut total, mut rest) = (0f64, v);
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (number, tail) = rest.split_at(digits);
        let number: f64 = number.parse().ok()?;
        let unit = tail.find(|c: char| c.is_ascii_digit()).unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit);
        total += number
            * match unit {
                "h" => 3_600_000.0,
                "m" => 60_000.0,
                "s" => 1_000.0,
                "ms" => 1.0,
                _ => return None,
            };
        rest = tail;
    }
    (total.is_finite() && total >= 0.0 && total <= DAY_MS as f64).then(|| total.ceil() as u64)
}

const DAY_MS: u64 = 86_400_000;

/// `87.5%` → 875. Values above 100 % are kept (a full provisioned
/// deployment reports them); anything else is unknown.
fn parse_percent(value: &str) -> Option<u32> {
    let number = value.trim().strip_suffix('%').unwrap_or(value.trim()).trim();
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u32 = whole.parse().ok().filter(|&w| w <= 10_000)?;
    let tenth = fraction.bytes().next().map_or(0, |b| u32::from(b - b'0'));
    Some(whole * 10 + tenth)
}

/// What is known about one backend's quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Headroom {
    pub requests: Option<u64>,
    pub tokens: Option<u64>,
    /// The limits: from the limit headers, else the most ever seen remaining
    /// in this record's life (a lower bound of the limit).
    pub limit_requests: Option<u64>,
    pub limit_tokens: Option<u64>,
    pub utilization_permille: Option<u32>,
    /// Monotonic ms when learned; 0 = nothing known.
    pub learned_ms: u64,
    /// Monotonic ms when the backend said its limits are back (a 429's
    /// `retry-after`, `x-ratelimit-reset-*`); 0 = not said.
    pub back_at_ms: u64,
    /// `limit_tokens` came from the backend's limit header (not the peak).
    pub tokens_limit_reported: bool,
}

/// How a request of a given size fits a backend's known headroom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Nothing known (or forgotten): route as if quotas did not exist.
    Unknown,
    /// Enough is left; `share` is the fraction of the limit left, in
    /// thousandths (1000 when the limit is unknown).
    Covers { share: u32 },
    /// Not enough left for this request; enough is back at `at_ms`, as the
    /// backend said. 0: it did not say when (or the request is larger than
    /// its whole limit): only worth asking when no other backend can take
    /// the request, and then its answer tells.
    Short { at_ms: u64 },
}

impl Headroom {
    /// Takes in a new answer's observation at `now_ms`.
    pub fn learn(&mut self, seen: &Observation, now_ms: u64, window_ms: u64) {
        if seen.is_empty() {
            return;
        }
        let fresh = self.is_known(now_ms, window_ms);
        let peak = |limit: Option<u64>, old: Option<u64>, remaining: Option<u64>| {
            limit.or_else(|| {
                let old = old.filter(|_| fresh);
                match (old, remaining) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                }
            })
        };
        // A reset time said earlier still holds for this window.
        let back_at_ms = match seen.reset_ms {
            Some(ms) => now_ms.saturating_add(ms),
            None if self.back_at_ms > now_ms => self.back_at_ms,
            None => 0,
        };
        *self = Headroom {
            limit_requests: peak(seen.limit_requests, self.limit_requests, seen.requests),
            limit_tokens: peak(seen.limit_tokens, self.limit_tokens, seen.tokens),
            requests: seen.requests,
            tokens: seen.tokens,
            utilization_permille: seen.utilization_permille,
            learned_ms: now_ms.max(1),
            back_at_ms,
            tokens_limit_reported: seen.limit_tokens.is_some(),
        };
    }

    /// A 429 refused a request (estimated at `estimate` tokens) this backend
    /// had too little left for; its `retry-after` (`wait_ms`) is when that
    /// much is back. Whatever the reported numbers say, a request that size
    /// does not fit until then (the backend may count a prompt differently).
    pub fn refused(&mut self, now_ms: u64, wait_ms: u64, estimate: Option<u64>) {
        self.back_at_ms = self.back_at_ms.max(now_ms.saturating_add(wait_ms));
        if let Some(estimate) = estimate {
            let below = estimate.saturating_sub(1);
            self.tokens = Some(self.tokens.map_or(below, |t| t.min(below)));
        }
    }

    /// The record still says how things are: learned within the last
    /// window, and the backend's limits have not been reset since.
    pub fn is_known(&self, now_ms: u64, window_ms: u64) -> bool {
        let reset = self.back_at_ms > self.learned_ms && now_ms >= self.back_at_ms;
        self.learned_ms > 0 && now_ms.saturating_sub(self.learned_ms) < window_ms && !reset
    }

    /// Remaining (requests, tokens) at `now_ms`: as last reported, while the
    /// record is known.
    pub fn now(&self, now_ms: u64, window_ms: u64) -> (Option<u64>, Option<u64>) {
        if !self.is_known(now_ms, window_ms) {
            return (None, None);
        }
        (self.requests, self.tokens)
    }

    /// The provisioned utilisation last reported, while the record is known.
    pub fn utilization(&self, now_ms: u64, window_ms: u64) -> Option<u32> {
        self.utilization_permille.filter(|_| self.is_known(now_ms, window_ms))
    }

    /// How a request estimated at `tokens` fits.
    pub fn fit(&self, tokens: u64, now_ms: u64, window_ms: u64) -> Fit {
        let (requests_left, tokens_left) = self.now(now_ms, window_ms);
        if requests_left.is_none() && tokens_left.is_none() {
            return Fit::Unknown;
        }
        let short_requests = requests_left.is_some_and(|n| n < 1);
        let short_tokens = tokens_left.is_some_and(|n| n < tokens.max(1));
        if short_requests || short_tokens {
            // Larger than the whole limit the backend reports: never.
            if short_tokens && self.tokens_limit_reported && self.limit_tokens.is_some_and(|l| l < tokens) {
                return Fit::Short { at_ms: 0 };
            }
            // Back when the backend said; if it did not, its window may
            // have reset already.
            let at_ms = if self.back_at_ms > now_ms { self.back_at_ms } else { 0 };
            return Fit::Short { at_ms };
        }
        let share = |left: Option<u64>, limit: Option<u64>| match (left, limit) {
            (Some(left), Some(limit)) if limit > 0 => u32::try_from(left.saturating_mul(1000) / limit).unwrap_or(1000),
            _ => 1000,
        };
        let share = share(requests_left, self.limit_requests).min(share(tokens_left, self.limit_tokens)).min(1000);
        Fit::Covers { share }
    }

    /// Space-separated fields for the health table's text line: requests,
    /// tokens, their limits, utilisation and when learned; `-` for unknown.
    pub fn encode(&self, out: &mut String) {
        let field = |out: &mut String, v: Option<u64>| match v {
            Some(n) => out.push_str(&format!(" {n}")),
            None => out.push_str(" -"),
        };
        field(out, self.requests);
        field(out, self.tokens);
        field(out, self.limit_requests);
        field(out, self.limit_tokens);
        field(out, self.utilization_permille.map(u64::from));
        out.push_str(&format!(" {} {} {}", self.learned_ms, self.back_at_ms, u8::from(self.tokens_limit_reported)));
    }

    /// Reads what `encode` wrote; `None` on anything else.
    pub fn decode<'a>(mut fields: impl Iterator<Item = &'a str>) -> Option<Headroom> {
        let mut next = || -> Option<Option<u64>> {
            match fields.next()? {
                "-" => Some(None),
                n => n.parse().ok().map(Some),
            }
        };
        let (requests, tokens, limit_requests, limit_tokens, utilization) =
            (next()?, next()?, next()?, next()?, next()?);
        let learned_ms = next()??;
        let back_at_ms = next()??;
        let tokens_limit_reported = match next()?? {
            0 => false,
            1 => true,
            _ => return None,
        };
        Some(Headroom {
            requests,
            tokens,
            limit_requests,
            limit_tokens,
            utilization_permille: match utilization {
                Some(u) => Some(u32::try_from(u).ok()?),
                None => None,
            },
            learned_ms,
            back_at_ms,
            tokens_limit_reported,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: u64 = 60_000;

    fn seen(pairs: &[(&str, &str)], status: u32) -> Observation {
        let owned: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Observation::read(&|name: &str| owned.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()), status)
    }

    #[test]
    fn nonsense_values_are_unknown() {
        let o = seen(&[(REMAINING_REQUESTS, "-1"), (REMAINING_TOKENS, "abc"), (UTILIZATION, "lots")], 200);
        assert!(o.is_empty(), "{o:?}");
        // A zero from an API that names no limit says nothing.
        assert!(seen(&[(REMAINING_REQUESTS, "0"), (REMAINING_TOKENS, "0")], 200).is_empty());
        // With a limit, or on a 429, zero is believed.
        assert_eq!(seen(&[(REMAINING_TOKENS, "0"), (LIMIT_TOKENS, "1000")], 200).tokens, Some(0));
        assert_eq!(seen(&[(REMAINING_TOKENS, "0")], 429).tokens, Some(0));
        // A zero limit is no limit; remaining above the limit is capped.
        let o = seen(&[(REMAINING_TOKENS, "5000"), (LIMIT_TOKENS, "1000"), (LIMIT_REQUESTS, "0")], 200);
        assert_eq!((o.tokens, o.limit_tokens, o.limit_requests), (Some(1000), Some(1000), None));
    }

    #[test]
    fn utilization_reads_percentages() {
        assert_eq!(parse_percent("87.5%"), Some(875));
        assert_eq!(parse_percent(" 100% "), Some(1000));
        assert_eq!(parse_percent("12.345%"), Some(123));
        assert_eq!(parse_percent("104.2"), Some(1042));
        for bad in ["", "%", "-3%", "1e3%", "x%", ".5%", "99999999999%"] {
            assert_eq!(parse_percent(bad), None, "{bad}");
        }
    }

    #[test]
    fn headroom_holds_until_the_window_resets_and_is_then_forgotten() {
        let mut h = Headroom::default();
        assert_eq!(h.fit(10, 1_000, MINUTE), Fit::Unknown);
        h.learn(&seen(&[(REMAINING_TOKENS, "100"), (LIMIT_TOKENS, "6000")], 200), 1_000, MINUTE);
        assert_eq!(h.now(30_000, MINUTE), (None, Some(100)));
        assert_eq!(h.fit(50, 30_000, MINUTE), Fit::Covers { share: 16 });
        // Short, and nobody said when the window resets.
        assert_eq!(h.fit(150, 2_000, MINUTE), Fit::Short { at_ms: 0 });
        assert_eq!(h.fit(150, 61_000, MINUTE), Fit::Unknown);
        // More than the limit never fits.
        assert_eq!(h.fit(7_000, 1_000, MINUTE), Fit::Short { at_ms: 0 });
        // A reset header says when the window resets.
        h.learn(&seen(&[(REMAINING_TOKENS, "100"), (RESET_TOKENS, "6s")], 200), 10_000, MINUTE);
        assert_eq!(h.fit(150, 10_000, MINUTE), Fit::Short { at_ms: 16_000 });
        assert_eq!(h.fit(150, 16_000, MINUTE), Fit::Unknown);
        // An answer without one keeps the reset time said for this window.
        h.learn(&seen(&[(REMAINING_TOKENS, "80")], 200), 12_000, MINUTE);
        assert_eq!(h.fit(150, 12_000, MINUTE), Fit::Short { at_ms: 16_000 });
    }

    #[test]
    fn a_refusal_holds_larger_requests_until_its_retry_after() {
        let mut h = Headroom::default();
        h.learn(&seen(&[(REMAINING_REQUESTS, "10"), (REMAINING_TOKENS, "300")], 429), 1_000, MINUTE);
        h.refused(1_000, 4_000, Some(1_000));
        assert_eq!(h.fit(1_000, 2_000, MINUTE), Fit::Short { at_ms: 5_000 });
        assert_eq!(h.fit(200, 2_000, MINUTE), Fit::Covers { share: 1000 });
        assert_eq!(h.fit(1_000, 5_000, MINUTE), Fit::Unknown);
        // The backend counted more than the estimate: that size is out anyway.
        h.learn(&seen(&[(REMAINING_REQUESTS, "10"), (REMAINING_TOKENS, "300")], 429), 6_000, MINUTE);
        h.refused(6_000, 4_000, Some(250));
        assert_eq!(h.fit(250, 6_500, MINUTE), Fit::Short { at_ms: 10_000 });
        assert_eq!(h.fit(249, 6_500, MINUTE), Fit::Covers { share: 830 });
    }

    #[test]
    fn reset_durations() {
        for (text, ms) in [("6m0s", 360_000), ("1.5s", 1_500), ("20ms", 20), ("1h2m3s", 3_723_000), ("7", 7_000)] {
            assert_eq!(parse_duration_ms(text), Some(ms), "{text}");
        }
        for bad in ["", "s", "5x", "-1s", "1e9s", "2d", "100000000"] {
            assert_eq!(parse_duration_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn without_limits_the_peak_seen_stands_in() {
        let mut h = Headroom::default();
        h.learn(&seen(&[(REMAINING_REQUESTS, "10"), (REMAINING_TOKENS, "900")], 200), 1, MINUTE);
        h.learn(&seen(&[(REMAINING_REQUESTS, "9"), (REMAINING_TOKENS, "450")], 200), 100, MINUTE);
        assert_eq!((h.limit_requests, h.limit_tokens), (Some(10), Some(900)));
        assert_eq!(h.fit(100, 100, MINUTE), Fit::Covers { share: 500 });
        h.learn(&seen(&[(REMAINING_REQUESTS, "0")], 429), 200, MINUTE);
        assert_eq!(h.fit(1, 1_000, MINUTE), Fit::Short { at_ms: 0 });
        // A forgotten record starts its peak afresh.
        h.learn(&seen(&[(REMAINING_REQUESTS, "3")], 200), 90_000, MINUTE);
        assert_eq!(h.limit_requests, Some(3));
    }

    #[test]
    fn a_429_with_tokens_left_is_about_the_requests_size() {
        assert!(seen(&[(REMAINING_REQUESTS, "5"), (REMAINING_TOKENS, "300")], 429).refused_for_size());
        assert!(seen(&[(REMAINING_TOKENS, "300")], 429).refused_for_size());
        assert!(!seen(&[(REMAINING_REQUESTS, "0"), (REMAINING_TOKENS, "300")], 429).refused_for_size());
        assert!(!seen(&[(REMAINING_REQUESTS, "5"), (REMAINING_TOKENS, "0")], 429).refused_for_size());
        assert!(!seen(&[], 429).refused_for_size());
    }

    #[test]
    fn encoding_round_trips() {
        let mut h = Headroom::default();
        h.learn(&seen(&[(REMAINING_TOKENS, "7"), (LIMIT_TOKENS, "100"), (UTILIZATION, "42.5%")], 200), 5, MINUTE);
        let mut line = String::new();
        h.encode(&mut line);
        assert_eq!(line, " - 7 - 100 425 5 0 1");
        assert_eq!(Headroom::decode(line.split_whitespace()), Some(h));
        assert_eq!(Headroom::decode("1 2 3".split_whitespace()), None);
        assert_eq!(Headroom::decode("1 2 3 4 99999999999 5 0 1".split_whitespace()), None);
        assert_eq!(Headroom::decode("1 2 3 4 5 6 0 2".split_whitespace()), None);
    }
}
