//! Turns specs into checked values, or into errors that name the field.
//!
//! The CRD schema catches what OpenAPI can express; this catches the rest (key
//! encodings, CIDRs, addresses) and is the only check local mode has. Objects that
//! bypassed the schema get the same treatment, so nothing downstream ever sees an
//! unparsed string.

use std::fmt;
use std::net::IpAddr;

use crate::addresses::AddressSet;
use crate::keys::AccessKey;
use crate::types::{IPPoolSpec, SshRouteSpec, VMLeaseSpec};

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.accessPublicKeys[1]`.
    pub field: String,
    /// What is wrong, in words a user can act on.
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found in one object (never empty when returned as an error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldErrors(pub Vec<FieldError>);

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FieldErrors {}

/// A `host:port` backend.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// DNS name or IP literal (without brackets).
    pub host: String,
    /// TCP port, never 0.
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl HostPort {
    /// Parses `host:port`, `1.2.3.4:22` or `[2001:db8::1]:22`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| format!("{s:?}: expected [ipv6]:port"))?;
            h.parse::<std::net::Ipv6Addr>()
                .map_err(|e| format!("{s:?}: {h:?} is not an IPv6 address: {e}"))?;
            (h, p)
        } else {
            let (h, p) = s
                .rsplit_once(':')
                .ok_or_else(|| format!("{s:?}: expected host:port"))?;
            if h.contains(':') {
                return Err(format!("{s:?}: write IPv6 addresses as [addr]:port"));
            }
            (h, p)
        };
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: port {port:?} is not a number from 1 to 65535"))?;
        if port == 0 {
            return Err(format!("{s:?}: port 0 is not dialable"));
        }
        if host.parse::<IpAddr>().is_err() && !valid_dns_name(host) {
            return Err(format!("{s:?}: {host:?} is not a host name or IP address"));
        }
        Ok(HostPort {
            host: host.to_string(),
            port,
        })
    }
}

fn valid_dns_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Where a lease's VM accepts SSH.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Direct TCP to the VM's sshd.
    Address(HostPort),
    /// A provider agent over libp2p.
    Provider {
        /// base58 libp2p peer ID.
        peer_id: String,
        /// Multiaddresses to dial (may be empty: discovery).
        addresses: Vec<String>,
    },
}

/// A checked [`VMLeaseSpec`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidLease {
    /// Tenant identity.
    pub user: String,
    /// IPPool name.
    pub pool: String,
    /// Access keys, deduplicated by fingerprint, in spec order.
    pub keys: Vec<AccessKey>,
    /// The VM's sshd.
    pub target: Target,
    /// Relay login user, if fixed.
    pub upstream_user: Option<String>,
    /// Lease is over.
    pub settled: bool,
}

fn check_name(field: &str, v: &str, what: &str, errors: &mut Vec<FieldError>) {
    if v.trim().is_empty() {
        errors.push(FieldError::new(field, format!("{what} must not be empty")));
    } else if v.len() > 253 {
        errors.push(FieldError::new(
            field,
            format!("{what} is longer than 253 characters"),
        ));
    } else if v.chars().any(|c| c.is_control()) {
        errors.push(FieldError::new(
            field,
            format!("{what} contains control characters"),
        ));
    }
}

fn parse_keys(field: &str, lines: &[String], errors: &mut Vec<FieldError>) -> Vec<AccessKey> {
    let mut keys: Vec<AccessKey> = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match AccessKey::parse(line) {
            Ok(k) => {
                if !keys.iter().any(|have| have.fingerprint == k.fingerprint) {
                    keys.push(k);
                }
            }
            Err(e) => errors.push(FieldError::new(format!("{field}[{i}]"), e.to_string())),
        }
    }
    keys
}

/// Checks an IPPool spec and builds its address set.
pub fn pool(spec: &IPPoolSpec) -> Result<AddressSet, FieldErrors> {
    if spec.addresses.is_empty() {
        return Err(FieldErrors(vec![FieldError::new(
            "spec.addresses",
            "a pool needs at least one address, CIDR or range",
        )]));
    }
    AddressSet::new(&spec.addresses, &spec.exclude)
        .map_err(|e| FieldErrors(vec![FieldError::new("spec", e.to_string())]))
        .and_then(|set| {
            if set.is_empty() {
                Err(FieldErrors(vec![FieldError::new(
                    "spec.exclude",
                    "excludes remove every address of the pool",
                )]))
            } else {
                Ok(set)
            }
        })
}

/// Checks a VMLease spec.
pub fn lease(spec: &VMLeaseSpec) -> Result<ValidLease, FieldErrors> {
    let mut errors = Vec::new();
    check_name("spec.user", &spec.user, "user", &mut errors);
    check_name("spec.poolRef", &spec.pool_ref, "poolRef", &mut errors);
    if spec.access_public_keys.is_empty() {
        errors.push(FieldError::new(
            "spec.accessPublicKeys",
            "at least one public key is required",
        ));
    }
    let keys = parse_keys(
        "spec.accessPublicKeys",
        &spec.access_public_keys,
        &mut errors,
    );
    let target = match (&spec.target.address, &spec.target.provider) {
        (Some(addr), None) => match HostPort::parse(addr) {
            Ok(hp) => Some(Target::Address(hp)),
            Err(e) => {
                errors.push(FieldError::new("spec.target.address", e));
                None
            }
        },
        (None, Some(p)) => {
            let mut ok = true;
            if !valid_peer_id(&p.peer_id) {
                ok = false;
                errors.push(FieldError::new(
                    "spec.target.provider.peerId",
                    format!("{:?} is not a base58 libp2p peer ID (12D3KooW…)", p.peer_id),
                ));
            }
            for (i, a) in p.addresses.iter().enumerate() {
                if !a.starts_with('/') || a.chars().any(char::is_whitespace) {
                    ok = false;
                    errors.push(FieldError::new(
                        format!("spec.target.provider.addresses[{i}]"),
                        format!("{a:?} is not a multiaddress (/ip4/…/tcp/…)"),
                    ));
                }
            }
            ok.then(|| Target::Provider {
                peer_id: p.peer_id.clone(),
                addresses: p.addresses.clone(),
            })
        }
        (Some(_), Some(_)) => {
            errors.push(FieldError::new(
                "spec.target",
                "set exactly one of address or provider, not both",
            ));
            None
        }
        (None, None) => {
            errors.push(FieldError::new(
                "spec.target",
                "set exactly one of address (host:port) or provider",
            ));
            None
        }
    };
    if let Some(u) = &spec.upstream_user
        && !valid_unix_user(u)
    {
        errors.push(FieldError::new(
            "spec.upstreamUser",
            format!("{u:?} is not a valid login name"),
        ));
    }
    match target {
        Some(target) if errors.is_empty() => Ok(ValidLease {
            user: spec.user.clone(),
            pool: spec.pool_ref.clone(),
            keys,
            target,
            upstream_user: spec.upstream_user.clone(),
            settled: spec.settled,
        }),
        _ => Err(FieldErrors(errors)),
    }
}

fn valid_peer_id(s: &str) -> bool {
    const B58: &str = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    (32..=128).contains(&s.len()) && s.chars().all(|c| B58.contains(c))
}

fn valid_unix_user(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// What an SshRoute matches on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RouteFrom {
    /// `tcp+https://host:port`: the CONNECT authority.
    Connect(HostPort),
    /// `ssh://user@ip`: user name and destination IP on the SSH listener.
    Ssh {
        /// SSH user name the client gives.
        user: String,
        /// Destination IP the client dialed.
        host: IpAddr,
    },
}

/// Where an SshRoute leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteTo {
    /// `tcp://host:port`.
    Address(HostPort),
    /// A VMLease in the route's namespace.
    Lease(String),
}

/// A checked [`SshRouteSpec`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidRoute {
    /// Match.
    pub from: RouteFrom,
    /// Backend.
    pub to: RouteTo,
    /// Keys that may use it.
    pub allow_keys: Vec<AccessKey>,
    /// Anyone may use it.
    pub allow_unauthenticated: bool,
}

/// Checks an SshRoute spec.
pub fn route(spec: &SshRouteSpec) -> Result<ValidRoute, FieldErrors> {
    let mut errors = Vec::new();
    let from = match parse_from(&spec.from) {
        Ok(f) => Some(f),
        Err(e) => {
            errors.push(FieldError::new("spec.from", e));
            None
        }
    };
    let to = match (&spec.to, &spec.lease_ref) {
        (Some(to), None) => match parse_tcp_url(to) {
            Ok(hp) => Some(RouteTo::Address(hp)),
            Err(e) => {
                errors.push(FieldError::new("spec.to", e));
                None
            }
        },
        (None, Some(l)) if !l.trim().is_empty() => Some(RouteTo::Lease(l.clone())),
        (None, Some(_)) => {
            errors.push(FieldError::new("spec.leaseRef", "must not be empty"));
            None
        }
        (Some(_), Some(_)) => {
            errors.push(FieldError::new(
                "spec",
                "set exactly one of to or leaseRef, not both",
            ));
            None
        }
        (None, None) => {
            errors.push(FieldError::new(
                "spec",
                "set one of to (tcp://host:port) or leaseRef",
            ));
            None
        }
    };
    let allow_keys = parse_keys("spec.allowPublicKeys", &spec.allow_public_keys, &mut errors);
    if spec.allow_public_keys.is_empty() && !spec.allow_unauthenticated {
        errors.push(FieldError::new(
            "spec.allowPublicKeys",
            "list the keys allowed to use this route, or set allowUnauthenticated: true explicitly",
        ));
    }
    match (from, to) {
        (Some(from), Some(to)) if errors.is_empty() => Ok(ValidRoute {
            from,
            to,
            allow_keys,
            allow_unauthenticated: spec.allow_unauthenticated,
        }),
        _ => Err(FieldErrors(errors)),
    }
}

fn url_host(url: &url::Url) -> Option<String> {
    match url.host()? {
        // Non-special schemes (tcp+https, tcp) keep IP hosts as opaque names.
        url::Host::Domain(d) => Some(d.trim_start_matches('[').trim_end_matches(']').to_string()),
        url::Host::Ipv4(a) => Some(a.to_string()),
        url::Host::Ipv6(a) => Some(a.to_string()),
    }
}

fn parse_from(s: &str) -> Result<RouteFrom, String> {
    let url = url::Url::parse(s.trim()).map_err(|e| format!("{s:?}: {e}"))?;
    let bare = url.path().is_empty() || url.path() == "/";
    if !bare || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{s:?}: a route matches host and port only; remove the path"
        ));
    }
    match url.scheme() {
        "tcp+https" => {
            let host = url_host(&url).ok_or_else(|| format!("{s:?}: missing host"))?;
            let port = url
                .port()
                .ok_or_else(|| format!("{s:?}: missing port (tcp+https://host:port)"))?;
            if !url.username().is_empty() {
                return Err(format!("{s:?}: tcp+https routes carry no user name"));
            }
            HostPort::parse(&HostPort { host, port }.to_string()).map(RouteFrom::Connect)
        }
        "ssh" => {
            let user = url.username();
            if user.is_empty() {
                return Err(format!("{s:?}: expected ssh://user@ip"));
            }
            // "ssh" is not a special scheme to the URL parser, so IP hosts come
            // back as opaque names: parse them here.
            let host = url
                .host_str()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
                .and_then(|h| h.parse::<IpAddr>().ok())
                .ok_or_else(|| {
                    format!(
                        "{s:?}: the SSH listener matches the destination IP the client dialed; use an IP address"
                    )
                })?;
            Ok(RouteFrom::Ssh {
                user: user.to_string(),
                host,
            })
        }
        other => Err(format!(
            "{s:?}: unsupported scheme {other:?}; use tcp+https://host:port or ssh://user@ip"
        )),
    }
}

fn parse_tcp_url(s: &str) -> Result<HostPort, String> {
    let url = url::Url::parse(s.trim()).map_err(|e| format!("{s:?}: {e}"))?;
    if url.scheme() != "tcp" {
        return Err(format!("{s:?}: expected tcp://host:port"));
    }
    let host = url_host(&url).ok_or_else(|| format!("{s:?}: missing host"))?;
    let port = url
        .port()
        .ok_or_else(|| format!("{s:?}: missing port (tcp://host:port)"))?;
    HostPort::parse(&HostPort { host, port }.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::types::{LeaseTarget, ProviderTarget};

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKKoNs9XCkg70lxMPr+Kwva+cmXzf8/12/Srx2GyMdae alice@laptop";

    fn lease_spec() -> VMLeaseSpec {
        VMLeaseSpec {
            user: "alice".into(),
            access_public_keys: vec![KEY.into()],
            pool_ref: "pool".into(),
            target: LeaseTarget {
                address: Some("127.0.0.1:22".into()),
                provider: None,
            },
            upstream_user: None,
            settled: false,
        }
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(HostPort::parse("vm1:22").unwrap().port, 22);
        assert_eq!(HostPort::parse("[::1]:2200").unwrap().host, "::1");
        assert_eq!(
            HostPort::parse("[::1]:2200").unwrap().to_string(),
            "[::1]:2200"
        );
        for bad in [
            "vm1",
            "vm1:0",
            "vm1:99999",
            "::1:22",
            "bad host:22",
            "[zz]:22",
            ":22",
        ] {
            assert!(HostPort::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn lease_errors_name_fields() {
        let mut s = lease_spec();
        s.access_public_keys.push("ssh-ed25519 garbage".into());
        s.target.address = Some("nowhere".into());
        let err = lease(&s).unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.accessPublicKeys[1]", "spec.target.address"]);

        let mut s = lease_spec();
        s.target.provider = Some(ProviderTarget {
            peer_id: "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN".into(),
            addresses: vec![],
        });
        assert_eq!(lease(&s).unwrap_err().0[0].field, "spec.target");
        s.target.address = None;
        assert!(lease(&s).is_ok());
    }

    #[test]
    fn duplicate_keys_collapse() {
        let mut s = lease_spec();
        s.access_public_keys.push(format!("{KEY} other-comment"));
        assert_eq!(lease(&s).unwrap().keys.len(), 1);
    }

    #[test]
    fn routes() {
        let r = SshRouteSpec {
            from: "tcp+https://ssh.example.com:22".into(),
            to: Some("tcp://10.0.0.5:22".into()),
            lease_ref: None,
            allow_public_keys: vec![],
            allow_unauthenticated: true,
        };
        let v = route(&r).unwrap();
        assert_eq!(
            v.from,
            RouteFrom::Connect(HostPort {
                host: "ssh.example.com".into(),
                port: 22
            })
        );
        let mut ssh = r.clone();
        ssh.from = "ssh://git@127.0.10.1".into();
        assert!(matches!(route(&ssh).unwrap().from, RouteFrom::Ssh { .. }));
        ssh.from = "ssh://git@gw.example.com".into();
        assert!(route(&ssh).is_err());
        let mut closed = r.clone();
        closed.allow_unauthenticated = false;
        assert_eq!(
            route(&closed).unwrap_err().0[0].field,
            "spec.allowPublicKeys"
        );
        let mut noport = r;
        noport.from = "tcp+https://ssh.example.com".into();
        assert!(route(&noport).is_err());
    }
}
