//! Metric names. proxy-wasm metrics have names, not labels: labels are
//! encoded as `.key.value` pairs after the metric name (keys from
//! `contract::metric::LABELS`), and the renderer adds Envoy `stats_tags` that
//! turn each pair back into a Prometheus label, so `/stats/prometheus` shows
//! `spillway_tokens_total{client="a",...}`.

pub const UPSTREAM_REQUESTS: &str = "spillway_upstream_requests_total";
pub const FAILOVERS: &str = "spillway_failovers_total";
pub const THROTTLE_EVENTS: &str = "spillway_throttle_events_total";
pub const CIRCUIT_OPENS: &str = "spillway_circuit_opens_total";
pub const BACKEND_THROTTLED: &str = "spillway_backend_throttled";
pub const BACKEND_CIRCUIT_OPEN: &str = "spillway_backend_circuit_open";
pub const REQUESTS: &str = "spillway_requests_total";
pub const LOCAL_REPLIES: &str = "spillway_local_replies_total";
pub const AUTH_FAILURES: &str = "spillway_auth_failures_total";
pub const TOKENS: &str = "spillway_tokens_total";
pub const ANSWERS_CUT: &str = "spillway_answers_cut_total";

pub trait Metrics {
    fn add(&self, name: &str, value: u64);
    fn set(&self, name: &str, value: u64);
}

/// `metric.key.value...`; values are reduced to `[A-Za-z0-9_-]` so a dot in
/// a deployment name cannot split a label.
pub fn name(metric: &str, labels: &[(&str, &str)]) -> String {
    let mut out = String::from(metric);
    for (k, v) in labels {
        out.push('.');
        out.push_str(k);
        out.push('.');
        if v.is_empty() {
            out.push_str("none");
        }
        out.extend(v.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }));
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
}
