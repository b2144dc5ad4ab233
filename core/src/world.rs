//! The operator's pure core: every IPPool, VMLease and SshRoute it knows, the
//! allocations derived from them, and from both the statuses and the routing
//! snapshot's entries. No I/O: local mode and cluster mode are two front doors
//! that feed objects in and write what comes out.
//!
//! Incremental: every change notes the objects it touched (plus the leases
//! the allocator moved); [`World::take_dirty`] brings the cross-object
//! indexes up to date for those alone (which live lease owns an `(ip, key)`
//! pair, which route wins a match) and returns every object whose status or
//! snapshot entry may have changed. A front door re-derives just those, so a
//! one-lease edit costs O(change), not O(world).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use keyway_crds::addresses::AddressSet;
use keyway_crds::keys::AccessKey;
use keyway_crds::validate::{FieldErrors, RouteFrom, RouteTo, Target, ValidLease, ValidRoute};
use keyway_crds::{IPPoolStatus, LeasePhase, SshRouteStatus, VMLeaseStatus, lease_hash};
use keyway_snapshot::pb;

use crate::allocator::{Allocator, Assignment, Event, LeaseRequest};
use crate::conditions::Conditions;
use crate::key::{LeaseKey, ObjKey};

/// Settings that shape statuses and snapshots.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Port users reach the proxy's SSH listener on (22 behind a Service,
    /// 2222 in local mode); goes into `status.sshCommand`.
    pub public_ssh_port: u16,
    /// The relay CA's public key, OpenSSH line; goes into `status.relayTrust`.
    pub relay_ca_public_key: String,
    /// Lifetime of relay user certificates proxies mint.
    pub relay_cert_validity_secs: u32,
}

/// An IPPool as the world sees it.
#[derive(Clone, Debug)]
pub struct PoolObject {
    /// Cluster-scoped name.
    pub name: String,
    /// `metadata.generation`, if the front door has one.
    pub generation: Option<i64>,
    /// The checked address set, or why the spec is invalid.
    pub spec: Result<AddressSet, FieldErrors>,
}

/// A VMLease as the world sees it.
#[derive(Clone, Debug)]
pub struct LeaseObject {
    /// Namespace and name.
    pub key: LeaseKey,
    /// Stable identity; the lease hash derives from it.
    pub uid: String,
    /// Creation time, unix milliseconds; older leases win conflicts.
    pub created_ms: u64,
    /// `metadata.generation`, if the front door has one.
    pub generation: Option<i64>,
    /// The checked spec, or why it is invalid.
    pub spec: Result<ValidLease, FieldErrors>,
    /// The IP its status records (assigned-first on restart).
    pub status_ip: Option<IpAddr>,
}

/// An SshRoute as the world sees it.
#[derive(Clone, Debug)]
pub struct RouteObject {
    /// Namespace and name.
    pub key: LeaseKey,
    /// Creation time, unix milliseconds; older routes win conflicts.
    pub created_ms: u64,
    /// `metadata.generation`, if the front door has one.
    pub generation: Option<i64>,
    /// `spec.from` as written (for the snapshot).
    pub from_raw: String,
    /// The checked spec, or why it is invalid.
    pub spec: Result<ValidRoute, FieldErrors>,
}

#[derive(Clone, Debug)]
struct LeaseEntry {
    obj: LeaseObject,
    /// The last valid spec, kept while the latest one is refused (not a copy
    /// of a valid current spec: this map holds every lease).
    kept: Option<ValidLease>,
    /// Set when the latest spec was refused while an older valid one is kept.
    rejected: Option<FieldErrors>,
}

impl LeaseEntry {
    /// The spec in force: the object's if valid, else the last valid one.
    fn effective(&self) -> Option<&ValidLease> {
        self.obj.spec.as_ref().ok().or(self.kept.as_ref())
    }

    fn into_effective(self: Box<Self>) -> Option<ValidLease> {
        let e = *self;
        e.obj.spec.ok().or(e.kept)
    }
}

#[derive(Clone, Debug)]
struct PoolEntry {
    obj: PoolObject,
    effective: Option<AddressSet>,
    rejected: Option<FieldErrors>,
}

/// A human-readable record of something the world did, for Events and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// `Normal` or `Warning`, as Kubernetes Events.
    pub severity: Severity,
    /// CamelCase reason (`Allocated`, `Released`, `Conflict`, …).
    pub reason: &'static str,
    /// The object the notice is about.
    pub object: ObjKey,
    /// Sentence for people.
    pub message: String,
}

impl Notice {
    /// Logs the notice at its severity.
    pub fn log(&self) {
        let object = &self.object;
        match self.severity {
            Severity::Normal => tracing::info!(reason = self.reason, %object, "{}", self.message),
            Severity::Warning => tracing::warn!(reason = self.reason, %object, "{}", self.message),
        }
    }
}

/// Notice severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// Routine.
    Normal,
    /// Someone should look.
    Warning,
}

/// Whether the object's current routing content is applied by every proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutedInfo {
    /// Connected subscribers.
    pub subscribers: usize,
    /// Connected subscribers that acknowledged a version containing the object's
    /// current content.
    pub acked: usize,
    /// That version, once published.
    pub since: Option<String>,
    /// When no subscriber counts: what the ones counted last had applied.
    pub before: Before,
}

/// What the proxies counted last had applied, for the time none counts (all
/// left, or none has come since the operator started). Kept so that the last
/// proxy leaving, or the first arriving, changes the `Routed` condition only
/// of the objects still in flight, never of every object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Before {
    /// No proxy has acknowledged anything of this epoch yet, and the object
    /// is as the operator first published it: a lease keeps the
    /// `Routed=True` it had while its generation and IP are unchanged (a
    /// restart renumbers versions, not content).
    #[default]
    Nothing,
    /// They had applied the object's current content.
    Applied,
    /// They had not.
    NotApplied,
}

/// Objects whose status or snapshot entry may have changed (a superset).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    /// IPPools by name.
    pub pools: BTreeSet<String>,
    /// VMLeases.
    pub leases: BTreeSet<LeaseKey>,
    /// SshRoutes.
    pub routes: BTreeSet<LeaseKey>,
}

impl Dirty {
    /// Nothing is dirty.
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty() && self.leases.is_empty() && self.routes.is_empty()
    }

    /// Adds everything `other` names.
    pub fn absorb(&mut self, other: Dirty) {
        self.pools.extend(other.pools);
        self.leases.extend(other.leases);
        self.routes.extend(other.routes);
    }

    /// How many objects it names.
    pub fn len(&self) -> usize {
        self.pools.len() + self.leases.len() + self.routes.len()
    }

    /// Adds one object.
    pub fn insert(&mut self, key: ObjKey) {
        match key {
            ObjKey::Pool(n) => {
                self.pools.insert(n);
            }
            ObjKey::Lease(k) => {
                self.leases.insert(k);
            }
            ObjKey::Route(k) => {
                self.routes.insert(k);
            }
        }
    }
}

/// A lease that routes (valid spec, not settled, holding an IP), as the
/// indexes hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Live {
    ip: IpAddr,
    /// Its keys' fingerprints, in spec order, each once.
    fingerprints: Vec<String>,
    created: u64,
    hash: [u8; 32],
}

/// A route as the indexes hold it.
#[derive(Clone, Debug)]
struct IndexedRoute {
    created: u64,
    /// Its match, when the spec is valid.
    from: Option<RouteFrom>,
    /// The lease it names, when the spec is valid and names one.
    target: Option<LeaseKey>,
}

/// All objects, their allocations, and what follows from them.
pub struct World {
    settings: Settings,
    allocator: Allocator,
    pools: BTreeMap<String, PoolEntry>,
    /// Boxed: a B-tree node has room for eleven entries and is often half
    /// full, and an entry is a few hundred bytes.
    leases: BTreeMap<LeaseKey, Box<LeaseEntry>>,
    routes: BTreeMap<LeaseKey, RouteObject>,
    notices: Vec<Notice>,
    /// Leases that route, by key.
    live: HashMap<LeaseKey, Live>,
    /// `(ip, fingerprint)` → the live leases with that key on that IP, oldest
    /// first: the first routes it by IP, the others only by lease hash. A
    /// sorted vector, not a tree: nearly always one lease, for every lease.
    owners: HashMap<(IpAddr, String), Vec<(u64, LeaseKey)>>,
    /// Every route as indexed.
    indexed_routes: HashMap<LeaseKey, IndexedRoute>,
    /// Lease → the routes naming it (whether or not it exists).
    routes_to: HashMap<LeaseKey, BTreeSet<LeaseKey>>,
    /// Match → the valid routes with it, oldest first.
    routes_from: HashMap<RouteFrom, BTreeSet<(u64, LeaseKey)>>,
    /// Routes that are accepted (valid, resolved, first of their match), with
    /// their destination.
    accepted: HashMap<LeaseKey, pb::route::To>,
    /// Objects changed since the indexes were last brought up to date.
    pending: Dirty,
    /// Objects whose status or entry may have changed since [`World::take_dirty`].
    dirty: Dirty,
}

/// Kubernetes admission in one line: a valid spec is taken; an invalid edit of
/// an object that had a valid spec keeps the old one (and says why); an invalid
/// new object has no spec in force.
fn admit<T: Clone>(
    spec: &Result<T, FieldErrors>,
    prev: Option<T>,
) -> (Option<T>, Option<FieldErrors>) {
    match (spec, prev) {
        (Ok(spec), _) => (Some(spec.clone()), None),
        (Err(e), Some(old)) => (Some(old), Some(e.clone())),
        (Err(_), None) => (None, None),
    }
}

fn request(obj: &LeaseObject, spec: &ValidLease) -> LeaseRequest {
    LeaseRequest {
        key: obj.key.clone(),
        created: obj.created_ms,
        user: spec.user.clone(),
        pool: spec.pool.clone(),
        settled: spec.settled,
        status_ip: obj.status_ip,
    }
}

impl World {
    /// Builds the world from what the front door found at start, assigned-first:
    /// every live lease keeps the IP its status records before anything new is
    /// allocated (MetalLB's lesson: rebuild from status, never reshuffle).
    pub fn restore(
        settings: Settings,
        pools: Vec<PoolObject>,
        leases: Vec<LeaseObject>,
        routes: Vec<RouteObject>,
    ) -> Self {
        let pools: BTreeMap<String, PoolEntry> = pools
            .into_iter()
            .map(|p| {
                let effective = p.spec.as_ref().ok().cloned();
                (
                    p.name.clone(),
                    PoolEntry {
                        obj: p,
                        effective,
                        rejected: None,
                    },
                )
            })
            .collect();
        let leases: BTreeMap<LeaseKey, Box<LeaseEntry>> = leases
            .into_iter()
            .map(|l| {
                (
                    l.key.clone(),
                    Box::new(LeaseEntry {
                        obj: l,
                        kept: None,
                        rejected: None,
                    }),
                )
            })
            .collect();
        let (allocator, events) = Allocator::restore(
            pools
                .iter()
                .filter_map(|(n, p)| Some((n.clone(), p.effective.clone()?))),
            leases
                .values()
                .filter_map(|e| Some(request(&e.obj, e.effective()?))),
        );
        // A lease that keeps the IP its status records was not allocated
        // anything new: no notice (a restart must not replay an Event per lease).
        let events: Vec<Event> = events
            .into_iter()
            .filter(|e| match e {
                Event::Allocated { lease, ip } => {
                    leases.get(lease).and_then(|l| l.obj.status_ip) != Some(*ip)
                }
                _ => true,
            })
            .collect();
        let routes: BTreeMap<LeaseKey, RouteObject> =
            routes.into_iter().map(|r| (r.key.clone(), r)).collect();
        let pending = Dirty {
            pools: pools.keys().cloned().collect(),
            leases: leases.keys().cloned().collect(),
            routes: routes.keys().cloned().collect(),
        };
        let mut world = World {
            settings,
            allocator,
            pools,
            leases,
            routes,
            notices: Vec::new(),
            live: HashMap::new(),
            owners: HashMap::new(),
            indexed_routes: HashMap::new(),
            routes_to: HashMap::new(),
            routes_from: HashMap::new(),
            accepted: HashMap::new(),
            pending,
            dirty: Dirty::default(),
        };
        world.note_events(events);
        world
    }

    /// Occupancy of a pool (for metrics).
    pub fn pool_stats(&self, name: &str) -> Option<crate::allocator::PoolStats> {
        self.allocator.pool_stats(name)
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Creates or updates a pool. An invalid edit of a pool that was valid keeps
    /// the previous addresses (nothing moves because of a typo) and is reported.
    pub fn apply_pool(&mut self, obj: PoolObject) {
        let name = obj.name.clone();
        self.pending.pools.insert(name.clone());
        let prev = self.pools.remove(&name);
        let (effective, rejected) = admit(&obj.spec, prev.and_then(|p| p.effective));
        let events = match &effective {
            Some(set) => self.allocator.set_pool(&name, set.clone()),
            None => self.allocator.remove_pool(&name),
        };
        if let Some(e) = &rejected {
            self.notice(
                Severity::Warning,
                "EditRejected",
                ObjKey::Pool(name.clone()),
                format!("edit rejected, still serving the previous addresses: {e}"),
            );
        }
        self.pools.insert(
            name,
            PoolEntry {
                obj,
                effective,
                rejected,
            },
        );
        self.note_events(events);
    }

    /// Deletes a pool; its leases wait (Pending) until it returns.
    pub fn delete_pool(&mut self, name: &str) {
        if self.pools.remove(name).is_some() {
            self.pending.pools.insert(name.to_string());
            let events = self.allocator.remove_pool(name);
            self.note_events(events);
        }
    }

    /// Creates or updates a lease (same rule as pools for invalid edits).
    pub fn apply_lease(&mut self, obj: LeaseObject) {
        let key = obj.key.clone();
        let prev = self.leases.remove(&key);
        self.pending.leases.insert(key.clone());
        if let Some(old) = prev.as_ref().and_then(|p| p.effective()) {
            self.pending.pools.insert(old.pool.clone());
        }
        // A valid spec is used where it is (no copy); a refused one keeps
        // the last valid spec.
        let (kept, rejected) = match &obj.spec {
            Ok(_) => (None, None),
            Err(e) => match prev.and_then(|p| p.into_effective()) {
                Some(old) => (Some(old), Some(e.clone())),
                None => (None, None),
            },
        };
        let events = match obj.spec.as_ref().ok().or(kept.as_ref()) {
            Some(spec) => self.allocator.upsert_lease(request(&obj, spec)),
            None => self.allocator.remove_lease(&key),
        };
        if let Some(e) = &rejected {
            self.notice(
                Severity::Warning,
                "EditRejected",
                ObjKey::Lease(key.clone()),
                format!("edit rejected, still serving the previous spec: {e}"),
            );
        }
        self.leases.insert(
            key,
            Box::new(LeaseEntry {
                obj,
                kept,
                rejected,
            }),
        );
        self.note_events(events);
    }

    /// Deletes a lease and releases its IP.
    pub fn delete_lease(&mut self, key: &LeaseKey) {
        if let Some(old) = self.leases.remove(key) {
            self.pending.leases.insert(key.clone());
            if let Some(spec) = old.effective() {
                self.pending.pools.insert(spec.pool.clone());
            }
            let events = self.allocator.remove_lease(key);
            self.note_events(events);
        }
    }

    /// Creates or updates a route.
    pub fn apply_route(&mut self, obj: RouteObject) {
        self.pending.routes.insert(obj.key.clone());
        self.routes.insert(obj.key.clone(), obj);
    }

    /// Deletes a route.
    pub fn delete_route(&mut self, key: &LeaseKey) {
        if self.routes.remove(key).is_some() {
            self.pending.routes.insert(key.clone());
        }
    }

    /// Names of every pool, lease and route the world holds.
    pub fn pool_names(&self) -> impl Iterator<Item = &String> {
        self.pools.keys()
    }
    /// Keys of every lease.
    pub fn lease_keys(&self) -> impl Iterator<Item = &LeaseKey> {
        self.leases.keys()
    }
    /// Keys of every route.
    pub fn route_keys(&self) -> impl Iterator<Item = &LeaseKey> {
        self.routes.keys()
    }

    /// The lease object as last applied.
    pub fn lease(&self, key: &LeaseKey) -> Option<&LeaseObject> {
        self.leases.get(key).map(|e| &e.obj)
    }

    /// The spec in force for a lease (the last valid one).
    pub fn effective_lease(&self, key: &LeaseKey) -> Option<&ValidLease> {
        self.leases.get(key)?.effective()
    }

    /// The IP a lease holds.
    pub fn lease_ip(&self, key: &LeaseKey) -> Option<IpAddr> {
        match self.allocator.assignment(key)? {
            Assignment::Assigned(ip) => Some(*ip),
            _ => None,
        }
    }

    /// Takes the notices recorded since the last call.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    fn notice(
        &mut self,
        severity: Severity,
        reason: &'static str,
        object: ObjKey,
        message: String,
    ) {
        self.notices.push(Notice {
            severity,
            reason,
            object,
            message,
        });
    }

    fn note_events(&mut self, events: Vec<Event>) {
        use crate::allocator::MoveReason;
        for ev in events {
            match ev {
                Event::Allocated { lease, ip } => self.notice(
                    Severity::Normal,
                    "Allocated",
                    ObjKey::Lease(lease),
                    format!("allocated {ip}"),
                ),
                Event::Released { lease, ip } => self.notice(
                    Severity::Normal,
                    "Released",
                    ObjKey::Lease(lease),
                    format!("released {ip}"),
                ),
                Event::Moved {
                    lease,
                    from,
                    to,
                    reason,
                } => {
                    let why = match reason {
                        MoveReason::LeftPool => "the address left the pool",
                        MoveReason::Conflict => "an older lease of the same user holds it",
                        MoveReason::PoolRemoved => "the pool was removed",
                        MoveReason::UserOrPoolChanged => "the lease changed user or pool",
                    };
                    let to =
                        to.map_or_else(|| "no address (pending)".to_string(), |ip| ip.to_string());
                    self.notice(
                        Severity::Warning,
                        "Moved",
                        ObjKey::Lease(lease),
                        format!("moved from {from} to {to}: {why}"),
                    );
                }
                Event::Conflict {
                    ip,
                    pool,
                    user,
                    winner,
                    loser,
                } => self.notice(
                    Severity::Warning,
                    "Conflict",
                    ObjKey::Lease(loser),
                    format!(
                        "{ip} in pool {pool} was claimed by two leases of user {user}; the older \
                         {}/{} keeps it",
                        winner.namespace, winner.name
                    ),
                ),
                Event::Exhausted { lease, pool } => self.notice(
                    Severity::Warning,
                    "Exhausted",
                    ObjKey::Lease(lease),
                    format!("pool {pool} has no address left for this lease's user"),
                ),
            }
        }
    }

    fn relay_trust(&self, hash_hex: &str) -> String {
        format!(
            "cert-authority,principals=\"{}\" {} keyway-relay-ca",
            relay_principal(hash_hex),
            self.settings.relay_ca_public_key.trim()
        )
    }

    fn ssh_command(&self, ip: IpAddr) -> String {
        match self.settings.public_ssh_port {
            22 => format!("ssh {ip}"),
            p => format!("ssh -p {p} {ip}"),
        }
    }

    /// Brings the indexes up to date with every change since the last call
    /// and returns the objects whose status or snapshot entry may have
    /// changed since then. Costs O(change): only pending objects, the leases
    /// sharing an `(ip, key)` pair with them and the routes sharing a match
    /// or naming them are looked at. Statuses and entries read the indexes,
    /// so call this before deriving them.
    pub fn take_dirty(&mut self) -> Dirty {
        self.refresh();
        std::mem::take(&mut self.dirty)
    }

    /// Whether anything changed since the last [`World::take_dirty`].
    pub fn has_changes(&self) -> bool {
        !self.pending.is_empty() || !self.dirty.is_empty()
    }

    fn refresh(&mut self) {
        let mut pending = std::mem::take(&mut self.pending);
        pending.leases.extend(self.allocator.take_touched());
        for key in &pending.leases {
            if let Some(spec) = self.leases.get(key).and_then(|e| e.effective()) {
                self.dirty.pools.insert(spec.pool.clone());
            }
            self.reindex_lease(key);
            // Routes naming it: whether it exists or routes may have changed.
            if let Some(routes) = self.routes_to.get(key) {
                pending.routes.extend(routes.iter().cloned());
            }
        }
        let mut matches: HashSet<RouteFrom> = HashSet::new();
        for key in &pending.routes {
            self.reindex_route(key, &mut matches);
        }
        for from in matches {
            self.settle_match(&from);
        }
        self.dirty.absorb(pending);
    }

    /// What the indexes should hold for a lease now.
    fn live_now(&self, key: &LeaseKey) -> Option<Live> {
        let e = self.leases.get(key)?;
        let spec = e.effective()?;
        if spec.settled {
            return None;
        }
        let ip = self.lease_ip(key)?;
        let mut fingerprints: Vec<String> = Vec::with_capacity(spec.keys.len());
        for k in &spec.keys {
            if !fingerprints.contains(&k.fingerprint) {
                fingerprints.push(k.fingerprint.clone());
            }
        }
        Some(Live {
            ip,
            fingerprints,
            created: e.obj.created_ms,
            hash: lease_hash(&e.obj.uid),
        })
    }

    /// Re-indexes one lease; every lease sharing an `(ip, key)` pair it left
    /// or joined becomes dirty (which of them routes by IP may change).
    fn reindex_lease(&mut self, key: &LeaseKey) {
        let now = self.live_now(key);
        if self.live.get(key) == now.as_ref() {
            return;
        }
        if let Some(old) = self.live.remove(key) {
            for fp in old.fingerprints {
                let pair = (old.ip, fp);
                if let Some(set) = self.owners.get_mut(&pair) {
                    if let Ok(at) = set.binary_search(&(old.created, key.clone())) {
                        set.remove(at);
                    }
                    self.dirty.leases.extend(set.iter().map(|(_, k)| k.clone()));
                    if set.is_empty() {
                        self.owners.remove(&pair);
                    }
                }
            }
        }
        if let Some(new) = now {
            for fp in &new.fingerprints {
                let set = self.owners.entry((new.ip, fp.clone())).or_default();
                let owner = (new.created, key.clone());
                if let Err(at) = set.binary_search(&owner) {
                    set.insert(at, owner);
                }
                self.dirty.leases.extend(set.iter().map(|(_, k)| k.clone()));
            }
            self.live.insert(key.clone(), new);
        }
    }

    /// Re-indexes one route, noting the matches it left or joined.
    fn reindex_route(&mut self, key: &LeaseKey, matches: &mut HashSet<RouteFrom>) {
        if let Some(old) = self.indexed_routes.remove(key) {
            if let Some(from) = old.from {
                if let Some(set) = self.routes_from.get_mut(&from) {
                    set.remove(&(old.created, key.clone()));
                    if set.is_empty() {
                        self.routes_from.remove(&from);
                    }
                }
                matches.insert(from);
            }
            if let Some(t) = old.target
                && let Some(set) = self.routes_to.get_mut(&t)
            {
                set.remove(key);
                if set.is_empty() {
                    self.routes_to.remove(&t);
                }
            }
        }
        self.accepted.remove(key);
        let Some(r) = self.routes.get(key) else {
            return;
        };
        let spec = r.spec.as_ref().ok();
        let indexed = IndexedRoute {
            created: r.created_ms,
            from: spec.map(|s| s.from.clone()),
            target: spec.and_then(|s| match &s.to {
                RouteTo::Lease(name) => Some(LeaseKey::new(&key.namespace, name)),
                RouteTo::Address(_) => None,
            }),
        };
        if let Some(from) = &indexed.from {
            self.routes_from
                .entry(from.clone())
                .or_default()
                .insert((indexed.created, key.clone()));
            matches.insert(from.clone());
        }
        if let Some(t) = &indexed.target {
            self.routes_to
                .entry(t.clone())
                .or_default()
                .insert(key.clone());
        }
        self.indexed_routes.insert(key.clone(), indexed);
    }

    /// Decides which route of one match is accepted: the oldest that
    /// resolves. Every route of the match becomes dirty.
    fn settle_match(&mut self, from: &RouteFrom) {
        let Some(members) = self.routes_from.get(from) else {
            return;
        };
        let mut winner_found = false;
        let mut decided: Vec<(LeaseKey, Option<pb::route::To>)> = Vec::new();
        for (_, k) in members {
            let to = match self.routes.get(k).map(|r| &r.spec) {
                Some(Ok(spec)) if !winner_found => self.resolve_route(k, spec).ok(),
                _ => None,
            };
            winner_found |= to.is_some();
            decided.push((k.clone(), to));
        }
        for (k, to) in decided {
            match to {
                Some(to) => {
                    self.accepted.insert(k.clone(), to);
                }
                None => {
                    self.accepted.remove(&k);
                }
            }
            self.dirty.routes.insert(k);
        }
    }

    /// The keys a live lease has on its IP that an older live lease already
    /// routes there, each with that older lease: they work here only by
    /// lease hash.
    fn shadowed(&self, key: &LeaseKey) -> Vec<(&str, &LeaseKey)> {
        let Some(live) = self.live.get(key) else {
            return Vec::new();
        };
        live.fingerprints
            .iter()
            .filter_map(|fp| {
                let first = self
                    .owners
                    .get(&(live.ip, fp.clone()))?
                    .first()
                    .map(|(_, k)| k)?;
                (first != key).then_some((fp.as_str(), first))
            })
            .collect()
    }

    /// A lease's snapshot entry, `None` when it does not route. Read after
    /// [`World::take_dirty`].
    pub fn lease_entry(&self, key: &LeaseKey) -> Option<pb::Lease> {
        let live = self.live.get(key)?;
        let e = self.leases.get(key)?;
        let spec = e.effective()?;
        let hash_hex = hex::encode(live.hash);
        Some(pb::Lease {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            lease_hash: live.hash.to_vec(),
            user: spec.user.clone(),
            ip: live.ip.to_string(),
            pool: spec.pool.clone(),
            access_keys: spec.keys.iter().map(pb_key).collect(),
            target: Some(match &spec.target {
                Target::Address(hp) => pb::lease::Target::Address(hp.to_string()),
                Target::Provider { peer_id, addresses } => {
                    pb::lease::Target::Provider(pb::Provider {
                        peer_id: peer_id.clone(),
                        addresses: addresses.clone(),
                    })
                }
            }),
            upstream_user: spec.upstream_user.clone().unwrap_or_default(),
            relay_principal: relay_principal(&hash_hex),
            ip_route_disabled_fingerprints: self
                .shadowed(key)
                .into_iter()
                .map(|(fp, _)| fp.to_string())
                .collect(),
        })
    }

    /// A route's snapshot entry, `None` when it is not accepted. Read after
    /// [`World::take_dirty`].
    pub fn route_entry(&self, key: &LeaseKey) -> Option<pb::Route> {
        let to = self.accepted.get(key)?.clone();
        let r = self.routes.get(key)?;
        let spec = r.spec.as_ref().ok()?;
        Some(pb::Route {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            from: r.from_raw.clone(),
            r#match: Some(match &spec.from {
                RouteFrom::Connect(hp) => pb::route::Match::Connect(pb::ConnectMatch {
                    host: hp.host.clone(),
                    port: u32::from(hp.port),
                }),
                RouteFrom::Ssh { user, host } => pb::route::Match::Ssh(pb::SshMatch {
                    user: user.clone(),
                    host: host.to_string(),
                }),
            }),
            to: Some(to),
            allow_keys: spec.allow_keys.iter().map(pb_key).collect(),
            allow_unauthenticated: spec.allow_unauthenticated,
        })
    }

    fn relay(&self) -> pb::RelayTrust {
        pb::RelayTrust {
            ca_public_key: self.settings.relay_ca_public_key.trim().to_string(),
            cert_validity_secs: self.settings.relay_cert_validity_secs,
        }
    }

    /// The snapshot change for `dirty` (from [`World::take_dirty`]): every
    /// dirty lease and route as an upsert when it has an entry, else as a
    /// removal, plus the relay settings. Lists more than changed (the
    /// publisher keeps only what differs), never less.
    pub fn snapshot_delta(&self, dirty: &Dirty, now_ms: i64) -> pb::SnapshotDelta {
        let mut d = pb::SnapshotDelta {
            relay: Some(self.relay()),
            generated_unix_ms: now_ms,
            ..Default::default()
        };
        for k in &dirty.leases {
            match self.lease_entry(k) {
                Some(l) => d.upserted_leases.push(l),
                None => d.removed_leases.push(object_ref(k)),
            }
        }
        for k in &dirty.routes {
            match self.route_entry(k) {
                Some(r) => d.upserted_routes.push(r),
                None => d.removed_routes.push(object_ref(k)),
            }
        }
        d
    }

    /// The whole routing snapshot (version left for the publisher to fill).
    /// Linear in the world: for tests and benchmarks; the front doors publish
    /// [`World::snapshot_delta`]s.
    pub fn snapshot(&mut self, now_ms: i64) -> pb::Snapshot {
        self.refresh();
        pb::Snapshot {
            version: None,
            leases: self
                .leases
                .keys()
                .filter_map(|k| self.lease_entry(k))
                .collect(),
            routes: self
                .routes
                .keys()
                .filter_map(|k| self.route_entry(k))
                .collect(),
            relay: Some(self.relay()),
            generated_unix_ms: now_ms,
        }
    }

    fn resolve_route(
        &self,
        key: &LeaseKey,
        spec: &ValidRoute,
    ) -> Result<pb::route::To, (&'static str, String)> {
        match &spec.to {
            RouteTo::Address(hp) => Ok(pb::route::To::Address(hp.to_string())),
            RouteTo::Lease(name) => {
                let lk = LeaseKey::new(&key.namespace, name);
                match self.live.get(&lk) {
                    Some(l) => Ok(pb::route::To::LeaseHash(l.hash.to_vec())),
                    None if self.leases.contains_key(&lk) => Err((
                        "LeaseNotReady",
                        format!("lease {name} is not Ready, so it has no route"),
                    )),
                    None => Err((
                        "LeaseNotFound",
                        format!("no VMLease {name} in namespace {}", key.namespace),
                    )),
                }
            }
        }
    }

    /// The status a lease should have. `prev` keeps condition transition times
    /// stable when nothing changed.
    pub fn lease_status(
        &self,
        key: &LeaseKey,
        prev: Option<&VMLeaseStatus>,
        routed: &RoutedInfo,
        now: Timestamp,
    ) -> Option<VMLeaseStatus> {
        let e = self.leases.get(key)?;
        let generation = e.obj.generation;
        let mut conds = Conditions::new(prev.map_or(&[], |p| &p.conditions), generation, now);
        let hash_hex = hex::encode(lease_hash(&e.obj.uid));
        let mut st = VMLeaseStatus {
            lease_hash: Some(hash_hex.clone()),
            observed_generation: generation,
            ..Default::default()
        };
        let Some(spec) = e.effective() else {
            let msg = match &e.obj.spec {
                Err(errs) => errs.to_string(),
                Ok(_) => "invalid spec".to_string(),
            };
            st.phase = Some(LeasePhase::Failed);
            st.message = Some(msg.clone());
            conds.set("Allocated", false, "InvalidSpec", msg.clone());
            conds.set("Routed", false, "InvalidSpec", "the spec is invalid");
            st.conditions = conds.finish();
            return Some(st);
        };
        st.relay_trust = Some(self.relay_trust(&hash_hex));
        let mut notes: Vec<String> = Vec::new();
        if let Some(rej) = &e.rejected {
            notes.push(format!(
                "the latest edit was rejected ({rej}); still serving the previous spec"
            ));
        }
        match self.allocator.assignment(key) {
            Some(Assignment::Assigned(ip)) if !spec.settled => {
                st.ip = Some(ip.to_string());
                st.phase = Some(LeasePhase::Ready);
                st.ssh_command = Some(self.ssh_command(*ip));
                conds.set(
                    "Allocated",
                    true,
                    "Allocated",
                    format!("holds {ip} from pool {}", spec.pool),
                );
                {
                    for (fp, owner) in self.shadowed(key) {
                        notes.push(format!(
                            "key {fp} on {ip} already routes to the older lease {}/{}; it works here only as {hash_hex}@gateway",
                            owner.namespace, owner.name
                        ));
                    }
                }
                let same_ip = prev.is_some_and(|p| p.ip == st.ip);
                let prev = prev.map_or(&[][..], |p| &p.conditions);
                let (ok, reason, msg) = routed_condition(routed, prev, generation, same_ip);
                conds.set("Routed", ok, reason, msg.clone());
            }
            Some(Assignment::Pending(reason)) if !spec.settled => {
                let msg = reason.to_string();
                let why = match reason {
                    crate::allocator::PendingReason::PoolNotFound { .. } => "PoolNotFound",
                    crate::allocator::PendingReason::Exhausted { .. } => "PoolExhausted",
                };
                st.phase = Some(LeasePhase::Pending);
                notes.insert(0, msg.clone());
                conds.set("Allocated", false, why, msg.clone());
                conds.set("Routed", false, "NotAllocated", "no address yet");
            }
            _ => {
                st.phase = Some(LeasePhase::Settled);
                conds.set(
                    "Allocated",
                    false,
                    "Settled",
                    "the lease is settled; its address was released",
                );
                conds.set("Routed", false, "Settled", "settled leases are not routed");
            }
        }
        if !notes.is_empty() {
            st.message = Some(notes.join("; "));
        }
        st.conditions = conds.finish();
        Some(st)
    }

    /// The status a pool should have.
    pub fn pool_status(
        &self,
        name: &str,
        prev: Option<&IPPoolStatus>,
        now: Timestamp,
    ) -> Option<IPPoolStatus> {
        let e = self.pools.get(name)?;
        let generation = e.obj.generation;
        let mut conds = Conditions::new(prev.map_or(&[], |p| &p.conditions), generation, now);
        let mut st = IPPoolStatus {
            observed_generation: generation,
            ..Default::default()
        };
        match (&e.effective, &e.rejected, &e.obj.spec) {
            (None, _, Err(errs)) => {
                conds.set("Ready", false, "InvalidSpec", errs.to_string());
                st.conditions = conds.finish();
                return Some(st);
            }
            (_, Some(rej), _) => conds.set(
                "Ready",
                true,
                "EditRejected",
                format!(
                    "the latest edit was rejected ({rej}); still serving the previous addresses"
                ),
            ),
            _ => conds.set("Ready", true, "Valid", "addresses parsed"),
        }
        let stats = self.allocator.pool_stats(name).unwrap_or_default();
        st.capacity = Some(stats.capacity.to_string());
        st.allocated = stats.allocated;
        st.users = stats.users;
        st.max_leases_per_user = stats.max_leases_per_user;
        if stats.pending > 0 {
            conds.set(
                "Exhausted",
                true,
                "LeasesWaiting",
                format!(
                    "{} lease(s) wait: a user has more live leases than the pool's {} addresses",
                    stats.pending, stats.capacity
                ),
            );
        } else {
            conds.set(
                "Exhausted",
                false,
                "Available",
                format!(
                    "every lease holds an address; the busiest user has {} of {}",
                    stats.max_leases_per_user, stats.capacity
                ),
            );
        }
        st.conditions = conds.finish();
        Some(st)
    }

    /// The status a route should have.
    pub fn route_status(
        &self,
        key: &LeaseKey,
        prev: Option<&SshRouteStatus>,
        routed: &RoutedInfo,
        now: Timestamp,
    ) -> Option<SshRouteStatus> {
        let r = self.routes.get(key)?;
        let generation = r.generation;
        let mut conds = Conditions::new(prev.map_or(&[], |p| &p.conditions), generation, now);
        let mut st = SshRouteStatus {
            observed_generation: generation,
            ..Default::default()
        };
        let accepted = match &r.spec {
            Err(errs) => Err(("InvalidSpec", errs.to_string())),
            Ok(spec) => match self.resolve_route(key, spec) {
                Err(e) => Err((e.0, e.1)),
                Ok(_) if self.accepted.contains_key(key) => Ok(()),
                Ok(_) => {
                    let other = self
                        .routes_from
                        .get(&spec.from)
                        .and_then(|m| m.iter().find(|(_, k)| self.accepted.contains_key(k)))
                        .map(|(_, w)| format!("{}/{}", w.namespace, w.name))
                        .unwrap_or_default();
                    Err((
                        "Conflict",
                        format!("the older route {other} already matches {}", r.from_raw),
                    ))
                }
            },
        };
        match accepted {
            Ok(()) => {
                conds.set("Accepted", true, "Accepted", "valid and resolved");
                let prev = prev.map_or(&[][..], |p| &p.conditions);
                let (ok, reason, msg) = routed_condition(routed, prev, generation, false);
                conds.set("Routed", ok, reason, msg.clone());
            }
            Err((reason, msg)) => {
                conds.set("Accepted", false, reason, msg.clone());
                conds.set("Routed", false, "NotAccepted", "the route is not accepted");
            }
        }
        st.conditions = conds.finish();
        Some(st)
    }
}

/// The message of `Routed=True`. It names no version and no count: versions
/// are renumbered by an operator restart and counts change as proxies come
/// and go, and neither may rewrite the status of every object.
const APPLIED: &str = "applied by every proxy serving this operator's snapshots";

/// `Routed` for an object at `generation` whose previous conditions were
/// `prev`; `same` says whether what else its entry depends on (a lease's IP)
/// is as the previous status showed (a route keeps nothing: its entry also
/// depends on its target lease's hash, which its status does not show).
fn routed_condition(
    r: &RoutedInfo,
    prev: &[Condition],
    generation: Option<i64>,
    same: bool,
) -> (bool, &'static str, String) {
    let applied = (true, "Applied", APPLIED.to_string());
    let no_proxy = (
        false,
        "NoProxy",
        "no proxy serving this operator's snapshots has applied it".to_string(),
    );
    match &r.since {
        None => (
            false,
            "NotPublished",
            "not yet in a published snapshot".into(),
        ),
        Some(_) if r.subscribers == 0 => match r.before {
            Before::Applied => applied,
            Before::NotApplied => no_proxy,
            Before::Nothing => {
                let kept = same
                    && prev.iter().any(|c| {
                        c.type_ == "Routed"
                            && c.status == "True"
                            && c.observed_generation == generation
                    });
                if kept { applied } else { no_proxy }
            }
        },
        Some(_) if r.acked >= r.subscribers => applied,
        Some(v) => (
            false,
            "Applying",
            format!(
                "snapshot {v} applied by {} of {} proxies",
                r.acked, r.subscribers
            ),
        ),
    }
}

/// The certificate principal the relay uses for a lease.
pub fn relay_principal(hash_hex: &str) -> String {
    format!("keyway-lease-{hash_hex}")
}

fn object_ref(k: &LeaseKey) -> pb::ObjectRef {
    pb::ObjectRef {
        namespace: k.namespace.clone(),
        name: k.name.clone(),
    }
}

fn pb_key(k: &AccessKey) -> pb::AccessKey {
    pb::AccessKey {
        openssh: k.openssh.clone(),
        fingerprint: k.fingerprint.clone(),
    }
}
