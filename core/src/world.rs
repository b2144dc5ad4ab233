//! The operator's pure core: every IPPool, VMLease and SshRoute it knows, the
//! allocations derived from them, and from both the statuses and the routing
//! snapshot. No I/O: local mode and cluster mode are two front doors that feed
//! objects in and write what comes out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

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
    /// The spec in force: the object's if valid, else the last valid one.
    effective: Option<ValidLease>,
    /// Set when the latest spec was refused while an older valid one is kept.
    rejected: Option<FieldErrors>,
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
}

/// What follows from the whole world at once (computed once per round, so
/// per-object statuses stay O(1) each).
#[derive(Debug, Default)]
pub struct Derived {
    shadowed: HashMap<LeaseKey, Vec<(String, LeaseKey)>>,
    hashes: HashMap<LeaseKey, Vec<u8>>,
    accepted_routes: HashMap<LeaseKey, pb::route::To>,
    route_winner: HashMap<RouteFrom, LeaseKey>,
}

/// All objects, their allocations, and what follows from them.
pub struct World {
    settings: Settings,
    allocator: Allocator,
    pools: BTreeMap<String, PoolEntry>,
    leases: BTreeMap<LeaseKey, LeaseEntry>,
    routes: BTreeMap<LeaseKey, RouteObject>,
    notices: Vec<Notice>,
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
        let leases: BTreeMap<LeaseKey, LeaseEntry> = leases
            .into_iter()
            .map(|l| {
                let effective = l.spec.as_ref().ok().cloned();
                (
                    l.key.clone(),
                    LeaseEntry {
                        obj: l,
                        effective,
                        rejected: None,
                    },
                )
            })
            .collect();
        let (allocator, events) = Allocator::restore(
            pools
                .iter()
                .filter_map(|(n, p)| Some((n.clone(), p.effective.clone()?))),
            leases
                .values()
                .filter_map(|e| Some(request(&e.obj, e.effective.as_ref()?))),
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
        let mut world = World {
            settings,
            allocator,
            pools,
            leases,
            routes: routes.into_iter().map(|r| (r.key.clone(), r)).collect(),
            notices: Vec::new(),
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
            let events = self.allocator.remove_pool(name);
            self.note_events(events);
        }
    }

    /// Creates or updates a lease (same rule as pools for invalid edits).
    pub fn apply_lease(&mut self, obj: LeaseObject) {
        let key = obj.key.clone();
        let prev = self.leases.remove(&key);
        let (effective, rejected) = admit(&obj.spec, prev.and_then(|p| p.effective));
        let events = match &effective {
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
            LeaseEntry {
                obj,
                effective,
                rejected,
            },
        );
        self.note_events(events);
    }

    /// Deletes a lease and releases its IP.
    pub fn delete_lease(&mut self, key: &LeaseKey) {
        if self.leases.remove(key).is_some() {
            let events = self.allocator.remove_lease(key);
            self.note_events(events);
        }
    }

    /// Creates or updates a route.
    pub fn apply_route(&mut self, obj: RouteObject) {
        self.routes.insert(obj.key.clone(), obj);
    }

    /// Deletes a route.
    pub fn delete_route(&mut self, key: &LeaseKey) {
        self.routes.remove(key);
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
        self.leases.get(key)?.effective.as_ref()
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

    /// `(ip, key)` pairs already routed to an older lease of another user: the
    /// newer lease keeps the key for lease-hash logins but not by IP. Keyed by
    /// lease, values are the disabled fingerprints.
    fn shadowed_keys(&self) -> HashMap<LeaseKey, Vec<(String, LeaseKey)>> {
        let mut live: Vec<(&LeaseEntry, IpAddr)> = self
            .leases
            .values()
            .filter_map(|e| Some((e, self.live_ip(e)?)))
            .collect();
        live.sort_by(|a, b| {
            (a.0.obj.created_ms, &a.0.obj.key).cmp(&(b.0.obj.created_ms, &b.0.obj.key))
        });
        let mut owner: HashMap<(IpAddr, &str), &LeaseKey> = HashMap::new();
        let mut out: HashMap<LeaseKey, Vec<(String, LeaseKey)>> = HashMap::new();
        for (e, ip) in live {
            let Some(spec) = &e.effective else { continue };
            for k in &spec.keys {
                match owner.get(&(ip, k.fingerprint.as_str())) {
                    Some(first) => out
                        .entry(e.obj.key.clone())
                        .or_default()
                        .push((k.fingerprint.clone(), (*first).clone())),
                    None => {
                        owner.insert((ip, k.fingerprint.as_str()), &e.obj.key);
                    }
                }
            }
        }
        out
    }

    fn live_ip(&self, e: &LeaseEntry) -> Option<IpAddr> {
        let spec = e.effective.as_ref()?;
        if spec.settled {
            return None;
        }
        self.lease_ip(&e.obj.key)
    }

    /// Computes what depends on all objects together.
    pub fn derive(&self) -> Derived {
        let hashes: HashMap<LeaseKey, Vec<u8>> = self
            .leases
            .values()
            .filter(|e| self.live_ip(e).is_some())
            .map(|e| (e.obj.key.clone(), lease_hash(&e.obj.uid).to_vec()))
            .collect();
        let accepted = self.accepted_routes(&hashes);
        let route_winner = accepted
            .iter()
            .filter_map(|(r, _)| Some((r.spec.as_ref().ok()?.from.clone(), r.key.clone())))
            .collect();
        let accepted_routes = accepted
            .into_iter()
            .map(|(r, to)| (r.key.clone(), to))
            .collect();
        Derived {
            shadowed: self.shadowed_keys(),
            hashes,
            accepted_routes,
            route_winner,
        }
    }

    /// The routing snapshot (version fields left for the publisher to fill).
    pub fn snapshot(&self, derived: &Derived, now_ms: i64) -> pb::Snapshot {
        let shadowed = &derived.shadowed;
        let mut leases = Vec::new();
        for e in self.leases.values() {
            let (Some(spec), Some(ip)) = (&e.effective, self.live_ip(e)) else {
                continue;
            };
            let hash = lease_hash(&e.obj.uid);
            let hash_hex = hex::encode(hash);
            leases.push(pb::Lease {
                namespace: e.obj.key.namespace.clone(),
                name: e.obj.key.name.clone(),
                lease_hash: hash.to_vec(),
                user: spec.user.clone(),
                ip: ip.to_string(),
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
                ip_route_disabled_fingerprints: shadowed
                    .get(&e.obj.key)
                    .map(|v| v.iter().map(|(fp, _)| fp.clone()).collect())
                    .unwrap_or_default(),
            });
        }
        let routes = self
            .routes
            .values()
            .filter_map(|r| {
                let to = derived.accepted_routes.get(&r.key)?.clone();
                let spec = r.spec.as_ref().ok()?;
                Some(pb::Route {
                    namespace: r.key.namespace.clone(),
                    name: r.key.name.clone(),
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
            })
            .collect();
        pb::Snapshot {
            version: None,
            leases,
            routes,
            relay: Some(pb::RelayTrust {
                ca_public_key: self.settings.relay_ca_public_key.trim().to_string(),
                cert_validity_secs: self.settings.relay_cert_validity_secs,
            }),
            generated_unix_ms: now_ms,
        }
    }

    /// Routes that are valid, resolve, and do not clash with an older route's
    /// match; with their resolved destination.
    fn accepted_routes(
        &self,
        hashes: &HashMap<LeaseKey, Vec<u8>>,
    ) -> Vec<(&RouteObject, pb::route::To)> {
        let mut ordered: Vec<&RouteObject> = self.routes.values().collect();
        ordered.sort_by(|a, b| (a.created_ms, &a.key).cmp(&(b.created_ms, &b.key)));
        let mut taken: HashSet<RouteFrom> = HashSet::new();
        let mut out = Vec::new();
        for r in ordered {
            let Ok(spec) = &r.spec else { continue };
            if let Ok(to) = self.resolve_route(&r.key, spec, hashes)
                && taken.insert(spec.from.clone())
            {
                out.push((r, to));
            }
        }
        out
    }

    fn resolve_route(
        &self,
        key: &LeaseKey,
        spec: &ValidRoute,
        hashes: &HashMap<LeaseKey, Vec<u8>>,
    ) -> Result<pb::route::To, (&'static str, String)> {
        match &spec.to {
            RouteTo::Address(hp) => Ok(pb::route::To::Address(hp.to_string())),
            RouteTo::Lease(name) => {
                let lk = LeaseKey {
                    namespace: key.namespace.clone(),
                    name: name.clone(),
                };
                match hashes.get(&lk) {
                    Some(h) => Ok(pb::route::To::LeaseHash(h.clone())),
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
        derived: &Derived,
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
        let Some(spec) = &e.effective else {
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
                if let Some(sh) = derived.shadowed.get(key) {
                    for (fp, owner) in sh {
                        notes.push(format!(
                            "key {fp} on {ip} already routes to the older lease {}/{}; it works here only as {hash_hex}@gateway",
                            owner.namespace, owner.name
                        ));
                    }
                }
                let (ok, reason, msg) = routed_condition(routed);
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
        derived: &Derived,
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
            Ok(spec) => match self.resolve_route(key, spec, &derived.hashes) {
                Err(e) => Err((e.0, e.1)),
                Ok(_) if derived.accepted_routes.contains_key(key) => Ok(()),
                Ok(_) => {
                    let other = derived
                        .route_winner
                        .get(&spec.from)
                        .map(|w| format!("{}/{}", w.namespace, w.name))
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
                let (ok, reason, msg) = routed_condition(routed);
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

fn routed_condition(r: &RoutedInfo) -> (bool, &'static str, String) {
    match &r.since {
        None => (
            false,
            "NotPublished",
            "not yet in a published snapshot".into(),
        ),
        Some(_) if r.subscribers == 0 => (
            false,
            "NoProxy",
            "no proxy is connected to the operator".into(),
        ),
        Some(v) if r.acked >= r.subscribers => (
            true,
            "Applied",
            format!("snapshot {v} applied by {} proxy(ies)", r.subscribers),
        ),
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

fn pb_key(k: &AccessKey) -> pb::AccessKey {
    pb::AccessKey {
        openssh: k.openssh.clone(),
        fingerprint: k.fingerprint.clone(),
    }
}
