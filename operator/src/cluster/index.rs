//! What the leader knows: the pure [`World`] plus which version of each
//! Kubernetes object it has admitted, and the statuses that follow. No I/O;
//! the controllers feed it objects and the status round reads plans out.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};

use k8s_openapi::jiff::Timestamp;
use keyway_crds::{IPPoolStatus, SshRouteStatus, VMLeaseStatus};
use kube::api::DynamicObject;
use serde::Serialize;

use super::convert;
use keyway_core::routed::{Ack, RoutedTracker};
use keyway_core::world::{Dirty, Notice, Settings, World};
use keyway_core::{Kind, ObjKey};
use keyway_snapshot::pb;

/// Objects one plan derives statuses for, at most. The first acknowledgement
/// after a start may move every object's `Routed` (100,000 statuses take
/// about 2 s to derive and diff): planned in batches, edits are admitted and
/// published between them instead of waiting.
pub const PLAN_BATCH: usize = 2_000;

/// The key of a watched object of `kind` (`None` without a name).
pub fn key_of(kind: Kind, obj: &DynamicObject) -> Option<ObjKey> {
    let name = obj.metadata.name.as_deref()?;
    Some(ObjKey::new(
        kind,
        obj.metadata.namespace.as_deref().unwrap_or(""),
        name,
    ))
}

/// True when the object is on its way out (it counts as gone).
pub fn is_deleting(obj: &DynamicObject) -> bool {
    obj.metadata.deletion_timestamp.is_some()
}

/// What identifies the admitted version: uid plus spec. Status is ours and
/// does not count (a hand-edited status is reverted, not admitted).
fn fingerprint(obj: &DynamicObject) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    obj.metadata.uid.hash(&mut h);
    obj.data.get("spec").map(|s| s.to_string()).hash(&mut h);
    h.finish()
}

/// One status the leader should write.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusWrite {
    /// Which object.
    pub key: ObjKey,
    /// The full status (server-side apply owns every field it sets).
    pub status: serde_json::Value,
}

/// Objects as last seen through the watches, by key.
pub type Observed = HashMap<ObjKey, std::sync::Arc<DynamicObject>>;

/// See the module docs.
pub struct Index {
    /// The pure core; changed only through [`Index::apply`] and
    /// [`Index::remove`].
    world: World,
    /// When each object's routing content was first published.
    tracker: RoutedTracker,
    applied: HashMap<ObjKey, u64>,
    parsed: HashMap<ObjKey, (Option<String>, Parsed)>,
    /// Objects whose entries changed but are not in a served snapshot yet.
    unpublished: Dirty,
    /// Objects whose status the next [`Index::plan`] derives again.
    to_plan: BTreeSet<ObjKey>,
}

impl Index {
    /// Rebuilds from everything listed at start, assigned-first (every lease
    /// keeps the IP its status records before anything new is allocated).
    /// Objects being deleted are left out.
    pub fn restore(
        settings: Settings,
        pools: &[DynamicObject],
        leases: &[DynamicObject],
        routes: &[DynamicObject],
    ) -> Self {
        let live = |o: &&DynamicObject| !is_deleting(o) && o.metadata.name.is_some();
        let mut applied = HashMap::new();
        for (kind, list) in Kind::ALL.into_iter().zip([pools, leases, routes]) {
            for o in list.iter().filter(live) {
                if let Some(k) = key_of(kind, o) {
                    applied.insert(k, fingerprint(o));
                }
            }
        }
        let world = World::restore(
            settings,
            pools.iter().filter(live).map(convert::pool).collect(),
            leases.iter().filter(live).map(convert::lease).collect(),
            routes.iter().filter(live).map(convert::route).collect(),
        );
        Index {
            world,
            tracker: RoutedTracker::default(),
            applied,
            parsed: HashMap::new(),
            unpublished: Dirty::default(),
            to_plan: BTreeSet::new(),
        }
    }

    /// Admits an object of `kind` unless this exact version was admitted
    /// already. Returns whether the world changed.
    pub fn apply(&mut self, kind: Kind, obj: &DynamicObject) -> bool {
        let Some(key) = key_of(kind, obj) else {
            return false;
        };
        let fp = fingerprint(obj);
        if self.applied.get(&key) == Some(&fp) {
            return false;
        }
        // A new object under an old name (deleted behind our back, recreated):
        // the old one goes first so nothing of it carries over.
        if let ObjKey::Lease(k) = &key {
            let replaced = self
                .world
                .lease(k)
                .is_some_and(|old| obj.metadata.uid.as_deref().is_some_and(|u| u != old.uid));
            if replaced {
                self.world.delete_lease(k);
            }
        }
        match &key {
            ObjKey::Pool(_) => self.world.apply_pool(convert::pool(obj)),
            ObjKey::Lease(_) => self.world.apply_lease(convert::lease(obj)),
            ObjKey::Route(_) => self.world.apply_route(convert::route(obj)),
        }
        self.applied.insert(key, fp);
        true
    }

    /// Takes what the world says changed: to publish, and to plan.
    fn absorb_world(&mut self) {
        let dirty = self.world.take_dirty();
        self.to_plan
            .extend(dirty.pools.iter().cloned().map(ObjKey::Pool));
        self.to_plan
            .extend(dirty.leases.iter().cloned().map(ObjKey::Lease));
        self.to_plan
            .extend(dirty.routes.iter().cloned().map(ObjKey::Route));
        self.unpublished.absorb(dirty);
    }

    /// The world (read-only: changes go through `apply` and `remove`).
    pub fn world(&self) -> &World {
        &self.world
    }

    /// The snapshot change to publish: every object whose entry may have
    /// changed since the last [`Index::published`] (O(change)); `None` when
    /// there is none, unless `force` (nothing is published yet).
    pub fn snapshot_change(&mut self, now_ms: i64, force: bool) -> Option<pb::SnapshotDelta> {
        self.absorb_world();
        if self.unpublished.is_empty() && !force {
            return None;
        }
        Some(self.world.snapshot_delta(&self.unpublished, now_ms))
    }

    /// Records that the last [`Index::snapshot_change`] is served; `change`
    /// is what it really changed (the publisher's view), for `Routed`.
    pub fn published(&mut self, change: Option<&pb::SnapshotDelta>) {
        // What it carried: their `Routed` follows from the version that now
        // carries them. A plan made before this publish (or before a failed
        // one) saw an older one, and with no proxy connected nothing else
        // would move them.
        if let Some(c) = change {
            self.to_plan.extend(self.tracker.observe(c));
        }
        self.unpublished = Dirty::default();
    }

    /// Removes an object (lease cleanup, or an object seen gone).
    pub fn remove(&mut self, key: &ObjKey) -> bool {
        if self.applied.remove(key).is_none() {
            return false;
        }
        match key {
            ObjKey::Pool(n) => self.world.delete_pool(n),
            ObjKey::Lease(k) => self.world.delete_lease(k),
            ObjKey::Route(k) => self.world.delete_route(k),
        }
        self.parsed.remove(key);
        true
    }

    /// Removes every admitted object not in `present` (deleted without our
    /// finalizer running: pools and routes have none, and a finalizer can be
    /// stripped by hand) for which `gone` still holds when asked (the caller
    /// checks the watch again: an object recreated under the same name since
    /// `present` was taken stays). Returns how many went.
    pub fn sweep(&mut self, present: &HashSet<ObjKey>, gone: impl Fn(&ObjKey) -> bool) -> usize {
        let missing: Vec<ObjKey> = self
            .applied
            .keys()
            .filter(|k| !present.contains(k))
            .cloned()
            .collect();
        missing
            .iter()
            .filter(|k| gone(k))
            .filter(|k| self.remove(k))
            .count()
    }

    /// Objects admitted, by kind.
    pub fn counts(&self) -> HashMap<Kind, usize> {
        let mut m = HashMap::new();
        for k in self.applied.keys() {
            *m.entry(k.kind()).or_default() += 1;
        }
        m
    }

    /// Occupancy of every admitted pool.
    pub fn pool_stats(&self) -> Vec<(String, keyway_core::allocator::PoolStats)> {
        let mut out: Vec<_> = self
            .applied
            .keys()
            .filter_map(|k| match k {
                ObjKey::Pool(n) => Some((n.clone(), self.world.pool_stats(n)?)),
                _ => None,
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Whether something changed that is not published yet.
    pub fn is_dirty(&self) -> bool {
        self.world.has_changes() || !self.unpublished.is_empty()
    }

    /// Plans `key` again next round (its status write failed).
    pub fn replan(&mut self, key: ObjKey) {
        self.to_plan.insert(key);
    }

    /// Whether objects wait to be planned (more than one plan takes, see
    /// [`PLAN_BATCH`]): the caller runs another round soon.
    pub fn plan_pending(&self) -> bool {
        !self.to_plan.is_empty()
    }

    /// World notices (for Events).
    pub fn take_notices(&mut self) -> Vec<Notice> {
        self.world.take_notices()
    }

    /// The statuses that differ from what `observed` shows, derived only for
    /// objects that may have changed: the world's dirty objects, those whose
    /// `Routed` the acknowledgements moved, those planned again after a
    /// failed write, and those whose observed version changed since they
    /// were last planned (a write landing, a hand edit to revert, an object
    /// the watch shows for the first time). `acks` are the subscribers'
    /// acknowledgements. Objects the watch has not shown yet are skipped
    /// (their status would 404) until it does.
    pub fn plan(&mut self, observed: &Observed, acks: &[Ack], now: Timestamp) -> Vec<StatusWrite> {
        self.plan_changed(observed.keys(), |k| observed.get(k).cloned(), acks, now)
    }

    /// [`Index::plan`] when only the objects in `seen` may look different
    /// through the watches since the last plan (the watch events of a round:
    /// O(change)); `lookup` finds any object as the watch shows it now.
    pub fn plan_changed<'a>(
        &mut self,
        seen: impl IntoIterator<Item = &'a ObjKey>,
        lookup: impl Fn(&ObjKey) -> Option<std::sync::Arc<DynamicObject>>,
        acks: &[Ack],
        now: Timestamp,
    ) -> Vec<StatusWrite> {
        self.absorb_world();
        self.to_plan.extend(self.tracker.moved(acks));
        // One string comparison per object, no status derived.
        for key in seen {
            if !self.applied.contains_key(key) {
                continue;
            }
            let Some(obs) = lookup(key) else {
                continue;
            };
            let parsed = self.parsed.get(key).map(|(rv, _)| rv);
            if parsed != Some(&obs.metadata.resource_version) {
                self.to_plan.insert(key.clone());
            }
        }
        let mut out = Vec::new();
        // At most a batch per call: the caller holds the index lock, which
        // admitting and publishing an edit also take.
        let batch: Vec<ObjKey> = (0..PLAN_BATCH)
            .map_while(|_| self.to_plan.pop_first())
            .collect();
        for key in batch {
            if !self.applied.contains_key(&key) {
                continue;
            }
            let Some(obs) = lookup(&key) else {
                continue;
            };
            let rv = obs.metadata.resource_version.clone();
            let prev = match self.parsed.get(&key) {
                Some((seen, p)) if rv.is_some() && *seen == rv => p,
                _ => {
                    let p = match &key {
                        ObjKey::Pool(_) => Parsed::Pool(convert::pool_status(&obs)),
                        ObjKey::Lease(_) => Parsed::Lease(convert::lease_status(&obs)),
                        ObjKey::Route(_) => Parsed::Route(convert::route_status(&obs)),
                    };
                    &self
                        .parsed
                        .entry(key.clone())
                        .insert_entry((rv, p))
                        .into_mut()
                        .1
                }
            };
            let write = match (&key, prev) {
                (ObjKey::Pool(name), Parsed::Pool(prev)) => self
                    .world
                    .pool_status(name, prev.as_ref(), now)
                    .filter(|st| Some(st) != prev.as_ref())
                    .and_then(|st| json(&st)),
                (ObjKey::Lease(k), Parsed::Lease(prev)) => {
                    let routed = self.tracker.info(&key, acks);
                    self.world
                        .lease_status(k, prev.as_ref(), &routed, now)
                        .filter(|st| Some(st) != prev.as_ref())
                        .and_then(|st| json(&st))
                }
                (ObjKey::Route(k), Parsed::Route(prev)) => {
                    let routed = self.tracker.info(&key, acks);
                    self.world
                        .route_status(k, prev.as_ref(), &routed, now)
                        .filter(|st| Some(st) != prev.as_ref())
                        .and_then(|st| json(&st))
                }
                _ => None,
            };
            if let Some(status) = write {
                out.push(StatusWrite { key, status });
            }
        }
        out
    }
}

/// An observed status, parsed once per resourceVersion.
enum Parsed {
    Pool(Option<IPPoolStatus>),
    Lease(Option<VMLeaseStatus>),
    Route(Option<SshRouteStatus>),
}

fn json<T: Serialize>(v: &T) -> Option<serde_json::Value> {
    serde_json::to_value(v).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use keyway_core::LeaseKey;
    use serde_json::json;

    fn settings() -> Settings {
        Settings {
            public_ssh_port: 22,
            relay_ca_public_key:
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGd1c2tqYWhzZGZsa2phc2RsZmtqYXNkbGZrajEyMzQ1"
                    .into(),
            relay_cert_validity_secs: 300,
        }
    }

    fn pool(addrs: &[&str]) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "keyway.dev/v1alpha1", "kind": "IPPool",
            "metadata": {"name": "p", "uid": "pool-uid", "generation": 1},
            "spec": {"addresses": addrs}
        }))
        .unwrap()
    }

    fn lease(name: &str, user: &str, secs: u32, ip: Option<&str>) -> DynamicObject {
        let mut v = json!({
            "apiVersion": "keyway.dev/v1alpha1", "kind": "VMLease",
            "metadata": {"name": name, "namespace": "t", "uid": format!("uid-{name}"), "generation": 1,
                         "creationTimestamp": format!("2026-01-01T00:00:{secs:02}Z"), "resourceVersion": "1"},
            "spec": {"user": user, "poolRef": "p", "target": {"address": "h:22"},
                     "accessPublicKeys": ["0000000000000000000000000000000000000000000000000000000000000001"]}
        });
        if let Some(ip) = ip {
            v["status"] = json!({"ip": ip});
        }
        serde_json::from_value(v).unwrap()
    }

    fn observed(objs: &[(Kind, &DynamicObject)]) -> Observed {
        objs.iter()
            .map(|(k, o)| (key_of(*k, o).unwrap(), std::sync::Arc::new((*o).clone())))
            .collect()
    }

    #[test]
    fn restore_keeps_recorded_ips_and_the_older_lease_wins_a_duplicate() {
        let p = pool(&["10.0.0.1", "10.0.0.2"]);
        let a = lease("a", "u", 1, Some("10.0.0.2"));
        let b = lease("b", "u", 2, Some("10.0.0.2"));
        let idx = Index::restore(settings(), &[p], &[a, b], &[]);
        let key = |n: &str| LeaseKey {
            namespace: "t".into(),
            name: n.into(),
        };
        assert_eq!(
            idx.world().lease_ip(&key("a")),
            Some("10.0.0.2".parse().unwrap())
        );
        assert_eq!(
            idx.world().lease_ip(&key("b")),
            Some("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn the_same_version_is_admitted_once_and_sweep_removes_the_gone() {
        let p = pool(&["10.0.0.1"]);
        let a = lease("a", "u", 1, None);
        let mut idx = Index::restore(settings(), std::slice::from_ref(&p), &[], &[]);
        assert!(idx.snapshot_change(0, false).is_some());
        idx.published(None);
        assert!(idx.snapshot_change(0, false).is_none());
        assert!(idx.apply(Kind::Lease, &a));
        assert!(
            !idx.apply(Kind::Lease, &a),
            "an unchanged object is not re-admitted"
        );
        let mut edited = a.clone();
        edited.data["spec"]["settled"] = json!(true);
        assert!(idx.apply(Kind::Lease, &edited));
        let present: HashSet<ObjKey> = [key_of(Kind::Pool, &p).unwrap()].into();
        assert_eq!(idx.sweep(&present, |_| true), 1);
        assert_eq!(idx.counts().get(&Kind::Lease), None);
    }

    /// A pool of one address and one lease in it, restored.
    fn one_pool_one_lease() -> (DynamicObject, DynamicObject, Index) {
        let p = pool(&["10.0.0.1"]);
        let a = lease("a", "u", 1, None);
        let idx = Index::restore(
            settings(),
            std::slice::from_ref(&p),
            std::slice::from_ref(&a),
            &[],
        );
        (p, a, idx)
    }

    #[test]
    fn plan_writes_only_what_differs_from_the_observed_status() {
        let (p, a, mut idx) = one_pool_one_lease();
        let now = Timestamp::now();
        let obs = observed(&[(Kind::Pool, &p), (Kind::Lease, &a)]);
        let writes = idx.plan(&obs, &[], now);
        assert_eq!(writes.len(), 2, "{writes:?}");
        let lease_status = &writes
            .iter()
            .find(|w| w.key.kind() == Kind::Lease)
            .unwrap()
            .status;
        assert_eq!(lease_status["ip"], "10.0.0.1");
        assert_eq!(lease_status["phase"], "Ready");
        // Once the watch shows what was written, nothing is written again.
        let mut a2 = a.clone();
        a2.data["status"] = lease_status.clone();
        a2.metadata.resource_version = Some("2".into());
        let mut p2 = p.clone();
        p2.data["status"] = writes
            .iter()
            .find(|w| w.key.kind() == Kind::Pool)
            .unwrap()
            .status
            .clone();
        let obs = observed(&[(Kind::Pool, &p2), (Kind::Lease, &a2)]);
        assert_eq!(idx.plan(&obs, &[], now), vec![]);
        // Objects the watch has not shown are not written.
        assert_eq!(idx.plan(&Observed::new(), &[], now), vec![]);
    }

    /// The rule for cluster mode: a watch event for one lease leads
    /// to one status patch and one delta, however many leases there are.
    #[test]
    fn one_lease_event_is_one_status_write_and_a_one_lease_delta() {
        let p = pool(&["10.0.0.1", "10.0.0.2"]);
        let leases: Vec<DynamicObject> = (0..200)
            .map(|i| lease(&format!("l{i}"), &format!("u{i}"), i % 60, None))
            .collect();
        let mut idx = Index::restore(settings(), std::slice::from_ref(&p), &leases, &[]);
        let first = idx.snapshot_change(0, true).unwrap();
        assert_eq!(first.upserted_leases.len(), 200);
        idx.published(Some(&first));
        // Settle the statuses: write each planned status back as observed.
        let now = Timestamp::now();
        let mut objs: Vec<(Kind, DynamicObject)> = vec![(Kind::Pool, p.clone())];
        objs.extend(leases.iter().map(|l| (Kind::Lease, l.clone())));
        let mut obs = observed(&objs.iter().map(|(k, o)| (*k, o)).collect::<Vec<_>>());
        for w in idx.plan(&obs, &[], now) {
            let o = obs.get_mut(&w.key).unwrap();
            let mut o2 = (**o).clone();
            o2.data["status"] = w.status;
            o2.metadata.resource_version = Some("2".into());
            *o = std::sync::Arc::new(o2);
        }
        assert_eq!(idx.plan(&obs, &[], now), vec![], "settled");
        // One lease gets a new target.
        let mut edited = (*obs[&ObjKey::new(Kind::Lease, "t", "l7")]).clone();
        edited.data["spec"]["target"] = json!({"address": "h2:22"});
        edited.metadata.resource_version = Some("3".into());
        edited.metadata.generation = Some(2);
        assert!(idx.apply(Kind::Lease, &edited));
        let change = idx.snapshot_change(0, false).unwrap();
        assert_eq!(change.upserted_leases.len(), 1, "one entry proposed");
        assert!(change.removed_leases.is_empty() && change.upserted_routes.is_empty());
        idx.published(Some(&change));
        obs.insert(
            ObjKey::new(Kind::Lease, "t", "l7"),
            std::sync::Arc::new(edited),
        );
        let writes = idx.plan(&obs, &[], now);
        assert_eq!(
            writes.iter().map(|w| w.key.to_string()).collect::<Vec<_>>(),
            ["VMLease t/l7"]
        );
    }

    /// A plan derives at most a batch of statuses (it runs under the index
    /// lock an edit's admission also takes); the rest wait for the next.
    #[test]
    fn a_plan_takes_at_most_a_batch_and_the_rest_waits() {
        let p = pool(&["10.0.0.1", "10.0.0.2"]);
        let n = PLAN_BATCH + 10;
        let leases: Vec<DynamicObject> = (0..n)
            .map(|i| lease(&format!("l{i}"), &format!("u{i}"), 1, None))
            .collect();
        let mut idx = Index::restore(settings(), std::slice::from_ref(&p), &leases, &[]);
        let mut objs: Vec<(Kind, &DynamicObject)> = vec![(Kind::Pool, &p)];
        objs.extend(leases.iter().map(|l| (Kind::Lease, l)));
        let obs = observed(&objs);
        let now = Timestamp::now();
        let first = idx.plan(&obs, &[], now);
        assert_eq!(first.len(), PLAN_BATCH);
        assert!(idx.plan_pending());
        let second = idx.plan(&obs, &[], now);
        assert_eq!(
            first.len() + second.len(),
            n + 1,
            "every lease and the pool"
        );
        assert!(!idx.plan_pending());
        let keys: HashSet<ObjKey> = first.iter().chain(&second).map(|w| w.key.clone()).collect();
        assert_eq!(keys.len(), n + 1, "none planned twice");
    }

    /// A publish re-plans what it carried: a status planned before it saw
    /// the version before, and no acknowledgement may come to move it.
    #[test]
    fn a_publish_plans_what_it_carried_again() {
        let (p, a, mut idx) = one_pool_one_lease();
        let now = Timestamp::now();
        let obs = observed(&[(Kind::Pool, &p), (Kind::Lease, &a)]);
        let before = idx.plan(&obs, &[], now);
        let routed = |writes: &[StatusWrite]| {
            writes
                .iter()
                .find(|w| w.key.kind() == Kind::Lease)
                .and_then(|w| w.status["conditions"].as_array().cloned())
                .and_then(|cs| cs.into_iter().find(|c| c["type"] == "Routed"))
                .map(|c| c["reason"].clone())
        };
        assert_eq!(routed(&before), Some(json!("NotPublished")));
        // As the publisher versions it.
        let change = pb::SnapshotDelta {
            version: Some(pb::Version::new(1, 1)),
            ..idx.snapshot_change(0, true).unwrap()
        };
        idx.published(Some(&change));
        assert!(
            idx.plan_pending(),
            "the published lease waits to be planned"
        );
        let after = idx.plan(&obs, &[], now);
        assert_eq!(routed(&after), Some(json!("NoProxy")));
    }
}
