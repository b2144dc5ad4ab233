//! Protocols between the `keyway` CLI and the gateway's tunnel endpoints.

pub mod proof;
pub mod upgrade;
