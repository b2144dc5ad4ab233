//! What the directory says, indexed by object, so a round admits only the
//! objects of files that changed. Pure: fed the scanner's per-file parses.
//!
//! [`Directory::update`] compares each file's parse with the one admitted
//! last (the scanner hands out the same `Arc` while a file is unchanged) and
//! returns the objects whose definition may have changed: those the changed,
//! new or vanished files define, hold, or held before. Objects of files that
//! did not change are not looked at, so a one-line edit in one file among
//! thousands costs that file.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::loader::{Doc, FileScan, ObjKey, Problem};

/// See the module docs.
#[derive(Default)]
pub struct Directory {
    /// The parse admitted last, per file.
    files: HashMap<String, Arc<FileScan>>,
    /// Where each object is defined: (file, position of the document in
    /// that file's `docs`), sorted; more than one is a duplicate. A short
    /// vector sharing one name per file: almost every object has one
    /// definition, and this index holds every object.
    defs: HashMap<ObjKey, Vec<(Arc<str>, usize)>>,
    /// Files naming an object they could not read (it keeps its last good
    /// version).
    held: HashMap<ObjKey, BTreeSet<String>>,
    /// Files that could not be read completely (what they held is kept).
    incomplete: HashSet<String>,
}

impl Directory {
    /// Admits a scan of the whole directory; returns the objects whose
    /// definition may have changed, and the files that changed or vanished.
    pub fn update(&mut self, scans: &[Arc<FileScan>]) -> (BTreeSet<ObjKey>, Vec<String>) {
        let mut affected = BTreeSet::new();
        let mut changed = Vec::new();
        let listed: HashSet<&str> = scans.iter().map(|s| s.file.as_str()).collect();
        let gone: Vec<String> = self
            .files
            .keys()
            .filter(|f| !listed.contains(f.as_str()))
            .cloned()
            .collect();
        for file in gone {
            self.forget(&file, &mut affected);
            changed.push(file);
        }
        for scan in scans {
            if self
                .files
                .get(&scan.file)
                .is_some_and(|s| Arc::ptr_eq(s, scan))
            {
                continue;
            }
            self.forget(&scan.file, &mut affected);
            changed.push(scan.file.clone());
            let file: Arc<str> = Arc::from(scan.file.as_str());
            for (i, doc) in scan.docs.iter().enumerate() {
                let defs = self.defs.entry(doc.id.clone()).or_default();
                let def = (file.clone(), i);
                let at = defs.partition_point(|d| *d < def);
                defs.insert(at, def);
                affected.insert(doc.id.clone());
            }
            for id in &scan.held {
                self.held
                    .entry(id.clone())
                    .or_default()
                    .insert(scan.file.clone());
                affected.insert(id.clone());
            }
            if scan.incomplete {
                self.incomplete.insert(scan.file.clone());
            }
            self.files.insert(scan.file.clone(), scan.clone());
        }
        (affected, changed)
    }

    /// Drops what `file` said.
    fn forget(&mut self, file: &str, affected: &mut BTreeSet<ObjKey>) {
        let Some(old) = self.files.remove(file) else {
            return;
        };
        for doc in &old.docs {
            if let Some(defs) = self.defs.get_mut(&doc.id) {
                defs.retain(|(f, _)| &**f != file);
                if defs.is_empty() {
                    self.defs.remove(&doc.id);
                }
            }
            affected.insert(doc.id.clone());
        }
        for id in &old.held {
            if let Some(h) = self.held.get_mut(id) {
                h.remove(file);
                if h.is_empty() {
                    self.held.remove(id);
                }
            }
            affected.insert(id.clone());
        }
        self.incomplete.remove(file);
    }

    /// Whether a file could not be read completely.
    pub fn is_incomplete(&self, file: &str) -> bool {
        self.incomplete.contains(file)
    }

    /// Whether some file names the object but could not read it.
    pub fn is_held(&self, id: &ObjKey) -> bool {
        self.held.contains_key(id)
    }

    /// The parse and document index that define `id`, if any, and a problem
    /// for every other copy. With duplicates the copy in `prev_file` (where
    /// the object came from before) wins, so an added duplicate cannot hijack
    /// a live object; else the first by file name; within a file, the first
    /// document.
    pub fn choose(
        &self,
        id: &ObjKey,
        prev_file: Option<&str>,
    ) -> Option<(Arc<FileScan>, usize, Vec<Problem>)> {
        let defs = self.defs.get(id)?;
        let (keep_file, keep_i) = prev_file
            .and_then(|p| defs.iter().find(|(f, _)| &**f == p))
            .or_else(|| defs.first())?;
        let keep_i = *keep_i;
        let scan = self.files.get(&**keep_file)?;
        let keep: &Doc = scan.docs.get(keep_i)?;
        let problems = defs
            .iter()
            .filter(|(f, i)| !(f == keep_file && *i == keep_i))
            .filter_map(|(f, i)| {
                let drop = self.files.get(&**f)?.docs.get(*i)?;
                Some(Problem {
                    file: f.to_string(),
                    document: Some(drop.index),
                    object: Some(id.to_string()),
                    field: Some("metadata.name".into()),
                    message: format!(
                        "duplicate: {id} is also defined in {keep_file} (document {}); this copy is ignored",
                        keep.index
                    ),
                })
            })
            .collect();
        Some((scan.clone(), keep_i, problems))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::local::loader;
    use keyway_core::Kind;

    fn pool(name: &str) -> String {
        format!(
            "apiVersion: keyway.dev/v1alpha1\nkind: IPPool\nmetadata: {{name: {name}}}\nspec: {{addresses: [127.0.10.1]}}\n"
        )
    }

    fn scan(file: &str, text: &str) -> Arc<FileScan> {
        Arc::new(loader::parse(file, text))
    }

    #[test]
    fn only_objects_of_changed_files_are_affected() {
        let mut d = Directory::default();
        let a = scan("a.yaml", &pool("a"));
        let b = scan("b.yaml", &pool("b"));
        let (first, files) = d.update(&[a.clone(), b.clone()]);
        assert_eq!((first.len(), files.len()), (2, 2));
        // Same parses again: nothing to look at.
        let (objects, files) = d.update(&[a.clone(), b.clone()]);
        assert!(objects.is_empty() && files.is_empty());
        // b is rewritten to define c instead: b and c, not a.
        let b2 = scan("b.yaml", &pool("c"));
        let got: Vec<String> = d
            .update(&[a.clone(), b2.clone()])
            .0
            .iter()
            .map(|k| k.name().to_string())
            .collect();
        assert_eq!(got, ["b", "c"]);
        // a vanishes: a.
        let (got, files) = d.update(std::slice::from_ref(&b2));
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            [ObjKey::new(Kind::Pool, "", "a")]
        );
        assert_eq!(files, ["a.yaml"]);
    }

    #[test]
    fn the_copy_an_object_came_from_wins_a_duplicate() {
        let mut d = Directory::default();
        d.update(&[scan("a.yaml", &pool("p")), scan("z.yaml", &pool("p"))]);
        let id = ObjKey::new(Kind::Pool, "", "p");
        let (scan, _, problems) = d.choose(&id, None).unwrap();
        assert_eq!(scan.file, "a.yaml", "first by file name");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].file, "z.yaml");
        let (scan, _, problems) = d.choose(&id, Some("z.yaml")).unwrap();
        assert_eq!(scan.file, "z.yaml", "where it came from");
        assert_eq!(problems[0].file, "a.yaml");
    }

    #[test]
    fn a_duplicate_within_one_file_is_reported_and_the_first_document_wins() {
        let mut d = Directory::default();
        let text = format!(
            "{}---\n{}",
            pool("p"),
            pool("p").replace("127.0.10.1", "127.0.10.2")
        );
        d.update(&[scan("a.yaml", &text)]);
        let (scan, i, problems) = d.choose(&ObjKey::new(Kind::Pool, "", "p"), None).unwrap();
        assert_eq!((scan.file.as_str(), scan.docs[i].index), ("a.yaml", 1));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            (problems[0].file.as_str(), problems[0].document),
            ("a.yaml", Some(2))
        );
    }
}
