//! Reads the YAML files of a local-mode directory into typed objects.
//!
//! Every `*.yaml`/`*.yml` file directly in the directory is read, each may hold
//! several documents. A document that cannot be read becomes an error naming the
//! file, the document, the object (when it got that far) and the field; it never
//! stops the other documents or files.
//!
//! Reading ([`read_capped`]) and parsing ([`parse`]) are separate so the
//! scanner can read on a blocking thread and parse each changed file on its
//! own; [`scan_file`] does both. Text nested deeper than
//! [`nesting::MAX_NESTING`] levels is refused before the YAML parser sees it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use keyway_crds::{API_VERSION, IPPool, IPPoolSpec, SshRoute, SshRouteSpec, VMLease, VMLeaseSpec};
use serde::Deserialize;
use sha2::Digest as _;

use super::nesting;

/// Largest file local mode reads; anything bigger is refused, not truncated.
pub const MAX_FILE_BYTES: u64 = 32 * 1024 * 1024;

pub use keyway_core::{Kind, ObjKey};

/// A typed object read from a document: its spec only (who it is lives in
/// [`Doc::id`]; the rest of the metadata is not used), shared with the
/// object's record, since a parse is kept while its file is unchanged.
#[derive(Clone, Debug)]
pub enum Object {
    /// An IPPool.
    Pool(Arc<IPPoolSpec>),
    /// A VMLease.
    Lease(Arc<VMLeaseSpec>),
    /// An SshRoute.
    Route(Arc<SshRouteSpec>),
}

impl Object {
    /// The spec as JSON, to tell whether an object changed between scans.
    pub fn spec_json(&self) -> keyway_state::SeenSpec {
        let v = match self {
            Object::Pool(p) => serde_json::to_value(&**p),
            Object::Lease(l) => serde_json::to_value(&**l),
            Object::Route(r) => serde_json::to_value(&**r),
        };
        keyway_state::SeenSpec::new(&v.unwrap_or(serde_json::Value::Null))
    }
}

/// One document that was read.
#[derive(Clone, Debug)]
pub struct Doc {
    /// 1-based position in its file.
    pub index: usize,
    /// Who it is.
    pub id: ObjKey,
    /// What it says.
    pub object: Object,
}

pub use keyway_state::Problem;

/// Identity of a file's content (SHA-256 of its bytes, or of its read
/// error): equal fingerprints, same content.
pub type Fingerprint = [u8; 32];

/// The fingerprint of `bytes`.
pub fn fingerprint(bytes: &[u8]) -> Fingerprint {
    sha2::Sha256::digest(bytes).into()
}

/// Everything read from one file.
#[derive(Clone, Debug)]
pub struct FileScan {
    /// File name relative to the directory.
    pub file: String,
    /// The content this scan was read from.
    pub content: Fingerprint,
    /// Documents that became objects.
    pub docs: Vec<Doc>,
    /// Problems found.
    pub problems: Vec<Problem>,
    /// The file could not be read completely (I/O error, YAML syntax error,
    /// or a document that could not even be identified). Objects it held before
    /// must be kept rather than treated as deleted.
    pub incomplete: bool,
    /// Objects a document names but that could not be read (unknown field,
    /// wrong type, wrong apiVersion): they keep their last good version.
    pub held: Vec<ObjKey>,
}

/// Lists the YAML files local mode reads, sorted by name.
pub fn yaml_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        // Follow symlinks (ConfigMap mounts use them) but read only files.
        match std::fs::metadata(entry.path()) {
            Ok(m) if m.is_file() => out.push(entry.path()),
            _ => continue,
        }
    }
    out.sort();
    Ok(out)
}

/// Reads and parses one file.
pub fn scan_file(dir: &Path, path: &Path) -> FileScan {
    let file = path
        .strip_prefix(dir)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned();
    match read_capped(path) {
        Ok(text) => parse(&file, &text),
        Err(e) => unreadable(&file, e),
    }
}

/// The scan of a file that could not be read: every object it held is kept.
pub fn unreadable(file: &str, message: String) -> FileScan {
    FileScan {
        file: file.to_string(),
        content: fingerprint(format!("unreadable: {message}").as_bytes()),
        docs: Vec::new(),
        problems: vec![Problem {
            file: file.to_string(),
            document: None,
            object: None,
            field: None,
            message,
        }],
        incomplete: true,
        held: Vec::new(),
    }
}

/// Parses the text of `file` (its name relative to the directory).
pub fn parse(file: &str, text: &str) -> FileScan {
    parse_as(file, text, fingerprint(text.as_bytes()))
}

/// [`parse`] for a caller that already has the text's fingerprint.
pub fn parse_as(file: &str, text: &str, content: Fingerprint) -> FileScan {
    let mut scan = FileScan {
        file: file.to_string(),
        content,
        docs: Vec::new(),
        problems: Vec::new(),
        incomplete: false,
        held: Vec::new(),
    };
    let problem = |document: Option<usize>,
                   object: Option<String>,
                   field: Option<String>,
                   message: String| Problem {
        file: file.to_string(),
        document,
        object,
        field,
        message,
    };
    // Before the YAML parser: its cost grows with the square of the nesting.
    if let Err(deep) = nesting::check(text, nesting::MAX_NESTING) {
        scan.problems.push(problem(
            None,
            None,
            None,
            format!(
                "nesting deeper than {} levels (line {}); not parsed, its objects keep their last good version",
                nesting::MAX_NESTING,
                deep.line
            ),
        ));
        scan.incomplete = true;
        return scan;
    }
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value = match serde_norway::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                scan.problems.push(problem(
                    Some(index),
                    None,
                    None,
                    format!("invalid YAML: {e}"),
                ));
                scan.incomplete = true;
                // A syntax error ends the stream; later documents are unreadable.
                break;
            }
        };
        if value.is_null() {
            continue; // empty document, e.g. a trailing `---`
        }
        match read_doc(value) {
            Ok((id, object)) => scan.docs.push(Doc { index, id, object }),
            Err(DocError {
                id,
                field,
                message,
                identified,
                kind,
            }) => {
                if !identified {
                    scan.incomplete = true;
                }
                let object = id.as_ref().map(ToString::to_string).or(kind);
                if let Some(id) = id {
                    scan.held.push(*id);
                }
                scan.problems
                    .push(problem(Some(index), object, field, message));
            }
        }
    }
    scan
}

/// Reads a file of at most [`MAX_FILE_BYTES`] as UTF-8 text.
pub fn read_capped(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut buf = Vec::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read: {e}"))?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "larger than {MAX_FILE_BYTES} bytes; refusing to read it"
        ));
    }
    String::from_utf8(buf).map_err(|e| format!("not UTF-8 text: {e}"))
}

struct DocError {
    /// The object, when kind, namespace and name were read: it is kept as it was.
    id: Option<Box<ObjKey>>,
    /// The kind alone, when that is all that was read.
    kind: Option<String>,
    field: Option<String>,
    message: String,
    /// Whether the document was read far enough to know what it is (an
    /// unsupported kind is known not to be ours; a missing name is not).
    identified: bool,
}

fn str_at<'a>(v: &'a serde_norway::Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_str()
}

/// RFC 1123 subdomain, as Kubernetes requires of these names.
fn valid_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn read_doc(value: serde_norway::Value) -> Result<(ObjKey, Object), DocError> {
    let unidentified = |message: String| DocError {
        id: None,
        kind: None,
        field: None,
        message,
        identified: false,
    };
    if !value.is_mapping() {
        return Err(unidentified(
            "expected a Kubernetes object (a YAML mapping)".into(),
        ));
    }
    let api = str_at(&value, &["apiVersion"]).unwrap_or_default();
    let kind = str_at(&value, &["kind"]).unwrap_or_default();
    let kind = match kind {
        "IPPool" => Kind::Pool,
        "VMLease" => Kind::Lease,
        "SshRoute" => Kind::Route,
        "" => {
            return Err(unidentified(
                "missing kind (IPPool, VMLease or SshRoute)".into(),
            ));
        }
        other => {
            return Err(DocError {
                id: None,
                kind: None,
                field: Some("kind".into()),
                message: format!(
                    "unsupported kind {other:?}; local mode reads IPPool, VMLease and SshRoute"
                ),
                identified: true,
            });
        }
    };
    let name = str_at(&value, &["metadata", "name"])
        .unwrap_or_default()
        .to_string();
    if name.is_empty() {
        return Err(DocError {
            id: None,
            kind: Some(kind.to_string()),
            field: Some("metadata.name".into()),
            message: "missing name".into(),
            identified: false,
        });
    }
    let namespace = match kind {
        Kind::Pool => String::new(),
        _ => str_at(&value, &["metadata", "namespace"])
            .unwrap_or("default")
            .to_string(),
    };
    let id = ObjKey::new(kind, &namespace, &name);
    let err = |field: Option<String>, message: String| DocError {
        id: Some(Box::new(id.clone())),
        kind: None,
        field,
        message,
        identified: true,
    };
    if api != API_VERSION {
        return Err(err(
            Some("apiVersion".into()),
            format!("expected {API_VERSION}, found {api:?}"),
        ));
    }
    if !valid_object_name(&name) {
        return Err(err(
            Some("metadata.name".into()),
            "must be lowercase letters, digits, '-' or '.', starting and ending with a letter or digit".into(),
        ));
    }
    if kind != Kind::Pool && !valid_object_name(&namespace) {
        return Err(err(
            Some("metadata.namespace".into()),
            "not a valid namespace name".into(),
        ));
    }
    let object = match kind {
        Kind::Pool => typed::<IPPool>(value).map(|p| Object::Pool(Arc::new(p.spec))),
        Kind::Lease => typed::<VMLease>(value).map(|l| Object::Lease(Arc::new(l.spec))),
        Kind::Route => typed::<SshRoute>(value).map(|r| Object::Route(Arc::new(r.spec))),
    };
    object
        .map(|o| (id.clone(), o))
        .map_err(|(field, message)| err(field, message))
}

/// Deserializes strictly: an unknown field is an error (like kubectl's strict
/// field validation), because a misspelled `settled` must not be ignored.
fn typed<T: serde::de::DeserializeOwned>(
    value: serde_norway::Value,
) -> Result<T, (Option<String>, String)> {
    let mut unknown = Vec::new();
    let mut track = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let de = serde_ignored::Deserializer::new(value, &mut track);
    let obj: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != ".").then_some(path);
        (field, e.into_inner().to_string())
    })?;
    // `status` is the operator's to write; a copy pasted from kubectl is ignored.
    // apiVersion and kind were checked already (kube's types skip them).
    unknown.retain(|p| !p.starts_with("status") && p != "apiVersion" && p != "kind");
    if let Some(first) = unknown.first() {
        return Err((Some(first.clone()), "unknown field".into()));
    }
    Ok(obj)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn scan(text: &str) -> FileScan {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.yaml");
        std::fs::write(&p, text).unwrap();
        scan_file(dir.path(), &p)
    }

    #[test]
    fn multi_document_with_defaults() {
        let s = scan(
            "apiVersion: keyway.dev/v1alpha1\nkind: IPPool\nmetadata: {name: p}\nspec: {addresses: [127.0.10.1]}\n---\n\
             apiVersion: keyway.dev/v1alpha1\nkind: VMLease\nmetadata: {name: a}\nspec:\n  user: alice\n  accessPublicKeys: [x]\n  poolRef: p\n  target: {address: '127.0.0.1:22'}\n---\n",
        );
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        assert_eq!(s.docs.len(), 2);
        assert_eq!(s.docs[1].id.namespace_name().0, "default");
        assert_eq!(s.docs[1].index, 2);
    }

    #[test]
    fn unknown_field_names_the_path() {
        let s = scan(
            "apiVersion: keyway.dev/v1alpha1\nkind: VMLease\nmetadata: {name: a, namespace: t}\nspec:\n  user: alice\n  accessPublicKeys: [x]\n  poolRef: p\n  setled: true\n  target: {address: '127.0.0.1:22'}\n",
        );
        assert_eq!(s.problems.len(), 1);
        assert_eq!(s.problems[0].field.as_deref(), Some("spec.setled"));
        assert_eq!(s.problems[0].object.as_deref(), Some("VMLease t/a"));
        assert!(!s.incomplete);
    }

    #[test]
    fn wrong_type_names_the_path() {
        let s = scan(
            "apiVersion: keyway.dev/v1alpha1\nkind: IPPool\nmetadata: {name: p}\nspec: {addresses: 5}\n",
        );
        assert_eq!(s.problems[0].field.as_deref(), Some("spec.addresses"));
    }

    #[test]
    fn syntax_error_marks_incomplete() {
        let s = scan("apiVersion: keyway.dev/v1alpha1\nkind: IPPool\nmetadata: {name: p\n");
        assert!(s.incomplete);
        assert!(
            s.problems[0].message.contains("invalid YAML"),
            "{:?}",
            s.problems
        );
    }

    #[test]
    fn deep_nesting_is_refused_before_the_parser() {
        let n = 200_000;
        let text = format!("a: {}{}", "[".repeat(n), "]".repeat(n));
        let start = std::time::Instant::now();
        let s = parse("deep.yaml", &text);
        eprintln!(
            "{} bytes nested {n} deep refused in {:?}",
            text.len(),
            start.elapsed()
        );
        assert!(s.incomplete);
        assert_eq!(s.problems.len(), 1);
        assert!(
            s.problems[0]
                .message
                .contains("nesting deeper than 64 levels (line 1)"),
            "{:?}",
            s.problems
        );
        // At the limit the YAML parser gets the text, and is quick about it.
        let text = format!("a: {}{}", "[".repeat(63), "]".repeat(63));
        let start = std::time::Instant::now();
        let s = parse("limit.yaml", &text);
        eprintln!("nested 63 deep parsed in {:?}", start.elapsed());
        assert!(
            s.problems
                .iter()
                .all(|p| !p.message.contains("nesting") && !p.message.contains("invalid YAML")),
            "{:?}",
            s.problems
        );
    }

    /// What the pre-scan saves: serde_norway's time on nested input grows
    /// with the square of the depth. Run with `--ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure_serde_norway_on_nested_input() {
        for n in [2000, 4000, 8000, 16000] {
            let text = format!("a: {}{}", "[".repeat(n), "]".repeat(n));
            let start = std::time::Instant::now();
            let r = serde_norway::from_str::<serde_norway::Value>(&text);
            eprintln!(
                "serde_norway, {} bytes nested {n} deep: {:?} ({})",
                text.len(),
                start.elapsed(),
                r.err().map(|e| e.to_string()).unwrap_or_default()
            );
        }
    }

    #[test]
    fn an_unreadable_document_holds_its_object() {
        let s = scan(
            "apiVersion: keyway.dev/v1alpha1\nkind: VMLease\nmetadata: {name: a, namespace: t}\nspec:\n  user: 5\n  setled: true\n",
        );
        assert!(!s.incomplete);
        assert!(s.docs.is_empty());
        assert_eq!(s.held.len(), 1);
        assert_eq!(s.held[0].to_string(), "VMLease t/a");
    }

    #[test]
    fn bad_names_and_kinds() {
        let s = scan(
            "apiVersion: keyway.dev/v1alpha1\nkind: IPPool\nmetadata: {name: Bad_Name}\nspec: {addresses: [1.2.3.4]}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n",
        );
        assert_eq!(s.problems.len(), 2);
        assert!(s.docs.is_empty());
    }
}
