//! Reads the directory and parses changed files off the control loop.
//!
//! Contract: [`Scanner::scan`] lists and reads the directory on a blocking
//! thread (each file capped at [`loader::MAX_FILE_BYTES`]) and answers at
//! once with one [`FileScan`] per file: the parse of its current content when
//! that is done; else the file's previous parse (its objects stay as they
//! were); else an `incomplete` placeholder (nothing it held is deleted). A file
//! whose content changed is parsed on a blocking thread of its own, at most
//! one parse per file at a time, and is parsed again only when its content
//! changes. [`Scanner::done`] resolves when a parse finishes, so the caller
//! scans again and admits it. One slow file therefore delays its own objects
//! and nothing else.
//!
//! A file is read again only when its [`Stamp`] (device, inode, size, mtime,
//! ctime) changed, or when it was last read so soon after its last change
//! that a same-size rewrite within the file system's timestamp granularity
//! could hide (git's "racy" rule): so a rescan of an unchanged directory
//! costs one `stat` per file, not a read of every byte.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use super::loader::{self, FileScan, Fingerprint};

/// A change to a file within this long of reading it may not show in its
/// stamp (coarse timestamps): such a file is read again next time.
const RACY: Duration = Duration::from_secs(2);

/// What `stat` says of a file; equal stamps (taken long enough after the
/// last change) mean equal content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    /// The last change was at least [`RACY`] before `read_at`.
    fn settled_before(&self, read_at: SystemTime) -> bool {
        let Ok(at) = read_at.duration_since(SystemTime::UNIX_EPOCH) else {
            return false;
        };
        let limit = at.saturating_sub(RACY).as_secs();
        let newest = self.mtime.0.max(self.ctime.0);
        // One second is the coarsest timestamp; compare whole seconds.
        u64::try_from(newest).is_ok_and(|t| t < limit)
    }
}

/// One file as the reader found it.
enum Read {
    /// Same stamp as the last read, which was settled: content unchanged.
    Unchanged,
    /// Read now; `trusted` when its stamp may be relied on next time.
    Text {
        text: Result<String, String>,
        stamp: Option<Stamp>,
        trusted: bool,
    },
}

/// What the scanner knows of one file.
#[derive(Default)]
struct Entry {
    /// The text last read and its fingerprint: an unchanged file is compared,
    /// not hashed again, each round.
    last: Option<(Arc<str>, Fingerprint)>,
    /// The stamp of the last read, when it can tell "unchanged" next time.
    trusted_stamp: Option<Stamp>,
    /// The last finished parse.
    parsed: Option<Arc<FileScan>>,
    /// Content being parsed now.
    parsing: Option<Fingerprint>,
}

/// A finished parse.
struct Done {
    file: String,
    scan: FileScan,
}

/// The directory's files and their parses.
pub struct Scanner {
    dir: PathBuf,
    files: HashMap<String, Entry>,
    tx: mpsc::UnboundedSender<Done>,
    rx: mpsc::UnboundedReceiver<Done>,
    reads: u64,
}

impl Scanner {
    /// A scanner of `dir`; nothing is read until [`Scanner::scan`].
    pub fn new(dir: PathBuf) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Scanner {
            dir,
            files: HashMap::new(),
            tx,
            rx,
            reads: 0,
        }
    }

    /// Files read so far (an unchanged file is not read again).
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Reads every file and starts parses for changed ones; returns what is
    /// known of each file now (see the module comment).
    pub async fn scan(&mut self) -> Result<Vec<Arc<FileScan>>> {
        let dir = self.dir.clone();
        let known: HashMap<String, Stamp> = self
            .files
            .iter()
            .filter(|(_, e)| e.last.is_some())
            .filter_map(|(f, e)| Some((f.clone(), e.trusted_stamp?)))
            .collect();
        let read = tokio::task::spawn_blocking(move || -> Result<Vec<(String, Read)>> {
            let files =
                loader::yaml_files(&dir).with_context(|| format!("listing {}", dir.display()))?;
            Ok(files
                .iter()
                .map(|p| {
                    let name = p
                        .strip_prefix(&dir)
                        .unwrap_or(p)
                        .to_string_lossy()
                        .into_owned();
                    let stamp = Stamp::of(p);
                    if stamp.is_some() && known.get(&name) == stamp.as_ref() {
                        return (name, Read::Unchanged);
                    }
                    let read_at = SystemTime::now();
                    let text = loader::read_capped(p);
                    let trusted = stamp.is_some_and(|s| s.settled_before(read_at));
                    (
                        name,
                        Read::Text {
                            text,
                            stamp,
                            trusted,
                        },
                    )
                })
                .collect())
        })
        .await
        .context("the directory reader failed")??;

        let mut out = Vec::with_capacity(read.len());
        let mut listed = HashSet::with_capacity(read.len());
        for (file, read) in read {
            listed.insert(file.clone());
            let entry = self.files.entry(file.clone()).or_default();
            let (text, content) = match (read, &entry.last) {
                // `known` only lists files with a last reading.
                (Read::Unchanged, Some((text, content))) => (text.clone(), *content),
                (Read::Unchanged, None) => {
                    entry.trusted_stamp = None;
                    out.push(Arc::new(loader::unreadable(
                        &file,
                        "changed while being scanned; it is read again next round".into(),
                    )));
                    continue;
                }
                (
                    Read::Text {
                        text,
                        stamp,
                        trusted,
                    },
                    last,
                ) => {
                    self.reads += 1;
                    let text = match text {
                        Ok(t) => t,
                        Err(e) => {
                            entry.trusted_stamp = None;
                            out.push(Arc::new(loader::unreadable(&file, e)));
                            continue;
                        }
                    };
                    entry.trusted_stamp = stamp.filter(|_| trusted);
                    match last {
                        Some((last, content)) if **last == *text => (last.clone(), *content),
                        _ => {
                            let content = loader::fingerprint(text.as_bytes());
                            let text: Arc<str> = text.into();
                            entry.last = Some((text.clone(), content));
                            (text, content)
                        }
                    }
                }
            };
            match &entry.parsed {
                Some(p) if p.content == content => {
                    // The same `Arc` while the file is unchanged: the caller
                    // tells unchanged files by pointer.
                    out.push(p.clone());
                    continue;
                }
                _ => {}
            }
            if entry.parsing.is_none() {
                entry.parsing = Some(content);
                let tx = self.tx.clone();
                let name = file.clone();
                tokio::task::spawn_blocking(move || {
                    // A parser panic must not leave the file "parsing" forever.
                    let scan = std::panic::catch_unwind(|| loader::parse_as(&name, &text, content))
                        .unwrap_or_else(|_| {
                            loader::unreadable(&name, "the YAML parser failed on this file".into())
                        });
                    // The receiver lives as long as the scanner; a send after
                    // it is gone has nobody to tell.
                    let _ = tx.send(Done { file: name, scan });
                });
            }
            out.push(match &entry.parsed {
                Some(p) => p.clone(),
                None => Arc::new(FileScan {
                    file,
                    content,
                    docs: Vec::new(),
                    problems: Vec::new(),
                    incomplete: true,
                    held: Vec::new(),
                }),
            });
        }
        // A file that went away is forgotten, unless its parse is still
        // running: that keeps the one-parse-per-file rule if it comes back.
        self.files
            .retain(|f, e| listed.contains(f) || e.parsing.is_some());
        Ok(out)
    }

    /// Waits for a parse to finish and keeps its result. Cancel-safe: a
    /// result is kept only once received.
    pub async fn done(&mut self) {
        if let Some(d) = self.rx.recv().await
            && let Some(e) = self.files.get_mut(&d.file)
        {
            e.parsing = None;
            e.parsed = Some(Arc::new(d.scan));
        }
    }

    /// Files being parsed now.
    pub fn parsing(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .files
            .iter()
            .filter(|(_, e)| e.parsing.is_some())
            .map(|(f, _)| f.as_str())
            .collect();
        v.sort_unstable();
        v
    }

    /// Scans, then waits up to `budget` for the parses that started; used
    /// once at start so the first state reflects the directory. Returns the
    /// files still being parsed.
    pub async fn prime(&mut self, budget: Duration) -> Result<Vec<String>> {
        self.scan().await?;
        let deadline = tokio::time::Instant::now() + budget;
        while !self.parsing().is_empty() {
            if tokio::time::timeout_at(deadline, self.done())
                .await
                .is_err()
            {
                break;
            }
        }
        Ok(self.parsing().into_iter().map(str::to_string).collect())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const POOL: &str = "apiVersion: keyway.dev/v1alpha1\nkind: IPPool\nmetadata: {name: p}\nspec: {addresses: [127.0.10.1]}\n";

    #[tokio::test]
    async fn a_slow_file_does_not_hold_back_the_others() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pool.yaml"), POOL).unwrap();
        let mut s = Scanner::new(dir.path().to_path_buf());
        assert!(s.prime(Duration::from_secs(30)).await.unwrap().is_empty());
        let scans = s.scan().await.unwrap();
        assert_eq!(scans.len(), 1);
        assert_eq!(scans[0].docs.len(), 1);
        assert!(
            s.parsing().is_empty(),
            "an unchanged file is not parsed again"
        );

        // A change answers at once with the previous parse, then the new one.
        std::fs::write(
            dir.path().join("pool.yaml"),
            POOL.replace("name: p", "name: q"),
        )
        .unwrap();
        let scans = s.scan().await.unwrap();
        assert_eq!(scans[0].docs[0].id.name(), "p");
        s.done().await;
        let scans = s.scan().await.unwrap();
        assert_eq!(scans[0].docs[0].id.name(), "q");

        // A new file is a placeholder that keeps everything until parsed.
        std::fs::write(
            dir.path().join("new.yaml"),
            POOL.replace("name: p", "name: n"),
        )
        .unwrap();
        let scans = s.scan().await.unwrap();
        let new = scans.iter().find(|f| f.file == "new.yaml").unwrap();
        assert!(new.incomplete || new.docs.len() == 1);
        s.done().await;
        let scans = s.scan().await.unwrap();
        let new = scans.iter().find(|f| f.file == "new.yaml").unwrap();
        assert_eq!(new.docs.len(), 1);

        // A removed file is gone from the scan.
        std::fs::remove_file(dir.path().join("new.yaml")).unwrap();
        assert_eq!(s.scan().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_unchanged_file_is_not_read_again_and_a_rewrite_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.yaml");
        std::fs::write(&path, POOL).unwrap();
        let mut s = Scanner::new(dir.path().to_path_buf());
        s.prime(Duration::from_secs(30)).await.unwrap();
        // Just written: too fresh to trust its stamp, so read every time.
        s.scan().await.unwrap();
        assert_eq!(s.reads(), 2);
        // Once its last change is older than the racy window, a stat is
        // enough: rescans read nothing.
        tokio::time::sleep(RACY + Duration::from_millis(1100)).await;
        s.scan().await.unwrap();
        let settled = s.reads();
        for _ in 0..5 {
            let scans = s.scan().await.unwrap();
            assert_eq!(scans[0].docs[0].id.name(), "p");
        }
        assert_eq!(s.reads(), settled);
        // A same-size rewrite in place (new mtime/ctime) is read and parsed.
        std::fs::write(&path, POOL.replace("name: p", "name: q")).unwrap();
        s.scan().await.unwrap();
        assert_eq!(s.reads(), settled + 1);
        s.done().await;
        let scans = s.scan().await.unwrap();
        assert_eq!(scans[0].docs[0].id.name(), "q");
    }
}
