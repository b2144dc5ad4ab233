//! The static table of resources the double serves.
//!
//! Every resource is identified by `(group, plural)`; the core group is `""`.
//! Only one version per group is served.

/// One served resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceDef {
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// The single served version.
    pub version: &'static str,
    /// Kind, e.g. `VMLease`.
    pub kind: &'static str,
    /// Plural resource name, used in URLs.
    pub plural: &'static str,
    /// Singular resource name (discovery only).
    pub singular: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Whether the resource has a `/status` subresource.
    ///
    /// With it, writes to the main resource never change `.status` and writes
    /// to `/status` change only `.status`.
    pub status_subresource: bool,
    /// Short names advertised by discovery.
    pub short_names: &'static [&'static str],
    /// Categories advertised by discovery.
    pub categories: &'static [&'static str],
    /// Whether this is a custom resource (CRD-backed in a real cluster).
    ///
    /// Custom resources reject strategic merge patches (415) and updates
    /// (PUT) without `metadata.resourceVersion` (422), as the real server does.
    pub custom: bool,
    /// Field selector keys accepted beyond `metadata.name` / `metadata.namespace`.
    pub extra_selectable_fields: &'static [&'static str],
}

impl ResourceDef {
    /// `apiVersion` of objects of this resource (`v1` or `group/version`).
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The `GroupResource` string used in error messages (`vmleases.keyway.dev`, `secrets`).
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The `GroupKind` string used in `Invalid` error messages (`VMLease.keyway.dev`).
    pub fn group_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_string()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    /// Key identifying the resource in the store.
    pub fn key(&self) -> (&'static str, &'static str) {
        (self.group, self.plural)
    }
}

const CORE_EVENT_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "type",
];

/// All resources served, in discovery order.
pub static RESOURCES: &[ResourceDef] = &[
    ResourceDef {
        group: "keyway.dev",
        version: "v1alpha1",
        kind: "IPPool",
        plural: "ippools",
        singular: "ippool",
        namespaced: false,
        status_subresource: true,
        short_names: &["ipp"],
        categories: &["keyway"],
        custom: true,
        extra_selectable_fields: &[],
    },
    ResourceDef {
        group: "keyway.dev",
        version: "v1alpha1",
        kind: "VMLease",
        plural: "vmleases",
        singular: "vmlease",
        namespaced: true,
        status_subresource: true,
        short_names: &["vml"],
        categories: &["keyway"],
        custom: true,
        extra_selectable_fields: &[],
    },
    ResourceDef {
        group: "keyway.dev",
        version: "v1alpha1",
        kind: "SshRoute",
        plural: "sshroutes",
        singular: "sshroute",
        namespaced: true,
        status_subresource: true,
        short_names: &["sshr"],
        categories: &["keyway"],
        custom: true,
        extra_selectable_fields: &[],
    },
    ResourceDef {
        group: "coordination.k8s.io",
        version: "v1",
        kind: "Lease",
        plural: "leases",
        singular: "lease",
        namespaced: true,
        status_subresource: false,
        short_names: &[],
        categories: &[],
        custom: false,
        extra_selectable_fields: &[],
    },
    ResourceDef {
        group: "events.k8s.io",
        version: "v1",
        kind: "Event",
        plural: "events",
        singular: "event",
        namespaced: true,
        status_subresource: false,
        short_names: &["ev"],
        categories: &[],
        custom: false,
        extra_selectable_fields: &[],
    },
    ResourceDef {
        group: "",
        version: "v1",
        kind: "Event",
        plural: "events",
        singular: "event",
        namespaced: true,
        status_subresource: false,
        short_names: &["ev"],
        categories: &[],
        custom: false,
        extra_selectable_fields: CORE_EVENT_FIELDS,
    },
    ResourceDef {
        group: "",
        version: "v1",
        kind: "Secret",
        plural: "secrets",
        singular: "secret",
        namespaced: true,
        status_subresource: false,
        short_names: &[],
        categories: &[],
        custom: false,
        extra_selectable_fields: &["type"],
    },
    ResourceDef {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        singular: "namespace",
        namespaced: false,
        status_subresource: true,
        short_names: &["ns"],
        categories: &[],
        custom: false,
        extra_selectable_fields: &["status.phase"],
    },
    ResourceDef {
        group: "",
        version: "v1",
        kind: "ConfigMap",
        plural: "configmaps",
        singular: "configmap",
        namespaced: true,
        status_subresource: false,
        short_names: &["cm"],
        categories: &[],
        custom: false,
        extra_selectable_fields: &[],
    },
];

/// Finds a resource by group, version and plural.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceDef> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Finds a resource by group and plural (any version).
pub fn find_by_plural(group: &str, plural: &str) -> Option<&'static ResourceDef> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.plural == plural)
}

/// Distinct `(group, version)` pairs of the non-core groups, in table order.
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&'static str, &'static str)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}

/// Resources of one group/version.
pub fn in_group_version(group: &str, version: &str) -> Vec<&'static ResourceDef> {
    RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        let v = find("keyway.dev", "v1alpha1", "vmleases").map(|r| r.kind);
        assert_eq!(v, Some("VMLease"));
        assert!(find("keyway.dev", "v1", "vmleases").is_none());
        let ev = find("", "v1", "events").map(|r| r.api_version());
        assert_eq!(ev.as_deref(), Some("v1"));
        let ev = find("events.k8s.io", "v1", "events").map(|r| r.api_version());
        assert_eq!(ev.as_deref(), Some("events.k8s.io/v1"));
        assert_eq!(
            groups(),
            vec![
                ("keyway.dev", "v1alpha1"),
                ("coordination.k8s.io", "v1"),
                ("events.k8s.io", "v1")
            ]
        );
    }
}
