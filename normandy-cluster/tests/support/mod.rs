//! Helpers shared by the cluster's in-process tests and `normandy-node`'s process tests (which
//! include this file by path): server URLs, key prefixes, polling, event draining.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use normandy_core::EntryPayload;

/// The Redis this process's tests use, found once by [`redis_or_skip`].
static REDIS_URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Finds Redis as every suite does (`NORMANDY_TEST_REDIS_URL`, else the local default when it
/// answers, else a container: `normandy_tests::backends`) and keeps it for [`redis_url`]; `None`
/// after reporting the running test skipped by name (a failure under
/// `NORMANDY_REQUIRE_BACKENDS=1`). Every test here starts with it.
pub async fn redis_or_skip() -> Option<String> {
    match normandy_tests::backends::redis_url().await {
        Some(url) => Some(REDIS_URL.get_or_init(|| url).clone()),
        None => {
            normandy_tests::backends::skip_this_test(&normandy_tests::backends::skip_reason());
            None
        }
    }
}

/// The Redis found by [`redis_or_skip`], which the test must have called first.
pub fn redis_url() -> String {
    REDIS_URL
        .get()
        .cloned()
        .expect("the test starts with `redis_or_skip()`, which finds the Redis server")
}

/// A key prefix no other test (or run) uses.
pub fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("nct-{test}-{}-{nanos}", std::process::id())
}

/// Deletes every key under `prefix` (best effort: a test's leftovers).
pub async fn cleanup(prefix: &str) {
    let Ok(client) = redis::Client::open(redis_url()) else {
        return;
    };
    let Ok(mut con) = client.get_multiplexed_async_connection().await else {
        return;
    };
    for pattern in [format!("{prefix}:*"), format!("{{{prefix}:*")] {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut con)
            .await
            .unwrap_or_default();
        for chunk in keys.chunks(500) {
            let _: Result<i64, _> = redis::cmd("DEL").arg(chunk).query_async(&mut con).await;
        }
    }
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Forwards every event of `stream` into a channel from a task, so the stream is polled all
/// along, as a UI would poll it. The task ends with the stream.
pub fn drain_events(
    mut stream: normandy_core::EventStream,
) -> (
    tokio::sync::mpsc::UnboundedReceiver<normandy_core::Result<normandy_core::TurnEvent>>,
    tokio::task::JoinHandle<()>,
) {
    use futures::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(ev) = stream.next().await {
            if tx.send(ev).is_err() {
                return;
            }
        }
    });
    (rx, task)
}

/// Reads drained events until a turn-end entry, collecting entry seqs. Entries only: a follow
/// guarantees every entry, while progress events of a moment it was re-subscribing are gone.
pub async fn until_turn_end(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<normandy_core::Result<normandy_core::TurnEvent>>,
    seqs: &mut Vec<u64>,
) {
    use normandy_core::TurnEvent;
    loop {
        match tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("events stopped; seqs so far {seqs:?}"))
        {
            Some(Ok(TurnEvent::Entry(e))) => {
                seqs.push(e.seq);
                if matches!(e.payload, EntryPayload::TurnEnd { .. }) {
                    return;
                }
            }
            Some(Ok(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}
