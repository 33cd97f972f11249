//! The main job: a trip-budget agent with real tools, whose turns survive being killed.
//!
//! By default the "model" is scripted (no API key needed) but the turn is real: the engine calls
//! a calculator tool for each item, sums them with another call, records the total in a ledger
//! file (a non-idempotent side effect), then answers, streaming its answer. Given a model server
//! (`--base-url`, any OpenAI-compatible API) or `--anthropic`, the same agent runs on that real
//! model, its answer streamed to the terminal as it comes. State lives in an LMDB environment
//! (`./normandy-data` by default), so killing the process mid-turn and running it again resumes
//! the interrupted turn without repeating the tool calls that had finished.
//!
//! ```text
//! cargo run -p normandy-demo                      # run a turn
//! cargo run -p normandy-demo -- --kill-after 2    # SIGKILL itself after two tool calls
//! cargo run -p normandy-demo                      # ...and resume the interrupted turn
//! cargo run -p normandy-demo -- --fresh           # start over
//! cargo run -p normandy-demo -- --memory          # tier 0: in-memory, nothing kept
//! cargo run -p normandy-demo -- --base-url http://127.0.0.1:8088/v1   # a local model server
//! cargo run -p normandy-demo -- --anthropic       # Claude (ANTHROPIC_API_KEY)
//! ```

mod tools;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use normandy_core::{
    Attempt, CatalogEntry, ConfigTemplate, ContentBlock, EntryPayload, ErrorKind, Input, InputId,
    ModelDelta, ModelRequest, ModelResponse, Phase, ResumePolicy, Role, ScriptedClient, SessionId,
    SessionStore, Sessions, StartOptions, TemplateCatalog, TurnEvent,
};
use normandy_llm::anthropic::{self, AnthropicConfig};
use normandy_llm::openai::{self, OpenAiClient, OpenAiConfig};
use normandy_store_lmdb::{LmdbConfig, LmdbStore};
use serde_json::json;

use tools::{AfterCall, Calculator, Counter, Ledger};

const USAGE: &str = "usage: normandy-demo [--data DIR] [--memory] [--fresh] [--kill-after N]
                     [--delay-ms MS] [--session ID] [--question TEXT]
                     [--base-url URL [--key-env VAR] | --anthropic] [--model NAME]

  --data DIR        where the LMDB environment lives (default ./normandy-data)
  --memory          tier 0: in-memory store, nothing survives the process
  --fresh           delete the session (and the ledger) first
  --kill-after N    SIGKILL this process after N tool calls, to show a resume
  --delay-ms MS     how long each tool call takes (default 400)
  --session ID      session id (default trip-demo)
  --question TEXT   the items, as `label: expression; ...`
  --base-url URL    run on an OpenAI-compatible model server (OpenAI, vLLM, llama.cpp,
                    Ollama: http://HOST:PORT/v1) instead of the scripted model
  --key-env VAR     the environment variable holding that server's API key (none by default)
  --anthropic       run on Anthropic's API, key from ANTHROPIC_API_KEY
  --model NAME      the model (default: the server's own; claude-sonnet-4-5 with --anthropic)
  --max-tokens N    the longest answer a real model may give per call (default 512)";

const DEFAULT_QUESTION: &str =
    "hotel: 3 * 89.90; flights: 2 * 210.25; dinners: 4 * 35; museum: 2 * (18 + 4.5)";

/// Which model runs the agent.
enum Model {
    /// The scripted planner: no server, no key.
    Scripted,
    /// An OpenAI-compatible server, with the variable holding its key, if any.
    OpenAi {
        base_url: String,
        key_env: Option<String>,
    },
    /// Anthropic's API.
    Anthropic,
}

struct Args {
    model: Model,
    model_name: Option<String>,
    max_tokens: u32,
    data: PathBuf,
    memory: bool,
    fresh: bool,
    kill_after: Option<usize>,
    delay: Duration,
    session: String,
    question: String,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        model: Model::Scripted,
        model_name: None,
        max_tokens: 512,
        data: PathBuf::from("normandy-data"),
        memory: false,
        fresh: false,
        kill_after: None,
        delay: Duration::from_millis(400),
        session: "trip-demo".into(),
        question: DEFAULT_QUESTION.into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--data" => args.data = value("--data")?.into(),
            "--memory" => args.memory = true,
            "--fresh" => args.fresh = true,
            "--kill-after" => args.kill_after = Some(value("--kill-after")?.parse()?),
            "--delay-ms" => args.delay = Duration::from_millis(value("--delay-ms")?.parse()?),
            "--session" => args.session = value("--session")?,
            "--question" => args.question = value("--question")?,
            "--base-url" => {
                let base_url = value("--base-url")?;
                let key_env = match &args.model {
                    Model::OpenAi { key_env, .. } => key_env.clone(),
                    _ => None,
                };
                args.model = Model::OpenAi { base_url, key_env };
            }
            "--key-env" => {
                let var = value("--key-env")?;
                match &mut args.model {
                    Model::OpenAi { key_env, .. } => *key_env = Some(var),
                    _ => bail!("--key-env goes after --base-url"),
                }
            }
            "--anthropic" => args.model = Model::Anthropic,
            "--model" => args.model_name = Some(value("--model")?),
            "--max-tokens" => args.max_tokens = value("--max-tokens")?.parse()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    Ok(args)
}

/// The scripted "model": a pure function of the conversation, so a rebuilt session continues
/// exactly where the last committed boundary left it.
fn planner(req: &ModelRequest) -> normandy_core::Result<ModelResponse> {
    let msgs = &req.messages;
    let turn_start = msgs
        .iter()
        .rposition(|m| {
            m.role == Role::User
                && m.content
                    .iter()
                    .any(|b| matches!(b, ContentBlock::Text { .. }))
        })
        .unwrap_or(0);
    let turn_no = msgs[..=turn_start]
        .iter()
        .filter(|m| m.role == Role::User && !m.text().is_empty())
        .count();
    let items: Vec<(String, String)> = msgs[turn_start]
        .text()
        .split(';')
        .filter_map(|item| {
            let (label, expr) = item.split_once(':')?;
            Some((label.trim().to_string(), expr.trim().to_string()))
        })
        .collect();
    if items.is_empty() {
        return Ok(ModelResponse::text(
            "Give me items as `label: expression; label: expression`.",
        ));
    }
    // Tool results of this turn, by call id.
    let results: std::collections::HashMap<String, String> = msgs[turn_start..]
        .iter()
        .flat_map(|m| m.content.iter())
        .filter_map(|b| match b {
            ContentBlock::ToolResult {
                tool_use_id,
                content,
                ..
            } => Some((tool_use_id.clone(), content.clone())),
            _ => None,
        })
        .collect();
    let step = msgs[turn_start..]
        .iter()
        .filter(|m| m.role == Role::Assistant)
        .count();
    let call = |i: usize| format!("t{turn_no}-item{i}");
    Ok(match step {
        0 => ModelResponse::tool_calls(
            items
                .iter()
                .enumerate()
                .map(|(i, (_, expr))| (call(i), "calculator".into(), json!({ "expression": expr })))
                .collect(),
        )
        .with_usage(120, 40),
        1 => {
            let parts: Vec<&str> = (0..items.len())
                .map(|i| results.get(&call(i)).map(String::as_str).unwrap_or("0"))
                .collect();
            ModelResponse::tool_call(
                format!("t{turn_no}-sum"),
                "calculator",
                json!({ "expression": parts.join(" + ") }),
            )
            .with_usage(160, 20)
        }
        2 => {
            let total = results
                .get(&format!("t{turn_no}-sum"))
                .cloned()
                .unwrap_or_default();
            ModelResponse::tool_call(
                format!("t{turn_no}-ledger"),
                "record_expense",
                json!({ "label": "trip", "amount": total }),
            )
            .with_usage(180, 20)
        }
        _ => {
            let total = results
                .get(&format!("t{turn_no}-sum"))
                .cloned()
                .unwrap_or_default();
            // The ledger's first sentence ("Recorded as ledger line N."); the rest of its
            // result is a hint for real models.
            let ledger = results
                .get(&format!("t{turn_no}-ledger"))
                .and_then(|r| r.split_inclusive(". ").next())
                .unwrap_or_default()
                .trim_end();
            let lines: Vec<String> = items
                .iter()
                .enumerate()
                .map(|(i, (label, _))| {
                    let v = results.get(&call(i)).cloned().unwrap_or_default();
                    format!("  {label:<10} {v:>10}")
                })
                .collect();
            ModelResponse::text(format!(
                "Trip total: {total}\n{}\n{ledger}",
                lines.join("\n")
            ))
            .with_usage(200, 60)
        }
    })
}

const SYSTEM_PROMPT: &str = "You add up trip expenses. Call the calculator tool once for each \
    item's expression, then once more to add the items' results, then call record_expense once \
    with the label \"trip\" and the total, and finally answer with the total in one short line.";

/// The template's model and the catalog entry that builds its client on this node.
fn model(args: &Args) -> Result<(ConfigTemplate, CatalogEntry)> {
    Ok(match &args.model {
        Model::Scripted => (
            ConfigTemplate::new("trip-planner", "scripted-planner"),
            // Streams its answer a few characters at a time, as a provider would.
            CatalogEntry::with_client(
                ScriptedClient::from_fn(planner).streaming(4, Duration::from_millis(12)),
            ),
        ),
        Model::OpenAi { base_url, key_env } => {
            println!("model: the OpenAI-compatible server at {base_url}");
            let name = args.model_name.clone().unwrap_or_else(|| "default".into());
            let config = OpenAiConfig::default().base_url(base_url);
            // Greedy sampling, a fixed seed (for servers that sample anyway) and a bounded
            // answer: the same question should take the same path every run. The key, if any,
            // is a credential: resolved on this node, never stored.
            let template = ConfigTemplate::new("trip-planner", name)
                .param("temperature", 0.0)
                .param("seed", 7)
                .param("max_tokens", args.max_tokens);
            match key_env {
                Some(var) => {
                    let credential = var.to_lowercase();
                    (
                        template.credential(&credential),
                        openai::catalog_entry(&credential, config),
                    )
                }
                None => (
                    template,
                    CatalogEntry::with_client(OpenAiClient::new(config)?),
                ),
            }
        }
        Model::Anthropic => {
            let name = args
                .model_name
                .clone()
                .unwrap_or_else(|| "claude-sonnet-4-5".into());
            println!("model: Anthropic {name} (key from ANTHROPIC_API_KEY)");
            (
                ConfigTemplate::new("trip-planner", name)
                    .credential("anthropic-api-key")
                    .param("max_tokens", args.max_tokens),
                anthropic::catalog_entry("anthropic-api-key", AnthropicConfig::new()),
            )
        }
    })
}

fn kill_switch(limit: Option<usize>, calc: Counter, ledger: Counter) -> AfterCall {
    Arc::new(move |_| {
        if let Some(limit) = limit
            && calc.get() + ledger.get() >= limit
        {
            println!("\n*** --kill-after {limit}: sending SIGKILL to myself mid-turn ***");
            kill_self();
        }
    })
}

#[allow(unsafe_code)]
fn kill_self() {
    // SAFETY: kill(2) on our own pid with a constant signal has no memory-safety conditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

/// Prints a session's events: committed entries and progress a line each, and the model's text
/// and tool calls as they stream.
#[derive(Default)]
struct Printer {
    /// The try whose text is being printed, if a line of streamed text is open.
    streaming: Option<(u32, Attempt)>,
    /// Whether a line showing a tool call's input as it streams is open.
    call_open: bool,
}

impl Printer {
    fn show(&mut self, event: &TurnEvent) {
        use std::io::Write as _;
        if let TurnEvent::ModelDelta {
            step,
            attempt,
            delta,
            ..
        } = event
        {
            let same = self.streaming == Some((*step, *attempt));
            match delta {
                ModelDelta::Text { text, .. } => {
                    if self.call_open {
                        self.end_line();
                    }
                    if !same {
                        if self.streaming.is_some_and(|(s, _)| s == *step) {
                            println!("\n  (the call was retried; its answer starts over)");
                        } else if self.streaming.is_some() {
                            println!();
                        }
                        print!("  model: ");
                        self.streaming = Some((*step, *attempt));
                    }
                    print!("{text}");
                    let _ = std::io::stdout().flush();
                }
                ModelDelta::ToolUseStart { name, .. } => {
                    self.end_line();
                    print!("  ⋯ model is streaming a call to {name}: ");
                    self.call_open = true;
                    let _ = std::io::stdout().flush();
                }
                ModelDelta::ToolInput { partial_json, .. } => {
                    print!("{partial_json}");
                    let _ = std::io::stdout().flush();
                }
                _ => {}
            }
            return;
        }
        if let Some(line) = describe(event) {
            self.end_line();
            println!("{line}");
        }
    }

    fn end_line(&mut self) {
        let call_open = std::mem::take(&mut self.call_open);
        if self.streaming.take().is_some() || call_open {
            println!();
        }
    }
}

fn describe(event: &TurnEvent) -> Option<String> {
    Some(match event {
        TurnEvent::ModelCallStarted { step } => format!("· model call {step}"),
        TurnEvent::ToolCallStarted { call_id, tool } => format!("  → {tool} [{call_id}] running"),
        TurnEvent::Entry(e) => match &e.payload {
            EntryPayload::Input { content, .. } => format!(
                "#{:<3} you: {}",
                e.seq,
                normandy_core::Message {
                    role: Role::User,
                    content: content.clone()
                }
                .text()
            ),
            EntryPayload::Assistant {
                message,
                call,
                incomplete,
                ..
            } => {
                let calls: Vec<String> = message
                    .tool_uses()
                    .map(|(_, name, input)| format!("{name}({})", compact(input)))
                    .collect();
                let stop = call
                    .stop
                    .as_ref()
                    .map_or(String::new(), |s| format!(" [stop: {s}]"));
                if *incomplete {
                    format!(
                        "#{:<3} model's answer cut short (kept, marked incomplete)",
                        e.seq
                    )
                } else if calls.is_empty() {
                    format!("#{:<3} model answers{stop}", e.seq)
                } else {
                    format!("#{:<3} model asks for {}{stop}", e.seq, calls.join(", "))
                }
            }
            EntryPayload::ToolStarted { tool, .. } => {
                format!(
                    "#{:<3} start of {tool} recorded before it runs (not idempotent)",
                    e.seq
                )
            }
            EntryPayload::ToolResult {
                call_id,
                content,
                is_error,
                in_doubt,
                ..
            } => format!(
                "#{:<3} ← [{call_id}] {}{}{content}",
                e.seq,
                if *is_error { "ERROR " } else { "" },
                in_doubt.as_ref().map_or(String::new(), |d| format!(
                    "IN DOUBT ({:?}; reconcile key {}) ",
                    d.reason, d.idempotency_key
                )),
            ),
            EntryPayload::TurnEnd { status, usage, .. } => format!(
                "#{:<3} turn ended: {status:?} ({} tokens in, {} out{})",
                e.seq,
                usage.input_tokens,
                usage.output_tokens,
                if usage.cache_read_tokens + usage.cache_write_tokens > 0 {
                    format!(
                        ", {} read from the prompt cache, {} written",
                        usage.cache_read_tokens, usage.cache_write_tokens
                    )
                } else {
                    String::new()
                }
            ),
        },
        TurnEvent::TurnFinished(_) => return None,
        _ => return None,
    })
}

fn compact(v: &serde_json::Value) -> String {
    match v.get("expression") {
        Some(serde_json::Value::String(s)) => s.clone(),
        _ => v.to_string(),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    let (store, ledger_path): (Arc<dyn SessionStore>, PathBuf) = if args.memory {
        println!("tier 0: in-memory store (nothing survives this process)");
        (
            Arc::new(normandy_core::InMemoryStore::new()),
            std::env::temp_dir().join(format!("normandy-ledger-{}.tsv", std::process::id())),
        )
    } else {
        std::fs::create_dir_all(&args.data)
            .with_context(|| format!("creating {}", args.data.display()))?;
        let store = LmdbStore::open(LmdbConfig::new(args.data.join("lmdb")))
            .with_context(|| format!("opening the LMDB store in {}", args.data.display()))?;
        println!(
            "tier 0d: LMDB store in {} (durable, no server)",
            args.data.display()
        );
        (Arc::new(store), args.data.join("ledger.tsv"))
    };

    let calc_runs = Counter::default();
    let ledger_runs = Counter::default();
    let after = kill_switch(args.kill_after, calc_runs.clone(), ledger_runs.clone());
    let (template, entry) = model(&args)?;
    let template = template
        .system_prompt(SYSTEM_PROMPT)
        .resume_policy(ResumePolicy::Eager);
    let catalog = TemplateCatalog::new().with(
        template,
        entry
            .tool(Calculator {
                delay: args.delay,
                runs: calc_runs.clone(),
                after: after.clone(),
            })
            .tool(Ledger {
                path: ledger_path.clone(),
                delay: args.delay,
                runs: ledger_runs.clone(),
                after,
            }),
    )?;
    let sessions = Sessions::builder(catalog).store(store.clone()).build()?;

    let id = SessionId::new(&args.session)?;
    if args.fresh {
        store.delete(&id).await?;
        let _ = std::fs::remove_file(&ledger_path);
        println!("--fresh: deleted session {id} and the ledger");
    }
    match store.load(&id).await? {
        None => {
            sessions
                .start_with(
                    "trip-planner",
                    StartOptions {
                        id: Some(id.clone()),
                        ..Default::default()
                    },
                )
                .await?;
            println!("session {id}: new");
        }
        Some(record) if record.state.has_work() => {
            let at = match &record.state.phase {
                Phase::RunningTools { calls } => format!(
                    "tool calls without a result: {}",
                    calls
                        .iter()
                        .map(|c| c.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Phase::CallingModel => "a model call was due".to_string(),
                Phase::Idle => "input queued".to_string(),
            };
            println!(
                "session {id}: the last run stopped mid-turn after entry #{} ({at}); resuming that turn",
                record.seq
            )
        }
        Some(record) => println!("session {id}: {} entries stored", record.seq),
    }
    let since = store.load(&id).await?.map(|r| r.seq).unwrap_or(0);

    // Watch the turn as it runs: committed entries (numbered) and progress events.
    let mut events = sessions.subscribe(&id, since).await?;
    let printer = tokio::spawn(async move {
        let mut out = Printer::default();
        while let Some(Ok(event)) = events.next().await {
            out.show(&event);
            if matches!(event, TurnEvent::TurnFinished(_)) {
                break;
            }
        }
    });

    // A fixed input id makes the run idempotent: running again after a kill continues this
    // input's turn instead of starting a second one.
    let input_id = InputId::new(format!("{}-q1", args.session))?;
    let outcome = sessions
        .send(&id, Input::text(&args.question).with_id(input_id))
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(2), printer).await;
    match outcome {
        Ok(outcome) => {
            println!("\nassistant:\n{}", outcome.text());
            if outcome.end_seq <= since {
                println!(
                    "\n(this input's turn had already finished: that is its stored answer; use --fresh to start over)"
                );
            }
        }
        Err(e) if e.kind() == ErrorKind::Fenced => {
            bail!("another process took over session {id}: {e}")
        }
        Err(e) => return Err(e.into()),
    }
    println!(
        "\ntool calls run by this process: calculator {}, record_expense {}",
        calc_runs.get(),
        ledger_runs.get()
    );
    if let Ok(ledger) = std::fs::read_to_string(&ledger_path) {
        println!("ledger ({}):", ledger_path.display());
        for line in ledger.lines() {
            println!("  {line}");
        }
    }
    sessions.shutdown().await;
    Ok(())
}
