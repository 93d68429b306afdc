//! The counter store: limitador's rate limiter over in-memory or Redis
//! storage, behind the three operations the service needs.
//!
//! limitador keeps the counters, their windows and the Redis protocol; this
//! module only chooses the storage, bounds how long a Redis call may take,
//! and turns limitador's results and errors into plain values (limitador's
//! error type is not `Send`, so it never crosses an `.await` here).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use limitador::errors::LimitadorError;
use limitador::limit::{Context, Limit, Namespace};
use limitador::storage::redis::AsyncRedisStorage;
use limitador::{AsyncRateLimiter, CheckResult, RateLimiter};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Counters the in-memory storage keeps at most (one per distinct set of
/// descriptor values); past that the least recently used are forgotten.
pub const MEMORY_MAX_COUNTERS: u64 = 100_000;

/// How long one Redis connection attempt may take.
pub const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
/// How long Redis may take to answer one command.
pub const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_millis(250);
/// Pause between connection attempts while Redis cannot be reached at start.
const REDIS_INITIAL_RETRY: Duration = Duration::from_secs(1);

/// What limitador said about the one counter a descriptor maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The hits asked for would not fit (nothing was charged).
    pub limited: bool,
    /// What is left in the window after this call (before it, when `limited`
    /// or when the call only checked). `None` when limitador matched no counter.
    pub remaining: Option<u64>,
    /// Time until the counter's window ends.
    pub expires_in: Option<Duration>,
}

impl Outcome {
    fn from_check(result: &CheckResult) -> Self {
        // Each descriptor's context matches exactly one limit (see
        // `crate::service`), so there is at most one counter; take the most
        // restrictive one should there ever be more.
        let counter = result.counters.iter().min_by_key(|c| c.remaining().unwrap_or(c.max_value()));
        Outcome {
            limited: result.limited,
            remaining: counter.map(|c| c.remaining().unwrap_or(c.max_value())),
            expires_in: counter.and_then(|c| c.expires_in()),
        }
    }
}

/// Why a call could not be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// The counter storage could not be reached or did not answer.
    Unavailable(String),
    /// limitador could not evaluate a limit against the request.
    Internal(String),
}

/// Where the counters live.
pub enum Backend {
    Memory(RateLimiter),
    Redis(RedisBackend),
}

impl Backend {
    pub fn in_memory() -> Self {
        Backend::Memory(RateLimiter::new(MEMORY_MAX_COUNTERS))
    }

    /// A Redis-backed store for `url` (checked here; the connection itself
    /// is made by [`RedisBackend::spawn_connector`]).
    pub fn redis(url: &str) -> Result<Self, String> {
        RedisBackend::new(url).map(Backend::Redis)
    }

    /// Human-readable storage description for the startup log line.
    pub fn describe(&self) -> String {
        match self {
            Backend::Memory(_) => "in memory".to_string(),
            Backend::Redis(r) => format!("redis at {}", redact_url(&r.url)),
        }
    }

    /// Registers `limit` with limitador (idempotent). Fails with
    /// `Unavailable` while the first Redis connection is not made yet.
    pub fn add_limit(&self, limit: Limit) -> Result<(), BackendError> {
        match self {
            Backend::Memory(l) => {
                l.add_limit(limit);
                Ok(())
            }
            Backend::Redis(r) => {
                r.limiter()?.add_limit(limit);
                Ok(())
            }
        }
    }

    /// Would `delta` more fit? Charges nothing.
    pub async fn check(&self, namespace: &Namespace, ctx: &Context<'_>, delta: u64) -> Result<Outcome, BackendError> {
        match self {
            Backend::Memory(l) => convert(l.is_rate_limited(namespace, ctx, delta)).map_err(BackendError::from),
            Backend::Redis(r) => {
                let limiter = r.limiter()?;
                // A read: always safe to try twice.
                let first = convert(limiter.is_rate_limited(namespace, ctx, delta).await);
                let result = match first {
                    Err(Retry::Once(_)) => convert(limiter.is_rate_limited(namespace, ctx, delta).await),
                    other => other,
                };
                r.note(result)
            }
        }
    }

    /// Adds `delta` to the counter whether or not it fits.
    pub async fn update(&self, namespace: &Namespace, ctx: &Context<'_>, delta: u64) -> Result<(), BackendError> {
        let unit = |r: Result<(), LimitadorError>| {
            r.map(|()| CheckResult { limited: false, counters: Vec::new(), limit_name: None })
        };
        match self {
            Backend::Memory(l) => {
                convert(unit(l.update_counters(namespace, ctx, delta))).map(|_| ()).map_err(BackendError::from)
            }
            Backend::Redis(r) => {
                let limiter = r.limiter()?;
                // Retried only when the connection was refused (nothing reached Redis).
                let first = convert(unit(limiter.update_counters(namespace, ctx, delta).await));
                let result = match first {
                    Err(Retry::Once(_)) => convert(unit(limiter.update_counters(namespace, ctx, delta).await)),
                    other => other,
                };
                r.note(result).map(|_| ())
            }
        }
    }

    /// limitador's check-and-update: charges `delta` when it fits, else
    /// nothing.
    pub async fn check_and_update(
        &self,
        namespace: &Namespace,
        ctx: &Context<'_>,
        delta: u64,
    ) -> Result<Outcome, BackendError> {
        match self {
            Backend::Memory(l) => {
                convert(l.check_rate_limited_and_update(namespace, ctx, delta)).map_err(BackendError::from)
            }
            Backend::Redis(r) => {
                let limiter = r.limiter()?;
                // Retried only when the connection was refused: then no command
                // reached Redis, so nothing can have been charged twice.
                let first = convert(limiter.check_rate_limited_and_update(namespace, ctx, delta).await);
                let result = match first {
                    Err(Retry::Once(_)) => convert(limiter.check_rate_limited_and_update(namespace, ctx, delta).await),
                    other => other,
                };
                r.note(result)
            }
        }
    }
}

/// An error worth one more try, or a final one.
enum Retry {
    /// The connection was refused. With no reconnect back-off (see
    /// [`RedisBackend::spawn_connector`]) the connection manager answers the
    /// first call after an outage with the error of its last failed attempt
    /// and starts a new one; the retry waits for that attempt, so the first
    /// call after Redis comes back already succeeds.
    Once(BackendError),
    Final(BackendError),
}

impl From<Retry> for BackendError {
    fn from(r: Retry) -> Self {
        match r {
            Retry::Once(e) | Retry::Final(e) => e,
        }
    }
}

fn convert(result: Result<CheckResult, LimitadorError>) -> Result<Outcome, Retry> {
    match result {
        Ok(r) => Ok(Outcome::from_check(&r)),
        Err(LimitadorError::StorageError(e)) => {
            let refused = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<redis::RedisError>())
                .is_some_and(|re| re.is_connection_refusal());
            let err = BackendError::Unavailable(e.msg().to_string());
            Err(if refused { Retry::Once(err) } else { Retry::Final(err) })
        }
        Err(LimitadorError::InterpreterError(e)) => Err(Retry::Final(BackendError::Internal(e.to_string()))),
    }
}

/// limitador's async Redis storage, connected in the background.
pub struct RedisBackend {
    url: String,
    client: redis::Client,
    limiter: Arc<OnceLock<AsyncRateLimiter>>,
    /// Whether the last call reached Redis; state changes are logged once.
    healthy: AtomicBool,
}

impl RedisBackend {
    fn new(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("invalid redis URL {}: {e}", redact_url(url)))?;
        Ok(RedisBackend {
            url: url.to_string(),
            client,
            limiter: Arc::new(OnceLock::new()),
            healthy: AtomicBool::new(true),
        })
    }

    /// The connection manager's settings. limitador's own constructor uses
    /// the redis crate's defaults: no timeouts and six reconnect attempts
    /// with exponential back-off, during which every call waits on the
    /// reconnect (tens of seconds when Redis is down). Here one attempt is
    /// made per call, bounded by short timeouts, so a call fails fast while
    /// Redis is down and the next call reconnects once it is back.
    fn connection_config() -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(REDIS_CONNECT_TIMEOUT)
            .set_response_timeout(REDIS_RESPONSE_TIMEOUT)
    }

    /// Connects to Redis in the background, retrying every second until it
    /// answers; calls made before that are answered UNAVAILABLE. Needs a
    /// Tokio runtime.
    pub fn spawn_connector(&self) -> tokio::task::JoinHandle<()> {
        let client = self.client.clone();
        let cell = Arc::clone(&self.limiter);
        let shown = redact_url(&self.url);
        tokio::spawn(async move {
            let mut warned = false;
            loop {
                match connect(client.clone()).await {
                    Ok(storage) => {
                        let _ = cell.set(AsyncRateLimiter::new_with_storage(Box::new(storage)));
                        if warned {
                            eprintln!("spillway-ratelimit: connected to redis at {shown}");
                        }
                        return;
                    }
                    Err(e) => {
                        if !warned {
                            eprintln!(
                                "spillway-ratelimit: cannot reach redis at {shown} ({e}); \
                                 answering UNAVAILABLE and retrying every {}s",
                                REDIS_INITIAL_RETRY.as_secs()
                            );
                            warned = true;
                        }
                        tokio::time::sleep(REDIS_INITIAL_RETRY).await;
                    }
                }
            }
        })
    }

    fn limiter(&self) -> Result<&AsyncRateLimiter, BackendError> {
        self.limiter.get().ok_or_else(|| BackendError::Unavailable("not connected to redis yet".to_string()))
    }

    /// Logs when Redis stops or starts answering.
    fn note(&self, result: Result<Outcome, Retry>) -> Result<Outcome, BackendError> {
        let result = result.map_err(BackendError::from);
        let ok = !matches!(result, Err(BackendError::Unavailable(_)));
        if self.healthy.swap(ok, Ordering::Relaxed) != ok {
            match &result {
                Err(BackendError::Unavailable(msg)) => eprintln!("spillway-ratelimit: redis unavailable: {msg}"),
                _ => eprintln!("spillway-ratelimit: redis reachable again"),
            }
        }
        result
    }
}

async fn connect(client: redis::Client) -> Result<AsyncRedisStorage, redis::RedisError> {
    let manager = ConnectionManager::new_with_config(client, RedisBackend::connection_config()).await?;
    AsyncRedisStorage::new_with_conn_manager(manager).await
}

/// `url` with any password hidden.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}://***@{}", &url[..scheme_end], &rest[at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact_url("redis://:secret@h:6379/0"), "redis://***@h:6379/0");
        assert_eq!(redact_url("rediss://user:pw@h/0"), "rediss://***@h/0");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn rejects_bad_redis_urls() {
        assert!(Backend::redis("http://x").is_err());
        assert!(Backend::redis("redis://127.0.0.1:6390").is_ok());
    }
}
