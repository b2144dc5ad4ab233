//! Keyway's control-plane core, shared by both operator front doors (local
//! mode's directory and cluster mode's API watches) and free of Kubernetes
//! clients and I/O: allocation, the object model with its admission rules,
//! statuses with their conditions, the routing snapshot's entries, and which
//! proxies applied what. Tested directly with synchronous tests.

pub mod allocator;
pub mod conditions;
pub mod key;
pub mod routed;
pub mod world;

pub use key::{Kind, LeaseKey, ObjKey};
