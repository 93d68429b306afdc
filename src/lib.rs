//! Spillway: one smart endpoint in front of many Azure OpenAI /
//! OpenAI-compatible deployments, as a proxy-wasm filter for Envoy.
//!
//! Everything that decides lives in plain Rust modules tested natively; the
//! `wasm` module is the thin glue to the proxy-wasm host. The names the filter
//! and its Envoy configuration share are in `contract`.

pub mod affinity;
pub mod answer_capture;
pub mod body_fields;
pub mod clients;
pub mod config;
pub mod contract;
pub mod credentials;
pub mod exchange;
pub mod first_event;
pub mod footprint;
pub mod gateway;
pub mod gen_ai;
pub mod global_limits;
pub mod headroom;
pub mod health;
// Host calls without SDK panics; natively only the encoders and decoders
// exist (tested, fuzzed).
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
pub mod host;
pub mod lenient;
pub mod limits;
pub mod metrics;
pub mod paths;
pub mod replies;
pub mod retry_after;
pub mod rls;
pub mod selection;
pub mod stateful;
pub mod store;
pub mod stream_end;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod usage;

#[cfg(target_arch = "wasm32")]
mod wasm;
