//! keyway-operator as a library: the two front doors (local mode's directory,
//! cluster mode's API watches) around the pure core in `keyway-core`, the
//! relay CA, and the reports both print.

pub mod cluster;
pub mod crdgen;
pub mod local;
pub mod relay_ca;
pub mod report;
