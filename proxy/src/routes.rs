//! The routing table: a snapshot indexed for the SSH listener.
//!
//! Pure code, no I/O. Leases are looked up in the subscriber's checked
//! [`Table`] itself (its indexes by hash, by (IP, key) and by name), held as a
//! cheap copy that shares the maps, so the proxy keeps each lease once; only
//! routes are indexed here. A table is built once from a whole snapshot and
//! then follows each applied delta in O(change · log n)
//! ([`RouteTable::apply`]): its maps are persistent (`imbl`), so the next
//! table shares everything the delta did not touch, and connections keep
//! reading the one they hold while it is built. It answers one question: given the user name a client sent,
//! the destination IP it dialed and the key it offers, where (if anywhere)
//! does it go? Rules, in DESIGN.md's order:
//!
//! 1. a 64-hex user name selects the lease by hash; the key must be one of
//!    that lease's access keys (no fallback: a hash that routes nowhere is a
//!    rejection);
//! 2. otherwise `(destination IP, key fingerprint)` selects the lease;
//! 3. otherwise an `ssh://user@host` SshRoute whose host is the destination IP
//!    and whose allowed keys hold the key (or which allows anyone).
//!
//! Everything else is `None`, and the caller answers every `None` the same
//! way, so a client cannot learn which leases exist.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use keyway_snapshot::pb;
use keyway_snapshot::table::Table;

/// Where a routed connection's bytes go.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// `host:port` of an sshd, dialed over TCP.
    Address(String),
    /// A provider agent reached over libp2p (`/xe/tunnel/2.0.0`); the agent
    /// admits the tunnel by the lease's hash.
    Provider {
        peer_id: String,
        addresses: Vec<String>,
        lease_hash: [u8; 32],
    },
}

/// How a connection was matched; decides what `direct-tcpip` means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// `ssh <leaseHash>@gateway`: the gateway is a jump host; `direct-tcpip`
    /// goes straight to the lease's target and carries the client's own SSH.
    LeaseHash,
    /// `ssh <pooled IP>`: the gateway is the VM as far as the client knows;
    /// sessions and `-L` forwards are relayed through an upstream SSH login.
    PooledIp,
    /// An `ssh://user@host` SshRoute, relayed like a pooled-IP login.
    Route,
}

/// Identifies what a connection is bound to, for settlement and for sharing
/// upstream connections.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DestKey {
    Lease([u8; 32]),
    Route { namespace: String, name: String },
}

/// A routing decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub key: DestKey,
    pub via: Via,
    /// `namespace/name` of the lease or route, for logs.
    pub label: String,
    pub target: Target,
    /// The user name relayed sessions log into the target as.
    pub upstream_user: String,
    /// The principal relay certificates carry for this destination.
    pub relay_principal: String,
    /// Whose budget the connection spends: the lease's `spec.user`, or
    /// `route:<namespace>/<name>` for a route to a plain address.
    pub tenant: Arc<str>,
}

#[derive(Debug)]
struct RouteEntry {
    namespace: String,
    name: String,
    to: RouteTo,
    allow: HashSet<String>,
    allow_unauthenticated: bool,
    on: On,
}

#[derive(Debug)]
enum RouteTo {
    /// By lease hash (a checked snapshot always holds it).
    Lease([u8; 32]),
    Address(String),
}

/// What a route matches on.
#[derive(Clone, Debug)]
enum On {
    Connect(String, u16),
    Ssh(String, IpAddr),
}

/// Namespace and name.
type Name = (String, String);

/// The indexed snapshot. Cheap to clone and share: persistent maps.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    /// The checked snapshot this table indexes (a copy sharing its maps):
    /// leases by hash, by (IP, key) and by name come from its indexes.
    leases: Table,
    routes: imbl::HashMap<Name, Arc<RouteEntry>>,
    /// SSH routes by (user, host); the first by name that allows the key wins.
    by_user_host: imbl::HashMap<(String, IpAddr), imbl::OrdSet<Name>>,
    /// `tcp+https://host:port` routes by (lower-case host, port).
    by_connect: imbl::HashMap<(String, u16), imbl::OrdSet<Name>>,
}

/// Takes `name` out of the routes indexed under `k`, dropping the entry
/// once none is left.
fn unindex<K: Clone + Eq + std::hash::Hash>(
    index: &mut imbl::HashMap<K, imbl::OrdSet<Name>>,
    k: &K,
    name: &Name,
) {
    if let Some(set) = index.get_mut(k) {
        set.remove(name);
        if set.is_empty() {
            index.remove(k);
        }
    }
}

/// Where a CONNECT goes and who may open it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectDecision {
    /// What the tunnel is bound to (for settlement).
    pub key: DestKey,
    /// `namespace/name`, for logs.
    pub label: String,
    /// The backend.
    pub target: Target,
    /// Fingerprints allowed (empty with `allow_unauthenticated`).
    pub allow: HashSet<String>,
    /// No proof needed.
    pub allow_unauthenticated: bool,
}

/// User name for relayed logins by lease hash when the lease names none: a
/// 64-hex name is never a real account.
pub const DEFAULT_HASH_UPSTREAM_USER: &str = "root";

impl RouteTable {
    /// Indexes a checked table (a subscriber's [`keyway_snapshot::held::Held`]).
    /// Routes that cannot route (a hash of the wrong length, an SSH host
    /// that is not an IP) are skipped, never guessed.
    pub fn from_table(table: &Table) -> Self {
        let mut t = RouteTable {
            leases: table.clone(),
            ..RouteTable::default()
        };
        for r in table.routes() {
            t.insert_route(r);
        }
        t
    }

    /// The table after `d`, where `table` is the checked result of applying
    /// `d` to the snapshot this table indexes: leases come from `table`, and
    /// only the routes `d` names are touched; `self` is unchanged.
    pub fn apply(&self, d: &pb::SnapshotDelta, table: &Table) -> Self {
        let mut t = self.clone();
        t.leases = table.clone();
        for r in d
            .removed_routes
            .iter()
            .map(|r| (&r.namespace, &r.name))
            .chain(d.upserted_routes.iter().map(|r| (&r.namespace, &r.name)))
        {
            t.remove_route(&(r.0.clone(), r.1.clone()));
        }
        for r in &d.upserted_routes {
            t.insert_route(r);
        }
        t
    }

    fn remove_route(&mut self, name: &Name) {
        let Some(old) = self.routes.remove(name) else {
            return;
        };
        match &old.on {
            On::Connect(host, port) => unindex(&mut self.by_connect, &(host.clone(), *port), name),
            On::Ssh(user, host) => unindex(&mut self.by_user_host, &(user.clone(), *host), name),
        }
    }

    fn insert_route(&mut self, r: &pb::Route) {
        // What the route matches on; routes the listeners cannot see (an
        // SSH host that is not an IP: only the dialed IP is visible) are
        // skipped.
        let on = match &r.r#match {
            Some(pb::route::Match::Connect(m)) => match u16::try_from(m.port) {
                Ok(port) => On::Connect(m.host.to_ascii_lowercase(), port),
                Err(_) => return,
            },
            Some(pb::route::Match::Ssh(m)) => {
                match m.host.trim_matches(['[', ']']).parse::<IpAddr>() {
                    Ok(host) => On::Ssh(m.user.clone(), host),
                    Err(_) => return,
                }
            }
            None => return,
        };
        let to = match &r.to {
            Some(pb::route::To::Address(a)) => RouteTo::Address(a.clone()),
            Some(pb::route::To::LeaseHash(h)) => match <[u8; 32]>::try_from(h.as_slice()) {
                Ok(h) => RouteTo::Lease(h),
                Err(_) => return,
            },
            None => return,
        };
        let name = (r.namespace.clone(), r.name.clone());
        match &on {
            On::Connect(host, port) => {
                self.by_connect
                    .entry((host.clone(), *port))
                    .or_default()
                    .insert(name.clone());
            }
            On::Ssh(user, host) => {
                self.by_user_host
                    .entry((user.clone(), *host))
                    .or_default()
                    .insert(name.clone());
            }
        }
        self.routes.insert(
            name,
            Arc::new(RouteEntry {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                to,
                allow: r.allow_keys.iter().map(|k| k.fingerprint.clone()).collect(),
                allow_unauthenticated: r.allow_unauthenticated,
                on,
            }),
        );
    }

    /// Number of leases indexed.
    pub fn leases(&self) -> usize {
        self.leases.lease_count()
    }

    /// Decides where a login goes. `fingerprint` is the offered key's OpenSSH
    /// SHA-256 fingerprint, or `None` for the `none` method.
    pub fn decide(
        &self,
        user: &str,
        dst: IpAddr,
        fingerprint: Option<&str>,
    ) -> Option<Destination> {
        let dst = canonical(dst);
        if let Some(hash) = parse_hash(user) {
            let fp = fingerprint?;
            let l = self.leases.lease_by_hash(&hash)?;
            if !l.access_keys.iter().any(|k| k.fingerprint == fp) {
                return None;
            }
            return lease_destination(&l, Via::LeaseHash, DEFAULT_HASH_UPSTREAM_USER);
        }
        if let Some(fp) = fingerprint
            && let Some(l) = self.leases.lease_by_ip_key(dst, fp)
        {
            return lease_destination(&l, Via::PooledIp, user);
        }
        let candidates = self.by_user_host.get(&(user.to_string(), dst))?;
        let r = candidates
            .iter()
            .filter_map(|n| self.routes.get(n))
            .find(|r| {
                r.allow_unauthenticated || fingerprint.is_some_and(|fp| r.allow.contains(fp))
            })?;
        match &r.to {
            RouteTo::Lease(h) => {
                let l = self.leases.lease_by_hash(h)?;
                let mut d = lease_destination(&l, Via::Route, user)?;
                d.key = DestKey::Route {
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                };
                d.label = format!("{}/{} -> {}", r.namespace, r.name, d.label);
                Some(d)
            }
            RouteTo::Address(a) => Some(Destination {
                key: DestKey::Route {
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                },
                via: Via::Route,
                label: format!("{}/{}", r.namespace, r.name),
                target: Target::Address(a.clone()),
                upstream_user: user.to_string(),
                // Outside a lease the target trusts the relay CA the plain
                // OpenSSH way: the certificate names the account.
                relay_principal: user.to_string(),
                tenant: format!("route:{}/{}", r.namespace, r.name).into(),
            }),
        }
    }

    /// True while `key` still names something in this table.
    pub fn contains(&self, key: &DestKey) -> bool {
        match key {
            DestKey::Lease(h) => self.leases.has_lease_hash(h),
            DestKey::Route { namespace, name } => {
                self.routes.contains_key(&(namespace.clone(), name.clone()))
            }
        }
    }

    /// Where a CONNECT to `host:port` goes: a `tcp+https://host:port` route,
    /// or, under `lease_domain`, `<lease>.<namespace>.<lease_domain>` (any
    /// port) to that lease's target for the lease's own keys.
    pub fn connect(
        &self,
        host: &str,
        port: u16,
        lease_domain: Option<&str>,
    ) -> Option<ConnectDecision> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if let Some(r) = self
            .by_connect
            .get(&(host.clone(), port))
            .and_then(|set| set.iter().next())
            .and_then(|n| self.routes.get(n))
        {
            let target = match &r.to {
                RouteTo::Address(a) => Target::Address(a.clone()),
                RouteTo::Lease(h) => {
                    let l = self.leases.lease_by_hash(h)?;
                    target_of(&l, *h)?
                }
            };
            return Some(ConnectDecision {
                key: DestKey::Route {
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                },
                label: format!("{}/{}", r.namespace, r.name),
                target,
                allow: r.allow.clone(),
                allow_unauthenticated: r.allow_unauthenticated,
            });
        }
        let domain = lease_domain?.trim_end_matches('.').to_ascii_lowercase();
        let prefix = host.strip_suffix(&domain)?.strip_suffix('.')?;
        let (name, namespace) = prefix.split_once('.')?;
        let l = self.leases.lease(namespace, name)?;
        let hash = <[u8; 32]>::try_from(l.lease_hash.as_slice()).ok()?;
        Some(ConnectDecision {
            key: DestKey::Lease(hash),
            label: label_of(&l),
            target: target_of(&l, hash)?,
            allow: fingerprints_of(&l),
            allow_unauthenticated: false,
        })
    }

    /// The lease behind `POST /tunnel/{hash}/tcp`, with its keys (OpenSSH
    /// lines) for the plain signature.
    pub fn upgrade(&self, hash: &[u8; 32]) -> Option<(ConnectDecision, Vec<String>)> {
        let l = self.leases.lease_by_hash(hash)?;
        Some((
            ConnectDecision {
                key: DestKey::Lease(*hash),
                label: label_of(&l),
                target: target_of(&l, *hash)?,
                allow: fingerprints_of(&l),
                allow_unauthenticated: false,
            },
            l.access_keys.iter().map(|k| k.openssh.clone()).collect(),
        ))
    }
}

/// `namespace/name`, for logs.
fn label_of(l: &pb::Lease) -> String {
    format!("{}/{}", l.namespace, l.name)
}

/// The lease's access key fingerprints.
fn fingerprints_of(l: &pb::Lease) -> HashSet<String> {
    l.access_keys
        .iter()
        .map(|k| k.fingerprint.clone())
        .collect()
}

/// Where the lease's bytes go (`hash` is its hash).
fn target_of(l: &pb::Lease, hash: [u8; 32]) -> Option<Target> {
    match l.target.as_ref()? {
        pb::lease::Target::Address(a) => Some(Target::Address(a.clone())),
        pb::lease::Target::Provider(p) => Some(Target::Provider {
            peer_id: p.peer_id.clone(),
            addresses: p.addresses.clone(),
            lease_hash: hash,
        }),
    }
}

/// `default_user` is the upstream user when the lease names none.
fn lease_destination(l: &pb::Lease, via: Via, default_user: &str) -> Option<Destination> {
    let hash = <[u8; 32]>::try_from(l.lease_hash.as_slice()).ok()?;
    let upstream_user = if l.upstream_user.is_empty() {
        default_user
    } else {
        &l.upstream_user
    };
    Some(Destination {
        key: DestKey::Lease(hash),
        via,
        label: label_of(l),
        target: target_of(l, hash)?,
        upstream_user: upstream_user.to_string(),
        relay_principal: l.relay_principal.clone(),
        tenant: l.user.as_str().into(),
    })
}

/// `::ffff:a.b.c.d` (how a dual-stack listener reports IPv4) is `a.b.c.d`.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// A user name that is exactly 64 hex digits is a lease hash.
pub fn parse_hash(user: &str) -> Option<[u8; 32]> {
    if user.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(user.to_ascii_lowercase(), &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    impl RouteTable {
        /// Indexes a snapshot that passes the check.
        fn build(snap: &pb::Snapshot) -> Self {
            RouteTable::from_table(&Table::from_snapshot(snap.clone()).unwrap())
        }
    }

    fn key(fp: &str) -> pb::AccessKey {
        pb::AccessKey {
            openssh: format!("ssh-ed25519 {fp}"),
            fingerprint: fp.into(),
        }
    }

    fn lease(name: &str, user: &str, ip: &str, h: u8, fps: &[&str]) -> pb::Lease {
        pb::Lease {
            namespace: "default".into(),
            name: name.into(),
            lease_hash: vec![h; 32],
            user: user.into(),
            ip: ip.into(),
            pool: "p".into(),
            access_keys: fps.iter().map(|f| key(f)).collect(),
            target: Some(pb::lease::Target::Address(format!("127.0.20.{h}:22"))),
            upstream_user: String::new(),
            relay_principal: format!("keyway-lease-{h}"),
            ip_route_disabled_fingerprints: vec![],
        }
    }

    fn snap(leases: Vec<pb::Lease>, routes: Vec<pb::Route>) -> pb::Snapshot {
        pb::Snapshot {
            version: Some(pb::Version {
                epoch: 1,
                version: 1,
            }),
            leases,
            routes,
            relay: None,
            generated_unix_ms: 0,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn shared_ip_routes_by_key() {
        let t = RouteTable::build(&snap(
            vec![
                lease("alice-web", "alice", "127.0.10.1", 1, &["A"]),
                lease("bob-dev", "bob", "127.0.10.1", 3, &["B"]),
                lease("alice-db", "alice", "127.0.10.2", 2, &["A"]),
            ],
            vec![],
        ));
        let d = |u: &str, i: &str, k: &str| t.decide(u, ip(i), Some(k)).map(|d| d.label);
        assert_eq!(
            d("me", "127.0.10.1", "A").as_deref(),
            Some("default/alice-web")
        );
        assert_eq!(
            d("me", "127.0.10.1", "B").as_deref(),
            Some("default/bob-dev")
        );
        assert_eq!(
            d("me", "127.0.10.2", "A").as_deref(),
            Some("default/alice-db")
        );
        // bob holds nothing on .2; an unknown key holds nothing anywhere.
        assert_eq!(d("me", "127.0.10.2", "B"), None);
        assert_eq!(d("me", "127.0.10.1", "C"), None);
        // The dual-stack form of the same IPv4 address routes the same.
        assert_eq!(
            d("me", "::ffff:127.0.10.1", "A").as_deref(),
            Some("default/alice-web")
        );
        // The client's user name is the upstream user unless the lease names one.
        let x = t.decide("ubuntu", ip("127.0.10.1"), Some("A")).unwrap();
        assert_eq!(x.upstream_user, "ubuntu");
        assert_eq!(x.via, Via::PooledIp);
    }

    #[test]
    fn lease_hash_needs_one_of_its_keys_and_never_falls_back() {
        let t = RouteTable::build(&snap(
            vec![
                lease("a", "alice", "127.0.10.1", 1, &["A"]),
                lease("b", "bob", "127.0.10.1", 2, &["B"]),
            ],
            vec![],
        ));
        let h1 = hex::encode([1u8; 32]);
        let d = t.decide(&h1, ip("127.0.10.9"), Some("A")).unwrap();
        assert_eq!((d.via, d.label.as_str()), (Via::LeaseHash, "default/a"));
        assert_eq!(d.upstream_user, DEFAULT_HASH_UPSTREAM_USER);
        // Uppercase hex is the same hash.
        assert!(
            t.decide(&h1.to_uppercase(), ip("127.0.10.9"), Some("A"))
                .is_some()
        );
        // Right hash, wrong key: rejected, even though (ip, B) routes to b.
        assert_eq!(t.decide(&h1, ip("127.0.10.1"), Some("B")), None);
        // Unknown hash: rejected.
        assert_eq!(
            t.decide(&"ab".repeat(32), ip("127.0.10.1"), Some("A")),
            None
        );
        // No key: rejected.
        assert_eq!(t.decide(&h1, ip("127.0.10.1"), None), None);
    }

    #[test]
    fn disabled_ip_fingerprints_route_only_by_hash() {
        let mut b = lease("b", "bob", "127.0.10.1", 2, &["S"]);
        b.ip_route_disabled_fingerprints = vec!["S".into()];
        let t = RouteTable::build(&snap(
            vec![lease("a", "alice", "127.0.10.1", 1, &["S"]), b],
            vec![],
        ));
        assert_eq!(
            t.decide("x", ip("127.0.10.1"), Some("S")).unwrap().label,
            "default/a"
        );
        let h2 = hex::encode([2u8; 32]);
        assert_eq!(
            t.decide(&h2, ip("127.0.10.1"), Some("S")).unwrap().label,
            "default/b"
        );
    }

    #[test]
    fn ssh_routes_match_user_and_destination() {
        let route =
            |name: &str, user: &str, host: &str, to: pb::route::To, keys: &[&str], open: bool| {
                pb::Route {
                    namespace: "ops".into(),
                    name: name.into(),
                    from: format!("ssh://{user}@{host}"),
                    r#match: Some(pb::route::Match::Ssh(pb::SshMatch {
                        user: user.into(),
                        host: host.into(),
                    })),
                    to: Some(to),
                    allow_keys: keys.iter().map(|k| key(k)).collect(),
                    allow_unauthenticated: open,
                }
            };
        let t = RouteTable::build(&snap(
            vec![lease("a", "alice", "127.0.10.1", 1, &["A"])],
            vec![
                route(
                    "git",
                    "git",
                    "127.0.10.5",
                    pb::route::To::Address("127.0.30.1:22".into()),
                    &["K"],
                    false,
                ),
                route(
                    "demo",
                    "demo",
                    "127.0.10.5",
                    pb::route::To::Address("127.0.30.2:22".into()),
                    &[],
                    true,
                ),
                route(
                    "to-a",
                    "ops",
                    "127.0.10.5",
                    pb::route::To::LeaseHash(vec![1; 32]),
                    &["K"],
                    false,
                ),
            ],
        ));
        let g = t.decide("git", ip("127.0.10.5"), Some("K")).unwrap();
        assert_eq!(g.target, Target::Address("127.0.30.1:22".into()));
        assert_eq!(g.upstream_user, "git");
        assert_eq!(g.relay_principal, "git");
        assert_eq!(t.decide("git", ip("127.0.10.5"), Some("Z")), None);
        assert_eq!(t.decide("git", ip("127.0.10.6"), Some("K")), None);
        assert!(t.decide("demo", ip("127.0.10.5"), None).is_some());
        assert!(t.decide("git", ip("127.0.10.5"), None).is_none());
        let o = t.decide("ops", ip("127.0.10.5"), Some("K")).unwrap();
        assert_eq!(o.target, Target::Address("127.0.20.1:22".into()));
        assert_eq!(o.relay_principal, "keyway-lease-1");
        assert!(t.contains(&o.key));
        // A lease's own (ip, key) route wins over a route with the same user.
        assert_eq!(
            t.decide("ops", ip("127.0.10.1"), Some("A")).unwrap().via,
            Via::PooledIp
        );
    }

    #[test]
    fn withdrawn_leases_are_gone() {
        let t1 = RouteTable::build(&snap(
            vec![lease("a", "alice", "127.0.10.1", 1, &["A"])],
            vec![],
        ));
        let d = t1.decide("u", ip("127.0.10.1"), Some("A")).unwrap();
        let t2 = RouteTable::build(&snap(vec![], vec![]));
        assert!(t1.contains(&d.key));
        assert!(!t2.contains(&d.key));
        assert_eq!(t2.decide("u", ip("127.0.10.1"), Some("A")), None);
    }

    #[test]
    fn hash_parsing() {
        assert!(parse_hash(&"0".repeat(64)).is_some());
        assert!(parse_hash(&"0".repeat(63)).is_none());
        assert!(parse_hash(&"g".repeat(64)).is_none());
        assert!(parse_hash("root").is_none());
    }

    mod incremental {
        use super::*;
        use keyway_snapshot::{check, delta};
        use proptest::prelude::*;

        fn any_lease() -> impl Strategy<Value = pb::Lease> {
            (0u8..5, 1u8..3, 0u8..3, any::<bool>()).prop_map(|(n, ip, fp, dis)| {
                let mut l = lease(
                    &format!("l{n}"),
                    &format!("u{n}"),
                    &format!("127.0.10.{ip}"),
                    n + 1,
                    &[&format!("F{fp}")],
                );
                if dis {
                    l.ip_route_disabled_fingerprints = vec![format!("F{fp}")];
                }
                l
            })
        }

        fn any_route() -> impl Strategy<Value = pb::Route> {
            (0u8..3, 0u8..2, 0u8..5, any::<bool>()).prop_map(|(n, user, to, connect)| pb::Route {
                namespace: "default".into(),
                name: format!("r{n}"),
                from: String::new(),
                r#match: Some(if connect {
                    pb::route::Match::Connect(pb::ConnectMatch {
                        host: format!("h{user}.example"),
                        port: 443,
                    })
                } else {
                    pb::route::Match::Ssh(pb::SshMatch {
                        user: format!("git{user}"),
                        host: "127.0.10.1".into(),
                    })
                }),
                to: Some(if to == 0 {
                    pb::route::To::Address("127.0.30.1:22".into())
                } else {
                    pb::route::To::LeaseHash(vec![to; 32])
                }),
                allow_keys: vec![key("F1")],
                allow_unauthenticated: false,
            })
        }

        fn any_snapshot() -> impl Strategy<Value = pb::Snapshot> {
            (
                prop::collection::vec(any_lease(), 0..6),
                prop::collection::vec(any_route(), 0..3),
            )
                .prop_map(|(leases, routes)| {
                    let mut s = snap(vec![], vec![]);
                    for l in leases {
                        if !s.leases.iter().any(|o| o.name == l.name) {
                            s.leases.push(l);
                        }
                    }
                    for r in routes {
                        if !s.routes.iter().any(|o| o.name == r.name) {
                            s.routes.push(r);
                        }
                    }
                    // Consistent by construction: a second lease with a key
                    // on an IP routes it by hash only; routes lead to leases
                    // that exist.
                    let mut taken = HashSet::new();
                    for l in &mut s.leases {
                        let k = (l.ip.clone(), l.access_keys[0].fingerprint.clone());
                        if !l.ip_route_disabled_fingerprints.contains(&k.1)
                            && !taken.insert(k.clone())
                        {
                            l.ip_route_disabled_fingerprints = vec![k.1];
                        }
                    }
                    let hashes: HashSet<Vec<u8>> =
                        s.leases.iter().map(|l| l.lease_hash.clone()).collect();
                    for r in &mut s.routes {
                        if let Some(pb::route::To::LeaseHash(h)) = &r.to
                            && !hashes.contains(h)
                        {
                            r.to = Some(pb::route::To::Address("127.0.30.2:22".into()));
                        }
                    }
                    delta::normalize(&mut s);
                    s
                })
        }

        /// Every answer the table gives for the names, IPs and keys in play.
        fn answers(t: &RouteTable) -> Vec<String> {
            let mut out = Vec::new();
            let mut users: Vec<String> = (1u8..5).map(|h| hex::encode([h; 32])).collect();
            users.extend(["git0", "git1", "root"].map(String::from));
            for user in &users {
                for ip in ["127.0.10.1", "127.0.10.2"] {
                    for fp in [None, Some("F0"), Some("F1"), Some("F2")] {
                        out.push(format!("{:?}", t.decide(user, ip.parse().unwrap(), fp)));
                    }
                }
            }
            for host in ["h0.example", "h1.example", "l1.default.vm.example"] {
                out.push(format!("{:?}", t.connect(host, 443, Some("vm.example"))));
            }
            for h in 1u8..5 {
                out.push(format!("{:?}", t.upgrade(&[h; 32])));
            }
            out.push(t.leases().to_string());
            out
        }

        proptest! {
            /// Following a delta answers exactly as indexing the snapshot it
            /// leads to from scratch.
            #[test]
            fn a_table_that_follows_a_delta_answers_as_a_rebuilt_one(
                a in any_snapshot(),
                b in any_snapshot(),
            ) {
                prop_assume!(check::check(&a).is_ok() && check::check(&b).is_ok());
                let d = delta::diff(&a, &b);
                // The table a subscriber reaches by applying the delta.
                let base = Table::from_snapshot(a.clone()).unwrap();
                let mut next = base.clone();
                next.apply(&d).unwrap();
                let followed = RouteTable::from_table(&base).apply(&d, &next);
                let rebuilt = RouteTable::build(&b);
                prop_assert_eq!(answers(&followed), answers(&rebuilt));
                // The table it came from still answers for `a`.
                let from = RouteTable::from_table(&base);
                let _ = from.apply(&d, &next);
                prop_assert_eq!(answers(&from), answers(&RouteTable::build(&a)));
            }
        }
    }
}
