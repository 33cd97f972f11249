//! The key layout: which keys hold one session (all under one hash tag, so one Cluster slot)
//! and which sorted sets hold the resumable index. The fields inside those keys are described
//! on [`RedisStore`](crate::RedisStore).
//!
//! The resumable index has two layouts, chosen by the target:
//! - **One server** (the layout of release 0.1, kept so existing data reads as before):
//!   `<prefix>:resumable:any` (session ids) and `<prefix>:resumable:node:<owner>` (one set per
//!   owner), named inside the scripts from the prefix passed in `ARGV`.
//! - **Cluster**: one bucket per hash slot, in the slot of the sessions it lists, so a script
//!   updates a session and its index entry atomically without leaving the slot:
//!   `<prefix>:resumable:{<tag>}:any` (ids) and `<prefix>:resumable:{<tag>}:own`
//!   (`<owner>\0<id>`, so one key per slot serves every owner and the client can name it —
//!   and declare it in `KEYS` — before the script reads the owner), where `<tag>` is
//!   [`normandy_redis::slot_tag`] of the session's slot. Listing reads the bucket of every
//!   slot: 16384 small reads per page, spread over the primaries, for a call the reaper makes
//!   when a node dies.

use normandy_core::{NodeId, SessionId};

/// Key names of one store (one prefix).
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    pub(crate) prefix: String,
    /// `<prefix>:resumable:`.
    pub(crate) index: String,
    /// Per-slot index buckets (a cluster) rather than the single-server sets.
    pub(crate) cluster: bool,
}

impl Keys {
    pub(crate) fn new(prefix: &str, cluster: bool) -> Self {
        Self {
            prefix: prefix.to_string(),
            index: format!("{prefix}:resumable:"),
            cluster,
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

    /// The index prefix the scripts name the single-server sets from, or `""` on a cluster
    /// (the scripts then take the slot's bucket keys from `KEYS`).
    pub(crate) fn index_arg(&self) -> &str {
        if self.cluster { "" } else { &self.index }
    }

    /// The index keys a script about `id` declares after the session's own keys: none on one
    /// server, the slot's `any` and `own` buckets on a cluster.
    pub(crate) fn index_keys(&self, id: &SessionId) -> Vec<String> {
        if !self.cluster {
            return Vec::new();
        }
        let slot = normandy_redis::slot(self.state(id).as_bytes());
        vec![self.bucket(slot, "any"), self.bucket(slot, "own")]
    }

    /// `<prefix>:resumable:{<tag of slot>}:<kind>`.
    pub(crate) fn bucket(&self, slot: u16, kind: &str) -> String {
        format!(
            "{}{{{}}}:{kind}",
            self.index,
            normandy_redis::slot_tag(slot)
        )
    }

    pub(crate) fn any_index(&self) -> String {
        format!("{}any", self.index)
    }

    pub(crate) fn node_index(&self, node: &NodeId) -> String {
        format!("{}node:{node}", self.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_buckets_share_their_sessions_slot() {
        let keys = Keys::new("app", true);
        for id in ["s1", "session-with-a-long-name", "x"] {
            let id = SessionId::new(id).unwrap();
            let slot = normandy_redis::slot(keys.state(&id).as_bytes());
            for key in [keys.stream(&id), keys.inputs(&id)]
                .into_iter()
                .chain(keys.index_keys(&id))
            {
                assert_eq!(normandy_redis::slot(key.as_bytes()), slot, "{key}");
            }
        }
        assert!(
            Keys::new("app", false)
                .index_keys(&SessionId::new("s").unwrap())
                .is_empty()
        );
        assert_eq!(Keys::new("app", true).index_arg(), "");
        assert_eq!(Keys::new("app", false).index_arg(), "app:resumable:");
    }
}
