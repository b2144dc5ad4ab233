//! Pooled-IP allocation. Pure: no I/O, no clocks, deterministic.
//!
//! Rules (DESIGN.md, Invariants → Allocation):
//! - two live leases of the same user in one pool never hold the same IP;
//!   different users share IPs freely, so a pool of k addresses serves any user
//!   with up to k leases;
//! - a new lease takes the least-loaded address its user does not hold (an unused
//!   one if any, lowest first), so load spreads;
//! - an allocated IP never changes while its lease lives and the IP stays in the
//!   pool; restarts restore from status *before* allocating anything new;
//! - conflicts go to the older lease (creation time, then namespace/name);
//! - exhaustion leaves the lease Pending with a reason; nothing is ever stolen.

mod pool;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use keyway_crds::addresses::AddressSet;

pub use crate::key::LeaseKey;
use pool::PoolState;

/// What the allocator needs to know of a lease.
#[derive(Clone, Debug)]
pub struct LeaseRequest {
    /// Identity.
    pub key: LeaseKey,
    /// Age: smaller is older; ties broken by key.
    pub created: u64,
    /// Tenant.
    pub user: String,
    /// IPPool name.
    pub pool: String,
    /// Settled leases hold nothing.
    pub settled: bool,
    /// The IP the lease's status records. Honoured when the allocator does not
    /// hold the lease yet (restart, resync): "assigned first".
    pub status_ip: Option<IpAddr>,
}

/// A lease's allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Assignment {
    /// Holds this IP.
    Assigned(IpAddr),
    /// Waits for an address.
    Pending(PendingReason),
    /// Settled: holds nothing.
    Released,
}

/// Why a lease waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PendingReason {
    /// The pool does not exist (yet).
    PoolNotFound {
        /// Pool name.
        pool: String,
    },
    /// The user already holds every address of the pool.
    Exhausted {
        /// Pool name.
        pool: String,
        /// Tenant.
        user: String,
        /// Addresses in the pool.
        capacity: u128,
    },
}

impl fmt::Display for PendingReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PendingReason::PoolNotFound { pool } => write!(f, "IPPool {pool:?} not found"),
            PendingReason::Exhausted {
                pool,
                user,
                capacity,
            } => write!(
                f,
                "pool {pool:?} has {capacity} address(es) and user {user:?} already holds a lease on each of them; \
                 grow the pool or settle one of {user:?}'s leases"
            ),
        }
    }
}

/// Why a lease's IP changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoveReason {
    /// The IP was removed from the pool.
    LeftPool,
    /// An older lease of the same user claimed the IP.
    Conflict,
    /// The pool was deleted.
    PoolRemoved,
    /// The lease's user or pool changed.
    UserOrPoolChanged,
}

/// Something the allocator did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A lease without an IP got one.
    Allocated {
        /// Lease.
        lease: LeaseKey,
        /// IP.
        ip: IpAddr,
    },
    /// A lease gave its IP back (settled or deleted).
    Released {
        /// Lease.
        lease: LeaseKey,
        /// IP.
        ip: IpAddr,
    },
    /// A lease's IP changed (`to: None`: it now waits).
    Moved {
        /// Lease.
        lease: LeaseKey,
        /// Old IP.
        from: IpAddr,
        /// New IP.
        to: Option<IpAddr>,
        /// Why.
        reason: MoveReason,
    },
    /// Two leases of one user claimed one IP; the older keeps it.
    Conflict {
        /// IP.
        ip: IpAddr,
        /// Pool.
        pool: String,
        /// Tenant.
        user: String,
        /// Keeps the IP.
        winner: LeaseKey,
        /// Moves.
        loser: LeaseKey,
    },
    /// A lease could not get an address.
    Exhausted {
        /// Lease.
        lease: LeaseKey,
        /// Pool.
        pool: String,
    },
}

/// Pool figures for status.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Addresses.
    pub capacity: u128,
    /// Leases holding an address.
    pub allocated: u64,
    /// Users holding at least one address.
    pub users: u64,
    /// Most live leases of one user in the pool.
    pub max_leases_per_user: u64,
    /// Leases waiting for lack of addresses.
    pub pending: u64,
}

type Lid = usize;
type Uid = u32;

#[derive(Clone, Debug)]
struct Lease {
    key: LeaseKey,
    created: u64,
    user: Uid,
    pool: String,
    settled: bool,
    assignment: Assignment,
    /// Where it held an address last, preferred when it needs one again.
    last_ip: Option<IpAddr>,
}

/// Age order: older first, then by key.
type AgeKey = (u64, LeaseKey);

/// See the module docs.
#[derive(Default)]
pub struct Allocator {
    leases: Vec<Option<Lease>>,
    free: Vec<Lid>,
    index: ahash::AHashMap<LeaseKey, Lid>,
    users: ahash::AHashMap<String, Uid>,
    user_names: Vec<String>,
    pools: HashMap<String, PoolState>,
    /// Leases naming a pool that does not exist, by pool name.
    orphans: HashMap<String, BTreeSet<AgeKey>>,
    /// Leases whose assignment may have changed since [`Allocator::take_touched`].
    touched: Vec<LeaseKey>,
}

impl Allocator {
    /// An empty allocator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Restart from status: pools first, then every live lease that records an
    /// IP keeps it (oldest first, so conflicts go to the older), then the rest
    /// are allocated oldest first.
    pub fn restore(
        pools: impl IntoIterator<Item = (String, AddressSet)>,
        leases: impl IntoIterator<Item = LeaseRequest>,
    ) -> (Self, Vec<Event>) {
        let mut a = Allocator::new();
        for (name, set) in pools {
            a.pools.insert(name, PoolState::new(set));
        }
        let mut by_pool: HashMap<String, Vec<Lid>> = HashMap::new();
        for req in leases {
            if a.index.contains_key(&req.key) {
                continue; // the front door never sends duplicates; ignore if it does
            }
            let settled = req.settled;
            let pool = req.pool.clone();
            let lid = a.insert(req);
            if settled {
                continue;
            }
            if a.pools.contains_key(&pool) {
                by_pool.entry(pool).or_default().push(lid);
            } else {
                a.orphan(lid);
            }
        }
        let mut events = Vec::new();
        let mut names: Vec<String> = by_pool.keys().cloned().collect();
        names.sort();
        for name in names {
            let members = by_pool.remove(&name).unwrap_or_default();
            a.place_all(&name, members, true, &mut events);
        }
        (a, events)
    }

    fn insert(&mut self, req: LeaseRequest) -> Lid {
        let user = self.intern(&req.user);
        let lease = Lease {
            key: req.key.clone(),
            created: req.created,
            user,
            pool: req.pool,
            settled: req.settled,
            assignment: if req.settled {
                Assignment::Released
            } else {
                Assignment::Pending(PendingReason::PoolNotFound {
                    pool: String::new(),
                })
            },
            last_ip: req.status_ip,
        };
        let lid = match self.free.pop() {
            Some(lid) => {
                self.leases[lid] = Some(lease);
                lid
            }
            None => {
                self.leases.push(Some(lease));
                self.leases.len() - 1
            }
        };
        self.index.insert(req.key, lid);
        lid
    }

    fn intern(&mut self, user: &str) -> Uid {
        if let Some(u) = self.users.get(user) {
            return *u;
        }
        let id = Uid::try_from(self.user_names.len()).unwrap_or(Uid::MAX);
        self.users.insert(user.to_string(), id);
        self.user_names.push(user.to_string());
        id
    }

    fn lease(&self, lid: Lid) -> Option<&Lease> {
        self.leases.get(lid)?.as_ref()
    }

    /// Every change to a lease goes through here, so it is noted as touched.
    fn lease_mut(&mut self, lid: Lid) -> Option<&mut Lease> {
        let l = self.leases.get_mut(lid)?.as_mut()?;
        self.touched.push(l.key.clone());
        Some(l)
    }

    fn age(&self, lid: Lid) -> Option<AgeKey> {
        self.lease(lid).map(|l| (l.created, l.key.clone()))
    }

    fn user_name(&self, uid: Uid) -> String {
        self.user_names
            .get(uid as usize)
            .cloned()
            .unwrap_or_default()
    }

    fn orphan(&mut self, lid: Lid) {
        let Some(l) = self.lease_mut(lid) else { return };
        l.assignment = Assignment::Pending(PendingReason::PoolNotFound {
            pool: l.pool.clone(),
        });
        let (pool, age) = (l.pool.clone(), (l.created, l.key.clone()));
        self.orphans.entry(pool).or_default().insert(age);
    }

    /// Places a batch of leases into a pool: first every lease whose preferred
    /// IP (its current or last one) is in the pool, oldest first so the older
    /// wins a conflict; then the rest, oldest first, least-loaded.
    ///
    /// Leases that hold an address go first and keep it wherever it survived,
    /// so a pool edit never displaces anyone. `claims` says the others'
    /// preferred IPs come from their status (a restore): then two claims on one
    /// IP are a conflict the older wins. Otherwise a remembered IP is taken only
    /// if free.
    fn place_all(
        &mut self,
        pool_name: &str,
        mut members: Vec<Lid>,
        claims: bool,
        events: &mut Vec<Event>,
    ) {
        members.sort_unstable_by(|a, b| {
            let key = |lid: &Lid| {
                self.lease(*lid).map(|l| {
                    let holds = matches!(l.assignment, Assignment::Assigned(_));
                    (!holds, l.created, &l.key)
                })
            };
            key(a).cmp(&key(b))
        });
        let before: Vec<Assignment> = members
            .iter()
            .map(|lid| {
                self.lease(*lid)
                    .map_or(Assignment::Released, |l| l.assignment.clone())
            })
            .collect();
        let mut rest = Vec::new();
        for &lid in &members {
            let Some(l) = self.lease(lid) else { continue };
            let user = l.user;
            let (preferred, holds) = match &l.assignment {
                Assignment::Assigned(ip) => (Some(*ip), true),
                _ => (l.last_ip, false),
            };
            let Some(pool) = self.pools.get_mut(pool_name) else {
                return;
            };
            let Some(off) = preferred.and_then(|ip| pool.set.offset_of(ip)) else {
                rest.push(lid);
                continue;
            };
            match pool.holder(user, off) {
                None => {
                    pool.take(user, off, lid);
                    self.set_assigned(lid, pool_name, off);
                }
                Some(winner) => {
                    if let (true, Some(ip), Some(w)) =
                        (claims || holds, preferred, self.lease(winner))
                    {
                        events.push(Event::Conflict {
                            ip,
                            pool: pool_name.to_string(),
                            user: self.user_name(user),
                            winner: w.key.clone(),
                            loser: self
                                .lease(lid)
                                .map(|l| l.key.clone())
                                .unwrap_or_else(|| w.key.clone()),
                        });
                    }
                    rest.push(lid);
                }
            }
        }
        for lid in rest {
            self.place_fresh(pool_name, lid);
        }
        for (lid, before) in members.into_iter().zip(before) {
            self.diff_event(lid, &before, MoveReason::LeftPool, events);
        }
    }

    fn set_assigned(&mut self, lid: Lid, pool_name: &str, off: u128) {
        let ip = self.pools.get(pool_name).and_then(|p| p.set.nth(off));
        if let (Some(l), Some(ip)) = (self.lease_mut(lid), ip) {
            l.assignment = Assignment::Assigned(ip);
            l.last_ip = Some(ip);
        }
    }

    /// Least-loaded address the user does not hold, or Pending(Exhausted).
    fn place_fresh(&mut self, pool_name: &str, lid: Lid) {
        let Some(l) = self.lease(lid) else { return };
        let (user, age) = (l.user, (l.created, l.key.clone()));
        let user_name = self.user_name(user);
        let Some(pool) = self.pools.get_mut(pool_name) else {
            return;
        };
        match pool.pick(user) {
            Some(off) => {
                pool.take(user, off, lid);
                self.set_assigned(lid, pool_name, off);
            }
            None => {
                let capacity = pool.set.len();
                pool.add_pending(user, age, lid);
                if let Some(l) = self.lease_mut(lid) {
                    l.assignment = Assignment::Pending(PendingReason::Exhausted {
                        pool: pool_name.to_string(),
                        user: user_name,
                        capacity,
                    });
                }
            }
        }
    }

    /// Emits the event describing how a lease's assignment changed.
    fn diff_event(
        &self,
        lid: Lid,
        before: &Assignment,
        reason: MoveReason,
        events: &mut Vec<Event>,
    ) {
        let Some(l) = self.lease(lid) else { return };
        let lease = l.key.clone();
        match (before, &l.assignment) {
            (Assignment::Assigned(a), Assignment::Assigned(b)) if a == b => {}
            (Assignment::Assigned(from), Assignment::Assigned(to)) => events.push(Event::Moved {
                lease,
                from: *from,
                to: Some(*to),
                reason,
            }),
            (Assignment::Assigned(from), Assignment::Pending(_)) => {
                events.push(Event::Moved {
                    lease: lease.clone(),
                    from: *from,
                    to: None,
                    reason,
                });
                if matches!(
                    l.assignment,
                    Assignment::Pending(PendingReason::Exhausted { .. })
                ) {
                    events.push(Event::Exhausted {
                        lease,
                        pool: l.pool.clone(),
                    });
                }
            }
            (Assignment::Assigned(ip), Assignment::Released) => {
                events.push(Event::Released { lease, ip: *ip })
            }
            (_, Assignment::Assigned(ip)) => events.push(Event::Allocated { lease, ip: *ip }),
            (
                Assignment::Pending(PendingReason::Exhausted { .. }),
                Assignment::Pending(PendingReason::Exhausted { .. }),
            ) => {}
            (_, Assignment::Pending(PendingReason::Exhausted { pool, .. })) => {
                events.push(Event::Exhausted {
                    lease,
                    pool: pool.clone(),
                })
            }
            _ => {}
        }
    }

    /// Takes a lease out of wherever it is (its address, a pending set, the
    /// orphan list). Returns the (pool, user) whose capacity grew, if any.
    fn detach(&mut self, lid: Lid) -> Option<(String, Uid)> {
        let l = self.lease(lid)?.clone();
        match &l.assignment {
            Assignment::Assigned(ip) => {
                let pool = self.pools.get_mut(&l.pool)?;
                if let Some(off) = pool.set.offset_of(*ip) {
                    pool.release(l.user, off);
                }
                Some((l.pool.clone(), l.user))
            }
            Assignment::Pending(PendingReason::Exhausted { .. }) => {
                if let Some(pool) = self.pools.get_mut(&l.pool) {
                    pool.remove_pending(l.user, (l.created, l.key.clone()), lid);
                }
                None
            }
            Assignment::Pending(PendingReason::PoolNotFound { .. }) => {
                if let Some(set) = self.orphans.get_mut(&l.pool) {
                    set.remove(&(l.created, l.key.clone()));
                    if set.is_empty() {
                        self.orphans.remove(&l.pool);
                    }
                }
                None
            }
            Assignment::Released => None,
        }
    }

    /// Gives a freed slot to the user's oldest waiting leases in that pool.
    fn retry_pending(&mut self, pool_name: &str, user: Uid, events: &mut Vec<Event>) {
        loop {
            let Some(pool) = self.pools.get_mut(pool_name) else {
                return;
            };
            if pool.pick(user).is_none() {
                return;
            }
            let Some(lid) = pool.pop_pending(user) else {
                return;
            };
            let before = self
                .lease(lid)
                .map(|l| l.assignment.clone())
                .unwrap_or(Assignment::Released);
            self.place_one(pool_name, lid, false, events);
            self.diff_event(lid, &before, MoveReason::LeftPool, events);
        }
    }

    /// Places one lease: its preferred IP if free for its user, else
    /// least-loaded. With `claim` (the IP comes from the lease's status, i.e. a
    /// resync), a younger lease of the same user holding it gives it up: older
    /// wins. Without (a remembered IP after an edit), nobody is displaced.
    fn place_one(&mut self, pool_name: &str, lid: Lid, claim: bool, events: &mut Vec<Event>) {
        let Some(l) = self.lease(lid) else { return };
        let (user, preferred) = (l.user, l.last_ip);
        let Some(pool) = self.pools.get(pool_name) else {
            return;
        };
        if let Some((ip, off)) = preferred.and_then(|ip| Some((ip, pool.set.offset_of(ip)?))) {
            match pool.holder(user, off) {
                None => {
                    if let Some(pool) = self.pools.get_mut(pool_name) {
                        pool.take(user, off, lid);
                    }
                    self.set_assigned(lid, pool_name, off);
                    return;
                }
                Some(holder) if holder != lid && claim => {
                    let (mine, theirs) = (self.age(lid), self.age(holder));
                    let (winner, loser) = if mine < theirs {
                        (lid, holder)
                    } else {
                        (holder, lid)
                    };
                    events.push(Event::Conflict {
                        ip,
                        pool: pool_name.to_string(),
                        user: self.user_name(user),
                        winner: self
                            .lease(winner)
                            .map(|l| l.key.clone())
                            .unwrap_or_else(|| LeaseKey {
                                namespace: String::new(),
                                name: String::new(),
                            }),
                        loser: self.lease(loser).map(|l| l.key.clone()).unwrap_or_else(|| {
                            LeaseKey {
                                namespace: String::new(),
                                name: String::new(),
                            }
                        }),
                    });
                    if winner == lid {
                        // The older lease takes its IP back; the younger moves.
                        if let Some(pool) = self.pools.get_mut(pool_name) {
                            pool.release(user, off);
                            pool.take(user, off, lid);
                        }
                        self.set_assigned(lid, pool_name, off);
                        self.place_fresh(pool_name, holder);
                        self.diff_event(
                            holder,
                            &Assignment::Assigned(ip),
                            MoveReason::Conflict,
                            events,
                        );
                        return;
                    }
                }
                Some(_) => {}
            }
        }
        self.place_fresh(pool_name, lid);
    }

    /// Creates or updates a pool. Leases whose IP left it move (oldest first);
    /// everyone else keeps their IP; waiting leases get a chance.
    pub fn set_pool(&mut self, name: &str, addresses: AddressSet) -> Vec<Event> {
        let mut events = Vec::new();
        if self.pools.get(name).is_some_and(|p| p.set == addresses) {
            return events;
        }
        // Every lease that is in, waits for, or wants this pool is re-placed in
        // the new pool; assigned ones keep their IP where it survived.
        let mut members: Vec<Lid> = Vec::new();
        if let Some(old) = self.pools.remove(name) {
            members.extend(old.members());
        }
        if let Some(orphans) = self.orphans.remove(name) {
            members.extend(
                orphans
                    .iter()
                    .filter_map(|(_, k)| self.index.get(k).copied()),
            );
        }
        members.sort_unstable();
        members.dedup();
        self.pools
            .insert(name.to_string(), PoolState::new(addresses));
        self.place_all(name, members, false, &mut events);
        events
    }

    /// Deletes a pool: its leases wait (PoolNotFound) and remember their IP.
    pub fn remove_pool(&mut self, name: &str) -> Vec<Event> {
        let mut events = Vec::new();
        let Some(old) = self.pools.remove(name) else {
            return events;
        };
        let mut members: Vec<Lid> = old.members().collect();
        members.sort_unstable();
        members.dedup();
        for lid in members {
            let before = self
                .lease(lid)
                .map(|l| l.assignment.clone())
                .unwrap_or(Assignment::Released);
            self.orphan(lid);
            self.diff_event(lid, &before, MoveReason::PoolRemoved, &mut events);
        }
        events
    }

    /// Creates, edits, settles or unsettles a lease.
    pub fn upsert_lease(&mut self, req: LeaseRequest) -> Vec<Event> {
        let mut events = Vec::new();
        let lid = match self.index.get(&req.key) {
            Some(&lid) => lid,
            None => {
                let settled = req.settled;
                let pool = req.pool.clone();
                let lid = self.insert(req);
                if !settled {
                    if self.pools.contains_key(&pool) {
                        let before = Assignment::Released;
                        self.place_one(&pool, lid, true, &mut events);
                        self.diff_event(lid, &before, MoveReason::Conflict, &mut events);
                    } else {
                        self.orphan(lid);
                    }
                }
                return events;
            }
        };
        let Some(l) = self.lease(lid) else {
            return events;
        };
        let user = self.users.get(&req.user).copied();
        if user == Some(l.user) && l.pool == req.pool && l.settled == req.settled {
            return events;
        }
        let before = l.assignment.clone();
        let identity_changed = user != Some(l.user) || l.pool != req.pool;
        let freed = self.detach(lid);
        let new_user = self.intern(&req.user);
        if let Some(l) = self.lease_mut(lid) {
            l.user = new_user;
            l.pool = req.pool.clone();
            l.settled = req.settled;
            l.assignment = Assignment::Released;
        }
        if !req.settled {
            if self.pools.contains_key(&req.pool) {
                self.place_one(&req.pool, lid, false, &mut events);
            } else {
                self.orphan(lid);
            }
        }
        let reason = if identity_changed {
            MoveReason::UserOrPoolChanged
        } else {
            MoveReason::LeftPool
        };
        self.diff_event(lid, &before, reason, &mut events);
        if let Some((pool, user)) = freed {
            self.retry_pending(&pool, user, &mut events);
        }
        events
    }

    /// Deletes a lease: its IP is released.
    pub fn remove_lease(&mut self, key: &LeaseKey) -> Vec<Event> {
        let mut events = Vec::new();
        let Some(&lid) = self.index.get(key) else {
            return events;
        };
        let before = self
            .lease(lid)
            .map(|l| l.assignment.clone())
            .unwrap_or(Assignment::Released);
        let freed = self.detach(lid);
        if let Assignment::Assigned(ip) = before {
            events.push(Event::Released {
                lease: key.clone(),
                ip,
            });
        }
        self.index.remove(key);
        self.leases[lid] = None;
        self.free.push(lid);
        if let Some((pool, user)) = freed {
            self.retry_pending(&pool, user, &mut events);
        }
        events
    }

    /// The leases whose assignment may have changed since the last call
    /// (possibly repeated; a superset): what the caller must re-derive.
    pub fn take_touched(&mut self) -> Vec<LeaseKey> {
        std::mem::take(&mut self.touched)
    }

    /// A lease's allocation.
    pub fn assignment(&self, key: &LeaseKey) -> Option<&Assignment> {
        self.lease(*self.index.get(key)?).map(|l| &l.assignment)
    }

    /// Every lease's allocation.
    pub fn assignments(&self) -> impl Iterator<Item = (&LeaseKey, &Assignment)> {
        self.leases
            .iter()
            .flatten()
            .map(|l| (&l.key, &l.assignment))
    }

    /// Figures of one pool; `None` if it does not exist.
    pub fn pool_stats(&self, pool: &str) -> Option<PoolStats> {
        self.pools.get(pool).map(PoolState::stats)
    }

    /// Leases known.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// No lease known.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn set(a: &str) -> AddressSet {
        AddressSet::new(&[a.to_string()], &[]).unwrap()
    }
    fn req(name: &str, user: &str, created: u64) -> LeaseRequest {
        LeaseRequest {
            key: LeaseKey {
                namespace: "d".into(),
                name: name.into(),
            },
            created,
            user: user.into(),
            pool: "p".into(),
            settled: false,
            status_ip: None,
        }
    }
    fn ip(a: &Allocator, name: &str) -> Option<IpAddr> {
        match a.assignment(&LeaseKey {
            namespace: "d".into(),
            name: name.into(),
        })? {
            Assignment::Assigned(ip) => Some(*ip),
            _ => None,
        }
    }

    #[test]
    fn spreads_and_stays_unique_per_user() {
        let mut a = Allocator::new();
        a.set_pool("p", set("10.0.0.1-10.0.0.2"));
        a.upsert_lease(req("a1", "alice", 1));
        a.upsert_lease(req("b1", "bob", 2));
        a.upsert_lease(req("a2", "alice", 3));
        assert_eq!(ip(&a, "a1"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(
            ip(&a, "b1"),
            Some("10.0.0.2".parse().unwrap()),
            "least-loaded"
        );
        assert_eq!(ip(&a, "a2"), Some("10.0.0.2".parse().unwrap()));
        let ev = a.upsert_lease(req("a3", "alice", 4));
        assert!(matches!(ev[0], Event::Exhausted { .. }), "{ev:?}");
        // Settling a1 frees 10.0.0.1 for alice's waiting lease.
        let mut s = req("a1", "alice", 1);
        s.settled = true;
        a.upsert_lease(s);
        assert_eq!(ip(&a, "a3"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(a.pool_stats("p").unwrap().pending, 0);
    }

    #[test]
    fn restore_prefers_status_and_older_wins() {
        let mut x = req("old", "u", 1);
        x.status_ip = Some("10.0.0.2".parse().unwrap());
        let mut y = req("new", "u", 2);
        y.status_ip = Some("10.0.0.2".parse().unwrap());
        let (a, ev) = Allocator::restore([("p".to_string(), set("10.0.0.1-10.0.0.3"))], [y, x]);
        assert_eq!(ip(&a, "old"), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(ip(&a, "new"), Some("10.0.0.1".parse().unwrap()));
        assert!(
            ev.iter()
                .any(|e| matches!(e, Event::Conflict { winner, .. } if winner.name == "old"))
        );
    }

    #[test]
    fn shrink_moves_only_leavers() {
        let mut a = Allocator::new();
        a.set_pool("p", set("10.0.0.1-10.0.0.3"));
        for (i, n) in ["a", "b", "c"].iter().enumerate() {
            a.upsert_lease(req(n, n, i as u64));
        }
        assert_eq!(ip(&a, "c"), Some("10.0.0.3".parse().unwrap()));
        let ev = a.set_pool("p", set("10.0.0.1-10.0.0.2"));
        assert_eq!(ip(&a, "a"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(ip(&a, "b"), Some("10.0.0.2".parse().unwrap()));
        assert!(ip(&a, "c").is_some());
        assert_eq!(ev.len(), 1, "{ev:?}");
    }
}
