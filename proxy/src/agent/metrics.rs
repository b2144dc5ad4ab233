//! The agent's own series, beside the snapshot series every Keyway data-plane
//! process exposes. docs/metrics.md lists them.

use anyhow::Result;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct AgentMetrics {
    handshakes: IntCounterVec,
    /// Tunnels in the data phase.
    pub active: IntGauge,
    /// Tunnels closed because a snapshot withdrew their lease.
    pub settled: IntCounter,
    /// Bytes carried, by direction (`to_vm`, `from_vm`), counted when a
    /// tunnel ends.
    pub bytes: IntCounterVec,
}

/// Every handshake outcome, so dashboards see zeros rather than gaps.
const RESULTS: &[&str] = &[
    "ok",
    "unknown_lease",
    "wrong_provider",
    "peer_not_allowed",
    "tunnel_limit",
    "vm_unreachable",
    "timeout",
    "malformed",
    "busy",
];

impl AgentMetrics {
    pub fn new(registry: &Registry) -> Result<Self> {
        let m = AgentMetrics {
            handshakes: IntCounterVec::new(
                Opts::new(
                    "keyway_agent_handshakes_total",
                    "/xe/tunnel/2.0.0 handshakes by result",
                ),
                &["result"],
            )?,
            active: IntGauge::new(
                "keyway_agent_tunnels_active",
                "Tunnels carrying bytes to a VM",
            )?,
            settled: IntCounter::new(
                "keyway_agent_tunnels_settled_total",
                "Tunnels closed because their lease was settled, deleted or moved to another provider",
            )?,
            bytes: IntCounterVec::new(
                Opts::new(
                    "keyway_agent_bytes_total",
                    "Bytes carried by ended tunnels, by direction",
                ),
                &["direction"],
            )?,
        };
        registry.register(Box::new(m.handshakes.clone()))?;
        registry.register(Box::new(m.active.clone()))?;
        registry.register(Box::new(m.settled.clone()))?;
        registry.register(Box::new(m.bytes.clone()))?;
        for r in RESULTS {
            m.handshakes.with_label_values(&[r]);
        }
        for d in ["to_vm", "from_vm"] {
            m.bytes.with_label_values(&[d]);
        }
        Ok(m)
    }

    pub fn handshake(&self, result: &str) {
        debug_assert!(RESULTS.contains(&result), "{result}");
        self.handshakes.with_label_values(&[result]).inc();
    }
}
