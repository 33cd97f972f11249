//! A TCP fault proxy for one link (a node's connection to its backend, or the RPC link to one
//! node): bytes pass, stop both ways (a partition), arrive late, or every connection is reset.
//! Without Docker and without `tc netem` (not available on the machines this runs on), this is
//! how the fault harness and the node tests cut links.

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a [`Proxy`] does to the bytes of its link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Bytes flow as they come.
    Pass,
    /// Bytes stop both ways and connections stay open, as in a partition. Nothing is read while
    /// the link is dark; bytes read just before are held and delivered once it heals (TCP
    /// would retransmit them).
    Blackhole,
    /// Every chunk is held this long, each way (a delay line: chunks stay pipelined).
    Delay(Duration),
    /// Every open connection is reset (RST) at once, and every new one as soon as it is
    /// accepted, until the fault changes.
    Reset,
}

/// A TCP proxy for one link (a node's Redis connection, or the RPC link to one node) that
/// injects a [`Fault`]. Dropping it resets every connection through it.
pub struct Proxy {
    /// Where the proxy listens (`host:port`).
    pub addr: String,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyState {
    /// Where connections go; `None` until [`Proxy::point_at`]: connections accepted before
    /// then wait for it.
    upstream: tokio::sync::watch::Sender<Option<String>>,
    fault: tokio::sync::watch::Sender<Fault>,
    /// Bumped to reset every open connection.
    kick: tokio::sync::watch::Sender<u64>,
    accepted: std::sync::atomic::AtomicU64,
    resets: std::sync::atomic::AtomicU64,
    /// The local ports of the upstream connections open now (a Postgres backend's
    /// `client_port`: how the harness finds the backends of this link to terminate).
    upstream_ports: std::sync::Mutex<std::collections::BTreeSet<u16>>,
}

impl Proxy {
    /// A proxy in front of `upstream` (`host:port`), passing bytes until told otherwise.
    pub async fn to(upstream: &str) -> std::io::Result<Proxy> {
        let p = Self::pending().await?;
        p.point_at(upstream);
        Ok(p)
    }

    /// A proxy whose upstream is given later ([`point_at`](Self::point_at)), so that a node can
    /// advertise the proxy's address before the node has bound its own port.
    pub async fn pending() -> std::io::Result<Proxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let state = Arc::new(ProxyState {
            upstream: tokio::sync::watch::Sender::new(None),
            fault: tokio::sync::watch::Sender::new(Fault::Pass),
            kick: tokio::sync::watch::Sender::new(0),
            accepted: 0.into(),
            resets: 0.into(),
            upstream_ports: std::sync::Mutex::default(),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                st.accepted.fetch_add(1, SeqCst);
                if *st.fault.borrow() == Fault::Reset {
                    st.resets.fetch_add(1, SeqCst);
                    rst(&down);
                    continue;
                }
                tokio::spawn(link(down, st.clone()));
            }
        });
        Ok(Proxy { addr, state, task })
    }

    /// Sends connections to `upstream` (`host:port`) from now on.
    pub fn point_at(&self, upstream: &str) {
        self.state.upstream.send_replace(Some(upstream.to_string()));
    }

    /// Sets the link's fault; [`Fault::Reset`] resets every open connection at once.
    pub fn set(&self, fault: Fault) {
        self.state.fault.send_replace(fault);
        if fault == Fault::Reset {
            self.reset();
        }
    }

    /// Blackholes the link (`true`) or lets bytes pass again.
    pub fn blackhole(&self, on: bool) {
        self.set(if on { Fault::Blackhole } else { Fault::Pass });
    }

    /// Resets (RST) every connection open now; the fault stays as it is for new ones.
    pub fn reset(&self) {
        self.state.kick.send_modify(|k| *k += 1);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(SeqCst)
    }

    /// Connections reset so far.
    pub fn resets(&self) -> u64 {
        self.state.resets.load(SeqCst)
    }

    /// The local ports of the upstream connections open now.
    pub fn upstream_ports(&self) -> Vec<u16> {
        let ports = self.state.upstream_ports.lock();
        ports
            .map(|p| p.iter().copied().collect())
            .unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.reset();
    }
}

/// Closes `s` with an RST instead of a FIN once it is dropped.
fn rst(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

/// One proxied connection: bytes pumped both ways until both sides are done or a reset.
async fn link(mut down: TcpStream, state: Arc<ProxyState>) {
    let mut kick = state.kick.subscribe();
    let mut upstream = state.upstream.subscribe();
    let Ok(upstream) = upstream
        .wait_for(Option::is_some)
        .await
        .map(|u| u.clone().unwrap())
    else {
        rst(&down);
        return;
    };
    let Ok(mut up) = TcpStream::connect(&upstream).await else {
        rst(&down);
        return;
    };
    let _ = (down.set_nodelay(true), up.set_nodelay(true));
    let port = up.local_addr().map(|a| a.port()).unwrap_or(0);
    if let Ok(mut ports) = state.upstream_ports.lock() {
        ports.insert(port);
    }
    let reset = {
        let (dr, dw) = down.split();
        let (ur, uw) = up.split();
        tokio::select! {
            _ = async { tokio::join!(pump(dr, uw, &state), pump(ur, dw, &state)) } => false,
            _ = kick.changed() => true,
        }
    };
    if let Ok(mut ports) = state.upstream_ports.lock() {
        ports.remove(&port);
    }
    if reset {
        state.resets.fetch_add(1, SeqCst);
        rst(&down);
        rst(&up);
    }
}

/// One direction of a connection: a reader that stamps each chunk with when it is due, and a
/// writer that delivers it then (and not while the link is dark).
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    state: &ProxyState,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(64);
    let read = async move {
        let mut fault = state.fault.subscribe();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let _ = fault.wait_for(|f| *f != Fault::Blackhole).await;
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return, // dropping `tx` lets the writer finish
                Ok(n) => n,
            };
            let delay = match *fault.borrow() {
                Fault::Delay(d) => d,
                _ => Duration::ZERO,
            };
            let due = tokio::time::Instant::now() + delay;
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    let write = async move {
        let mut fault = state.fault.subscribe();
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let _ = fault.wait_for(|f| *f != Fault::Blackhole).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await; // the other side sent FIN: pass it on
    };
    tokio::join!(read, write);
}
