//! The JSON-lines files of a run, and reading them with errors that name the file and the
//! line.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a client saw of one operation: `{"process": 3, "type": "invoke", "session": "s1",
/// "input_id": "i42", "time_ns": 123}`, and `"seq": 7` on `ok` only. One line per event of
/// `history.jsonl`, in the order they happened (`time_ns` is monotonic within the run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// The client (a logical process: one operation at a time).
    pub process: u64,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: OpType,
    /// The session the input went to.
    pub session: String,
    /// The input's id, unique within the run.
    pub input_id: String,
    /// A monotonic timestamp, nanoseconds since the run started.
    pub time_ns: u64,
    /// The seq the acknowledgement named (`ok` only): that of the input's turn end, the
    /// `turn_end` entry whose `input_id` is this input's (a send is acknowledged when its turn
    /// ends, and the outcome names where).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// The kind of a history event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpType {
    /// The client sent the input.
    Invoke,
    /// The input was acknowledged as stored, at `seq`.
    Ok,
    /// The input was refused: it must not be stored.
    Fail,
    /// The outcome is unknown (a timeout, a connection lost): it may or may not be stored.
    Info,
}

/// One entry of the final log, read straight from the store after the run: `{"session": "s1",
/// "seq": 7, "kind": "input", "input_id": "i42", "call_id": null, "epoch": 2}`, plus
/// `"in_doubt": true` on a tool result recorded as in doubt. One line per entry of
/// `final.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEntry {
    /// The session.
    pub session: String,
    /// Its seq in the session's log.
    pub seq: u64,
    /// `input`, `assistant`, `tool_started`, `tool_result`, … (the entry's payload kind).
    pub kind: String,
    /// The input's id, on an `input` entry and on the `turn_end` entry of its turn.
    #[serde(default)]
    pub input_id: Option<String>,
    /// The tool call's id, on a tool entry.
    #[serde(default)]
    pub call_id: Option<String>,
    /// An epoch of the session: the harness writes the session's epoch at the end of the run,
    /// as entries do not record the epoch of the writer that committed them (a checker given
    /// per-entry epochs checks they never go back).
    pub epoch: u64,
    /// A tool result recorded as in doubt (the call may or may not have run).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_doubt: bool,
}

/// One execution of a tool, recorded by the tool itself outside the store: `{"session": "s1",
/// "call_id": "c9", "key": "…", "idempotent": false}`. One line per execution of
/// `tools.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolRun {
    /// The session whose call ran.
    pub session: String,
    /// The call's id.
    pub call_id: String,
    /// The idempotency key the tool was handed.
    pub key: String,
    /// Whether the tool is idempotent (may run again under the same key).
    pub idempotent: bool,
}

/// One entry as a subscriber saw it on a session's event stream: `{"subscriber": 1,
/// "session": "s1", "seq": 7, "kind": "input", "input_id": "i42", "call_id": null}`. One line
/// per entry of `events.jsonl`. A subscriber that loses its stream subscribes again after the
/// last seq it saw, so its entries of one session are one unbroken run of seqs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Streamed {
    /// The subscriber.
    pub subscriber: u64,
    /// The session.
    pub session: String,
    /// The entry's seq.
    pub seq: u64,
    /// The entry's payload kind, as in `final.jsonl`.
    pub kind: String,
    /// The input's id, on `input` and `turn_end` entries.
    #[serde(default)]
    pub input_id: Option<String>,
    /// The tool call's id, on tool entries.
    #[serde(default)]
    pub call_id: Option<String>,
}

/// The files of a run, read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Files {
    /// `history.jsonl`.
    pub history: Vec<Op>,
    /// `final.jsonl`.
    pub stored: Vec<StoredEntry>,
    /// `tools.jsonl`.
    pub tools: Vec<ToolRun>,
    /// `events.jsonl`, when the run had subscribers (empty when the file is absent).
    pub events: Vec<Streamed>,
}

/// A run's files could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be opened or read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not the JSON its file holds.
    #[error("{path}:{line}: {source}")]
    Line {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
        /// Why.
        source: serde_json::Error,
    },
}

impl Files {
    /// Reads `history.jsonl`, `final.jsonl`, `tools.jsonl` and, if there is one,
    /// `events.jsonl` from `dir`.
    pub fn read(dir: &Path) -> Result<Files, ReadError> {
        let events = dir.join("events.jsonl");
        Ok(Files {
            history: read_lines(&dir.join("history.jsonl"))?,
            stored: read_lines(&dir.join("final.jsonl"))?,
            tools: read_lines(&dir.join("tools.jsonl"))?,
            events: if events.exists() {
                read_lines(&events)?
            } else {
                Vec::new()
            },
        })
    }

    /// Writes the files into `dir` (`events.jsonl` only when there are events).
    pub fn write(&self, dir: &Path) -> Result<(), ReadError> {
        write_lines(&dir.join("history.jsonl"), &self.history)?;
        write_lines(&dir.join("final.jsonl"), &self.stored)?;
        write_lines(&dir.join("tools.jsonl"), &self.tools)?;
        if !self.events.is_empty() {
            write_lines(&dir.join("events.jsonl"), &self.events)?;
        }
        Ok(())
    }
}

pub(crate) fn read_lines<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, ReadError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReadError::Io {
        path: path.to_owned(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| ReadError::Line {
                path: path.to_owned(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

fn write_lines<T: Serialize>(path: &Path, items: &[T]) -> Result<(), ReadError> {
    let mut out = String::new();
    for item in items {
        // Our own plain structs: serializing them cannot fail.
        out.push_str(&serde_json::to_string(item).unwrap_or_default());
        out.push('\n');
    }
    std::fs::write(path, out).map_err(|source| ReadError::Io {
        path: path.to_owned(),
        source,
    })
}
