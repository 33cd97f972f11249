//! The workload: clients that send inputs, each with its own id, to random sessions through
//! random processes, recording every operation as `invoke`, then `ok` (with the seq the
//! acknowledgement named), `fail` (refused: must not be stored) or `info` (unknown).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::backend::EntryFields;
use super::procs::{CallError, Conn, Slot};
use crate::history::{Op, OpType, Streamed};

/// Error kinds that promise the input was not stored: refused before anything was written,
/// and not retryable. Everything else (timeouts, lost connections, `Fenced`, `Overloaded`,
/// `DurabilityNotMet`, and `NotFound`, which a commit of unknown outcome can end in) leaves the
/// outcome unknown.
const DEFINITE: &[&str] = &[
    "InvalidId",
    "InvalidInput",
    "InputTooLarge",
    "AlreadyExists",
    "SessionClosed",
    "TemplateNotFound",
];

/// How a send ended, as the history records it.
fn classify(result: &Result<u64, CallError>) -> (OpType, Option<u64>) {
    match result {
        Ok(seq) => (OpType::Ok, Some(*seq)),
        Err((kind, _)) if DEFINITE.contains(&kind.as_str()) => (OpType::Fail, None),
        Err(_) => (OpType::Info, None),
    }
}

/// The run's history, in the order things happened.
pub(crate) struct History {
    start: Instant,
    ops: std::sync::Mutex<Vec<Op>>,
    /// Operations by outcome, for the progress line.
    pub(crate) counts: [AtomicU64; 4],
}

impl History {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            ops: std::sync::Mutex::default(),
            counts: Default::default(),
        })
    }

    fn record(&self, process: u64, kind: OpType, session: &str, input_id: &str, seq: Option<u64>) {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        // Taken under the lock, so the file's order is the order of the timestamps.
        let time_ns = self.start.elapsed().as_nanos() as u64;
        ops.push(Op {
            process,
            kind,
            session: session.into(),
            input_id: input_id.into(),
            time_ns,
            seq,
        });
        self.counts[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The history so far.
    pub(crate) fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// One operation, recorded: sends `text` as `input_id` through `conn`.
    pub(crate) async fn operate(
        &self,
        process: u64,
        conn: &Conn,
        session: &str,
        input_id: &str,
        text: &str,
    ) -> OpType {
        self.record(process, OpType::Invoke, session, input_id, None);
        let (kind, seq) = classify(&conn.send(session, input_id, text).await);
        self.record(process, kind, session, input_id, seq);
        kind
    }
}

/// A random process that is up, if any.
pub(crate) fn pick(slots: &[Arc<Slot>], rng: &mut StdRng) -> Option<Conn> {
    let up: Vec<Conn> = slots.iter().filter_map(|s| s.conn()).collect();
    if up.is_empty() {
        return None;
    }
    Some(up[rng.random_range(0..up.len())].clone())
}

/// One client: operations one at a time until `stop`. After an unknown outcome the client
/// takes a new process number (its earlier operation may still land, so what follows is not
/// ordered after it) and, half the time, resends the same input id — the retry the engine
/// promises is safe.
pub(crate) async fn client(
    index: u64,
    clients: u64,
    seed: u64,
    sessions: Arc<Vec<String>>,
    slots: Arc<Vec<Arc<Slot>>>,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (index + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut process = index;
    let mut n = 0u64;
    let mut retry: Option<(String, String, String)> = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(conn) = pick(&slots, &mut rng) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (session, input_id, text) = retry.take().unwrap_or_else(|| {
            n += 1;
            let session = sessions[rng.random_range(0..sessions.len())].clone();
            // A quarter call the non-idempotent tool, 15% the idempotent one.
            let text = match rng.random_range(0..100) {
                0..25 => "tool call",
                25..40 => "idem call",
                _ => "hello",
            };
            (session, format!("c{index}-{n}"), text.to_string())
        });
        let kind = history
            .operate(process, &conn, &session, &input_id, &text)
            .await;
        if kind == OpType::Info {
            process += clients;
            if rng.random_bool(0.5) {
                retry = Some((session, input_id, text));
            }
            // A moment for the fault to pass before trying again.
            tokio::time::sleep(Duration::from_millis(rng.random_range(20..200))).await;
        } else {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
        }
    }
}

/// After the faults: one input to every session, resent through the processes until it is
/// acknowledged (every session must take input again once the cluster is whole). The sessions
/// that did not within `deadline`, with the last error.
pub(crate) async fn settle(
    sessions: &[String],
    slots: &[Arc<Slot>],
    history: &History,
    first_process: u64,
    deadline: Duration,
) -> Vec<(String, CallError)> {
    let mut rng = StdRng::seed_from_u64(first_process);
    let until = tokio::time::Instant::now() + deadline;
    let mut failed = Vec::new();
    for (i, session) in sessions.iter().enumerate() {
        let mut attempt = 0;
        let mut input_id = format!("settle-{i}");
        let mut process = first_process + i as u64 * 1000;
        let mut last: CallError = ("Unavailable".into(), "no process up".into());
        let mut done = false;
        while tokio::time::Instant::now() < until {
            let Some(conn) = pick(slots, &mut rng) else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            history.record(process, OpType::Invoke, session, &input_id, None);
            let result = conn.send(session, &input_id, "settle").await;
            let (kind, seq) = classify(&result);
            history.record(process, kind, session, &input_id, seq);
            match result {
                Ok(_) => {
                    done = true;
                    break;
                }
                Err(e) => {
                    process += 1;
                    if kind == OpType::Fail {
                        // Refused for good: the next try is a new input.
                        attempt += 1;
                        input_id = format!("settle-{i}-{attempt}");
                    }
                    last = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        if !done {
            failed.push((session.clone(), last));
        }
    }
    failed
}

/// What subscribers saw, in the order they saw it.
pub(crate) type Events = Arc<std::sync::Mutex<Vec<Streamed>>>;

/// One subscriber of `session`, as a UI would be: follows its entries through a random
/// process, and when the stream breaks or it has followed a while (2–10 s), subscribes again
/// through a random process (perhaps the same) after the last seq it saw.
pub(crate) async fn subscriber(
    index: u64,
    seed: u64,
    session: String,
    slots: Arc<Vec<Arc<Slot>>>,
    events: Events,
    stop: Arc<AtomicBool>,
) {
    use futures::StreamExt;
    let mut rng = StdRng::seed_from_u64(seed ^ (index + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut last = 0;
    while !stop.load(Ordering::Relaxed) {
        let Some(conn) = pick(&slots, &mut rng) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(mut stream) = conn.subscribe(&session, last).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let until =
            tokio::time::Instant::now() + Duration::from_millis(rng.random_range(2000..10_000));
        while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < until {
            match tokio::time::timeout(Duration::from_millis(200), stream.next()).await {
                Err(_) => continue,
                Ok(Some(Ok(e))) => {
                    let f = EntryFields::of(&e);
                    last = e.seq;
                    let mut events = events.lock().unwrap_or_else(|p| p.into_inner());
                    events.push(Streamed {
                        subscriber: index,
                        session: session.clone(),
                        seq: e.seq,
                        kind: f.kind,
                        input_id: f.input_id,
                        call_id: f.call_id,
                    });
                }
                Ok(Some(Err(_)) | None) => break,
            }
        }
    }
}
