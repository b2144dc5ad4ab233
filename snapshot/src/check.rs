//! The consistency check: run by the publisher before anything goes out and by
//! subscribers before they apply. A snapshot that fails is never served.
//!
//! The rules are the invariants the proxy's indexes rely on (one lease per
//! hash, one lease per `(ip, key)`, every route resolvable); a snapshot that
//! breaks one would make routing ambiguous, so the whole snapshot is refused
//! rather than half-applied.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr};

use crate::pb;

/// Checks a snapshot; on failure returns every problem found, each naming the
/// object (`lease ns/name`, `route ns/name`) and what is wrong with it.
pub fn check(s: &pb::Snapshot) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    let mut hashes: HashSet<&[u8]> = HashSet::with_capacity(s.leases.len());
    let mut names: HashSet<(&str, &str)> = HashSet::with_capacity(s.leases.len());
    let mut pool_ip_user: HashSet<(&str, IpAddr, &str)> = HashSet::with_capacity(s.leases.len());
    // (ip, fingerprint) -> index of the lease that routes it by IP.
    let mut ip_key: HashMap<(IpAddr, &str), usize> = HashMap::with_capacity(s.leases.len());
    for (i, l) in s.leases.iter().enumerate() {
        let who = lease_name(l);
        if !names.insert((&l.namespace, &l.name)) {
            errors.push(format!("{who}: appears twice"));
        }
        let ip = lease_fields(l, &mut errors);
        if l.lease_hash.len() == 32 && !hashes.insert(&l.lease_hash) {
            errors.push(format!("{who}: lease hash shared with another lease"));
        }
        let Some(ip) = ip else { continue };
        if !pool_ip_user.insert((&l.pool, ip, &l.user)) {
            errors.push(format!(
                "{who}: user {} holds {ip} in pool {} twice",
                l.user, l.pool
            ));
        }
        for fp in ip_routed_keys(l) {
            match ip_key.insert((ip, fp), i) {
                Some(other) if other != i => {
                    let o = &s.leases[other];
                    errors.push(format!(
                        "{who}: ({ip}, {fp}) already routes to lease {}/{}",
                        o.namespace, o.name
                    ));
                }
                // The same key twice in one lease routes to one place: harmless.
                _ => {}
            }
        }
    }
    let mut route_names: HashSet<(&str, &str)> = HashSet::with_capacity(s.routes.len());
    for r in &s.routes {
        let who = route_name(r);
        if !route_names.insert((&r.namespace, &r.name)) {
            errors.push(format!("{who}: appears twice"));
        }
        route_fields(r, &mut errors);
        if let Some(pb::route::To::LeaseHash(h)) = &r.to
            && !hashes.contains(h.as_slice())
        {
            errors.push(format!(
                "{who}: its lease {} is not in the snapshot",
                hex::encode(h)
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// `lease ns/name`, as problems name it.
pub(crate) fn lease_name(l: &pb::Lease) -> String {
    format!("lease {}/{}", l.namespace, l.name)
}

/// `route ns/name`, as problems name it.
pub(crate) fn route_name(r: &pb::Route) -> String {
    format!("route {}/{}", r.namespace, r.name)
}

/// The rules one lease must follow on its own; returns its IP when it parses.
pub(crate) fn lease_fields(l: &pb::Lease, errors: &mut Vec<String>) -> Option<IpAddr> {
    // Named only when something is wrong: loads take millions of leases.
    let who = || lease_name(l);
    if l.lease_hash.len() != 32 {
        errors.push(format!(
            "{}: lease hash has {} bytes, not 32",
            who(),
            l.lease_hash.len()
        ));
    }
    if l.access_keys.is_empty() {
        errors.push(format!("{}: no access keys", who()));
    }
    if l.access_keys
        .iter()
        .any(|k| k.fingerprint.is_empty() || k.openssh.is_empty())
    {
        errors.push(format!("{}: access key without key or fingerprint", who()));
    }
    match &l.target {
        Some(pb::lease::Target::Address(a)) if valid_host_port(a) => {}
        Some(pb::lease::Target::Address(a)) => {
            errors.push(format!("{}: target {a:?} is not host:port", who()))
        }
        Some(pb::lease::Target::Provider(p)) if !p.peer_id.is_empty() => {}
        Some(pb::lease::Target::Provider(_)) => {
            errors.push(format!("{}: provider without peer id", who()))
        }
        None => errors.push(format!("{}: no target", who())),
    }
    match l.ip.parse() {
        Ok(ip) => Some(ip),
        Err(_) => {
            errors.push(format!("{}: ip {:?} does not parse", who(), l.ip));
            None
        }
    }
}

/// The fingerprints a lease routes by IP. A key listed in its
/// ip_route_disabled_fingerprints works by lease hash only; whichever of two
/// leases disables it, the pair (ip, key) names one lease.
pub(crate) fn ip_routed_keys(l: &pb::Lease) -> impl Iterator<Item = &str> {
    l.access_keys
        .iter()
        .map(|k| k.fingerprint.as_str())
        .filter(|fp| !fp.is_empty() && !l.ip_route_disabled_fingerprints.iter().any(|d| d == fp))
}

/// The rules one route must follow on its own (its lease is checked by the
/// caller, which knows the other leases).
pub(crate) fn route_fields(r: &pb::Route, errors: &mut Vec<String>) {
    let who = route_name(r);
    if r.r#match.is_none() {
        errors.push(format!("{who}: no match"));
    }
    match &r.to {
        None => errors.push(format!("{who}: no destination")),
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
    if r.allow_keys.iter().any(|k| k.fingerprint.is_empty()) {
        errors.push(format!("{who}: allowed key without fingerprint"));
    }
}

/// `host:port`, `1.2.3.4:22` or `[2001:db8::1]:22` with a port from 1 to
/// 65535; the same shapes the CRD validation accepts. A bare IPv6 address
/// (`::1:22`) is refused: where its host ends is a guess.
fn valid_host_port(s: &str) -> bool {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        match rest.split_once("]:") {
            Some((h, p)) if h.parse::<Ipv6Addr>().is_ok() => (h, p),
            _ => return false,
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, p),
            _ => return false,
        }
    };
    !host.is_empty()
        && !host.contains(char::is_whitespace)
        && port.parse::<u16>().is_ok_and(|p| p != 0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn key(fp: &str) -> pb::AccessKey {
        pb::AccessKey {
            openssh: "ssh-ed25519 AAAA".into(),
            fingerprint: fp.into(),
        }
    }

    fn lease(name: &str, hash: u8, ip: &str, user: &str, fp: &str) -> pb::Lease {
        pb::Lease {
            namespace: "d".into(),
            name: name.into(),
            lease_hash: vec![hash; 32],
            user: user.into(),
            ip: ip.into(),
            pool: "p".into(),
            access_keys: vec![key(fp)],
            target: Some(pb::lease::Target::Address("127.0.0.1:22".into())),
            ..Default::default()
        }
    }

    fn route(name: &str, to: pb::route::To) -> pb::Route {
        pb::Route {
            namespace: "d".into(),
            name: name.into(),
            from: "ssh://u@h".into(),
            r#match: Some(pb::route::Match::Ssh(pb::SshMatch {
                user: "u".into(),
                host: "h".into(),
            })),
            to: Some(to),
            allow_keys: vec![key("SHA256:r")],
            allow_unauthenticated: false,
        }
    }

    /// A consistent snapshot with two leases and two routes.
    fn good() -> pb::Snapshot {
        pb::Snapshot {
            leases: vec![
                lease("a", 1, "10.0.0.1", "u", "f1"),
                // Another user shares the IP with another key.
                lease("b", 2, "10.0.0.1", "v", "f2"),
            ],
            routes: vec![
                route("to-lease", pb::route::To::LeaseHash(vec![1; 32])),
                route("to-addr", pb::route::To::Address("[2001:db8::1]:22".into())),
            ],
            ..Default::default()
        }
    }

    /// Applies `edit` to a good snapshot and expects exactly one error that
    /// names `object` and contains `needle`.
    fn fails(edit: impl FnOnce(&mut pb::Snapshot), object: &str, needle: &str) {
        let mut s = good();
        edit(&mut s);
        let errs = check(&s).expect_err(needle);
        assert_eq!(errs.len(), 1, "{needle}: {errs:?}");
        assert!(
            errs[0].starts_with(object) && errs[0].contains(needle),
            "expected {object:?} / {needle:?}, got {errs:?}"
        );
    }

    #[test]
    fn good_snapshot_passes() {
        assert_eq!(check(&good()), Ok(()));
        assert_eq!(check(&pb::Snapshot::default()), Ok(()));
    }

    #[test]
    fn lease_hash_must_be_32_bytes() {
        fails(
            |s| s.leases[1].lease_hash = vec![2; 31],
            "lease d/b",
            "31 bytes, not 32",
        );
        fails(|s| s.leases[1].lease_hash.clear(), "lease d/b", "0 bytes");
    }

    #[test]
    fn lease_hash_must_be_unique() {
        fails(
            |s| s.leases[1].lease_hash = vec![1; 32],
            "lease d/b",
            "hash shared",
        );
    }

    #[test]
    fn lease_ip_must_parse() {
        fails(
            |s| s.leases[0].ip = "10.0.0".into(),
            "lease d/a",
            "does not parse",
        );
        fails(|s| s.leases[0].ip.clear(), "lease d/a", "does not parse");
        let mut v6 = good();
        v6.leases[0].ip = "2001:db8::7".into();
        assert_eq!(check(&v6), Ok(()));
    }

    #[test]
    fn pool_ip_user_must_be_unique() {
        fails(
            |s| s.leases[1].user = "u".into(),
            "lease d/b",
            "user u holds 10.0.0.1 in pool p twice",
        );
        // The same user and IP in another pool is fine.
        let mut s = good();
        s.leases[1].user = "u".into();
        s.leases[1].pool = "q".into();
        assert_eq!(check(&s), Ok(()));
    }

    #[test]
    fn ip_and_key_must_name_one_lease() {
        fails(
            |s| s.leases[1].access_keys[0].fingerprint = "f1".into(),
            "lease d/b",
            "(10.0.0.1, f1) already routes to lease d/a",
        );
        // The same key on another IP is fine.
        let mut s = good();
        s.leases[1].access_keys[0].fingerprint = "f1".into();
        s.leases[1].ip = "10.0.0.2".into();
        assert_eq!(check(&s), Ok(()));
    }

    #[test]
    fn ip_route_disabled_fingerprints_may_repeat() {
        let mut s = good();
        s.leases[1].access_keys[0].fingerprint = "f1".into();
        s.leases[1].ip_route_disabled_fingerprints = vec!["f1".into()];
        assert_eq!(check(&s), Ok(()));
        // Disabled on the earlier lease instead: still one lease per (ip, key).
        let mut s = good();
        s.leases[1].access_keys[0].fingerprint = "f1".into();
        s.leases[0].ip_route_disabled_fingerprints = vec!["f1".into()];
        assert_eq!(check(&s), Ok(()));
    }

    #[test]
    fn a_key_twice_in_one_lease_is_harmless() {
        let mut s = good();
        s.leases[0].access_keys.push(key("f1"));
        assert_eq!(check(&s), Ok(()));
    }

    #[test]
    fn lease_needs_access_keys_with_fingerprints() {
        fails(
            |s| s.leases[0].access_keys.clear(),
            "lease d/a",
            "no access keys",
        );
        fails(
            |s| s.leases[0].access_keys[0].fingerprint.clear(),
            "lease d/a",
            "without key or fingerprint",
        );
        fails(
            |s| s.leases[0].access_keys[0].openssh.clear(),
            "lease d/a",
            "without key or fingerprint",
        );
    }

    #[test]
    fn lease_needs_a_dialable_target() {
        fails(|s| s.leases[0].target = None, "lease d/a", "no target");
        for bad in [
            "127.0.0.1",
            "127.0.0.1:",
            ":22",
            "h:0",
            "h:70000",
            "::1:22",
            "[::1]22",
            "[nope]:22",
            "a b:22",
        ] {
            fails(
                |s| s.leases[0].target = Some(pb::lease::Target::Address(bad.into())),
                "lease d/a",
                "is not host:port",
            );
        }
        for ok in ["vm.example:22", "[::1]:2222", "10.1.2.3:65535"] {
            let mut s = good();
            s.leases[0].target = Some(pb::lease::Target::Address(ok.into()));
            assert_eq!(check(&s), Ok(()), "{ok}");
        }
        fails(
            |s| s.leases[0].target = Some(pb::lease::Target::Provider(pb::Provider::default())),
            "lease d/a",
            "provider without peer id",
        );
        let mut s = good();
        s.leases[0].target = Some(pb::lease::Target::Provider(pb::Provider {
            peer_id: "12D3KooW".into(),
            addresses: vec![],
        }));
        assert_eq!(check(&s), Ok(()));
    }

    #[test]
    fn names_are_unique_per_kind() {
        fails(
            |s| s.leases[1].name = "a".into(),
            "lease d/a",
            "appears twice",
        );
        fails(
            |s| s.routes[1].name = "to-lease".into(),
            "route d/to-lease",
            "appears twice",
        );
        // Same name in another namespace, or for another kind: fine.
        let mut s = good();
        s.leases[1].name = "a".into();
        s.leases[1].namespace = "e".into();
        s.routes[0].name = "a".into();
        assert_eq!(check(&s), Ok(()));
    }

    #[test]
    fn route_needs_match_and_destination() {
        fails(
            |s| s.routes[0].r#match = None,
            "route d/to-lease",
            "no match",
        );
        fails(
            |s| s.routes[0].to = None,
            "route d/to-lease",
            "no destination",
        );
        fails(
            |s| s.routes[1].to = Some(pb::route::To::Address("nowhere".into())),
            "route d/to-addr",
            "is not host:port",
        );
    }

    #[test]
    fn route_lease_must_be_in_the_snapshot() {
        fails(
            |s| s.routes[0].to = Some(pb::route::To::LeaseHash(vec![9; 32])),
            "route d/to-lease",
            "is not in the snapshot",
        );
        // A lease whose own hash is malformed does not make routes resolve.
        fails(
            |s| s.routes[0].to = Some(pb::route::To::LeaseHash(vec![])),
            "route d/to-lease",
            "is not in the snapshot",
        );
    }

    #[test]
    fn route_needs_keys_or_explicit_open_access() {
        fails(
            |s| s.routes[0].allow_keys.clear(),
            "route d/to-lease",
            "neither allowed keys nor allowUnauthenticated",
        );
        fails(
            |s| s.routes[0].allow_keys[0].fingerprint.clear(),
            "route d/to-lease",
            "allowed key without fingerprint",
        );
        let mut s = good();
        s.routes[0].allow_keys.clear();
        s.routes[0].allow_unauthenticated = true;
        assert_eq!(check(&s), Ok(()));
    }

    #[test]
    fn every_problem_is_reported() {
        let mut s = good();
        s.leases[0].ip = "x".into();
        s.routes[1].to = None;
        assert_eq!(check(&s).unwrap_err().len(), 2);
    }
}
