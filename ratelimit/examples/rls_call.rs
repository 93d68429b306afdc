//! Sends one ShouldRateLimit call and prints the answer, for trying the
//! service by hand:
//!
//! ```text
//! cargo run -p spillway-ratelimit --example rls_call -- \
//!     127.0.0.1:8081 DOMAIN 10/minute HITS key=value [key=value ...]
//! ```
//!
//! The descriptor carries the override `10/minute` (units: second, minute,
//! hour, day, week, month, year; `-` for none) and `HITS` as its own
//! hits_addend (`-` to leave it unset).

use std::process::ExitCode;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{Entry, RateLimitOverride};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::google::protobuf::UInt64Value;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, domain, limit, hits, entries @ ..] = args.as_slice() else {
        eprintln!("usage: rls_call ADDR DOMAIN RPU/UNIT|- HITS|- key=value...");
        return ExitCode::from(2);
    };
    let limit = match limit.split_once('/') {
        None => None,
        Some((rpu, unit)) => {
            let (Ok(requests_per_unit), Some(unit)) = (rpu.parse(), Unit::from_str_name(&unit.to_uppercase())) else {
                eprintln!("bad limit {limit}");
                return ExitCode::from(2);
            };
            Some(RateLimitOverride { requests_per_unit, unit: unit as i32 })
        }
    };
    let hits_addend = match hits.as_str() {
        "-" => None,
        h => match h.parse() {
            Ok(value) => Some(UInt64Value { value }),
            Err(_) => {
                eprintln!("bad hits {h}");
                return ExitCode::from(2);
            }
        },
    };
    let entries = entries
        .iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            Entry { key: k.to_string(), value: v.to_string() }
        })
        .collect();
    let request = RateLimitRequest {
        domain: domain.clone(),
        descriptors: vec![RateLimitDescriptor { entries, limit, hits_addend, is_negative_hits: false }],
        hits_addend: 0,
    };

    let mut client = match RateLimitServiceClient::connect(format!("http://{addr}")).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot connect to {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = std::time::Instant::now();
    let answer = client.should_rate_limit(request).await;
    let took = started.elapsed();
    match answer {
        Ok(r) => {
            println!("{:?} ({} ms)", r.into_inner(), took.as_millis());
            ExitCode::SUCCESS
        }
        Err(status) => {
            println!("error {:?}: {} ({} ms)", status.code(), status.message(), took.as_millis());
            ExitCode::FAILURE
        }
    }
}
