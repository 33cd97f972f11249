//! The files a fault run writes and the checker that reads them (issue 18).
//!
//! A run records what its clients saw ([`history`]: every operation as `invoke`, then `ok` with
//! the seq its turn ended at, `fail`, or `info` when the outcome is unknown), then reads the
//! final log straight from the store and lists every tool execution a tool recorded outside
//! the store (and, with subscribers, what they saw). [`check()`] decides from those files alone
//! whether the promise held:
//!
//! - no input id stored twice in a session, and every session's seqs dense from 1;
//! - every `ok` stored, its turn ending at the seq it was acknowledged with; nothing that
//!   failed stored;
//! - real time: an input acknowledged before another was invoked is stored before it, and each
//!   client's inputs to one session are stored in the order it sent them;
//! - epochs never go back along a session's log (as far as the files carry them: entries do
//!   not record their writer's epoch, so a run's `final.jsonl` gives the session's);
//! - every tool call with a recorded result ran exactly once, or, where a crash fell between
//!   the execution and its record, the result says so (in doubt) or an idempotent tool ran
//!   again under the same key; no result without an execution;
//!
//! - every entry a subscriber saw on an event stream is the final log's entry at that seq, and
//!   a subscriber's entries of one session are one unbroken run of seqs (the stream is a
//!   prefix of the log, resumed where it broke);
//!
//! and what became of each `info` (stored, at which seq, or not).
//!
//! The file formats are plain JSON lines, documented on [`history::Op`],
//! [`history::StoredEntry`] and [`history::ToolRun`], so any other checker can read the same
//! run.
//!
//! [`run`] makes such a run: real `normandy-node` processes with a [`proxy`] on each link, a
//! workload of clients, and a nemesis drawing its faults from a seed (`cargo xtask chaos`).

pub mod check;
pub mod history;
pub mod proxy;
pub mod run;

pub use check::{Report, Violation, ViolationKind, check};
pub use history::{Files, Op, OpType, ReadError, StoredEntry, Streamed, ToolRun};
