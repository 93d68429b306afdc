//! Native micro-benchmark of one backend-selection decision, with the public
//! API the filter itself uses:
//!
//! * `pick`: `selection::Pool::pick` alone — priority groups, smooth weighted
//!   round robin, throttle/circuit check against a `HealthTable`; the rotation
//!   counter is a plain local counter (no shared store).
//! * `route_request`: `gateway::Gateway::pick_first` plus the forwarded path,
//!   with `MemoryStore` and `ManualClock` — what the request role does to
//!   route a client request: read and decode the shared health table,
//!   CAS-increment the group's rotation counter, pick, build the path.
//! * `plan_attempt`: `Gateway::plan_attempt` — what the attempt role does per
//!   attempt (health read, fallback pick that only reads the counter, path
//!   rewrite).
//!
//! Each case runs with 3 and 30 backends, all healthy and with part of the
//! first priority throttled (so the throttle check has work to do).
//!
//! No framework: calibrated timed loops with `black_box`; each case reports
//! the median, min and max ns per decision over `SAMPLES` samples.
//!
//! usage: spillway-bench-selection [--json PATH] [--samples N] [--sample-ms MS] [--case NAME]

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spillway::body_fields::BodyFields;
use spillway::config::{Config, Keys, Tier};
use spillway::exchange::{Exchange, RequestHead, Step};
use spillway::gateway::{AttemptAnswer, AttemptRef, AttemptRequest, Gateway, Left, Stored};
use spillway::headroom::{Fit, Observation};
use spillway::health::HealthTable;
use spillway::metrics::Metrics;
use spillway::paths;
use spillway::selection::{Group, Pick, Pool};
use spillway::store::Clock;
use spillway::testing::{ManualClock, MemoryStore, Recorder};

const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions";
const NOW_MS: u64 = 1_700_000_000_000;

/// `n` backends in three priorities (n = 3: one each would make every group
/// trivial, so 3 backends are priorities 1, 1, 2), weights 1..=5.
fn config_json(n: usize) -> String {
    let backends: Vec<Value> = (0..n)
        .map(|i| {
            let priority = if n <= 3 {
                if i < 2 {
                    1
                } else {
                    2
                }
            } else {
                1 + (i * 3 / n) as u32
            };
            json!({
                "name": format!("b{i:02}"),
                "url": format!("http://127.0.0.1:{}", 10_000 + i),
                "api_key": format!("key-{i}"),
                "priority": priority,
                "weight": 1 + (i % 5) as u32,
            })
        })
        .collect();
    json!({ "backends": backends, "api_version": "2024-10-21" }).to_string()
}

/// Indices of the first-priority backends to mark throttled: all but the
/// last one, so a pick must scan past them.
fn throttled_set(cfg: &Config) -> Vec<usize> {
    let first = cfg.backends.iter().map(|b| b.priority).min().unwrap_or(1);
    let mut members: Vec<usize> = (0..cfg.backends.len()).filter(|&i| cfg.backends[i].priority == first).collect();
    members.pop();
    members
}

/// Metrics as the filter keeps them: an id per name, defined once (the
/// host's counters stand behind the ids).
#[derive(Default)]
struct IdMetrics {
    ids: std::cell::RefCell<HashMap<String, usize>>,
    values: std::cell::RefCell<Vec<u64>>,
}

impl IdMetrics {
    fn bump(&self, name: &str, value: u64) {
        let id = *self.ids.borrow_mut().entry(name.to_string()).or_insert_with(|| {
            self.values.borrow_mut().push(0);
            self.values.borrow().len() - 1
        });
        if let Some(v) = self.values.borrow_mut().get_mut(id) {
            *v = v.wrapping_add(value);
        }
    }
}

impl Metrics for IdMetrics {
    fn add(&self, name: &str, value: u64) {
        self.bump(name, value)
    }
    fn set(&self, name: &str, value: u64) {
        self.bump(name, value)
    }
    fn record(&self, name: &str, value: u64) {
        self.bump(name, value)
    }
}

/// A chat completion answer as Azure sends it (usage included).
/// The rate-limit headers every answer carries (Azure's, with limits).
const QUOTA_SEEN: Observation = Observation {
    requests: Some(95),
    tokens: Some(99_000),
    limit_requests: Some(100),
    limit_tokens: Some(100_000),
    utilization_permille: None,
    reset_ms: None,
};
const ANSWER: &[u8] = br#"{"id":"chatcmpl-AbC123","object":"chat.completion","created":1700000000,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, nice to meet you."},"finish_reason":"stop"}],"usage":{"prompt_tokens":14,"completion_tokens":8,"total_tokens":22}}"#;

/// Everything the filter's logic does for one client request answered on
/// the first attempt, both roles, without the host calls: request headers
/// (path checks, admission, pick), the attempt (plan, answer verdict,
/// completion), the answer's headers and body, and the end (usage, metrics,
/// log line).
fn whole_request(gw: &Gateway, store: &MemoryStore, clock: &ManualClock, metrics: &IdMetrics) -> usize {
    let fields = BodyFields { max_tokens: Some(16), ..BodyFields::default() };
    let head = RequestHead {
        method: "POST",
        path: "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        content_length: Some(87),
        has_body: true,
        fields: Some(fields),
        ..RequestHead::default()
    };
    let mut exchange = Exchange::new(clock.now_ms());
    let Step::Forward { cluster, path, model, estimate, first_attempt, .. } =
        exchange.on_request_headers(gw, store, clock, metrics, &head)
    else {
        return 0;
    };
    let request = AttemptRequest {
        cluster: &cluster,
        original_path: &path,
        tried: None,
        stored: Stored::No,
        model: model.as_deref(),
        estimate,
        tier: Tier::High,
        first_attempt: first_attempt.as_deref(),
    };
    let Some(plan) = gw.plan_attempt(store, clock, metrics, &request) else { return 0 };
    let attempt = AttemptRef {
        backend: plan.backend,
        has_fallback: plan.fallback_cluster.is_some(),
        stored: Stored::No,
        estimate,
        tier: Tier::High,
    };
    let answer = AttemptAnswer { status: 200, quota: QUOTA_SEEN, ..AttemptAnswer::default() };
    let decision = gw.on_attempt_response(store, clock, metrics, &attempt, &answer);
    let backend_name = gw.config.backends.get(plan.backend).map(|b| b.name.clone()).unwrap_or_default();
    let attempts = plan.attempts.to_string();
    let reported = Left { requests: QUOTA_SEEN.requests, tokens: QUOTA_SEEN.tokens };
    let extra =
        exchange.on_response_headers(gw, 200, Some("application/json"), Some(&backend_name), Some(&attempts), reported);
    let _ = exchange.on_response_body(ANSWER, true);
    if decision.healthy {
        gw.on_answer_complete(store, plan.backend, plan.clean_at_start);
    }
    let line = exchange.finish(gw, store, clock, metrics);
    line.len() + extra.len()
}

struct Stats {
    median_ns: f64,
    min_ns: f64,
    max_ns: f64,
    iters_per_sample: u64,
}

/// Runs `f` in calibrated loops: `samples` samples of about `sample` each.
fn measure(samples: usize, sample: Duration, mut f: impl FnMut()) -> Stats {
    // Warm up and calibrate.
    let mut iters: u64 = 1;
    loop {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        let e = t.elapsed();
        if e >= sample / 4 {
            let per = e.as_secs_f64() / iters as f64;
            iters = ((sample.as_secs_f64() / per) as u64).max(1);
            break;
        }
        iters *= 2;
    }
    let mut per_op: Vec<f64> = (0..samples)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    per_op.sort_by(|a, b| a.total_cmp(b));
    Stats {
        median_ns: per_op[per_op.len() / 2],
        min_ns: per_op[0],
        max_ns: per_op[per_op.len() - 1],
        iters_per_sample: iters,
    }
}

fn main() {
    let mut json_path: Option<String> = None;
    let mut samples = 21usize;
    let mut sample_ms = 20u64;
    // One case only (e.g. to profile it): pick, route_request, plan_attempt, whole_request.
    let mut only_case: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json_path = args.next(),
            "--samples" => samples = args.next().and_then(|v| v.parse().ok()).unwrap_or(samples).max(3),
            "--case" => only_case = args.next(),
            "--sample-ms" => sample_ms = args.next().and_then(|v| v.parse().ok()).unwrap_or(sample_ms).max(1),
            "-h" | "--help" => {
                println!("usage: spillway-bench-selection [--json PATH] [--samples N] [--sample-ms MS] [--case NAME]");
                return;
            }
            other => {
                eprintln!("unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    let sample = Duration::from_millis(sample_ms);
    let mut rows: Vec<Value> = Vec::new();
    println!("{:<16} {:>8} {:<10} {:>10} {:>10} {:>10}", "case", "backends", "health", "median ns", "min ns", "max ns");
    for n in [3usize, 30] {
        let text = config_json(n);
        let cfg = match Config::parse(text.as_bytes(), Keys::NamesOnly) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("bad benchmark config: {e}");
                std::process::exit(1);
            }
        };
        let cb = cfg.circuit_breaker;
        let throttled = throttled_set(&cfg);
        for state in ["healthy", "throttled"] {
            let wants = |case: &str| only_case.as_deref().is_none_or(|c| c == case);
            let mut record = |case: &str, s: Stats| {
                println!("{case:<16} {n:>8} {state:<10} {:>10.1} {:>10.1} {:>10.1}", s.median_ns, s.min_ns, s.max_ns);
                rows.push(json!({
                    "case": case, "backends": n, "health": state,
                    "median_ns": s.median_ns, "min_ns": s.min_ns, "max_ns": s.max_ns,
                    "samples": samples, "iters_per_sample": s.iters_per_sample,
                }));
            };

            // 1. Pool::pick alone.
            let pool = Pool::new(&cfg.backends);
            let mut health = HealthTable::new(n);
            if state == "throttled" {
                for &i in &throttled {
                    if let Some(h) = health.get_mut(i) {
                        h.record_throttle(NOW_MS, 60_000);
                    }
                }
            }
            // One plain counter per priority group (the filter keeps these in
            // shared data; `route_request` below measures that part).
            let mut counters: HashMap<u32, u64> = HashMap::new();
            if wants("pick") {
                let s = measure(samples, sample, || {
                    let mut rotate = |g: &Group| {
                        let c = counters.entry(g.priority).or_insert(0);
                        *c += 1;
                        *c - 1
                    };
                    let pick = pool.pick(
                        black_box(&health),
                        &cb,
                        black_box(NOW_MS),
                        &[],
                        &|_| Fit::Unknown,
                        &mut rotate,
                        None,
                    );
                    assert!(matches!(pick, Pick::Backend(_)));
                    black_box(pick);
                });
                record("pick", s);
            }

            // 2. The request role's routing step on the in-memory shared store.
            let gw = Gateway::new(cfg.clone());
            let store = MemoryStore::default();
            let clock = ManualClock::at(NOW_MS);
            let metrics = Recorder::default();
            if state == "throttled" {
                gw.update_health(&store, |t| {
                    for &i in &throttled {
                        if let Some(h) = t.get_mut(i) {
                            h.record_throttle(NOW_MS, 60_000);
                        }
                    }
                    true
                });
            }
            if wants("route_request") {
                let s = measure(samples, sample, || {
                    let backend = gw.pick_first(&store, &clock, None, 20, Tier::High).0.map(|b| b.cluster.len());
                    assert!(backend.is_ok());
                    let _ = black_box(backend);
                    black_box(paths::with_api_version(black_box(CHAT), gw.config.api_version.as_deref()));
                });
                record("route_request", s);
            }

            // 3. Gateway::plan_attempt (attempt role, first attempt).
            let cluster = match gw.pick_first(&store, &clock, None, 20, Tier::High).0 {
                Ok(backend) => backend.cluster.clone(),
                Err(r) => {
                    eprintln!("unexpected local reply {}", r.status);
                    std::process::exit(1);
                }
            };
            if wants("plan_attempt") {
                let s = measure(samples, sample, || {
                    let plan = gw.plan_attempt(
                        &store,
                        &clock,
                        &metrics,
                        &AttemptRequest {
                            cluster: black_box(&cluster),
                            original_path: black_box(CHAT),
                            tried: None,
                            stored: Stored::No,
                            model: None,
                            estimate: None,
                            tier: Tier::High,
                            first_attempt: None,
                        },
                    );
                    assert!(plan.is_some());
                    black_box(plan);
                });
                record("plan_attempt", s);
            }

            // 4. One whole request's logic, both roles (no host calls).
            let id_metrics = IdMetrics::default();
            if wants("whole_request") {
                let s = measure(samples, sample, || {
                    let n = whole_request(&gw, &store, &clock, &id_metrics);
                    assert!(n > 0);
                    black_box(n);
                });
                record("whole_request", s);
            }
        }
    }
    let doc = json!({
        "tool": "spillway-bench-selection",
        "target": std::env::consts::ARCH,
        "note": "native (not wasm) timings; ns per decision, median/min/max over samples",
        "results": rows,
    });
    if let Some(path) = json_path {
        let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
        if let Err(e) = std::fs::write(&path, text + "\n") {
            eprintln!("cannot write {path}: {e}");
            std::process::exit(1);
        }
    }
}
