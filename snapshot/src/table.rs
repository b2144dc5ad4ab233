//! A snapshot held as persistent maps keyed by namespace/name, together with
//! the indexes the consistency check needs, so that a delta is checked and
//! applied in O(change · log n) and a copy costs O(1) (the maps share
//! structure, `imbl`). The publisher keeps its current snapshot this way;
//! [`crate::check::check`] stays the whole-snapshot reference it is tested
//! against (same rules, same verdicts).
//!
//! [`Table::apply`] changes nothing when the result would break a rule: the
//! caller applies to a copy and keeps it only on success.

use std::net::IpAddr;
use std::sync::Arc;

use imbl::{HashMap, OrdMap};
use prost::bytes::Bytes;

use crate::check::{ip_routed_keys, lease_fields, lease_name, route_fields, route_name};
use crate::pb;

/// Namespace and name.
pub type Key = (String, String);

fn key_of(namespace: &str, name: &str) -> Key {
    (namespace.to_string(), name.to_string())
}

/// See the module docs.
#[derive(Clone, Debug, Default)]
pub struct Table {
    leases: OrdMap<Key, Arc<pb::Lease>>,
    routes: OrdMap<Key, Arc<pb::Route>>,
    relay: Option<pb::RelayTrust>,
    /// Lease hash → the lease that has it.
    by_hash: HashMap<Vec<u8>, Key>,
    /// (pool, ip, user) → the lease of that user holding that IP.
    by_pool_ip_user: HashMap<(String, IpAddr, String), Key>,
    /// (ip, fingerprint) → the lease that key reaches on that IP.
    by_ip_key: HashMap<(IpAddr, String), Key>,
    /// Lease hash → how many routes lead to it.
    route_refs: HashMap<Vec<u8>, usize>,
}

impl PartialEq for Table {
    fn eq(&self, other: &Self) -> bool {
        self.leases == other.leases && self.routes == other.routes && self.relay == other.relay
    }
}

impl Table {
    /// The table of a whole snapshot, or every problem the check finds.
    pub fn from_snapshot(s: &pb::Snapshot) -> Result<Table, Vec<String>> {
        let mut t = Table::default();
        t.apply(&pb::SnapshotDelta {
            upserted_leases: s.leases.clone(),
            upserted_routes: s.routes.clone(),
            relay: s.relay.clone(),
            ..Default::default()
        })?;
        Ok(t)
    }

    /// Leases held.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Routes held.
    pub fn route_count(&self) -> usize {
        self.routes.len()
    }

    /// A lease by namespace/name.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<&pb::Lease> {
        self.leases.get(&key_of(namespace, name)).map(|l| &**l)
    }

    /// A route by namespace/name.
    pub fn route(&self, namespace: &str, name: &str) -> Option<&pb::Route> {
        self.routes.get(&key_of(namespace, name)).map(|r| &**r)
    }

    /// The relay settings.
    pub fn relay(&self) -> Option<&pb::RelayTrust> {
        self.relay.as_ref()
    }

    /// The snapshot it holds, in canonical order (linear: for tests, status
    /// and the rare full copy; the wire uses [`Table::encode_full`]).
    pub fn to_snapshot(
        &self,
        version: Option<pb::Version>,
        generated_unix_ms: i64,
    ) -> pb::Snapshot {
        pb::Snapshot {
            version,
            leases: self.leases.values().map(|l| (**l).clone()).collect(),
            routes: self.routes.values().map(|r| (**r).clone()).collect(),
            relay: self.relay.clone(),
            generated_unix_ms,
        }
    }

    /// Every lease, in canonical order.
    pub fn leases(&self) -> impl Iterator<Item = &pb::Lease> {
        self.leases.values().map(|l| &**l)
    }

    /// Every route, in canonical order.
    pub fn routes(&self) -> impl Iterator<Item = &pb::Route> {
        self.routes.values().map(|r| &**r)
    }

    fn snapshot_len(&self, version: Option<&pb::Version>, generated_unix_ms: i64) -> usize {
        use prost::encoding::{int64, message};
        version.map_or(0, |v| message::encoded_len(1, v))
            + self
                .leases
                .values()
                .map(|l| message::encoded_len(2, &**l))
                .sum::<usize>()
            + self
                .routes
                .values()
                .map(|r| message::encoded_len(3, &**r))
                .sum::<usize>()
            + self
                .relay
                .as_ref()
                .map_or(0, |r| message::encoded_len(4, r))
            + if generated_unix_ms == 0 {
                0
            } else {
                int64::encoded_len(5, &generated_unix_ms)
            }
    }

    fn encode_fields(
        &self,
        version: Option<&pb::Version>,
        generated_unix_ms: i64,
        out: &mut Vec<u8>,
    ) {
        use prost::encoding::{int64, message};
        if let Some(v) = version {
            message::encode(1, v, out);
        }
        for l in self.leases.values() {
            message::encode(2, &**l, out);
        }
        for r in self.routes.values() {
            message::encode(3, &**r, out);
        }
        if let Some(r) = &self.relay {
            message::encode(4, r, out);
        }
        if generated_unix_ms != 0 {
            int64::encode(5, &generated_unix_ms, out);
        }
    }

    /// The snapshot it holds, encoded (a `Snapshot` message), written straight
    /// from the maps; byte for byte what encoding [`Table::to_snapshot`] gives.
    pub fn encode_snapshot(&self, version: Option<pb::Version>, generated_unix_ms: i64) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.snapshot_len(version.as_ref(), generated_unix_ms));
        self.encode_fields(version.as_ref(), generated_unix_ms, &mut out);
        out
    }

    /// `SnapshotResponse.snapshot` as encoded on the wire (field 3: key,
    /// length, the snapshot's bytes), written straight from the maps without
    /// copying the snapshot first.
    pub fn encode_full(&self, version: Option<pb::Version>, generated_unix_ms: i64) -> Bytes {
        use prost::encoding::{encode_key, encode_varint, encoded_len_varint};
        let body = self.snapshot_len(version.as_ref(), generated_unix_ms);
        let mut out = Vec::with_capacity(body + 1 + encoded_len_varint(body as u64));
        encode_key(3, prost::encoding::WireType::LengthDelimited, &mut out);
        encode_varint(body as u64, &mut out);
        self.encode_fields(version.as_ref(), generated_unix_ms, &mut out);
        Bytes::from(out)
    }

    /// The part of `proposed` that changes this table: upserts equal to what
    /// is held and removals of what is not held are dropped, a relay equal to
    /// the held one too. Lists come out in canonical order; base, version and
    /// timestamp are copied.
    pub fn effective(&self, proposed: &pb::SnapshotDelta) -> pb::SnapshotDelta {
        let mut upserted_leases: Vec<pb::Lease> = proposed
            .upserted_leases
            .iter()
            .filter(|l| self.lease(&l.namespace, &l.name) != Some(*l))
            .cloned()
            .collect();
        let mut removed_leases: Vec<pb::ObjectRef> = proposed
            .removed_leases
            .iter()
            .filter(|r| self.lease(&r.namespace, &r.name).is_some())
            .cloned()
            .collect();
        let mut upserted_routes: Vec<pb::Route> = proposed
            .upserted_routes
            .iter()
            .filter(|r| self.route(&r.namespace, &r.name) != Some(*r))
            .cloned()
            .collect();
        let mut removed_routes: Vec<pb::ObjectRef> = proposed
            .removed_routes
            .iter()
            .filter(|r| self.route(&r.namespace, &r.name).is_some())
            .cloned()
            .collect();
        upserted_leases.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        removed_leases.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        upserted_routes.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        removed_routes.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let relay = proposed
            .relay
            .clone()
            .filter(|r| self.relay.as_ref() != Some(r));
        pb::SnapshotDelta {
            base: proposed.base,
            version: proposed.version,
            upserted_leases,
            removed_leases,
            upserted_routes,
            removed_routes,
            relay,
            relay_removed: proposed.relay_removed && self.relay.is_some(),
            generated_unix_ms: proposed.generated_unix_ms,
        }
    }

    /// Applies a delta (its base and version are the caller's business):
    /// removals, then upserts, then the relay; a key may appear once per kind.
    /// Checks the rules for what it touches only. On error every problem is
    /// returned and the table may be half-changed: apply to a copy.
    pub fn apply(&mut self, d: &pb::SnapshotDelta) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        duplicates(
            "lease",
            d.upserted_leases
                .iter()
                .map(|l| (&l.namespace, &l.name))
                .chain(d.removed_leases.iter().map(|r| (&r.namespace, &r.name))),
            &mut errors,
        );
        duplicates(
            "route",
            d.upserted_routes
                .iter()
                .map(|r| (&r.namespace, &r.name))
                .chain(d.removed_routes.iter().map(|r| (&r.namespace, &r.name))),
            &mut errors,
        );
        if !errors.is_empty() {
            return Err(errors);
        }
        // Routes first out, so a lease they led to may go in the same delta.
        for r in &d.removed_routes {
            self.remove_route(&key_of(&r.namespace, &r.name));
        }
        for r in &d.upserted_routes {
            self.remove_route(&key_of(&r.namespace, &r.name));
        }
        // Every lease this delta touches leaves the indexes before any enters,
        // so two leases swapping an IP or a hash in one delta is fine.
        let mut gone_hashes: Vec<Vec<u8>> = Vec::new();
        for r in &d.removed_leases {
            gone_hashes.extend(self.remove_lease(&key_of(&r.namespace, &r.name)));
        }
        for l in &d.upserted_leases {
            gone_hashes.extend(self.remove_lease(&key_of(&l.namespace, &l.name)));
        }
        for l in &d.upserted_leases {
            self.insert_lease(l, &mut errors);
        }
        for h in gone_hashes {
            if !self.by_hash.contains_key(&h) && self.route_refs.get(&h).is_some_and(|n| *n > 0) {
                errors.push(format!(
                    "lease {} left the snapshot but a route still leads to it",
                    hex::encode(&h)
                ));
            }
        }
        for r in &d.upserted_routes {
            self.insert_route(r, &mut errors);
        }
        if d.relay_removed {
            self.relay = None;
        } else if let Some(relay) = &d.relay {
            self.relay = Some(relay.clone());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Takes a lease out of the map and the indexes; returns its hash.
    fn remove_lease(&mut self, key: &Key) -> Option<Vec<u8>> {
        let old = self.leases.remove(key)?;
        let mine = |m: Option<&Key>| m == Some(key);
        if mine(self.by_hash.get(&old.lease_hash)) {
            self.by_hash.remove(&old.lease_hash);
        }
        if let Ok(ip) = old.ip.parse::<IpAddr>() {
            let piu = (old.pool.clone(), ip, old.user.clone());
            if mine(self.by_pool_ip_user.get(&piu)) {
                self.by_pool_ip_user.remove(&piu);
            }
            for fp in ip_routed_keys(&old) {
                let k = (ip, fp.to_string());
                if mine(self.by_ip_key.get(&k)) {
                    self.by_ip_key.remove(&k);
                }
            }
        }
        Some(old.lease_hash.clone())
    }

    fn insert_lease(&mut self, l: &pb::Lease, errors: &mut Vec<String>) {
        let key = key_of(&l.namespace, &l.name);
        let who = lease_name(l);
        let ip = lease_fields(l, errors);
        if l.lease_hash.len() == 32 {
            match self.by_hash.get(&l.lease_hash) {
                Some(other) if *other != key => {
                    errors.push(format!("{who}: lease hash shared with another lease"));
                }
                _ => {
                    self.by_hash.insert(l.lease_hash.clone(), key.clone());
                }
            }
        }
        if let Some(ip) = ip {
            let piu = (l.pool.clone(), ip, l.user.clone());
            match self.by_pool_ip_user.get(&piu) {
                Some(other) if *other != key => errors.push(format!(
                    "{who}: user {} holds {ip} in pool {} twice",
                    l.user, l.pool
                )),
                _ => {
                    self.by_pool_ip_user.insert(piu, key.clone());
                }
            }
            for fp in ip_routed_keys(l) {
                let k = (ip, fp.to_string());
                match self.by_ip_key.get(&k) {
                    Some(other) if *other != key => errors.push(format!(
                        "{who}: ({ip}, {fp}) already routes to lease {}/{}",
                        other.0, other.1
                    )),
                    _ => {
                        self.by_ip_key.insert(k, key.clone());
                    }
                }
            }
        }
        self.leases.insert(key, Arc::new(l.clone()));
    }

    fn remove_route(&mut self, key: &Key) {
        let Some(old) = self.routes.remove(key) else {
            return;
        };
        if let Some(pb::route::To::LeaseHash(h)) = &old.to
            && let Some(n) = self.route_refs.get_mut(h)
        {
            *n -= 1;
            if *n == 0 {
                self.route_refs.remove(h);
            }
        }
    }

    fn insert_route(&mut self, r: &pb::Route, errors: &mut Vec<String>) {
        route_fields(r, errors);
        if let Some(pb::route::To::LeaseHash(h)) = &r.to {
            if !self.by_hash.contains_key(h) {
                errors.push(format!(
                    "{}: its lease {} is not in the snapshot",
                    route_name(r),
                    hex::encode(h)
                ));
            }
            *self.route_refs.entry(h.clone()).or_insert(0) += 1;
        }
        self.routes
            .insert(key_of(&r.namespace, &r.name), Arc::new(r.clone()));
    }

    /// Leases plus routes held.
    pub fn objects(&self) -> usize {
        self.leases.len() + self.routes.len()
    }

    /// The delta taking this table to `new` (both checked); walks the maps,
    /// skipping what they share.
    pub fn diff(&self, new: &Table) -> pb::SnapshotDelta {
        let mut d = pb::SnapshotDelta::default();
        for item in self.leases.diff(&new.leases) {
            match item {
                imbl::ordmap::DiffItem::Add(_, l)
                | imbl::ordmap::DiffItem::Update { new: (_, l), .. } => {
                    d.upserted_leases.push((**l).clone())
                }
                imbl::ordmap::DiffItem::Remove(k, _) => d.removed_leases.push(pb::ObjectRef {
                    namespace: k.0.clone(),
                    name: k.1.clone(),
                }),
            }
        }
        for item in self.routes.diff(&new.routes) {
            match item {
                imbl::ordmap::DiffItem::Add(_, r)
                | imbl::ordmap::DiffItem::Update { new: (_, r), .. } => {
                    d.upserted_routes.push((**r).clone())
                }
                imbl::ordmap::DiffItem::Remove(k, _) => d.removed_routes.push(pb::ObjectRef {
                    namespace: k.0.clone(),
                    name: k.1.clone(),
                }),
            }
        }
        if self.relay != new.relay {
            d.relay.clone_from(&new.relay);
            d.relay_removed = new.relay.is_none();
        }
        d
    }
}

/// Reports keys listed twice among a kind's upserts and removals.
fn duplicates<'a>(
    kind: &str,
    keys: impl Iterator<Item = (&'a String, &'a String)>,
    errors: &mut Vec<String>,
) {
    let mut seen = std::collections::HashSet::new();
    for (ns, name) in keys {
        if !seen.insert((ns, name)) {
            errors.push(format!("{kind} {ns}/{name}: appears twice in the delta"));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{check, delta};
    use proptest::prelude::*;

    fn lease(name: u8, hash: u8, ip: u8, user: u8, fp: u8, disabled: bool) -> pb::Lease {
        let fp = format!("f{fp}");
        pb::Lease {
            namespace: "d".into(),
            name: format!("l{name}"),
            lease_hash: vec![hash; 32],
            user: format!("u{user}"),
            ip: if ip == 0 {
                "bad".into()
            } else {
                format!("10.0.0.{ip}")
            },
            pool: "p".into(),
            access_keys: vec![pb::AccessKey {
                openssh: "ssh-ed25519 AAAA".into(),
                fingerprint: fp.clone(),
            }],
            target: Some(pb::lease::Target::Address("127.0.0.1:22".into())),
            ip_route_disabled_fingerprints: if disabled { vec![fp] } else { vec![] },
            ..Default::default()
        }
    }

    fn route(name: u8, to: u8) -> pb::Route {
        pb::Route {
            namespace: "d".into(),
            name: format!("r{name}"),
            from: "ssh://u@h".into(),
            r#match: Some(pb::route::Match::Ssh(pb::SshMatch {
                user: "u".into(),
                host: "h".into(),
            })),
            to: Some(if to == 0 {
                pb::route::To::Address("10.1.1.1:22".into())
            } else {
                pb::route::To::LeaseHash(vec![to; 32])
            }),
            allow_keys: vec![],
            allow_unauthenticated: true,
        }
    }

    fn any_lease() -> impl Strategy<Value = pb::Lease> {
        (0u8..5, 1u8..4, 0u8..3, 0u8..2, 0u8..3, any::<bool>())
            .prop_map(|(n, h, ip, u, fp, dis)| lease(n, h, ip, u, fp, dis))
    }

    fn any_route() -> impl Strategy<Value = pb::Route> {
        (0u8..3, 0u8..4).prop_map(|(n, to)| route(n, to))
    }

    fn objref(ns: &str, name: &str) -> pb::ObjectRef {
        pb::ObjectRef {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn any_delta() -> impl Strategy<Value = pb::SnapshotDelta> {
        (
            prop::collection::vec(any_lease(), 0..3),
            prop::collection::vec(0u8..5, 0..2),
            prop::collection::vec(any_route(), 0..2),
            prop::collection::vec(0u8..3, 0..2),
        )
            .prop_map(|(ul, rl, ur, rr)| pb::SnapshotDelta {
                base: Some(pb::Version::new(1, 1)),
                version: Some(pb::Version::new(1, 2)),
                upserted_leases: ul,
                removed_leases: rl.iter().map(|n| objref("d", &format!("l{n}"))).collect(),
                upserted_routes: ur,
                removed_routes: rr.iter().map(|n| objref("d", &format!("r{n}"))).collect(),
                ..Default::default()
            })
    }

    /// A base snapshot that passes the check (built from unique leases).
    fn any_base() -> impl Strategy<Value = pb::Snapshot> {
        (
            prop::collection::vec(any_lease(), 0..5),
            prop::collection::vec(any_route(), 0..3),
        )
            .prop_map(|(leases, routes)| {
                let mut s = pb::Snapshot {
                    version: Some(pb::Version::new(1, 1)),
                    ..Default::default()
                };
                for l in leases {
                    if !s.leases.iter().any(|o| o.name == l.name) {
                        s.leases.push(l);
                    }
                }
                for r in routes {
                    if !s.routes.iter().any(|o| o.name == r.name) {
                        s.routes.push(r);
                    }
                }
                delta::normalize(&mut s);
                s
            })
    }

    proptest! {
        /// Same verdicts and same content as the whole-snapshot check and
        /// delta::apply, for bases and deltas full of collisions.
        #[test]
        fn apply_agrees_with_the_whole_snapshot_check(base in any_base(), d in any_delta()) {
            let table = Table::from_snapshot(&base);
            prop_assert_eq!(table.is_ok(), check::check(&base).is_ok());
            let Ok(table) = table else { return Ok(()) };
            prop_assert_eq!(table.to_snapshot(base.version, 0), base.clone());
            let oracle = delta::apply(&base, &d).ok().filter(|s| check::check(s).is_ok());
            let mut next = table.clone();
            let got = next.apply(&d);
            prop_assert_eq!(got.is_ok(), oracle.is_some(), "{:?}", got);
            if let Some(want) = oracle {
                prop_assert_eq!(next.to_snapshot(d.version, 0), want.clone());
                // The effective delta of the same change is what diff finds.
                let eff = table.effective(&d);
                let mut again = table.clone();
                again.apply(&eff).unwrap();
                prop_assert_eq!(&again, &next);
                let mut via_diff = table.clone();
                via_diff.apply(&table.diff(&next)).unwrap();
                prop_assert_eq!(&via_diff, &next);
                let mut wire = Vec::new();
                let full = pb::Snapshot { generated_unix_ms: 7, ..want };
                prost::encoding::message::encode(3, &full, &mut wire);
                prop_assert_eq!(next.encode_full(full.version, 7).to_vec(), wire);
            }
            // The original is untouched (copies share, never alias).
            prop_assert_eq!(table.to_snapshot(base.version, 0), base);
        }
    }

    #[test]
    fn a_lease_a_route_leads_to_cannot_leave_alone() {
        let mut t = Table::default();
        t.apply(&pb::SnapshotDelta {
            upserted_leases: vec![lease(1, 1, 1, 0, 0, false)],
            upserted_routes: vec![route(1, 1)],
            ..Default::default()
        })
        .unwrap();
        let mut copy = t.clone();
        let err = copy
            .apply(&pb::SnapshotDelta {
                removed_leases: vec![objref("d", "l1")],
                ..Default::default()
            })
            .unwrap_err();
        assert!(err[0].contains("a route still leads to it"), "{err:?}");
        // With the route in the same delta it may go.
        let mut copy = t.clone();
        copy.apply(&pb::SnapshotDelta {
            removed_leases: vec![objref("d", "l1")],
            removed_routes: vec![objref("d", "r1")],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(copy.objects(), 0);
        assert_eq!(t.objects(), 2);
    }
}
