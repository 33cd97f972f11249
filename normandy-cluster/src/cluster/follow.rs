//! [`Cluster::follow`](super::Cluster::follow): a subscription that subscribes again, after the
//! last seq it yielded, whenever its stream ends or fails retryably, wherever the session went.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use normandy_core::{Error, EventStream, Result, Seq, SessionId};
use tokio::sync::watch;
use tracing::debug;

use super::Node;
use super::route::reroutable;

/// Whether a follow subscribes again after `e`: whatever a request would re-route, and any
/// other retryable error.
fn follow_on(e: &Error) -> bool {
    reroutable(e) || e.is_retryable()
}

/// The wait before attempt number `failures + 1`: 20 ms doubling to 1 s; none after a success.
fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(20)
        .saturating_mul(1 << (failures - 1).min(6))
        .min(Duration::from_secs(1))
}

/// One follow's state between polls.
struct Follow {
    node: Arc<Node>,
    stop: watch::Receiver<bool>,
    id: SessionId,
    /// The last seq yielded; re-subscriptions replay after it.
    last: Seq,
    current: Option<EventStream>,
    failures: u32,
}

/// See [`Cluster::follow`](super::Cluster::follow).
pub(super) async fn follow(node: Arc<Node>, id: &SessionId, after: Seq) -> Result<EventStream> {
    let first = node.route_subscribe(id, after).await?;
    let state = Follow {
        stop: node.life.stop.subscribe(),
        node,
        id: id.clone(),
        last: after,
        current: Some(first),
        failures: 0,
    };
    Ok(Box::pin(futures::stream::unfold(
        Some(state),
        |state| async move {
            let mut st = state?;
            loop {
                // A node that drains or stops ends its follows (their callers follow on through
                // another node); nothing here holds up its shutdown.
                if st.node.stopped() || st.node.life.draining.load(Ordering::SeqCst) {
                    return None;
                }
                let mut stream = match st.current.take() {
                    Some(stream) => stream,
                    None => {
                        let wait = backoff(st.failures);
                        if !wait.is_zero() {
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {}
                                _ = st.stop.wait_for(|s| *s) => return None,
                            }
                        }
                        let subscribed = tokio::select! {
                            r = st.node.route_subscribe(&st.id, st.last) => r,
                            _ = st.stop.wait_for(|s| *s) => return None,
                        };
                        match subscribed {
                            Ok(stream) => stream,
                            Err(e) if follow_on(&e) => {
                                debug!(session = %st.id, error = %e, "follow: subscribing again");
                                st.failures += 1;
                                continue;
                            }
                            Err(e) => return Some((Err(e), None)),
                        }
                    }
                };
                let next = tokio::select! {
                    next = stream.next() => next,
                    _ = st.stop.wait_for(|s| *s) => return None,
                };
                match next {
                    Some(Ok(event)) => {
                        st.current = Some(stream);
                        if let Some(seq) = event.seq() {
                            if seq <= st.last {
                                continue; // already yielded before a re-subscription
                            }
                            st.last = seq;
                        }
                        st.failures = 0;
                        return Some((Ok(event), Some(st)));
                    }
                    Some(Err(e)) if follow_on(&e) => {
                        debug!(session = %st.id, error = %e, "follow: stream failed; subscribing again");
                        st.failures += 1;
                    }
                    Some(Err(e)) => return Some((Err(e), None)),
                    // The owner's actor went away (passivated, fenced, moved): follow it.
                    None => st.failures += 1,
                }
            }
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_from_20_ms_to_a_second_and_none_after_success() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_millis(20));
        assert_eq!(backoff(2), Duration::from_millis(40));
        assert_eq!(backoff(6), Duration::from_millis(640));
        assert_eq!(backoff(7), Duration::from_secs(1));
        assert_eq!(backoff(1000), Duration::from_secs(1));
    }
}
