//! Property tests of the allocator: random sequences of lease and pool
//! operations, with every invariant of DESIGN.md checked after every step by an
//! oracle written plainly here (not by asking the allocator).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use keyway_core::allocator::{Allocator, Assignment, LeaseKey, LeaseRequest, PendingReason};
use keyway_crds::addresses::AddressSet;
use proptest::prelude::*;

const USERS: [&str; 3] = ["alice", "bob", "carol"];
const POOLS: [&str; 2] = ["v4", "v6"];

#[derive(Clone, Debug)]
enum Op {
    Create { user: usize, pool: usize },
    Settle(usize),
    Unsettle(usize),
    Delete(usize),
    ChangeUser { lease: usize, user: usize },
    Resize { pool: usize, size: usize },
    RemovePool(usize),
    Restart,
    HandEdit { a: usize, b: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..2usize).prop_map(|(user, pool)| Op::Create { user, pool }),
        1 => (0..64usize).prop_map(Op::Settle),
        1 => (0..64usize).prop_map(Op::Unsettle),
        1 => (0..64usize).prop_map(Op::Delete),
        1 => (0..64usize, 0..3usize).prop_map(|(lease, user)| Op::ChangeUser { lease, user }),
        2 => (0..2usize, 0..5usize).prop_map(|(pool, size)| Op::Resize { pool, size }),
        1 => (0..2usize).prop_map(Op::RemovePool),
        1 => Just(Op::Restart),
        1 => (0..64usize, 0..64usize).prop_map(|(a, b)| Op::HandEdit { a, b }),
    ]
}

fn addresses(pool: usize, size: usize) -> Vec<IpAddr> {
    (1..=size)
        .map(|i| {
            if pool == 0 {
                format!("10.0.0.{i}").parse().unwrap()
            } else {
                format!("2001:db8::{i:x}").parse().unwrap()
            }
        })
        .collect()
}

fn set_of(pool: usize, size: usize) -> AddressSet {
    let spec = if pool == 0 {
        vec![format!("10.0.0.1-10.0.0.{size}")]
    } else {
        vec![format!("2001:db8::1-2001:db8::{size:x}")]
    };
    AddressSet::new(&spec, &[]).unwrap()
}

fn key(name: &str) -> LeaseKey {
    LeaseKey {
        namespace: "ns".into(),
        name: name.into(),
    }
}

/// The model: what exists, independently of the allocator.
struct Model {
    alloc: Allocator,
    pools: BTreeMap<usize, usize>, // pool index -> size (size 0 = removed is modelled by absence)
    leases: BTreeMap<String, LeaseRequest>,
    next: u64,
}

impl Model {
    fn ip(&self, name: &str) -> Option<IpAddr> {
        match self.alloc.assignment(&key(name))? {
            Assignment::Assigned(ip) => Some(*ip),
            _ => None,
        }
    }
    fn snapshot(&self) -> BTreeMap<String, Option<IpAddr>> {
        self.leases
            .keys()
            .map(|n| (n.clone(), self.ip(n)))
            .collect()
    }
    fn pick(&self, i: usize) -> Option<String> {
        let n = self.leases.len();
        (n > 0).then(|| self.leases.keys().nth(i % n).unwrap().clone())
    }
    fn pool_addrs(&self, pool: &str) -> Option<Vec<IpAddr>> {
        let idx = POOLS.iter().position(|p| *p == pool)?;
        self.pools.get(&idx).map(|size| addresses(idx, *size))
    }
    fn restore(&mut self, overrides: &HashMap<String, IpAddr>) {
        let reqs: Vec<LeaseRequest> = self
            .leases
            .values()
            .map(|r| LeaseRequest {
                status_ip: overrides
                    .get(&r.key.name)
                    .copied()
                    .or_else(|| self.ip(&r.key.name)),
                ..r.clone()
            })
            .collect();
        let pools = self
            .pools
            .iter()
            .map(|(i, s)| (POOLS[*i].to_string(), set_of(*i, *s)));
        self.alloc = Allocator::restore(pools, reqs).0;
    }
}

/// Every invariant that must hold in any state.
fn check_state(m: &Model) -> Result<(), TestCaseError> {
    let mut seen: BTreeSet<(String, String, IpAddr)> = BTreeSet::new();
    let mut live: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut assigned: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (name, r) in &m.leases {
        let a = m.alloc.assignment(&key(name)).cloned();
        if r.settled {
            prop_assert_eq!(
                a,
                Some(Assignment::Released),
                "settled {} must hold nothing",
                name
            );
            continue;
        }
        *live.entry((r.pool.clone(), r.user.clone())).or_default() += 1;
        match (a, m.pool_addrs(&r.pool)) {
            (Some(Assignment::Assigned(ip)), Some(addrs)) => {
                prop_assert!(
                    addrs.contains(&ip),
                    "{} holds {} outside pool {}",
                    name,
                    ip,
                    r.pool
                );
                prop_assert!(
                    seen.insert((r.pool.clone(), r.user.clone(), ip)),
                    "user {} holds {} twice in {}",
                    r.user,
                    ip,
                    r.pool
                );
                *assigned
                    .entry((r.pool.clone(), r.user.clone()))
                    .or_default() += 1;
            }
            (Some(Assignment::Pending(PendingReason::PoolNotFound { .. })), None) => {}
            (Some(Assignment::Pending(PendingReason::Exhausted { .. })), Some(_)) => {}
            (other, addrs) => {
                prop_assert!(false, "{} in state {:?} with pool {:?}", name, other, addrs)
            }
        }
    }
    // Capacity: a user with n live leases in a pool of k gets min(n, k).
    for ((pool, user), n) in &live {
        if let Some(addrs) = m.pool_addrs(pool) {
            let got = assigned
                .get(&(pool.clone(), user.clone()))
                .copied()
                .unwrap_or(0);
            prop_assert_eq!(got, (*n).min(addrs.len()), "user {} in pool {}", user, pool);
        }
    }
    // Pool figures agree with the oracle.
    for (i, size) in &m.pools {
        let stats = m.alloc.pool_stats(POOLS[*i]).unwrap();
        let pool = POOLS[*i].to_string();
        prop_assert_eq!(stats.capacity, *size as u128);
        let alloc_here: usize = assigned
            .iter()
            .filter(|((p, _), _)| *p == pool)
            .map(|(_, n)| n)
            .sum();
        prop_assert_eq!(stats.allocated, alloc_here as u64);
        let users = assigned
            .iter()
            .filter(|((p, _), n)| *p == pool && **n > 0)
            .count();
        prop_assert_eq!(stats.users, users as u64);
        let max = live
            .iter()
            .filter(|((p, _), _)| *p == pool)
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0);
        prop_assert_eq!(stats.max_leases_per_user, max as u64);
    }
    Ok(())
}

fn load_of(m: &Model, pool: &str) -> HashMap<IpAddr, usize> {
    let mut load = HashMap::new();
    for (name, r) in &m.leases {
        if r.pool == pool
            && let Some(ip) = m.ip(name)
        {
            *load.entry(ip).or_default() += 1;
        }
    }
    load
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut m = Model {
        alloc: Allocator::new(),
        pools: BTreeMap::new(),
        leases: BTreeMap::new(),
        next: 0,
    };
    m.pools.insert(0, 2);
    m.alloc.set_pool("v4", set_of(0, 2));
    m.pools.insert(1, 3);
    m.alloc.set_pool("v6", set_of(1, 3));
    for op in ops {
        let before = m.snapshot();
        // Leases whose IP may legitimately change in this step.
        let mut may_move: BTreeSet<String> = BTreeSet::new();
        match &op {
            Op::Create { user, pool } => {
                m.next += 1;
                let name = format!("l{}", m.next);
                let r = LeaseRequest {
                    key: key(&name),
                    created: m.next,
                    user: USERS[*user].into(),
                    pool: POOLS[*pool].into(),
                    settled: false,
                    status_ip: None,
                };
                // Least-loaded: compute the allowed IPs and their loads first.
                let allowed: Option<(Vec<IpAddr>, HashMap<IpAddr, usize>)> =
                    m.pool_addrs(&r.pool).map(|addrs| {
                        let mine: BTreeSet<IpAddr> = m
                            .leases
                            .iter()
                            .filter(|(_, o)| o.user == r.user && o.pool == r.pool)
                            .filter_map(|(n, _)| m.ip(n))
                            .collect();
                        (
                            addrs.into_iter().filter(|a| !mine.contains(a)).collect(),
                            load_of(&m, &r.pool),
                        )
                    });
                m.leases.insert(name.clone(), r.clone());
                m.alloc.upsert_lease(r);
                if let (Some((allowed, load)), Some(ip)) = (allowed, m.ip(&name)) {
                    let min = allowed
                        .iter()
                        .map(|a| load.get(a).copied().unwrap_or(0))
                        .min()
                        .unwrap();
                    prop_assert_eq!(
                        load.get(&ip).copied().unwrap_or(0),
                        min,
                        "{} is not least-loaded",
                        ip
                    );
                }
            }
            Op::Settle(i) | Op::Unsettle(i) => {
                if let Some(name) = m.pick(*i) {
                    let mut r = m.leases[&name].clone();
                    r.settled = matches!(op, Op::Settle(_));
                    m.leases.insert(name.clone(), r.clone());
                    m.alloc.upsert_lease(r);
                    may_move.insert(name);
                }
            }
            Op::Delete(i) => {
                if let Some(name) = m.pick(*i) {
                    m.leases.remove(&name);
                    m.alloc.remove_lease(&key(&name));
                    prop_assert!(m.alloc.assignment(&key(&name)).is_none());
                }
            }
            Op::ChangeUser { lease, user } => {
                if let Some(name) = m.pick(*lease) {
                    let mut r = m.leases[&name].clone();
                    r.user = USERS[*user].into();
                    m.leases.insert(name.clone(), r.clone());
                    m.alloc.upsert_lease(r);
                    may_move.insert(name);
                }
            }
            Op::Resize { pool, size } => {
                if *size == 0 {
                    m.pools.remove(pool);
                    m.alloc.remove_pool(POOLS[*pool]);
                } else {
                    m.pools.insert(*pool, *size);
                    m.alloc.set_pool(POOLS[*pool], set_of(*pool, *size));
                }
            }
            Op::RemovePool(pool) => {
                m.pools.remove(pool);
                m.alloc.remove_pool(POOLS[*pool]);
            }
            Op::Restart => m.restore(&HashMap::new()),
            Op::HandEdit { a, b } => {
                // Give b's status a's IP (same user and pool), as a bad hand edit would.
                if let (Some(na), Some(nb)) = (m.pick(*a), m.pick(*b)) {
                    let (ra, rb) = (m.leases[&na].clone(), m.leases[&nb].clone());
                    if na != nb
                        && ra.user == rb.user
                        && ra.pool == rb.pool
                        && let (Some(ipa), Some(_)) = (m.ip(&na), m.ip(&nb))
                    {
                        let mut ov = HashMap::new();
                        ov.insert(nb.clone(), ipa);
                        m.restore(&ov);
                        let (older, newer) = if (ra.created, &na) < (rb.created, &nb) {
                            (&na, &nb)
                        } else {
                            (&nb, &na)
                        };
                        prop_assert_eq!(
                            m.ip(older),
                            Some(ipa),
                            "the older lease must keep the contested IP"
                        );
                        prop_assert_ne!(m.ip(newer), Some(ipa));
                        may_move.insert(nb.clone());
                        may_move.insert(na.clone());
                    }
                }
            }
        }
        check_state(&m)?;
        // Stability: no lease that still holds an address of its pool moved,
        // unless the step was about it.
        let after = m.snapshot();
        for (name, ip) in &before {
            let (Some(old), Some(r)) = (ip, m.leases.get(name)) else {
                continue;
            };
            if may_move.contains(name) || r.settled {
                continue;
            }
            let still_in_pool = m.pool_addrs(&r.pool).is_some_and(|a| a.contains(old));
            if still_in_pool {
                prop_assert_eq!(
                    after.get(name).copied().flatten(),
                    Some(*old),
                    "{} moved on {:?}",
                    name,
                    op
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    #[test]
    fn invariants_hold_after_every_step(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}

#[test]
fn unsettle_prefers_the_previous_ip() {
    let mut a = Allocator::new();
    a.set_pool("p", set_of(0, 3));
    let mk = |n: &str, c: u64, settled: bool| LeaseRequest {
        key: key(n),
        created: c,
        user: "u".into(),
        pool: "p".into(),
        settled,
        status_ip: None,
    };
    a.upsert_lease(mk("a", 1, false));
    a.upsert_lease(mk("b", 2, false));
    let b_ip = a.assignment(&key("b")).cloned();
    a.upsert_lease(mk("b", 2, true));
    a.upsert_lease(mk("b", 2, false));
    assert_eq!(a.assignment(&key("b")).cloned(), b_ip);
}
