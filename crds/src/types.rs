//! The custom resources of `keyway.dev/v1alpha1`: [`IPPool`], [`VMLease`] and
//! [`SshRoute`]. The CRD YAML under `crds/` is generated from these types
//! (`keyway-operator crdgen`); a test fails when the checked-in copy drifts.

// kube's `printcolumn(...)` repeats keys per column by design.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every Keyway resource.
pub const GROUP: &str = "keyway.dev";
/// API version of every Keyway resource.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as written in YAML.
pub const API_VERSION: &str = "keyway.dev/v1alpha1";

/// A pool of shared public addresses. Every lease gets one address of its pool that
/// is unique among the leases of the same user; different users share addresses.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "keyway.dev",
    version = "v1alpha1",
    kind = "IPPool",
    plural = "ippools",
    shortname = "ipp",
    category = "keyway",
    status = "IPPoolStatus",
    doc = "A pool of shared addresses handed out to VMLeases, unique per user.",
    printcolumn(name = "Capacity", type_ = "string", json_path = ".status.capacity"),
    printcolumn(name = "Allocated", type_ = "integer", json_path = ".status.allocated"),
    printcolumn(name = "Users", type_ = "integer", json_path = ".status.users"),
    printcolumn(
        name = "Max/User",
        type_ = "integer",
        json_path = ".status.maxLeasesPerUser"
    ),
    printcolumn(
        name = "Exhausted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Exhausted\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolSpec {
    /// Addresses in the pool. Each entry is a CIDR (`203.0.113.0/28`), a single IP
    /// (`203.0.113.7`) or an inclusive range (`198.51.100.10-198.51.100.20`);
    /// IPv4 and IPv6.
    #[schemars(length(min = 1))]
    pub addresses: Vec<String>,
    /// CIDRs, IPs or ranges inside `addresses` that are never handed out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
}

/// Observed state of an [`IPPool`].
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolStatus {
    /// Number of usable addresses (after `exclude`), as a decimal string because
    /// IPv6 pools can exceed 64 bits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<String>,
    /// Leases that currently hold an address of this pool.
    #[serde(default)]
    pub allocated: u64,
    /// Distinct users holding at least one address.
    #[serde(default)]
    pub users: u64,
    /// The most live leases any one user has in this pool; the pool must have at
    /// least this many addresses.
    #[serde(default)]
    pub max_leases_per_user: u64,
    /// `Ready` (the spec is valid) and `Exhausted` (some user has more live leases
    /// than the pool has addresses, so some lease waits).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A VM leased to a user: which pool it takes an address from, which keys may log
/// in, and where its sshd is.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "keyway.dev",
    version = "v1alpha1",
    kind = "VMLease",
    plural = "vmleases",
    shortname = "vml",
    category = "keyway",
    namespaced,
    status = "VMLeaseStatus",
    doc = "A VM leased to a user, reachable over SSH through a pooled IP or its lease hash.",
    printcolumn(name = "User", type_ = "string", json_path = ".spec.user"),
    printcolumn(name = "IP", type_ = "string", json_path = ".status.ip"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Pool",
        type_ = "string",
        json_path = ".spec.poolRef",
        priority = "1"
    ),
    printcolumn(
        name = "SSH",
        type_ = "string",
        json_path = ".status.sshCommand",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VMLeaseSpec {
    /// The tenant this lease belongs to. Two live leases of one user never share
    /// an address of a pool.
    #[schemars(length(min = 1, max = 253))]
    pub user: String,
    /// OpenSSH public key lines (`ssh-ed25519 AAAA… comment`) allowed to log in; a
    /// bare 64-hex raw ed25519 key is accepted too.
    #[schemars(length(min = 1))]
    pub access_public_keys: Vec<String>,
    /// Name of the IPPool the lease's address comes from.
    #[schemars(length(min = 1, max = 253))]
    pub pool_ref: String,
    /// Where the VM's sshd is: exactly one of `address` or `provider`.
    pub target: LeaseTarget,
    /// User the relay logs into on the VM. Default: the user name the client gave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_user: Option<String>,
    /// Settled leases are over: routes withdrawn, live sessions and tunnels
    /// closed, address released.
    #[serde(default)]
    pub settled: bool,
}

/// Where a lease's VM accepts SSH.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("has(self.address) != has(self.provider)").message("set exactly one of address or provider"))]
#[serde(rename_all = "camelCase")]
pub struct LeaseTarget {
    /// `host:port` of the VM's sshd, dialed directly by the proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// A provider agent next to the VM, reached over libp2p (`/xe/tunnel/2.0.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderTarget>,
}

/// A provider agent, by libp2p identity.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderTarget {
    /// The agent's libp2p peer ID (`12D3KooW…`).
    #[schemars(length(min = 1))]
    pub peer_id: String,
    /// Multiaddresses the agent listens on (`/ip4/…/tcp/…`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

/// Lifecycle of a [`VMLease`].
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum LeasePhase {
    /// Waiting for an address (pool missing or exhausted for this user).
    #[default]
    Pending,
    /// Holds an address and is routed.
    Ready,
    /// Settled: released and no longer routed.
    Settled,
    /// The spec is invalid; the message says which field.
    Failed,
}

impl std::fmt::Display for LeasePhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LeasePhase::Pending => "Pending",
            LeasePhase::Ready => "Ready",
            LeasePhase::Settled => "Settled",
            LeasePhase::Failed => "Failed",
        })
    }
}

/// Observed state of a [`VMLease`].
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VMLeaseStatus {
    /// The pooled address the lease holds; stable for the lease's life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// 64 hex characters naming the lease (`ssh <leaseHash>@gateway`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_hash: Option<String>,
    /// `Pending`, `Ready`, `Settled` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<LeasePhase>,
    /// The command that reaches the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_command: Option<String>,
    /// The `authorized_keys` line the VM must carry so the relay can log in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_trust: Option<String>,
    /// Why the lease is not Ready, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Allocated` and `Routed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A route that is not a lease's own: CONNECT authorities and SSH user names
/// mapped to a backend address or a lease.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "keyway.dev",
    version = "v1alpha1",
    kind = "SshRoute",
    plural = "sshroutes",
    shortname = "sshr",
    category = "keyway",
    namespaced,
    status = "SshRouteStatus",
    doc = "A CONNECT or SSH route to a backend address or a VMLease.",
    printcolumn(name = "From", type_ = "string", json_path = ".spec.from"),
    printcolumn(name = "To", type_ = "string", json_path = ".spec.to"),
    printcolumn(name = "Lease", type_ = "string", json_path = ".spec.leaseRef"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("has(self.to) != has(self.leaseRef)").message("set exactly one of to or leaseRef"))]
#[x_kube(validation = Rule::new("(has(self.allowPublicKeys) && size(self.allowPublicKeys) > 0) || (has(self.allowUnauthenticated) && self.allowUnauthenticated)").message("set allowPublicKeys, or allowUnauthenticated: true explicitly"))]
#[serde(rename_all = "camelCase")]
pub struct SshRouteSpec {
    /// `tcp+https://host:port` (matched against the CONNECT authority) or
    /// `ssh://user@host` (matched on the SSH listener by user name and destination).
    #[schemars(length(min = 1))]
    pub from: String,
    /// Backend `tcp://host:port`. Exactly one of `to` and `leaseRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Name of a VMLease in the same namespace. Exactly one of `to` and `leaseRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ref: Option<String>,
    /// Public keys allowed to use the route (OpenSSH lines or 64-hex ed25519).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_public_keys: Vec<String>,
    /// Must be set to `true` explicitly for a route anyone may use.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_unauthenticated: bool,
}

/// Observed state of an [`SshRoute`].
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SshRouteStatus {
    /// `Accepted` (valid and resolved) and `Routed` (applied by every proxy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The 32-byte lease hash users see as 64 hex characters (`ssh <hash>@gateway`).
///
/// Derived from the object's UID, not its name, so a lease deleted and created
/// again under the same name gets a new hash and old ssh configs stop matching.
pub fn lease_hash(uid: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"keyway.dev/lease-hash/v1\0");
    h.update(uid.as_bytes());
    h.finalize().into()
}
