//! The routing snapshot: generated protobuf types, the consistency check run
//! before anything is published or applied, the gRPC publisher (operator side)
//! and the subscriber library (proxy side). See docs/snapshot-protocol.md.

pub mod check;
pub mod client;
pub mod delta;
pub mod disk;
pub mod held;
pub mod server;
pub mod table;
pub mod version;

/// Generated protobuf and gRPC code for `keyway.snapshot.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("keyway.snapshot.v1");
}

/// Largest snapshot either side encodes or decodes, and the largest record of
/// a subscriber's disk copy: a full snapshot is one message, and 1,000,000
/// leases are ~320 MB (at most a few million fit). Only the operator's
/// responses can be this big; what subscribers send is capped far lower.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024 * 1024;
