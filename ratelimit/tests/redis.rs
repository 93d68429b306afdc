//! The service with Redis storage: counting, and answering UNAVAILABLE while
//! Redis is down, then recovering without a restart. Needs `redis-server` on
//! the PATH; skipped (with a message) when it is not installed.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use spillway_ratelimit::{Backend, RateLimitServer};

fn redis_server() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("redis-server")).find(|p| p.is_file())
}

/// A throw-away redis-server on a loopback port, stopped on drop.
struct Redis {
    child: Child,
}

impl Redis {
    fn start(bin: &PathBuf, port: u16) -> Redis {
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not open port {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { child }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_in_redis_and_rides_out_an_outage() {
    let Some(bin) = redis_server() else {
        eprintln!("skipped: redis-server is not installed (apt-get install redis-server)");
        return;
    };
    let port = free_port();
    let server = RateLimitServer::new(Backend::redis(&format!("redis://127.0.0.1:{port}")).unwrap());
    if let Backend::Redis(r) = server.backend() {
        r.spawn_connector();
    }
    let addr = start(server).await;
    let mut c = client(addr).await;
    let d = |hits| descriptor(&[("user", "u")], 3, MINUTE, Some(hits));

    // Redis not started yet: UNAVAILABLE, promptly.
    let t = Instant::now();
    let e = call(&mut c, "d", vec![d(2)]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    // Started: the connector (retrying every second) gets there by itself.
    let mut redis = Redis::start(&bin, port);
    let deadline = Instant::now() + Duration::from_secs(5);
    let r = loop {
        match call(&mut c, "d", vec![d(2)]).await {
            Ok(r) => break r,
            Err(e) => {
                assert!(Instant::now() < deadline, "never connected: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(summary(&r), vec![(Code::Ok, 1)]);
    let reset = r.statuses[0].duration_until_reset.expect("reset reported");
    assert!(reset.seconds > 55 && reset.seconds <= 60, "{reset:?}");
    // Exactly at the limit is within it.
    let r = call(&mut c, "d", vec![d(1)]).await.unwrap();
    assert_eq!(summary(&r), vec![(Code::Ok, 0)]);
    // Past it: over, and the hits count (a later check finds it over too).
    let r = call(&mut c, "d", vec![d(2)]).await.unwrap();
    assert_eq!((r.overall_code, summary(&r)), (Code::OverLimit as i32, vec![(Code::OverLimit, 0)]));
    let r = call(&mut c, "d", vec![d(0)]).await.unwrap();
    assert_eq!(summary(&r), vec![(Code::OverLimit, 0)]);

    // Two descriptors, one over: the request is over, both are charged.
    let other = |hits| descriptor(&[("user", "v")], 3, MINUTE, Some(hits));
    let r = call(&mut c, "d", vec![other(2), d(1)]).await.unwrap();
    assert_eq!(summary(&r), vec![(Code::Ok, 1), (Code::OverLimit, 0)]);
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    let r = call(&mut c, "d", vec![other(0)]).await.unwrap();
    assert_eq!(summary(&r), vec![(Code::Ok, 1)]);

    // Fixed one-second window from the first hit.
    let s = |hits| descriptor(&[("k", "s")], 1, SECOND, Some(hits));
    assert_eq!(summary(&call(&mut c, "d", vec![s(1)]).await.unwrap()), vec![(Code::Ok, 0)]);
    assert_eq!(summary(&call(&mut c, "d", vec![s(1)]).await.unwrap()), vec![(Code::OverLimit, 0)]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(summary(&call(&mut c, "d", vec![s(1)]).await.unwrap()), vec![(Code::Ok, 0)]);

    // Redis goes away: every call fails fast with UNAVAILABLE.
    drop(redis);
    for _ in 0..3 {
        let t = Instant::now();
        let e = call(&mut c, "d", vec![other(1)]).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }

    // Back (empty, nothing was persisted): the very next call succeeds.
    redis = Redis::start(&bin, port);
    let r = call(&mut c, "d", vec![other(1)]).await.unwrap();
    assert_eq!(summary(&r), vec![(Code::Ok, 2)]);
    drop(redis);
}
