//! Metric names. proxy-wasm metrics have names, not labels: labels are
//! encoded as `.key.value` pairs after the metric name (keys from
//! `contract::metric::LABELS`), and the renderer adds Envoy `stats_tags` that
//! turn each pair back into a Prometheus label, so `/stats/prometheus` shows
//! `spillway_tokens_total{client="a",...}`.

pub const UPSTREAM_REQUESTS: &str = "spillway_upstream_requests_total";
pub const FAILOVERS: &str = "spillway_failovers_total";
pub const THROTTLE_EVENTS: &str = "spillway_throttle_events_total";
/// 429s about one request's size: the backend had quota left, just not
/// enough for that request; it stays in rotation for smaller ones.
pub const SIZED_OUT_EVENTS: &str = "spillway_sized_out_total";
/// Streams failed over before their first content (`reason`: `error`,
/// `rate_limited`); first-token timeouts count as attempts lost.
pub const FIRST_TOKEN_FAILOVERS: &str = "spillway_first_token_failovers_total";
/// Requests held for a backend to come back instead of a 429
/// (`wait_for_backend_ms`); each hold counts.
pub const WAITS: &str = "spillway_waits_total";
/// The rate-limit service (global client limits) did not answer; `reason`:
/// `admitted` (failure_mode open), `refused` (closed), `correction` (usage
/// beyond an estimate could not be charged).
pub const LIMIT_SERVICE_FAILURES: &str = "spillway_limit_service_failures_total";
pub const CIRCUIT_OPENS: &str = "spillway_circuit_opens_total";
pub const BACKEND_THROTTLED: &str = "spillway_backend_throttled";
pub const BACKEND_CIRCUIT_OPEN: &str = "spillway_backend_circuit_open";
pub const REQUESTS: &str = "spillway_requests_total";
pub const LOCAL_REPLIES: &str = "spillway_local_replies_total";
pub const AUTH_FAILURES: &str = "spillway_auth_failures_total";
pub const TOKENS: &str = "spillway_tokens_total";
pub const ANSWERS_CUT: &str = "spillway_answers_cut_total";
pub const VM_MEMORY: &str = "spillway_vm_memory_bytes";
pub const SHARED_DATA_KEYS: &str = "spillway_shared_data_keys";
pub const HOST_CALLS: &str = "spillway_host_calls_total";

/// Label values clients choose (deployment and model names) are capped, so
/// no client can create unbounded Envoy stats: at most this many distinct
/// values per worker (the rest count under `other`), each at most
/// `MAX_LABEL_LEN` characters.
pub const MAX_CLIENT_LABEL_VALUES: usize = 64;
pub const MAX_LABEL_LEN: usize = 64;

/// The client-chosen label values one worker has used so far.
#[derive(Debug, Default)]
pub struct ClientLabels {
    seen: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl ClientLabels {
    /// `value` cut to `MAX_LABEL_LEN`, or `other` once the worker has used
    /// `MAX_CLIENT_LABEL_VALUES` other values.
    pub fn label(&self, value: &str) -> String {
        let cut: String = value.chars().take(MAX_LABEL_LEN).collect();
        let mut seen = self.seen.borrow_mut();
        if seen.contains(&cut) {
            return cut;
        }
        if seen.len() >= MAX_CLIENT_LABEL_VALUES {
            return "other".to_string();
        }
        seen.insert(cut.clone());
        cut
    }
}

/// FNV-1a, for maps keyed by metric names: the names are ours (label values
/// capped and bounded), so the hash need not resist flooding, and it is
/// several times cheaper than the standard SipHash on every event.
#[derive(Debug, Clone, Copy, Default)]
pub struct NameHasher(u64);

impl std::hash::Hasher for NameHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

pub type NameHash = std::hash::BuildHasherDefault<NameHasher>;

pub trait Metrics {
    fn add(&self, name: &str, value: u64);
    fn set(&self, name: &str, value: u64);
    /// One sample of a histogram.
    fn record(&self, name: &str, value: u64);
}

/// `metric.key.value...`; values are reduced to `[A-Za-z0-9_-]` so a dot in
/// a deployment name cannot split a label.
pub fn name(metric: &str, labels: &[(&str, &str)]) -> String {
    let label_len: usize = labels.iter().map(|(k, v)| k.len() + v.len().max(4) + 2).sum();
    let mut out = String::with_capacity(metric.len() + label_len);
    out.push_str(metric);
    let safe = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    for (k, v) in labels {
        out.push('.');
        out.push_str(k);
        out.push('.');
        if v.is_empty() {
            out.push_str("none");
        } else if v.chars().all(safe) {
            // The usual case (our names, status classes): one copy.
            out.push_str(v);
        } else {
            out.extend(v.chars().map(|c| if safe(c) { c } else { '_' }));
        }
    }
    out
}

/// "2xx" for 200; "none" when there was no status.
pub fn status_class(status: u32) -> String {
    if (100..600).contains(&status) {
        format!("{}xx", status / 100)
    } else {
        "none".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_chosen_label_values_are_capped_in_length_and_count() {
        let labels = ClientLabels::default();
        assert_eq!(labels.label(&"d".repeat(500)).len(), MAX_LABEL_LEN);
        for i in 1..MAX_CLIENT_LABEL_VALUES {
            assert_eq!(labels.label(&format!("deployment-{i}")), format!("deployment-{i}"));
        }
        assert_eq!(labels.label("one-too-many"), "other");
        // Values already in use keep their label.
        assert_eq!(labels.label("deployment-1"), "deployment-1");
    }

    #[test]
    fn names_encode_labels_safely() {
        assert_eq!(
            name(TOKENS, &[("client", "team-a"), ("deployment", "gpt-4.1"), ("kind", "prompt")]),
            "spillway_tokens_total.client.team-a.deployment.gpt-4_1.kind.prompt"
        );
        assert_eq!(name(AUTH_FAILURES, &[]), "spillway_auth_failures_total");
        assert_eq!(name(REQUESTS, &[("client", "")]), "spillway_requests_total.client.none");
        assert_eq!(status_class(429), "4xx");
        assert_eq!(status_class(0), "none");
    }

    #[test]
    fn name_hash_is_fnv_1a() {
        use std::hash::{BuildHasher, Hasher};
        let mut h = NameHasher::default();
        h.write(b"a");
        // The published FNV-1a 64 value of "a".
        assert_eq!(h.finish(), 0xaf63_dc4c_8601_ec8c);
        let (one, two) = (NameHash::default().hash_one("x.y"), NameHash::default().hash_one("x.y"));
        assert_eq!(one, two);
        assert_ne!(NameHash::default().hash_one("x.y"), NameHash::default().hash_one("x.z"));
    }
}
