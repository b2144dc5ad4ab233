//! The incremental world against a plain oracle: random sequences of pool,
//! lease and route edits, with `take_dirty` at random points. After each
//! take, what a front door holds by re-deriving only the dirty objects (the
//! snapshot entries it published, the statuses it wrote) must equal
//!   - for entries: what the oracle below computes from scratch, written
//!     plainly (live leases sorted by age, first owner of an `(ip, key)`
//!     pair routes it by IP, the oldest resolving route of a match wins);
//!   - for statuses: every object's status derived afresh now.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use k8s_openapi::jiff::Timestamp;
use keyway_core::LeaseKey;
use keyway_core::world::{LeaseObject, PoolObject, RouteObject, RoutedInfo, Settings, World};
use keyway_crds::addresses::AddressSet;
use keyway_crds::keys::AccessKey;
use keyway_crds::validate::{
    FieldError, FieldErrors, HostPort, RouteFrom, RouteTo, Target, ValidLease, ValidRoute,
};
use keyway_snapshot::pb;
use proptest::prelude::*;
use ssh_key::public::Ed25519PublicKey;

#[derive(Clone, Debug)]
enum Op {
    Pool {
        size: u8,
    },
    DeletePool,
    Lease {
        n: u8,
        user: u8,
        key: u8,
        settled: bool,
        invalid: bool,
    },
    DeleteLease(u8),
    Route {
        n: u8,
        from: u8,
        to: u8,
        invalid: bool,
    },
    DeleteRoute(u8),
    Take,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (1u8..4).prop_map(|size| Op::Pool { size }),
        1 => Just(Op::DeletePool),
        6 => (0u8..6, 0u8..2, 0u8..3, prop::bool::weighted(0.15), prop::bool::weighted(0.1))
            .prop_map(|(n, user, key, settled, invalid)| Op::Lease { n, user, key, settled, invalid }),
        2 => (0u8..6).prop_map(Op::DeleteLease),
        3 => (0u8..3, 0u8..2, 0u8..7, prop::bool::weighted(0.1))
            .prop_map(|(n, from, to, invalid)| Op::Route { n, from, to, invalid }),
        1 => (0u8..3).prop_map(Op::DeleteRoute),
        3 => Just(Op::Take),
    ]
}

fn access_key(i: u8) -> AccessKey {
    let mut raw = [7u8; 32];
    raw[0] = i;
    AccessKey::from_key(ssh_key::PublicKey::from(Ed25519PublicKey(raw))).unwrap()
}

fn lkey(n: u8) -> LeaseKey {
    LeaseKey::new("t", &format!("vm{n}"))
}

fn rkey(n: u8) -> LeaseKey {
    LeaseKey::new("t", &format!("r{n}"))
}

fn invalid() -> FieldErrors {
    FieldErrors(vec![FieldError {
        field: "spec".into(),
        message: "bad".into(),
    }])
}

fn settings() -> Settings {
    Settings {
        public_ssh_port: 22,
        relay_ca_public_key:
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKKoNs9XCkg70lxMPr+Kwva+cmXzf8/12/Srx2GyMdae"
                .into(),
        relay_cert_validity_secs: 300,
    }
}

/// What the test applied, as the oracle reads it.
#[derive(Default)]
struct Model {
    /// Lease → (created, uid, spec in force).
    leases: BTreeMap<LeaseKey, (u64, String, Option<ValidLease>)>,
    /// Route → (created, spec).
    routes: BTreeMap<LeaseKey, (u64, Option<ValidRoute>)>,
}

/// What a front door holds: entries published and statuses written, each
/// updated only for dirty objects.
#[derive(Default)]
struct Door {
    leases: BTreeMap<(String, String), pb::Lease>,
    routes: BTreeMap<(String, String), pb::Route>,
    lease_status: HashMap<LeaseKey, serde_json::Value>,
    route_status: HashMap<LeaseKey, serde_json::Value>,
    pool_status: HashMap<String, serde_json::Value>,
}

fn now() -> Timestamp {
    Timestamp::from_second(1_700_000_000).unwrap()
}

fn take(w: &mut World, door: &mut Door) {
    let dirty = w.take_dirty();
    let d = w.snapshot_delta(&dirty, 0);
    for r in &d.removed_leases {
        door.leases.remove(&(r.namespace.clone(), r.name.clone()));
    }
    for l in d.upserted_leases {
        door.leases.insert((l.namespace.clone(), l.name.clone()), l);
    }
    for r in &d.removed_routes {
        door.routes.remove(&(r.namespace.clone(), r.name.clone()));
    }
    for r in d.upserted_routes {
        door.routes.insert((r.namespace.clone(), r.name.clone()), r);
    }
    let info = RoutedInfo::default();
    for k in &dirty.leases {
        match w.lease_status(k, None, &info, now()) {
            Some(st) => door
                .lease_status
                .insert(k.clone(), serde_json::to_value(st).unwrap()),
            None => door.lease_status.remove(k),
        };
    }
    for k in &dirty.routes {
        match w.route_status(k, None, &info, now()) {
            Some(st) => door
                .route_status
                .insert(k.clone(), serde_json::to_value(st).unwrap()),
            None => door.route_status.remove(k),
        };
    }
    for n in &dirty.pools {
        match w.pool_status(n, None, now()) {
            Some(st) => door
                .pool_status
                .insert(n.clone(), serde_json::to_value(st).unwrap()),
            None => door.pool_status.remove(n),
        };
    }
}

fn check(w: &World, m: &Model, door: &Door) -> Result<(), TestCaseError> {
    // Oracle: live leases, oldest first.
    let mut live: Vec<(u64, LeaseKey, IpAddr, &ValidLease, &String)> = m
        .leases
        .iter()
        .filter_map(|(k, (created, uid, spec))| {
            let spec = spec.as_ref().filter(|s| !s.settled)?;
            Some((*created, k.clone(), w.lease_ip(k)?, spec, uid))
        })
        .collect();
    live.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let mut owner: HashSet<(IpAddr, String)> = HashSet::new();
    let mut want_leases = BTreeMap::new();
    let mut hashes: HashMap<LeaseKey, Vec<u8>> = HashMap::new();
    for (_, k, ip, spec, uid) in &live {
        let mut disabled = Vec::new();
        for key in &spec.keys {
            if !owner.insert((*ip, key.fingerprint.clone())) {
                disabled.push(key.fingerprint.clone());
            }
        }
        let hash = keyway_crds::lease_hash(uid).to_vec();
        hashes.insert(k.clone(), hash.clone());
        want_leases.insert(
            (k.namespace.clone(), k.name.clone()),
            (ip.to_string(), hash, disabled),
        );
    }
    let got_leases: BTreeMap<_, _> = door
        .leases
        .iter()
        .map(|(k, l)| {
            (
                k.clone(),
                (
                    l.ip.clone(),
                    l.lease_hash.clone(),
                    l.ip_route_disabled_fingerprints.clone(),
                ),
            )
        })
        .collect();
    prop_assert_eq!(got_leases, want_leases);
    // Oracle: the oldest route of a match that resolves wins.
    let mut routes: Vec<(&u64, &LeaseKey, &ValidRoute)> = m
        .routes
        .iter()
        .filter_map(|(k, (c, s))| Some((c, k, s.as_ref()?)))
        .collect();
    routes.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let mut taken: HashSet<&RouteFrom> = HashSet::new();
    let mut want_routes = BTreeMap::new();
    for (_, k, spec) in routes {
        let to = match &spec.to {
            RouteTo::Address(hp) => Some(pb::route::To::Address(hp.to_string())),
            RouteTo::Lease(name) => hashes
                .get(&LeaseKey::new(&k.namespace, name))
                .map(|h| pb::route::To::LeaseHash(h.clone())),
        };
        if let Some(to) = to
            && taken.insert(&spec.from)
        {
            want_routes.insert((k.namespace.clone(), k.name.clone()), to);
        }
    }
    let got_routes: BTreeMap<_, _> = door
        .routes
        .iter()
        .map(|(k, r)| (k.clone(), r.to.clone().unwrap()))
        .collect();
    prop_assert_eq!(got_routes, want_routes);
    // Statuses written only for dirty objects equal statuses derived afresh.
    let info = RoutedInfo::default();
    let fresh: HashMap<LeaseKey, serde_json::Value> = w
        .lease_keys()
        .filter_map(|k| {
            let st = w.lease_status(k, None, &info, now())?;
            Some((k.clone(), serde_json::to_value(st).unwrap()))
        })
        .collect();
    prop_assert_eq!(&door.lease_status, &fresh);
    let fresh: HashMap<LeaseKey, serde_json::Value> = w
        .route_keys()
        .filter_map(|k| {
            let st = w.route_status(k, None, &info, now())?;
            Some((k.clone(), serde_json::to_value(st).unwrap()))
        })
        .collect();
    prop_assert_eq!(&door.route_status, &fresh);
    let fresh: HashMap<String, serde_json::Value> = w
        .pool_names()
        .filter_map(|n| {
            let st = w.pool_status(n, None, now())?;
            Some((n.clone(), serde_json::to_value(st).unwrap()))
        })
        .collect();
    prop_assert_eq!(&door.pool_status, &fresh);
    Ok(())
}

fn pool(size: u8) -> PoolObject {
    let last = format!("127.0.40.{size}");
    PoolObject {
        name: "p".into(),
        generation: Some(1),
        spec: Ok(AddressSet::new(&[format!("127.0.40.1-{last}")], &[]).unwrap()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn re_deriving_only_the_dirty_objects_matches_a_fresh_derivation(
        ops in prop::collection::vec(op(), 1..40)
    ) {
        let mut w = World::restore(settings(), vec![pool(2)], vec![], vec![]);
        let mut m = Model::default();
        let mut door = Door::default();
        take(&mut w, &mut door);
        for op in ops {
            match op {
                Op::Pool { size } => w.apply_pool(pool(size)),
                Op::DeletePool => w.delete_pool("p"),
                Op::Lease { n, user, key, settled, invalid: bad } => {
                    let k = lkey(n);
                    let created = u64::from(n) * 10;
                    let uid = format!("uid-{n}");
                    let spec = ValidLease {
                        user: format!("u{user}"),
                        pool: "p".into(),
                        keys: vec![access_key(key)],
                        target: Target::Address(HostPort { host: "127.0.0.1".into(), port: 22 }),
                        upstream_user: None,
                        settled,
                    };
                    let entry = m.leases.entry(k.clone()).or_insert((created, uid.clone(), None));
                    if !bad {
                        entry.2 = Some(spec.clone());
                    }
                    w.apply_lease(LeaseObject {
                        key: k,
                        uid,
                        created_ms: created,
                        generation: Some(1),
                        spec: if bad { Err(invalid()) } else { Ok(spec) },
                        status_ip: None,
                    });
                }
                Op::DeleteLease(n) => {
                    m.leases.remove(&lkey(n));
                    w.delete_lease(&lkey(n));
                }
                Op::Route { n, from, to, invalid: bad } => {
                    let k = rkey(n);
                    let created = u64::from(n) * 10 + 5;
                    let spec = ValidRoute {
                        from: RouteFrom::Ssh { user: format!("git{from}"), host: "127.0.40.1".parse().unwrap() },
                        to: if to == 6 {
                            RouteTo::Address(HostPort { host: "127.0.0.9".into(), port: 22 })
                        } else {
                            RouteTo::Lease(format!("vm{to}"))
                        },
                        allow_keys: vec![],
                        allow_unauthenticated: true,
                    };
                    m.routes.insert(k.clone(), (created, (!bad).then(|| spec.clone())));
                    w.apply_route(RouteObject {
                        key: k,
                        created_ms: created,
                        generation: Some(1),
                        from_raw: format!("ssh://git{from}@127.0.40.1"),
                        spec: if bad { Err(invalid()) } else { Ok(spec) },
                    });
                }
                Op::DeleteRoute(n) => {
                    m.routes.remove(&rkey(n));
                    w.delete_route(&rkey(n));
                }
                Op::Take => {
                    take(&mut w, &mut door);
                    check(&w, &m, &door)?;
                }
            }
        }
        take(&mut w, &mut door);
        check(&w, &m, &door)?;
    }
}
