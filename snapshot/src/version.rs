//! Ordering and display of snapshot versions: epoch first, then version.
//!
//! The epoch is the writer's: it grows across operator restarts and failovers,
//! so `(epoch, version)` never goes backwards even though each writer counts
//! its versions from 1.

use std::cmp::Ordering;
use std::fmt;

use crate::pb::Version;

impl Ord for Version {
    /// Lexicographic: epoch first, then version.
    fn cmp(&self, other: &Self) -> Ordering {
        (self.epoch, self.version).cmp(&(other.epoch, other.version))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    /// `e<epoch>.v<version>`, e.g. `e3.v17`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}.v{}", self.epoch, self.version)
    }
}

impl Version {
    /// A version from its two parts.
    pub const fn new(epoch: u64, version: u64) -> Self {
        Version { epoch, version }
    }

    /// `self` is strictly newer than `other` (epoch first).
    pub fn is_newer_than(&self, other: &Version) -> bool {
        self > other
    }
}

/// `a` is strictly newer than `b`; anything is newer than nothing.
pub fn is_newer(a: &Version, b: Option<&Version>) -> bool {
    b.is_none_or(|b| a.is_newer_than(b))
}

/// Display for an optional version: the version, or `none`.
pub fn show_opt(v: Option<&Version>) -> String {
    v.map_or_else(|| "none".to_string(), Version::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_before_version() {
        let old_writer_late = Version::new(1, 900);
        let new_writer_early = Version::new(2, 1);
        assert!(new_writer_early.is_newer_than(&old_writer_late));
        assert!(!old_writer_late.is_newer_than(&new_writer_early));
        assert!(Version::new(2, 2).is_newer_than(&Version::new(2, 1)));
        assert!(!Version::new(2, 1).is_newer_than(&Version::new(2, 1)));
        let mut vs = vec![Version::new(2, 1), Version::new(1, 9), Version::new(1, 10)];
        vs.sort();
        assert_eq!(
            vs,
            vec![Version::new(1, 9), Version::new(1, 10), Version::new(2, 1)]
        );
    }

    #[test]
    fn displays_as_epoch_dot_version() {
        assert_eq!(Version::new(3, 17).to_string(), "e3.v17");
        assert_eq!(show_opt(None), "none");
        assert_eq!(show_opt(Some(&Version::new(0, 1))), "e0.v1");
    }

    #[test]
    fn anything_is_newer_than_nothing() {
        assert!(is_newer(&Version::new(0, 0), None));
        assert!(!is_newer(&Version::new(1, 1), Some(&Version::new(1, 1))));
    }
}
