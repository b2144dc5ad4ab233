//! Label and field selectors (`labelSelector` / `fieldSelector` query parameters).

use serde_json::Value;

use crate::error::ApiError;
use crate::resources::ResourceDef;

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldReq {
    path: String,
    value: String,
    negate: bool,
}

/// A parsed label selector plus field selector. The empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selectors {
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

/// Splits on commas that are not inside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(v: &str) -> bool {
    v.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn parse_set(rest: &str) -> Option<Vec<String>> {
    let rest = rest.trim();
    let inner = rest.strip_prefix('(')?.strip_suffix(')')?;
    let vals: Vec<String> = inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    if vals.iter().all(|v| valid_value(v)) {
        Some(vals)
    } else {
        None
    }
}

fn parse_label_term(t: &str) -> Option<LabelReq> {
    if let Some(k) = t.strip_prefix('!') {
        let k = k.trim();
        return valid_key(k).then(|| LabelReq::NotExists(k.to_string()));
    }
    if let Some((k, v)) = t.split_once("!=") {
        let (k, v) = (k.trim(), v.trim());
        return (valid_key(k) && valid_value(v)).then(|| LabelReq::NotEq(k.into(), v.into()));
    }
    if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
        let (k, v) = (k.trim(), v.trim());
        return (valid_key(k) && valid_value(v)).then(|| LabelReq::Eq(k.into(), v.into()));
    }
    let mut parts = t.splitn(2, char::is_whitespace);
    let k = parts.next().unwrap_or("").trim();
    match parts.next().map(str::trim) {
        None => valid_key(k).then(|| LabelReq::Exists(k.to_string())),
        Some(rest) => {
            if let Some(set) = rest.strip_prefix("notin") {
                let vals = parse_set(set)?;
                valid_key(k).then(|| LabelReq::NotIn(k.into(), vals))
            } else if let Some(set) = rest.strip_prefix("in") {
                let vals = parse_set(set)?;
                valid_key(k).then(|| LabelReq::In(k.into(), vals))
            } else {
                None
            }
        }
    }
}

impl Selectors {
    /// Parses `labelSelector` and `fieldSelector` for a resource.
    ///
    /// Label selectors support `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)` and
    /// `k notin (a,b)`. Field selectors support `=`, `==` and `!=` on
    /// `metadata.name`, `metadata.namespace` and the few extra fields the real
    /// server supports for the resource; anything else is 400 BadRequest.
    pub fn parse(
        res: &ResourceDef,
        label_selector: Option<&str>,
        field_selector: Option<&str>,
    ) -> Result<Selectors, ApiError> {
        let mut sel = Selectors::default();
        if let Some(ls) = label_selector {
            for t in split_terms(ls) {
                let req = parse_label_term(t).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "unable to parse requirement: invalid label selector term {t:?}"
                    ))
                })?;
                sel.labels.push(req);
            }
        }
        if let Some(fs) = field_selector {
            for t in split_terms(fs) {
                let (path, value, negate) = if let Some((k, v)) = t.split_once("!=") {
                    (k, v, true)
                } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                    (k, v, false)
                } else {
                    return Err(ApiError::bad_request(format!(
                        "invalid selector: '{t}'; can't understand '{t}'"
                    )));
                };
                let path = path.trim();
                if path != "metadata.name"
                    && path != "metadata.namespace"
                    && !res.extra_selectable_fields.contains(&path)
                {
                    return Err(ApiError::bad_request(format!(
                        "field label not supported: {path}"
                    )));
                }
                sel.fields.push(FieldReq {
                    path: path.to_string(),
                    value: value.trim().to_string(),
                    negate,
                });
            }
        }
        Ok(sel)
    }

    /// Whether the selectors are empty (match everything).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    /// Whether `obj` matches.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => label(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|f| {
                let mut cur = obj;
                let mut found = true;
                for seg in f.path.split('.') {
                    match cur.get(seg) {
                        Some(v) => cur = v,
                        None => {
                            found = false;
                            break;
                        }
                    }
                }
                let actual = if found {
                    match cur {
                        Value::String(s) => s.clone(),
                        Value::Null => String::new(),
                        other => other.to_string(),
                    }
                } else {
                    String::new()
                };
                (actual == f.value) != f.negate
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;
    use serde_json::json;

    fn sel(ls: Option<&str>, fs: Option<&str>) -> Result<Selectors, ApiError> {
        let res = find("keyway.dev", "v1alpha1", "vmleases").ok_or_else(ApiError::no_route)?;
        Selectors::parse(res, ls, fs)
    }

    #[test]
    fn label_selectors() -> Result<(), ApiError> {
        let o = json!({"metadata": {"name": "a", "namespace": "ns", "labels": {"app": "x", "tier": "web"}}});
        let none = json!({"metadata": {"name": "b"}});
        assert!(sel(Some("app=x"), None)?.matches(&o));
        assert!(sel(Some("app==x,tier"), None)?.matches(&o));
        assert!(!sel(Some("app!=x"), None)?.matches(&o));
        assert!(sel(Some("app!=x"), None)?.matches(&none));
        assert!(sel(Some("!missing"), None)?.matches(&o));
        assert!(!sel(Some("!app"), None)?.matches(&o));
        assert!(sel(Some("tier in (web, db)"), None)?.matches(&o));
        assert!(!sel(Some("tier notin (web,db)"), None)?.matches(&o));
        assert!(sel(Some("tier notin (web,db)"), None)?.matches(&none));
        assert!(sel(Some("app=x,tier in (db)"), None).is_ok_and(|s| !s.matches(&o)));
        assert!(sel(Some("a b c"), None).is_err());
        assert!(sel(Some(""), None)?.is_empty());
        Ok(())
    }

    #[test]
    fn field_selectors() -> Result<(), ApiError> {
        let o = json!({"metadata": {"name": "a", "namespace": "ns"}});
        assert!(sel(None, Some("metadata.name=a"))?.matches(&o));
        assert!(sel(None, Some("metadata.name!=b,metadata.namespace==ns"))?.matches(&o));
        assert!(!sel(None, Some("metadata.namespace=other"))?.matches(&o));
        let e = sel(None, Some("spec.foo=1")).err().map(|e| e.code);
        assert_eq!(e, Some(400));
        Ok(())
    }
}
