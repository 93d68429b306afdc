//! Helpers shared by the integration tests: a server on a loopback port and
//! an RLS client for it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{Entry, RateLimitOverride};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use spillway_ratelimit::RateLimitServer;
use tonic::transport::Channel;

pub const MINUTE: i32 = 2;
pub const SECOND: i32 = 1;

/// Serves `server` on a free loopback port until the test ends.
pub async fn start(server: RateLimitServer) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(spillway_ratelimit::serve(listener, server, std::future::pending()));
    addr
}

pub async fn client(addr: SocketAddr) -> RateLimitServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    RateLimitServiceClient::new(channel)
}

pub fn descriptor(kv: &[(&str, &str)], rpu: u32, unit: i32, hits: Option<u64>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: kv.iter().map(|(k, v)| Entry { key: k.to_string(), value: v.to_string() }).collect(),
        limit: Some(RateLimitOverride { requests_per_unit: rpu, unit }),
        hits_addend: hits.map(|value| UInt64Value { value }),
        is_negative_hits: false,
    }
}

pub async fn call(
    client: &mut RateLimitServiceClient<Channel>,
    domain: &str,
    descriptors: Vec<RateLimitDescriptor>,
) -> Result<RateLimitResponse, tonic::Status> {
    client
        .should_rate_limit(RateLimitRequest { domain: domain.to_string(), descriptors, hits_addend: 0 })
        .await
        .map(|r| r.into_inner())
}

/// (code, limit_remaining) per descriptor.
pub fn summary(r: &RateLimitResponse) -> Vec<(Code, u32)> {
    r.statuses.iter().map(|s| (Code::try_from(s.code).unwrap(), s.limit_remaining)).collect()
}

/// A loopback port nothing listens on (right now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
