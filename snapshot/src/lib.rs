//! The routing snapshot: generated protobuf types, the consistency check run
//! before anything is published, the gRPC publisher (operator side) and the
//! subscriber library (proxy side).

/// Generated protobuf and gRPC code for `keyway.snapshot.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("keyway.snapshot.v1");
}
