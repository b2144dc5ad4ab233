//! A lease as users see it: one row of `keyway-operator status --local DIR`
//! (and of its `-o json`), and what `keyway ssh` and `keyway config` look up.

use serde::Serialize;

use crate::records::{LeaseRecord, StateFile};

/// One lease as `status -o json` prints it.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRow {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Tenant.
    pub user: String,
    /// IPPool name.
    pub pool: String,
    /// Pooled IP, if allocated.
    pub ip: Option<String>,
    /// Pending, Ready, Settled or Failed.
    pub phase: String,
    /// 64 hex.
    pub lease_hash: Option<String>,
    /// `authorized_keys` line for the VM.
    pub relay_trust: Option<String>,
    /// The command that reaches the VM.
    pub ssh_command: Option<String>,
    /// Why it is not Ready, if it is not.
    pub message: Option<String>,
    /// Every connected proxy has applied a snapshot with its current route.
    pub routed: bool,
    /// File it comes from.
    pub file: String,
}

fn raw_str(r: &LeaseRecord, field: &str) -> String {
    r.seen_spec.str_field(field).unwrap_or_default()
}

/// Rows for every lease, in namespace/name order.
pub fn rows(state: &StateFile) -> Vec<LeaseRow> {
    state
        .leases
        .values()
        .map(|r| LeaseRow {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            user: r
                .spec
                .as_ref()
                .map_or_else(|| raw_str(r, "user"), |s| s.user.clone()),
            pool: r
                .spec
                .as_ref()
                .map_or_else(|| raw_str(r, "poolRef"), |s| s.pool_ref.clone()),
            ip: r.status.ip.clone(),
            phase: r
                .status
                .phase
                .map_or_else(|| "Pending".to_string(), |p| p.to_string()),
            lease_hash: r.status.lease_hash.clone(),
            relay_trust: r.status.relay_trust.clone(),
            ssh_command: r.status.ssh_command.clone(),
            message: r.status.message.clone(),
            routed: r
                .status
                .conditions
                .iter()
                .any(|c| c.type_ == "Routed" && c.status == "True"),
            file: r.file.clone(),
        })
        .collect()
}
