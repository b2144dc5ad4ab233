//! When an object that is missing from its file is really deleted.
//!
//! Contract: pure (no I/O; time is passed in). Editors save files in steps:
//! truncate then write, write in several chunks, or move the old file away
//! and create the new one. A scan in between sees an empty, half-written or
//! missing file. So an object missing from every file is deleted only once the
//! file it came from has stayed exactly as the scan saw it (same content
//! fingerprint, or still absent) for the edit grace; until then it keeps its
//! last good version and a problem says why. A file that does not parse is
//! handled by the caller (its objects are kept for as long as it is broken).
//! An object found in another file (a rename) is never missing at all.

use std::collections::HashMap;
use std::time::Duration;

use super::loader::Fingerprint;

/// How long a file must stay unchanged before the objects it lost are deleted.
pub const DEFAULT_EDIT_GRACE: Duration = Duration::from_secs(2);

/// A file's state as scans saw it, and since when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Clock {
    /// `None`: the file is gone.
    content: Option<Fingerprint>,
    since_ms: u64,
}

/// Per-file clocks: since when each file has been what the scans saw.
#[derive(Clone, Debug)]
pub struct FileClocks {
    grace_ms: u64,
    files: HashMap<String, Clock>,
}

impl FileClocks {
    /// Clocks with the given grace (zero: losses apply at once).
    pub fn new(grace: Duration) -> Self {
        FileClocks {
            grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
            files: HashMap::new(),
        }
    }

    /// The grace.
    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }

    /// Records one scan: `present` files with their content, and `referenced`
    /// files (those objects were last read from), the absent ones as gone. A
    /// clock restarts whenever its file's state changes.
    pub fn observe<'a>(
        &mut self,
        present: impl IntoIterator<Item = (&'a str, Fingerprint)>,
        referenced: impl IntoIterator<Item = &'a str>,
        now_ms: u64,
    ) {
        let mut seen = std::collections::HashSet::new();
        for (file, content) in present {
            seen.insert(file);
            self.set(file, Some(content), now_ms);
        }
        for file in referenced {
            if !seen.contains(file) {
                self.set(file, None, now_ms);
            }
        }
    }

    fn set(&mut self, file: &str, content: Option<Fingerprint>, now_ms: u64) {
        match self.files.get_mut(file) {
            Some(c) if c.content == content => {}
            Some(c) => {
                *c = Clock {
                    content,
                    since_ms: now_ms,
                }
            }
            None => {
                self.files.insert(
                    file.to_string(),
                    Clock {
                        content,
                        since_ms: now_ms,
                    },
                );
            }
        }
    }

    /// When the file's current state will have lasted the grace: objects it
    /// lost are deleted at or after this time. A file never observed is due
    /// at once.
    pub fn due_ms(&self, file: &str) -> u64 {
        self.files
            .get(file)
            .map_or(0, |c| c.since_ms.saturating_add(self.grace_ms))
    }

    /// Whether the file was gone in the last scan.
    pub fn gone(&self, file: &str) -> bool {
        self.files.get(file).is_some_and(|c| c.content.is_none())
    }

    /// Forgets files `keep` says nothing depends on.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.files.retain(|f, _| keep(f));
    }

    /// Files tracked (for tests and bounds).
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// No file tracked.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_restarts_on_every_change() {
        let mut c = FileClocks::new(Duration::from_secs(2));
        c.observe([("a", [1; 32])], [], 1000);
        assert_eq!(c.due_ms("a"), 3000);
        c.observe([("a", [1; 32])], [], 2500);
        assert_eq!(c.due_ms("a"), 3000, "same content keeps the clock");
        c.observe([("a", [2; 32])], [], 2600);
        assert_eq!(c.due_ms("a"), 4600);
        c.observe([], ["a"], 2700);
        assert!(c.gone("a"));
        assert_eq!(c.due_ms("a"), 4700);
        c.observe([], ["a"], 4000);
        assert_eq!(c.due_ms("a"), 4700, "still gone keeps the clock");
        c.observe([("a", [2; 32])], ["a"], 4100);
        assert!(!c.gone("a"));
        assert_eq!(c.due_ms("a"), 6100, "back again is a change");
        assert_eq!(c.due_ms("never-seen"), 0);
        c.retain(|_| false);
        assert!(c.is_empty());
    }

    #[test]
    fn zero_grace_is_due_at_once() {
        let mut c = FileClocks::new(Duration::ZERO);
        c.observe([("a", [1; 32])], [], 1000);
        assert_eq!(c.due_ms("a"), 1000);
    }
}
