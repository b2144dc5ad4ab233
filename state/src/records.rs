//! The records local mode keeps, one per object plus the directory's
//! problems, recent events and the last published snapshot. [`StateFile`] is
//! all of them in memory; [`crate::store`] persists them row by row. The JSON
//! shapes (camelCase) are what `status -o json` consumers and older state
//! files saw, so they stay.

use std::collections::BTreeMap;
use std::fmt;

use keyway_crds::{
    IPPoolSpec, IPPoolStatus, SshRouteSpec, SshRouteStatus, VMLeaseSpec, VMLeaseStatus,
};
use serde::{Deserialize, Serialize};

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
    pub seen_spec: serde_json::Value,
    /// The last valid spec, kept when an edit is rejected or the file breaks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<VMLeaseSpec>,
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
    pub seen_spec: serde_json::Value,
    /// The last valid spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<IPPoolSpec>,
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
    pub seen_spec: serde_json::Value,
    /// The spec as last read, if it parsed as an SshRoute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<SshRouteSpec>,
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
    /// Leases by `namespace/name`.
    #[serde(default)]
    pub leases: BTreeMap<String, LeaseRecord>,
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
