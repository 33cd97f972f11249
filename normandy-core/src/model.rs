//! Ids and the conversation graph: [`SessionId`], [`NodeId`], [`InputId`], [`Entry`], [`Message`]
//! and its content blocks.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A fencing epoch: bumped by every activation of a session in the store.
pub type Epoch = u64;
/// A per-session sequence number: the seq of the last committed entry (0 before the first).
pub type Seq = u64;

/// Longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 200;

fn validate(what: &'static str, s: &str, extra: Option<char>) -> Result<()> {
    let reject = |reason| {
        Err(Error::InvalidId {
            what,
            value: s.chars().take(64).collect(),
            reason,
        })
    };
    if s.is_empty() {
        return reject("must not be empty");
    }
    if s.len() > MAX_ID_LEN {
        return reject("longer than 200 bytes");
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return reject("must be printable with no whitespace");
    }
    if s.chars().any(invisible) {
        return reject("contains an invisible or text-direction character");
    }
    if let Some(c) = extra
        && s.contains(c)
    {
        return reject("contains a reserved character");
    }
    Ok(())
}

/// Characters that print as nothing or reorder the text around them: two ids that look alike in
/// a log, a dashboard or an admin CLI must be the same id. Zero-width and joiner characters,
/// the byte-order mark, soft hyphen, and every bidirectional control (embeddings, overrides,
/// isolates, and the marks).
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates and wraps an id: 1–200 bytes, printable, no whitespace.
            pub fn new(s: impl AsRef<str>) -> Result<Self> {
                let s = s.as_ref();
                validate($what, s, None)?;
                Ok(Self(Arc::from(s)))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = Error;
            fn try_from(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.to_string()
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// The key of a session: 1–200 bytes, printable, no whitespace.
    SessionId,
    "session id"
);
string_id!(
    /// A client-given (or generated) id for one user input, used to make resubmission idempotent.
    InputId,
    "input id"
);

impl SessionId {
    /// The empty id, smaller than every valid one: a range bound for ordered indexes.
    pub(crate) fn min_bound() -> Self {
        Self(Arc::from(""))
    }

    /// A fresh random session id (UUIDv7, so ids sort by creation time).
    pub fn generate() -> Self {
        Self(Arc::from(uuid::Uuid::now_v7().to_string()))
    }
}

impl InputId {
    /// A fresh random input id (UUIDv7).
    pub fn generate() -> Self {
        Self(Arc::from(uuid::Uuid::now_v7().to_string()))
    }
}

/// A node's identity: a stable name plus an incarnation that changes at every process start, so a
/// restarted node is never mistaken for its previous life.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId {
    name: Arc<str>,
    incarnation: u64,
}

impl NodeId {
    /// Validates the name (like a session id, without `#`) and pairs it with an incarnation.
    pub fn new(name: impl AsRef<str>, incarnation: u64) -> Result<Self> {
        let name = name.as_ref();
        validate("node id", name, Some('#'))?;
        Ok(Self {
            name: Arc::from(name),
            incarnation,
        })
    }

    /// A node id with a fresh incarnation: the current time in milliseconds since the Unix
    /// epoch in the high 44 bits (so a later start has a greater incarnation, until the year
    /// 2527) and 20 random bits below, so two processes started in the same millisecond — two
    /// containers of one deployment — still get different incarnations.
    pub fn with_fresh_incarnation(name: impl AsRef<str>) -> Result<Self> {
        Self::new(name, fresh_incarnation(crate::now_ms()))
    }

    /// The stable name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }
}

/// Random bits below the milliseconds in an incarnation.
const INCARNATION_RANDOM_BITS: u32 = 20;

fn fresh_incarnation(now_ms: u64) -> u64 {
    // The random part of a v7 UUID (uuid's fast RNG: no syscall per id).
    let random = uuid::Uuid::now_v7().as_u128() as u64 & ((1 << INCARNATION_RANDOM_BITS) - 1);
    (now_ms << INCARNATION_RANDOM_BITS) | random
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.name, self.incarnation)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = Error;
    /// Parses `name#incarnation` (or a bare `name`, incarnation 0).
    fn from_str(s: &str) -> Result<Self> {
        match s.rsplit_once('#') {
            Some((name, inc)) => {
                let incarnation = inc.parse().map_err(|_| Error::InvalidId {
                    what: "node id",
                    value: s.chars().take(64).collect(),
                    reason: "incarnation after '#' must be a number",
                })?;
                Self::new(name, incarnation)
            }
            None => Self::new(s, 0),
        }
    }
}

impl TryFrom<String> for NodeId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.to_string()
    }
}

mod content;

pub use content::{
    CallInfo, ContentBlock, MAX_INLINE_MEDIA_BYTES, MediaSource, Message, Role, StopReason, Usage,
};

/// How a turn ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum TurnStatus {
    /// The model gave its final answer.
    Completed,
    /// The turn was cancelled.
    Cancelled,
    /// The turn deadline passed.
    TimedOut,
    /// The max-steps guard stopped it.
    MaxSteps {
        /// The limit that was hit.
        limit: u32,
    },
    /// The model call failed for good.
    Failed {
        /// What failed.
        message: String,
    },
}

/// One node of the conversation graph.
///
/// `parent` is the session's head when the entry was written (the entry before it in causal
/// order); forks of a session start from an entry and follow parents back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Sequence number, 1-based and contiguous within the session.
    pub seq: Seq,
    /// The entry this one follows, if any.
    pub parent: Option<Seq>,
    /// Wall-clock time of writing, milliseconds since the Unix epoch (informational).
    pub at_ms: u64,
    /// What the entry records.
    pub payload: EntryPayload,
}

/// What an [`Entry`] records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EntryPayload {
    /// A user input was accepted. Its `input_id` is unique within the session.
    Input {
        /// The input's id.
        input_id: InputId,
        /// The user's message content.
        content: Vec<ContentBlock>,
    },
    /// A model response.
    Assistant {
        /// The response message.
        message: Message,
        /// Why the model stopped.
        stop_reason: StopReason,
        /// Tokens used by this call.
        usage: Usage,
        /// The provider's model, request id and stop reason for this call.
        #[serde(default, skip_serializing_if = "CallInfo::is_empty")]
        call: CallInfo,
        /// Set when the response was cut short — the turn was cancelled, timed out or
        /// interrupted while the model streamed — and `message` holds the text streamed so far.
        /// The model's view skips an incomplete response; history keeps it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        incomplete: bool,
    },
    /// A non-idempotent tool call is about to run (written before it runs).
    ToolStarted {
        /// The call id (the model's, not unique; see
        /// [the rules](crate::tools#call-ids-and-idempotency-keys)).
        call_id: String,
        /// The tool's name.
        tool: String,
        /// The idempotency key the tool is handed
        /// ([`ToolContext::idempotency_key`](crate::tools::ToolContext::idempotency_key)):
        /// what it sends to an outside service, so a doubtful call can be looked up there.
        /// `None` in entries written before the key was recorded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
    },
    /// A tool call's result: what the model is told (`content`, `is_error`, `structured`,
    /// `blocks`) and, for a call whose outcome is unknown, why and under which key it ran
    /// (`in_doubt`).
    ToolResult {
        /// The call id (the model's, not unique: results are recorded in the order of the calls,
        /// so the results of a repeated id answer its calls in order).
        call_id: String,
        /// The result text.
        content: String,
        /// Whether it is an error result.
        is_error: bool,
        /// A machine-readable result beside the text, if the tool gave one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        structured: Option<serde_json::Value>,
        /// Images, documents and further text the tool returned.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        blocks: Vec<ContentBlock>,
        /// Set when the call may or may not have taken effect (an in-doubt result is always an
        /// error result for the model). `None` for an ordinary success or error, a call that
        /// was never run, and entries written before it was recorded: absent from their
        /// encoding, so those entries encode as they always did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        in_doubt: Option<InDoubt>,
    },
    /// A turn ended; carries its outcome so a resubmitted input gets the original answer.
    TurnEnd {
        /// The input that started the turn.
        input_id: InputId,
        /// How it ended.
        status: TurnStatus,
        /// Seq of the final assistant entry, if any.
        answer_seq: Option<Seq>,
        /// Total usage of the turn.
        usage: Usage,
    },
}

/// Why a tool call's outcome is unknown, and what to look it up by: carried by the
/// [`EntryPayload::ToolResult`] of a call that may or may not have taken effect.
///
/// The engine never runs an in-doubt call again (invariant 5): it tells the model the outcome is
/// unknown and records this, so code can settle it with the outside service — ask the payment
/// provider whether a charge under `idempotency_key` exists — from history alone.
///
/// ```
/// use normandy_core::{DoubtReason, Entry};
///
/// /// The keys of the calls in `history` whose outcome nobody knows.
/// fn to_reconcile(history: &[Entry]) -> Vec<(&str, &str, DoubtReason)> {
///     history
///         .iter()
///         .filter_map(|e| e.payload.in_doubt())
///         .map(|d| (d.tool.as_str(), d.idempotency_key.as_str(), d.reason))
///         .collect()
/// }
/// ```
///
/// Encoded (here as JSON) inside its entry:
/// `"in_doubt": {"reason": "interrupted", "tool": "pay", "idempotency_key": "chat-42:7:0"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InDoubt {
    /// Why the outcome is unknown.
    pub reason: DoubtReason,
    /// The tool's name.
    pub tool: String,
    /// The key the tool was handed
    /// ([`ToolContext::idempotency_key`](crate::tools::ToolContext::idempotency_key)).
    pub idempotency_key: String,
}

/// Why an [`InDoubt`] tool call's outcome is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DoubtReason {
    /// The session stopped while the call ran (its node died, or its task was killed): its
    /// [`ToolStarted`](EntryPayload::ToolStarted) was committed and a resume found no result.
    /// Only non-idempotent calls (an idempotent one is simply run again, under the same key).
    Interrupted,
    /// The call ran past the tool-call timeout
    /// ([`TurnLimits::tool_call_timeout_ms`](crate::template::TurnLimits::tool_call_timeout_ms))
    /// and was dropped.
    TimedOut,
    /// The turn ended while the call ran — its deadline passed, it was stopped, or a hook after
    /// the tool failed — so the call was dropped or its output discarded. The
    /// [`TurnEnd`](EntryPayload::TurnEnd) that follows says how the turn ended.
    TurnEnded,
    /// The tool panicked.
    Panicked,
}

impl EntryPayload {
    /// A short stable name of the payload kind, for indexed columns and logs.
    pub fn kind_name(&self) -> &'static str {
        match self {
            EntryPayload::Input { .. } => "input",
            EntryPayload::Assistant { .. } => "assistant",
            EntryPayload::ToolStarted { .. } => "tool_started",
            EntryPayload::ToolResult { .. } => "tool_result",
            EntryPayload::TurnEnd { .. } => "turn_end",
        }
    }

    /// The in-doubt record of a tool result whose outcome is unknown: what to reconcile with
    /// the outside service the tool called. `None` for every other entry.
    pub fn in_doubt(&self) -> Option<&InDoubt> {
        match self {
            EntryPayload::ToolResult { in_doubt, .. } => in_doubt.as_ref(),
            _ => None,
        }
    }

    /// The input id, for `Input` entries (backends index it, unique per session).
    pub fn input_id(&self) -> Option<&InputId> {
        match self {
            EntryPayload::Input { input_id, .. } => Some(input_id),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_validated() {
        assert!(SessionId::new("chat-42").is_ok());
        assert_eq!(
            SessionId::new("").unwrap_err().kind(),
            crate::ErrorKind::InvalidId
        );
        assert!(SessionId::new("a b").is_err());
        assert!(SessionId::new("a\u{7}").is_err());
        assert!(SessionId::new("x".repeat(201)).is_err());
        assert!(SessionId::new("x".repeat(200)).is_ok());
        let err = SessionId::new("bad id").unwrap_err().to_string();
        assert!(
            err.contains("session id") && err.contains("bad id"),
            "{err}"
        );
    }

    #[test]
    fn ids_refuse_invisible_and_direction_characters() {
        for bad in [
            "a\u{200B}b",
            "\u{FEFF}bom",
            "rtl\u{202E}txt",
            "iso\u{2066}late",
            "mark\u{200F}",
        ] {
            let err = SessionId::new(bad).unwrap_err();
            assert!(err.to_string().contains("invisible"), "{bad:?}: {err}");
        }
        assert!(
            SessionId::new("café-日本-ok").is_ok(),
            "printable letters stay valid"
        );
    }

    #[test]
    fn node_ids_round_trip() {
        let n = NodeId::new("node-a", 7).unwrap();
        assert_eq!(n.to_string(), "node-a#7");
        assert_eq!("node-a#7".parse::<NodeId>().unwrap(), n);
        assert!("node-a#x".parse::<NodeId>().is_err());
        assert!(NodeId::new("a#b", 1).is_err());
    }

    #[test]
    fn fresh_incarnations_differ_within_a_millisecond_and_grow_with_time() {
        let same_ms: std::collections::HashSet<u64> = (0..64)
            .map(|_| fresh_incarnation(1_700_000_000_000))
            .collect();
        assert!(same_ms.len() > 60, "{} distinct of 64", same_ms.len());
        let later = fresh_incarnation(1_700_000_000_001);
        assert!(same_ms.iter().all(|i| *i < later));
        // Milliseconds of the year 2500 still fit above the random bits.
        let y2500 = 16_725_225_600_000u64;
        assert_eq!(fresh_incarnation(y2500) >> INCARNATION_RANDOM_BITS, y2500);
    }

    /// The tool entries as they were encoded before in-doubt records and keys were added.
    #[derive(Serialize)]
    #[serde(tag = "kind", rename_all = "snake_case")]
    enum OldPayload {
        ToolStarted {
            call_id: String,
            tool: String,
        },
        ToolResult {
            call_id: String,
            content: String,
            is_error: bool,
        },
    }

    #[derive(Serialize)]
    struct OldEntry {
        seq: Seq,
        parent: Option<Seq>,
        at_ms: u64,
        payload: OldPayload,
    }

    fn entry(seq: Seq, payload: EntryPayload) -> Entry {
        Entry {
            seq,
            parent: Some(seq - 1),
            at_ms: 7,
            payload,
        }
    }

    #[test]
    fn old_tool_entries_decode_and_entries_without_doubt_encode_as_before() {
        use crate::codec::{BlobKind, decode, encode};
        let old_started = OldEntry {
            seq: 3,
            parent: Some(2),
            at_ms: 7,
            payload: OldPayload::ToolStarted {
                call_id: "call_0".into(),
                tool: "pay".into(),
            },
        };
        let old_result = OldEntry {
            seq: 4,
            parent: Some(3),
            at_ms: 7,
            payload: OldPayload::ToolResult {
                call_id: "call_0".into(),
                content: "paid".into(),
                is_error: false,
            },
        };
        let started = entry(
            3,
            EntryPayload::ToolStarted {
                call_id: "call_0".into(),
                tool: "pay".into(),
                idempotency_key: None,
            },
        );
        let result = entry(
            4,
            EntryPayload::ToolResult {
                call_id: "call_0".into(),
                content: "paid".into(),
                is_error: false,
                structured: None,
                blocks: Vec::new(),
                in_doubt: None,
            },
        );
        for (old, new) in [
            (encode(BlobKind::Entry, &old_started), &started),
            (encode(BlobKind::Entry, &old_result), &result),
        ] {
            let old = old.unwrap();
            let back: Entry = decode(BlobKind::Entry, &old, None).unwrap();
            assert_eq!(&back, new, "an old entry decodes");
            assert_eq!(
                encode(BlobKind::Entry, new).unwrap(),
                old,
                "no key and no doubt: the bytes are the old ones"
            );
        }
        assert_eq!(result.payload.in_doubt(), None);

        // The JSON form (`normandy-node history` prints it) of an old entry decodes too.
        let json = r#"{"seq":4,"parent":3,"at_ms":7,"payload":{"kind":"tool_result","call_id":"call_0","content":"paid","is_error":false}}"#;
        assert_eq!(serde_json::from_str::<Entry>(json).unwrap(), result);
        assert_eq!(serde_json::to_string(&result).unwrap(), json);
    }

    #[test]
    fn in_doubt_entries_round_trip_and_name_their_reason_and_key() {
        use crate::codec::{BlobKind, decode, encode};
        let doubt = InDoubt {
            reason: DoubtReason::Interrupted,
            tool: "pay".into(),
            idempotency_key: "chat-42:7:0".into(),
        };
        let e = entry(
            9,
            EntryPayload::ToolResult {
                call_id: "call_0".into(),
                content: "The outcome of tool call call_0 (pay) is unknown".into(),
                is_error: true,
                structured: None,
                blocks: Vec::new(),
                in_doubt: Some(doubt.clone()),
            },
        );
        let bytes = encode(BlobKind::Entry, &e).unwrap();
        assert_eq!(decode::<Entry>(BlobKind::Entry, &bytes, None).unwrap(), e);
        assert_eq!(e.payload.in_doubt(), Some(&doubt));
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(
            json["payload"]["in_doubt"],
            serde_json::json!({
                "reason": "interrupted",
                "tool": "pay",
                "idempotency_key": "chat-42:7:0",
            })
        );
        for (reason, name) in [
            (DoubtReason::Interrupted, "interrupted"),
            (DoubtReason::TimedOut, "timed_out"),
            (DoubtReason::TurnEnded, "turn_ended"),
            (DoubtReason::Panicked, "panicked"),
        ] {
            assert_eq!(serde_json::to_value(reason).unwrap(), name);
        }
        let started = EntryPayload::ToolStarted {
            call_id: "call_0".into(),
            tool: "pay".into(),
            idempotency_key: Some("chat-42:7:0".into()),
        };
        assert_eq!(
            serde_json::to_value(&started).unwrap()["idempotency_key"],
            "chat-42:7:0"
        );
    }

    #[test]
    fn ids_reject_invalid_on_deserialize() {
        let bytes = rmp_serde::to_vec("has space").unwrap();
        assert!(rmp_serde::from_slice::<SessionId>(&bytes).is_err());
    }
}
