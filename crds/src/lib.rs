//! Keyway's API (`keyway.dev/v1alpha1`): the custom resource types and the pure
//! validation that turns what users type (OpenSSH keys, CIDRs, ranges) into
//! checked values. No I/O lives here; the operator, proxy and CLI share it.

pub mod addresses;
pub mod keys;
pub mod types;
pub mod validate;

pub use types::*;
