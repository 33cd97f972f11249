//! The processes under test: `normandy-node serve` (a cluster node, reached by its RPC) or
//! `normandy-node local` (a local-tier worker, reached by JSON lines on its stdin), each with
//! a [`Proxy`] on every link the nemesis may cut.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use normandy_cluster::NodeClient;
use normandy_core::{ContentBlock, Entry, InputId, SessionId, TurnEvent};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::oneshot;

use crate::proxy::Proxy;

/// The cluster secret of a run's nodes.
pub(crate) const SECRET: &str = "normandy-chaos-secret";

/// How long a client waits for one operation before it counts it unknown (`info`).
pub(crate) const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// A failed call: the error's kind (`ErrorKind`'s name) and message.
pub(crate) type CallError = (String, String);

/// A session's committed entries, as a subscription delivers them.
pub(crate) type EntryStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<Entry, CallError>> + Send>>;

/// How a client reaches one process.
#[derive(Clone)]
pub(crate) enum Conn {
    /// A cluster node's RPC.
    Rpc(NodeClient),
    /// A local worker's stdin and stdout.
    Stdio(Arc<StdioConn>),
}

impl Conn {
    /// Sends `text` as input `input_id`; the seq of the turn's end on success.
    pub(crate) async fn send(
        &self,
        session: &str,
        input_id: &str,
        text: &str,
    ) -> Result<u64, CallError> {
        match self {
            Conn::Rpc(c) => {
                let (session, input) = ids(session, input_id)?;
                let call = c.send(&session, input, vec![ContentBlock::text(text)]);
                match tokio::time::timeout(OP_TIMEOUT, call).await {
                    Ok(Ok(o)) => Ok(o.end_seq),
                    Ok(Err(e)) => Err((format!("{:?}", e.kind()), e.to_string())),
                    Err(_) => Err(timeout()),
                }
            }
            Conn::Stdio(c) => {
                let req =
                    json!({"op": "send", "session": session, "input_id": input_id, "text": text});
                let ok = c.call(req).await?;
                ok.get("end_seq")
                    .and_then(serde_json::Value::as_u64)
                    .ok_or_else(|| ("Internal".into(), format!("reply without end_seq: {ok}")))
            }
        }
    }

    /// Subscribes to `session`'s entries after `after`.
    pub(crate) async fn subscribe(
        &self,
        session: &str,
        after: u64,
    ) -> Result<EntryStream, CallError> {
        match self {
            Conn::Rpc(c) => {
                let (session, _) = ids(session, "subscribe")?;
                let stream =
                    match tokio::time::timeout(OP_TIMEOUT, c.subscribe(&session, after)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => return Err((format!("{:?}", e.kind()), e.to_string())),
                        Err(_) => return Err(timeout()),
                    };
                Ok(Box::pin(stream.filter_map(|ev| async move {
                    match ev {
                        Ok(TurnEvent::Entry(e)) => Some(Ok((*e).clone())),
                        Ok(_) => None,
                        Err(e) => Some(Err((format!("{:?}", e.kind()), e.to_string()))),
                    }
                })))
            }
            Conn::Stdio(c) => c.subscribe(session, after).await,
        }
    }

    /// Creates `session` from `template`.
    pub(crate) async fn start(&self, session: &str, template: &str) -> Result<(), CallError> {
        match self {
            Conn::Rpc(c) => {
                let (session, _) = ids(session, "start")?;
                match tokio::time::timeout(OP_TIMEOUT, c.start(template, Some(session))).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err((format!("{:?}", e.kind()), e.to_string())),
                    Err(_) => Err(timeout()),
                }
            }
            Conn::Stdio(c) => c
                .call(json!({"op": "start", "session": session, "template": template}))
                .await
                .map(|_| ()),
        }
    }
}

fn timeout() -> CallError {
    ("Timeout".into(), format!("no answer within {OP_TIMEOUT:?}"))
}

fn ids(session: &str, input: &str) -> Result<(SessionId, InputId), CallError> {
    let bad = |e: normandy_core::Error| ("InvalidId".to_string(), e.to_string());
    Ok((
        SessionId::new(session).map_err(bad)?,
        InputId::new(input).map_err(bad)?,
    ))
}

type Pending = HashMap<u64, oneshot::Sender<Result<serde_json::Value, CallError>>>;
type Streams = HashMap<u64, tokio::sync::mpsc::UnboundedSender<Result<Entry, CallError>>>;

/// A local worker's request/reply channel: requests numbered, replies matched by number.
pub(crate) struct StdioConn {
    /// `None` once closed (the worker then shuts down).
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    pending: std::sync::Mutex<Pending>,
    streams: std::sync::Mutex<Streams>,
    next: AtomicU64,
}

impl StdioConn {
    fn new(stdin: ChildStdin, stdout: BufReader<tokio::process::ChildStdout>) -> Arc<Self> {
        let conn = Arc::new(Self {
            stdin: tokio::sync::Mutex::new(Some(stdin)),
            pending: std::sync::Mutex::default(),
            streams: std::sync::Mutex::default(),
            next: AtomicU64::new(1),
        });
        let reader = conn.clone();
        tokio::spawn(async move {
            let mut lines = stdout.lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let Some(id) = v.get("id").and_then(serde_json::Value::as_u64) else {
                    continue;
                };
                if let Some(entry) = v.get("entry") {
                    let entry = serde_json::from_value::<Entry>(entry.clone())
                        .map_err(|e| ("Corrupt".to_string(), format!("bad entry: {e}")));
                    if let Some(tx) = reader.streams().get(&id) {
                        let _ = tx.send(entry);
                    }
                    continue;
                }
                let reply = match (v.get("ok"), v.get("error")) {
                    (Some(ok), _) => Ok(ok.clone()),
                    (None, Some(e)) => Err((
                        e["kind"].as_str().unwrap_or("Internal").to_string(),
                        e["message"].as_str().unwrap_or_default().to_string(),
                    )),
                    _ => Err(("Internal".into(), format!("bad reply {line}"))),
                };
                if let Some(tx) = reader.streams().remove(&id) {
                    if let Err(e) = reply {
                        let _ = tx.send(Err(e));
                    }
                } else if let Some(tx) = reader.pending().remove(&id) {
                    let _ = tx.send(reply);
                }
            }
            // The worker is gone: every call still waiting learns it (dropped senders).
            reader.pending().clear();
            reader.streams().clear();
        });
        conn
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn write(&self, req: &serde_json::Value) -> bool {
        let mut line = req.to_string();
        line.push('\n');
        let mut stdin = self.stdin.lock().await;
        let Some(stdin) = stdin.as_mut() else {
            return false;
        };
        stdin.write_all(line.as_bytes()).await.is_ok() && stdin.flush().await.is_ok()
    }

    /// Closes the worker's stdin: it shuts down gracefully.
    async fn close(&self) {
        self.stdin.lock().await.take();
    }

    async fn subscribe(
        self: &Arc<Self>,
        session: &str,
        after: u64,
    ) -> Result<EntryStream, CallError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.streams().insert(id, tx);
        let req = json!({"id": id, "op": "subscribe", "session": session, "after": after});
        if !self.write(&req).await {
            self.streams().remove(&id);
            return Err(("Unavailable".into(), "the worker exited".into()));
        }
        let sub = Subscription {
            rx,
            id,
            conn: self.clone(),
        };
        Ok(Box::pin(futures::stream::unfold(
            sub,
            |mut sub| async move { sub.rx.recv().await.map(|item| (item, sub)) },
        )))
    }

    async fn call(&self, mut req: serde_json::Value) -> Result<serde_json::Value, CallError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        req["id"] = id.into();
        let (tx, rx) = oneshot::channel();
        self.pending().insert(id, tx);
        let lost = || ("Unavailable".to_string(), "the worker exited".to_string());
        if !self.write(&req).await {
            self.pending().remove(&id);
            return Err(lost());
        }
        match tokio::time::timeout(OP_TIMEOUT, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(lost()),
            Err(_) => {
                self.pending().remove(&id);
                Err(timeout())
            }
        }
    }
}

/// A worker's subscription: dropping it ends the subscription in the worker too.
struct Subscription {
    rx: tokio::sync::mpsc::UnboundedReceiver<Result<Entry, CallError>>,
    id: u64,
    conn: Arc<StdioConn>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.conn.streams().remove(&self.id).is_none() {
            return; // the worker ended it already
        }
        let (conn, id) = (self.conn.clone(), self.id);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let next = conn.next.fetch_add(1, Ordering::Relaxed);
                let req = json!({"id": next, "op": "unsubscribe", "session": "-", "after": id});
                conn.write(&req).await;
            });
        }
    }
}

/// What a client sees of a process: its connection while it is up.
#[derive(Default)]
pub(crate) struct Slot {
    conn: RwLock<Option<Conn>>,
}

impl Slot {
    /// The connection, while the process is up (a paused one stays "up": calls time out).
    pub(crate) fn conn(&self) -> Option<Conn> {
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, conn: Option<Conn>) {
        *self.conn.write().unwrap_or_else(|p| p.into_inner()) = conn;
    }
}

/// Which of a process's links a [`Proxy`] sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Link {
    /// The process's connections to Postgres.
    Postgres,
    /// The process's connections to Redis.
    Redis,
    /// Other nodes' RPC connections to this node.
    Peer,
}

/// `serve` (a cluster node) or `local` (a worker).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProcKind {
    Node,
    Local,
}

/// One process under test.
pub(crate) struct Proc {
    pub(crate) name: String,
    kind: ProcKind,
    bin: PathBuf,
    /// Arguments after `serve`/`local`, links already pointing at the proxies.
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    pub(crate) slot: Arc<Slot>,
    /// Proxies on this process's links.
    pub(crate) links: Vec<(Link, Proxy)>,
    /// Set while SIGSTOPped.
    pub(crate) paused: bool,
}

impl Proc {
    pub(crate) fn new(
        name: &str,
        kind: ProcKind,
        bin: &Path,
        args: Vec<String>,
        logs: &Path,
        links: Vec<(Link, Proxy)>,
    ) -> Self {
        Self {
            name: name.into(),
            kind,
            bin: bin.to_owned(),
            args,
            log: logs.join(format!("{name}.log")),
            child: None,
            slot: Arc::default(),
            links,
            paused: false,
        }
    }

    /// The proxy on `link`, if the process has one.
    pub(crate) fn link(&self, link: Link) -> Option<&Proxy> {
        self.links.iter().find(|(l, _)| *l == link).map(|(_, p)| p)
    }

    /// Whether the process runs (paused or not).
    pub(crate) fn is_up(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the process and waits until it serves.
    pub(crate) async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg(match self.kind {
            ProcKind::Node => "serve",
            ProcKind::Local => "local",
        })
        .args(&self.args)
        .env("RUST_LOG", "warn,normandy_cluster=info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .process_group(0);
        die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let mut lines = BufReader::new(stdout);
        let mut first = String::new();
        let read = tokio::time::timeout(Duration::from_secs(60), lines.read_line(&mut first));
        match read.await {
            Ok(Ok(n)) if n > 0 => {}
            _ => {
                let _ = child.start_kill();
                bail!(
                    "{} did not start (see {}); first line {first:?}",
                    self.name,
                    self.log.display()
                );
            }
        }
        let words: Vec<&str> = first.split_whitespace().collect();
        let conn = match (self.kind, words.as_slice()) {
            (ProcKind::Node, ["LISTENING", _advertised, _node, bound]) => {
                if let Some(peer) = self.link(Link::Peer) {
                    peer.point_at(bound);
                }
                let client = NodeClient::connect(bound, Some(SECRET), OP_TIMEOUT, None)?;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                loop {
                    match client.health().await {
                        Ok(h) if h.serving => break,
                        _ if tokio::time::Instant::now() > deadline => {
                            let _ = child.start_kill();
                            bail!("{} did not serve within 30 s", self.name);
                        }
                        _ => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                // Nothing else reads stdout: keep the pipe drained.
                tokio::spawn(async move {
                    let mut rest = lines.lines();
                    while let Ok(Some(_)) = rest.next_line().await {}
                });
                drop(stdin);
                Conn::Rpc(client)
            }
            (ProcKind::Local, ["READY", _node]) => Conn::Stdio(StdioConn::new(stdin, lines)),
            _ => {
                let _ = child.start_kill();
                bail!("{}: unexpected first line {first:?}", self.name);
            }
        };
        self.child = Some(child);
        self.paused = false;
        self.slot.set(Some(conn));
        Ok(())
    }

    /// SIGKILL, and waits for the process to be gone.
    pub(crate) async fn kill(&mut self) {
        self.slot.set(None);
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        self.paused = false;
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`).
    pub(crate) fn pause(&mut self, stop: bool) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            let signal = if stop {
                Signal::SIGSTOP
            } else {
                Signal::SIGCONT
            };
            let _ = kill(Pid::from_raw(pid as i32), signal);
            self.paused = stop;
        }
    }

    /// A graceful stop (SIGTERM, or stdin closed for a worker), SIGKILL after 15 s.
    pub(crate) async fn stop(&mut self) {
        if self.paused {
            self.pause(false);
        }
        let conn = self.slot.conn();
        self.slot.set(None);
        let Some(mut child) = self.child.take() else {
            return;
        };
        match conn {
            Some(Conn::Stdio(c)) => c.close().await,
            _ => {
                if let Some(pid) = child.id() {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                }
            }
        }
        if tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .is_err()
        {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}

/// Has the kernel SIGKILL the child when its parent dies (`PR_SET_PDEATHSIG`), so no node
/// outlives a harness or a test that was killed.
#[allow(unsafe_code)]
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which
    // is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}
