//! The connections: one reconnecting multiplexed connection for reads and plain writes, a pool
//! of dedicated connections for writes that `WAIT`, and sending a script on either (loading it
//! again when the server has lost it).

use std::sync::Mutex;

use normandy_core::{Error, Result};
use normandy_redis::{ConnectOptions, RedisConn, RedisTarget};
use redis::aio::ConnectionLike;
use redis::{Cmd, RedisError, Script, ServerErrorKind, Value};
use tokio::sync::Semaphore;

use crate::config::{RedisStoreConfig, Wait};
use crate::error::{self, Ctx};

/// Opens the shared connection: one attempt, bounded by the connect timeout (which in the
/// client covers the TCP connect and the handshake). A server that does not answer is
/// `Unavailable`, naming the address and the bound.
///
/// No retries inside the client: its default (6 retries with exponential backoff) made a
/// closed port take 9.5 s and a silent listener 13–23.5 s with 500 ms timeouts configured
/// (issue 15). The same setting governs its reconnects, so a call during an outage waits for
/// one connection attempt, not for the client's backoff: retrying is the caller's (the
/// engine's commit retry, the caller's resend), where it is bounded and named.
///
/// On a cluster this is a cluster connection: it follows `MOVED` and `ASK` and refreshes its
/// slot map by itself (a bounded number of resends within the response timeout).
pub(crate) async fn connect_shared(config: &RedisStoreConfig) -> Result<RedisConn> {
    config
        .target
        .connect(ConnectOptions {
            connect_timeout: config.connect_timeout,
            response_timeout: config.response_timeout,
        })
        .await
        .map_err(|e| connect_error(&connect_target(config), e))
}

/// What connecting may take in all: the connect timeout, then one reply (the first command).
pub(crate) fn connect_bound(config: &RedisStoreConfig) -> std::time::Duration {
    config.connect_timeout + config.response_timeout
}

/// A failed connection attempt as a typed error. Unreachable servers (refused, timed out,
/// dropped) become `Unavailable` naming the address and the configured bounds; anything else
/// (a wrong password, say) keeps its own mapping.
pub(crate) fn connect_error(target: &str, e: RedisError) -> Error {
    match error::map(e, Ctx::default()) {
        Error::Unavailable { backend, message } => Error::Unavailable {
            backend,
            message: format!("cannot connect to {target}: {message}"),
        },
        other => other,
    }
}

/// `Unavailable` for a connect that outlasted [`connect_bound`] as a whole.
pub(crate) fn connect_timed_out(config: &RedisStoreConfig) -> Error {
    Error::Unavailable {
        backend: error::BACKEND,
        message: format!(
            "cannot connect to {}: no answer within {} ms",
            connect_target(config),
            connect_bound(config).as_millis()
        ),
    }
}

/// `<host:port> (connect timeout N ms, response timeout M ms)`; never the URL, which may
/// carry a password.
pub(crate) fn connect_target(config: &RedisStoreConfig) -> String {
    format!(
        "{} (connect timeout {} ms, response timeout {} ms)",
        config.target.describe(),
        config.connect_timeout.as_millis(),
        config.response_timeout.as_millis()
    )
}

/// Dedicated connections for commits that `WAIT`: each carries one commit at a time, so a
/// `WAIT` blocks nobody else, and its `WAIT` always follows its own script on the same socket
/// (a reconnected multiplexed connection could otherwise acknowledge an offset it never wrote).
///
/// On a cluster each pooled connection is a cluster connection of its own, and the script and
/// its `WAIT` go out as one pipeline, which the client routes to the primary of the script's
/// slot: the `WAIT` counts the replicas of the primary that ran the script. (A bare `WAIT`
/// on a cluster connection would go to every primary and return the smallest count.)
pub(crate) struct WaitPool {
    target: RedisTarget,
    /// The address and bounds, for a connect error ([`connect_target`]).
    described: String,
    options: ConnectOptions,
    pub(crate) wait: Wait,
    // std Mutex: push/pop only, never held across an await.
    idle: Mutex<Vec<RedisConn>>,
    permits: Semaphore,
}

impl WaitPool {
    /// The pool for `wait`, or `None` when the config asks for no replica acknowledgement.
    pub(crate) fn new(config: &RedisStoreConfig) -> Option<Self> {
        config.wait.map(|wait| WaitPool {
            target: config.target.clone(),
            described: connect_target(config),
            // The response timeout must outlast the WAIT itself, or a healthy but slow WAIT
            // would surface as a broken connection instead of a count of acknowledgements.
            // One attempt per call, bounded by the connect timeout (no retry loop here).
            options: ConnectOptions {
                connect_timeout: config.connect_timeout,
                response_timeout: config.response_timeout + wait.timeout,
            },
            wait,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(config.wait_connections),
        })
    }

    async fn acquire(&self) -> Result<(tokio::sync::SemaphorePermit<'_>, RedisConn)> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::Internal("redis store wait pool closed".into()))?;
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let con = match idle {
            Some(con) => con,
            None => self
                .target
                .connect_dedicated(self.options)
                .await
                .map_err(|e| connect_error(&self.described, e))?,
        };
        Ok((permit, con))
    }

    fn release(&self, con: RedisConn) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(con);
    }
}

/// Sends `cmd` (an `EVALSHA`) and `WAIT` in one pipeline on a dedicated connection; returns the
/// script's reply and how many replicas acknowledged. Loads the script once on `NOSCRIPT`.
pub(crate) async fn run_with_wait(
    pool: &WaitPool,
    script: &Script,
    cmd: &Cmd,
    ctx: Ctx<'_>,
) -> Result<(Value, u32)> {
    let (_permit, mut con) = pool.acquire().await?;
    let mut loaded = false;
    loop {
        let mut pipe = redis::pipe();
        pipe.add_command(cmd.clone())
            .cmd("WAIT")
            .arg(pool.wait.replicas)
            .arg(pool.wait.timeout.as_millis() as u64)
            .ignore_errors();
        // On an I/O error the connection is dropped (not released), so a fresh one replaces
        // it: nothing after a broken socket is trusted.
        let mut replies: Vec<redis::RedisResult<Value>> = pipe
            .query_async(&mut con)
            .await
            .map_err(|e| error::map(e, ctx))?;
        if replies.len() != 2 {
            return Err(error::unexpected(ctx, "EVALSHA + WAIT", &Value::Nil));
        }
        let acks = replies.pop().and_then(|r| r.ok());
        let script_reply = replies.pop().unwrap_or(Ok(Value::Nil));
        match script_reply {
            Err(e) if is_noscript(&e) && !loaded => {
                loaded = true;
                script
                    .load_async(&mut con)
                    .await
                    .map_err(|e| error::map(e, ctx))?;
            }
            Err(e) => {
                pool.release(con);
                return Err(error::map(e, ctx));
            }
            Ok(value) => {
                pool.release(con);
                let acked = match acks {
                    Some(Value::Int(n)) => u32::try_from(n.max(0)).unwrap_or(u32::MAX),
                    Some(other) => return Err(error::unexpected(ctx, "WAIT", &other)),
                    None => 0,
                };
                return Ok((value, acked));
            }
        }
    }
}

/// Sends an `EVALSHA` command, loading the script and resending once on `NOSCRIPT` (after a
/// server restart or `SCRIPT FLUSH`).
pub(crate) async fn eval_on(
    con: &mut impl ConnectionLike,
    script: &Script,
    cmd: &Cmd,
    ctx: Ctx<'_>,
) -> Result<Value> {
    match cmd.query_async::<Value>(con).await {
        Err(e) if is_noscript(&e) => {
            script
                .load_async(con)
                .await
                .map_err(|e| error::map(e, ctx))?;
            cmd.query_async(con).await.map_err(|e| error::map(e, ctx))
        }
        other => other.map_err(|e| error::map(e, ctx)),
    }
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(ServerErrorKind::NoScript)
}
