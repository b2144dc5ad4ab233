//! Tracks, per lease and route, the first snapshot version that carried its
//! current routing content, so `Routed` turns true exactly when every connected
//! proxy has acknowledged that version or a later one. Pure.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use keyway_snapshot::pb;
use prost::Message;

use crate::key::{LeaseKey, ObjKey};
use crate::world::RoutedInfo;

type Key = ObjKey;

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

/// See the module docs.
#[derive(Debug, Default)]
pub struct RoutedTracker {
    since: HashMap<Key, (u64, pb::Version)>,
}

fn digest<M: Message>(m: &M) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    m.encode_to_vec().hash(&mut h);
    h.finish()
}

fn order(v: &pb::Version) -> (u64, u64) {
    (v.epoch, v.version)
}

impl RoutedTracker {
    /// Records a published snapshot (its `version` must be set).
    pub fn observe(&mut self, snap: &pb::Snapshot) {
        let Some(v) = snap.version else { return };
        let mut next: HashMap<Key, (u64, pb::Version)> =
            HashMap::with_capacity(snap.leases.len() + snap.routes.len());
        let entries = snap
            .leases
            .iter()
            .map(|l| {
                (
                    ObjKey::Lease(LeaseKey::new(&l.namespace, &l.name)),
                    digest(l),
                )
            })
            .chain(snap.routes.iter().map(|r| {
                (
                    ObjKey::Route(LeaseKey::new(&r.namespace, &r.name)),
                    digest(r),
                )
            }));
        for (key, d) in entries {
            let since = match self.since.get(&key) {
                Some((old, since)) if *old == d => *since,
                _ => v,
            };
            next.insert(key, (d, since));
        }
        self.since = next;
    }

    /// Routed state of one object given the subscribers' acknowledgements.
    pub fn info(&self, key: &ObjKey, subs: &[Ack]) -> RoutedInfo {
        let Some((_, since)) = self.since.get(key) else {
            return RoutedInfo::default();
        };
        let connected: Vec<&Ack> = subs.iter().filter(|s| s.connected).collect();
        let acked = connected
            .iter()
            .filter(|s| s.acked.as_ref().is_some_and(|a| order(a) >= order(since)))
            .count();
        RoutedInfo {
            subscribers: connected.len(),
            acked,
            since: Some(format!("e{}.v{}", since.epoch, since.version)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str) -> ObjKey {
        ObjKey::Lease(LeaseKey::new("default", name))
    }

    fn snap(v: u64, ips: &[(&str, &str)]) -> pb::Snapshot {
        pb::Snapshot {
            version: Some(pb::Version {
                epoch: 1,
                version: v,
            }),
            leases: ips
                .iter()
                .map(|(name, ip)| pb::Lease {
                    namespace: "default".into(),
                    name: (*name).into(),
                    ip: (*ip).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn since_moves_only_when_content_changes() {
        let mut t = RoutedTracker::default();
        t.observe(&snap(1, &[("a", "127.0.10.1"), ("b", "127.0.10.2")]));
        t.observe(&snap(2, &[("a", "127.0.10.1"), ("b", "127.0.10.1")]));
        let acked_v1 = [Ack {
            connected: true,
            acked: Some(pb::Version {
                epoch: 1,
                version: 1,
            }),
        }];
        let a = t.info(&lease("a"), &acked_v1);
        assert_eq!((a.acked, a.subscribers), (1, 1));
        let b = t.info(&lease("b"), &acked_v1);
        assert_eq!((b.acked, b.subscribers), (0, 1));
        assert_eq!(b.since.as_deref(), Some("e1.v2"));
        // Disconnected subscribers do not count.
        let gone = [Ack {
            connected: false,
            acked: None,
        }];
        assert_eq!(t.info(&lease("b"), &gone).subscribers, 0);
        // Objects that left the snapshot are not routed.
        t.observe(&snap(3, &[("a", "127.0.10.1")]));
        assert_eq!(t.info(&lease("b"), &acked_v1).since, None);
    }
}
