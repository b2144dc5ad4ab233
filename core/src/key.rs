//! One identity for every object the operator knows, used by both front
//! doors, the world's notices, the `Routed` tracker and the status plans: a
//! [`Kind`] plus a name, namespaced for leases and routes. Nothing re-parses
//! `"Kind ns/name"` strings; [`ObjKey`]'s `Display` is for people only.

use std::fmt;

/// Namespace and name of a namespaced object (a lease or a route).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl LeaseKey {
    /// A key from its parts.
    pub fn new(namespace: &str, name: &str) -> Self {
        LeaseKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for LeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The three kinds, in the order the allocator needs them admitted.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Kind {
    /// keyway.dev IPPool (cluster-scoped).
    #[serde(rename = "IPPool")]
    Pool,
    /// keyway.dev VMLease.
    #[serde(rename = "VMLease")]
    Lease,
    /// keyway.dev SshRoute.
    #[serde(rename = "SshRoute")]
    Route,
}

impl Kind {
    /// Every kind, pools first (leases need their pool), routes last (they
    /// resolve leases).
    pub const ALL: [Kind; 3] = [Kind::Pool, Kind::Lease, Kind::Route];

    /// The Kubernetes kind name (logs, metrics, Events, files).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pool => "IPPool",
            Kind::Lease => "VMLease",
            Kind::Route => "SshRoute",
        }
    }

    /// The kind of a Kubernetes kind name.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Identity of an object: its kind and name (namespaced for leases and
/// routes). Ordered kind first, so a sorted walk admits pools before leases.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjKey {
    /// An IPPool by name.
    Pool(String),
    /// A VMLease.
    Lease(LeaseKey),
    /// An SshRoute.
    Route(LeaseKey),
}

impl ObjKey {
    /// The key of an object of `kind` (the namespace is ignored for pools).
    pub fn new(kind: Kind, namespace: &str, name: &str) -> ObjKey {
        match kind {
            Kind::Pool => ObjKey::Pool(name.to_string()),
            Kind::Lease => ObjKey::Lease(LeaseKey::new(namespace, name)),
            Kind::Route => ObjKey::Route(LeaseKey::new(namespace, name)),
        }
    }

    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            ObjKey::Pool(_) => Kind::Pool,
            ObjKey::Lease(_) => Kind::Lease,
            ObjKey::Route(_) => Kind::Route,
        }
    }

    /// Namespace ("" for pools) and name.
    pub fn namespace_name(&self) -> (&str, &str) {
        match self {
            ObjKey::Pool(n) => ("", n),
            ObjKey::Lease(k) | ObjKey::Route(k) => (&k.namespace, &k.name),
        }
    }

    /// The name.
    pub fn name(&self) -> &str {
        self.namespace_name().1
    }
}

/// `Kind name` or `Kind namespace/name`.
impl fmt::Display for ObjKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjKey::Pool(n) => write!(f, "{} {n}", Kind::Pool),
            ObjKey::Lease(k) => write!(f, "{} {k}", Kind::Lease),
            ObjKey::Route(k) => write!(f, "{} {k}", Kind::Route),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_print_and_order_as_the_front_doors_need() {
        let p = ObjKey::new(Kind::Pool, "ignored", "v4");
        let l = ObjKey::new(Kind::Lease, "t", "vm");
        let r = ObjKey::new(Kind::Route, "t", "vm");
        assert_eq!(p.to_string(), "IPPool v4");
        assert_eq!(l.to_string(), "VMLease t/vm");
        assert_eq!(r.to_string(), "SshRoute t/vm");
        assert!(p < l && l < r, "pools sort before leases before routes");
        assert_eq!(l.namespace_name(), ("t", "vm"));
        assert_eq!(Kind::from_name("SshRoute"), Some(Kind::Route));
        assert_eq!(Kind::from_name("Pod"), None);
    }
}
