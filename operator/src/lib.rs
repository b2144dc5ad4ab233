//! keyway-operator as a library: the pure core (allocation, object model,
//! status and snapshot building) and the thin I/O front doors around it.

pub mod allocator;
pub mod cluster;
pub mod crdgen;
pub mod local;
pub mod relay_ca;
pub mod report;
pub mod routed;
pub mod world;
