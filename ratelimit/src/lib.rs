//! Spillway's rate-limit service: Envoy's RLS v3 (`ShouldRateLimit`) over
//! limitador counters, enforcing the limits carried in descriptor overrides.

pub mod backend;
pub mod service;

use std::future::Future;

pub use backend::Backend;
pub use service::RateLimitServer;

/// Serves `server` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: RateLimitServer,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(server.into_service())
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), shutdown)
        .await
}
