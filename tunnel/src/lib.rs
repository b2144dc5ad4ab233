//! Keyway's tunnel protocols: between the `keyway` CLI and the gateway's
//! HTTPS endpoints (`proof`, `upgrade`), and between the gateway and provider
//! agents over libp2p (`xe`, and the `p2p` host behind the `p2p` feature).

#[cfg(feature = "p2p")]
pub mod p2p;
pub mod proof;
pub mod upgrade;
#[cfg(feature = "p2p")]
pub mod xe;
