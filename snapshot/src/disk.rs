//! A subscriber's disk copy: the snapshot it serves, kept so a restart with
//! the operator away still routes. Written per change in O(change): a base
//! file (a whole snapshot, replaced atomically) and a journal beside it
//! (`<path>.journal`) of the deltas applied since, each appended and synced
//! before the subscriber acknowledges it.
//!
//! Journal records are `[u32 LE length][u32 LE CRC-32 of the payload][payload:
//! an encoded SnapshotDelta]`. Loading replays records onto the base while
//! each one's `base` is the version reached so far; it stops at the first
//! torn, corrupt or unchained record (a crash mid-append, or a journal left
//! from an older base), and the next append first cuts the journal there.
//! Because every record names the version it applies to, a crash between
//! replacing the base and emptying the journal is harmless: the old records
//! no longer chain.
//!
//! Compaction: when the journal outgrows half the base (plus
//! [`JOURNAL_SLACK`]), the next save writes a new base and empties the
//! journal, so the journal's replay stays shorter than the base's decode and
//! the cost per change stays O(change) amortized.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use prost::Message;
use tracing::warn;

use crate::held::Held;
use crate::pb;

/// Journal bytes allowed beyond half the base before compaction, so small
/// snapshots are not rewritten on every change.
pub const JOURNAL_SLACK: u64 = 256 * 1024;
/// Largest journal record accepted on load (a delta is at most one message).
const MAX_RECORD: u32 = crate::MAX_MESSAGE_BYTES as u32;

/// What a caller runs on each loaded snapshot (see `client::subscribe`).
pub type Validate = dyn Fn(&Held) -> Result<(), String> + Send + Sync;

/// The disk copy at one path. Not shared between processes: one subscriber
/// writes it.
#[derive(Debug)]
pub struct DiskCopy {
    path: PathBuf,
    journal_path: PathBuf,
    /// The version base + journal hold, when this instance knows it (after
    /// a load or a save); a delta is appended only onto exactly this.
    head: Option<pb::Version>,
    base_bytes: u64,
    /// Bytes of valid records; anything after is cut before the next append.
    journal_bytes: u64,
    journal: Option<File>,
}

/// How a save went, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// A journal record was appended.
    Appended,
    /// The base was rewritten and the journal emptied.
    Rewrote,
}

impl DiskCopy {
    /// The disk copy at `path` (nothing is read or written yet).
    pub fn new(path: &Path) -> Self {
        let mut journal_path = path.as_os_str().to_owned();
        journal_path.push(".journal");
        DiskCopy {
            path: path.to_path_buf(),
            journal_path: PathBuf::from(journal_path),
            head: None,
            base_bytes: 0,
            journal_bytes: 0,
            journal: None,
        }
    }

    /// The base file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The journal file.
    pub fn journal_path(&self) -> &Path {
        &self.journal_path
    }

    /// Reads base and journal: `None` if there is no base; an error if the
    /// base does not decode, has no version, fails the consistency check or
    /// is refused by `validate`. Journal records are checked as they are
    /// replayed (O(change) each); replay stops at the first that does not
    /// chain or apply.
    pub fn load(&mut self, validate: &Validate) -> Result<Option<Held>> {
        self.head = None;
        self.journal = None;
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        self.base_bytes = bytes.len() as u64;
        // Leases are decoded one at a time into the table (the bytes are
        // shared, not copied, while the lazy message is decoded).
        let base = Held::decode(prost::bytes::Bytes::from(bytes)).map_err(|e| anyhow!("{e}"))?;
        let (mut held, replayed, valid) = self.replay(base)?;
        self.journal_bytes = valid;
        if replayed > 0 {
            tracing::debug!(replayed, path = %self.journal_path.display(), "journal replayed onto the disk copy");
        }
        held.change = None;
        validate(&held).map_err(|e| anyhow!("refused: {e}"))?;
        self.head = Some(held.version);
        Ok(Some(held))
    }

    /// Applies the journal's chained records; returns the result, how many
    /// applied, and the byte length of the valid prefix.
    fn replay(&self, mut held: Held) -> Result<(Held, usize, u64)> {
        let journal = match std::fs::read(&self.journal_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((held, 0, 0)),
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", self.journal_path.display()));
            }
        };
        let mut at = 0usize;
        let mut applied = 0;
        while let Some((payload, next)) = record_at(&journal, at) {
            let Ok(d) = pb::SnapshotDelta::decode(payload) else {
                break;
            };
            if d.base != Some(held.version) || d.version.is_none() {
                break;
            }
            match held.apply(&d) {
                Ok(n) => held = n,
                Err(e) => {
                    warn!(path = %self.journal_path.display(), "journal record does not apply ({e}); ignoring the rest");
                    break;
                }
            }
            applied += 1;
            at = next;
        }
        if at < journal.len() {
            warn!(
                path = %self.journal_path.display(),
                kept = at,
                dropped = journal.len() - at,
                "the journal's tail is torn or from an older base; it is cut at the next save"
            );
        }
        Ok((held, applied, at as u64))
    }

    /// Keeps `held` (already checked). When `delta` leads from the version
    /// held on disk to it and the journal is small enough, appends the delta;
    /// otherwise rewrites the base. Synced before return.
    pub fn save(&mut self, held: &Held, delta: Option<&pb::SnapshotDelta>) -> Result<Saved> {
        let appendable = delta.filter(|d| {
            self.head.is_some()
                && d.base == self.head
                && d.version == Some(held.version)
                && self.journal_bytes <= self.base_bytes / 2 + JOURNAL_SLACK
        });
        let result = match appendable {
            Some(d) => self.append(d).map(|()| Saved::Appended),
            None => self.rewrite(held).map(|()| Saved::Rewrote),
        };
        match &result {
            Ok(_) => self.head = Some(held.version),
            // Unknown state on disk: the next save rewrites the base.
            Err(_) => {
                self.head = None;
                self.journal = None;
            }
        }
        result
    }

    fn append(&mut self, d: &pb::SnapshotDelta) -> Result<()> {
        let payload = d.encode_to_vec();
        let len = u32::try_from(payload.len()).context("delta too large for the journal")?;
        let mut record = Vec::with_capacity(payload.len() + 8);
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        record.extend_from_slice(&payload);
        let shown = self.journal_path.display().to_string();
        if self.journal.is_none() {
            let mut opts = OpenOptions::new();
            opts.write(true).create(true).truncate(false);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let f = opts
                .open(&self.journal_path)
                .with_context(|| format!("opening {shown}"))?;
            self.journal = Some(f);
        }
        let f = self.journal.as_mut().context("journal not open")?;
        // Cut a torn or stale tail so the new record follows valid ones.
        f.set_len(self.journal_bytes)
            .with_context(|| format!("truncating {shown}"))?;
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(self.journal_bytes))
            .with_context(|| format!("seeking {shown}"))?;
        f.write_all(&record)
            .and_then(|()| f.sync_data())
            .with_context(|| format!("appending to {shown}"))?;
        self.journal_bytes += record.len() as u64;
        Ok(())
    }

    fn rewrite(&mut self, held: &Held) -> Result<()> {
        let bytes = held
            .table
            .encode_snapshot(Some(held.version), held.generated_unix_ms);
        write_atomic(&self.path, &bytes)?;
        self.base_bytes = bytes.len() as u64;
        // Old records no longer chain onto the new base; emptying the journal
        // only saves replay time and space.
        self.journal = None;
        match std::fs::remove_file(&self.journal_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("removing {}", self.journal_path.display()));
            }
        }
        self.journal_bytes = 0;
        Ok(())
    }

    /// Removes base and journal (a copy that could not be kept current must
    /// not outlive the process: it could bring back settled leases).
    pub fn remove(&mut self) -> Result<()> {
        self.head = None;
        self.journal = None;
        self.journal_bytes = 0;
        for p in [&self.path, &self.journal_path] {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
            }
        }
        Ok(())
    }
}

/// The record at `at`: its payload and where the next begins; `None` when
/// torn or corrupt.
fn record_at(journal: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let head = journal.get(at..at.checked_add(8)?)?;
    let len = u32::from_le_bytes(head[0..4].try_into().ok()?);
    let crc = u32::from_le_bytes(head[4..8].try_into().ok()?);
    if len > MAX_RECORD {
        return None;
    }
    let start = at + 8;
    let end = start.checked_add(len as usize)?;
    let payload = journal.get(start..end)?;
    (crc32fast::hash(payload) == crc).then_some((payload, end))
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the
/// new file: temp file in the same directory, fsync, rename, fsync the
/// directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique: a subscriber being replaced may still be finishing a write.
    let tmp = dir.join(format!(
        ".{name}.{}.{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    let written = (|| {
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        drop(f);
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::delta;
    use proptest::prelude::*;

    /// The pb::Snapshot-level tests save what a subscriber would hold.
    fn h(s: &pb::Snapshot) -> Held {
        Held::from_snapshot(s.clone()).unwrap()
    }

    /// What a new instance loads from `path` (which must hold a copy).
    fn reload(path: &Path) -> pb::Snapshot {
        DiskCopy::new(path)
            .load(&ok)
            .unwrap()
            .unwrap()
            .to_snapshot()
    }

    fn ok(_: &Held) -> Result<(), String> {
        Ok(())
    }

    fn lease(i: u8, ip: u8) -> pb::Lease {
        pb::Lease {
            namespace: "d".into(),
            name: format!("l{i}"),
            lease_hash: vec![i; 32],
            user: format!("u{i}"),
            ip: format!("10.0.0.{ip}"),
            pool: "p".into(),
            access_keys: vec![pb::AccessKey {
                openssh: "ssh-ed25519 AAAA".into(),
                fingerprint: format!("SHA256:{i}"),
            }],
            target: Some(pb::lease::Target::Address("127.0.0.1:22".into())),
            ..Default::default()
        }
    }

    /// Version `v` holding lease `i` at IP `ip` for each `(i, ip)`.
    fn snap(v: u64, leases: &[(u8, u8)]) -> pb::Snapshot {
        let mut s = pb::Snapshot {
            version: Some(pb::Version::new(1, v)),
            leases: leases.iter().map(|&(i, ip)| lease(i, ip)).collect(),
            ..Default::default()
        };
        delta::normalize(&mut s);
        s
    }

    fn save_all(disk: &mut DiskCopy, snaps: &[pb::Snapshot]) -> Vec<Saved> {
        let mut out = vec![disk.save(&h(&snaps[0]), None).unwrap()];
        for w in snaps.windows(2) {
            out.push(
                disk.save(&h(&w[1]), Some(&delta::diff(&w[0], &w[1])))
                    .unwrap(),
            );
        }
        out
    }

    #[test]
    fn deltas_are_appended_and_a_restart_replays_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.pb");
        let snaps = [
            snap(1, &[(1, 1), (2, 2)]),
            snap(2, &[(1, 1), (2, 3)]),
            snap(3, &[(2, 3), (3, 1)]),
        ];
        let mut disk = DiskCopy::new(&path);
        let saved = save_all(&mut disk, &snaps);
        assert_eq!(saved, [Saved::Rewrote, Saved::Appended, Saved::Appended]);
        let base = std::fs::read(&path).unwrap();
        assert_eq!(
            pb::Snapshot::decode(base.as_slice()).unwrap(),
            snaps[0],
            "the base is not rewritten per delta"
        );
        assert_eq!(reload(&path), snaps[2]);
        // A full snapshot replaces base and journal.
        let full = snap(9, &[(4, 4)]);
        assert_eq!(disk.save(&h(&full), None).unwrap(), Saved::Rewrote);
        assert!(!disk.journal_path().exists());
        assert_eq!(reload(&path), full);
    }

    #[test]
    fn a_torn_tail_is_dropped_and_cut_before_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.pb");
        let snaps = [snap(1, &[(1, 1)]), snap(2, &[(1, 2)]), snap(3, &[(1, 3)])];
        save_all(&mut DiskCopy::new(&path), &snaps);
        let journal = DiskCopy::new(&path).journal_path().to_path_buf();
        let len = std::fs::metadata(&journal).unwrap().len();
        // A crash mid-append: the last record is cut short.
        let f = OpenOptions::new().write(true).open(&journal).unwrap();
        f.set_len(len - 3).unwrap();
        drop(f);
        let mut disk = DiskCopy::new(&path);
        assert_eq!(disk.load(&ok).unwrap().unwrap().to_snapshot(), snaps[1]);
        // The next append follows the last good record, not the torn bytes.
        let next = snap(4, &[(1, 4)]);
        let d = delta::diff(&snaps[1], &next);
        assert_eq!(disk.save(&h(&next), Some(&d)).unwrap(), Saved::Appended);
        assert_eq!(reload(&path), next);
    }

    #[test]
    fn a_corrupt_record_stops_the_replay_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.pb");
        let snaps = [snap(1, &[(1, 1)]), snap(2, &[(1, 2)]), snap(3, &[(1, 3)])];
        save_all(&mut DiskCopy::new(&path), &snaps);
        let journal = DiskCopy::new(&path).journal_path().to_path_buf();
        let mut bytes = std::fs::read(&journal).unwrap();
        // Flip a payload byte of the first record: its CRC no longer holds.
        bytes[10] ^= 0xff;
        std::fs::write(&journal, bytes).unwrap();
        assert_eq!(reload(&path), snaps[0]);
    }

    #[test]
    fn records_of_an_older_base_do_not_chain_onto_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.pb");
        let snaps = [snap(1, &[(1, 1)]), snap(2, &[(1, 2)])];
        save_all(&mut DiskCopy::new(&path), &snaps);
        // A crash between replacing the base and removing the journal.
        let newer = snap(5, &[(7, 7)]);
        write_atomic(&path, &newer.encode_to_vec()).unwrap();
        assert_eq!(reload(&path), newer);
    }

    #[test]
    fn the_journal_is_compacted_once_it_outgrows_half_the_base() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.pb");
        let mut disk = DiskCopy::new(&path);
        let mut prev = snap(1, &[(1, 1)]);
        disk.save(&h(&prev), None).unwrap();
        let mut rewrites = 0;
        // Each delta is tens of bytes; JOURNAL_SLACK is 256 KiB.
        for v in 2..20_000u64 {
            let next = snap(v, &[(1, (v % 200) as u8 + 1)]);
            if disk
                .save(&h(&next), Some(&delta::diff(&prev, &next)))
                .unwrap()
                == Saved::Rewrote
            {
                rewrites += 1;
            }
            prev = next;
        }
        assert!(rewrites >= 1, "never compacted");
        assert!(disk.journal_bytes <= disk.base_bytes / 2 + JOURNAL_SLACK + 1024);
        assert_eq!(reload(&path), prev);
    }

    #[test]
    fn a_delta_not_from_the_version_on_disk_rewrites_the_base() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.pb");
        let a = snap(1, &[(1, 1)]);
        let b = snap(2, &[(1, 2)]);
        let c = snap(3, &[(1, 3)]);
        let mut disk = DiskCopy::new(&path);
        disk.save(&h(&a), None).unwrap();
        // The delta claims base b, but the disk holds a.
        assert_eq!(
            disk.save(&h(&c), Some(&delta::diff(&b, &c))).unwrap(),
            Saved::Rewrote
        );
        assert_eq!(reload(&path), c);
        // A fresh instance that did not load knows nothing: it rewrites too.
        let d = snap(4, &[(1, 4)]);
        assert_eq!(
            DiskCopy::new(&path)
                .save(&h(&d), Some(&delta::diff(&c, &d)))
                .unwrap(),
            Saved::Rewrote
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random edits, random restarts (a new instance that loads), and a
        /// crash that tears the journal at a random byte: the copy always
        /// loads, as the last saved version or (torn) an earlier saved one.
        #[test]
        fn the_disk_copy_loads_a_version_that_was_saved(
            steps in proptest::collection::vec(
                (proptest::collection::btree_map(0u8..12, 1u8..30, 0..8), any::<bool>()),
                1..40,
            ),
            tear in any::<proptest::sample::Index>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("snapshot.pb");
            let mut disk = DiskCopy::new(&path);
            let mut saved: Vec<pb::Snapshot> = Vec::new();
            for (i, (leases, restart)) in steps.into_iter().enumerate() {
                if restart {
                    disk = DiskCopy::new(&path);
                    let loaded = disk.load(&ok).unwrap().map(|h| h.to_snapshot());
                    prop_assert_eq!(loaded.as_ref(), saved.last());
                }
                let leases: Vec<(u8, u8)> = leases.into_iter().collect();
                let next = snap(i as u64 + 1, &leases);
                let d = saved.last().map(|p| delta::diff(p, &next));
                disk.save(&h(&next), d.as_ref()).unwrap();
                saved.push(next);
            }
            let last = DiskCopy::new(&path).load(&ok).unwrap().map(|h| h.to_snapshot());
            prop_assert_eq!(last.as_ref(), saved.last());
            if let Ok(len) = std::fs::metadata(disk.journal_path()).map(|m| m.len()) {
                let cut = tear.index(usize::try_from(len).unwrap().max(1)) as u64;
                let f = OpenOptions::new().write(true).open(disk.journal_path()).unwrap();
                f.set_len(cut).unwrap();
                drop(f);
                let loaded = reload(&path);
                prop_assert!(saved.contains(&loaded));
            }
        }
    }
}
