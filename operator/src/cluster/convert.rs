//! Kubernetes objects → the world's object model. Pure.
//!
//! Objects are read as [`DynamicObject`]s, not typed CRs: one object that
//! bypassed the schema (a number where a string belongs) must become a
//! `Failed` status naming the field, not a watcher that cannot decode its list
//! and stops every other object from reconciling.

use std::net::IpAddr;

use keyway_crds::validate::{self, FieldError, FieldErrors};
use keyway_crds::{
    IPPoolSpec, IPPoolStatus, SshRouteSpec, SshRouteStatus, VMLeaseSpec, VMLeaseStatus,
};
use kube::api::DynamicObject;
use serde::de::DeserializeOwned;

use keyway_core::allocator::LeaseKey;
use keyway_core::world::{LeaseObject, PoolObject, RouteObject};

fn field_error(field: &str, message: String) -> FieldErrors {
    FieldErrors(vec![FieldError {
        field: field.to_string(),
        message,
    }])
}

/// Parses `data.spec` as `T`, naming the offending field on failure.
fn spec_of<T: DeserializeOwned>(obj: &DynamicObject) -> Result<T, FieldErrors> {
    let spec = obj
        .data
        .get("spec")
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    if spec.is_null() {
        return Err(field_error("spec", "missing".to_string()));
    }
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "spec".to_string()
        } else {
            format!("spec.{path}")
        };
        field_error(&field, e.into_inner().to_string())
    })
}

/// The status as written, if it parses (a hand-mangled one reads as none).
pub fn status_of<T: DeserializeOwned>(obj: &DynamicObject) -> Option<T> {
    let st = obj.data.get("status")?;
    serde_json::from_value(st.clone()).ok()
}

/// The raw status value (for comparing with what we would write).
pub fn raw_status(obj: &DynamicObject) -> Option<&serde_json::Value> {
    obj.data.get("status")
}

/// Creation time in unix milliseconds (0 when unset: sorts as oldest, which
/// only matters for objects the API server would never return).
pub fn created_ms(obj: &DynamicObject) -> u64 {
    obj.metadata
        .creation_timestamp
        .as_ref()
        .map(|t| u64::try_from(t.0.as_millisecond()).unwrap_or(0))
        .unwrap_or(0)
}

/// Namespace/name of a namespaced object.
pub fn key_of(obj: &DynamicObject) -> LeaseKey {
    LeaseKey {
        namespace: obj.metadata.namespace.clone().unwrap_or_default(),
        name: obj.metadata.name.clone().unwrap_or_default(),
    }
}

/// An IPPool for the world.
pub fn pool(obj: &DynamicObject) -> PoolObject {
    PoolObject {
        name: obj.metadata.name.clone().unwrap_or_default(),
        generation: obj.metadata.generation,
        spec: spec_of::<IPPoolSpec>(obj).and_then(|s| validate::pool(&s)),
    }
}

/// A VMLease for the world, with the IP its status records (assigned-first).
pub fn lease(obj: &DynamicObject) -> LeaseObject {
    let status_ip = status_of::<VMLeaseStatus>(obj)
        .and_then(|s| s.ip)
        .and_then(|ip| ip.parse::<IpAddr>().ok());
    LeaseObject {
        key: key_of(obj),
        uid: obj.metadata.uid.clone().unwrap_or_default(),
        created_ms: created_ms(obj),
        generation: obj.metadata.generation,
        spec: spec_of::<VMLeaseSpec>(obj).and_then(|s| validate::lease(&s)),
        status_ip,
    }
}

/// An SshRoute for the world.
pub fn route(obj: &DynamicObject) -> RouteObject {
    let spec = spec_of::<SshRouteSpec>(obj);
    RouteObject {
        key: key_of(obj),
        created_ms: created_ms(obj),
        generation: obj.metadata.generation,
        from_raw: spec.as_ref().map(|s| s.from.clone()).unwrap_or_default(),
        spec: spec.and_then(|s| validate::route(&s)),
    }
}

/// Previous statuses, typed, for keeping condition transition times.
pub fn pool_status(obj: &DynamicObject) -> Option<IPPoolStatus> {
    status_of(obj)
}
/// See [`pool_status`].
pub fn lease_status(obj: &DynamicObject) -> Option<VMLeaseStatus> {
    status_of(obj)
}
/// See [`pool_status`].
pub fn route_status(obj: &DynamicObject) -> Option<SshRouteStatus> {
    status_of(obj)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn dynobj(v: serde_json::Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_spec_that_bypassed_the_schema_names_its_field() {
        let o = dynobj(serde_json::json!({
            "apiVersion": "keyway.dev/v1alpha1", "kind": "VMLease",
            "metadata": {"name": "a", "namespace": "t", "uid": "u1"},
            "spec": {"user": 5, "accessPublicKeys": [], "poolRef": "p", "target": {"address": "h:22"}}
        }));
        let l = lease(&o);
        let err = l.spec.unwrap_err();
        assert_eq!(err.0[0].field, "spec.user", "{err}");
        let o = dynobj(serde_json::json!({
            "apiVersion": "keyway.dev/v1alpha1", "kind": "VMLease",
            "metadata": {"name": "a", "namespace": "t"}
        }));
        assert_eq!(lease(&o).spec.unwrap_err().0[0].field, "spec");
    }

    #[test]
    fn status_ip_is_read_for_assigned_first() {
        let o = dynobj(serde_json::json!({
            "apiVersion": "keyway.dev/v1alpha1", "kind": "VMLease",
            "metadata": {"name": "a", "namespace": "t", "uid": "u1", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"user": "u", "accessPublicKeys": ["0000000000000000000000000000000000000000000000000000000000000001"], "poolRef": "p", "target": {"address": "h:22"}},
            "status": {"ip": "127.0.10.1"}
        }));
        let l = lease(&o);
        assert_eq!(l.status_ip, Some("127.0.10.1".parse().unwrap()));
        assert_eq!(l.key.namespace, "t");
        assert!(l.created_ms > 0);
        // A mangled status is ignored rather than fatal.
        let o = dynobj(serde_json::json!({
            "apiVersion": "keyway.dev/v1alpha1", "kind": "VMLease",
            "metadata": {"name": "a", "namespace": "t"},
            "spec": {}, "status": {"ip": 7}
        }));
        assert_eq!(lease(&o).status_ip, None);
    }
}
