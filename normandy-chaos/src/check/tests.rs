//! The checker accepts a run that kept the promise, and rejects each way of breaking it.

use super::*;
use crate::history::{Op, StoredEntry, Streamed, ToolRun};

fn op(process: u64, kind: OpType, session: &str, input: &str, t: u64, seq: Option<u64>) -> Op {
    Op {
        process,
        kind,
        session: session.into(),
        input_id: input.into(),
        time_ns: t,
        seq,
    }
}

fn entry(session: &str, seq: u64, kind: &str, id: Option<&str>, epoch: u64) -> StoredEntry {
    let (input_id, call_id) = match kind {
        "input" | "turn_end" => (id.map(String::from), None),
        _ => (None, id.map(String::from)),
    };
    StoredEntry {
        session: session.into(),
        seq,
        kind: kind.into(),
        input_id,
        call_id,
        epoch,
        in_doubt: false,
    }
}

fn tool(call: &str, key: &str, idempotent: bool) -> ToolRun {
    ToolRun {
        session: "s1".into(),
        call_id: call.into(),
        key: key.into(),
        idempotent,
    }
}

/// Two clients on two sessions: i1 then i2 from client 1 and i3 from client 2 on s1 (i3 sent
/// after i1's ack, i2 after i3's; each acknowledged at its turn's end), a tool call on s1 after
/// a failover (epoch 2), and on s2 an input of unknown outcome that was stored and one that
/// failed.
fn good() -> Files {
    use OpType::*;
    Files {
        history: vec![
            op(1, Invoke, "s1", "i1", 10, None),
            op(1, Ok, "s1", "i1", 20, Some(2)),
            op(2, Invoke, "s1", "i3", 21, None),
            op(2, Ok, "s1", "i3", 29, Some(4)),
            op(1, Invoke, "s1", "i2", 30, None),
            op(1, Ok, "s1", "i2", 40, Some(8)),
            op(2, Invoke, "s2", "i4", 50, None),
            op(2, Info, "s2", "i4", 60, None),
            op(2, Invoke, "s2", "i5", 61, None),
            op(2, Fail, "s2", "i5", 70, None),
        ],
        stored: vec![
            entry("s1", 1, "input", Some("i1"), 1),
            entry("s1", 2, "turn_end", Some("i1"), 1),
            entry("s1", 3, "input", Some("i3"), 1),
            entry("s1", 4, "turn_end", Some("i3"), 1),
            entry("s1", 5, "input", Some("i2"), 2),
            entry("s1", 6, "assistant", Some("c1"), 2),
            entry("s1", 7, "tool_result", Some("c1"), 2),
            entry("s1", 8, "turn_end", Some("i2"), 2),
            entry("s2", 1, "input", Some("i4"), 1),
        ],
        tools: vec![tool("c1", "k1", false)],
        // A subscriber saw s1's first three entries, on a stream it resumed after seq 2.
        events: vec![
            streamed(1, "input", Some("i1")),
            streamed(2, "turn_end", Some("i1")),
            streamed(3, "input", Some("i3")),
        ],
    }
}

fn streamed(seq: u64, kind: &str, input: Option<&str>) -> Streamed {
    Streamed {
        subscriber: 1,
        session: "s1".into(),
        seq,
        kind: kind.into(),
        input_id: input.map(String::from),
        call_id: None,
    }
}

fn kinds(files: &Files) -> Vec<ViolationKind> {
    let mut k: Vec<_> = check(files).violations.iter().map(|v| v.kind).collect();
    k.dedup();
    k
}

#[test]
fn a_run_that_kept_the_promise_passes_and_its_info_is_accounted_for() {
    let report = check(&good());
    assert!(report.is_valid(), "{report}");
    assert_eq!(
        (report.invoked, report.ok, report.failed, report.info),
        (5, 3, 1, 1)
    );
    assert_eq!(report.info_stored.get("i4"), Some(&1));
    assert!(report.info_absent.is_empty());
    assert_eq!(report.tool_results, 1);
}

#[test]
fn an_info_that_never_landed_is_reported_absent_not_a_violation() {
    let mut f = good();
    f.stored.retain(|e| e.session != "s2");
    let report = check(&f);
    assert!(report.is_valid(), "{report}");
    assert_eq!(
        report.info_absent.iter().collect::<Vec<_>>(),
        [&"i4".to_string()]
    );
}

#[test]
fn a_lost_acknowledgement_is_caught() {
    let mut f = good();
    // i5 acknowledged, never stored.
    f.history[9] = op(2, OpType::Ok, "s2", "i5", 70, Some(2));
    assert_eq!(kinds(&f), vec![ViolationKind::LostAck]);
}

#[test]
fn an_acknowledgement_naming_another_turn_end_is_caught() {
    let mut f = good();
    f.history[5].seq = Some(4);
    assert_eq!(kinds(&f), vec![ViolationKind::AckedAtOtherSeq]);
}

#[test]
fn a_refusal_is_no_violation_when_a_resend_of_the_same_id_landed() {
    use OpType::*;
    let mut f = good();
    // i5 refused, then resent under the same id with an unknown outcome, and stored: fine.
    f.history.push(op(7, Invoke, "s2", "i5", 80, None));
    f.history.push(op(7, Info, "s2", "i5", 90, None));
    f.stored.push(entry("s2", 2, "input", Some("i5"), 1));
    let report = check(&f);
    assert!(report.is_valid(), "{report}");
    assert_eq!(report.info_stored.get("i5"), Some(&2));
}

#[test]
fn an_unknown_outcome_settled_by_a_resend_is_counted_apart() {
    use OpType::*;
    let mut f = good();
    f.history.push(op(7, Invoke, "s2", "i4", 80, None));
    f.history.push(op(7, Ok, "s2", "i4", 90, Some(2)));
    f.stored.push(entry("s2", 2, "turn_end", Some("i4"), 1));
    let report = check(&f);
    assert!(report.is_valid(), "{report}");
    assert!(report.info_resolved.contains("i4") && report.info_stored.is_empty());
}

#[test]
fn a_turn_that_ended_twice_is_caught() {
    let mut f = good();
    f.stored.push(entry("s1", 9, "turn_end", Some("i2"), 2));
    assert_eq!(kinds(&f), vec![ViolationKind::TurnEndedTwice]);
}

#[test]
fn a_non_idempotent_tool_run_twice_without_a_result_is_caught() {
    let mut f = good();
    f.tools.push(tool("c2", "k2", false));
    f.tools.push(tool("c2", "k2", false));
    assert_eq!(kinds(&f), vec![ViolationKind::ToolRunTwice]);
}

#[test]
fn an_input_stored_twice_is_caught() {
    let mut f = good();
    f.stored.push(entry("s2", 2, "input", Some("i4"), 1));
    assert_eq!(kinds(&f), vec![ViolationKind::DuplicateInput]);
}

#[test]
fn a_seq_gap_is_caught() {
    let mut f = good();
    f.stored[8].seq = 2;
    assert!(
        kinds(&f).contains(&ViolationKind::SeqNotDense),
        "{:?}",
        kinds(&f)
    );
}

#[test]
fn a_failed_input_that_was_stored_is_caught() {
    let mut f = good();
    f.stored.push(entry("s2", 2, "input", Some("i5"), 1));
    assert_eq!(kinds(&f), vec![ViolationKind::FailedButStored]);
}

#[test]
fn an_epoch_going_back_is_caught() {
    let mut f = good();
    f.stored[6].epoch = 1;
    assert_eq!(kinds(&f), vec![ViolationKind::EpochBackwards]);
}

#[test]
fn real_time_order_broken_is_caught() {
    let mut f = good();
    // i3 (sent after i1's ack) stored before i1; the acks claim the stored seqs, so only the
    // order is wrong.
    for (i, id) in [(0, "i3"), (1, "i3"), (2, "i1"), (3, "i1")] {
        f.stored[i].input_id = Some(id.into());
    }
    f.events.clear();
    f.history[1].seq = Some(4);
    f.history[3].seq = Some(2);
    assert_eq!(kinds(&f), vec![ViolationKind::RealTimeOrder]);
}

#[test]
fn a_resend_is_ordered_by_its_first_attempt() {
    use OpType::*;
    let mut f = good();
    // i3's first attempt (unknown outcome) went out before i1's ack and landed first; client 2
    // resent it, as a new process, after i1's ack: no order is broken.
    for (i, id) in [(0, "i3"), (1, "i3"), (2, "i1"), (3, "i1")] {
        f.stored[i].input_id = Some(id.into());
    }
    f.events.clear();
    f.history[1].seq = Some(4);
    f.history[2] = op(2, Invoke, "s1", "i3", 15, None);
    f.history[3] = op(2, Info, "s1", "i3", 16, None);
    f.history.insert(4, op(5, Invoke, "s1", "i3", 21, None));
    f.history.insert(5, op(5, Ok, "s1", "i3", 29, Some(2)));
    let report = check(&f);
    assert!(report.is_valid(), "{report}");
}

#[test]
fn one_clients_inputs_out_of_order_are_caught() {
    let mut f = good();
    // Client 1's i2 stored before its i1.
    for (i, id) in [(0, "i2"), (1, "i2"), (4, "i1"), (7, "i1")] {
        f.stored[i].input_id = Some(id.into());
    }
    f.events.clear();
    f.history[1].seq = Some(8);
    f.history[5].seq = Some(2);
    assert!(
        kinds(&f).contains(&ViolationKind::ClientOrder),
        "{:?}",
        kinds(&f)
    );
}

#[test]
fn an_input_nobody_sent_is_caught() {
    let mut f = good();
    f.stored.push(entry("s2", 2, "input", Some("ghost"), 1));
    assert_eq!(kinds(&f), vec![ViolationKind::UnknownInput]);
}

#[test]
fn a_non_idempotent_tool_run_twice_is_caught() {
    let mut f = good();
    f.tools.push(tool("c1", "k1", false));
    assert_eq!(kinds(&f), vec![ViolationKind::ToolRunTwice]);
}

#[test]
fn an_idempotent_tool_may_run_again_under_its_key_only() {
    let mut f = good();
    f.tools = vec![tool("c1", "k1", true), tool("c1", "k1", true)];
    assert!(check(&f).is_valid());
    f.tools.push(tool("c1", "k2", true));
    assert_eq!(kinds(&f), vec![ViolationKind::ToolRunTwice]);
}

#[test]
fn a_result_for_a_call_that_never_ran_is_caught_unless_in_doubt() {
    let mut f = good();
    f.tools.clear();
    assert_eq!(kinds(&f), vec![ViolationKind::PhantomResult]);
    f.stored[6].in_doubt = true;
    let report = check(&f);
    assert!(report.is_valid(), "{report}");
    assert_eq!(report.tool_in_doubt, 1);
}

#[test]
fn two_results_for_one_call_are_caught() {
    let mut f = good();
    f.stored.push(entry("s1", 9, "tool_result", Some("c1"), 2));
    assert_eq!(kinds(&f), vec![ViolationKind::DuplicateResult]);
}

#[test]
fn an_execution_without_a_result_is_counted() {
    let mut f = good();
    f.tools.push(ToolRun {
        session: "s1".into(),
        call_id: "c2".into(),
        key: "k2".into(),
        idempotent: false,
    });
    let report = check(&f);
    assert!(report.is_valid(), "{report}");
    assert_eq!(report.executed_without_result, 1);
}

#[test]
fn a_streamed_entry_the_log_does_not_have_is_caught() {
    let mut f = good();
    f.events[2].input_id = Some("i2".into());
    assert_eq!(kinds(&f), vec![ViolationKind::StreamNotInLog]);
}

#[test]
fn a_stream_that_skips_a_seq_is_caught() {
    let mut f = good();
    f.events.remove(1);
    assert_eq!(kinds(&f), vec![ViolationKind::StreamGap]);
}

#[test]
fn the_files_round_trip_and_a_bad_line_is_named() {
    let dir = std::env::temp_dir().join(format!("normandy-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = good();
    f.write(&dir).unwrap();
    assert_eq!(Files::read(&dir).unwrap(), f);
    let mut text = std::fs::read_to_string(dir.join("final.jsonl")).unwrap();
    text.push_str("{\"session\": \"s1\", \"seq\": \"seven\"}\n");
    std::fs::write(dir.join("final.jsonl"), text).unwrap();
    let err = Files::read(&dir).unwrap_err().to_string();
    assert!(err.contains("final.jsonl:10:"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
