//! proxy-wasm glue: host adapters for the `store` traits and the two HTTP
//! contexts. Host calls go through `hostcalls` (which return `Result`)
//! rather than the SDK's trait helpers (which panic on host errors).

use crate::config::{Config, Keys};
use crate::gateway::{header, AttemptAnswer, Gateway, RequestDecision, ResponseDecision};
use crate::store::{Clock, SharedStore, StoreError};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, Status};
use std::rc::Rc;
use std::time::UNIX_EPOCH;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { role: Role::Request, gateway: None }) });
}}

struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Unavailable),
        }
    }
}

struct HostClock;

impl Clock for HostClock {
    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    /// Downstream filter: once per client request.
    Request,
    /// Upstream (cluster) filter: once per attempt.
    Attempt,
}

struct Root {
    role: Role,
    gateway: Option<Rc<Gateway>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let root_id = hostcalls::get_property(vec!["plugin_root_id"])
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        self.role = if root_id.contains("attempt") { Role::Attempt } else { Role::Request };
        let bytes = match hostcalls::get_buffer(proxy_wasm::types::BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(b)) => b,
            _ => {
                log::error!("invalid spillway config: the plugin configuration is empty");
                return false;
            }
        };
        let env = |var: &str| std::env::var(var).ok();
        match Config::parse(&bytes, Keys::Resolve(&env)) {
            Ok(config) => {
                log::info!(
                    "{:?} role configured with {} backends",
                    self.role,
                    config.backends.len()
                );
                self.gateway = Some(Rc::new(Gateway::new(config)));
                true
            }
            Err(e) => {
                log::error!("{e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let gateway = self.gateway.clone()?;
        Some(match self.role {
            Role::Request => Box::new(RequestFilter { gateway }),
            Role::Attempt => Box::new(AttemptFilter { gateway, attempt: None, answered: false }),
        })
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

fn request_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpRequestHeaders, name).ok().flatten()
}

fn set_request_header(name: &str, value: Option<&str>) {
    if let Err(e) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value) {
        log::warn!("cannot set request header {name}: {e:?}");
    }
}

fn response_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpResponseHeaders, name).ok().flatten()
}

fn set_response_header(name: &str, value: Option<&str>) {
    if let Err(e) = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, value) {
        log::warn!("cannot set response header {name}: {e:?}");
    }
}

struct RequestFilter {
    gateway: Rc<Gateway>,
}

impl Context for RequestFilter {}

impl HttpContext for RequestFilter {
    fn on_http_request_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        // Clients must not steer routing or fake bookkeeping.
        if let Ok(headers) = hostcalls::get_map(MapType::HttpRequestHeaders) {
            for (name, _) in headers.iter().filter(|(n, _)| n.starts_with(header::PREFIX)) {
                set_request_header(name, None);
            }
        }
        let path = request_header(":path").unwrap_or_default();
        match self.gateway.route_request(&HostStore, &HostClock, &path) {
            RequestDecision::Forward { cluster, path } => {
                set_request_header(header::CLUSTER, Some(&cluster));
                set_request_header(header::PATH, Some(&path));
                // The route (and its cluster) may already be cached from
                // before our header existed.
                if let Err(e) = hostcalls::call_foreign_function("clear_route_cache", None) {
                    log::warn!("clear_route_cache failed: {e:?}");
                }
                Action::Continue
            }
            RequestDecision::Reply(reply) => {
                let headers: Vec<(&str, &str)> =
                    reply.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                if let Err(e) = hostcalls::send_http_response(reply.status, headers, Some(reply.body.as_bytes())) {
                    log::warn!("cannot send local reply: {e:?}");
                    return Action::Continue;
                }
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        set_response_header(header::RETRY, None);
        Action::Continue
    }
}

struct Attempt {
    backend: usize,
    has_fallback: bool,
    attempts: usize,
}

struct AttemptFilter {
    gateway: Rc<Gateway>,
    attempt: Option<Attempt>,
    answered: bool,
}

impl Context for AttemptFilter {
    fn on_done(&mut self) -> bool {
        if let (Some(a), false) = (&self.attempt, self.answered) {
            // No response headers: refused, reset or timed out.
            self.gateway.on_attempt_lost(&HostStore, &HostClock, a.backend);
            self.answered = true;
        }
        true
    }
}

impl HttpContext for AttemptFilter {
    fn on_http_request_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        let cluster = hostcalls::get_property(vec!["xds", "cluster_name"])
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        let original_path = request_header(header::PATH)
            .or_else(|| request_header(":path"))
            .unwrap_or_default();
        let tried = request_header(header::TRIED);
        let gateway = Rc::clone(&self.gateway);
        let Some(plan) = gateway.plan_attempt(&HostStore, &HostClock, &cluster, &original_path, tried.as_deref())
        else {
            return Action::Continue;
        };
        set_request_header(":path", Some(&plan.path));
        set_request_header(":authority", Some(plan.authority));
        if let Some(key) = plan.api_key {
            set_request_header("api-key", Some(key.expose()));
            set_request_header("authorization", None);
        }
        set_request_header(header::TRIED, Some(&plan.tried));
        // Steers Envoy's next attempt (the route re-selects the cluster on retry).
        let own_cluster = cluster.as_str();
        set_request_header(header::CLUSTER, Some(plan.fallback_cluster.unwrap_or(own_cluster)));
        self.attempt = Some(Attempt {
            backend: plan.backend,
            has_fallback: plan.fallback_cluster.is_some(),
            attempts: plan.attempts,
        });
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        let Some(attempt) = &self.attempt else { return Action::Continue };
        self.answered = true;
        let status: u32 = response_header(":status").and_then(|s| s.parse().ok()).unwrap_or(0);
        let retry_after_ms = response_header("retry-after-ms");
        let retry_after = response_header("retry-after");
        let ResponseDecision { retry, retry_after_ms: wait } = self.gateway.on_attempt_response(
            &HostStore,
            &HostClock,
            attempt.backend,
            attempt.has_fallback,
            &AttemptAnswer {
                status,
                retry_after_ms: retry_after_ms.as_deref(),
                retry_after: retry_after.as_deref(),
            },
        );
        set_response_header(header::RETRY, retry.then_some("1"));
        if let Some(ms) = wait {
            set_response_header("retry-after", Some(&crate::gateway::retry_after_secs(ms).to_string()));
            set_response_header("retry-after-ms", Some(&ms.to_string()));
        }
        if let Some(b) = self.gateway.config.backends.get(attempt.backend) {
            set_response_header(header::BACKEND, Some(&b.name));
        }
        set_response_header(header::ATTEMPTS, Some(&attempt.attempts.to_string()));
        Action::Continue
    }
}
