//! The demo catalog every node serves: templates `echo` (a scripted echo, no tools), `demo`
//! (lazy) and `demo-eager`, whose scripted model echoes, or — for an input starting with `tool`
//! — calls the non-idempotent `count` tool, or — for one starting with `idem` — the idempotent
//! `lookup` tool.
//!
//! `count` counts its runs per call id in Redis (`<prefix>:toolruns:<session>:<call id>`), or,
//! on Postgres alone, in the table `normandy_demo_toolruns` of the schema, so tests can prove no
//! call ran twice. With `--tool-log FILE` both tools also append one JSON line per execution to
//! FILE — `{"session": …, "call_id": …, "key": …, "idempotent": …}`, the fault harness's
//! `tools.jsonl` — written before the tool returns, outside any store.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use normandy_core::{
    CatalogEntry, ConfigTemplate, ModelResponse, ResumePolicy, ScriptedClient, TemplateCatalog,
    Tool, ToolContext, ToolOutput, ToolSpec, async_trait,
};

/// Where `count` counts its runs.
#[derive(Clone)]
pub(crate) enum Counter {
    /// `INCR <prefix>:toolruns:<session>:<call id>`.
    Redis(redis::aio::ConnectionManager),
    /// An upsert into `normandy_demo_toolruns` (tier 2p: no Redis at all).
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
    /// Nowhere but the tool log (the local tiers).
    LogOnly,
}

impl Counter {
    async fn bump(&self, key: &str) -> anyhow::Result<Option<i64>> {
        match self {
            Counter::Redis(con) => {
                let mut con = con.clone();
                Ok(Some(
                    redis::cmd("INCR")
                        .arg(key)
                        .query_async::<i64>(&mut con)
                        .await?,
                ))
            }
            #[cfg(feature = "postgres")]
            Counter::Postgres(pool) => Ok(Some(
                sqlx::query_scalar(
                    "INSERT INTO normandy_demo_toolruns (key, runs) VALUES ($1, 1) \
                     ON CONFLICT (key) DO UPDATE SET runs = normandy_demo_toolruns.runs + 1 \
                     RETURNING runs",
                )
                .bind(key)
                .fetch_one(pool)
                .await?,
            )),
            Counter::LogOnly => Ok(None),
        }
    }
}

/// `--tool-log FILE`: one JSON line per tool execution, appended.
pub(crate) struct ToolLog(Mutex<std::fs::File>);

impl ToolLog {
    pub(crate) fn open(path: &str) -> anyhow::Result<Arc<Self>> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the tool log {path}"))?;
        Ok(Arc::new(Self(Mutex::new(file))))
    }

    /// Appends the execution in one `write` (an `O_APPEND` file: lines of several processes
    /// never interleave).
    fn record(&self, ctx: &ToolContext, idempotent: bool) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(&serde_json::json!({
            "session": ctx.session.as_str(),
            "call_id": ctx.call_id,
            "key": ctx.idempotency_key,
            "idempotent": idempotent,
        }))?;
        line.push(b'\n');
        let mut file = self.0.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(&line)
    }
}

/// What the demo tools share.
#[derive(Clone)]
pub(crate) struct DemoTools {
    pub(crate) counter: Counter,
    pub(crate) prefix: String,
    pub(crate) latency: Duration,
    pub(crate) log: Option<Arc<ToolLog>>,
}

impl DemoTools {
    async fn run(&self, ctx: &ToolContext, idempotent: bool) -> ToolOutput {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if let Some(log) = &self.log
            && let Err(e) = log.record(ctx, idempotent)
        {
            return ToolOutput::error(format!("cannot record the run: {e}"));
        }
        if idempotent {
            return ToolOutput::ok(format!("looked up {}", ctx.idempotency_key));
        }
        let key = format!("{}:toolruns:{}:{}", self.prefix, ctx.session, ctx.call_id);
        match self.counter.bump(&key).await {
            Ok(Some(n)) => ToolOutput::ok(format!("run {n}")),
            Ok(None) => ToolOutput::ok("ran"),
            Err(e) => ToolOutput::error(format!("count failed: {e}")),
        }
    }
}

/// A demo tool: `count` (non-idempotent: counts its runs per call id, a stand-in for a paid
/// action) or `lookup` (idempotent: safe to run again under the same key).
struct DemoTool {
    tools: DemoTools,
    idempotent: bool,
}

#[async_trait]
impl Tool for DemoTool {
    fn spec(&self) -> ToolSpec {
        let (name, description) = if self.idempotent {
            ("lookup", "Looks something up (safe to repeat).")
        } else {
            (
                "count",
                "Counts how often this call ran (a stand-in for a paid action).",
            )
        };
        ToolSpec {
            name: name.into(),
            description: description.into(),
            input_schema: serde_json::json!({"type": "object"}),
        }
    }

    fn idempotent(&self) -> bool {
        self.idempotent
    }

    async fn call(&self, _input: serde_json::Value, ctx: ToolContext) -> ToolOutput {
        self.tools.run(&ctx, self.idempotent).await
    }
}

fn demo_client(latency: Duration) -> ScriptedClient {
    ScriptedClient::from_fn(|req| {
        let results = req.last_tool_results();
        if !results.is_empty() {
            let text: Vec<&str> = results.iter().map(|(_, c, _)| *c).collect();
            return Ok(ModelResponse::text(format!("done: {}", text.join(", "))));
        }
        let text = req.last_user_text().unwrap_or_default();
        let tool = if text.starts_with("tool") {
            "count"
        } else if text.starts_with("idem") {
            "lookup"
        } else {
            return Ok(ModelResponse::text(format!("echo: {text}")));
        };
        // Deterministic call id: a re-issued model call asks for the same call.
        let id = format!("call-{}", req.messages.len());
        Ok(ModelResponse::tool_call(id, tool, serde_json::json!({})))
    })
    .with_latency(latency)
}

/// The demo catalog, its model answering after `model_latency`.
pub(crate) fn catalog(
    tools: DemoTools,
    model_latency: Duration,
) -> anyhow::Result<TemplateCatalog> {
    let entry = |policy| {
        let name = if policy == ResumePolicy::Eager {
            "demo-eager"
        } else {
            "demo"
        };
        (
            ConfigTemplate::new(name, "scripted").resume_policy(policy),
            CatalogEntry::with_client(demo_client(model_latency))
                .tool(DemoTool {
                    tools: tools.clone(),
                    idempotent: false,
                })
                .tool(DemoTool {
                    tools: tools.clone(),
                    idempotent: true,
                }),
        )
    };
    let (t1, e1) = entry(ResumePolicy::Lazy);
    let (t2, e2) = entry(ResumePolicy::Eager);
    // `echo`: the plainest session (no tools), for benchmarks of the routing path.
    Ok(TemplateCatalog::new().with(t1, e1)?.with(t2, e2)?.with(
        ConfigTemplate::new("echo", "scripted"),
        CatalogEntry::with_client(ScriptedClient::echo()),
    )?)
}
