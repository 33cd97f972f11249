//! `RedisRegistry::connect` and `RedisMembership::connect` honour their configured bounds: a
//! closed port fails at once, a listener that never answers within connect + response timeout,
//! each with a typed `Unavailable` naming the address. (Before issue 15 the client's own
//! reconnect retries decided: 9.5 s and 13 s with 500 ms + 500 ms configured.) No Redis server
//! is needed: each test makes its own dead end.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use normandy_core::{ErrorKind, Result};
use normandy_registry_redis::{RedisMembership, RedisRegistry, RedisRegistryConfig};
use tokio::net::TcpListener;

const BOUND: Duration = Duration::from_millis(500);
/// Far below the old 9.5–13 s, with room for a loaded 2-core CI machine.
const LIMIT: Duration = Duration::from_secs(2);

async fn registry(addr: SocketAddr) -> Result<()> {
    let config = RedisRegistryConfig::new(&format!("redis://{addr}"))?
        .prefix("connect-test")
        .connect_timeout(BOUND)
        .response_timeout(BOUND);
    RedisRegistry::connect(config).await.map(drop)
}

async fn membership(addr: SocketAddr) -> Result<()> {
    let client = redis::Client::open(format!("redis://{addr}")).unwrap();
    RedisMembership::connect(client, "connect-test", BOUND)
        .await
        .map(drop)
}

async fn fails_in_time<F: std::future::Future<Output = Result<()>>>(
    what: &str,
    addr: SocketAddr,
    connect: F,
) {
    let started = Instant::now();
    let result = connect.await;
    let elapsed = started.elapsed();
    let err = result.expect_err("connect to a dead end succeeded");
    println!("{what}: connect failed after {elapsed:?}: {err}");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{what}: {err}");
    let text = err.to_string();
    assert!(text.contains(&addr.to_string()), "{what}: {text}");
    assert!(elapsed < LIMIT, "{what}: took {elapsed:?}: {text}");
}

/// A listener that accepts every connection and holds it open without a byte of reply.
async fn silent_listener() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (addr, task)
}

async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn registry_connect_to_a_closed_port_fails_at_once() {
    let addr = closed_port().await;
    fails_in_time("registry, closed port", addr, registry(addr)).await;
}

#[tokio::test]
async fn registry_connect_to_a_silent_listener_fails_in_time() {
    let (addr, task) = silent_listener().await;
    fails_in_time("registry, silent listener", addr, registry(addr)).await;
    task.abort();
}

#[tokio::test]
async fn membership_connect_to_a_closed_port_fails_at_once() {
    let addr = closed_port().await;
    fails_in_time("membership, closed port", addr, membership(addr)).await;
}

#[tokio::test]
async fn membership_connect_to_a_silent_listener_fails_in_time() {
    let (addr, task) = silent_listener().await;
    fails_in_time("membership, silent listener", addr, membership(addr)).await;
    task.abort();
}
