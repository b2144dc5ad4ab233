//! The records local mode keeps, one per object plus the directory's
//! problems, recent events and the last published snapshot. [`StateFile`] is
//! all of them in memory; [`crate::store`] persists them row by row. The JSON
//! shapes (camelCase) are what `status -o json` consumers and older state
//! files saw, so they stay.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use keyway_crds::{
    IPPoolSpec, IPPoolStatus, SshRouteSpec, SshRouteStatus, VMLeaseSpec, VMLeaseStatus,
};
use serde::{Deserialize, Serialize};

/// A spec as last seen in its file (even when it did not validate), held as
/// compact JSON text: a parsed tree costs about seven times as much memory,
/// once per object. Two are equal when they hold the same JSON (texts are
/// compared first; a differently formatted equal text, as a legacy
/// `state.json` holds, is parsed to compare).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SeenSpec(Box<serde_json::value::RawValue>);

impl SeenSpec {
    /// The spec `value` as seen.
    pub fn new(value: &serde_json::Value) -> SeenSpec {
        // Serializing a `Value` cannot fail (its keys are strings).
        SeenSpec(
            serde_json::value::to_raw_value(value)
                .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned()),
        )
    }

    /// A top-level string field, as `status` shows a spec that did not
    /// validate.
    pub fn str_field(&self, field: &str) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(self.0.get()).ok()?;
        v.get(field)?.as_str().map(str::to_string)
    }

    /// The JSON text.
    pub fn as_json(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for SeenSpec {
    fn eq(&self, other: &SeenSpec) -> bool {
        let (a, b) = (self.0.get(), other.0.get());
        a == b
            || matches!(
                (
                    serde_json::from_str::<serde_json::Value>(a),
                    serde_json::from_str::<serde_json::Value>(b),
                ),
                (Ok(x), Ok(y)) if x == y
            )
    }
}

/// Where a problem was found in the directory, and what it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// File name relative to the directory.
    pub file: String,
    /// 1-based document number, if the problem is in one document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<usize>,
    /// `Kind namespace/name`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// Field path, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(d) = self.document {
            write!(f, " (document {d})")?;
        }
        if let Some(o) = &self.object {
            write!(f, ": {o}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A lease as local mode remembers it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRecord {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Random identity given when first seen; the lease hash derives from it.
    pub uid: String,
    /// When first seen (unix ms); older leases win conflicts.
    pub created_ms: u64,
    /// File it was last read from.
    pub file: String,
    /// Bumped whenever the spec in the file changes.
    pub generation: i64,
    /// The spec as last read (valid or not), to detect edits.
    pub seen_spec: SeenSpec,
    /// The last valid spec, kept when an edit is rejected or the file breaks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Arc<VMLeaseSpec>>,
    /// Status as last computed.
    #[serde(default)]
    pub status: VMLeaseStatus,
}

/// A pool as local mode remembers it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolRecord {
    /// Name.
    pub name: String,
    /// When first seen (unix ms).
    pub created_ms: u64,
    /// File it was last read from.
    pub file: String,
    /// Bumped whenever the spec in the file changes.
    pub generation: i64,
    /// The spec as last read.
    pub seen_spec: SeenSpec,
    /// The last valid spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Arc<IPPoolSpec>>,
    /// Status as last computed.
    #[serde(default)]
    pub status: IPPoolStatus,
}

/// A route as local mode remembers it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteRecord {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// When first seen (unix ms).
    pub created_ms: u64,
    /// File it was last read from.
    pub file: String,
    /// Bumped whenever the spec in the file changes.
    pub generation: i64,
    /// The spec as last read.
    pub seen_spec: SeenSpec,
    /// The spec as last read, if it parsed as an SshRoute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Arc<SshRouteSpec>>,
    /// Status as last computed.
    #[serde(default)]
    pub status: SshRouteStatus,
}

/// Something the operator did, kept for `status` (the last few hundred).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EventRecord {
    /// RFC 3339 time.
    pub time: String,
    /// `Normal` or `Warning`.
    pub severity: String,
    /// CamelCase reason.
    pub reason: String,
    /// `Kind namespace/name`.
    pub object: String,
    /// What happened.
    pub message: String,
}

/// A subscriber as last seen, for `status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SubscriberRecord {
    /// Node id it gave.
    pub node_id: String,
    /// Role it gave.
    pub role: String,
    /// Connected now.
    pub connected: bool,
    /// Version it acknowledged last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked: Option<String>,
    /// NACKs it sent.
    pub nacks: u64,
    /// Its last NACK's error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Snapshot bytes sent to it (full snapshots and deltas).
    #[serde(default)]
    pub bytes_sent: u64,
}

/// The routing snapshot as last published.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRecord {
    /// `e<epoch>.v<version>`.
    pub version: String,
    /// Leases in it.
    pub leases: usize,
    /// Routes in it.
    pub routes: usize,
    /// Subscribers.
    pub subscribers: Vec<SubscriberRecord>,
}

/// Everything local mode persists, in memory. Allocations live in the lease
/// statuses; on restart they are restored before anything new is allocated.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StateFile {
    /// Format of the state (see [`crate::store::FORMAT`]).
    pub format: u32,
    /// Writer epoch of the last run; the next run's epoch is larger.
    pub epoch: u64,
    /// Pools by name.
    #[serde(default)]
    pub pools: BTreeMap<String, PoolRecord>,
    /// Leases by `namespace/name` (boxed: a record is a few hundred bytes and
    /// B-tree nodes are often half empty).
    #[serde(default)]
    pub leases: BTreeMap<String, Box<LeaseRecord>>,
    /// Routes by `namespace/name`.
    #[serde(default)]
    pub routes: BTreeMap<String, RouteRecord>,
    /// Problems found in the directory on the last scan.
    #[serde(default)]
    pub problems: Vec<Problem>,
    /// Recent events, oldest first.
    #[serde(default)]
    pub events: Vec<EventRecord>,
    /// The snapshot as last published.
    #[serde(default)]
    pub snapshot: Option<SnapshotRecord>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_seen_spec_compares_as_json_and_round_trips_as_written() {
        let v = serde_json::json!({"user": "alice", "poolRef": "p", "keys": ["a", "b"]});
        let a = SeenSpec::new(&v);
        // As a legacy state.json holds it: pretty-printed, other key order.
        let pretty: SeenSpec = serde_json::from_str(
            "{\n  \"user\": \"alice\",\n  \"keys\": [\"a\", \"b\"],\n  \"poolRef\": \"p\"\n}",
        )
        .unwrap();
        assert_eq!(a, pretty);
        assert_ne!(a, SeenSpec::new(&serde_json::json!({"user": "bob"})));
        assert_eq!(a.str_field("user").as_deref(), Some("alice"));
        assert_eq!(a.str_field("keys"), None);
        // Stored inside a record as JSON, not as a string of JSON.
        let text = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), v);
        assert_eq!(
            serde_json::from_str::<SeenSpec>(&text).unwrap().as_json(),
            a.as_json()
        );
    }
}
