//! The checker against an independent one: stateright's linearizability tester, on thousands
//! of small random histories of one session's log, half of them corrupted.
//!
//! The model: clients append inputs to a log (an id resent after an unknown outcome takes
//! effect once); an acknowledgement names where the
//! input's turn ended, which in this model is the entry right after the input (so input k of
//! the log is acknowledged with seq 2k). An unknown outcome (`info`) may or may not have been
//! applied; a refused one (`fail`) was not. After the run a reader reads the whole log. The
//! history is linearizable exactly when the promise the checker checks for inputs holds (seqs
//! are dense by construction here, and tools and epochs are out of this model), so the two
//! verdicts must agree on every history.

use std::collections::HashMap;

use normandy_chaos::{Files, Op, OpType, StoredEntry, check};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stateright::semantics::{ConsistencyTester, LinearizabilityTester, SequentialSpec};

/// The sequential specification: a log of input ids.
#[derive(Clone, Debug, Default)]
struct Log(Vec<u32>);

#[derive(Clone, Debug)]
enum LogOp {
    Append(u32),
    Read,
}

#[derive(Clone, Debug, PartialEq)]
enum LogRet {
    /// The seq the acknowledgement names: that of the input's turn end.
    Acked(u64),
    Read(Vec<u32>),
}

impl SequentialSpec for Log {
    type Op = LogOp;
    type Ret = LogRet;

    fn invoke(&mut self, op: &LogOp) -> LogRet {
        match op {
            LogOp::Append(id) => {
                let at = match self.0.iter().position(|x| x == id) {
                    Some(i) => i,
                    None => {
                        self.0.push(*id);
                        self.0.len() - 1
                    }
                };
                LogRet::Acked(2 * (at as u64 + 1))
            }
            LogOp::Read => LogRet::Read(self.0.clone()),
        }
    }
}

/// One generated operation.
#[derive(Clone, Debug)]
struct Gen {
    thread: u64,
    id: u32,
    invoke: u64,
    /// When it took effect, if it did.
    applied: Option<u64>,
    /// When the client heard back, and how.
    ret: Option<(u64, OpType)>,
}

/// A random execution of a few clients, each doing a few operations one at a time. After an
/// unknown outcome a client goes on as a new process and, half the time, resends the same input
/// id, which takes effect only if the first attempt did not.
fn execution(rng: &mut StdRng) -> Vec<Gen> {
    let mut ops = Vec::new();
    let mut next_id = 0;
    let clients = rng.random_range(2..4u64);
    for c in 0..clients {
        let mut t = rng.random_range(0..20u64);
        let mut thread = c;
        let mut resend: Option<(u32, bool)> = None;
        for _ in 0..rng.random_range(1..5) {
            let (id, landed) = resend.take().unwrap_or_else(|| {
                next_id += 1;
                (next_id, false)
            });
            // Distinct times: a client's own number in the low digits.
            let invoke = t * 100 + c;
            let point = invoke + rng.random_range(1..40) * 100;
            let done = point + rng.random_range(1..40) * 100;
            let effect = (!landed).then_some(point);
            let (applied, ret) = match rng.random_range(0..10) {
                0 if !landed => (None, Some((done, OpType::Fail))),
                1 if !landed => (None, Some((done, OpType::Info))),
                2 => (effect, Some((done, OpType::Info))),
                3 => (effect, None),
                _ => (effect, Some((done, OpType::Ok))),
            };
            ops.push(Gen {
                thread,
                id,
                invoke,
                applied,
                ret,
            });
            match ret {
                Some((done, OpType::Info)) => {
                    thread += 100;
                    t = done / 100 + 1;
                    if rng.random_bool(0.5) {
                        resend = Some((id, landed || applied.is_some()));
                    }
                }
                Some((done, _)) => t = done / 100 + 1,
                None => break,
            }
        }
    }
    ops
}

/// The log as executed: input ids in the order they took effect.
fn executed(ops: &[Gen]) -> Vec<u32> {
    let mut applied: Vec<(u64, u32)> = ops
        .iter()
        .filter_map(|o| o.applied.map(|t| (t, o.id)))
        .collect();
    applied.sort_unstable();
    applied.into_iter().map(|(_, id)| id).collect()
}

/// The stored log: as executed, or (half the time) corrupted one way or another.
fn stored(ops: &[Gen], rng: &mut StdRng) -> (Vec<u32>, &'static str) {
    let mut log = executed(ops);
    if rng.random_bool(0.5) {
        return (log, "as executed");
    }
    let how = match rng.random_range(0..4) {
        0 if log.len() >= 2 => {
            let (a, b) = (
                rng.random_range(0..log.len()),
                rng.random_range(0..log.len()),
            );
            log.swap(a, b);
            "two inputs swapped"
        }
        1 if !log.is_empty() => {
            log.remove(rng.random_range(0..log.len()));
            "an input dropped"
        }
        2 if !log.is_empty() => {
            let dup = log[rng.random_range(0..log.len())];
            log.insert(rng.random_range(0..=log.len()), dup);
            "an input duplicated"
        }
        _ => {
            let never: Vec<u32> = ops
                .iter()
                .filter(|o| o.applied.is_none())
                .map(|o| o.id)
                .collect();
            let id = if never.is_empty() {
                999
            } else {
                never[rng.random_range(0..never.len())]
            };
            log.insert(rng.random_range(0..=log.len()), id);
            "an input that never took effect stored"
        }
    };
    (log, how)
}

/// The seq each `ok` was acknowledged with: from the log as executed.
fn acked_seqs(ops: &[Gen]) -> HashMap<u32, u64> {
    executed(ops)
        .into_iter()
        .enumerate()
        .map(|(i, id)| (id, 2 * (i as u64 + 1)))
        .collect()
}

fn ours(ops: &[Gen], log: &[u32], acked: &HashMap<u32, u64>) -> bool {
    let op = |thread, kind, id: u32, time_ns, seq| Op {
        process: thread,
        kind,
        session: "s".into(),
        input_id: format!("i{id}"),
        time_ns,
        seq,
    };
    let mut events: Vec<Op> = Vec::new();
    for o in ops {
        events.push(op(o.thread, OpType::Invoke, o.id, o.invoke, None));
        if let Some((t, kind)) = o.ret {
            let seq = (kind == OpType::Ok).then(|| acked[&o.id]);
            events.push(op(o.thread, kind, o.id, t, seq));
        }
    }
    events.sort_by_key(|o| o.time_ns);
    let mut stored = Vec::new();
    for (i, id) in log.iter().enumerate() {
        for (seq, kind) in [(2 * i as u64 + 1, "input"), (2 * i as u64 + 2, "turn_end")] {
            stored.push(StoredEntry {
                session: "s".into(),
                seq,
                kind: kind.into(),
                input_id: Some(format!("i{id}")),
                call_id: None,
                epoch: 1,
                in_doubt: false,
            });
        }
    }
    let files = Files {
        history: events,
        stored,
        ..Files::default()
    };
    check(&files).is_valid()
}

fn stateright(ops: &[Gen], log: &[u32], acked: &HashMap<u32, u64>) -> bool {
    // Every invocation and return, in time order. Refused operations never reached the log,
    // so the tester does not see them (a refused input in the log is then one nobody sent); an
    // unknown outcome is an invocation that never returned.
    let mut events: Vec<(u64, u64, Result<LogOp, LogRet>)> = Vec::new();
    for o in ops {
        if matches!(o.ret, Some((_, OpType::Fail))) {
            continue;
        }
        events.push((o.invoke, o.thread, Ok(LogOp::Append(o.id))));
        if let Some((t, OpType::Ok)) = o.ret {
            events.push((t, o.thread, Err(LogRet::Acked(acked[&o.id]))));
        }
    }
    events.sort_by_key(|e| e.0);
    let mut tester = LinearizabilityTester::new(Log::default());
    for (_, thread, event) in events {
        let step = match event {
            Ok(op) => tester.on_invoke(thread, op).map(|_| ()),
            Err(ret) => tester.on_return(thread, ret).map(|_| ()),
        };
        step.expect("a well-formed history");
    }
    tester
        .on_invret(u64::MAX, LogOp::Read, LogRet::Read(log.to_vec()))
        .expect("a well-formed history");
    tester.is_consistent()
}

#[test]
fn the_checker_agrees_with_a_linearizability_checker_on_random_histories() {
    let mut rng = StdRng::seed_from_u64(18);
    let (mut valid, mut invalid) = (0, 0);
    for case in 0..3000 {
        let ops = execution(&mut rng);
        let acked = acked_seqs(&ops);
        let (log, how) = stored(&ops, &mut rng);
        let (a, b) = (ours(&ops, &log, &acked), stateright(&ops, &log, &acked));
        assert_eq!(
            a, b,
            "case {case} ({how}): ours says {a}, stateright says {b}\nops {ops:#?}\nlog {log:?}"
        );
        if a {
            valid += 1;
        } else {
            invalid += 1;
        }
    }
    // Both verdicts were reached, many times.
    assert!(
        valid > 500 && invalid > 500,
        "valid {valid}, invalid {invalid}"
    );
}
