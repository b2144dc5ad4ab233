//! Ordering and display of snapshot versions: epoch first, then version.

use std::cmp::Ordering;

use crate::pb::Version;

/// `(epoch, version)`, the total order of snapshot versions.
pub fn key(v: &Version) -> (u64, u64) {
    (v.epoch, v.version)
}

/// Compares two versions, epoch first.
pub fn cmp(a: &Version, b: &Version) -> Ordering {
    key(a).cmp(&key(b))
}

/// `a` is strictly newer than `b` (anything is newer than nothing).
pub fn is_newer(a: &Version, b: Option<&Version>) -> bool {
    b.is_none_or(|b| cmp(a, b) == Ordering::Greater)
}

/// `e<epoch>.v<version>`.
pub fn show(v: &Version) -> String {
    format!("e{}.v{}", v.epoch, v.version)
}

/// Like [`show`], for an optional version.
pub fn show_opt(v: Option<&Version>) -> String {
    v.map_or_else(|| "none".to_string(), show)
}
