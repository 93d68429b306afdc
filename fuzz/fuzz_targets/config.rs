//! The filter JSON: `Config::parse` must refuse bad input with an error, never
//! panic; what it accepts must hold the invariants the per-request code relies
//! on, and must build a gateway (rotation schedules, keys) without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spillway::config::{Config, Keys, MAX_WEIGHT};
use spillway::gateway::Gateway;
use spillway::paths::{self, PathProblem};
use std::collections::HashSet;

fuzz_target!(|data: &[u8]| {
    let names_only = Config::parse(data, Keys::NamesOnly);
    // The filter resolves `*_env` from Envoy's environment; every variable
    // resolves here, to a distinct, valid key.
    let lookup = |var: &str| Some(format!("key-for-{var}"));
    let resolved = Config::parse(data, Keys::Resolve(&lookup));
    // Resolving keys only adds checks.
    assert!(resolved.is_err() || names_only.is_ok(), "accepted with keys resolved, refused by name: {names_only:?}");

    for config in [names_only, resolved].into_iter().flatten() {
        check_invariants(&config);
        let _ = Gateway::new(config);
    }
});

fn check_invariants(config: &Config) {
    assert!(!config.backends.is_empty());
    let mut names = HashSet::new();
    for b in &config.backends {
        assert!(names.insert(b.name.as_str()), "duplicate backend {}", b.name);
        assert!((1..=MAX_WEIGHT).contains(&b.weight), "weight {}", b.weight);
        assert_eq!(b.cluster, format!("spillway_{}", b.name));
        assert!(!b.host.is_empty() && b.port > 0);
        assert!(b.authority.contains(b.host.as_str()));
        // A path the request role lets through is not made ambiguous (dot
        // segments, backslashes, ...) by this backend's rename. (Names may
        // still be ones classic paths do not use: they also rename v1 models.)
        for from in b.deployments.keys() {
            let path = format!("/openai/deployments/{from}/chat/completions?api-version=1");
            if paths::check(&path).is_ok() {
                let renamed = paths::rename_deployment(&path, &b.deployments);
                let problem = paths::check(&renamed).err();
                assert_ne!(problem, Some(PathProblem::Ambiguous), "{path} renamed for {} to {renamed}", b.name);
            }
        }
    }
    let mut clients = HashSet::new();
    for c in &config.clients {
        assert!(clients.insert(c.name.as_str()), "duplicate client {}", c.name);
        assert_ne!(c.requests_per_minute, Some(0));
        assert_ne!(c.tokens_per_minute, Some(0));
    }
    assert!(config.retry_on.iter().all(|s| (400..=599).contains(s)));
    assert!(config.default_retry_after_ms >= 1000 && config.max_retry_after_ms >= config.default_retry_after_ms);
    assert!(config.circuit_breaker.consecutive_failures >= 1 && config.circuit_breaker.open_ms >= 1000);
    if let Some(home) = &config.home_backend {
        assert!(config.backend_by_name(home).is_some());
    }
}
