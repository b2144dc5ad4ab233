//! Cluster mode: the same pure core as local mode behind a Kubernetes front
//! door. kube-runtime `Controller`s admit IPPools, VMLeases and SshRoutes
//! into the shared [`index::Index`]; one status round at a time derives
//! allocations, publishes the routing snapshot and writes every status that
//! changed with server-side apply under one field manager.
//!
//! Only the leader (see [`leader`]) runs controllers, writes status and
//! serves snapshots; standbys wait on the Lease and report not-ready.

pub mod convert;
pub mod index;
pub mod leader;
pub mod metrics;
mod run;

pub use run::{ClusterOptions, TlsFiles, TokenSource, run};

/// The finalizer that releases a lease's IP and withdraws its routes.
pub const FINALIZER: &str = "keyway.dev/release";

/// The field manager of every status the operator writes.
pub const FIELD_MANAGER: &str = "keyway-operator";
