//! Tracks, per lease and route, the first snapshot version that carried its
//! current routing content, so `Routed` turns true exactly when every counted
//! proxy has acknowledged that version or a later one. Pure.
//!
//! Counted are the connected subscribers that serve some version of this
//! writer (they ACKed one, or their hello named one): a proxy that has not
//! received anything yet does not hold every object back, and a proxy
//! connecting or leaving changes the `Routed` condition only of the objects
//! still in flight (see [`RoutedTracker::moved`]). That holds for the last
//! proxy leaving too: while none counts, the versions the last ones had
//! acknowledged (the floor) still decide, so a lone proxy restarting costs
//! O(objects in flight), not a rewrite of every status. The one step that
//! looks at every object is the first acknowledgement after the operator
//! starts (versions are renumbered then; statuses whose content did not
//! change stay as they were, so it costs no writes). Everything else here is
//! O(change): [`RoutedTracker::observe`] takes the published delta.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;

use keyway_snapshot::pb;

use crate::key::{LeaseKey, ObjKey};
use crate::world::{Before, RoutedInfo};

/// A subscriber as the tracker needs it.
#[derive(Clone, Debug)]
pub struct Ack {
    /// Connected now (disconnected subscribers do not hold `Routed` back).
    pub connected: bool,
    /// The version it acknowledged last.
    pub acked: Option<pb::Version>,
}

/// The subscribers as the tracker needs them.
pub fn acks(subs: &[keyway_snapshot::server::SubscriberStatus]) -> Vec<Ack> {
    subs.iter()
        .map(|s| Ack {
            connected: s.connected,
            acked: s.acked,
        })
        .collect()
}

type Order = (u64, u64);

fn order(v: &pb::Version) -> Order {
    (v.epoch, v.version)
}

/// The acknowledged versions of the counted subscribers, sorted.
fn counted(subs: &[Ack]) -> Vec<Order> {
    let mut v: Vec<Order> = subs
        .iter()
        .filter(|s| s.connected)
        .filter_map(|s| s.acked.as_ref().map(order))
        .collect();
    v.sort_unstable();
    v
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct RoutedTracker {
    since: HashMap<ObjKey, Order>,
    /// The same, by version, for "who is in flight between these versions".
    by_since: BTreeMap<Order, HashSet<ObjKey>>,
    /// The counted acknowledgements [`RoutedTracker::moved`] last saw.
    view: Option<Vec<Order>>,
    /// The lowest of them, the last time any subscriber counted: what every
    /// proxy then had applied.
    floor: Option<Order>,
    /// The first version observed (what the operator published at start):
    /// objects still current since it are unchanged since the start.
    first: Option<Order>,
}

fn lease_key(r: &pb::ObjectRef) -> LeaseKey {
    LeaseKey::new(&r.namespace, &r.name)
}

impl RoutedTracker {
    /// Records a published change (its `version` must be set): what it
    /// upserts is current since that version, what it removes is no longer
    /// published. The publisher lists only real changes. Returns the objects
    /// it upserted or removed: their `Routed` now follows from this version.
    pub fn observe(&mut self, change: &pb::SnapshotDelta) -> Vec<ObjKey> {
        let Some(v) = change.version.as_ref().map(order) else {
            return Vec::new();
        };
        let mut moved = Vec::new();
        self.first.get_or_insert(v);
        let upserted = change
            .upserted_leases
            .iter()
            .map(|l| ObjKey::Lease(LeaseKey::new(&l.namespace, &l.name)))
            .chain(
                change
                    .upserted_routes
                    .iter()
                    .map(|r| ObjKey::Route(LeaseKey::new(&r.namespace, &r.name))),
            );
        for key in upserted {
            self.forget(&key);
            self.by_since.entry(v).or_default().insert(key.clone());
            self.since.insert(key.clone(), v);
            moved.push(key);
        }
        let removed = change
            .removed_leases
            .iter()
            .map(|r| ObjKey::Lease(lease_key(r)))
            .chain(
                change
                    .removed_routes
                    .iter()
                    .map(|r| ObjKey::Route(lease_key(r))),
            );
        for key in removed {
            self.forget(&key);
            moved.push(key);
        }
        moved
    }

    fn forget(&mut self, key: &ObjKey) {
        if let Some(old) = self.since.remove(key)
            && let Some(set) = self.by_since.get_mut(&old)
        {
            set.remove(key);
            if set.is_empty() {
                self.by_since.remove(&old);
            }
        }
    }

    /// The objects whose `Routed` condition may differ from what it was when
    /// this was last called (every published object the first time): those
    /// whose version lies above the lowest acknowledgement either time (the
    /// floor standing in while none counts), and everything when the first
    /// acknowledgement since the start arrives.
    pub fn moved(&mut self, subs: &[Ack]) -> Vec<ObjKey> {
        let now = counted(subs);
        let old = self.view.replace(now.clone());
        let old_floor = self.floor;
        if let Some(low) = now.first() {
            self.floor = Some(*low);
        }
        let all = || self.since.keys().cloned().collect();
        let Some(old) = old else { return all() };
        if old == now {
            return Vec::new();
        }
        let old_low = old.first().copied().or(old_floor);
        let new_low = now.first().copied().or(self.floor);
        match (old_low, new_low) {
            (Some(a), Some(b)) => self
                .by_since
                .range((Bound::Excluded(a.min(b)), Bound::Unbounded))
                .flat_map(|(_, keys)| keys.iter().cloned())
                .collect(),
            (None, None) => Vec::new(),
            _ => all(),
        }
    }

    /// Routed state of one object given the subscribers' acknowledgements.
    pub fn info(&self, key: &ObjKey, subs: &[Ack]) -> RoutedInfo {
        let Some(since) = self.since.get(key) else {
            return RoutedInfo::default();
        };
        let counted = counted(subs);
        let before = match self.floor {
            None if self.first == Some(*since) => Before::Nothing,
            None => Before::NotApplied,
            Some(floor) if floor >= *since => Before::Applied,
            Some(_) => Before::NotApplied,
        };
        RoutedInfo {
            subscribers: counted.len(),
            acked: counted.iter().filter(|a| *a >= since).count(),
            since: Some(format!("e{}.v{}", since.0, since.1)),
            before,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str) -> ObjKey {
        ObjKey::Lease(LeaseKey::new("default", name))
    }

    fn v(n: u64) -> pb::Version {
        pb::Version::new(1, n)
    }

    fn change(n: u64, upserted: &[&str], removed: &[&str]) -> pb::SnapshotDelta {
        pb::SnapshotDelta {
            version: Some(v(n)),
            upserted_leases: upserted
                .iter()
                .map(|name| pb::Lease {
                    namespace: "default".into(),
                    name: (*name).into(),
                    ..Default::default()
                })
                .collect(),
            removed_leases: removed
                .iter()
                .map(|name| pb::ObjectRef {
                    namespace: "default".into(),
                    name: (*name).into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn acked(versions: &[Option<u64>]) -> Vec<Ack> {
        versions
            .iter()
            .map(|a| Ack {
                connected: true,
                acked: a.map(v),
            })
            .collect()
    }

    fn sorted(mut keys: Vec<ObjKey>) -> Vec<ObjKey> {
        keys.sort();
        keys
    }

    #[test]
    fn since_moves_only_when_content_changes() {
        let mut t = RoutedTracker::default();
        t.observe(&change(1, &["a", "b"], &[]));
        t.observe(&change(2, &["b"], &[]));
        let acked_v1 = acked(&[Some(1)]);
        let a = t.info(&lease("a"), &acked_v1);
        assert_eq!((a.acked, a.subscribers), (1, 1));
        let b = t.info(&lease("b"), &acked_v1);
        assert_eq!((b.acked, b.subscribers), (0, 1));
        assert_eq!(b.since.as_deref(), Some("e1.v2"));
        // Disconnected subscribers, and connected ones that serve nothing of
        // ours yet, do not count.
        let gone = [Ack {
            connected: false,
            acked: Some(v(1)),
        }];
        assert_eq!(t.info(&lease("b"), &gone).subscribers, 0);
        assert_eq!(t.info(&lease("b"), &acked(&[None])).subscribers, 0);
        // Objects that left the snapshot are not routed.
        t.observe(&change(3, &[], &["b"]));
        assert_eq!(t.info(&lease("b"), &acked_v1).since, None);
    }

    #[test]
    fn only_objects_in_flight_move_when_acks_change() {
        let mut t = RoutedTracker::default();
        t.observe(&change(1, &["a", "b"], &[]));
        t.observe(&change(2, &["b"], &[]));
        // First look: everything.
        assert_eq!(
            sorted(t.moved(&acked(&[Some(1)]))),
            vec![lease("a"), lease("b")]
        );
        assert_eq!(t.moved(&acked(&[Some(1)])), vec![], "nothing new");
        // The proxy acks v2: only b (published at v2) moves.
        assert_eq!(t.moved(&acked(&[Some(2)])), vec![lease("b")]);
        // A second proxy that serves nothing of ours yet changes nothing.
        assert_eq!(t.moved(&acked(&[Some(2), None])), vec![]);
        // It comes in at v1: b is in flight again, a is not.
        assert_eq!(t.moved(&acked(&[Some(2), Some(1)])), vec![lease("b")]);
        // Both leave: only b, in flight for the one at v1, moves (the floor,
        // v1, still covers a).
        assert_eq!(t.moved(&[]), vec![lease("b")]);
        assert_eq!(t.info(&lease("a"), &[]).before, Before::Applied);
        assert_eq!(t.info(&lease("b"), &[]).before, Before::NotApplied);
        // A proxy comes back at v2: b, above the floor, moves; a does not.
        assert_eq!(t.moved(&acked(&[Some(2)])), vec![lease("b")]);
    }

    /// A lone proxy restarting (gone, then back with the version it held)
    /// moves nothing when nothing changed meanwhile, and only what changed
    /// when something did.
    #[test]
    fn a_lone_proxy_restarting_moves_only_what_changed_meanwhile() {
        let mut t = RoutedTracker::default();
        t.observe(&change(1, &["a", "b", "c"], &[]));
        let _ = t.moved(&acked(&[Some(1)]));
        assert_eq!(t.moved(&[]), vec![], "it left; everything was applied");
        t.observe(&change(2, &["c"], &[]));
        let c = t.info(&lease("c"), &[]);
        assert_eq!((c.subscribers, c.before), (0, Before::NotApplied));
        assert_eq!(t.moved(&acked(&[Some(1)])), vec![lease("c")]);
        assert_eq!(t.moved(&acked(&[Some(2)])), vec![lease("c")]);
    }

    /// Before any acknowledgement since the start, objects know nothing of
    /// the proxies; the first one moves everything (versions were
    /// renumbered), and the proxies coming and going later do not.
    #[test]
    fn the_first_acknowledgement_since_the_start_moves_everything() {
        let mut t = RoutedTracker::default();
        t.observe(&change(1, &["a", "b"], &[]));
        assert_eq!(sorted(t.moved(&[])), vec![lease("a"), lease("b")]);
        assert_eq!(t.info(&lease("a"), &[]).before, Before::Nothing);
        assert_eq!(t.moved(&[]), vec![]);
        // Changed since the start: nothing to keep.
        t.observe(&change(2, &["b"], &[]));
        assert_eq!(t.info(&lease("b"), &[]).before, Before::NotApplied);
        assert_eq!(
            sorted(t.moved(&acked(&[Some(1)]))),
            vec![lease("a"), lease("b")]
        );
        assert_eq!(t.moved(&[]), vec![lease("b")], "b, above the floor");
    }
}
