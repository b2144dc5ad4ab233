//! Budgets: how much of the gateway one tenant, and all of them, may hold.
//!
//! Contract: every byte of channel window the gateway grants is reserved
//! here first, from the gateway-wide relay buffer budget and from the
//! tenant's (the lease's `spec.user`) share, and released when the channel
//! ends, so relay buffers can never exceed the budget whatever peers do.
//! Tenants are also capped in open connections and channels. Refusals are
//! typed ([`Refusal`]) so the caller can tell the client why and count it
//! under [`Refusal::metric_label`]. Plain data and a mutex, no I/O.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::IntGauge;

/// The caps; every one has a flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetLimits {
    /// Channel windows the whole gateway may have granted, in bytes.
    pub gateway_bytes: u64,
    /// The same for one tenant.
    pub tenant_bytes: u64,
    /// Authenticated connections one tenant may hold.
    pub tenant_connections: usize,
    /// Open channels one tenant may hold over all its connections.
    pub tenant_channels: usize,
}

impl Default for BudgetLimits {
    fn default() -> Self {
        BudgetLimits {
            gateway_bytes: 512 << 20,
            tenant_bytes: 64 << 20,
            tenant_connections: 256,
            tenant_channels: 512,
        }
    }
}

/// Why a reservation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the gateway's relay buffers are full ({limit} bytes); try again later")]
    GatewayBytes { limit: u64 },
    #[error("user {tenant} holds its whole relay buffer share ({limit} bytes)")]
    TenantBytes { tenant: String, limit: u64 },
    #[error("user {tenant} already has {limit} connections open (the limit)")]
    TenantConnections { tenant: String, limit: usize },
    #[error("user {tenant} already has {limit} channels open (the limit)")]
    TenantChannels { tenant: String, limit: usize },
}

impl Refusal {
    /// The `limit` label of `keyway_limit_refusals_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Refusal::GatewayBytes { .. } => "gateway_buffer",
            Refusal::TenantBytes { .. } => "user_buffer",
            Refusal::TenantConnections { .. } => "user_connections",
            Refusal::TenantChannels { .. } => "user_channels",
        }
    }

    /// Every label, so the series start at zero.
    pub const LABELS: [&'static str; 4] = [
        "gateway_buffer",
        "user_buffer",
        "user_connections",
        "user_channels",
    ];
}

#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
struct Use {
    bytes: u64,
    connections: usize,
    channels: usize,
}

impl Use {
    fn is_zero(&self) -> bool {
        *self == Use::default()
    }
}

#[derive(Default)]
struct State {
    bytes: u64,
    tenants: HashMap<Arc<str>, Use>,
}

/// The gateway's budgets.
pub struct Budgets {
    limits: BudgetLimits,
    state: Mutex<State>,
    /// Window bytes reserved gateway-wide (`keyway_relay_window_reserved_bytes`).
    gauge: IntGauge,
}

impl Budgets {
    pub fn new(limits: BudgetLimits, gauge: IntGauge) -> Arc<Self> {
        Arc::new(Budgets {
            limits,
            state: Mutex::default(),
            gauge,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Updates are whole; a poisoned lock still holds consistent counts.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Window bytes reserved now, gateway-wide.
    #[cfg(test)]
    pub fn reserved_bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// What one tenant holds: (bytes, connections, channels).
    #[cfg(test)]
    pub fn tenant_use(&self, tenant: &str) -> (u64, usize, usize) {
        let s = self.lock();
        s.tenants
            .get(tenant)
            .map_or((0, 0, 0), |u| (u.bytes, u.connections, u.channels))
    }

    fn change(&self, tenant: &Arc<str>, f: impl FnOnce(&mut State, &mut Use)) {
        let mut s = self.lock();
        let mut u = s.tenants.remove(tenant).unwrap_or_default();
        f(&mut s, &mut u);
        if !u.is_zero() {
            s.tenants.insert(tenant.clone(), u);
        }
    }

    /// One more authenticated connection of `tenant`.
    pub fn connection(self: &Arc<Self>, tenant: &Arc<str>) -> Result<Slot, Refusal> {
        let mut s = self.lock();
        let u = s.tenants.entry(tenant.clone()).or_default();
        if u.connections >= self.limits.tenant_connections {
            let limit = self.limits.tenant_connections;
            if u.is_zero() {
                s.tenants.remove(tenant);
            }
            return Err(Refusal::TenantConnections {
                tenant: tenant.to_string(),
                limit,
            });
        }
        u.connections += 1;
        Ok(Slot {
            budgets: self.clone(),
            tenant: tenant.clone(),
            kind: SlotKind::Connection,
        })
    }

    /// One more open channel of `tenant`, with `bytes` of window reserved
    /// for it (its initial windows).
    pub fn channel(self: &Arc<Self>, tenant: &Arc<str>, bytes: u64) -> Result<Channel, Refusal> {
        let mut s = self.lock();
        let total = s.bytes;
        let u = s.tenants.entry(tenant.clone()).or_default();
        let refusal = if u.channels >= self.limits.tenant_channels {
            Some(Refusal::TenantChannels {
                tenant: tenant.to_string(),
                limit: self.limits.tenant_channels,
            })
        } else if u.bytes + bytes > self.limits.tenant_bytes {
            Some(Refusal::TenantBytes {
                tenant: tenant.to_string(),
                limit: self.limits.tenant_bytes,
            })
        } else if total + bytes > self.limits.gateway_bytes {
            Some(Refusal::GatewayBytes {
                limit: self.limits.gateway_bytes,
            })
        } else {
            None
        };
        if let Some(r) = refusal {
            if u.is_zero() {
                s.tenants.remove(tenant);
            }
            return Err(r);
        }
        u.channels += 1;
        u.bytes += bytes;
        s.bytes += bytes;
        self.gauge.set(i64::try_from(s.bytes).unwrap_or(i64::MAX));
        Ok(Channel {
            slot: Slot {
                budgets: self.clone(),
                tenant: tenant.clone(),
                kind: SlotKind::Channel,
            },
            bytes,
        })
    }

    /// Reserves up to `want` more bytes for a growing window. Growth may
    /// take the gateway only to half its budget, so the windows of channels
    /// still to open always find room.
    fn grow(&self, tenant: &Arc<str>, want: u64) -> u64 {
        let mut s = self.lock();
        let ceiling = self.limits.gateway_bytes / 2;
        let gateway_room = ceiling.saturating_sub(s.bytes);
        let Some(u) = s.tenants.get_mut(tenant) else {
            return 0;
        };
        let tenant_room = self.limits.tenant_bytes.saturating_sub(u.bytes);
        let got = want.min(gateway_room).min(tenant_room);
        u.bytes += got;
        s.bytes += got;
        self.gauge.set(i64::try_from(s.bytes).unwrap_or(i64::MAX));
        got
    }
}

enum SlotKind {
    Connection,
    Channel,
}

/// A held connection or channel slot; dropping it gives the slot back.
pub struct Slot {
    budgets: Arc<Budgets>,
    tenant: Arc<str>,
    kind: SlotKind,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let kind = &self.kind;
        self.budgets.change(&self.tenant, |_, u| match kind {
            SlotKind::Connection => u.connections = u.connections.saturating_sub(1),
            SlotKind::Channel => u.channels = u.channels.saturating_sub(1),
        });
    }
}

/// A channel's slot and the window bytes reserved for it.
pub struct Channel {
    slot: Slot,
    bytes: u64,
}

impl Channel {
    /// Reserves up to `want` more window bytes; returns how many it got.
    pub fn grow(&mut self, want: u32) -> u32 {
        let got = self.slot.budgets.grow(&self.slot.tenant, u64::from(want));
        self.bytes += got;
        u32::try_from(got).unwrap_or(u32::MAX)
    }

    /// Window bytes this channel holds.
    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        let bytes = self.bytes;
        let gauge = &self.slot.budgets.gauge;
        self.slot.budgets.change(&self.slot.tenant, |s, u| {
            u.bytes = u.bytes.saturating_sub(bytes);
            s.bytes = s.bytes.saturating_sub(bytes);
            gauge.set(i64::try_from(s.bytes).unwrap_or(i64::MAX));
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn budgets() -> Arc<Budgets> {
        Budgets::new(
            BudgetLimits {
                gateway_bytes: 1000,
                tenant_bytes: 600,
                tenant_connections: 2,
                tenant_channels: 3,
            },
            IntGauge::new("reserved", "reserved").unwrap(),
        )
    }

    #[test]
    fn channels_reserve_and_release_window_bytes() {
        let b = budgets();
        let alice: Arc<str> = "alice".into();
        let bob: Arc<str> = "bob".into();
        let a1 = b.channel(&alice, 300).unwrap();
        let _a2 = b.channel(&alice, 300).unwrap();
        assert_eq!(
            b.channel(&alice, 1).err().map(|r| r.metric_label()),
            Some("user_buffer")
        );
        let _b1 = b.channel(&bob, 300).unwrap();
        assert_eq!(
            b.channel(&bob, 200).err().map(|r| r.metric_label()),
            Some("gateway_buffer")
        );
        drop(a1);
        assert_eq!(b.reserved_bytes(), 600);
        assert_eq!(b.gauge.get(), 600);
        assert!(b.channel(&bob, 200).is_ok());
    }

    #[test]
    fn tenants_are_capped_in_connections_and_channels() {
        let b = budgets();
        let t: Arc<str> = "t".into();
        let c1 = b.connection(&t).unwrap();
        let _c2 = b.connection(&t).unwrap();
        let e = b.connection(&t).err().unwrap();
        assert_eq!(e.metric_label(), "user_connections");
        assert!(e.to_string().contains("user t already has 2 connections"));
        drop(c1);
        assert!(b.connection(&t).is_ok());
        let chans: Vec<_> = (0..3).map(|_| b.channel(&t, 1).unwrap()).collect();
        assert_eq!(
            b.channel(&t, 1).err().map(|r| r.metric_label()),
            Some("user_channels")
        );
        drop(chans);
        assert_eq!(b.tenant_use("t"), (0, 1, 0));
    }

    #[test]
    fn growth_stops_at_half_the_gateway_and_at_the_tenant_share() {
        let b = budgets();
        let t: Arc<str> = "t".into();
        let mut c = b.channel(&t, 100).unwrap();
        assert_eq!(c.grow(300), 300);
        // Gateway ceiling for growth is 500.
        assert_eq!(c.grow(300), 100);
        assert_eq!(c.grow(1), 0);
        assert_eq!(c.bytes(), 500);
        drop(c);
        assert_eq!(b.reserved_bytes(), 0);
        assert_eq!(b.tenant_use("t"), (0, 0, 0));
    }

    #[test]
    fn nothing_is_left_behind_for_a_tenant_that_left() {
        let b = budgets();
        let t: Arc<str> = "gone".into();
        drop(b.connection(&t).unwrap());
        drop(b.channel(&t, 10).unwrap());
        assert!(b.lock().tenants.is_empty());
    }
}
