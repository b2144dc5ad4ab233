//! Per-source admission of unauthenticated connections: a token bucket of
//! new handshakes per source and a cap on a source's handshakes in flight.
//!
//! Contract: a key exchange is the most expensive thing an anonymous peer
//! can make the gateway do, so one source (an IPv4 address, or an IPv6 /64,
//! which one host gets for free) may start only so many per second and hold
//! only so many open at once; beyond that its connections are closed before
//! the SSH banner. The table is bounded (idle sources are forgotten first).
//! Pure: the caller passes the time; no I/O.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Per-source caps; every one has a flag.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SourceLimits {
    /// New unauthenticated connections per second, sustained.
    pub rate_per_sec: f64,
    /// How many may come at once after a quiet spell.
    pub burst: u32,
    /// Unauthenticated connections one source may have open.
    pub max_pending: usize,
}

impl Default for SourceLimits {
    fn default() -> Self {
        // Generous for people behind one NAT (a CI farm cloning through the
        // gateway), small against a loop forcing key exchanges.
        SourceLimits {
            rate_per_sec: 20.0,
            burst: 100,
            max_pending: 32,
        }
    }
}

/// Why a source was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceRefusal {
    /// Its bucket of new handshakes is empty.
    Rate,
    /// It already has `max_pending` handshakes open.
    Pending,
}

impl SourceRefusal {
    /// The `result` label of the connections counter.
    pub fn metric_label(self) -> &'static str {
        match self {
            SourceRefusal::Rate => "refused_source_rate",
            SourceRefusal::Pending => "refused_source_pending",
        }
    }
}

/// Sources whose state is remembered at most; beyond it idle ones go.
const MAX_SOURCES: usize = 100_000;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    pending: usize,
}

/// What a source is keyed by.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match crate::routes::canonical(ip) {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// The table of sources.
pub struct Sources {
    limits: SourceLimits,
    map: Mutex<HashMap<IpAddr, Bucket>>,
    max_sources: usize,
}

impl Sources {
    pub fn new(limits: SourceLimits) -> Arc<Self> {
        Self::with_capacity(limits, MAX_SOURCES)
    }

    fn with_capacity(limits: SourceLimits, max_sources: usize) -> Arc<Self> {
        Arc::new(Sources {
            limits,
            map: Mutex::new(HashMap::new()),
            max_sources: max_sources.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Bucket>> {
        // Entries are whole values; a poisoned map is still consistent.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits one more unauthenticated connection from `ip` at `now`; the
    /// guard counts it as pending until dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Pending, SourceRefusal> {
        let key = source_key(ip);
        let l = self.limits;
        let burst = f64::from(l.burst.max(1));
        let mut map = self.lock();
        if map.len() >= self.max_sources && !map.contains_key(&key) {
            forget_idle(&mut map, l, now, self.max_sources);
        }
        let b = map.entry(key).or_insert(Bucket {
            tokens: burst,
            last: now,
            pending: 0,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * l.rate_per_sec).min(burst);
        b.last = now;
        if b.pending >= l.max_pending.max(1) {
            return Err(SourceRefusal::Pending);
        }
        if b.tokens < 1.0 {
            return Err(SourceRefusal::Rate);
        }
        b.tokens -= 1.0;
        b.pending += 1;
        Ok(Pending {
            sources: self.clone(),
            key,
            done: false,
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Drops sources with nothing pending whose bucket has refilled (they would
/// start afresh anyway), then, if still full, any with nothing pending.
fn forget_idle(map: &mut HashMap<IpAddr, Bucket>, l: SourceLimits, now: Instant, max: usize) {
    let burst = f64::from(l.burst.max(1));
    map.retain(|_, b| {
        let refilled =
            b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * l.rate_per_sec;
        b.pending > 0 || refilled < burst
    });
    if map.len() >= max {
        let idle: Vec<IpAddr> = map
            .iter()
            .filter(|(_, b)| b.pending == 0)
            .map(|(k, _)| *k)
            .take(map.len() + 1 - max)
            .collect();
        for k in idle {
            map.remove(&k);
        }
    }
}

/// One admitted unauthenticated connection. [`Pending::done`] (or drop)
/// ends it.
pub struct Pending {
    sources: Arc<Sources>,
    key: IpAddr,
    done: bool,
}

impl Pending {
    /// The connection authenticated or ended: no longer pending.
    pub fn done(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let mut map = self.sources.lock();
        if let Some(b) = map.get_mut(&self.key) {
            b.pending = b.pending.saturating_sub(1);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.done();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    const L: SourceLimits = SourceLimits {
        rate_per_sec: 2.0,
        burst: 4,
        max_pending: 3,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let s = Sources::new(SourceLimits {
            max_pending: 100,
            ..L
        });
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        let held: Vec<_> = (0..4).map(|_| s.admit(a, t0).unwrap()).collect();
        assert_eq!(s.admit(a, t0).err(), Some(SourceRefusal::Rate));
        // Another source is unaffected.
        assert!(s.admit(ip("192.0.2.2"), t0).is_ok());
        // Half a second later one more token (2/s).
        assert!(s.admit(a, t0 + Duration::from_millis(500)).is_ok());
        assert_eq!(
            s.admit(a, t0 + Duration::from_millis(500)).err(),
            Some(SourceRefusal::Rate)
        );
        drop(held);
    }

    #[test]
    fn a_source_holds_at_most_max_pending_and_done_frees_one() {
        let s = Sources::new(SourceLimits { burst: 100, ..L });
        let t0 = Instant::now();
        let a = ip("198.51.100.7");
        let mut held: Vec<_> = (0..3).map(|_| s.admit(a, t0).unwrap()).collect();
        assert_eq!(s.admit(a, t0).err(), Some(SourceRefusal::Pending));
        held[0].done();
        held[0].done(); // twice is once
        held.push(s.admit(a, t0).unwrap());
        assert_eq!(s.admit(a, t0).err(), Some(SourceRefusal::Pending));
    }

    #[test]
    fn ipv6_sources_are_their_slash_64_and_mapped_ipv4_is_ipv4() {
        assert_eq!(source_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(source_key(ip("::ffff:192.0.2.9")), ip("192.0.2.9"));
        let s = Sources::new(L);
        let t0 = Instant::now();
        let _h: Vec<_> = (0..3)
            .map(|i| s.admit(ip(&format!("2001:db8:1:2::{i}")), t0).unwrap())
            .collect();
        assert_eq!(
            s.admit(ip("2001:db8:1:2::ffff"), t0).err(),
            Some(SourceRefusal::Pending)
        );
    }

    #[test]
    fn the_table_stays_bounded_and_keeps_sources_with_pending_handshakes() {
        let s = Sources::with_capacity(L, 10);
        let t0 = Instant::now();
        let busy = ip("203.0.113.1");
        let _held = s.admit(busy, t0).unwrap();
        for i in 0..1000u32 {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            drop(s.admit(a, t0 + Duration::from_millis(u64::from(i))));
            assert!(s.len() <= 10, "{} sources remembered", s.len());
        }
        // The busy source's pending handshake is still counted.
        let more: Vec<_> = (0..2).filter_map(|_| s.admit(busy, t0).ok()).collect();
        assert_eq!(more.len(), 2);
        assert_eq!(s.admit(busy, t0).err(), Some(SourceRefusal::Pending));
    }
}
