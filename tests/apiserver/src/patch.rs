//! Patch formats: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and the
//! field-path helpers used by the simplified server-side apply.

use std::collections::BTreeSet;

use json_patch::PatchOperation;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// The patch type, from the request's `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/json-patch+json`.
    Json,
    /// `application/strategic-merge-patch+json` (treated as a merge patch; only for built-in types).
    Strategic,
    /// `application/apply-patch+yaml` (server-side apply).
    Apply,
}

impl PatchType {
    /// Maps a `Content-Type` (parameters ignored) to a patch type.
    pub fn from_content_type(ct: &str) -> Option<PatchType> {
        let base = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match base.as_str() {
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/json-patch+json" => Some(PatchType::Json),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                Some(PatchType::Apply)
            }
            _ => None,
        }
    }
}

/// A path of map keys from the object root. Lists are never descended into.
pub type FieldPath = Vec<String>;

/// Parses a JSON body, mapping errors to 400 BadRequest.
pub fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding request body as JSON: {e}")))
}

/// Parses a body that may be JSON or YAML (apply patches, YAML creates).
pub fn parse_json_or_yaml(body: &[u8]) -> Result<Value, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => Ok(v),
        Err(json_err) => serde_norway::from_slice::<Value>(body).map_err(|yaml_err| {
            ApiError::bad_request(format!(
                "error decoding request body: not JSON ({json_err}) nor YAML ({yaml_err})"
            ))
        }),
    }
}

/// Applies an RFC 7386 merge patch to a copy of `doc`.
pub fn merge_patch(doc: &Value, patch: &Value) -> Value {
    let mut out = doc.clone();
    json_patch::merge(&mut out, patch);
    out
}

/// Applies an RFC 6902 JSON patch to a copy of `doc`.
///
/// Like the real server (evanphx/json-patch), a `test` of a missing path
/// against `null` succeeds; kube-runtime's finalizer helper relies on this.
/// Any failure (including a failed `test`) is 422 Invalid, as in the real server.
pub fn json_patch(doc: &Value, patch: &Value) -> Result<Value, ApiError> {
    let ops: Vec<PatchOperation> = serde_json::from_value(patch.clone())
        .map_err(|e| ApiError::bad_request(format!("the JSON patch could not be decoded: {e}")))?;
    let mut out = doc.clone();
    for (i, op) in ops.iter().enumerate() {
        if let PatchOperation::Test(t) = op {
            let actual = out.pointer(t.path.as_str()).unwrap_or(&Value::Null);
            if *actual != t.value {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!(
                        "the server rejected our request due to an error in our request: testing value {} failed: test failed (operation {i})",
                        t.path
                    ),
                ));
            }
            continue;
        }
        json_patch::patch(&mut out, std::slice::from_ref(op)).map_err(|e| {
            ApiError::new(
                422,
                "Invalid",
                format!("the server rejected our request due to an error in our request: {e}"),
            )
        })?;
    }
    Ok(out)
}

/// Leaf paths of `v`: scalars and lists (atomic) are leaves; maps are descended
/// into (an empty map owns nothing); `null` is skipped.
pub fn leaf_paths(v: &Value) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    fn walk(v: &Value, prefix: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
        match v {
            Value::Null => {}
            Value::Object(m) => {
                for (k, child) in m {
                    prefix.push(k.clone());
                    walk(child, prefix, out);
                    prefix.pop();
                }
            }
            _ => {
                if !prefix.is_empty() {
                    out.insert(prefix.clone());
                }
            }
        }
    }
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// The value at `path`, if any.
pub fn get_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for seg in path {
        cur = cur.as_object()?.get(seg)?;
    }
    Some(cur)
}

/// Removes the value at `path` (no-op if absent).
pub fn remove_path(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for seg in parents {
        match cur.as_object_mut().and_then(|m| m.get_mut(seg)) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
    }
}

/// Whether `a` is a prefix of `b` or `b` a prefix of `a` (overlapping ownership).
pub fn overlaps(a: &[String], b: &[String]) -> bool {
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

/// Removes keys from a JSON object, returning the object for chaining.
pub fn without_keys(mut m: Map<String, Value>, keys: &[&str]) -> Map<String, Value> {
    for k in keys {
        m.remove(*k);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_types() {
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json; charset=utf-8"),
            Some(PatchType::Merge)
        );
        assert_eq!(
            PatchType::from_content_type("application/apply-patch+yaml"),
            Some(PatchType::Apply)
        );
        assert_eq!(PatchType::from_content_type("application/json"), None);
    }

    #[test]
    fn merge_and_json_patch() -> Result<(), ApiError> {
        let doc = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        assert_eq!(
            merge_patch(&doc, &json!({"a": {"b": null, "d": 3}, "l": [3]})),
            json!({"a": {"c": 2, "d": 3}, "l": [3]})
        );
        let out = json_patch(
            &doc,
            &json!([{"op": "test", "path": "/missing", "value": null}, {"op": "add", "path": "/l/-", "value": 3}]),
        )?;
        assert_eq!(out["l"], json!([1, 2, 3]));
        let err = json_patch(&doc, &json!([{"op": "test", "path": "/a/b", "value": 5}]));
        assert_eq!(err.err().map(|e| e.code), Some(422));
        let err = json_patch(&doc, &json!([{"op": "remove", "path": "/nope"}]));
        assert_eq!(err.err().map(|e| e.code), Some(422));
        let err = json_patch(&doc, &json!({"op": "remove"}));
        assert_eq!(err.err().map(|e| e.code), Some(400));
        Ok(())
    }

    #[test]
    fn paths() {
        let v = json!({"spec": {"a": 1, "b": [1], "c": {}, "d": null}, "x": "y"});
        let p = leaf_paths(&v);
        let want: BTreeSet<FieldPath> = [
            vec!["spec".to_string(), "a".to_string()],
            vec!["spec".to_string(), "b".to_string()],
            vec!["x".to_string()],
        ]
        .into_iter()
        .collect();
        assert_eq!(p, want);
        let mut v2 = v.clone();
        remove_path(&mut v2, &["spec".to_string(), "a".to_string()]);
        assert_eq!(get_path(&v2, &["spec".to_string(), "a".to_string()]), None);
        remove_path(&mut v2, &["nope".to_string(), "a".to_string()]);
        assert!(overlaps(
            &["a".to_string()],
            &["a".to_string(), "b".to_string()]
        ));
        assert!(!overlaps(&["a".to_string()], &["b".to_string()]));
    }

    #[test]
    fn yaml_bodies() -> Result<(), ApiError> {
        let v = parse_json_or_yaml(b"apiVersion: v1\nkind: ConfigMap\ndata:\n  a: b\n")?;
        assert_eq!(v["data"]["a"], json!("b"));
        assert!(parse_json_or_yaml(b"{not: [valid").is_err());
        Ok(())
    }
}
