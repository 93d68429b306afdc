//! The names the filter and the Envoy configuration must agree on: internal
//! headers, plugin root ids and vm id, cluster names, shared-data keys and
//! metric label keys. The renderer builds Envoy and Istio configs from these
//! constants; the filter reads and writes the same ones. Change a name here
//! and both sides follow.

/// Internal headers. All share one prefix so they are easy to spot (and to
/// strip) in any header dump.
pub mod header {
    pub const PREFIX: &str = "x-spillway-";
    /// Request: the cluster the route's matcher sends this attempt to.
    pub const CLUSTER: &str = "x-spillway-cluster";
    /// Request: path as the client sent it (plus `api-version`), before any rename.
    pub const PATH: &str = "x-spillway-path";
    /// Request: backends already tried for this request, comma separated.
    pub const TRIED: &str = "x-spillway-tried";
    /// Request: where the client's own credential waits for pass-through
    /// attempts (`slot.token` into shared data; no secret in it).
    pub const CREDENTIAL: &str = "x-spillway-credential";
    /// Request: the model the request names (classic: the path's
    /// deployment; v1: the body's `model`), for model-aware failover and
    /// per-backend renames.
    pub const MODEL: &str = "x-spillway-model";
    /// Request: the request names stored state its backend holds: no
    /// failover to another backend.
    pub const PINNED: &str = "x-spillway-pinned";
    /// Request: the request names stored state no one is known to hold:
    /// try the backends in turn until one knows it (404/400 fail over).
    pub const LOOKUP: &str = "x-spillway-lookup";
    /// Request: the request's token estimate, so a fallback is picked among
    /// backends with room for it (quota-aware routing).
    pub const ESTIMATE: &str = "x-spillway-estimate";
    /// Request: `low` for a low-tier client's request (see `config::Tier`).
    pub const TIER: &str = "x-spillway-tier";
    /// Request: the first attempt's fallback and health as the request role
    /// found them when it picked (`gateway::FirstAttempt`), so the first
    /// attempt need not read the health table and rotation again.
    pub const FIRST_ATTEMPT: &str = "x-spillway-first-attempt";
    /// Request: Envoy's own per-attempt timeout for this request; set for
    /// streams with a first-token timeout (the attempt role holds a stream's
    /// head until its first content, so the timer runs until then).
    pub const ENVOY_PER_TRY_TIMEOUT: &str = "x-envoy-upstream-rq-per-try-timeout-ms";
    /// Response: makes Envoy's `retriable_headers` policy retry this attempt.
    pub const RETRY: &str = "x-spillway-retry";
    /// Response: the backend that answered.
    pub const BACKEND: &str = "x-spillway-backend";
    /// Response: how many backends were tried.
    pub const ATTEMPTS: &str = "x-spillway-attempts";
}

/// Both roles run in one VM (same `vm_id`), so they share shared data.
pub const VM_ID: &str = "spillway";
/// Root id of the downstream filter: once per client request.
pub const REQUEST_ROOT_ID: &str = "spillway_request";
/// Root id of the upstream (cluster) filter: once per attempt.
pub const ATTEMPT_ROOT_ID: &str = "spillway_attempt";

/// The two roles one `.wasm` plays, told apart by the plugin's root id.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// Downstream HTTP filter: once per client request.
    Request,
    /// Upstream HTTP filter on every backend cluster: once per attempt.
    Attempt,
}

impl Role {
    /// The role for a plugin root id; `None` for any other id, which is a
    /// configuration error rather than a guess.
    pub fn from_root_id(root_id: &str) -> Option<Role> {
        match root_id {
            REQUEST_ROOT_ID => Some(Role::Request),
            ATTEMPT_ROOT_ID => Some(Role::Attempt),
            _ => None,
        }
    }

    pub fn root_id(self) -> &'static str {
        match self {
            Role::Request => REQUEST_ROOT_ID,
            Role::Attempt => ATTEMPT_ROOT_ID,
        }
    }

    /// The role's name in metric labels and keys.
    pub fn name(self) -> &'static str {
        match self {
            Role::Request => "request",
            Role::Attempt => "attempt",
        }
    }
}

/// Prefix of the Envoy cluster that carries a backend's traffic.
pub const CLUSTER_PREFIX: &str = "spillway_";

pub fn cluster_name(backend: &str) -> String {
    format!("{CLUSTER_PREFIX}{backend}")
}

/// The cluster that reaches the rate-limit service (global client limits).
/// A `.` keeps it apart from every backend's `spillway_<name>` cluster.
pub const RATE_LIMIT_CLUSTER: &str = "spillway.ratelimit";

/// Shared-data keys. Every key starts with `spillway.` and carries a version
/// where the value has an encoding, so an old worker never misreads a new one.
pub mod shared_data {
    /// Health table of all backends (throttle deadlines, circuit state).
    pub const HEALTH: &str = "spillway.health.v1";
    /// Prefix of the response-id -> owning backend table's slots.
    pub const AFFINITY_PREFIX: &str = "spillway.affinity.";
    /// The backend names the clusters (attempt role) serve, sorted.
    pub const BACKEND_SET: &str = "spillway.backends.v1";
    /// Prefix of a priority group's round-robin counter.
    pub const ROTATION_PREFIX: &str = "spillway.rr.";
    /// Prefix of a client's request and token buckets.
    pub const LIMITS_PREFIX: &str = "spillway.limit.";
    /// Prefix of the credential stash ring's slots (`spillway.credential.<n>`).
    pub const CREDENTIAL_PREFIX: &str = "spillway.credential.";
    /// The ring's rotation counter.
    pub const CREDENTIAL_ROTATION: &str = "spillway.credential.next";
    /// How many keys the filter has created (keys are never deleted).
    pub const KEY_COUNT: &str = "spillway.keys";
    /// Prefix of the largest linear memory a role's VMs have had.
    pub const VM_MEMORY_PREFIX: &str = "spillway.vm_memory.";
}

/// Metric names carry their labels as `.key.value` pairs (proxy-wasm
/// metrics have no labels); the renderer adds one Envoy `stats_tags` regex
/// per key to turn them back into Prometheus labels.
pub mod metric {
    /// Every metric name starts with this.
    pub const PREFIX: &str = "spillway_";
    /// Label keys, in the order they appear in names.
    pub const LABELS: [&str; 12] = [
        "backend",
        "client",
        "deployment",
        "class",
        "kind",
        "reason",
        "role",
        "gen_ai_operation_name",
        "gen_ai_request_model",
        "gen_ai_token_type",
        "server_address",
        "call",
    ];
    /// Prefix of the metrics under OpenTelemetry GenAI names.
    pub const GEN_AI_PREFIX: &str = "gen_ai_";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_come_from_exact_root_ids() {
        assert_eq!(Role::from_root_id("spillway_request"), Some(Role::Request));
        assert_eq!(Role::from_root_id("spillway_attempt"), Some(Role::Attempt));
        for other in ["", "spillway_attempt2", "my_attempt", "SPILLWAY_REQUEST"] {
            assert_eq!(Role::from_root_id(other), None, "{other}");
        }
        assert_eq!(Role::Attempt.root_id(), ATTEMPT_ROOT_ID);
    }

    #[test]
    fn every_header_has_the_prefix() {
        use header::*;
        for h in [CLUSTER, PATH, TRIED, CREDENTIAL, MODEL, PINNED, LOOKUP, ESTIMATE, TIER, RETRY, BACKEND, ATTEMPTS] {
            assert!(h.starts_with(PREFIX), "{h}");
        }
    }
}
