//! The state database, `DIR/.keyway/state.db`: SQLite in WAL mode, one row per
//! pool, lease, route and event, plus a few metadata rows (format, epoch,
//! problems, the last published snapshot).
//!
//! The operator is the only writer. It keeps the whole [`StateFile`] in
//! memory, notes in [`Changes`] which rows a round touched, and
//! [`Store::commit`] writes exactly those rows in one transaction with
//! `synchronous=FULL`: a round costs what changed, and a crash (kill -9, power
//! loss) leaves the last committed round, never half of one. Readers
//! (`status`, the `keyway` CLI) see a consistent committed state while the
//! operator writes, because WAL readers never block on the writer.
//!
//! Each row holds its record as JSON (the shapes in [`crate::records`]), so a
//! record's fields can grow without a schema migration; rows are keyed the way
//! [`StateFile`]'s maps are (`name` for pools, `namespace/name` otherwise).
//!
//! A directory written by a release before the database has
//! `.keyway/state.json`; [`Store::open`] imports it once, in one transaction,
//! and renames it to `state.json.imported`.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::paths::Paths;
use crate::records::StateFile;

/// Format of the state; a database of another format is refused, not guessed.
/// (Format 1 was the JSON state file, which is imported.)
pub const FORMAT: u32 = 2;

/// How long a reader or the writer waits for the other's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta   (key  TEXT PRIMARY KEY, value  TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pools  (name TEXT PRIMARY KEY, record TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (key  TEXT PRIMARY KEY, record TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS routes (key  TEXT PRIMARY KEY, record TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (seq  INTEGER PRIMARY KEY, record TEXT NOT NULL);
";

/// Which parts of a [`StateFile`] a round changed, so [`Store::commit`]
/// writes only those. A key in `pools`, `leases` or `routes` is written when
/// the state has it and deleted when it does not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Pools by name.
    pub pools: BTreeSet<String>,
    /// Leases by `namespace/name`.
    pub leases: BTreeSet<String>,
    /// Routes by `namespace/name`.
    pub routes: BTreeSet<String>,
    /// How many events were appended at the end of `StateFile::events`.
    pub events: usize,
    /// The problem list changed.
    pub problems: bool,
    /// The snapshot record changed.
    pub snapshot: bool,
    /// The epoch changed.
    pub epoch: bool,
}

impl Changes {
    /// Every row of `state`: what a first save or an import writes.
    pub fn everything(state: &StateFile) -> Self {
        Changes {
            pools: state.pools.keys().cloned().collect(),
            leases: state.leases.keys().cloned().collect(),
            routes: state.routes.keys().cloned().collect(),
            events: state.events.len(),
            problems: true,
            snapshot: true,
            epoch: true,
        }
    }

    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self == &Changes::default()
    }

    /// Rows this would write or delete (for logs and metrics).
    pub fn rows(&self) -> usize {
        self.pools.len()
            + self.leases.len()
            + self.routes.len()
            + self.events
            + usize::from(self.problems)
            + usize::from(self.snapshot)
            + usize::from(self.epoch)
    }

    /// Adds `other`'s changes (a round that did not commit joins the next).
    pub fn absorb(&mut self, other: Changes) {
        self.pools.extend(other.pools);
        self.leases.extend(other.leases);
        self.routes.extend(other.routes);
        self.events += other.events;
        self.problems |= other.problems;
        self.snapshot |= other.snapshot;
        self.epoch |= other.epoch;
    }
}

/// An open state database.
pub struct Store {
    conn: Connection,
    path: std::path::PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the database of `paths` for the operator,
    /// the one writer, importing a legacy `state.json` if that is all there
    /// is. The state directory must exist.
    pub fn open(paths: &Paths) -> Result<Self> {
        let path = paths.database();
        let conn = Connection::open(&path)
            .with_context(|| format!("opening the state database {}", path.display()))?;
        let mut store = Store { conn, path };
        store.configure_writer()?;
        // No format row and no objects: new, or an initialization that did
        // not commit (its transaction left nothing behind).
        if store.format()?.is_none() && store.is_empty()? {
            store.initialize(paths)?;
        }
        store.check_format()?;
        Ok(store)
    }

    /// Opens an existing database to read it; `None` when there is none.
    /// Reading never blocks the operator, and sees its last committed round.
    pub fn open_existing(paths: &Paths) -> Result<Option<Self>> {
        let path = paths.database();
        if !path.exists() {
            return Ok(None);
        }
        // Read-write without create: a WAL reader needs the shared-memory
        // file, which a read-only handle could not create if it is missing.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&path, flags)
            .or_else(|_| {
                Connection::open_with_flags(
                    &path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
            })
            .with_context(|| format!("opening the state database {}", path.display()))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .context("setting the busy timeout")?;
        let store = Store { conn, path };
        store.check_format()?;
        Ok(Some(store))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn configure_writer(&self) -> Result<()> {
        let ctx = || format!("configuring {}", self.path.display());
        self.conn.busy_timeout(BUSY_TIMEOUT).with_context(ctx)?;
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .with_context(ctx)?;
        if !mode.eq_ignore_ascii_case("wal") {
            bail!("{}: SQLite refused WAL mode ({mode})", self.path.display());
        }
        // FULL: a committed round survives power loss, not only a crash.
        self.conn
            .pragma_update(None, "synchronous", "FULL")
            .with_context(ctx)?;
        // A checkpoint resets the WAL but never shrinks the file: the first
        // round writes every row, and the WAL would keep that size forever.
        self.conn
            .pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)
            .with_context(ctx)?;
        self.conn.execute_batch(SCHEMA).with_context(ctx)?;
        Ok(())
    }

    fn initialize(&mut self, paths: &Paths) -> Result<()> {
        let legacy = paths.legacy_state();
        let imported = match std::fs::read(&legacy) {
            Ok(bytes) => Some(
                serde_json::from_slice::<StateFile>(&bytes).with_context(|| {
                    format!(
                        "{} is corrupt; it holds every allocation, so it is not imported or \
                     overwritten. Fix or move it away (all IPs are then allocated afresh)",
                        legacy.display()
                    )
                })?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", legacy.display())),
        };
        let mut state = imported.clone().unwrap_or_default();
        if let Some(old) = &imported
            && old.format != 1
        {
            bail!(
                "{} has format {}, this operator imports format 1",
                legacy.display(),
                old.format
            );
        }
        state.format = FORMAT;
        self.commit(&state, &Changes::everything(&state))?;
        if imported.is_some() {
            let to = legacy.with_extension("json.imported");
            std::fs::rename(&legacy, &to)
                .with_context(|| format!("renaming {} to {}", legacy.display(), to.display()))?;
        }
        Ok(())
    }

    fn format(&self) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = 'format'", [], |r| {
                r.get(0)
            })
            .optional()
            .with_context(|| format!("reading {}", self.path.display()))
    }

    fn is_empty(&self) -> Result<bool> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM pools) + (SELECT COUNT(*) FROM leases) \
                 + (SELECT COUNT(*) FROM routes)",
                [],
                |r| r.get(0),
            )
            .with_context(|| format!("reading {}", self.path.display()))?;
        Ok(n == 0)
    }

    fn check_format(&self) -> Result<()> {
        match self.format()?.as_deref() {
            Some(f) if f == FORMAT.to_string() => Ok(()),
            Some(f) => bail!(
                "{} has format {f}, this program reads format {FORMAT}",
                self.path.display()
            ),
            None => bail!(
                "{} is not a Keyway state database (no format row); it is not overwritten",
                self.path.display()
            ),
        }
    }

    /// Just the record of the snapshot last published (no objects read):
    /// what a watcher polls cheaply, whatever the object count.
    pub fn snapshot_record(&self) -> Result<Option<crate::records::SnapshotRecord>> {
        let path = self.path.display().to_string();
        let value: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'snapshot'", [], |r| {
                r.get(0)
            })
            .optional()
            .with_context(|| format!("reading the snapshot record from {path}"))?;
        match value {
            Some(v) => decode(&path, "snapshot", &v),
            None => Ok(None),
        }
    }

    /// Reads the whole state, as of the last committed round.
    pub fn load(&mut self) -> Result<StateFile> {
        let path = self.path.display().to_string();
        let tx = self
            .conn
            .transaction()
            .with_context(|| format!("reading {path}"))?;
        let meta = |key: &str| -> Result<Option<String>> {
            tx.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
                .with_context(|| format!("reading {key} from {path}"))
        };
        let mut state = StateFile {
            format: FORMAT,
            ..Default::default()
        };
        if let Some(e) = meta("epoch")? {
            state.epoch = e
                .parse()
                .with_context(|| format!("{path}: the epoch {e:?} is not a number"))?;
        }
        if let Some(p) = meta("problems")? {
            state.problems = decode(&path, "problems", &p)?;
        }
        if let Some(s) = meta("snapshot")? {
            state.snapshot = decode(&path, "snapshot", &s)?;
        }
        for (table, key) in [("pools", "name"), ("leases", "key"), ("routes", "key")] {
            let mut stmt = tx
                .prepare(&format!("SELECT {key}, record FROM {table}"))
                .with_context(|| format!("reading {table} from {path}"))?;
            let mut rows = stmt
                .query([])
                .with_context(|| format!("reading {table} from {path}"))?;
            while let Some(row) = rows
                .next()
                .with_context(|| format!("reading {table} from {path}"))?
            {
                let k: String = row.get(0)?;
                let text: String = row.get(1)?;
                let what = format!("{table} row {k:?}");
                match table {
                    "pools" => {
                        state.pools.insert(k, decode(&path, &what, &text)?);
                    }
                    "leases" => {
                        state.leases.insert(k, decode(&path, &what, &text)?);
                    }
                    _ => {
                        state.routes.insert(k, decode(&path, &what, &text)?);
                    }
                }
            }
        }
        let mut stmt = tx
            .prepare("SELECT seq, record FROM events ORDER BY seq")
            .with_context(|| format!("reading events from {path}"))?;
        let mut rows = stmt
            .query([])
            .with_context(|| format!("reading events from {path}"))?;
        while let Some(row) = rows
            .next()
            .with_context(|| format!("reading events from {path}"))?
        {
            let seq: i64 = row.get(0)?;
            let text: String = row.get(1)?;
            state
                .events
                .push(decode(&path, &format!("event {seq}"), &text)?);
        }
        drop(rows);
        drop(stmt);
        tx.finish().with_context(|| format!("reading {path}"))?;
        Ok(state)
    }

    /// Writes the rows `changes` names, as `state` has them, in one
    /// transaction; the events table keeps as many events as `state` does.
    pub fn commit(&mut self, state: &StateFile, changes: &Changes) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let path = self.path.display().to_string();
        let ctx = || format!("writing {path}");
        let tx = self.conn.transaction().with_context(ctx)?;
        {
            let mut meta = tx
                .prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")
                .with_context(ctx)?;
            meta.execute(params!["format", FORMAT.to_string()])
                .with_context(ctx)?;
            if changes.epoch {
                meta.execute(params!["epoch", state.epoch.to_string()])
                    .with_context(ctx)?;
            }
            if changes.problems {
                meta.execute(params!["problems", encode(&state.problems)?])
                    .with_context(ctx)?;
            }
            if changes.snapshot {
                meta.execute(params!["snapshot", encode(&state.snapshot)?])
                    .with_context(ctx)?;
            }
            write_rows(&tx, "pools", "name", &changes.pools, |k| {
                state.pools.get(k).map(encode).transpose()
            })?;
            write_rows(&tx, "leases", "key", &changes.leases, |k| {
                state.leases.get(k).map(encode).transpose()
            })?;
            write_rows(&tx, "routes", "key", &changes.routes, |k| {
                state.routes.get(k).map(encode).transpose()
            })?;
            let new = changes.events.min(state.events.len());
            if new > 0 {
                let mut ins = tx
                    .prepare_cached("INSERT INTO events (record) VALUES (?1)")
                    .with_context(ctx)?;
                for e in &state.events[state.events.len() - new..] {
                    ins.execute([encode(e)?]).with_context(ctx)?;
                }
            }
            let keep = i64::try_from(state.events.len()).unwrap_or(i64::MAX);
            tx.execute(
                "DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?1",
                [keep],
            )
            .with_context(ctx)?;
        }
        tx.commit().with_context(ctx)?;
        Ok(())
    }
}

fn write_rows(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    key: &str,
    keys: &BTreeSet<String>,
    value: impl Fn(&str) -> Result<Option<String>>,
) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let ctx = || format!("writing {table}");
    let mut put = tx
        .prepare_cached(&format!(
            "INSERT OR REPLACE INTO {table} ({key}, record) VALUES (?1, ?2)"
        ))
        .with_context(ctx)?;
    let mut del = tx
        .prepare_cached(&format!("DELETE FROM {table} WHERE {key} = ?1"))
        .with_context(ctx)?;
    for k in keys {
        match value(k)? {
            Some(v) => put.execute(params![k, v]).with_context(ctx)?,
            None => del.execute([k]).with_context(ctx)?,
        };
    }
    Ok(())
}

fn encode<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).context("encoding a state record")
}

fn decode<T: DeserializeOwned>(path: &str, what: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).with_context(|| {
        format!(
            "{path}: {what} is corrupt; the database holds every allocation, so it is not \
             overwritten. Fix or move it away (all IPs are then allocated afresh)"
        )
    })
}

/// Reads the state of a local-mode directory as `status` and the CLI do:
/// from the database, or from a legacy `state.json` an older operator wrote;
/// `None` when the directory has neither.
pub fn read(paths: &Paths) -> Result<Option<StateFile>> {
    if let Some(mut store) = Store::open_existing(paths)? {
        return store.load().map(Some);
    }
    let legacy = paths.legacy_state();
    match std::fs::read(&legacy) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is corrupt", legacy.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", legacy.display())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::records::{EventRecord, LeaseRecord, PoolRecord, Problem};

    fn lease(ns: &str, name: &str, ip: Option<&str>) -> LeaseRecord {
        LeaseRecord {
            namespace: ns.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            created_ms: 1,
            file: "leases.yaml".into(),
            generation: 1,
            seen_spec: crate::SeenSpec::new(&serde_json::json!({"user": "alice"})),
            spec: None,
            status: keyway_crds::VMLeaseStatus {
                ip: ip.map(str::to_string),
                ..Default::default()
            },
        }
    }

    fn event(n: usize) -> EventRecord {
        EventRecord {
            time: "2026-12-04T00:00:00Z".into(),
            severity: "Normal".into(),
            reason: "Allocated".into(),
            object: format!("VMLease default/{n}"),
            message: format!("event {n}"),
        }
    }

    fn dir() -> (tempfile::TempDir, Paths) {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        crate::paths::ensure_state_dir(&paths).unwrap();
        (d, paths)
    }

    fn sample() -> StateFile {
        let mut st = StateFile {
            format: FORMAT,
            epoch: 7,
            ..Default::default()
        };
        st.pools.insert(
            "p".into(),
            PoolRecord {
                name: "p".into(),
                created_ms: 1,
                file: "p.yaml".into(),
                generation: 1,
                seen_spec: crate::SeenSpec::new(&serde_json::json!({})),
                spec: None,
                status: Default::default(),
            },
        );
        for i in 0..3 {
            let l = lease("default", &format!("vm{i}"), Some("127.0.10.1"));
            st.leases.insert(format!("default/vm{i}"), Box::new(l));
        }
        st.problems.push(Problem {
            file: "bad.yaml".into(),
            document: Some(1),
            object: None,
            field: None,
            message: "broken".into(),
        });
        st.events = (0..5).map(event).collect();
        st
    }

    #[test]
    fn a_commit_of_everything_reads_back_the_same() {
        let (_d, paths) = dir();
        let st = sample();
        let mut store = Store::open(&paths).unwrap();
        store.commit(&st, &Changes::everything(&st)).unwrap();
        drop(store);
        assert_eq!(read(&paths).unwrap().unwrap(), st);
        assert_eq!(Store::open(&paths).unwrap().load().unwrap(), st);
    }

    #[test]
    fn a_commit_writes_only_the_rows_it_names() {
        let (_d, paths) = dir();
        let mut st = sample();
        let mut store = Store::open(&paths).unwrap();
        store.commit(&st, &Changes::everything(&st)).unwrap();

        // vm0 changed but is not named: not written. vm1 named and changed:
        // written. vm2 removed and named: deleted.
        st.leases.get_mut("default/vm0").unwrap().status.ip = Some("127.0.10.9".into());
        st.leases.get_mut("default/vm1").unwrap().status.ip = Some("127.0.10.2".into());
        st.leases.remove("default/vm2");
        let changes = Changes {
            leases: ["default/vm1", "default/vm2"]
                .map(String::from)
                .into_iter()
                .collect(),
            ..Default::default()
        };
        store.commit(&st, &changes).unwrap();
        let back = store.load().unwrap();
        assert_eq!(back.leases.len(), 2);
        assert_eq!(
            back.leases["default/vm0"].status.ip.as_deref(),
            Some("127.0.10.1")
        );
        assert_eq!(
            back.leases["default/vm1"].status.ip.as_deref(),
            Some("127.0.10.2")
        );
        assert_eq!(back.epoch, 7);
        assert_eq!(back.problems, st.problems);
    }

    #[test]
    fn events_are_appended_and_the_oldest_dropped_to_the_state_s_count() {
        let (_d, paths) = dir();
        let mut st = sample();
        let mut store = Store::open(&paths).unwrap();
        store.commit(&st, &Changes::everything(&st)).unwrap();
        // Three new events; memory keeps the last five.
        st.events.extend((5..8).map(event));
        st.events.drain(..3);
        store
            .commit(
                &st,
                &Changes {
                    events: 3,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(store.load().unwrap().events, st.events);
        // More appended in one round than memory keeps.
        let new: Vec<EventRecord> = (8..20).map(event).collect();
        st.events = new[new.len() - 5..].to_vec();
        store
            .commit(
                &st,
                &Changes {
                    events: new.len(),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(store.load().unwrap().events, st.events);
    }

    #[test]
    fn a_legacy_state_file_is_imported_once() {
        let (_d, paths) = dir();
        let mut legacy = sample();
        legacy.format = 1;
        std::fs::write(
            paths.legacy_state(),
            serde_json::to_vec_pretty(&legacy).unwrap(),
        )
        .unwrap();
        // Readers see it before any operator imported it.
        assert_eq!(read(&paths).unwrap().unwrap().leases, legacy.leases);
        let mut store = Store::open(&paths).unwrap();
        let back = store.load().unwrap();
        assert_eq!(back.leases, legacy.leases);
        assert_eq!(back.epoch, 7);
        assert_eq!(back.format, FORMAT);
        assert!(!paths.legacy_state().exists());
        assert!(
            paths
                .legacy_state()
                .with_extension("json.imported")
                .exists()
        );
    }

    #[test]
    fn a_corrupt_legacy_file_is_neither_imported_nor_overwritten() {
        let (_d, paths) = dir();
        std::fs::write(paths.legacy_state(), b"{\"format\": 1, \"leases\": {").unwrap();
        let err = format!("{:#}", Store::open(&paths).unwrap_err());
        assert!(err.contains("corrupt"), "{err}");
        assert!(paths.legacy_state().exists());
        // Once it is moved away, the operator starts empty.
        std::fs::remove_file(paths.legacy_state()).unwrap();
        assert!(
            Store::open(&paths)
                .unwrap()
                .load()
                .unwrap()
                .leases
                .is_empty()
        );
    }

    #[test]
    fn a_corrupt_row_is_an_error_naming_it() {
        let (_d, paths) = dir();
        let st = sample();
        let mut store = Store::open(&paths).unwrap();
        store.commit(&st, &Changes::everything(&st)).unwrap();
        store
            .conn
            .execute(
                "UPDATE leases SET record = '{' WHERE key = 'default/vm1'",
                [],
            )
            .unwrap();
        let err = format!("{:#}", store.load().unwrap_err());
        assert!(
            err.contains("leases row \"default/vm1\" is corrupt"),
            "{err}"
        );
    }

    #[test]
    fn another_format_is_refused() {
        let (_d, paths) = dir();
        let store = Store::open(&paths).unwrap();
        store
            .conn
            .execute("UPDATE meta SET value = '99' WHERE key = 'format'", [])
            .unwrap();
        drop(store);
        let err = format!("{:#}", Store::open(&paths).unwrap_err());
        assert!(err.contains("format 99"), "{err}");
        let err = format!("{:#}", read(&paths).unwrap_err());
        assert!(err.contains("format 99"), "{err}");
    }

    #[test]
    fn a_reader_sees_committed_rounds_while_the_writer_holds_the_database() {
        let (_d, paths) = dir();
        let mut st = sample();
        let mut store = Store::open(&paths).unwrap();
        store.commit(&st, &Changes::everything(&st)).unwrap();
        let mut reader = Store::open_existing(&paths).unwrap().unwrap();
        st.leases.insert(
            "default/new".into(),
            Box::new(lease("default", "new", None)),
        );
        store
            .commit(
                &st,
                &Changes {
                    leases: ["default/new".to_string()].into_iter().collect(),
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(reader.load().unwrap().leases.contains_key("default/new"));
    }

    #[test]
    fn a_missing_directory_state_is_none() {
        let (_d, paths) = dir();
        assert!(read(&paths).unwrap().is_none());
        assert!(Store::open_existing(&paths).unwrap().is_none());
    }
}
