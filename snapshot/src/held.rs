//! What a subscriber serves: a checked snapshot as a [`Table`] (persistent
//! maps, so each version shares structure with the one before), its version,
//! and the delta that led to it from the previous version, so consumers (the
//! proxy's route table) can apply that change instead of re-reading
//! everything. Applying a delta costs O(change · log n), checks included.

use std::sync::Arc;

use prost::Message;
use prost::bytes::Bytes;

use crate::pb;
use crate::table::{Builder, Table};

/// A `Snapshot` whose leases stay encoded (same wire format): a load decodes
/// one lease at a time into the table, so the whole decoded snapshot never
/// sits in memory beside the table.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct LazySnapshot {
    #[prost(message, optional, tag = "1")]
    pub(crate) version: Option<pb::Version>,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    leases: Vec<Bytes>,
    #[prost(message, repeated, tag = "3")]
    routes: Vec<pb::Route>,
    #[prost(message, optional, tag = "4")]
    relay: Option<pb::RelayTrust>,
    #[prost(int64, tag = "5")]
    generated_unix_ms: i64,
}

/// Why an encoded snapshot could not be held.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not a snapshot.
    #[error("not a snapshot (decoding failed): {0}")]
    Decode(#[from] prost::DecodeError),
    /// A snapshot, but not one to serve.
    #[error("{0}")]
    Invalid(String),
}

/// See the module docs.
#[derive(Clone, Debug)]
pub struct Held {
    /// The version served.
    pub version: pb::Version,
    /// When the writer built it (unix ms).
    pub generated_unix_ms: i64,
    /// The content, checked.
    pub table: Table,
    /// The delta from `change.base` to `version`, when this version was
    /// reached by applying one (`None` after a full snapshot or a load).
    pub change: Option<Arc<pb::SnapshotDelta>>,
}

impl Held {
    /// A whole snapshot (it must carry its version), checked. Taken by value:
    /// each lease is let go once the table holds it.
    pub fn from_snapshot(s: pb::Snapshot) -> Result<Held, String> {
        let version = s.version.ok_or("the snapshot has no version")?;
        let generated_unix_ms = s.generated_unix_ms;
        let table = Table::from_snapshot(s)
            .map_err(|e| format!("consistency check failed: {}", summarize(&e)))?;
        Ok(Held {
            version,
            generated_unix_ms,
            table,
            change: None,
        })
    }

    /// An encoded `Snapshot`, checked as [`Held::from_snapshot`] checks it,
    /// decoded one lease at a time (the peak stays near the bytes' size).
    pub fn decode(bytes: Bytes) -> Result<Held, LoadError> {
        Held::from_lazy(LazySnapshot::decode(bytes)?)
    }

    /// A snapshot whose leases are still encoded, checked as
    /// [`Held::from_snapshot`] checks it.
    pub(crate) fn from_lazy(lazy: LazySnapshot) -> Result<Held, LoadError> {
        let version = lazy
            .version
            .ok_or_else(|| LoadError::Invalid("the snapshot has no version".into()))?;
        let mut b = Builder::default();
        b.load(lazy.leases)?;
        for r in lazy.routes {
            b.route(r);
        }
        let table = b.finish(lazy.relay).map_err(|e| {
            LoadError::Invalid(format!("consistency check failed: {}", summarize(&e)))
        })?;
        Ok(Held {
            version,
            generated_unix_ms: lazy.generated_unix_ms,
            table,
            change: None,
        })
    }

    /// The version `d` leads to from this one, checked; this one is
    /// unchanged (the table is copied, sharing structure).
    pub fn apply(&self, d: &pb::SnapshotDelta) -> Result<Held, String> {
        if d.base != Some(self.version) {
            return Err(format!(
                "the delta starts from {} but the snapshot is {}",
                crate::version::show_opt(d.base.as_ref()),
                self.version
            ));
        }
        let version = d.version.ok_or("the delta has no version")?;
        let mut table = self.table.clone();
        table
            .apply(d)
            .map_err(|e| format!("consistency check failed: {}", summarize(&e)))?;
        Ok(Held {
            version,
            generated_unix_ms: d.generated_unix_ms,
            table,
            change: Some(Arc::new(d.clone())),
        })
    }

    /// The whole snapshot, copied out (linear: for tests and tools).
    pub fn to_snapshot(&self) -> pb::Snapshot {
        self.table
            .to_snapshot(Some(self.version), self.generated_unix_ms)
    }

    /// Leases held.
    pub fn lease_count(&self) -> usize {
        self.table.lease_count()
    }

    /// Routes held.
    pub fn route_count(&self) -> usize {
        self.table.route_count()
    }
}

/// The first problems and how many more, for a NACK that stays small.
pub(crate) fn summarize(errors: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut out = errors
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if errors.len() > SHOWN {
        out.push_str(&format!(" (and {} more)", errors.len() - SHOWN));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn lease(i: usize, hash: usize) -> pb::Lease {
        pb::Lease {
            namespace: "d".into(),
            name: format!("l{i:05}"),
            lease_hash: {
                let mut h = vec![0; 32];
                h[..8].copy_from_slice(&(hash as u64).to_le_bytes());
                h
            },
            user: format!("u{i}"),
            ip: "10.0.0.1".into(),
            pool: "p".into(),
            access_keys: vec![pb::AccessKey {
                openssh: "ssh-ed25519 AAAA".into(),
                fingerprint: format!("f{i}"),
            }],
            target: Some(pb::lease::Target::Address("127.0.0.1:22".into())),
            ..Default::default()
        }
    }

    /// Enough leases for several of the load's batches between its threads.
    const MANY: usize = 2_000;

    fn snapshot(leases: Vec<pb::Lease>) -> pb::Snapshot {
        pb::Snapshot {
            version: Some(pb::Version::new(1, 1)),
            leases,
            ..Default::default()
        }
    }

    /// A decoded load (two threads, batched) holds what taking the decoded
    /// snapshot in one lease at a time holds.
    #[test]
    fn a_load_in_batches_holds_what_the_snapshot_holds() {
        let s = snapshot((0..MANY).map(|i| lease(i, i)).collect());
        let loaded = Held::decode(s.encode_to_vec().into()).unwrap();
        let direct = Held::from_snapshot(s).unwrap();
        assert_eq!(loaded.table, direct.table);
        assert_eq!(loaded.lease_count(), MANY);
        assert!(
            loaded
                .table
                .has_lease_hash(&lease(MANY - 1, MANY - 1).lease_hash)
        );
    }

    /// Collisions between leases in different batches are found, with the
    /// same verdict as the one-at-a-time path.
    #[test]
    fn a_load_finds_collisions_across_batches() {
        let mut leases: Vec<pb::Lease> = (0..MANY).map(|i| lease(i, i)).collect();
        // A hash shared with the first lease, and a name given twice.
        leases[MANY - 10].lease_hash = leases[0].lease_hash.clone();
        let twice = leases[3].clone();
        leases.push(twice);
        let s = snapshot(leases);
        let Err(LoadError::Invalid(loaded)) = Held::decode(s.encode_to_vec().into()) else {
            panic!("the load accepted a colliding snapshot");
        };
        let direct = Held::from_snapshot(s).unwrap_err();
        assert_eq!(loaded, direct);
        assert!(loaded.contains("appears twice"), "{loaded}");
    }

    /// A lease that does not decode, after many that do, fails the load
    /// (and the decoding thread stops).
    #[test]
    fn a_lease_that_does_not_decode_fails_the_load() {
        let mut buf = snapshot((0..MANY).map(|i| lease(i, i)).collect()).encode_to_vec();
        // Field 2 (a lease), length 3, bytes that are no message.
        buf.extend_from_slice(&[0x12, 3, 0xff, 0xff, 0xff]);
        assert!(matches!(
            Held::decode(buf.into()),
            Err(LoadError::Decode(_))
        ));
    }

    /// A disk copy cut anywhere (a crash mid-write, a full disk) is refused
    /// or, cut exactly between leases, holds a prefix: never a panic or a
    /// hang in the two-thread load.
    #[test]
    fn a_snapshot_cut_anywhere_is_refused_or_holds_a_prefix() {
        let buf = snapshot((0..MANY).map(|i| lease(i, i)).collect()).encode_to_vec();
        for cut in (1..buf.len()).step_by(4999) {
            let bytes = prost::bytes::Bytes::copy_from_slice(&buf[..cut]);
            if let Ok(h) = Held::decode(bytes) {
                assert!(h.lease_count() < MANY, "cut at {cut}");
            }
        }
    }
}
