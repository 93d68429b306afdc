//! What each backend says it has left of its quota, learned from the
//! rate-limit headers on every answer (`x-ratelimit-remaining-requests`,
//! `x-ratelimit-remaining-tokens`, the `x-ratelimit-limit-*` pair when sent,
//! and a provisioned deployment's `azure-openai-deployment-utilization`).
//!
//! A record is a snapshot with the time it was learned. It refills towards
//! the limit over the quota window (Azure's limits are per minute) and is
//! forgotten — "unknown", which routes like a backend that never said
//! anything — once a whole window has passed without news.

/// Response headers that carry a backend's quota; see [`Observation::read`].
pub const REMAINING_REQUESTS: &str = "x-ratelimit-remaining-requests";
pub const REMAINING_TOKENS: &str = "x-ratelimit-remaining-tokens";
pub const LIMIT_REQUESTS: &str = "x-ratelimit-limit-requests";
pub const LIMIT_TOKENS: &str = "x-ratelimit-limit-tokens";
pub const UTILIZATION: &str = "azure-openai-deployment-utilization";

/// One answer's rate-limit headers, with nonsense already dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observation {
    pub requests: Option<u64>,
    pub tokens: Option<u64>,
    pub limit_requests: Option<u64>,
    pub limit_tokens: Option<u64>,
    /// Provisioned utilisation in tenths of a percent (875 = 87.5 %).
    pub utilization_permille: Option<u32>,
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
}

/// How a request of a given size fits a backend's known headroom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Nothing known (or forgotten): route as if quotas did not exist.
    Unknown,
    /// Enough is left; `share` is the fraction of the limit left, in
    /// thousandths (1000 when the limit is unknown).
    Covers { share: u32 },
    /// Not enough left for this request; enough should be back at `at_ms`
    /// (0 when that cannot be said).
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
        *self = Headroom {
            limit_requests: peak(seen.limit_requests, self.limit_requests, seen.requests),
            limit_tokens: peak(seen.limit_tokens, self.limit_tokens, seen.tokens),
            requests: seen.requests,
            tokens: seen.tokens,
            utilization_permille: seen.utilization_permille,
            learned_ms: now_ms.max(1),
        };
    }

    pub fn is_known(&self, now_ms: u64, window_ms: u64) -> bool {
        self.learned_ms > 0 && now_ms.saturating_sub(self.learned_ms) < window_ms
    }

    /// Remaining (requests, tokens) at `now_ms`: the snapshot plus what the
    /// window has refilled since, never above the limit.
    pub fn now(&self, now_ms: u64, window_ms: u64) -> (Option<u64>, Option<u64>) {
        if !self.is_known(now_ms, window_ms) {
            return (None, None);
        }
        let elapsed = now_ms.saturating_sub(self.learned_ms);
        let refill = |left: Option<u64>, limit: Option<u64>| {
            left.map(|left| match limit {
                Some(limit) => {
                    let back = u128::from(limit) * u128::from(elapsed) / u128::from(window_ms.max(1));
                    left.saturating_add(u64::try_from(back).unwrap_or(u64::MAX)).min(limit.max(left))
                }
                None => left,
            })
        };
        (refill(self.requests, self.limit_requests), refill(self.tokens, self.limit_tokens))
    }

    /// The provisioned utilisation last reported, while the record counts.
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
            // When the refill since the snapshot makes up what is missing.
            let at = |needed: u64, snapshot: Option<u64>, limit: Option<u64>| {
                let missing = needed.saturating_sub(snapshot.unwrap_or(0));
                limit.filter(|&l| l >= needed).map(|l| {
                    let ms = (u128::from(missing) * u128::from(window_ms)).div_ceil(u128::from(l));
                    self.learned_ms.saturating_add(u64::try_from(ms).unwrap_or(u64::MAX))
                })
            };
            let requests_at = if short_requests { at(1, self.requests, self.limit_requests) } else { Some(now_ms) };
            let tokens_at = if short_tokens { at(tokens.max(1), self.tokens, self.limit_tokens) } else { Some(now_ms) };
            let at_ms = match (requests_at, tokens_at) {
                (Some(a), Some(b)) => a.max(b).max(now_ms),
                _ => 0,
            };
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
        out.push_str(&format!(" {}", self.learned_ms));
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
    fn headroom_refills_over_the_window_and_is_then_forgotten() {
        let mut h = Headroom::default();
        assert_eq!(h.fit(10, 1_000, MINUTE), Fit::Unknown);
        h.learn(&seen(&[(REMAINING_TOKENS, "100"), (LIMIT_TOKENS, "6000")], 200), 1_000, MINUTE);
        assert_eq!(h.now(1_000, MINUTE), (None, Some(100)));
        // 6000 per minute: 100 a second come back.
        assert_eq!(h.now(2_000, MINUTE), (None, Some(200)));
        assert_eq!(h.now(59_000, MINUTE), (None, Some(5_900)));
        assert_eq!(h.fit(150, 1_000, MINUTE), Fit::Short { at_ms: 1_500 });
        // More than the limit never fits.
        assert_eq!(h.fit(7_000, 1_000, MINUTE), Fit::Short { at_ms: 0 });
        assert_eq!(h.fit(150, 1_600, MINUTE), Fit::Covers { share: 26 });
        assert_eq!(h.fit(150, 61_000, MINUTE), Fit::Unknown);
    }

    #[test]
    fn without_limits_the_peak_seen_stands_in_and_nothing_refills() {
        let mut h = Headroom::default();
        h.learn(&seen(&[(REMAINING_REQUESTS, "10"), (REMAINING_TOKENS, "900")], 200), 1, MINUTE);
        h.learn(&seen(&[(REMAINING_REQUESTS, "9"), (REMAINING_TOKENS, "450")], 200), 100, MINUTE);
        assert_eq!((h.limit_requests, h.limit_tokens), (Some(10), Some(900)));
        assert_eq!(h.fit(100, 100, MINUTE), Fit::Covers { share: 500 });
        h.learn(&seen(&[(REMAINING_REQUESTS, "0")], 429), 200, MINUTE);
        assert_eq!(h.fit(1, 1_000, MINUTE), Fit::Short { at_ms: 6_200 });
        assert_eq!(h.fit(1, 6_200, MINUTE), Fit::Covers { share: 100 });
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
        assert_eq!(line, " - 7 - 100 425 5");
        assert_eq!(Headroom::decode(line.split_whitespace()), Some(h));
        assert_eq!(Headroom::decode("1 2 3".split_whitespace()), None);
        assert_eq!(Headroom::decode("1 2 3 4 99999999999 5".split_whitespace()), None);
    }
}
