//! The consistency check: run by the publisher before anything goes out and by
//! subscribers before they apply. A snapshot that fails is never served.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use crate::pb;

/// Checks a snapshot; on failure returns every problem found.
pub fn check(s: &pb::Snapshot) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    let mut hashes: HashSet<&[u8]> = HashSet::with_capacity(s.leases.len());
    let mut names: HashSet<(&str, &str)> = HashSet::with_capacity(s.leases.len());
    let mut pool_ip_user: HashSet<(&str, IpAddr, &str)> = HashSet::with_capacity(s.leases.len());
    let mut ip_key: HashMap<(IpAddr, &str), &str> = HashMap::with_capacity(s.leases.len());
    for l in &s.leases {
        let who = format!("lease {}/{}", l.namespace, l.name);
        if !names.insert((&l.namespace, &l.name)) {
            errors.push(format!("{who}: appears twice"));
        }
        if l.lease_hash.len() != 32 {
            errors.push(format!(
                "{who}: lease hash has {} bytes, not 32",
                l.lease_hash.len()
            ));
        } else if !hashes.insert(&l.lease_hash) {
            errors.push(format!("{who}: lease hash shared with another lease"));
        }
        if l.access_keys.is_empty() {
            errors.push(format!("{who}: no access keys"));
        }
        if l.access_keys
            .iter()
            .any(|k| k.fingerprint.is_empty() || k.openssh.is_empty())
        {
            errors.push(format!("{who}: access key without key or fingerprint"));
        }
        match &l.target {
            Some(pb::lease::Target::Address(a)) if valid_host_port(a) => {}
            Some(pb::lease::Target::Address(a)) => {
                errors.push(format!("{who}: target {a:?} is not host:port"))
            }
            Some(pb::lease::Target::Provider(p)) if !p.peer_id.is_empty() => {}
            Some(pb::lease::Target::Provider(_)) => {
                errors.push(format!("{who}: provider without peer id"))
            }
            None => errors.push(format!("{who}: no target")),
        }
        let ip: IpAddr = match l.ip.parse() {
            Ok(ip) => ip,
            Err(_) => {
                errors.push(format!("{who}: ip {:?} does not parse", l.ip));
                continue;
            }
        };
        if !pool_ip_user.insert((&l.pool, ip, &l.user)) {
            errors.push(format!(
                "{who}: user {} holds {ip} in pool {} twice",
                l.user, l.pool
            ));
        }
        for k in &l.access_keys {
            if l.ip_route_disabled_fingerprints.contains(&k.fingerprint) {
                continue;
            }
            if let Some(other) = ip_key.insert((ip, &k.fingerprint), &l.name) {
                errors.push(format!(
                    "{who}: ({ip}, {}) already routes to lease {other}",
                    k.fingerprint
                ));
            }
        }
    }
    let mut route_names: HashSet<(&str, &str)> = HashSet::new();
    for r in &s.routes {
        let who = format!("route {}/{}", r.namespace, r.name);
        if !route_names.insert((&r.namespace, &r.name)) {
            errors.push(format!("{who}: appears twice"));
        }
        if r.r#match.is_none() {
            errors.push(format!("{who}: no match"));
        }
        match &r.to {
            None => errors.push(format!("{who}: no destination")),
            Some(pb::route::To::LeaseHash(h)) if !hashes.contains(h.as_slice()) => {
                errors.push(format!("{who}: its lease is not in the snapshot"))
            }
            Some(pb::route::To::Address(a)) if !valid_host_port(a) => {
                errors.push(format!("{who}: destination {a:?} is not host:port"))
            }
            Some(_) => {}
        }
        if r.allow_keys.is_empty() && !r.allow_unauthenticated {
            errors.push(format!(
                "{who}: neither allowed keys nor allowUnauthenticated"
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str, hash: u8, ip: &str, user: &str, fp: &str) -> pb::Lease {
        pb::Lease {
            namespace: "d".into(),
            name: name.into(),
            lease_hash: vec![hash; 32],
            user: user.into(),
            ip: ip.into(),
            pool: "p".into(),
            access_keys: vec![pb::AccessKey {
                openssh: "ssh-ed25519 AAAA".into(),
                fingerprint: fp.into(),
            }],
            target: Some(pb::lease::Target::Address("127.0.0.1:22".into())),
            ..Default::default()
        }
    }

    fn snap(leases: Vec<pb::Lease>) -> pb::Snapshot {
        pb::Snapshot {
            leases,
            ..Default::default()
        }
    }

    #[test]
    fn good_snapshot_passes() {
        let s = snap(vec![
            lease("a", 1, "10.0.0.1", "u", "f1"),
            lease("b", 2, "10.0.0.1", "v", "f2"),
        ]);
        assert_eq!(check(&s), Ok(()));
    }

    #[test]
    fn each_rule_can_fail() {
        let cases: Vec<(pb::Snapshot, &str)> = vec![
            (
                snap(vec![
                    lease("a", 1, "10.0.0.1", "u", "f1"),
                    lease("a", 2, "10.0.0.2", "u", "f2"),
                ]),
                "twice",
            ),
            (
                snap(vec![
                    lease("a", 1, "10.0.0.1", "u", "f1"),
                    lease("b", 1, "10.0.0.2", "u", "f2"),
                ]),
                "hash shared",
            ),
            (
                snap(vec![
                    lease("a", 1, "10.0.0.1", "u", "f1"),
                    lease("b", 2, "10.0.0.1", "u", "f2"),
                ]),
                "holds 10.0.0.1",
            ),
            (
                snap(vec![
                    lease("a", 1, "10.0.0.1", "u", "f1"),
                    lease("b", 2, "10.0.0.1", "v", "f1"),
                ]),
                "already routes",
            ),
            (
                snap(vec![lease("a", 1, "nope", "u", "f1")]),
                "does not parse",
            ),
            (
                snap(vec![pb::Lease {
                    lease_hash: vec![1; 31],
                    ..lease("a", 1, "10.0.0.1", "u", "f")
                }]),
                "not 32",
            ),
            (
                snap(vec![pb::Lease {
                    target: None,
                    ..lease("a", 1, "10.0.0.1", "u", "f")
                }]),
                "no target",
            ),
            (
                snap(vec![pb::Lease {
                    access_keys: vec![],
                    ..lease("a", 1, "10.0.0.1", "u", "f")
                }]),
                "no access keys",
            ),
            (
                pb::Snapshot {
                    routes: vec![pb::Route {
                        namespace: "d".into(),
                        name: "r".into(),
                        r#match: Some(pb::route::Match::Ssh(pb::SshMatch::default())),
                        to: Some(pb::route::To::LeaseHash(vec![9; 32])),
                        allow_unauthenticated: true,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                "not in the snapshot",
            ),
        ];
        for (s, needle) in cases {
            let errs = check(&s).expect_err(needle);
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle}: {errs:?}"
            );
        }
    }

    #[test]
    fn disabled_fingerprints_may_repeat() {
        let mut b = lease("b", 2, "10.0.0.1", "v", "f1");
        b.ip_route_disabled_fingerprints = vec!["f1".into()];
        assert_eq!(
            check(&snap(vec![lease("a", 1, "10.0.0.1", "u", "f1"), b])),
            Ok(())
        );
    }
}
