//! Per-backend health: throttle deadline and circuit breaker. One record per
//! backend, all records in one shared-data value so a request reads them with
//! one host call.

use crate::config::CircuitBreaker;
use crate::headroom::Headroom;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Health {
    /// Epoch ms until which the backend answered "throttled" (429).
    pub throttled_until_ms: u64,
    /// 5xx answers and connection failures in a row.
    pub consecutive_failures: u32,
    /// Epoch ms until which the open circuit keeps the backend out.
    pub open_until_ms: u64,
    /// Epoch ms until which a half-open probe request is in flight.
    pub probe_until_ms: u64,
    /// What the backend last said it has left of its quota.
    pub headroom: Headroom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Available,
    /// The circuit's open time has passed: one probe request may go.
    NeedsProbe,
    /// Out until this epoch ms.
    Unavailable {
        until_ms: u64,
    },
}

impl Health {
    pub fn availability(&self, now_ms: u64, cb: &CircuitBreaker) -> Availability {
        let mut until = 0;
        if self.throttled_until_ms > now_ms {
            until = self.throttled_until_ms;
        }
        if self.consecutive_failures >= cb.consecutive_failures {
            if self.open_until_ms > now_ms {
                until = until.max(self.open_until_ms);
            } else if self.probe_until_ms > now_ms {
                until = until.max(self.probe_until_ms);
            } else if until == 0 {
                return Availability::NeedsProbe;
            }
        }
        if until > 0 {
            Availability::Unavailable { until_ms: until }
        } else {
            Availability::Available
        }
    }

    pub fn record_throttle(&mut self, now_ms: u64, wait_ms: u64) {
        self.throttled_until_ms = self.throttled_until_ms.max(now_ms.saturating_add(wait_ms));
    }

    /// A 5xx or a connection failure. Opens (or re-opens) the circuit once the
    /// run of failures reaches the threshold.
    pub fn record_failure(&mut self, now_ms: u64, cb: &CircuitBreaker) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if self.consecutive_failures >= cb.consecutive_failures {
            self.open_until_ms = now_ms.saturating_add(cb.open_ms);
            self.probe_until_ms = 0;
        }
    }

    /// Envoy has no host to send to (its name does not resolve): open the
    /// circuit at once; failing the same way `consecutive_failures` more
    /// times first would only cost that many clients a 503.
    pub fn record_unreachable(&mut self, now_ms: u64, cb: &CircuitBreaker) {
        self.consecutive_failures = self.consecutive_failures.max(cb.consecutive_failures.saturating_sub(1));
        self.record_failure(now_ms, cb);
    }

    /// Any answer that shows the backend works (not 5xx, not 429).
    pub fn record_success(&mut self) {
        self.consecutive_failures = 0;
        self.open_until_ms = 0;
        self.probe_until_ms = 0;
    }

    /// True when recording a success would change nothing, so the common
    /// path can skip a shared-data write.
    pub fn is_clean(&self) -> bool {
        self.consecutive_failures == 0 && self.open_until_ms == 0 && self.probe_until_ms == 0
    }
}

/// Health of every backend, indexed like `Config::backends`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthTable {
    pub entries: Vec<Health>,
}

impl HealthTable {
    pub fn new(len: usize) -> Self {
        HealthTable { entries: vec![Health::default(); len] }
    }

    pub fn get(&self, i: usize) -> Health {
        self.entries.get(i).copied().unwrap_or_default()
    }

    pub fn get_mut(&mut self, i: usize) -> Option<&mut Health> {
        self.entries.get_mut(i)
    }

    /// Text encoding, one line per backend: `name throttled fails open probe`,
    /// followed by the headroom fields when anything is known.
    /// Names (not positions) key the records so a config reload that reorders
    /// or adds backends keeps what is known about the others.
    pub fn encode(&self, names: &[&str]) -> Vec<u8> {
        let mut out = String::with_capacity(names.len() * 48);
        for (name, h) in names.iter().zip(&self.entries) {
            if *h == Health::default() {
                continue;
            }
            out.push_str(&format!(
                "{name} {} {} {} {}",
                h.throttled_until_ms, h.consecutive_failures, h.open_until_ms, h.probe_until_ms
            ));
            if h.headroom != Headroom::default() {
                h.headroom.encode(&mut out);
            }
            out.push('\n');
        }
        out.into_bytes()
    }

    /// Decodes what `encode` wrote; unknown names and malformed lines are
    /// skipped (they can only come from another config generation).
    pub fn decode(bytes: &[u8], names: &[&str]) -> HealthTable {
        let mut table = HealthTable::new(names.len());
        let Ok(text) = std::str::from_utf8(bytes) else {
            return table;
        };
        for line in text.lines() {
            let mut parts = line.split(' ');
            let Some(name) = parts.next() else { continue };
            let Some(i) = names.iter().position(|n| *n == name) else { continue };
            let mut number = || parts.next().and_then(|p| p.parse::<u64>().ok());
            let (Some(t), Some(f), Some(o), Some(p)) = (number(), number(), number(), number()) else { continue };
            let headroom = Headroom::decode(&mut parts).unwrap_or_default();
            if let Some(h) = table.entries.get_mut(i) {
                *h = Health {
                    throttled_until_ms: t,
                    consecutive_failures: u32::try_from(f).unwrap_or(u32::MAX),
                    open_until_ms: o,
                    probe_until_ms: p,
                    headroom,
                };
            }
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CB: CircuitBreaker = CircuitBreaker { consecutive_failures: 3, open_ms: 30_000 };

    #[test]
    fn throttle_makes_unavailable_until_deadline() {
        let mut h = Health::default();
        h.record_throttle(1_000, 5_000);
        assert_eq!(h.availability(1_000, &CB), Availability::Unavailable { until_ms: 6_000 });
        assert_eq!(h.availability(5_999, &CB), Availability::Unavailable { until_ms: 6_000 });
        assert_eq!(h.availability(6_000, &CB), Availability::Available);
    }

    #[test]
    fn a_shorter_throttle_does_not_shorten_a_longer_one() {
        let mut h = Health::default();
        h.record_throttle(0, 10_000);
        h.record_throttle(1_000, 1_000);
        assert_eq!(h.throttled_until_ms, 10_000);
    }

    #[test]
    fn circuit_opens_after_consecutive_failures_then_probes() {
        let mut h = Health::default();
        h.record_failure(0, &CB);
        h.record_failure(0, &CB);
        assert_eq!(h.availability(0, &CB), Availability::Available);
        h.record_failure(100, &CB);
        assert_eq!(h.availability(100, &CB), Availability::Unavailable { until_ms: 30_100 });
        assert_eq!(h.availability(30_100, &CB), Availability::NeedsProbe);
        // A probe is in flight: nobody else goes.
        h.probe_until_ms = 40_000;
        assert_eq!(h.availability(30_200, &CB), Availability::Unavailable { until_ms: 40_000 });
        // Probe failed: open again for the full time.
        h.record_failure(31_000, &CB);
        assert_eq!(h.availability(31_000, &CB), Availability::Unavailable { until_ms: 61_000 });
        // Probe succeeded: closed.
        h.record_success();
        assert_eq!(h.availability(31_000, &CB), Availability::Available);
        assert!(h.is_clean());
    }

    #[test]
    fn success_between_failures_resets_the_run() {
        let mut h = Health::default();
        h.record_failure(0, &CB);
        h.record_failure(0, &CB);
        h.record_success();
        h.record_failure(0, &CB);
        assert_eq!(h.availability(0, &CB), Availability::Available);
    }

    #[test]
    fn throttle_and_open_circuit_take_the_later_deadline() {
        let mut h = Health::default();
        for _ in 0..3 {
            h.record_failure(0, &CB);
        }
        h.record_throttle(0, 50_000);
        assert_eq!(h.availability(0, &CB), Availability::Unavailable { until_ms: 50_000 });
        assert_eq!(h.availability(40_000, &CB), Availability::Unavailable { until_ms: 50_000 });
        assert_eq!(h.availability(50_000, &CB), Availability::NeedsProbe);
    }

    #[test]
    fn encoding_round_trips_by_name() {
        let mut t = HealthTable::new(3);
        t.entries[1].record_throttle(5, 10);
        t.entries[2].record_failure(7, &CB);
        let bytes = t.encode(&["a", "b", "c"]);
        assert_eq!(HealthTable::decode(&bytes, &["a", "b", "c"]), t);
        // Reordered / renamed config keeps known backends.
        let re = HealthTable::decode(&bytes, &["c", "x", "b"]);
        assert_eq!(re.entries[0], t.entries[2]);
        assert_eq!(re.entries[1], Health::default());
        assert_eq!(re.entries[2], t.entries[1]);
        assert_eq!(HealthTable::decode(b"garbage\n\xff", &["a"]), HealthTable::new(1));
    }
}
