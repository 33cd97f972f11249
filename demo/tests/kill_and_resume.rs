//! The README's durability walk-through, as a test: run the main job, let it SIGKILL itself
//! mid-turn, run it again, and check the turn resumed without repeating finished tool calls.

use std::process::Command;

fn demo(dir: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_normandy-demo"))
        .args(["--data", dir.to_str().unwrap(), "--delay-ms", "20"])
        .args(args)
        .output()
        .expect("demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), format!("{stdout}\n{stderr}"))
}

fn count(line_prefix: &str, text: &str) -> usize {
    text.lines().filter(|l| l.contains(line_prefix)).count()
}

#[test]
fn a_killed_turn_resumes_without_repeating_finished_tool_calls() {
    let dir = tempfile::tempdir().unwrap();
    // 4 item calculations, a sum, a ledger write: kill after the third tool call.
    let (code, out) = demo(dir.path(), &["--kill-after", "3"]);
    assert_eq!(code, None, "killed by a signal, no exit code:\n{out}");
    assert!(out.contains("sending SIGKILL"), "{out}");
    assert!(!out.contains("Trip total"), "{out}");

    let (code, out) = demo(dir.path(), &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("stopped mid-turn"), "{out}");
    assert!(out.contains("Trip total: 875.20"), "{out}");
    // The kill came right after the third calculator call ran, before its result was committed:
    // two results were recorded. The resumed run re-runs that idempotent call (same call id),
    // then the fourth item and the sum — never the two recorded ones.
    let line = out
        .lines()
        .find(|l| l.starts_with("tool calls run by this process"))
        .unwrap();
    assert_eq!(
        line, "tool calls run by this process: calculator 3, record_expense 1",
        "{out}"
    );
    let ledger = std::fs::read_to_string(dir.path().join("ledger.tsv")).unwrap();
    assert_eq!(
        ledger.lines().count(),
        1,
        "exactly one ledger line:\n{ledger}"
    );

    // A third run: the input already ran; its stored answer comes back, nothing runs.
    let (code, out) = demo(dir.path(), &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("already finished"), "{out}");
    assert!(out.contains("calculator 0, record_expense 0"), "{out}");
    assert_eq!(count("Trip total", &out), 1);
}

#[test]
fn tier_zero_runs_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = demo(dir.path(), &["--memory"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tier 0: in-memory"), "{out}");
    assert!(out.contains("Trip total: 875.20"), "{out}");
}
