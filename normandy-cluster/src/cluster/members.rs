//! Who else is alive: the member poller, the diff between two polls, and the
//! [`MemberEvent`]s it publishes. A node that goes down starts the reaper (`reaper.rs`).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use normandy_core::{Member, Membership, NodeId};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Node, read};

/// A change in membership, as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    /// A node's lease appeared.
    Up(Member),
    /// A node's lease lapsed or was dropped.
    Down(NodeId),
}

/// Live members as of the last poll, and the channel their changes go out on.
pub(super) struct View {
    /// std RwLock: never held across an await.
    members: RwLock<BTreeMap<NodeId, String>>,
    events: broadcast::Sender<MemberEvent>,
}

impl View {
    /// A view that knows only `me`.
    pub(super) fn new(me: &Member) -> Self {
        Self {
            members: RwLock::new(BTreeMap::from([(me.node.clone(), me.address.clone())])),
            events: broadcast::channel(256).0,
        }
    }

    pub(super) fn list(&self) -> Vec<Member> {
        read(&self.members)
            .iter()
            .map(|(node, address)| Member {
                node: node.clone(),
                address: address.clone(),
            })
            .collect()
    }

    pub(super) fn nodes(&self) -> Vec<NodeId> {
        read(&self.members).keys().cloned().collect()
    }

    pub(super) fn subscribe(&self) -> broadcast::Receiver<MemberEvent> {
        self.events.subscribe()
    }

    /// Adds a node now, without waiting for the next poll (this node, after rejoining).
    pub(super) fn insert(&self, member: &Member) {
        self.members
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(member.node.clone(), member.address.clone());
    }

    /// The address of `node`, from the last poll or, failing that, a fresh read.
    pub(super) async fn address_of(
        &self,
        node: &NodeId,
        membership: &dyn Membership,
    ) -> Option<String> {
        if let Some(a) = read(&self.members).get(node) {
            return Some(a.clone());
        }
        let list = membership.members().await.ok()?;
        list.into_iter()
            .find(|m| &m.node == node)
            .map(|m| m.address)
    }

    /// Replaces the view with a fresh poll; returns the previous one.
    fn replace(&self, now: BTreeMap<NodeId, String>) -> BTreeMap<NodeId, String> {
        std::mem::replace(
            &mut *self.members.write().unwrap_or_else(|p| p.into_inner()),
            now,
        )
    }
}

/// What changed between two polls, as seen by `me` (which is never reported).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Diff {
    pub(super) ups: Vec<Member>,
    /// Nodes gone since the last poll, with the address they had.
    pub(super) downs: Vec<(NodeId, String)>,
}

/// The changes from `prev` to `now`, leaving out `me`.
pub(super) fn diff(
    prev: &BTreeMap<NodeId, String>,
    now: &BTreeMap<NodeId, String>,
    me: &NodeId,
) -> Diff {
    Diff {
        ups: now
            .iter()
            .filter(|(n, _)| !prev.contains_key(*n) && *n != me)
            .map(|(node, address)| Member {
                node: node.clone(),
                address: address.clone(),
            })
            .collect(),
        downs: prev
            .iter()
            .filter(|(n, _)| !now.contains_key(*n) && *n != me)
            .map(|(n, a)| (n.clone(), a.clone()))
            .collect(),
    }
}

impl Node {
    /// Polls the member list and reacts to changes: events out, clients of dead peers dropped,
    /// reaps of the dead and the periodic sweep started.
    pub(super) async fn member_loop(self: Arc<Self>) {
        let mut stop = self.life.stop.subscribe();
        let mut tick = tokio::time::interval(self.config.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sweep: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let list = match self.membership.members().await {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "could not read members");
                    continue;
                }
            };
            let now: BTreeMap<NodeId, String> =
                list.into_iter().map(|m| (m.node, m.address)).collect();
            let prev = self.view.replace(now.clone());
            let me = self.me().node.clone();
            let changes = diff(&prev, &now, &me);
            let others_before = prev.keys().filter(|n| **n != me).count();
            for up in changes.ups {
                debug!(node = %up.node, "member up");
                let _ = self.view.events.send(MemberEvent::Up(up));
            }
            let mut downs = Vec::with_capacity(changes.downs.len());
            for (node, address) in changes.downs {
                info!(node = %node, "member down");
                self.peers.drop_client(&address);
                let _ = self.view.events.send(MemberEvent::Down(node.clone()));
                downs.push(node);
            }
            if !self.reaper.enabled {
                continue;
            }
            if !downs.is_empty() {
                let me = self.clone();
                tokio::spawn(async move { me.reap_downs(downs, others_before).await });
            }
            if last_sweep.is_none_or(|t| t.elapsed() >= self.config.sweep_interval) {
                last_sweep = Some(Instant::now());
                let me = self.clone();
                tokio::spawn(async move { me.sweep().await });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(nodes: &[(&str, u64)]) -> BTreeMap<NodeId, String> {
        nodes
            .iter()
            .map(|(n, i)| (NodeId::new(n, *i).unwrap(), format!("{n}:{i}")))
            .collect()
    }

    #[test]
    fn a_diff_reports_arrivals_and_departures_but_never_this_node() {
        let me = NodeId::new("a", 1).unwrap();
        let prev = map(&[("b", 1), ("c", 1)]);
        let now = map(&[("a", 1), ("c", 1), ("d", 1)]);
        let d = diff(&prev, &now, &me);
        assert_eq!(
            d.ups.iter().map(|m| m.node.to_string()).collect::<Vec<_>>(),
            ["d#1"]
        );
        assert_eq!(d.downs, [(NodeId::new("b", 1).unwrap(), "b:1".to_string())]);
        // This node vanishing from a poll (its lease in doubt) is not a departure to reap.
        assert_eq!(diff(&now, &prev, &me).downs.len(), 1);
    }

    #[test]
    fn a_restarted_node_is_a_departure_and_an_arrival() {
        let me = NodeId::new("a", 1).unwrap();
        let d = diff(&map(&[("b", 1)]), &map(&[("b", 2)]), &me);
        assert_eq!(d.ups.len(), 1);
        assert_eq!(d.downs.len(), 1);
        assert_ne!(d.ups[0].node, d.downs[0].0);
    }

    #[test]
    fn no_change_is_an_empty_diff() {
        let me = NodeId::new("a", 1).unwrap();
        let m = map(&[("a", 1), ("b", 1)]);
        assert_eq!(diff(&m, &m, &me), Diff::default());
    }
}
