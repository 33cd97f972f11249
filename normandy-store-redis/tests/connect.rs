//! `RedisStore::connect` honours its configured bounds: a closed port fails within about the
//! connect timeout, a listener that never answers within connect + response timeout, each with
//! a typed `Unavailable` naming the address and the bound. (Before issue 15 the client's own
//! reconnect retries decided: 9.5 s for a closed port, 13–23.5 s for a silent listener, with
//! 500 ms + 500 ms configured.) No Redis server is needed: each test makes its own dead end.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use normandy_core::ErrorKind;
use normandy_store_redis::{RedisStore, RedisStoreConfig};
use tokio::net::TcpListener;

const BOUND: Duration = Duration::from_millis(500);
/// Far below the old 9.5–23.5 s, with room for a loaded 2-core CI machine.
const LIMIT: Duration = Duration::from_secs(2);

fn config(addr: SocketAddr) -> RedisStoreConfig {
    RedisStoreConfig::new(&format!("redis://{addr}"))
        .unwrap()
        .prefix("connect-test")
        .connect_timeout(BOUND)
        .response_timeout(BOUND)
}

/// Connects to `addr`, expecting a bounded `Unavailable` that names the address.
async fn fails_in_time(what: &str, addr: SocketAddr) {
    let started = Instant::now();
    let result = RedisStore::connect(config(addr)).await;
    let elapsed = started.elapsed();
    let err = result.expect_err("connect to a dead end succeeded");
    println!("{what}: connect failed after {elapsed:?}: {err}");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{what}: {err}");
    assert!(err.is_retryable(), "{what}: {err}");
    let text = err.to_string();
    assert!(text.contains(&addr.to_string()), "{what}: {text}");
    assert!(text.contains("500 ms"), "{what}: {text}");
    assert!(elapsed < LIMIT, "{what}: took {elapsed:?}: {text}");
}

#[tokio::test]
async fn connect_to_a_closed_port_fails_within_the_connect_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    fails_in_time("closed port", addr).await;
}

#[tokio::test]
async fn connect_to_a_listener_that_accepts_and_never_answers_fails_in_time() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepts every connection and holds it open without a byte of reply.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    fails_in_time("silent listener", addr).await;
    silent.abort();
}

#[tokio::test]
async fn connect_to_a_listener_that_never_accepts_fails_in_time() {
    // The kernel completes the handshake into the backlog; nobody ever reads.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    fails_in_time("listener that never accepts", addr).await;
    drop(listener);
}
