//! `normandy-node local`: one process on a local registry (tiers 0d and 1: LMDB, or Postgres
//! without a cluster), driven by JSON lines on stdin — the fault harness's worker.
//!
//! Requests, one per line: `{"id": 1, "op": "start", "session": "s1", "template": "demo"}`,
//! `{"id": 2, "op": "send", "session": "s1", "input_id": "i1", "text": "hello"}` or `{"id": 3,
//! "op": "subscribe", "session": "s1", "after": 0}`. Replies, one per line, in any order: `{"id":
//! 2, "ok": {"end_seq": 4}}` or `{"id": 2, "error": {"kind": "Fenced", "message": "…"}}`; a
//! subscription answers `{"id": 3, "entry": {…}}` per committed entry, then `{"id": 3, "ok": {}}`
//! when the stream ends (or an error); `{"id": 4, "op": "unsubscribe", "session": "-", "after":
//! 3}` ends subscription 3 (no reply). The process prints `READY <node id>` once it serves, resumes the
//! store's interrupted eager sessions in the background (every one: a single host's restart), and
//! exits when stdin closes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use normandy_core::{Input, InputId, NodeId, OwnerFilter, SessionId, Sessions, StartOptions};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::Flags;
use crate::demo::{Counter, DemoTools, ToolLog};

#[derive(Deserialize)]
struct Request {
    id: u64,
    op: String,
    session: String,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    input_id: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    after: u64,
}

pub(crate) async fn local(flags: &Flags) -> anyhow::Result<()> {
    let name = flags.get("name").unwrap_or_else(|| "local".into());
    let node = NodeId::with_fresh_incarnation(&name)?;
    let store: Arc<dyn normandy_core::SessionStore> = match flags.get("lmdb-dir") {
        Some(dir) => Arc::new(
            normandy_store_lmdb::LmdbStore::open(normandy_store_lmdb::LmdbConfig::new(&dir))
                .with_context(|| format!("cannot open the LMDB store in {dir}"))?,
        ),
        None => match flags.get("postgres-url") {
            Some(url) => crate::postgres_store(&url, flags.get("postgres-schema")).await?,
            None => bail!("local needs --lmdb-dir DIR (tier 0d) or --postgres-url URL (tier 1)"),
        },
    };
    let tools = DemoTools {
        counter: Counter::LogOnly,
        prefix: String::new(),
        latency: flags.ms("tool-latency-ms", 0)?,
        log: flags
            .get("tool-log")
            .map(|p| ToolLog::open(&p))
            .transpose()?,
    };
    let catalog = crate::demo::catalog(tools, flags.ms("model-latency-ms", 0)?)?;
    let sessions = Sessions::builder(catalog)
        .node(node.clone())
        .store(store)
        .build()?;
    println!("READY {node}");
    let resumer = sessions.clone();
    tokio::spawn(async move {
        if let Err(e) = resumer.resume_interrupted(&OwnerFilter::Any).await {
            tracing::warn!(error = %e, "could not list the interrupted sessions");
        }
    });

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        while let Some(mut line) = rx.recv().await {
            line.push('\n');
            if out.write_all(line.as_bytes()).await.is_err() || out.flush().await.is_err() {
                return;
            }
        }
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    // Subscriptions by request id, so `unsubscribe` can end one.
    let subscriptions: Arc<Mutex<HashMap<u64, tokio::task::AbortHandle>>> = Arc::default();
    while let Some(line) = lines.next_line().await? {
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => bail!("bad request line {line:?}: {e}"),
        };
        if req.op == "unsubscribe" {
            if let Some(task) = lock(&subscriptions).remove(&req.after) {
                task.abort();
            }
            continue;
        }
        let (sessions, tx, subs) = (sessions.clone(), tx.clone(), subscriptions.clone());
        let (id, subscribe) = (req.id, req.op == "subscribe");
        let task = tokio::spawn(async move {
            let reply = match serve(&sessions, &req, &tx).await {
                Ok(ok) => json!({"id": req.id, "ok": ok}),
                Err(e) => json!({"id": req.id, "error": {
                    "kind": format!("{:?}", e.kind()),
                    "message": e.to_string(),
                }}),
            };
            let _ = tx.send(reply.to_string());
            lock(&subs).remove(&req.id);
        });
        if subscribe && !task.is_finished() {
            lock(&subscriptions).insert(id, task.abort_handle());
        }
    }
    drop(tx);
    sessions.shutdown().await;
    let _ = writer.await;
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn serve(
    sessions: &Sessions,
    req: &Request,
    tx: &tokio::sync::mpsc::UnboundedSender<String>,
) -> normandy_core::Result<serde_json::Value> {
    let session = SessionId::new(&req.session)?;
    match req.op.as_str() {
        "start" => {
            let template = req.template.as_deref().unwrap_or("demo");
            let opts = StartOptions {
                id: Some(session),
                ..StartOptions::default()
            };
            sessions.start_with(template, opts).await?;
            Ok(json!({}))
        }
        "send" => {
            let input_id = InputId::new(req.input_id.as_deref().unwrap_or_default())?;
            let text = req.text.clone().unwrap_or_default();
            let outcome = sessions
                .send(&session, Input::text(text).with_id(input_id))
                .await?;
            Ok(json!({"end_seq": outcome.end_seq}))
        }
        "subscribe" => {
            use futures::StreamExt;
            let mut events = sessions.subscribe(&session, req.after).await?;
            while let Some(ev) = events.next().await {
                if let normandy_core::TurnEvent::Entry(e) = ev? {
                    let line = json!({"id": req.id, "entry": &*e});
                    if tx.send(line.to_string()).is_err() {
                        break;
                    }
                }
            }
            Ok(json!({}))
        }
        other => Err(normandy_core::Error::InvalidInput {
            session: Some(session),
            reason: format!("unknown op {other:?} (start | send | subscribe)"),
        }),
    }
}
