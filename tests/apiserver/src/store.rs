//! The object store: objects, the global resourceVersion counter, the change
//! history used for watch resumption and consistent pagination, and the write
//! rules (generation, finalizers, status subresource, no-op detection,
//! simplified server-side apply field ownership).
//!
//! Everything here is synchronous and pure (no I/O); the server wraps a
//! [`Store`] in a mutex and broadcasts the [`Change`]s each write returns.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::patch::{self, FieldPath, PatchType};
use crate::resources::ResourceDef;
use crate::selector::Selectors;

/// Which part of an object a request addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subresource {
    /// The object itself.
    Main,
    /// The `/status` subresource.
    Status,
}

/// The type of a recorded change (watch event type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    /// Object created.
    Added,
    /// Object changed.
    Modified,
    /// Object removed.
    Deleted,
}

impl ChangeType {
    /// The watch event `type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }
}

/// One committed write.
#[derive(Debug, Clone)]
pub struct Change {
    /// The resourceVersion this write produced.
    pub rv: u64,
    /// What happened.
    pub change_type: ChangeType,
    /// The resource written.
    pub resource: &'static ResourceDef,
    /// Namespace (`""` for cluster-scoped resources).
    pub namespace: String,
    /// Object name.
    pub name: String,
    /// The object after the write (for `Deleted`: its last state, with the new resourceVersion).
    pub object: Value,
    /// The object before the write (`None` for `Added`).
    pub prev: Option<Value>,
}

/// Per-request write options.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// The `fieldManager` query parameter.
    pub field_manager: Option<String>,
    /// `dryRun=All`: validate and answer, but store nothing.
    pub dry_run: bool,
}

/// The result of a write: the object to answer with and the changes to broadcast.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Response body.
    pub object: Value,
    /// Committed changes (empty for no-op writes and dry runs).
    pub changes: Vec<Arc<Change>>,
}

/// What a watch starts with.
#[derive(Debug)]
pub struct WatchStart {
    /// Events to send before live ones: `(type, object)`.
    pub initial: Vec<(&'static str, Value)>,
    /// The store resourceVersion at subscription time; live changes are all newer.
    pub start_rv: u64,
    /// If set, the requested resourceVersion is too old: send this as an ERROR event and end.
    pub expired: Option<ApiError>,
}

/// Server-side apply / update ownership entry key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ManagerKey {
    manager: String,
    apply: bool,
    subresource: Subresource,
}

type ObjKey = (String, String);
type ResKey = (&'static str, &'static str);
type ObjId = (ResKey, String, String);

/// Metadata fields the server owns; never tracked for field ownership.
const SERVER_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
    "generateName",
];

/// Metadata fields dropped when empty (Go `omitempty`).
const OMITEMPTY_META: &[&str] = &["labels", "annotations", "finalizers", "ownerReferences"];

/// Current time as RFC 3339 UTC with second precision.
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn new_uid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| {
            let i = rand::random_range(0..ALPHABET.len());
            char::from(ALPHABET[i])
        })
        .collect()
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn meta(v: &Value) -> Option<&Map<String, Value>> {
    v.get("metadata").and_then(Value::as_object)
}

fn meta_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    meta(v).and_then(|m| m.get(key)).and_then(Value::as_str)
}

fn meta_mut(v: &mut Value) -> Option<&mut Map<String, Value>> {
    let obj = v.as_object_mut()?;
    let m = obj
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !m.is_object() {
        *m = Value::Object(Map::new());
    }
    m.as_object_mut()
}

fn set_meta(v: &mut Value, key: &str, val: Value) {
    if let Some(m) = meta_mut(v) {
        m.insert(key.to_string(), val);
    }
}

fn remove_meta(v: &mut Value, key: &str) {
    if let Some(m) = meta_mut(v) {
        m.remove(key);
    }
}

fn finalizers(v: &Value) -> Vec<String> {
    meta(v)
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn generation(v: &Value) -> i64 {
    meta(v)
        .and_then(|m| m.get("generation"))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

fn is_deleting(v: &Value) -> bool {
    meta(v).is_some_and(|m| m.get("deletionTimestamp").is_some_and(|d| !d.is_null()))
}

/// Checks the JSON types of the metadata fields a typed server would decode.
fn check_meta_types(v: &Value) -> Result<(), ApiError> {
    let Some(m) = v.get("metadata") else {
        return Ok(());
    };
    let Some(m) = m.as_object() else {
        return Err(ApiError::bad_request(
            "metadata: expected an object".to_string(),
        ));
    };
    for key in [
        "name",
        "namespace",
        "generateName",
        "resourceVersion",
        "uid",
    ] {
        if let Some(x) = m.get(key)
            && !(x.is_string() || x.is_null())
        {
            return Err(ApiError::bad_request(format!(
                "metadata.{key}: expected a string"
            )));
        }
    }
    for key in ["labels", "annotations"] {
        if let Some(x) = m.get(key)
            && !x.is_null()
            && !x
                .as_object()
                .is_some_and(|o| o.values().all(Value::is_string))
        {
            return Err(ApiError::bad_request(format!(
                "metadata.{key}: expected a map of strings"
            )));
        }
    }
    if let Some(x) = m.get("finalizers")
        && !x.is_null()
        && !x.as_array().is_some_and(|a| a.iter().all(Value::is_string))
    {
        return Err(ApiError::bad_request(
            "metadata.finalizers: expected a list of strings",
        ));
    }
    Ok(())
}

/// Drops null and empty omitempty metadata fields, as Go serialization would.
fn normalize_meta(v: &mut Value) {
    if let Some(m) = meta_mut(v) {
        m.retain(|k, val| {
            !(val.is_null()
                || (OMITEMPTY_META.contains(&k.as_str())
                    && (val.as_array().is_some_and(Vec::is_empty)
                        || val.as_object().is_some_and(Map::is_empty))))
        });
    }
}

/// Whether two objects differ outside `metadata` (and `status` when the resource has a status subresource).
fn spec_changed(res: &ResourceDef, a: &Value, b: &Value) -> bool {
    let skip = |k: &str| k == "metadata" || (res.status_subresource && k == "status");
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return a != b;
    };
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| !skip(k))
        .any(|k| a.get(k) != b.get(k))
}

/// The part of an object whose fields are tracked for ownership for a subresource.
fn tracked_view(res: &ResourceDef, sub: Subresource, obj: &Value) -> Value {
    let Some(o) = obj.as_object() else {
        return Value::Null;
    };
    if res.status_subresource && sub == Subresource::Status {
        let mut m = Map::new();
        if let Some(s) = o.get("status") {
            m.insert("status".into(), s.clone());
        }
        return Value::Object(m);
    }
    let mut m = patch::without_keys(o.clone(), &["apiVersion", "kind"]);
    if res.status_subresource {
        m.remove("status");
    }
    if let Some(Value::Object(md)) = m.get_mut("metadata") {
        for k in SERVER_META {
            md.remove(*k);
        }
        if md.is_empty() {
            m.remove("metadata");
        }
    }
    Value::Object(m)
}

/// The in-memory object store.
#[derive(Debug)]
pub struct Store {
    rv: u64,
    objects: BTreeMap<ResKey, BTreeMap<ObjKey, Value>>,
    history: VecDeque<Arc<Change>>,
    /// Every change with `rv > compacted_rv` is in `history`.
    compacted_rv: u64,
    history_limit: usize,
    fields: BTreeMap<ObjId, BTreeMap<ManagerKey, BTreeSet<FieldPath>>>,
}

impl Store {
    /// An empty store keeping at most `history_limit` changes for watch resumption.
    pub fn new(history_limit: usize) -> Store {
        Store {
            rv: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            compacted_rv: 0,
            history_limit: history_limit.max(1),
            fields: BTreeMap::new(),
        }
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// The oldest resourceVersion a watch can resume from.
    pub fn compacted_rv(&self) -> u64 {
        self.compacted_rv
    }

    fn ns_of(res: &ResourceDef, ns: &str) -> String {
        if res.namespaced {
            ns.to_string()
        } else {
            String::new()
        }
    }

    /// Reads one object.
    pub fn get(&self, res: &'static ResourceDef, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&res.key())
            .and_then(|m| m.get(&(Self::ns_of(res, ns), name.to_string())))
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    /// All objects of a resource (all namespaces), sorted by namespace and name.
    pub fn all(&self, res: &'static ResourceDef) -> Vec<Value> {
        self.objects
            .get(&res.key())
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// How many objects of `res` satisfy `pred`, without copying any (a
    /// count over 100,000 objects must not hold the store long).
    pub fn count(&self, res: &'static ResourceDef, pred: impl Fn(&Value) -> bool) -> usize {
        self.objects
            .get(&res.key())
            .map_or(0, |m| m.values().filter(|v| pred(v)).count())
    }

    /// The objects of `res` as they were at resourceVersion `at`, reconstructed from history.
    fn snapshot(
        &self,
        res: &'static ResourceDef,
        at: u64,
    ) -> Result<BTreeMap<ObjKey, Value>, ApiError> {
        let mut snap = self.objects.get(&res.key()).cloned().unwrap_or_default();
        if at >= self.rv {
            return Ok(snap);
        }
        if at < self.compacted_rv {
            return Err(ApiError::expired(format!(
                "The provided continue parameter or resourceVersion is too old to display a consistent list result (resourceVersion {at}, oldest available {}). You can start a new list without the continue parameter.",
                self.compacted_rv + 1
            )));
        }
        for c in self.history.iter().rev() {
            if c.rv <= at {
                break;
            }
            if c.resource.key() != res.key() {
                continue;
            }
            let k = (c.namespace.clone(), c.name.clone());
            match &c.prev {
                Some(p) => {
                    snap.insert(k, p.clone());
                }
                None => {
                    snap.remove(&k);
                }
            }
        }
        Ok(snap)
    }

    /// Lists objects as a `<Kind>List`.
    ///
    /// * `ns`: `Some(ns)` for one namespace, `None` for all (or a cluster-scoped resource).
    /// * `limit`/`continue_token`: pagination over a consistent snapshot (the
    ///   continue token carries the snapshot resourceVersion and the last key;
    ///   410 Expired once that resourceVersion has left the history).
    /// * `exact_rv`: `resourceVersionMatch=Exact` list at an older resourceVersion.
    pub fn list(
        &self,
        res: &'static ResourceDef,
        ns: Option<&str>,
        sel: &Selectors,
        limit: Option<usize>,
        continue_token: Option<&str>,
        exact_rv: Option<u64>,
    ) -> Result<Value, ApiError> {
        let (at, after) = match continue_token.filter(|c| !c.is_empty()) {
            Some(tok) => {
                let bad = || ApiError::bad_request("continue key is not valid: malformed token");
                let bytes = hex_decode(tok).ok_or_else(bad)?;
                let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
                let at = v.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
                let ns = v.get("ns").and_then(Value::as_str).ok_or_else(bad)?;
                let name = v.get("name").and_then(Value::as_str).ok_or_else(bad)?;
                (at, Some((ns.to_string(), name.to_string())))
            }
            None => (exact_rv.unwrap_or(self.rv), None),
        };
        let snap = self.snapshot(res, at)?;
        let mut items = Vec::new();
        let mut last_key = None;
        let mut more = 0usize;
        let range = snap.iter().filter(|(k, _)| match &after {
            Some(a) => *k > a,
            None => true,
        });
        for (k, obj) in range {
            if ns.is_some_and(|n| res.namespaced && k.0 != n) || !sel.matches(obj) {
                continue;
            }
            if limit.is_some_and(|l| l > 0 && items.len() >= l) {
                more += 1;
                continue;
            }
            items.push(obj.clone());
            last_key = Some(k.clone());
        }
        let mut list_meta = Map::new();
        list_meta.insert("resourceVersion".into(), json!(at.to_string()));
        if more > 0
            && let Some((kns, kname)) = last_key
        {
            let tok = json!({"rv": at, "ns": kns, "name": kname}).to_string();
            list_meta.insert("continue".into(), json!(hex_encode(tok.as_bytes())));
            list_meta.insert("remainingItemCount".into(), json!(more));
        }
        Ok(json!({
            "kind": format!("{}List", res.kind),
            "apiVersion": res.api_version(),
            "metadata": list_meta,
            "items": items,
        }))
    }

    /// Starts a watch: decides the initial events and the point live events start from.
    ///
    /// * `rv` empty or `"0"`, or `send_initial_events`: synthetic `ADDED` for
    ///   every current matching object (then, with `send_initial_events`, the
    ///   caller sends the initial-events-end bookmark).
    /// * otherwise: replay retained changes newer than `rv`; if `rv` is older than
    ///   the history, `expired` is set (410 "too old resource version").
    pub fn watch_start(
        &self,
        res: &'static ResourceDef,
        ns: Option<&str>,
        sel: &Selectors,
        rv: Option<&str>,
        send_initial_events: bool,
    ) -> Result<WatchStart, ApiError> {
        let rv = rv.unwrap_or("");
        let mut initial = Vec::new();
        if send_initial_events || rv.is_empty() || rv == "0" {
            if let Some(objs) = self.objects.get(&res.key()) {
                for ((kns, _), obj) in objs {
                    if ns.is_some_and(|n| res.namespaced && kns != n) || !sel.matches(obj) {
                        continue;
                    }
                    initial.push(("ADDED", obj.clone()));
                }
            }
            return Ok(WatchStart {
                initial,
                start_rv: self.rv,
                expired: None,
            });
        }
        let from: u64 = rv.parse().map_err(|_| {
            ApiError::bad_request(format!("invalid resourceVersion {rv:?}: not an integer"))
        })?;
        if from < self.compacted_rv {
            return Ok(WatchStart {
                initial,
                start_rv: self.rv,
                expired: Some(ApiError::expired(format!(
                    "too old resource version: {from} ({})",
                    self.compacted_rv + 1
                ))),
            });
        }
        for c in self.history.iter().filter(|c| c.rv > from) {
            if let Some(ev) = event_for(c, res, ns, sel) {
                initial.push((ev.0, ev.1.clone()));
            }
        }
        Ok(WatchStart {
            initial,
            start_rv: self.rv,
            expired: None,
        })
    }

    fn check_type_meta(res: &ResourceDef, obj: &mut Value) -> Result<(), ApiError> {
        let Some(o) = obj.as_object_mut() else {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        };
        let want_av = res.api_version();
        match o.get("apiVersion").and_then(Value::as_str) {
            Some(av) if av != want_av => {
                return Err(ApiError::bad_request(format!(
                    "the API version in the data ({av}) does not match the expected API version ({want_av})"
                )));
            }
            _ => {}
        }
        match o.get("kind").and_then(Value::as_str) {
            Some(k) if k != res.kind => {
                return Err(ApiError::bad_request(format!(
                    "the kind in the data ({k}) does not match the expected kind ({})",
                    res.kind
                )));
            }
            _ => {}
        }
        o.insert("apiVersion".into(), json!(want_av));
        o.insert("kind".into(), json!(res.kind));
        check_meta_types(obj)
    }

    fn check_namespace(res: &ResourceDef, ns: &str, obj: &mut Value) -> Result<(), ApiError> {
        if res.namespaced {
            match meta_str(obj, "namespace") {
                Some(bns) if !bns.is_empty() && bns != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => set_meta(obj, "namespace", json!(ns)),
            }
        } else {
            remove_meta(obj, "namespace");
        }
        Ok(())
    }

    /// Creates an object (POST).
    pub fn create(
        &mut self,
        res: &'static ResourceDef,
        ns: &str,
        body: Value,
        opts: &WriteOptions,
    ) -> Result<Outcome, ApiError> {
        self.create_inner(res, ns, body, opts, None)
    }

    fn create_inner(
        &mut self,
        res: &'static ResourceDef,
        ns: &str,
        mut obj: Value,
        opts: &WriteOptions,
        apply_paths: Option<BTreeSet<FieldPath>>,
    ) -> Result<Outcome, ApiError> {
        Self::check_type_meta(res, &mut obj)?;
        let ns = Self::ns_of(res, ns);
        Self::check_namespace(res, &ns, &mut obj)?;
        if meta_str(&obj, "resourceVersion").is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::bad_request(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let name = match meta_str(&obj, "name").filter(|s| !s.is_empty()) {
            Some(n) => n.to_string(),
            None => match meta_str(&obj, "generateName").filter(|s| !s.is_empty()) {
                Some(prefix) => {
                    let existing = self.objects.get(&res.key());
                    let mut candidate = format!("{prefix}{}", random_suffix());
                    for _ in 0..16 {
                        if !existing
                            .is_some_and(|m| m.contains_key(&(ns.clone(), candidate.clone())))
                        {
                            break;
                        }
                        candidate = format!("{prefix}{}", random_suffix());
                    }
                    candidate
                }
                None => {
                    return Err(ApiError::invalid(
                        res,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            },
        };
        if self
            .objects
            .get(&res.key())
            .is_some_and(|m| m.contains_key(&(ns.clone(), name.clone())))
        {
            return Err(ApiError::already_exists(res, &name));
        }
        for k in [
            "uid",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "selfLink",
        ] {
            remove_meta(&mut obj, k);
        }
        set_meta(&mut obj, "name", json!(name));
        set_meta(&mut obj, "uid", json!(new_uid()));
        set_meta(&mut obj, "creationTimestamp", json!(now_rfc3339()));
        set_meta(&mut obj, "generation", json!(1));
        normalize_meta(&mut obj);
        if res.status_subresource
            && let Some(o) = obj.as_object_mut()
        {
            o.remove("status");
        }
        if res.group.is_empty()
            && res.kind == "Namespace"
            && let Some(o) = obj.as_object_mut()
        {
            o.insert("status".into(), json!({"phase": "Active"}));
        }
        if !opts.dry_run {
            let id = (res.key(), ns.clone(), name.clone());
            match apply_paths {
                Some(paths) => self.track_apply(id, res, Subresource::Main, opts, None, paths),
                None => self.track_update(id, res, Subresource::Main, opts, None, &obj),
            }
        }
        Ok(self.commit(res, &ns, &name, None, obj, opts.dry_run))
    }

    /// Replaces an object or its status (PUT).
    pub fn update(
        &mut self,
        res: &'static ResourceDef,
        ns: &str,
        name: &str,
        sub: Subresource,
        mut body: Value,
        opts: &WriteOptions,
    ) -> Result<Outcome, ApiError> {
        Self::check_type_meta(res, &mut body)?;
        let old = self.get(res, ns, name)?;
        // Custom resources refuse unconditional updates; built-in types allow them.
        if res.custom && meta_str(&body, "resourceVersion").is_none_or(str::is_empty) {
            return Err(ApiError::invalid(
                res,
                name,
                "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
            ));
        }
        if meta_str(&body, "name").is_none_or(str::is_empty) {
            set_meta(&mut body, "name", json!(name));
        }
        self.write_existing(res, ns, name, sub, old, body, opts, None)
    }

    /// Patches an object or its status (PATCH) with any [`PatchType`].
    ///
    /// Apply patches create the object when it does not exist (main resource only).
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        res: &'static ResourceDef,
        ns: &str,
        name: &str,
        sub: Subresource,
        ptype: PatchType,
        body: &[u8],
        opts: &WriteOptions,
    ) -> Result<Outcome, ApiError> {
        if ptype == PatchType::Apply {
            return self.apply(res, ns, name, sub, body, opts);
        }
        let old = self.get(res, ns, name)?;
        let p = patch::parse_json(body)?;
        let candidate = match ptype {
            PatchType::Json => patch::json_patch(&old, &p)?,
            _ => {
                if !p.is_object() {
                    return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                }
                patch::merge_patch(&old, &p)
            }
        };
        let mut candidate = candidate;
        Self::check_type_meta(res, &mut candidate)?;
        self.write_existing(res, ns, name, sub, old, candidate, opts, None)
    }

    fn apply(
        &mut self,
        res: &'static ResourceDef,
        ns: &str,
        name: &str,
        sub: Subresource,
        body: &[u8],
        opts: &WriteOptions,
    ) -> Result<Outcome, ApiError> {
        if opts.field_manager.as_deref().is_none_or(str::is_empty) {
            return Err(ApiError::bad_request(
                "PATCH, application/apply-patch+yaml requires fieldManager parameter",
            ));
        }
        let mut applied = patch::parse_json_or_yaml(body)?;
        let Some(o) = applied.as_object() else {
            return Err(ApiError::bad_request(
                "the apply configuration must be an object",
            ));
        };
        if o.get("apiVersion")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(ApiError::bad_request(
                "invalid object type: apiVersion must be set in the apply configuration",
            ));
        }
        if o.get("kind")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(ApiError::bad_request(
                "invalid object type: kind must be set in the apply configuration",
            ));
        }
        Self::check_type_meta(res, &mut applied)?;
        match meta_str(&applied, "name") {
            Some(n) if !n.is_empty() && n != name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
            _ => set_meta(&mut applied, "name", json!(name)),
        }
        let ns_key = Self::ns_of(res, ns);
        Self::check_namespace(res, &ns_key, &mut applied)?;
        let new_paths = patch::leaf_paths(&tracked_view(res, sub, &applied));
        let old = match self.get(res, ns, name) {
            Ok(o) => o,
            Err(e) if e.code == 404 && sub == Subresource::Main => {
                return self.create_inner(res, ns, applied, opts, Some(new_paths));
            }
            Err(e) => return Err(e),
        };
        let mut candidate = patch::merge_patch(&old, &applied);
        let id = (res.key(), ns_key.clone(), name.to_string());
        let key = self.manager_key(opts, true, sub);
        let prev_paths = self
            .fields
            .get(&id)
            .and_then(|m| m.get(&key))
            .cloned()
            .unwrap_or_default();
        for p in prev_paths.difference(&new_paths) {
            if !self.owned_by_other(&id, &key, p) {
                patch::remove_path(&mut candidate, p);
            }
        }
        self.write_existing(
            res,
            ns,
            name,
            sub,
            old,
            candidate,
            opts,
            Some((new_paths, applied)),
        )
    }

    fn manager_key(&self, opts: &WriteOptions, apply: bool, sub: Subresource) -> ManagerKey {
        ManagerKey {
            manager: opts
                .field_manager
                .clone()
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| "unknown".to_string()),
            apply,
            subresource: sub,
        }
    }

    fn owned_by_other(&self, id: &ObjId, key: &ManagerKey, p: &[String]) -> bool {
        self.fields.get(id).is_some_and(|m| {
            m.iter()
                .filter(|(k, _)| *k != key)
                .any(|(_, set)| set.iter().any(|q| patch::overlaps(p, q)))
        })
    }

    fn take_ownership(&mut self, id: &ObjId, key: &ManagerKey, p: &[String]) {
        if let Some(m) = self.fields.get_mut(id) {
            for (k, set) in m.iter_mut() {
                if k != key {
                    set.retain(|q| !patch::overlaps(p, q));
                }
            }
        }
    }

    fn prune_fields(&mut self, id: &ObjId) {
        if let Some(m) = self.fields.get_mut(id) {
            m.retain(|_, s| !s.is_empty());
            if m.is_empty() {
                self.fields.remove(id);
            }
        }
    }

    /// Records ownership for an apply: forced takeover of fields whose value changes.
    fn track_apply(
        &mut self,
        id: ObjId,
        res: &ResourceDef,
        sub: Subresource,
        opts: &WriteOptions,
        old: Option<(&Value, &Value)>,
        new_paths: BTreeSet<FieldPath>,
    ) {
        let key = self.manager_key(opts, true, sub);
        if let Some((old, applied)) = old {
            let old_view = tracked_view(res, sub, old);
            let applied_view = tracked_view(res, sub, applied);
            for p in &new_paths {
                if patch::get_path(&old_view, p) != patch::get_path(&applied_view, p) {
                    self.take_ownership(&id, &key, p);
                }
            }
        } else {
            for p in &new_paths {
                self.take_ownership(&id, &key, p);
            }
        }
        self.fields
            .entry(id.clone())
            .or_default()
            .insert(key, new_paths);
        self.prune_fields(&id);
    }

    /// Records ownership for a non-apply write: the writer takes every changed field.
    fn track_update(
        &mut self,
        id: ObjId,
        res: &ResourceDef,
        sub: Subresource,
        opts: &WriteOptions,
        old: Option<&Value>,
        new: &Value,
    ) {
        let key = self.manager_key(opts, false, sub);
        let old_view = old
            .map(|o| tracked_view(res, sub, o))
            .unwrap_or(Value::Null);
        let new_view = tracked_view(res, sub, new);
        let mut all = patch::leaf_paths(&old_view);
        all.extend(patch::leaf_paths(&new_view));
        let changed: Vec<FieldPath> = all
            .into_iter()
            .filter(|p| patch::get_path(&old_view, p) != patch::get_path(&new_view, p))
            .collect();
        if changed.is_empty() {
            return;
        }
        for p in &changed {
            self.take_ownership(&id, &key, p);
        }
        let set = self
            .fields
            .entry(id.clone())
            .or_default()
            .entry(key)
            .or_default();
        for p in changed {
            set.retain(|q| !patch::overlaps(&p, q));
            if patch::get_path(&new_view, &p).is_some_and(|v| !v.is_null()) {
                set.insert(p);
            }
        }
        self.prune_fields(&id);
    }

    /// The shared update pipeline: preconditions, immutable metadata,
    /// status-subresource separation, finalizer rule, generation, no-op detection, commit.
    #[allow(clippy::too_many_arguments)]
    fn write_existing(
        &mut self,
        res: &'static ResourceDef,
        ns: &str,
        name: &str,
        sub: Subresource,
        old: Value,
        mut candidate: Value,
        opts: &WriteOptions,
        apply: Option<(BTreeSet<FieldPath>, Value)>,
    ) -> Result<Outcome, ApiError> {
        check_meta_types(&candidate)?;
        let old_rv = meta_str(&old, "resourceVersion").unwrap_or("").to_string();
        if let Some(rv) = meta_str(&candidate, "resourceVersion").filter(|s| !s.is_empty())
            && rv != old_rv
        {
            return Err(ApiError::conflict_modified(res, name));
        }
        if let (Some(u), Some(old_u)) = (meta_str(&candidate, "uid"), meta_str(&old, "uid"))
            && !u.is_empty()
            && u != old_u
        {
            return Err(ApiError::conflict(
                res,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {u}, UID in object meta: {old_u}"
                ),
            ));
        }
        if let Some(n) = meta_str(&candidate, "name")
            && n != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        let ns_key = Self::ns_of(res, ns);
        Self::check_namespace(res, &ns_key, &mut candidate)?;

        let mut new = if res.status_subresource && sub == Subresource::Status {
            let mut n = old.clone();
            if let Some(o) = n.as_object_mut() {
                match candidate.get("status") {
                    Some(s) if !s.is_null() => {
                        o.insert("status".into(), s.clone());
                    }
                    _ => {
                        o.remove("status");
                    }
                }
            }
            n
        } else {
            let mut n = candidate;
            for k in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "resourceVersion",
                "name",
                "generateName",
            ] {
                match meta(&old).and_then(|m| m.get(k)) {
                    Some(v) => set_meta(&mut n, k, v.clone()),
                    None => remove_meta(&mut n, k),
                }
            }
            remove_meta(&mut n, "managedFields");
            remove_meta(&mut n, "selfLink");
            if res.status_subresource
                && let Some(o) = n.as_object_mut()
            {
                match old.get("status") {
                    Some(s) => {
                        o.insert("status".into(), s.clone());
                    }
                    None => {
                        o.remove("status");
                    }
                }
            }
            n
        };
        normalize_meta(&mut new);

        if is_deleting(&old) {
            let old_f = finalizers(&old);
            let added: Vec<String> = finalizers(&new)
                .into_iter()
                .filter(|f| !old_f.contains(f))
                .collect();
            if !added.is_empty() {
                return Err(ApiError::invalid(
                    res,
                    name,
                    &format!(
                        "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers {added:?}"
                    ),
                ));
            }
        }
        if spec_changed(res, &old, &new) {
            set_meta(&mut new, "generation", json!(generation(&old) + 1));
        }

        if !opts.dry_run {
            let id = (res.key(), ns_key.clone(), name.to_string());
            match apply {
                Some((paths, applied)) => {
                    self.track_apply(id, res, sub, opts, Some((&old, &applied)), paths)
                }
                None => self.track_update(id, res, sub, opts, Some(&old), &new),
            }
        }
        if new == old {
            return Ok(Outcome {
                object: old,
                changes: Vec::new(),
            });
        }
        Ok(self.commit(res, &ns_key, name, Some(old), new, opts.dry_run))
    }

    /// Deletes an object (DELETE). `delete_options` is the optional `DeleteOptions` body.
    pub fn delete(
        &mut self,
        res: &'static ResourceDef,
        ns: &str,
        name: &str,
        delete_options: &Value,
        opts: &WriteOptions,
    ) -> Result<Outcome, ApiError> {
        let old = self.get(res, ns, name)?;
        if let Some(pre) = delete_options.get("preconditions") {
            if let Some(rv) = pre.get("resourceVersion").and_then(Value::as_str)
                && Some(rv) != meta_str(&old, "resourceVersion")
            {
                return Err(ApiError::conflict(
                    res,
                    name,
                    &format!(
                        "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                        meta_str(&old, "resourceVersion").unwrap_or("")
                    ),
                ));
            }
            if let Some(uid) = pre.get("uid").and_then(Value::as_str)
                && Some(uid) != meta_str(&old, "uid")
            {
                return Err(ApiError::conflict(
                    res,
                    name,
                    &format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        meta_str(&old, "uid").unwrap_or("")
                    ),
                ));
            }
        }
        let dry_run = opts.dry_run
            || delete_options
                .get("dryRun")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|x| x == "All"));
        let ns_key = Self::ns_of(res, ns);
        if !finalizers(&old).is_empty() {
            if is_deleting(&old) {
                return Ok(Outcome {
                    object: old,
                    changes: Vec::new(),
                });
            }
            let mut new = old.clone();
            set_meta(&mut new, "deletionTimestamp", json!(now_rfc3339()));
            set_meta(&mut new, "deletionGracePeriodSeconds", json!(0));
            set_meta(&mut new, "generation", json!(generation(&old) + 1));
            return Ok(self.commit(res, &ns_key, name, Some(old), new, dry_run));
        }
        if dry_run {
            return Ok(Outcome {
                object: old,
                changes: Vec::new(),
            });
        }
        // The real server answers (and reports DELETED) with the last stored
        // state, carrying the resourceVersion of the deletion.
        let last = old.clone();
        Ok(self.commit_with(res, &ns_key, name, Some(old), last, false, true))
    }

    /// Deletes every matching object (DELETE on a collection); answers a `<Kind>List` of them.
    pub fn delete_collection(
        &mut self,
        res: &'static ResourceDef,
        ns: Option<&str>,
        sel: &Selectors,
        delete_options: &Value,
        opts: &WriteOptions,
    ) -> Result<Outcome, ApiError> {
        let targets: Vec<(String, String)> = self
            .objects
            .get(&res.key())
            .map(|m| {
                m.iter()
                    .filter(|((kns, _), o)| {
                        ns.is_none_or(|n| !res.namespaced || kns == n) && sel.matches(o)
                    })
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        let mut items = Vec::new();
        let mut changes = Vec::new();
        for (kns, name) in targets {
            let out = self.delete(res, &kns, &name, delete_options, opts)?;
            items.push(out.object);
            changes.extend(out.changes);
        }
        Ok(Outcome {
            object: json!({
                "kind": format!("{}List", res.kind),
                "apiVersion": res.api_version(),
                "metadata": {"resourceVersion": self.rv.to_string()},
                "items": items,
            }),
            changes,
        })
    }

    /// Commits a write: bumps the resourceVersion, stores (or removes, when the
    /// object is being deleted and has no finalizers left) and records the change.
    fn commit(
        &mut self,
        res: &'static ResourceDef,
        ns: &str,
        name: &str,
        prev: Option<Value>,
        new: Value,
        dry_run: bool,
    ) -> Outcome {
        self.commit_with(res, ns, name, prev, new, dry_run, false)
    }

    /// [`Store::commit`], optionally removing the object unconditionally.
    #[allow(clippy::too_many_arguments)]
    fn commit_with(
        &mut self,
        res: &'static ResourceDef,
        ns: &str,
        name: &str,
        prev: Option<Value>,
        mut new: Value,
        dry_run: bool,
        remove: bool,
    ) -> Outcome {
        if dry_run {
            return Outcome {
                object: new,
                changes: Vec::new(),
            };
        }
        self.rv += 1;
        set_meta(&mut new, "resourceVersion", json!(self.rv.to_string()));
        let gone = remove || (is_deleting(&new) && finalizers(&new).is_empty());
        let key = (ns.to_string(), name.to_string());
        let change_type = if gone {
            if let Some(m) = self.objects.get_mut(&res.key()) {
                m.remove(&key);
            }
            self.fields
                .remove(&(res.key(), ns.to_string(), name.to_string()));
            ChangeType::Deleted
        } else {
            self.objects
                .entry(res.key())
                .or_default()
                .insert(key, new.clone());
            if prev.is_some() {
                ChangeType::Modified
            } else {
                ChangeType::Added
            }
        };
        let change = Arc::new(Change {
            rv: self.rv,
            change_type,
            resource: res,
            namespace: ns.to_string(),
            name: name.to_string(),
            object: new.clone(),
            prev,
        });
        self.history.push_back(change.clone());
        while self.history.len() > self.history_limit {
            if let Some(c) = self.history.pop_front() {
                self.compacted_rv = c.rv;
            }
        }
        Outcome {
            object: new,
            changes: vec![change],
        }
    }

    /// Forgets every retained change (as an etcd compaction would): watches and
    /// continue tokens older than the current resourceVersion then get 410.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted_rv = self.rv;
    }
}

/// How a change looks to a watcher of `res` in `ns` with `sel`: `(type, object)`,
/// or `None` if the watcher should not see it. Objects that start or stop
/// matching the selector are reported as `ADDED` / `DELETED`, like the real server.
pub fn event_for<'a>(
    c: &'a Change,
    res: &ResourceDef,
    ns: Option<&str>,
    sel: &Selectors,
) -> Option<(&'static str, &'a Value)> {
    if c.resource.key() != res.key() {
        return None;
    }
    if let Some(n) = ns
        && res.namespaced
        && c.namespace != n
    {
        return None;
    }
    let now = sel.matches(&c.object);
    match c.change_type {
        ChangeType::Added => now.then_some(("ADDED", &c.object)),
        ChangeType::Deleted => {
            let before = c.prev.as_ref().is_none_or(|p| sel.matches(p));
            (before || now).then_some(("DELETED", &c.object))
        }
        ChangeType::Modified => {
            let before = c.prev.as_ref().is_some_and(|p| sel.matches(p));
            match (before, now) {
                (true, true) => Some(("MODIFIED", &c.object)),
                (false, true) => Some(("ADDED", &c.object)),
                (true, false) => Some(("DELETED", &c.object)),
                (false, false) => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::resources::find;

    fn vml() -> &'static ResourceDef {
        find("keyway.dev", "v1alpha1", "vmleases").unwrap()
    }

    fn cm() -> &'static ResourceDef {
        find("", "v1", "configmaps").unwrap()
    }

    fn opts() -> WriteOptions {
        WriteOptions::default()
    }

    fn mgr(m: &str) -> WriteOptions {
        WriteOptions {
            field_manager: Some(m.to_string()),
            dry_run: false,
        }
    }

    fn rv(v: &Value) -> u64 {
        meta_str(v, "resourceVersion").unwrap().parse().unwrap()
    }

    fn lease(name: &str) -> Value {
        json!({"apiVersion": "keyway.dev/v1alpha1", "kind": "VMLease",
               "metadata": {"name": name}, "spec": {"user": "u"}, "status": {"phase": "x"}})
    }

    #[test]
    fn create_sets_server_fields() {
        let mut s = Store::new(100);
        let out = s.create(vml(), "ns", lease("a"), &opts()).unwrap();
        let o = &out.object;
        assert_eq!(o["metadata"]["namespace"], "ns");
        assert_eq!(o["metadata"]["generation"], 1);
        assert_eq!(o["metadata"]["resourceVersion"], "1");
        assert_eq!(o["metadata"]["uid"].as_str().unwrap().len(), 36);
        assert!(
            o["metadata"]["creationTimestamp"]
                .as_str()
                .unwrap()
                .ends_with('Z')
        );
        assert!(o.get("status").is_none(), "status dropped on create");
        assert_eq!(out.changes[0].change_type, ChangeType::Added);
        let e = s.create(vml(), "ns", lease("a"), &opts()).unwrap_err();
        assert_eq!((e.code, e.reason), (409, "AlreadyExists"));
        let mut wrong_ns = lease("b");
        wrong_ns["metadata"]["namespace"] = json!("other");
        assert_eq!(
            s.create(vml(), "ns", wrong_ns, &opts()).unwrap_err().code,
            400
        );
        let mut with_rv = lease("b");
        with_rv["metadata"]["resourceVersion"] = json!("1");
        assert_eq!(
            s.create(vml(), "ns", with_rv, &opts()).unwrap_err().code,
            400
        );
        let mut wrong_kind = lease("b");
        wrong_kind["kind"] = json!("SshRoute");
        assert_eq!(
            s.create(vml(), "ns", wrong_kind, &opts()).unwrap_err().code,
            400
        );
        let gen_name = json!({"metadata": {"generateName": "g-"}, "spec": {}});
        let out = s.create(vml(), "ns", gen_name, &opts()).unwrap();
        let name = out.object["metadata"]["name"].as_str().unwrap();
        assert!(name.starts_with("g-") && name.len() == 7, "{name}");
        assert_eq!(out.object["kind"], "VMLease");
        let nameless = json!({"metadata": {}});
        assert_eq!(
            s.create(vml(), "ns", nameless, &opts()).unwrap_err().code,
            422
        );
        assert_eq!(
            s.create(vml(), "ns", json!([1]), &opts()).unwrap_err().code,
            400
        );
        let bad_labels = json!({"metadata": {"name": "l", "labels": {"a": 1}}});
        assert_eq!(
            s.create(vml(), "ns", bad_labels, &opts()).unwrap_err().code,
            400
        );
    }

    #[test]
    fn update_rules() {
        let mut s = Store::new(100);
        let a = s.create(vml(), "ns", lease("a"), &opts()).unwrap().object;
        // Stale RV -> 409.
        let mut stale = a.clone();
        stale["metadata"]["resourceVersion"] = json!("999");
        let e = s
            .update(vml(), "ns", "a", Subresource::Main, stale, &opts())
            .unwrap_err();
        assert_eq!((e.code, e.reason), (409, "Conflict"));
        assert!(e.message.contains("the object has been modified"));
        // Custom resources need a RV on PUT.
        let mut no_rv = a.clone();
        remove_meta(&mut no_rv, "resourceVersion");
        let e = s
            .update(vml(), "ns", "a", Subresource::Main, no_rv, &opts())
            .unwrap_err();
        assert_eq!(e.code, 422);
        // Main update cannot set status; spec change bumps generation.
        let mut upd = a.clone();
        upd["spec"]["user"] = json!("v");
        upd["status"] = json!({"phase": "Hacked"});
        let b = s
            .update(vml(), "ns", "a", Subresource::Main, upd, &opts())
            .unwrap()
            .object;
        assert_eq!(b["spec"]["user"], "v");
        assert!(b.get("status").is_none());
        assert_eq!(b["metadata"]["generation"], 2);
        assert!(rv(&b) > rv(&a));
        // Status update takes only status, no generation bump.
        let mut st = b.clone();
        st["status"] = json!({"phase": "Ready"});
        st["spec"]["user"] = json!("ignored");
        st["metadata"]["labels"] = json!({"ignored": "yes"});
        let c = s
            .update(vml(), "ns", "a", Subresource::Status, st, &opts())
            .unwrap()
            .object;
        assert_eq!(c["status"]["phase"], "Ready");
        assert_eq!(c["spec"]["user"], "v");
        assert!(c["metadata"].get("labels").is_none());
        assert_eq!(c["metadata"]["generation"], 2);
        // Identical write: no RV bump, no change.
        let out = s
            .update(vml(), "ns", "a", Subresource::Main, c.clone(), &opts())
            .unwrap();
        assert!(out.changes.is_empty());
        assert_eq!(rv(&out.object), rv(&c));
        // Name mismatch.
        let mut other = c.clone();
        other["metadata"]["name"] = json!("zzz");
        let e = s
            .update(vml(), "ns", "a", Subresource::Main, other, &opts())
            .unwrap_err();
        assert_eq!(e.code, 400);
        // Missing object.
        let e = s
            .update(vml(), "ns", "nope", Subresource::Main, c, &opts())
            .unwrap_err();
        assert_eq!(e.code, 404);
        // Built-in types allow unconditional updates; status is an ordinary field there.
        s.create(
            cm(),
            "ns",
            json!({"metadata": {"name": "c"}, "data": {"a": "1"}}),
            &opts(),
        )
        .unwrap();
        let c2 = s
            .update(
                cm(),
                "ns",
                "c",
                Subresource::Main,
                json!({"metadata": {"name": "c"}, "data": {"a": "2"}}),
                &opts(),
            )
            .unwrap()
            .object;
        assert_eq!(c2["data"]["a"], "2");
        assert_eq!(c2["metadata"]["generation"], 2);
    }

    #[test]
    fn patches_and_noops() {
        let mut s = Store::new(100);
        s.create(vml(), "ns", lease("a"), &opts()).unwrap();
        let p = |s: &mut Store, sub, t, body: Value| {
            s.patch(
                vml(),
                "ns",
                "a",
                sub,
                t,
                body.to_string().as_bytes(),
                &opts(),
            )
        };
        let out = p(
            &mut s,
            Subresource::Main,
            PatchType::Merge,
            json!({"metadata": {"labels": {"x": "1"}}}),
        )
        .unwrap();
        assert_eq!(out.object["metadata"]["labels"]["x"], "1");
        assert_eq!(
            out.object["metadata"]["generation"], 1,
            "metadata change keeps generation"
        );
        let rv1 = rv(&out.object);
        let out = p(
            &mut s,
            Subresource::Main,
            PatchType::Merge,
            json!({"metadata": {"labels": {"x": "1"}}}),
        )
        .unwrap();
        assert!(out.changes.is_empty(), "no-op patch");
        assert_eq!(rv(&out.object), rv1);
        let out = p(
            &mut s,
            Subresource::Main,
            PatchType::Merge,
            json!({"status": {"phase": "no"}}),
        )
        .unwrap();
        assert!(out.changes.is_empty(), "status via main is discarded");
        let out = p(
            &mut s,
            Subresource::Status,
            PatchType::Merge,
            json!({"status": {"phase": "yes"}, "spec": {"user": "no"}}),
        )
        .unwrap();
        assert_eq!(out.object["status"]["phase"], "yes");
        assert_eq!(out.object["spec"]["user"], "u");
        let e = p(
            &mut s,
            Subresource::Main,
            PatchType::Merge,
            json!({"metadata": {"resourceVersion": "1"}, "spec": {"user": "z"}}),
        )
        .unwrap_err();
        assert_eq!(e.code, 409);
        let cur = rv(&s.get(vml(), "ns", "a").unwrap());
        let out = p(
            &mut s,
            Subresource::Main,
            PatchType::Merge,
            json!({"metadata": {"resourceVersion": cur.to_string()}, "spec": {"user": "z"}}),
        )
        .unwrap();
        assert_eq!(out.object["spec"]["user"], "z");
        assert_eq!(out.object["metadata"]["generation"], 2);
        let out = p(
            &mut s,
            Subresource::Main,
            PatchType::Json,
            json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["f"]}]),
        )
        .unwrap();
        assert_eq!(out.object["metadata"]["finalizers"], json!(["f"]));
        let e = p(
            &mut s,
            Subresource::Main,
            PatchType::Json,
            json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null}]),
        )
        .unwrap_err();
        assert_eq!((e.code, e.reason), (422, "Invalid"));
        let e = s
            .patch(
                vml(),
                "ns",
                "a",
                Subresource::Main,
                PatchType::Merge,
                b"{nope",
                &opts(),
            )
            .unwrap_err();
        assert_eq!(e.code, 400);
        let e = s
            .patch(
                vml(),
                "ns",
                "zz",
                Subresource::Main,
                PatchType::Merge,
                b"{}",
                &opts(),
            )
            .unwrap_err();
        assert_eq!(e.code, 404);
    }

    #[test]
    fn finalizers_and_deletion() {
        let mut s = Store::new(100);
        let mut l = lease("a");
        l["metadata"]["finalizers"] = json!(["keep"]);
        s.create(vml(), "ns", l, &opts()).unwrap();
        let out = s.delete(vml(), "ns", "a", &Value::Null, &opts()).unwrap();
        assert!(out.object["metadata"]["deletionTimestamp"].is_string());
        assert_eq!(out.object["metadata"]["deletionGracePeriodSeconds"], 0);
        assert_eq!(out.object["metadata"]["generation"], 2);
        assert_eq!(out.changes[0].change_type, ChangeType::Modified);
        // Deleting again changes nothing.
        let again = s.delete(vml(), "ns", "a", &Value::Null, &opts()).unwrap();
        assert!(again.changes.is_empty());
        // Adding a finalizer while deleting -> 422.
        let e = s
            .patch(
                vml(),
                "ns",
                "a",
                Subresource::Main,
                PatchType::Merge,
                br#"{"metadata":{"finalizers":["keep","more"]}}"#,
                &opts(),
            )
            .unwrap_err();
        assert_eq!(e.code, 422);
        assert!(e.message.contains("no new finalizers"));
        // Removing the last finalizer deletes the object.
        let out = s
            .patch(
                vml(),
                "ns",
                "a",
                Subresource::Main,
                PatchType::Merge,
                br#"{"metadata":{"finalizers":null}}"#,
                &opts(),
            )
            .unwrap();
        assert_eq!(out.changes[0].change_type, ChangeType::Deleted);
        assert_eq!(s.get(vml(), "ns", "a").unwrap_err().code, 404);
        // Plain delete and preconditions.
        let b = s.create(vml(), "ns", lease("b"), &opts()).unwrap().object;
        let pre = json!({"preconditions": {"uid": "other"}});
        assert_eq!(
            s.delete(vml(), "ns", "b", &pre, &opts()).unwrap_err().code,
            409
        );
        let pre = json!({"preconditions": {"resourceVersion": "1"}});
        assert_eq!(
            s.delete(vml(), "ns", "b", &pre, &opts()).unwrap_err().code,
            409
        );
        let dry = json!({"dryRun": ["All"]});
        assert!(
            s.delete(vml(), "ns", "b", &dry, &opts())
                .unwrap()
                .changes
                .is_empty()
        );
        let out = s.delete(vml(), "ns", "b", &Value::Null, &opts()).unwrap();
        assert_eq!(out.changes[0].change_type, ChangeType::Deleted);
        assert!(rv(&out.object) > rv(&b));
        assert_eq!(
            s.delete(vml(), "ns", "b", &Value::Null, &opts())
                .unwrap_err()
                .code,
            404
        );
    }

    #[test]
    fn pagination_is_consistent_and_expires() {
        let mut s = Store::new(100);
        for n in ["a", "b", "c"] {
            s.create(vml(), "ns", lease(n), &opts()).unwrap();
        }
        s.create(vml(), "other", lease("d"), &opts()).unwrap();
        let sel = Selectors::default();
        let page1 = s
            .list(vml(), Some("ns"), &sel, Some(2), None, None)
            .unwrap();
        assert_eq!(page1["items"].as_array().unwrap().len(), 2);
        assert_eq!(page1["kind"], "VMLeaseList");
        assert_eq!(page1["metadata"]["resourceVersion"], "4");
        let tok = page1["metadata"]["continue"].as_str().unwrap().to_string();
        // Changes after page 1 are not visible in page 2 (snapshot at RV 4).
        s.delete(vml(), "ns", "c", &Value::Null, &opts()).unwrap();
        s.create(vml(), "ns", lease("e"), &opts()).unwrap();
        let page2 = s
            .list(vml(), Some("ns"), &sel, Some(2), Some(&tok), None)
            .unwrap();
        let names: Vec<&str> = page2["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["c"]);
        assert!(page2["metadata"].get("continue").is_none());
        assert_eq!(page2["metadata"]["resourceVersion"], "4");
        let all = s.list(vml(), None, &sel, None, None, None).unwrap();
        assert_eq!(all["items"].as_array().unwrap().len(), 4);
        let exact = s.list(vml(), None, &sel, None, None, Some(1)).unwrap();
        assert_eq!(exact["items"].as_array().unwrap().len(), 1);
        assert_eq!(
            s.list(vml(), None, &sel, None, Some("zz"), None)
                .unwrap_err()
                .code,
            400
        );
        s.compact();
        let e = s
            .list(vml(), Some("ns"), &sel, Some(2), Some(&tok), None)
            .unwrap_err();
        assert_eq!((e.code, e.reason), (410, "Expired"));
    }

    #[test]
    fn watch_start_replays_or_expires() {
        let mut s = Store::new(3);
        let sel = Selectors::default();
        for n in ["a", "b"] {
            s.create(vml(), "ns", lease(n), &opts()).unwrap();
        }
        let w = s.watch_start(vml(), None, &sel, Some("0"), false).unwrap();
        assert_eq!(w.initial.len(), 2);
        let w = s.watch_start(vml(), None, &sel, Some("1"), false).unwrap();
        assert_eq!(w.initial.len(), 1);
        assert_eq!(w.initial[0].1["metadata"]["name"], "b");
        for i in 0..5 {
            s.create(
                cm(),
                "ns",
                json!({"metadata": {"name": format!("c{i}")}}),
                &opts(),
            )
            .unwrap();
        }
        let w = s.watch_start(vml(), None, &sel, Some("1"), false).unwrap();
        let e = w.expired.unwrap();
        assert_eq!((e.code, e.reason), (410, "Expired"));
        assert!(
            e.message.starts_with("too old resource version: 1 ("),
            "{}",
            e.message
        );
        let cur = s.resource_version().to_string();
        let w = s.watch_start(vml(), None, &sel, Some(&cur), false).unwrap();
        assert!(w.expired.is_none() && w.initial.is_empty());
        assert_eq!(
            s.watch_start(vml(), None, &sel, Some("x"), false)
                .unwrap_err()
                .code,
            400
        );
    }

    #[test]
    fn selector_transitions_in_watch_events() {
        let mut s = Store::new(100);
        let res = cm();
        let sel = Selectors::parse(res, Some("app=x"), None).unwrap();
        let c = s
            .create(res, "ns", json!({"metadata": {"name": "c"}}), &opts())
            .unwrap();
        assert!(event_for(&c.changes[0], res, None, &sel).is_none());
        let m = s
            .patch(
                res,
                "ns",
                "c",
                Subresource::Main,
                PatchType::Merge,
                br#"{"metadata":{"labels":{"app":"x"}}}"#,
                &opts(),
            )
            .unwrap();
        assert_eq!(
            event_for(&m.changes[0], res, None, &sel).unwrap().0,
            "ADDED"
        );
        let m = s
            .patch(
                res,
                "ns",
                "c",
                Subresource::Main,
                PatchType::Strategic,
                br#"{"data":{"k":"v"}}"#,
                &opts(),
            )
            .unwrap();
        assert_eq!(
            event_for(&m.changes[0], res, None, &sel).unwrap().0,
            "MODIFIED"
        );
        assert!(event_for(&m.changes[0], res, Some("other"), &sel).is_none());
        assert!(event_for(&m.changes[0], vml(), None, &sel).is_none());
        let m = s
            .patch(
                res,
                "ns",
                "c",
                Subresource::Main,
                PatchType::Merge,
                br#"{"metadata":{"labels":null}}"#,
                &opts(),
            )
            .unwrap();
        assert_eq!(
            event_for(&m.changes[0], res, None, &sel).unwrap().0,
            "DELETED"
        );
    }

    #[test]
    fn server_side_apply_ownership() {
        let mut s = Store::new(100);
        let apply = |s: &mut Store, m: &str, sub, body: Value| {
            s.patch(
                vml(),
                "ns",
                "a",
                sub,
                PatchType::Apply,
                body.to_string().as_bytes(),
                &mgr(m),
            )
        };
        let base = |spec: Value| json!({"apiVersion": "keyway.dev/v1alpha1", "kind": "VMLease", "metadata": {"name": "a"}, "spec": spec});
        // fieldManager required; apiVersion/kind required.
        let e = s
            .patch(
                vml(),
                "ns",
                "a",
                Subresource::Main,
                PatchType::Apply,
                b"{}",
                &opts(),
            )
            .unwrap_err();
        assert_eq!(e.code, 400);
        assert_eq!(
            apply(&mut s, "m1", Subresource::Main, json!({"spec": {}}))
                .unwrap_err()
                .code,
            400
        );
        // /status apply on a missing object is 404; main apply creates.
        let st = json!({"apiVersion": "keyway.dev/v1alpha1", "kind": "VMLease", "status": {"phase": "p"}});
        assert_eq!(
            apply(&mut s, "m1", Subresource::Status, st.clone())
                .unwrap_err()
                .code,
            404
        );
        let out = apply(
            &mut s,
            "m1",
            Subresource::Main,
            base(json!({"a": 1, "b": 2, "l": [1, 2]})),
        )
        .unwrap();
        assert_eq!(out.changes[0].change_type, ChangeType::Added);
        // Another manager co-owns b (same value) and owns c.
        apply(
            &mut s,
            "m2",
            Subresource::Main,
            base(json!({"b": 2, "c": 3})),
        )
        .unwrap();
        // m1 drops a and b and shortens l: a is removed, b survives (m2 owns it), c untouched.
        let out = apply(&mut s, "m1", Subresource::Main, base(json!({"l": [1]}))).unwrap();
        assert_eq!(out.object["spec"], json!({"b": 2, "c": 3, "l": [1]}));
        // An update (merge patch) takes c from m2; m2 dropping c then keeps it.
        s.patch(
            vml(),
            "ns",
            "a",
            Subresource::Main,
            PatchType::Merge,
            br#"{"spec":{"c":4}}"#,
            &mgr("editor"),
        )
        .unwrap();
        let out = apply(&mut s, "m2", Subresource::Main, base(json!({}))).unwrap();
        assert_eq!(out.object["spec"], json!({"c": 4, "l": [1]}));
        // Re-applying the same config is a no-op.
        let out = apply(&mut s, "m1", Subresource::Main, base(json!({"l": [1]}))).unwrap();
        assert!(out.changes.is_empty());
        // Status apply only touches status; a status in a main apply is ignored.
        let out = apply(&mut s, "ctl", Subresource::Status, st).unwrap();
        assert_eq!(out.object["status"]["phase"], "p");
        assert_eq!(out.object["spec"], json!({"c": 4, "l": [1]}));
        let gen_before = out.object["metadata"]["generation"].clone();
        let mut with_status = base(json!({"l": [1]}));
        with_status["status"] = json!({"phase": "nope"});
        let out = apply(&mut s, "m1", Subresource::Main, with_status).unwrap();
        assert_eq!(out.object["status"]["phase"], "p");
        assert_eq!(out.object["metadata"]["generation"], gen_before);
        // The status manager drops a status field.
        let st2 = json!({"apiVersion": "keyway.dev/v1alpha1", "kind": "VMLease", "status": {"other": true}});
        let out = apply(&mut s, "ctl", Subresource::Status, st2).unwrap();
        assert_eq!(out.object["status"], json!({"other": true}));
        // YAML bodies work.
        let yaml = "apiVersion: keyway.dev/v1alpha1\nkind: VMLease\nmetadata:\n  name: a\nspec:\n  l: [1]\n  y: yaml\n";
        let out = s
            .patch(
                vml(),
                "ns",
                "a",
                Subresource::Main,
                PatchType::Apply,
                yaml.as_bytes(),
                &mgr("m1"),
            )
            .unwrap();
        assert_eq!(out.object["spec"]["y"], "yaml");
        // Wrong name in the body.
        let e = apply(&mut s, "m1", Subresource::Main, json!({"apiVersion": "keyway.dev/v1alpha1", "kind": "VMLease", "metadata": {"name": "zz"}})).unwrap_err();
        assert_eq!(e.code, 400);
    }

    #[test]
    fn history_is_bounded() {
        let mut s = Store::new(2);
        for i in 0..5 {
            s.create(
                cm(),
                "ns",
                json!({"metadata": {"name": format!("c{i}")}}),
                &opts(),
            )
            .unwrap();
        }
        assert_eq!(s.compacted_rv(), 3);
        assert_eq!(s.history.len(), 2);
    }
}
