//! The service over a real gRPC connection, in memory, and the binary's
//! command line.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use spillway_ratelimit::RateLimitServer;

const BIN: &str = env!("CARGO_BIN_EXE_spillway-ratelimit");

#[tokio::test]
async fn answers_over_grpc() {
    let addr = start(RateLimitServer::in_memory()).await;
    let mut c = client(addr).await;
    let r = call(&mut c, "spillway", vec![descriptor(&[("deployment", "a")], 5, MINUTE, Some(3))]).await.unwrap();
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(summary(&r), vec![(Code::Ok, 2)]);
    let r = call(&mut c, "spillway", vec![descriptor(&[("deployment", "a")], 5, MINUTE, Some(3))]).await.unwrap();
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(summary(&r), vec![(Code::OverLimit, 0)]);
}

#[test]
fn help_prints_usage() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--listen") && text.contains("--redis"), "{text}");
}

#[test]
fn bad_arguments_exit_2() {
    for args in [
        &[][..],
        &["--listen", "not-an-address"][..],
        &["--listen", "127.0.0.1:0", "--redis", "http://not-redis"][..],
        &["--listen", "127.0.0.1:0", "--bogus"][..],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
}

#[tokio::test]
async fn the_binary_logs_its_address_and_serves() {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("in memory"), "{line}");
    let addr = line.split("listening on ").nth(1).and_then(|s| s.split(',').next()).unwrap().parse().unwrap();

    let mut c = client(addr).await;
    let r = call(&mut c, "d", vec![descriptor(&[("k", "v")], 2, MINUTE, None)]).await;
    child.kill().unwrap();
    let _ = child.wait();
    assert_eq!(summary(&r.unwrap()), vec![(Code::Ok, 1)]);
}
