//! Local mode: the operator with no cluster. Objects are YAML files in a
//! directory; status and allocations persist in the SQLite database
//! `DIR/.keyway/state.db` (the `keyway-state` crate).
//!
//! Each round rescans the directory (files are parsed off the loop, see
//! [`scanner`]), admits what changed into the [`World`] (the same pure core
//! cluster mode uses), commits the rows that changed ([`Changes`]) in one
//! transaction, and only then publishes the
//! routing snapshot, so a subscriber never holds a lease a restart would not
//! know. Objects a file lost are deleted only after the edit grace ([`edits`]).
//! Rounds run on file-system events, on finished parses, on subscriber
//! acknowledgements (for `Routed`), when the edit grace of a kept object runs
//! out, and every `rescan` interval as a safety net.

pub mod directory;
pub mod edits;
pub mod loader;
pub mod nesting;
pub mod scanner;
pub mod secrets;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::jiff::Timestamp;
use keyway_crds::validate;
use keyway_snapshot::server::Publisher;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use keyway_core::allocator::LeaseKey;
use keyway_core::routed::{Ack, RoutedTracker};
use keyway_core::world::{Dirty, LeaseObject, PoolObject, RouteObject, Settings, Severity, World};
use keyway_state::{
    Changes, EventRecord, LeaseRecord, Paths, PoolRecord, RouteRecord, SnapshotRecord, StateFile,
    Store, SubscriberRecord,
};
use loader::{FileScan, Kind, ObjKey, Object, Problem};

/// How many events `status` keeps.
const MAX_EVENTS: usize = 300;
/// How long the first round waits for the first parses.
const STARTUP_PARSE_BUDGET: Duration = Duration::from_secs(5);
/// How long file events are gathered before a round runs.
const FS_DEBOUNCE: Duration = Duration::from_millis(20);
/// How soon a round that could not save the state tries again.
const SAVE_RETRY: Duration = Duration::from_secs(1);

/// Options of `keyway-operator run --local DIR`.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// The directory of YAML files.
    pub dir: PathBuf,
    /// Where the snapshot gRPC server listens.
    pub grpc_listen: SocketAddr,
    /// Port users reach the proxy's SSH listener on.
    pub public_ssh_port: u16,
    /// Safety-net rescan interval.
    pub rescan: Duration,
    /// Lifetime of relay certificates.
    pub relay_cert_validity_secs: u32,
    /// How long a file must stay as it is before objects it lost (it became
    /// empty, lost documents, or was removed) are deleted; see [`edits`].
    pub edit_grace: Duration,
}

fn now_ms() -> u64 {
    u64::try_from(Timestamp::now().as_millisecond()).unwrap_or(0)
}

fn lease_key(ns: &str, name: &str) -> LeaseKey {
    LeaseKey {
        namespace: ns.to_string(),
        name: name.to_string(),
    }
}

fn obj_id(kind: Kind, namespace: &str, name: &str) -> ObjKey {
    ObjKey::new(kind, namespace, name)
}

/// The generation an object gets when its spec as read is `seen`: unchanged
/// specs keep theirs, edits bump it, new objects start at 1.
fn next_generation(
    prev: Option<(&keyway_state::SeenSpec, i64)>,
    seen: &keyway_state::SeenSpec,
) -> i64 {
    match prev {
        Some((old, g)) if old == seen => g,
        Some((_, g)) => g + 1,
        None => 1,
    }
}

fn record_key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

fn new_uid() -> String {
    let b = rand::random::<[u8; 16]>();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn problems_of(
    file: &str,
    index: usize,
    id: &ObjKey,
    errs: &validate::FieldErrors,
) -> Vec<Problem> {
    errs.0
        .iter()
        .map(|e| Problem {
            file: file.to_string(),
            document: Some(index),
            object: Some(id.to_string()),
            field: Some(e.field.clone()),
            message: e.message.clone(),
        })
        .collect()
}

/// Every record's identity and the file it was last read from.
fn record_files(state: &StateFile) -> impl Iterator<Item = (ObjKey, &str)> {
    let pools = state
        .pools
        .values()
        .map(|r| (obj_id(Kind::Pool, "", &r.name), r.file.as_str()));
    let leases = state
        .leases
        .values()
        .map(|r| (obj_id(Kind::Lease, &r.namespace, &r.name), r.file.as_str()));
    let routes = state
        .routes
        .values()
        .map(|r| (obj_id(Kind::Route, &r.namespace, &r.name), r.file.as_str()));
    pools.chain(leases).chain(routes)
}

fn ip_of(status: &keyway_crds::VMLeaseStatus) -> Option<IpAddr> {
    status.ip.as_deref()?.parse().ok()
}

/// The local-mode core: state file plus world, fed by directory scans. No I/O
/// of its own so tests can drive it with hand-made scans.
pub struct Local {
    /// Everything persisted.
    pub state: StateFile,
    /// The pure core.
    pub world: World,
    /// Validation problems per object, from the scan that last changed it.
    object_problems: HashMap<ObjKey, Vec<Problem>>,
    /// Problems of the whole directory after the last scan.
    problems: Vec<Problem>,
    first_scan: bool,
    /// Since when each file has been as scanned, for the edit grace.
    clocks: edits::FileClocks,
    /// When the earliest object kept by the edit grace is due for deletion.
    grace_due_ms: Option<u64>,
    /// Rows of `state` changed since the last [`Local::take_changes`].
    changes: Changes,
    /// The directory as last admitted, by object.
    directory: directory::Directory,
    /// Records by the file they were last read from.
    by_file: HashMap<String, BTreeSet<ObjKey>>,
    /// Duplicate definitions found, by object.
    dup_problems: BTreeMap<ObjKey, Vec<Problem>>,
    /// Objects the edit grace keeps, with why.
    kept: BTreeMap<ObjKey, Problem>,
}

impl Local {
    /// Restores the world from the state file, assigned-first.
    pub fn restore(state: StateFile, settings: Settings) -> Self {
        let pools = state
            .pools
            .values()
            .filter_map(|r| {
                let spec = r.spec.as_ref()?;
                Some(PoolObject {
                    name: r.name.clone(),
                    generation: Some(r.generation),
                    spec: validate::pool(spec),
                })
            })
            .collect();
        let leases = state
            .leases
            .values()
            .filter_map(|r| {
                let spec = r.spec.as_ref()?;
                Some(LeaseObject {
                    key: lease_key(&r.namespace, &r.name),
                    uid: r.uid.clone(),
                    created_ms: r.created_ms,
                    generation: Some(r.generation),
                    spec: validate::lease(spec),
                    status_ip: ip_of(&r.status),
                })
            })
            .collect();
        let routes = state
            .routes
            .values()
            .filter_map(|r| {
                let spec = r.spec.as_ref()?;
                Some(RouteObject {
                    key: lease_key(&r.namespace, &r.name),
                    created_ms: r.created_ms,
                    generation: Some(r.generation),
                    from_raw: spec.from.clone(),
                    spec: validate::route(spec),
                })
            })
            .collect();
        let world = World::restore(settings, pools, leases, routes);
        let mut by_file: HashMap<String, BTreeSet<ObjKey>> = HashMap::new();
        for (id, file) in record_files(&state) {
            by_file.entry(file.to_string()).or_default().insert(id);
        }
        Local {
            state,
            world,
            directory: directory::Directory::default(),
            by_file,
            dup_problems: BTreeMap::new(),
            kept: BTreeMap::new(),
            object_problems: HashMap::new(),
            problems: Vec::new(),
            first_scan: true,
            clocks: edits::FileClocks::new(edits::DEFAULT_EDIT_GRACE),
            grace_due_ms: None,
            // The caller sets a new epoch before anything else is saved.
            changes: Changes {
                epoch: true,
                ..Default::default()
            },
        }
    }

    /// What changed in `state` since the last call: the rows to commit.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Gives back changes a failed commit did not write, so the next one does.
    pub fn restore_changes(&mut self, changes: Changes) {
        self.changes.absorb(changes);
    }

    /// Sets the snapshot record, noting a change only when it differs.
    pub fn set_snapshot_record(&mut self, record: Option<SnapshotRecord>) {
        if self.state.snapshot != record {
            self.state.snapshot = record;
            self.changes.snapshot = true;
        }
    }

    /// Sets the edit grace (see [`edits`]).
    pub fn with_edit_grace(mut self, grace: Duration) -> Self {
        self.clocks = edits::FileClocks::new(grace);
        self
    }

    /// When a scan is next needed to delete objects the edit grace keeps
    /// (unix ms), if any are kept.
    pub fn grace_due_ms(&self) -> Option<u64> {
        self.grace_due_ms
    }

    /// Notes that the record of `id` now comes from `file` (`None`: gone).
    fn refile(&mut self, id: &ObjKey, old: Option<&str>, new: Option<&str>) {
        if old == new {
            return;
        }
        if let Some(f) = old
            && let Some(set) = self.by_file.get_mut(f)
        {
            set.remove(id);
            if set.is_empty() {
                self.by_file.remove(f);
            }
        }
        if let Some(f) = new {
            self.by_file
                .entry(f.to_string())
                .or_default()
                .insert(id.clone());
        }
    }

    /// Problems found by the last scan (also in the state file).
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// Admits a directory scan: creates, edits and deletes objects in the world.
    /// Only objects of files whose parse changed since the last scan (and
    /// objects the edit grace keeps) are looked at; see [`directory`].
    pub fn apply_scan(&mut self, scans: &[Arc<FileScan>], now_ms: u64) {
        let first = std::mem::take(&mut self.first_scan);
        let (mut affected, changed_files) = self.directory.update(scans);
        // A changed or vanished file may have lost objects it defined; at
        // start every record is checked against the directory once.
        for f in &changed_files {
            if let Some(ids) = self.by_file.get(f) {
                affected.extend(ids.iter().cloned());
            }
        }
        if first {
            affected.extend(record_files(&self.state).map(|(id, _)| id));
        }
        affected.extend(self.kept.keys().cloned());
        self.clocks.observe(
            scans.iter().map(|s| (s.file.as_str(), s.content)),
            self.by_file.keys().map(String::as_str),
            now_ms,
        );

        // What is missing from every file dies only once its file has stayed
        // as it is for the edit grace; a file that does not parse, or a
        // document that names the object but does not read, keeps it.
        let grace = self.clocks.grace();
        let mut chosen: Vec<(ObjKey, Arc<FileScan>, usize)> = Vec::new();
        let mut dying: Vec<ObjKey> = Vec::new();
        for id in &affected {
            self.kept.remove(id);
            let prev_file = self.record_file(id);
            match self.directory.choose(id, prev_file.as_deref()) {
                Some((scan, i, dups)) => {
                    if dups.is_empty() {
                        self.dup_problems.remove(id);
                    } else {
                        self.dup_problems.insert(id.clone(), dups);
                    }
                    chosen.push((id.clone(), scan, i));
                }
                None => {
                    self.dup_problems.remove(id);
                    let Some(file) = prev_file else { continue };
                    if self.directory.is_incomplete(&file) || self.directory.is_held(id) {
                        continue;
                    }
                    if now_ms >= self.clocks.due_ms(&file) {
                        dying.push(id.clone());
                        continue;
                    }
                    let message = if self.clocks.gone(&file) {
                        format!(
                            "the file is gone; {id} keeps its last good version until the file has stayed away for {grace:?} \
                             (an editor may be replacing it), then it is deleted"
                        )
                    } else {
                        format!(
                            "{id} is no longer in this file; it keeps its last good version until the file has stayed \
                             unchanged for {grace:?} (an editor may still be writing it), then it is deleted"
                        )
                    };
                    self.kept.insert(
                        id.clone(),
                        Problem {
                            file,
                            document: None,
                            object: Some(id.to_string()),
                            field: None,
                            message,
                        },
                    );
                }
            }
        }
        self.grace_due_ms = self
            .kept
            .values()
            .map(|p| self.clocks.due_ms(&p.file))
            .min();

        // Deletions of leases first, so their addresses are free for new leases.
        for id in &dying {
            let ObjKey::Lease(key) = id else { continue };
            let rk = record_key(&key.namespace, &key.name);
            if let Some(r) = self.state.leases.remove(&rk) {
                self.changes.leases.insert(rk);
                self.world.delete_lease(key);
                self.object_problems.remove(id);
                self.refile(id, Some(&r.file), None);
            }
        }

        // Pools, then leases oldest first, then routes.
        for (id, scan, i) in &chosen {
            let (Some(doc), ObjKey::Pool(name)) = (scan.docs.get(*i), id) else {
                continue;
            };
            let Object::Pool(p) = &doc.object else {
                continue;
            };
            let file = scan.file.as_str();
            let seen = doc.object.spec_json();
            let rec = self.state.pools.get(name);
            if !first && rec.is_some_and(|r| r.seen_spec == seen && r.file == file) {
                continue;
            }
            let spec = validate::pool(p);
            let generation = next_generation(rec.map(|r| (&r.seen_spec, r.generation)), &seen);
            let old_file = rec.map(|r| r.file.clone());
            let mut r = rec.cloned().unwrap_or_else(|| PoolRecord {
                name: name.clone(),
                created_ms: now_ms,
                file: file.to_string(),
                generation,
                seen_spec: seen.clone(),
                spec: None,
                status: Default::default(),
            });
            r.file = file.to_string();
            r.generation = generation;
            r.seen_spec = seen;
            match &spec {
                Ok(_) => {
                    r.spec = Some(p.clone());
                    self.object_problems.remove(id);
                }
                Err(e) => {
                    self.object_problems
                        .insert(id.clone(), problems_of(file, doc.index, id, e));
                }
            }
            if self.state.pools.get(name) != Some(&r) {
                self.changes.pools.insert(name.clone());
            }
            self.state.pools.insert(name.clone(), r);
            self.refile(id, old_file.as_deref(), Some(file));
            self.world.apply_pool(PoolObject {
                name: name.clone(),
                generation: Some(generation),
                spec,
            });
        }

        let mut lease_updates = Vec::new();
        for (id, scan, i) in &chosen {
            let (Some(doc), ObjKey::Lease(key)) = (scan.docs.get(*i), id) else {
                continue;
            };
            let Object::Lease(l) = &doc.object else {
                continue;
            };
            let file = scan.file.as_str();
            let seen = doc.object.spec_json();
            let rk = record_key(&key.namespace, &key.name);
            let rec = self.state.leases.get(&rk);
            if !first && rec.is_some_and(|r| r.seen_spec == seen && r.file == file) {
                continue;
            }
            let generation = next_generation(rec.map(|r| (&r.seen_spec, r.generation)), &seen);
            let old_file = rec.map(|r| r.file.clone());
            let mut r = rec.cloned().unwrap_or_else(|| {
                Box::new(LeaseRecord {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    uid: new_uid(),
                    created_ms: now_ms,
                    file: file.to_string(),
                    generation,
                    seen_spec: seen.clone(),
                    spec: None,
                    status: Default::default(),
                })
            });
            r.file = file.to_string();
            r.generation = generation;
            r.seen_spec = seen;
            let spec = validate::lease(l);
            match &spec {
                Ok(_) => {
                    r.spec = Some(l.clone());
                    self.object_problems.remove(id);
                }
                Err(e) => {
                    self.object_problems
                        .insert(id.clone(), problems_of(file, doc.index, id, e));
                }
            }
            lease_updates.push((r.created_ms, rk, r, spec, id.clone(), old_file));
        }
        lease_updates.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        for (_, rk, r, spec, id, old_file) in lease_updates {
            let obj = LeaseObject {
                key: lease_key(&r.namespace, &r.name),
                uid: r.uid.clone(),
                created_ms: r.created_ms,
                generation: Some(r.generation),
                spec,
                status_ip: ip_of(&r.status),
            };
            if self.state.leases.get(&rk) != Some(&r) {
                self.changes.leases.insert(rk.clone());
            }
            self.refile(&id, old_file.as_deref(), Some(&r.file));
            self.state.leases.insert(rk, r);
            self.world.apply_lease(obj);
        }

        for id in &dying {
            let ObjKey::Pool(name) = id else { continue };
            if let Some(r) = self.state.pools.remove(name) {
                self.changes.pools.insert(name.clone());
                self.world.delete_pool(name);
                self.object_problems.remove(id);
                self.refile(id, Some(&r.file), None);
            }
        }
        for id in &dying {
            let ObjKey::Route(key) = id else { continue };
            let rk = record_key(&key.namespace, &key.name);
            if let Some(r) = self.state.routes.remove(&rk) {
                self.changes.routes.insert(rk);
                self.world.delete_route(key);
                self.object_problems.remove(id);
                self.refile(id, Some(&r.file), None);
            }
        }
        for (id, scan, i) in &chosen {
            let (Some(doc), ObjKey::Route(key)) = (scan.docs.get(*i), id) else {
                continue;
            };
            let Object::Route(rt) = &doc.object else {
                continue;
            };
            let file = scan.file.as_str();
            let seen = doc.object.spec_json();
            let rk = record_key(&key.namespace, &key.name);
            let rec = self.state.routes.get(&rk);
            if !first && rec.is_some_and(|r| r.seen_spec == seen && r.file == file) {
                continue;
            }
            let generation = next_generation(rec.map(|r| (&r.seen_spec, r.generation)), &seen);
            let old_file = rec.map(|r| r.file.clone());
            let mut r = rec.cloned().unwrap_or_else(|| RouteRecord {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                created_ms: now_ms,
                file: file.to_string(),
                generation,
                seen_spec: seen.clone(),
                spec: None,
                status: Default::default(),
            });
            r.file = file.to_string();
            r.generation = generation;
            r.seen_spec = seen;
            r.spec = Some(rt.clone());
            let spec = validate::route(rt);
            match &spec {
                Ok(_) => {
                    self.object_problems.remove(id);
                }
                Err(e) => {
                    self.object_problems
                        .insert(id.clone(), problems_of(file, doc.index, id, e));
                }
            }
            self.world.apply_route(RouteObject {
                key: key.clone(),
                created_ms: r.created_ms,
                generation: Some(r.generation),
                from_raw: rt.from.clone(),
                spec,
            });
            if self.state.routes.get(&rk) != Some(&r) {
                self.changes.routes.insert(rk.clone());
            }
            self.refile(id, old_file.as_deref(), Some(file));
            self.state.routes.insert(rk, r);
        }

        // Clocks only matter for files that exist or that objects come from.
        let listed: HashSet<&str> = scans.iter().map(|s| s.file.as_str()).collect();
        let by_file = &self.by_file;
        self.clocks
            .retain(|f| listed.contains(f) || by_file.contains_key(f));

        let mut problems: Vec<Problem> = scans
            .iter()
            .flat_map(|s| s.problems.iter().cloned())
            .collect();
        problems.extend(self.dup_problems.values().flatten().cloned());
        problems.extend(self.kept.values().cloned());
        let mut object_problems: Vec<&Problem> = self.object_problems.values().flatten().collect();
        object_problems.sort_by(|a, b| (&a.file, a.document).cmp(&(&b.file, b.document)));
        problems.extend(object_problems.into_iter().cloned());
        self.problems = problems;
    }

    fn record_file(&self, id: &ObjKey) -> Option<String> {
        match id.kind() {
            Kind::Pool => self.state.pools.get(id.name()).map(|r| r.file.clone()),
            Kind::Lease => self
                .state
                .leases
                .get(&record_key(id.namespace_name().0, id.name()))
                .map(|r| r.file.clone()),
            Kind::Route => self
                .state
                .routes
                .get(&record_key(id.namespace_name().0, id.name()))
                .map(|r| r.file.clone()),
        }
    }

    /// Recomputes the statuses of the objects `dirty` (from
    /// [`World::take_dirty`]) and `moved` (from
    /// [`RoutedTracker::moved`]) name, noting the ones that changed.
    pub fn update_statuses(
        &mut self,
        dirty: &Dirty,
        moved: &[ObjKey],
        tracker: &RoutedTracker,
        acks: &[Ack],
        now: Timestamp,
    ) {
        let mut leases: BTreeSet<&LeaseKey> = dirty.leases.iter().collect();
        let mut routes: BTreeSet<&LeaseKey> = dirty.routes.iter().collect();
        for key in moved {
            match key {
                ObjKey::Lease(k) => leases.insert(k),
                ObjKey::Route(k) => routes.insert(k),
                ObjKey::Pool(_) => false,
            };
        }
        for key in leases {
            let rk = record_key(&key.namespace, &key.name);
            let Some(r) = self.state.leases.get_mut(&rk) else {
                continue;
            };
            let routed = tracker.info(&ObjKey::Lease(key.clone()), acks);
            if let Some(st) = self.world.lease_status(key, Some(&r.status), &routed, now)
                && st != r.status
            {
                r.status = st;
                self.changes.leases.insert(rk);
            }
        }
        for name in &dirty.pools {
            let Some(r) = self.state.pools.get_mut(name) else {
                continue;
            };
            if let Some(st) = self.world.pool_status(name, Some(&r.status), now)
                && st != r.status
            {
                r.status = st;
                self.changes.pools.insert(name.clone());
            }
        }
        for key in routes {
            let rk = record_key(&key.namespace, &key.name);
            let Some(r) = self.state.routes.get_mut(&rk) else {
                continue;
            };
            let routed = tracker.info(&ObjKey::Route(key.clone()), acks);
            if let Some(st) = self.world.route_status(key, Some(&r.status), &routed, now)
                && st != r.status
            {
                r.status = st;
                self.changes.routes.insert(rk);
            }
        }
        if self.state.problems != self.problems {
            self.state.problems = self.problems.clone();
            self.changes.problems = true;
        }
    }

    /// Moves the world's notices into the event log and the process log.
    pub fn record_notices(&mut self, now: Timestamp) {
        for n in self.world.take_notices() {
            n.log();
            let object = n.object.to_string();
            self.state.events.push(EventRecord {
                time: now.to_string(),
                severity: match n.severity {
                    Severity::Normal => "Normal".into(),
                    Severity::Warning => "Warning".into(),
                },
                reason: n.reason.to_string(),
                object,
                message: n.message,
            });
            self.changes.events += 1;
        }
        let excess = self.state.events.len().saturating_sub(MAX_EVENTS);
        self.state.events.drain(..excess);
    }
}

/// Times the phases of one round.
struct Phases {
    last: std::time::Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn start() -> Self {
        Phases {
            last: std::time::Instant::now(),
            done: Vec::new(),
        }
    }

    fn mark(&mut self, phase: &'static str) {
        let now = std::time::Instant::now();
        self.done.push((phase, now - self.last));
        self.last = now;
    }

    fn log(&self) {
        let total: Duration = self.done.iter().map(|(_, d)| *d).sum();
        tracing::debug!(?total, phases = ?self.done, "round");
    }
}

fn acks_of(publisher: &Publisher) -> (Vec<Ack>, Vec<SubscriberRecord>) {
    let subs = publisher.subscribers();
    let acks = keyway_core::routed::acks(&subs);
    let records = subs
        .into_iter()
        .map(|s| SubscriberRecord {
            node_id: s.node_id,
            role: s.role,
            connected: s.connected,
            acked: s.acked.map(|v| format!("e{}.v{}", v.epoch, v.version)),
            nacks: s.nack_count,
            last_error: s.last_nack_error,
            bytes_sent: s.bytes_sent,
        })
        .collect();
    (acks, records)
}

/// `keyway-operator run --local DIR`.
pub async fn run(opts: LocalOptions) -> Result<()> {
    let paths = Paths::new(&opts.dir);
    if !paths.dir.is_dir() {
        bail!("{} is not a directory", paths.dir.display());
    }
    keyway_state::ensure_state_dir(&paths)?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(paths.lock())
        .with_context(|| format!("opening {}", paths.lock().display()))?;
    if lock.try_lock().is_err() {
        bail!(
            "another keyway-operator is already running on {} (it holds {})",
            paths.dir.display(),
            paths.lock().display()
        );
    }
    let token = secrets::load_or_create_token(&paths.token())?;
    let relay_ca_public_key = secrets::load_or_create_relay_ca(&paths.relay_ca())?;
    let mut store = Store::open(&paths)?;
    let mut st = store.load()?;
    // The epoch only grows: past the last run's, and past the clock's seconds so
    // a wiped state directory still starts ahead of proxies' disk copies.
    let now_secs = u64::try_from(Timestamp::now().as_second()).unwrap_or(0);
    let epoch = (st.epoch + 1).max(now_secs);
    st.epoch = epoch;
    let settings = Settings {
        public_ssh_port: opts.public_ssh_port,
        relay_ca_public_key,
        relay_cert_validity_secs: opts.relay_cert_validity_secs,
    };
    let mut local = Local::restore(st, settings).with_edit_grace(opts.edit_grace);
    local.record_notices(Timestamp::now());

    let publisher = Publisher::new(epoch);
    let listener = tokio::net::TcpListener::bind(opts.grpc_listen)
        .await
        .with_context(|| format!("binding the snapshot server to {}", opts.grpc_listen))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    let info = keyway_state::OperatorInfo {
        grpc: format!("http://{bound}"),
        pid: std::process::id(),
        epoch,
    };
    // operator.json is written after the first scan is saved, so whoever waits
    // for it (proxies, `status`, tests) sees state that reflects the directory.
    let mut info_pending = Some(info);

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let server = {
        let publisher = publisher.clone();
        let mut rx = shutdown_rx.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            keyway_snapshot::server::serve(listener, publisher, token, shutdown).await
        })
    };

    let (fs_tx, mut fs_rx) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let relevant = match &res {
            // Opening or reading (the scanner's own reads and directory
            // listings among them) changes nothing; a close after writing does.
            Ok(ev)
                if matches!(
                    ev.kind,
                    notify::EventKind::Access(a)
                        if a != notify::event::AccessKind::Close(notify::event::AccessMode::Write)
                ) =>
            {
                false
            }
            Ok(ev) => ev.paths.iter().any(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy())
                    .is_some_and(|n| !n.starts_with('.'))
            }),
            Err(_) => true,
        };
        if relevant {
            // Full channel = a rescan is already due; nothing is lost.
            let _ = fs_tx.try_send(());
        }
    })
    .context("starting the directory watcher")?;
    notify::Watcher::watch(
        &mut watcher,
        &paths.dir,
        notify::RecursiveMode::NonRecursive,
    )
    .with_context(|| format!("watching {}", paths.dir.display()))?;

    let mut scanner = scanner::Scanner::new(paths.dir.clone());
    // The first state should reflect the directory, so wait a little for the
    // first parses; a file slower than that joins a later round.
    match scanner.prime(STARTUP_PARSE_BUDGET).await {
        Ok(slow) if !slow.is_empty() => {
            warn!(files = ?slow, "still parsing at start; their objects join when parsed")
        }
        Ok(_) => {}
        Err(e) => error!("{e:#}"),
    }

    let mut tracker = RoutedTracker::default();
    // Objects whose entries a round proposed but did not get published.
    let mut unpublished = Dirty::default();
    let mut acks_changed = publisher.acks_changed();
    let mut rescan = true;
    // Set when a round could not save the state, so it did not publish.
    let mut retry = false;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    loop {
        // A round: admit the directory, prepare the snapshot, save the state
        // (with what the snapshot holds), and only then publish, so no proxy
        // ever routes a lease a restarted operator would not know.
        let mut prepared = None;
        if local.grace_due_ms().is_some_and(|due| now_ms() >= due) {
            rescan = true;
        }
        // Where a round's time goes, for `RUST_LOG=keyway_operator=debug`.
        let mut phases = Phases::start();
        if rescan || retry {
            match scanner.scan().await {
                Ok(scans) => {
                    phases.mark("scan");
                    local.apply_scan(&scans, now_ms());
                    phases.mark("admit");
                }
                Err(e) => error!("{e:#}"),
            }
        }
        // Only the objects this round touched (and any a failed round did not
        // publish) are re-derived: O(change), not O(directory).
        let dirty = local.world.take_dirty();
        phases.mark("derive");
        let mut propose = unpublished.clone();
        propose.absorb(dirty.clone());
        if !propose.is_empty() || publisher.current_version().is_none() {
            let change = local
                .world
                .snapshot_delta(&propose, Timestamp::now().as_millisecond());
            phases.mark("build delta");
            match publisher.prepare_delta(&change) {
                Ok(p) => {
                    if let Some(c) = p.change() {
                        // Its objects are dirty: this round derives their
                        // statuses after this, with the new version.
                        tracker.observe(c);
                    }
                    prepared = Some(p);
                }
                Err(e) => error!("snapshot not published (consistency check failed): {e}"),
            }
            phases.mark("check delta");
        }
        // Until a version carrying them is served, they are proposed again.
        unpublished = propose;
        let now = Timestamp::now();
        let (acks, subs) = acks_of(&publisher);
        let moved = tracker.moved(&acks);
        local.update_statuses(&dirty, &moved, &tracker, &acks, now);
        local.record_notices(now);
        phases.mark("statuses");
        let record =
            |v: keyway_snapshot::pb::Version, leases: usize, routes: usize| SnapshotRecord {
                version: format!("e{}.v{}", v.epoch, v.version),
                leases,
                routes,
                subscribers: subs.clone(),
            };
        let snapshot_record = match prepared
            .as_ref()
            .and_then(|p| Some((p.version(), p.counts()?)))
        {
            Some((v, (leases, routes))) => Some(record(v, leases, routes)),
            None => publisher
                .current_counts()
                .map(|(v, leases, routes)| record(v, leases, routes)),
        };
        local.set_snapshot_record(snapshot_record);
        // Only the rows this round changed, in one transaction.
        let changes = local.take_changes();
        let rows = changes.rows();
        let saved = match store.commit(&local.state, &changes) {
            Ok(()) => true,
            Err(e) => {
                error!("saving state: {e:#}");
                local.restore_changes(changes);
                false
            }
        };
        phases.mark("save state");
        tracing::trace!(rows, "state rows written");
        retry = false;
        if let Some(p) = prepared {
            if saved {
                match publisher.commit(p) {
                    Ok(v) => {
                        unpublished = Dirty::default();
                        tracing::debug!(version = %format!("e{}.v{}", v.epoch, v.version), "snapshot published")
                    }
                    Err(e) => error!("snapshot not published: {e}"),
                }
            } else {
                // Publishing what is not saved could hand proxies a lease
                // (UID, hash, IP) a restart would not know; try again soon.
                warn!("snapshot not published: the state is not saved");
                retry = true;
            }
        }
        phases.mark("publish");
        phases.log();
        if saved && let Some(info) = info_pending.take() {
            keyway_state::write_atomic(
                &paths.operator_info(),
                &serde_json::to_vec_pretty(&info)?,
                0o644,
            )?;
            info!(dir = %paths.dir.display(), grpc = %info.grpc, epoch, "local mode started");
        }
        // Objects the edit grace keeps need a round when it runs out.
        let grace_wait = local
            .grace_due_ms()
            .map(|due| Duration::from_millis(due.saturating_sub(now_ms()) + 1));
        let wait = if retry {
            SAVE_RETRY
        } else {
            grace_wait.map_or(opts.rescan, |g| g.min(opts.rescan))
        };
        tokio::select! {
            _ = fs_rx.recv() => {
                // Debounce: editors write several events per save. Short:
                // a round costs what changed, and a half-written file is
                // the edit grace's business, not this wait's.
                tokio::time::sleep(FS_DEBOUNCE).await;
                while fs_rx.try_recv().is_ok() {}
                rescan = true;
            }
            () = scanner.done() => { rescan = true; }
            _ = acks_changed.changed() => { rescan = false; }
            _ = tokio::time::sleep(wait) => { rescan = true; }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!("shutting down");
    let _ = shutdown_tx.send(true);
    drop(watcher);
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Err(e))) => warn!("snapshot server: {e:#}"),
        Ok(Err(e)) => warn!("snapshot server task: {e}"),
        _ => {}
    }
    // operator.json stays: proxies keep retrying that address until a new run
    // rewrites it.
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFx4mPJ8vXNP0mpdOyFHBdpYyQrF0O1IDtDrjVEtNfQu t";
    const GRACE: u64 = 2000;

    fn pool() -> String {
        "apiVersion: keyway.dev/v1alpha1\nkind: IPPool\nmetadata: {name: p}\nspec: {addresses: [127.0.10.1-127.0.10.4]}\n".into()
    }

    fn lease(name: &str) -> String {
        format!(
            "apiVersion: keyway.dev/v1alpha1\nkind: VMLease\nmetadata: {{name: {name}}}\nspec:\n  user: alice\n  accessPublicKeys: ['{KEY}']\n  poolRef: p\n  target: {{address: '127.0.0.1:22'}}\n"
        )
    }

    fn local() -> Local {
        let settings = Settings {
            public_ssh_port: 2222,
            relay_ca_public_key: KEY.into(),
            relay_cert_validity_secs: 300,
        };
        Local::restore(
            StateFile {
                format: keyway_state::store::FORMAT,
                ..Default::default()
            },
            settings,
        )
        .with_edit_grace(Duration::from_millis(GRACE))
    }

    /// Scans `files` (name, text) at `now`, and returns the leases' UIDs.
    fn scan(l: &mut Local, files: &[(&str, &str)], now: u64) -> BTreeMap<String, String> {
        let scans: Vec<Arc<FileScan>> = files
            .iter()
            .map(|(f, t)| Arc::new(loader::parse(f, t)))
            .collect();
        l.apply_scan(&scans, now);
        l.state
            .leases
            .iter()
            .map(|(k, r)| (k.clone(), r.uid.clone()))
            .collect()
    }

    fn kept_problem(l: &Local, file: &str) -> bool {
        l.problems()
            .iter()
            .any(|p| p.file == file && p.message.contains("keeps its last good version"))
    }

    #[test]
    fn truncate_then_write_keeps_the_lease() {
        let mut l = local();
        let p = pool();
        let a = lease("a");
        let before = scan(&mut l, &[("p.yaml", &p), ("a.yaml", &a)], 1000);
        assert_eq!(before.len(), 1);
        // Truncated: kept, and the problem says so.
        assert_eq!(
            scan(&mut l, &[("p.yaml", &p), ("a.yaml", "")], 1100),
            before
        );
        assert!(kept_problem(&l, "a.yaml"), "{:?}", l.problems());
        assert_eq!(l.grace_due_ms(), Some(1100 + GRACE));
        // Written back half a second later: same lease, nothing reported.
        assert_eq!(
            scan(&mut l, &[("p.yaml", &p), ("a.yaml", &a)], 1600),
            before
        );
        assert!(l.problems().is_empty(), "{:?}", l.problems());
        assert_eq!(l.grace_due_ms(), None);
        assert_eq!(
            scan(&mut l, &[("p.yaml", &p), ("a.yaml", &a)], 9000),
            before
        );
    }

    #[test]
    fn a_file_that_stays_empty_loses_its_objects_after_the_grace() {
        let mut l = local();
        let p = pool();
        let two = format!("{}---\n{}", lease("a"), lease("b"));
        scan(&mut l, &[("p.yaml", &p), ("ab.yaml", &two)], 1000);
        // Half written: the first document only. Then a different half, which
        // restarts the clock; then it stays.
        let half = lease("a");
        let uids = scan(&mut l, &[("p.yaml", &p), ("ab.yaml", &half)], 1100);
        assert_eq!(uids.len(), 2);
        assert!(kept_problem(&l, "ab.yaml"));
        let half2 = format!("{}---\n", lease("a"));
        assert_eq!(
            scan(&mut l, &[("p.yaml", &p), ("ab.yaml", &half2)], 2500).len(),
            2
        );
        assert_eq!(l.grace_due_ms(), Some(2500 + GRACE));
        assert_eq!(
            scan(
                &mut l,
                &[("p.yaml", &p), ("ab.yaml", &half2)],
                2500 + GRACE - 1
            )
            .len(),
            2
        );
        let after = scan(&mut l, &[("p.yaml", &p), ("ab.yaml", &half2)], 2500 + GRACE);
        assert_eq!(after.keys().collect::<Vec<_>>(), ["default/a"]);
        assert!(l.problems().is_empty(), "{:?}", l.problems());
        assert_eq!(l.grace_due_ms(), None);
    }

    #[test]
    fn a_removed_file_is_deleted_after_the_grace_and_a_replaced_one_is_not() {
        let mut l = local();
        let p = pool();
        let a = lease("a");
        let before = scan(&mut l, &[("p.yaml", &p), ("a.yaml", &a)], 1000);
        // An editor moves the file away and writes the new one: same lease.
        assert_eq!(scan(&mut l, &[("p.yaml", &p)], 1100), before);
        assert!(
            l.problems()
                .iter()
                .any(|p| p.file == "a.yaml" && p.message.contains("the file is gone")),
            "{:?}",
            l.problems()
        );
        assert_eq!(
            scan(&mut l, &[("p.yaml", &p), ("a.yaml", &a)], 1200),
            before
        );
        // Really removed: gone once it stayed away for the grace.
        assert_eq!(scan(&mut l, &[("p.yaml", &p)], 2000).len(), 1);
        assert_eq!(scan(&mut l, &[("p.yaml", &p)], 2000 + GRACE).len(), 0);
        assert!(l.problems().is_empty(), "{:?}", l.problems());
        // Nothing tracked for the deleted file any more.
        assert_eq!(l.clocks.len(), 1);
    }

    #[test]
    fn a_rename_is_immediate() {
        let mut l = local();
        let p = pool();
        let a = lease("a");
        let before = scan(&mut l, &[("p.yaml", &p), ("a.yaml", &a)], 1000);
        assert_eq!(
            scan(&mut l, &[("p.yaml", &p), ("b.yaml", &a)], 1100),
            before
        );
        assert_eq!(l.state.leases["default/a"].file, "b.yaml");
        assert!(l.problems().is_empty(), "{:?}", l.problems());
        assert_eq!(l.grace_due_ms(), None);
    }

    #[test]
    fn broken_files_and_unreadable_documents_keep_objects_past_the_grace() {
        let mut l = local();
        let p = pool();
        let a = lease("a");
        let before = scan(&mut l, &[("p.yaml", &p), ("a.yaml", &a)], 1000);
        let broken = format!("{a}  oops: [\n");
        assert_eq!(
            scan(&mut l, &[("p.yaml", &p), ("a.yaml", &broken)], 1100),
            before
        );
        assert_eq!(
            scan(&mut l, &[("p.yaml", &p), ("a.yaml", &broken)], 60_000),
            before
        );
        // A misspelled field: the document names the lease, so it is kept.
        let typo = a.replace("poolRef: p", "poolRef: p\n  setled: true");
        assert_eq!(
            scan(&mut l, &[("p.yaml", &p), ("a.yaml", &typo)], 61_000),
            before
        );
        assert_eq!(
            scan(&mut l, &[("p.yaml", &p), ("a.yaml", &typo)], 120_000),
            before
        );
        assert!(
            l.problems()
                .iter()
                .any(|p| p.field.as_deref() == Some("spec.setled")),
            "{:?}",
            l.problems()
        );
        // Too deep to parse: kept, and reported.
        let n = 200_000;
        let deep = format!("a: {}{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(
            scan(&mut l, &[("p.yaml", &p), ("a.yaml", &deep)], 121_000),
            before
        );
        assert!(
            l.problems()
                .iter()
                .any(|p| p.message.contains("nesting deeper than 64 levels")),
            "{:?}",
            l.problems()
        );
    }

    #[test]
    fn zero_grace_deletes_at_once() {
        let mut l = local().with_edit_grace(Duration::ZERO);
        let p = pool();
        scan(&mut l, &[("p.yaml", &p), ("a.yaml", &lease("a"))], 1000);
        assert!(scan(&mut l, &[("p.yaml", &p), ("a.yaml", "")], 1100).is_empty());
    }

    /// What a round commits is what it holds: after any sequence of scans the
    /// database reads back exactly the in-memory state, so no change escapes
    /// the [`Changes`] a round hands to [`Store::commit`].
    mod persisted {
        use super::*;
        use proptest::prelude::*;

        fn doc(kind: u8, name: &str, user: &str) -> String {
            match kind {
                0 => format!(
                    "apiVersion: keyway.dev/v1alpha1\nkind: VMLease\nmetadata: {{name: {name}}}\nspec:\n  user: {user}\n  accessPublicKeys: ['{KEY}']\n  poolRef: p\n  target: {{address: '127.0.0.1:22'}}\n"
                ),
                1 => format!(
                    "apiVersion: keyway.dev/v1alpha1\nkind: VMLease\nmetadata: {{name: {name}}}\nspec:\n  user: {user}\n  accessPublicKeys: ['not a key']\n  poolRef: p\n  target: {{address: '127.0.0.1:22'}}\n"
                ),
                2 => format!(
                    "apiVersion: keyway.dev/v1alpha1\nkind: SshRoute\nmetadata: {{name: {name}}}\nspec:\n  from: tcp+https://{name}.example:22\n  to: tcp://127.0.0.1:22\n  allowUnauthenticated: true\n"
                ),
                _ => "kind: [unclosed\n".to_string(),
            }
        }

        fn pool_doc(last: u8) -> String {
            format!(
                "apiVersion: keyway.dev/v1alpha1\nkind: IPPool\nmetadata: {{name: p}}\nspec: {{addresses: [127.0.10.1-127.0.10.{last}]}}\n"
            )
        }

        /// What must not depend on whether unchanged files were looked at:
        /// records and statuses (UIDs, and what derives from them, aside),
        /// and problems.
        fn view(l: &Local) -> String {
            let mut leases = l.state.leases.clone();
            for r in leases.values_mut() {
                r.uid.clear();
                r.created_ms = 0;
                r.status.lease_hash = None;
                r.status.relay_trust = None;
                r.status.message = None;
            }
            let mut pools = l.state.pools.clone();
            let mut routes = l.state.routes.clone();
            pools.values_mut().for_each(|r| r.created_ms = 0);
            routes.values_mut().for_each(|r| r.created_ms = 0);
            let mut problems = l.problems().to_vec();
            problems.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
            format!("{leases:#?}\n{pools:#?}\n{routes:#?}\n{problems:#?}")
        }

        /// One file's content: up to two documents, or nothing.
        fn file() -> impl Strategy<Value = Option<Vec<(u8, u8, u8)>>> {
            proptest::option::of(proptest::collection::vec((0u8..4, 0u8..4, 0u8..3), 0..3))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]
            #[test]
            fn the_database_always_reads_back_the_state(
                rounds in proptest::collection::vec(
                    (proptest::option::of(1u8..4), proptest::collection::vec(file(), 3), 0u64..4),
                    1..12,
                ),
            ) {
                let d = tempfile::tempdir().unwrap();
                let paths = Paths::new(d.path());
                keyway_state::ensure_state_dir(&paths).unwrap();
                let mut store = Store::open(&paths).unwrap();
                let mut l = local();
                l.state.epoch = 3;
                // Fed fresh parses every round: every file counts as changed,
                // so it re-derives everything (the oracle for `l`, which is
                // fed the same parse while a file's text stays the same).
                let mut fresh = local();
                let mut last: HashMap<String, Arc<FileScan>> = HashMap::new();
                let tracker = RoutedTracker::default();
                let mut now = 1_000;
                for (pool, files, secs) in rounds {
                    // Whole seconds: condition times are stored to the second.
                    now += secs * 1000;
                    let mut texts: Vec<(String, String)> = Vec::new();
                    if let Some(last) = pool {
                        texts.push(("p.yaml".into(), pool_doc(last)));
                    }
                    for (i, f) in files.iter().enumerate() {
                        let Some(docs) = f else { continue };
                        let users = ["alice", "bob", "carol"];
                        let text: Vec<String> = docs
                            .iter()
                            .map(|(k, n, u)| doc(*k, &format!("o{n}"), users[usize::from(*u)]))
                            .collect();
                        texts.push((format!("f{i}.yaml"), text.join("---\n")));
                    }
                    let scans: Vec<Arc<FileScan>> = texts
                        .iter()
                        .map(|(f, t)| match last.get(f) {
                            Some(s) if s.content == loader::fingerprint(t.as_bytes()) => s.clone(),
                            _ => Arc::new(loader::parse(f, t)),
                        })
                        .collect();
                    last = scans.iter().map(|s| (s.file.clone(), s.clone())).collect();
                    let reparsed: Vec<Arc<FileScan>> =
                        texts.iter().map(|(f, t)| Arc::new(loader::parse(f, t))).collect();
                    let ts = Timestamp::from_millisecond(i64::try_from(now).unwrap()).unwrap();
                    for (x, scans) in [(&mut l, &scans), (&mut fresh, &reparsed)] {
                        x.apply_scan(scans, now);
                        let dirty = x.world.take_dirty();
                        x.update_statuses(&dirty, &[], &tracker, &[], ts);
                        x.record_notices(ts);
                    }
                    let changes = l.take_changes();
                    store.commit(&l.state, &changes).unwrap();
                    prop_assert_eq!(&store.load().unwrap(), &l.state);
                    prop_assert_eq!(view(&l), view(&fresh));
                    prop_assert_eq!(l.grace_due_ms(), fresh.grace_due_ms());
                }
            }
        }
    }
}
