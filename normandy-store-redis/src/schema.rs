//! The key layout: which keys hold one session (all under one hash tag, so one Cluster slot)
//! and which sorted sets hold the resumable index. The fields inside those keys are described
//! on [`RedisStore`](crate::RedisStore).

use normandy_core::{NodeId, SessionId};

/// Key names of one store (one prefix).
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    pub(crate) prefix: String,
    pub(crate) index: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            index: format!("{prefix}:resumable:"),
        }
    }

    /// `{<prefix>:<id>}:<suffix>`: the braces make every key of a session hash to one slot.
    pub(crate) fn session(&self, id: &SessionId, suffix: &str) -> String {
        format!("{{{}:{}}}:{suffix}", self.prefix, id)
    }

    pub(crate) fn state(&self, id: &SessionId) -> String {
        self.session(id, "s")
    }

    pub(crate) fn stream(&self, id: &SessionId) -> String {
        self.session(id, "e")
    }

    pub(crate) fn inputs(&self, id: &SessionId) -> String {
        self.session(id, "i")
    }

    pub(crate) fn any_index(&self) -> String {
        format!("{}any", self.index)
    }

    pub(crate) fn node_index(&self, node: &NodeId) -> String {
        format!("{}node:{node}", self.index)
    }
}
