//! The checker: the promise, decided from a run's files alone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use crate::history::{Files, OpType};

/// What kind of promise a violation breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ViolationKind {
    /// An input acknowledged `ok` is not in the final log.
    LostAck,
    /// An input acknowledged `ok` whose turn's end is not stored at the seq acknowledged.
    AckedAtOtherSeq,
    /// An input whose send failed is in the final log.
    FailedButStored,
    /// One input id is stored twice in a session.
    DuplicateInput,
    /// One input's turn ended twice (the turn ran twice).
    TurnEndedTwice,
    /// An input in the final log that no client sent.
    UnknownInput,
    /// A session's seqs are not 1, 2, 3, … without gap or repeat.
    SeqNotDense,
    /// An entry carries an older epoch than the entry before it.
    EpochBackwards,
    /// An input acknowledged before another was sent (to the same session) is stored after it.
    RealTimeOrder,
    /// One client's inputs to a session are stored out of the order it sent them in.
    ClientOrder,
    /// A non-idempotent tool ran more than once for one call, or an idempotent one under
    /// different keys.
    ToolRunTwice,
    /// A tool result (not in doubt) whose call never ran.
    PhantomResult,
    /// Two results for one tool call.
    DuplicateResult,
    /// An entry seen on an event stream is not the final log's entry at its seq.
    StreamNotInLog,
    /// A subscriber's entries of a session skip or repeat a seq.
    StreamGap,
}

/// One broken promise, with what the checker saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// What broke.
    pub kind: ViolationKind,
    /// The session.
    pub session: String,
    /// The details: ids, seqs, times.
    pub detail: String,
}

/// What the checker found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Operations invoked.
    pub invoked: usize,
    /// Acknowledged `ok`.
    pub ok: usize,
    /// Failed.
    pub failed: usize,
    /// Unknown outcome (`info`, or no completion recorded).
    pub info: usize,
    /// Inputs with an unknown outcome that a resend of the same id got acknowledged.
    pub info_resolved: BTreeSet<String>,
    /// The other inputs with an unknown outcome, those stored (input id → seq).
    pub info_stored: BTreeMap<String, u64>,
    /// The other inputs with an unknown outcome, those not stored.
    pub info_absent: BTreeSet<String>,
    /// Tool results checked.
    pub tool_results: usize,
    /// Tool results recorded in doubt.
    pub tool_in_doubt: usize,
    /// Tool executions with no result in the final log (a turn cut between the two and not
    /// resumed by the end of the run).
    pub executed_without_result: usize,
    /// Every violation found.
    pub violations: Vec<Violation>,
}

impl Report {
    /// Violations by kind.
    pub fn by_kind(&self) -> BTreeMap<ViolationKind, usize> {
        let mut m = BTreeMap::new();
        for v in &self.violations {
            *m.entry(v.kind).or_insert(0) += 1;
        }
        m
    }

    /// Whether the promise held.
    pub fn is_valid(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "ops {}: ok {}, fail {}, info {} (inputs: acknowledged on a resend {}, stored {}, \
             absent {})",
            self.invoked,
            self.ok,
            self.failed,
            self.info,
            self.info_resolved.len(),
            self.info_stored.len(),
            self.info_absent.len()
        )?;
        writeln!(
            f,
            "tool results {} (in doubt {}), executions without a result {}",
            self.tool_results, self.tool_in_doubt, self.executed_without_result
        )?;
        if self.violations.is_empty() {
            return writeln!(f, "violations: none");
        }
        for (kind, n) in self.by_kind() {
            writeln!(f, "violations {kind:?}: {n}")?;
        }
        for v in self.violations.iter().take(20) {
            writeln!(f, "  {:?} in {}: {}", v.kind, v.session, v.detail)?;
        }
        Ok(())
    }
}

/// One operation, its invocation paired with its completion.
struct Operation {
    process: u64,
    session: String,
    input_id: String,
    invoked_ns: u64,
    /// `None`: no completion recorded (counted as `info`).
    completed: Option<(OpType, u64, Option<u64>)>,
}

/// Checks a run: see the crate's documentation for what is checked.
pub fn check(files: &Files) -> Report {
    let mut report = Report::default();
    let mut violations = Vec::new();
    let mut bad = |kind, session: &str, detail: String| {
        violations.push(Violation {
            kind,
            session: session.to_string(),
            detail,
        })
    };

    // The final log, per session, in seq order: dense seqs, epochs, input ids.
    let mut logs: BTreeMap<&str, Vec<&crate::StoredEntry>> = BTreeMap::new();
    for e in &files.stored {
        logs.entry(&e.session).or_default().push(e);
    }
    let mut stored_inputs: HashMap<(&str, &str), u64> = HashMap::new();
    let mut stored_ends: HashMap<(&str, &str), u64> = HashMap::new();
    for (session, log) in &mut logs {
        log.sort_by_key(|e| e.seq);
        for (i, e) in log.iter().enumerate() {
            let want = i as u64 + 1;
            if e.seq != want {
                bad(
                    ViolationKind::SeqNotDense,
                    session,
                    format!("seq {} where {want} was due", e.seq),
                );
                break;
            }
        }
        for pair in log.windows(2) {
            if pair[1].epoch < pair[0].epoch {
                bad(
                    ViolationKind::EpochBackwards,
                    session,
                    format!(
                        "seq {} by epoch {} after seq {} by epoch {}",
                        pair[1].seq, pair[1].epoch, pair[0].seq, pair[0].epoch
                    ),
                );
            }
        }
        for e in log.iter().filter(|e| e.kind == "turn_end") {
            if let Some(input) = e.input_id.as_deref()
                && let Some(first) = stored_ends.insert((session, input), e.seq)
            {
                bad(
                    ViolationKind::TurnEndedTwice,
                    session,
                    format!("input {input}: turn ends at seq {first} and {}", e.seq),
                );
                stored_ends.insert((session, input), first);
            }
        }
        for e in log.iter().filter(|e| e.kind == "input") {
            let Some(input) = e.input_id.as_deref() else {
                continue;
            };
            if let Some(first) = stored_inputs.insert((session, input), e.seq) {
                bad(
                    ViolationKind::DuplicateInput,
                    session,
                    format!("input {input} at seq {first} and at seq {}", e.seq),
                );
                stored_inputs.insert((session, input), first);
            }
        }
    }

    // The history: each invocation with its completion.
    let mut ops: Vec<Operation> = Vec::new();
    let mut open: HashMap<(u64, &str), usize> = HashMap::new();
    for op in &files.history {
        match op.kind {
            OpType::Invoke => {
                open.insert((op.process, &op.input_id), ops.len());
                ops.push(Operation {
                    process: op.process,
                    session: op.session.clone(),
                    input_id: op.input_id.clone(),
                    invoked_ns: op.time_ns,
                    completed: None,
                });
            }
            kind => {
                if let Some(i) = open.remove(&(op.process, op.input_id.as_str())) {
                    ops[i].completed = Some((kind, op.time_ns, op.seq));
                }
            }
        }
    }
    report.invoked = ops.len();
    // How each input id's sends ended: a refusal promises nothing only when no other send of
    // the same id may have landed; an unknown outcome is settled by a later `ok`.
    let mut outcomes: HashMap<(&str, &str), Vec<Option<OpType>>> = HashMap::new();
    for op in &ops {
        outcomes
            .entry((&op.session, &op.input_id))
            .or_default()
            .push(op.completed.map(|(k, _, _)| k));
    }
    let mut sent: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        let key = (op.session.as_str(), op.input_id.as_str());
        sent.insert(key, i);
        let stored = stored_inputs.get(&key).copied();
        match op.completed {
            Some((OpType::Ok, _, acked)) => {
                report.ok += 1;
                match (stored, acked) {
                    (None, _) => bad(
                        ViolationKind::LostAck,
                        &op.session,
                        format!(
                            "input {} acknowledged at seq {acked:?}, not stored",
                            op.input_id
                        ),
                    ),
                    (Some(s), a) => {
                        let end = stored_ends.get(&key).copied();
                        if a.is_none() || end != a {
                            bad(
                                ViolationKind::AckedAtOtherSeq,
                                &op.session,
                                format!(
                                    "input {} (stored at seq {s}) acknowledged with its turn \
                                     ending at seq {a:?}; stored turn end: {end:?}",
                                    op.input_id
                                ),
                            );
                        }
                    }
                }
            }
            Some((OpType::Fail, _, _)) => {
                report.failed += 1;
                let all_failed = outcomes[&key].iter().all(|k| *k == Some(OpType::Fail));
                if let (Some(s), true) = (stored, all_failed) {
                    bad(
                        ViolationKind::FailedButStored,
                        &op.session,
                        format!("input {} failed, stored at seq {s}", op.input_id),
                    );
                }
            }
            _ => {
                report.info += 1;
                if outcomes[&key].contains(&Some(OpType::Ok)) {
                    report.info_resolved.insert(op.input_id.clone());
                    continue;
                }
                match stored {
                    Some(s) => {
                        report.info_stored.insert(op.input_id.clone(), s);
                    }
                    None => {
                        report.info_absent.insert(op.input_id.clone());
                    }
                }
            }
        }
    }
    for (session, log) in &logs {
        for e in log.iter().filter(|e| e.kind == "input") {
            if let Some(input) = e.input_id.as_deref()
                && !sent.contains_key(&(*session, input))
            {
                bad(
                    ViolationKind::UnknownInput,
                    session,
                    format!("input {input} at seq {} was never sent", e.seq),
                );
            }
        }
    }

    // Order: per client, then in real time across clients.
    let seq_of = |op: &Operation| {
        stored_inputs
            .get(&(op.session.as_str(), op.input_id.as_str()))
            .copied()
    };
    let mut by_session: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in &ops {
        by_session.entry(&op.session).or_default().push(op);
    }
    for (session, list) in &by_session {
        // Each client's acknowledged inputs, in the order it sent them.
        let mut last: HashMap<u64, (&str, u64)> = HashMap::new();
        for op in list {
            if !matches!(op.completed, Some((OpType::Ok, _, _))) {
                continue;
            }
            let Some(seq) = seq_of(op) else { continue };
            if let Some((prev, prev_seq)) = last.insert(op.process, (&op.input_id, seq))
                && prev_seq > seq
            {
                bad(
                    ViolationKind::ClientOrder,
                    session,
                    format!(
                        "client {} sent {prev} (seq {prev_seq}) before {} (seq {seq})",
                        op.process, op.input_id
                    ),
                );
            }
        }
        // Real time: sweep the stored inputs by invocation, keeping the highest seq among the
        // acknowledged inputs (of any client, this one's too) that completed before it was
        // sent.
        let mut done: Vec<(u64, u64, u64, &str)> = list
            .iter()
            .filter_map(|op| match op.completed {
                Some((OpType::Ok, at, _)) => {
                    seq_of(op).map(|s| (at, s, op.process, op.input_id.as_str()))
                }
                _ => None,
            })
            .collect();
        done.sort_unstable();
        // Each stored input once, at its first invocation: a resend of an input whose first
        // attempt may already have landed is no later than that attempt.
        let mut first: HashMap<&str, (&Operation, u64)> = HashMap::new();
        for op in list {
            if let Some(s) = seq_of(op) {
                let e = first.entry(op.input_id.as_str()).or_insert((*op, s));
                if op.invoked_ns < e.0.invoked_ns {
                    e.0 = op;
                }
            }
        }
        let mut invoked: Vec<(&Operation, u64)> = first.into_values().collect();
        invoked.sort_by_key(|(op, _)| op.invoked_ns);
        let mut next = 0;
        let mut highest: Option<(u64, &str)> = None;
        for (op, seq) in invoked {
            while next < done.len() && done[next].0 < op.invoked_ns {
                let (_, s, _, id) = done[next];
                if highest.is_none_or(|(h, _)| s > h) {
                    highest = Some((s, id));
                }
                next += 1;
            }
            if let Some((h, before)) = highest
                && h > seq
            {
                bad(
                    ViolationKind::RealTimeOrder,
                    session,
                    format!(
                        "{before} was acknowledged (seq {h}) before {} was sent, yet {} is at \
                         seq {seq}",
                        op.input_id, op.input_id
                    ),
                );
            }
        }
    }

    // Tools: every recorded result against the executions.
    let mut runs: HashMap<(&str, &str), Vec<&crate::ToolRun>> = HashMap::new();
    for r in &files.tools {
        runs.entry((&r.session, &r.call_id)).or_default().push(r);
    }
    let mut results: HashMap<(&str, &str), u64> = HashMap::new();
    for e in &files.stored {
        if e.kind != "tool_result" {
            continue;
        }
        let Some(call) = e.call_id.as_deref() else {
            continue;
        };
        report.tool_results += 1;
        if let Some(first) = results.insert((&e.session, call), e.seq) {
            bad(
                ViolationKind::DuplicateResult,
                &e.session,
                format!("call {call}: results at seq {first} and {}", e.seq),
            );
            continue;
        }
        let ran = runs
            .get(&(e.session.as_str(), call))
            .map_or(&[][..], |v| &v[..]);
        if e.in_doubt {
            report.tool_in_doubt += 1;
        } else if ran.is_empty() {
            bad(
                ViolationKind::PhantomResult,
                &e.session,
                format!(
                    "call {call}: a result at seq {} for a call that never ran",
                    e.seq
                ),
            );
        }
    }
    // Every call executed, with a result or not: a non-idempotent one once, an idempotent one
    // under one key. Sorted, so a report reads the same each time.
    let mut calls: Vec<_> = runs.iter().collect();
    calls.sort_by_key(|(k, _)| **k);
    for ((session, call), ran) in calls {
        let first = ran[0];
        let twice = if first.idempotent {
            ran.iter().any(|r| r.key != first.key)
        } else {
            ran.len() > 1
        };
        if twice {
            bad(
                ViolationKind::ToolRunTwice,
                session,
                format!(
                    "call {call} ({}idempotent) ran {} times, keys {:?}",
                    if first.idempotent { "" } else { "non-" },
                    ran.len(),
                    ran.iter().map(|r| r.key.as_str()).collect::<Vec<_>>()
                ),
            );
        }
    }
    check_streams(files, &logs, &mut bad);
    report.executed_without_result = runs
        .keys()
        .filter(|(s, c)| !results.contains_key(&(*s, *c)))
        .count();
    report.violations = violations;
    report
}

/// Every streamed entry against the final log, and each subscriber's run of seqs.
fn check_streams(
    files: &Files,
    logs: &BTreeMap<&str, Vec<&crate::StoredEntry>>,
    bad: &mut impl FnMut(ViolationKind, &str, String),
) {
    let mut last: HashMap<(u64, &str), u64> = HashMap::new();
    for ev in &files.events {
        // Logs are sorted by seq (and dense, or reported): the entry is at `seq - 1`.
        let stored = logs.get(ev.session.as_str()).and_then(|log| {
            let at = usize::try_from(ev.seq).ok()?.checked_sub(1)?;
            log.get(at).filter(|e| e.seq == ev.seq)
        });
        match stored {
            Some(e)
                if e.kind == ev.kind && e.input_id == ev.input_id && e.call_id == ev.call_id => {}
            other => bad(
                ViolationKind::StreamNotInLog,
                &ev.session,
                format!(
                    "subscriber {} saw {} {:?}{:?} at seq {}; the log has {:?}",
                    ev.subscriber,
                    ev.kind,
                    ev.input_id,
                    ev.call_id,
                    ev.seq,
                    other.map(|e| (&e.kind, &e.input_id, &e.call_id))
                ),
            ),
        }
        if let Some(prev) = last.insert((ev.subscriber, &ev.session), ev.seq)
            && ev.seq != prev + 1
        {
            bad(
                ViolationKind::StreamGap,
                &ev.session,
                format!(
                    "subscriber {} saw seq {} after seq {prev}",
                    ev.subscriber, ev.seq
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests;
