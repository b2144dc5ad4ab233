//! Snapshot deltas as plain functions: [`diff`] two snapshots, [`apply`] a
//! delta to the snapshot it starts from, [`merge`] consecutive deltas. No I/O;
//! the publisher and the subscriber library are the only callers.
//!
//! Snapshots are kept in one canonical order ([`normalize`]: leases and routes
//! sorted by namespace/name), so diffing and applying are single merge walks
//! and a snapshot rebuilt from deltas equals the writer's byte for byte.
//! Keys are unique within a kind (the consistency check refuses a name twice).

use std::cmp::Ordering;
use std::collections::BTreeMap;

use crate::pb;

/// Why a delta could not be applied or merged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// The delta starts from another version than the one it is applied to.
    #[error("the delta starts from {delta} but the snapshot is {held}")]
    BaseMismatch {
        /// `delta.base` (or the earlier delta's version, for a merge).
        delta: String,
        /// The version the delta was applied to.
        held: String,
    },
    /// The delta lacks its base or its version.
    #[error("the delta has no {0}")]
    Incomplete(&'static str),
    /// One key is listed twice in a kind's upserted and removed lists.
    #[error("{kind} {key} appears twice in the delta")]
    Duplicate {
        /// `lease` or `route`.
        kind: &'static str,
        /// `namespace/name`.
        key: String,
    },
}

/// An object with a namespace/name key.
pub trait Keyed {
    /// `(namespace, name)`.
    fn key(&self) -> (&str, &str);
}

impl Keyed for pb::Lease {
    fn key(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

impl Keyed for pb::Route {
    fn key(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

impl Keyed for pb::ObjectRef {
    fn key(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

fn object_ref<T: Keyed>(t: &T) -> pb::ObjectRef {
    let (namespace, name) = t.key();
    pb::ObjectRef {
        namespace: namespace.to_string(),
        name: name.to_string(),
    }
}

fn show(v: Option<&pb::Version>) -> String {
    crate::version::show_opt(v)
}

fn sorted<T: Keyed>(v: &[T]) -> bool {
    v.windows(2).all(|w| w[0].key() < w[1].key())
}

/// Puts a snapshot's leases and routes in canonical order. Linear when they
/// already are (the operator builds them from ordered maps).
pub fn normalize(s: &mut pb::Snapshot) {
    if !sorted(&s.leases) {
        s.leases.sort_by(|a, b| a.key().cmp(&b.key()));
    }
    if !sorted(&s.routes) {
        s.routes.sort_by(|a, b| a.key().cmp(&b.key()));
    }
}

/// The same list in canonical order, borrowed; sorts a copy of the
/// references only when it is not in order already.
fn in_order<T: Keyed>(v: &[T]) -> Vec<&T> {
    let mut refs: Vec<&T> = v.iter().collect();
    if !sorted(v) {
        refs.sort_by(|a, b| a.key().cmp(&b.key()));
    }
    refs
}

fn diff_list<T: Keyed + Clone + PartialEq>(old: &[T], new: &[T]) -> (Vec<T>, Vec<pb::ObjectRef>) {
    let (old, new) = (in_order(old), in_order(new));
    let (mut upserted, mut removed) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    loop {
        match (old.get(i), new.get(j)) {
            (None, None) => break,
            (Some(o), None) => {
                removed.push(object_ref(*o));
                i += 1;
            }
            (None, Some(n)) => {
                upserted.push((*n).clone());
                j += 1;
            }
            (Some(o), Some(n)) => match o.key().cmp(&n.key()) {
                Ordering::Less => {
                    removed.push(object_ref(*o));
                    i += 1;
                }
                Ordering::Greater => {
                    upserted.push((*n).clone());
                    j += 1;
                }
                Ordering::Equal => {
                    if o != n {
                        upserted.push((*n).clone());
                    }
                    i += 1;
                    j += 1;
                }
            },
        }
    }
    (upserted, removed)
}

/// The delta taking `old` to `new`; its base and version are theirs.
/// Timestamps are not content: two snapshots differing only in
/// `generated_unix_ms` give an [`is_empty`] delta.
pub fn diff(old: &pb::Snapshot, new: &pb::Snapshot) -> pb::SnapshotDelta {
    let (upserted_leases, removed_leases) = diff_list(&old.leases, &new.leases);
    let (upserted_routes, removed_routes) = diff_list(&old.routes, &new.routes);
    let relay_changed = old.relay != new.relay;
    pb::SnapshotDelta {
        base: old.version,
        version: new.version,
        upserted_leases,
        removed_leases,
        upserted_routes,
        removed_routes,
        relay: new.relay.clone().filter(|_| relay_changed),
        relay_removed: relay_changed && new.relay.is_none(),
        generated_unix_ms: new.generated_unix_ms,
    }
}

/// The delta changes nothing (its base and version may still differ).
pub fn is_empty(d: &pb::SnapshotDelta) -> bool {
    changes(d) == 0 && d.relay.is_none() && !d.relay_removed
}

/// How many objects the delta upserts or removes.
pub fn changes(d: &pb::SnapshotDelta) -> usize {
    d.upserted_leases.len()
        + d.removed_leases.len()
        + d.upserted_routes.len()
        + d.removed_routes.len()
}

/// One change to one key: the new object, or `None` for a removal.
type Changes<'a, T> = BTreeMap<(&'a str, &'a str), Option<&'a T>>;

fn changes_of<'a, T: Keyed>(
    kind: &'static str,
    upserted: &'a [T],
    removed: &'a [pb::ObjectRef],
) -> Result<Changes<'a, T>, DeltaError> {
    let mut out = BTreeMap::new();
    let entries = upserted
        .iter()
        .map(|t| (t.key(), Some(t)))
        .chain(removed.iter().map(|r| (r.key(), None)));
    for (key, change) in entries {
        if out.insert(key, change).is_some() {
            return Err(DeltaError::Duplicate {
                kind,
                key: format!("{}/{}", key.0, key.1),
            });
        }
    }
    Ok(out)
}

fn apply_list<T: Keyed + Clone>(
    kind: &'static str,
    base: &[T],
    upserted: &[T],
    removed: &[pb::ObjectRef],
) -> Result<Vec<T>, DeltaError> {
    let changes = changes_of(kind, upserted, removed)?;
    let base = in_order(base);
    let mut out = Vec::with_capacity(base.len() + upserted.len());
    let mut changes = changes.into_iter().peekable();
    for b in base {
        // Changes to keys before this one: additions (removing an absent key
        // is a no-op, as a merged delta may remove what it added).
        while let Some((_, change)) = changes.next_if(|(k, _)| *k < b.key()) {
            out.extend(change.cloned());
        }
        match changes.next_if(|(k, _)| *k == b.key()) {
            Some((_, change)) => out.extend(change.cloned()),
            None => out.push(b.clone()),
        }
    }
    out.extend(changes.filter_map(|(_, change)| change.cloned()));
    Ok(out)
}

/// The snapshot `delta` leads to from `base`, which must be the snapshot of
/// version `delta.base`. The result is in canonical order.
pub fn apply(base: &pb::Snapshot, delta: &pb::SnapshotDelta) -> Result<pb::Snapshot, DeltaError> {
    let from = delta.base.ok_or(DeltaError::Incomplete("base version"))?;
    let version = delta.version.ok_or(DeltaError::Incomplete("version"))?;
    if base.version != Some(from) {
        return Err(DeltaError::BaseMismatch {
            delta: from.to_string(),
            held: show(base.version.as_ref()),
        });
    }
    let relay = if delta.relay_removed {
        None
    } else {
        delta.relay.clone().or_else(|| base.relay.clone())
    };
    Ok(pb::Snapshot {
        version: Some(version),
        leases: apply_list(
            "lease",
            &base.leases,
            &delta.upserted_leases,
            &delta.removed_leases,
        )?,
        routes: apply_list(
            "route",
            &base.routes,
            &delta.upserted_routes,
            &delta.removed_routes,
        )?,
        relay,
        generated_unix_ms: delta.generated_unix_ms,
    })
}

fn merge_list<T: Keyed + Clone>(
    kind: &'static str,
    earlier: (&[T], &[pb::ObjectRef]),
    later: (&[T], &[pb::ObjectRef]),
) -> Result<(Vec<T>, Vec<pb::ObjectRef>), DeltaError> {
    let mut all = changes_of(kind, earlier.0, earlier.1)?;
    // The later change of a key replaces the earlier one.
    all.extend(changes_of(kind, later.0, later.1)?);
    let (mut upserted, mut removed) = (Vec::new(), Vec::new());
    for ((namespace, name), change) in all {
        match change {
            Some(t) => upserted.push(t.clone()),
            None => removed.push(pb::ObjectRef {
                namespace: namespace.to_string(),
                name: name.to_string(),
            }),
        }
    }
    Ok((upserted, removed))
}

/// One delta doing what `earlier` then `later` do; `later` must start where
/// `earlier` ends. Per key, the later change wins.
pub fn merge(
    earlier: &pb::SnapshotDelta,
    later: &pb::SnapshotDelta,
) -> Result<pb::SnapshotDelta, DeltaError> {
    let mid = earlier.version.ok_or(DeltaError::Incomplete("version"))?;
    let from = later.base.ok_or(DeltaError::Incomplete("base version"))?;
    if from != mid {
        return Err(DeltaError::BaseMismatch {
            delta: from.to_string(),
            held: mid.to_string(),
        });
    }
    let (upserted_leases, removed_leases) = merge_list(
        "lease",
        (&earlier.upserted_leases, &earlier.removed_leases),
        (&later.upserted_leases, &later.removed_leases),
    )?;
    let (upserted_routes, removed_routes) = merge_list(
        "route",
        (&earlier.upserted_routes, &earlier.removed_routes),
        (&later.upserted_routes, &later.removed_routes),
    )?;
    let later_touches_relay = later.relay.is_some() || later.relay_removed;
    let (relay, relay_removed) = if later_touches_relay {
        (later.relay.clone(), later.relay_removed)
    } else {
        (earlier.relay.clone(), earlier.relay_removed)
    };
    Ok(pb::SnapshotDelta {
        base: earlier.base,
        version: later.version,
        upserted_leases,
        removed_leases,
        upserted_routes,
        removed_routes,
        relay,
        relay_removed,
        generated_unix_ms: later.generated_unix_ms,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    fn lease(name: &str, ip: &str) -> pb::Lease {
        pb::Lease {
            namespace: "d".into(),
            name: name.into(),
            ip: ip.into(),
            ..Default::default()
        }
    }

    fn route(name: &str, from: &str) -> pb::Route {
        pb::Route {
            namespace: "d".into(),
            name: name.into(),
            from: from.into(),
            ..Default::default()
        }
    }

    fn relay(ca: &str) -> pb::RelayTrust {
        pb::RelayTrust {
            ca_public_key: ca.into(),
            cert_validity_secs: 300,
        }
    }

    fn snap(v: u64, leases: &[(&str, &str)], relay_ca: Option<&str>) -> pb::Snapshot {
        pb::Snapshot {
            version: Some(pb::Version::new(1, v)),
            leases: leases.iter().map(|(n, ip)| lease(n, ip)).collect(),
            routes: vec![],
            relay: relay_ca.map(relay),
            generated_unix_ms: v as i64,
        }
    }

    #[test]
    fn diff_lists_only_what_changed_and_apply_rebuilds_the_new_snapshot() {
        let old = snap(
            1,
            &[("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3")],
            Some("x"),
        );
        let new = snap(
            2,
            &[("a", "10.0.0.1"), ("c", "10.0.0.9"), ("d", "10.0.0.4")],
            Some("x"),
        );
        let d = diff(&old, &new);
        let names: Vec<_> = d.upserted_leases.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["c", "d"]);
        assert_eq!(d.removed_leases, vec![object_ref(&lease("b", ""))]);
        assert_eq!(d.relay, None, "unchanged relay settings are not sent");
        assert_eq!(apply(&old, &d).unwrap(), new);
        // Only the timestamp differs: nothing to send.
        let mut later = new.clone();
        later.generated_unix_ms = 99;
        assert!(is_empty(&diff(&new, &later)));
    }

    #[test]
    fn relay_settings_travel_only_when_they_change_and_can_be_removed() {
        let a = snap(1, &[], Some("x"));
        let b = snap(2, &[], Some("y"));
        let c = snap(3, &[], None);
        let ab = diff(&a, &b);
        assert_eq!(ab.relay, Some(relay("y")));
        let bc = diff(&b, &c);
        assert!(bc.relay_removed && !is_empty(&bc));
        assert_eq!(apply(&b, &bc).unwrap().relay, None);
        // Merged, the later removal wins; merged the other way, the setting.
        assert_eq!(apply(&a, &merge(&ab, &bc).unwrap()).unwrap(), c);
        let ca = diff(&c, &snap(4, &[], Some("x")));
        assert_eq!(merge(&bc, &ca).unwrap().relay, Some(relay("x")));
        assert!(!merge(&bc, &ca).unwrap().relay_removed);
    }

    #[test]
    fn a_delta_applies_only_to_its_base() {
        let old = snap(1, &[("a", "10.0.0.1")], None);
        let new = snap(2, &[], None);
        let d = diff(&old, &new);
        let e = apply(&new, &d).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the delta starts from e1.v1 but the snapshot is e1.v2"
        );
        let mut no_base = d.clone();
        no_base.base = None;
        assert_eq!(
            apply(&old, &no_base),
            Err(DeltaError::Incomplete("base version"))
        );
        let mut twice = d.clone();
        twice.upserted_leases.push(lease("a", "10.0.0.5"));
        assert!(matches!(
            apply(&old, &twice),
            Err(DeltaError::Duplicate { kind: "lease", .. })
        ));
        // Merging needs consecutive deltas.
        assert!(merge(&d, &d).is_err());
    }

    #[test]
    fn unsorted_input_is_handled_and_output_is_canonical() {
        let mut old = snap(1, &[("b", "10.0.0.2"), ("a", "10.0.0.1")], None);
        old.routes = vec![route("z", "ssh://u@h"), route("y", "ssh://v@h")];
        let mut new = snap(2, &[("c", "10.0.0.3"), ("a", "10.0.0.1")], None);
        new.routes = vec![route("y", "ssh://w@h")];
        let d = diff(&old, &new);
        let got = apply(&old, &d).unwrap();
        normalize(&mut new);
        assert_eq!(got, new);
    }

    /// A random edit: upsert a lease or route named from a small alphabet
    /// (so keys collide and get removed again), or remove one.
    #[derive(Clone, Debug)]
    enum Edit {
        Lease(u8, Option<u8>),
        Route(u8, Option<u8>),
        Relay(Option<u8>),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            4 => (0u8..12, proptest::option::of(0u8..4)).prop_map(|(k, v)| Edit::Lease(k, v)),
            2 => (0u8..6, proptest::option::of(0u8..4)).prop_map(|(k, v)| Edit::Route(k, v)),
            1 => proptest::option::of(0u8..2).prop_map(Edit::Relay),
        ]
    }

    fn edited(s: &pb::Snapshot, e: &Edit, v: u64) -> pb::Snapshot {
        let mut s = s.clone();
        s.version = Some(pb::Version::new(1, v));
        s.generated_unix_ms = v as i64;
        match e {
            Edit::Lease(k, val) => {
                let name = format!("l{k}");
                s.leases.retain(|l| l.name != name);
                if let Some(val) = val {
                    s.leases.push(lease(&name, &format!("10.0.0.{val}")));
                }
            }
            Edit::Route(k, val) => {
                let name = format!("r{k}");
                s.routes.retain(|r| r.name != name);
                if let Some(val) = val {
                    s.routes.push(route(&name, &format!("ssh://u{val}@h")));
                }
            }
            Edit::Relay(val) => s.relay = val.map(|v| relay(&format!("ca{v}"))),
        }
        normalize(&mut s);
        s
    }

    proptest! {
        /// The oracle is the sequence of snapshots itself: applying each
        /// step's diff, or one merge of any run of steps, gives exactly the
        /// snapshot at the end of the run.
        #[test]
        fn diffs_and_merges_reproduce_every_snapshot(
            edits in proptest::collection::vec(edit(), 1..40),
            from in 0usize..40,
        ) {
            let mut snaps = vec![snap(1, &[], None)];
            for (i, e) in edits.iter().enumerate() {
                let next = edited(&snaps[i], e, i as u64 + 2);
                snaps.push(next);
            }
            let steps: Vec<_> = snaps.windows(2).map(|w| diff(&w[0], &w[1])).collect();
            for (i, d) in steps.iter().enumerate() {
                prop_assert_eq!(&apply(&snaps[i], d).unwrap(), &snaps[i + 1]);
            }
            let from = from % steps.len();
            let mut merged = steps[from].clone();
            for d in &steps[from + 1..] {
                merged = merge(&merged, d).unwrap();
            }
            prop_assert_eq!(&apply(&snaps[from], &merged).unwrap(), snaps.last().unwrap());
            // A merge never lists more than the distinct keys touched.
            prop_assert!(changes(&merged) <= 12 + 6);
        }
    }
}
