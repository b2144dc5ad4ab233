//! What a subscriber serves: a checked snapshot as a [`Table`] (persistent
//! maps, so each version shares structure with the one before), its version,
//! and the delta that led to it from the previous version, so consumers (the
//! proxy's route table) can apply that change instead of re-reading
//! everything. Applying a delta costs O(change · log n), checks included.

use std::sync::Arc;

use crate::pb;
use crate::table::Table;

/// See the module docs.
#[derive(Clone, Debug)]
pub struct Held {
    /// The version served.
    pub version: pb::Version,
    /// When the writer built it (unix ms).
    pub generated_unix_ms: i64,
    /// The content, checked.
    pub table: Table,
    /// The delta from `change.base` to `version`, when this version was
    /// reached by applying one (`None` after a full snapshot or a load).
    pub change: Option<Arc<pb::SnapshotDelta>>,
}

impl Held {
    /// A whole snapshot (it must carry its version), checked.
    pub fn from_snapshot(s: &pb::Snapshot) -> Result<Held, String> {
        let version = s.version.ok_or("the snapshot has no version")?;
        let table = Table::from_snapshot(s)
            .map_err(|e| format!("consistency check failed: {}", summarize(&e)))?;
        Ok(Held {
            version,
            generated_unix_ms: s.generated_unix_ms,
            table,
            change: None,
        })
    }

    /// The version `d` leads to from this one, checked; this one is
    /// unchanged (the table is copied, sharing structure).
    pub fn apply(&self, d: &pb::SnapshotDelta) -> Result<Held, String> {
        if d.base != Some(self.version) {
            return Err(format!(
                "the delta starts from {} but the snapshot is {}",
                crate::version::show_opt(d.base.as_ref()),
                self.version
            ));
        }
        let version = d.version.ok_or("the delta has no version")?;
        let mut table = self.table.clone();
        table
            .apply(d)
            .map_err(|e| format!("consistency check failed: {}", summarize(&e)))?;
        Ok(Held {
            version,
            generated_unix_ms: d.generated_unix_ms,
            table,
            change: Some(Arc::new(d.clone())),
        })
    }

    /// The whole snapshot, copied out (linear: for tests and tools).
    pub fn to_snapshot(&self) -> pb::Snapshot {
        self.table
            .to_snapshot(Some(self.version), self.generated_unix_ms)
    }

    /// Leases held.
    pub fn lease_count(&self) -> usize {
        self.table.lease_count()
    }

    /// Routes held.
    pub fn route_count(&self) -> usize {
        self.table.route_count()
    }
}

/// The first problems and how many more, for a NACK that stays small.
pub(crate) fn summarize(errors: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut out = errors
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if errors.len() > SHOWN {
        out.push_str(&format!(" (and {} more)", errors.len() - SHOWN));
    }
    out
}
