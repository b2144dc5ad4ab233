//! Local mode: the operator with no cluster. Objects are YAML files in a
//! directory; status and allocations persist in `DIR/.keyway/state.json`.
//!
//! Each round rescans the directory, admits what changed into the [`World`]
//! (the same pure core cluster mode uses), publishes the routing snapshot and
//! writes the state file. Rounds run on file-system events, on subscriber
//! acknowledgements (for `Routed`), and every `rescan` interval as a safety net.

pub mod loader;
pub mod state;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::jiff::Timestamp;
use keyway_crds::validate;
use keyway_snapshot::server::Publisher;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::allocator::LeaseKey;
use crate::routed::{Ack, RoutedKind, RoutedTracker};
use crate::world::{LeaseObject, PoolObject, RouteObject, Settings, Severity, World};
use loader::{FileScan, Kind, ObjId, Object, Problem};
use state::{
    EventRecord, LeaseRecord, Paths, PoolRecord, RouteRecord, SnapshotRecord, StateFile,
    SubscriberRecord,
};

/// How many events `status` keeps.
const MAX_EVENTS: usize = 300;

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

fn obj_id(kind: Kind, namespace: &str, name: &str) -> ObjId {
    ObjId {
        kind,
        namespace: namespace.to_string(),
        name: name.to_string(),
    }
}

/// The generation an object gets when its spec as read is `seen`: unchanged
/// specs keep theirs, edits bump it, new objects start at 1.
fn next_generation(prev: Option<(&serde_json::Value, i64)>, seen: &serde_json::Value) -> i64 {
    match prev {
        Some((old, g)) if old == seen => g,
        Some((_, g)) => g + 1,
        None => 1,
    }
}

/// Keys of the records `dead` says are gone.
fn dead_keys<R>(records: &BTreeMap<String, R>, dead: impl Fn(&R) -> bool) -> Vec<String> {
    records
        .iter()
        .filter(|(_, r)| dead(r))
        .map(|(k, _)| k.clone())
        .collect()
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

fn problems_of(file: &str, index: usize, id: &ObjId, errs: &validate::FieldErrors) -> Vec<Problem> {
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
    object_problems: HashMap<ObjId, Vec<Problem>>,
    /// Problems of the whole directory after the last scan.
    problems: Vec<Problem>,
    first_scan: bool,
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
        Local {
            state,
            world,
            object_problems: HashMap::new(),
            problems: Vec::new(),
            first_scan: true,
        }
    }

    /// Problems found by the last scan (also in the state file).
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// Admits a directory scan: creates, edits and deletes objects in the world.
    pub fn apply_scan(&mut self, scans: &[FileScan], now_ms: u64) {
        let mut problems: Vec<Problem> = scans
            .iter()
            .flat_map(|s| s.problems.iter().cloned())
            .collect();
        let incomplete: HashSet<&str> = scans
            .iter()
            .filter(|s| s.incomplete)
            .map(|s| s.file.as_str())
            .collect();

        // One document per object. On duplicates keep the copy from the file the
        // object came from before (an added duplicate cannot hijack a live object),
        // else the first by file name.
        let mut chosen: BTreeMap<ObjId, (&str, &loader::Doc)> = BTreeMap::new();
        for scan in scans {
            for doc in &scan.docs {
                let prev_file = self.record_file(&doc.id);
                match chosen.get(&doc.id) {
                    None => {
                        chosen.insert(doc.id.clone(), (scan.file.as_str(), doc));
                    }
                    Some((f0, d0)) => {
                        let (keep, drop) = if prev_file.as_deref() == Some(scan.file.as_str())
                            && prev_file.as_deref() != Some(*f0)
                        {
                            ((scan.file.as_str(), doc), (*f0, *d0))
                        } else {
                            ((*f0, *d0), (scan.file.as_str(), doc))
                        };
                        problems.push(Problem {
                            file: drop.0.to_string(),
                            document: Some(drop.1.index),
                            object: Some(doc.id.to_string()),
                            field: Some("metadata.name".into()),
                            message: format!(
                                "duplicate: {} is also defined in {} (document {}); this copy is ignored",
                                doc.id, keep.0, keep.1.index
                            ),
                        });
                        chosen.insert(doc.id.clone(), keep);
                    }
                }
            }
        }
        let first = std::mem::take(&mut self.first_scan);
        let gone = |file: &str, id: &ObjId| !chosen.contains_key(id) && !incomplete.contains(file);

        // Deletions of leases first, so their addresses are free for new leases.
        let dead_leases = dead_keys(&self.state.leases, |r| {
            gone(&r.file, &obj_id(Kind::VMLease, &r.namespace, &r.name))
        });
        for k in dead_leases {
            if let Some(r) = self.state.leases.remove(&k) {
                self.world.delete_lease(&lease_key(&r.namespace, &r.name));
                self.object_problems
                    .remove(&obj_id(Kind::VMLease, &r.namespace, &r.name));
            }
        }

        // Pools, then leases oldest first, then routes.
        for (id, (file, doc)) in &chosen {
            let Object::Pool(p) = &doc.object else {
                continue;
            };
            let seen = doc.object.spec_json();
            let rec = self.state.pools.get(&id.name);
            if !first && rec.is_some_and(|r| r.seen_spec == seen && r.file == *file) {
                continue;
            }
            let spec = validate::pool(&p.spec);
            let generation = next_generation(rec.map(|r| (&r.seen_spec, r.generation)), &seen);
            let mut r = rec.cloned().unwrap_or_else(|| PoolRecord {
                name: id.name.clone(),
                created_ms: now_ms,
                file: (*file).to_string(),
                generation,
                seen_spec: seen.clone(),
                spec: None,
                status: Default::default(),
            });
            r.file = (*file).to_string();
            r.generation = generation;
            r.seen_spec = seen;
            match &spec {
                Ok(_) => {
                    r.spec = Some(p.spec.clone());
                    self.object_problems.remove(id);
                }
                Err(e) => {
                    self.object_problems
                        .insert(id.clone(), problems_of(file, doc.index, id, e));
                }
            }
            self.state.pools.insert(id.name.clone(), r);
            self.world.apply_pool(PoolObject {
                name: id.name.clone(),
                generation: Some(generation),
                spec,
            });
        }

        let mut lease_updates = Vec::new();
        for (id, (file, doc)) in &chosen {
            let Object::Lease(l) = &doc.object else {
                continue;
            };
            let seen = doc.object.spec_json();
            let rk = record_key(&id.namespace, &id.name);
            let rec = self.state.leases.get(&rk);
            if !first && rec.is_some_and(|r| r.seen_spec == seen && r.file == *file) {
                continue;
            }
            let generation = next_generation(rec.map(|r| (&r.seen_spec, r.generation)), &seen);
            let mut r = rec.cloned().unwrap_or_else(|| LeaseRecord {
                namespace: id.namespace.clone(),
                name: id.name.clone(),
                uid: new_uid(),
                created_ms: now_ms,
                file: (*file).to_string(),
                generation,
                seen_spec: seen.clone(),
                spec: None,
                status: Default::default(),
            });
            r.file = (*file).to_string();
            r.generation = generation;
            r.seen_spec = seen;
            let spec = validate::lease(&l.spec);
            match &spec {
                Ok(_) => {
                    r.spec = Some(l.spec.clone());
                    self.object_problems.remove(id);
                }
                Err(e) => {
                    self.object_problems
                        .insert(id.clone(), problems_of(file, doc.index, id, e));
                }
            }
            lease_updates.push((r.created_ms, rk, r, spec));
        }
        lease_updates.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        for (_, rk, r, spec) in lease_updates {
            let obj = LeaseObject {
                key: lease_key(&r.namespace, &r.name),
                uid: r.uid.clone(),
                created_ms: r.created_ms,
                generation: Some(r.generation),
                spec,
                status_ip: ip_of(&r.status),
            };
            self.state.leases.insert(rk, r);
            self.world.apply_lease(obj);
        }

        let dead_pools = dead_keys(&self.state.pools, |r| {
            gone(&r.file, &obj_id(Kind::IPPool, "", &r.name))
        });
        for k in dead_pools {
            self.state.pools.remove(&k);
            self.world.delete_pool(&k);
            self.object_problems.remove(&obj_id(Kind::IPPool, "", &k));
        }

        let dead_routes = dead_keys(&self.state.routes, |r| {
            gone(&r.file, &obj_id(Kind::SshRoute, &r.namespace, &r.name))
        });
        for k in dead_routes {
            if let Some(r) = self.state.routes.remove(&k) {
                self.world.delete_route(&lease_key(&r.namespace, &r.name));
                self.object_problems
                    .remove(&obj_id(Kind::SshRoute, &r.namespace, &r.name));
            }
        }
        for (id, (file, doc)) in &chosen {
            let Object::Route(rt) = &doc.object else {
                continue;
            };
            let seen = doc.object.spec_json();
            let rk = record_key(&id.namespace, &id.name);
            let rec = self.state.routes.get(&rk);
            if !first && rec.is_some_and(|r| r.seen_spec == seen && r.file == *file) {
                continue;
            }
            let generation = next_generation(rec.map(|r| (&r.seen_spec, r.generation)), &seen);
            let mut r = rec.cloned().unwrap_or_else(|| RouteRecord {
                namespace: id.namespace.clone(),
                name: id.name.clone(),
                created_ms: now_ms,
                file: (*file).to_string(),
                generation,
                seen_spec: seen.clone(),
                spec: None,
                status: Default::default(),
            });
            r.file = (*file).to_string();
            r.generation = generation;
            r.seen_spec = seen;
            r.spec = Some(rt.spec.clone());
            let spec = validate::route(&rt.spec);
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
                key: lease_key(&id.namespace, &id.name),
                created_ms: r.created_ms,
                generation: Some(r.generation),
                from_raw: rt.spec.from.clone(),
                spec,
            });
            self.state.routes.insert(rk, r);
        }

        let mut object_problems: Vec<&Problem> = self.object_problems.values().flatten().collect();
        object_problems.sort_by(|a, b| (&a.file, a.document).cmp(&(&b.file, b.document)));
        problems.extend(object_problems.into_iter().cloned());
        self.problems = problems;
    }

    fn record_file(&self, id: &ObjId) -> Option<String> {
        match id.kind {
            Kind::IPPool => self.state.pools.get(&id.name).map(|r| r.file.clone()),
            Kind::VMLease => self
                .state
                .leases
                .get(&record_key(&id.namespace, &id.name))
                .map(|r| r.file.clone()),
            Kind::SshRoute => self
                .state
                .routes
                .get(&record_key(&id.namespace, &id.name))
                .map(|r| r.file.clone()),
        }
    }

    /// Recomputes every status into the state file.
    pub fn update_statuses(&mut self, tracker: &RoutedTracker, acks: &[Ack], now: Timestamp) {
        let derived = self.world.derive();
        for r in self.state.leases.values_mut() {
            let key = lease_key(&r.namespace, &r.name);
            let routed = tracker.info(RoutedKind::Lease, &r.namespace, &r.name, acks);
            if let Some(st) = self
                .world
                .lease_status(&derived, &key, Some(&r.status), &routed, now)
            {
                r.status = st;
            }
        }
        for r in self.state.pools.values_mut() {
            if let Some(st) = self.world.pool_status(&r.name, Some(&r.status), now) {
                r.status = st;
            }
        }
        for r in self.state.routes.values_mut() {
            let key = lease_key(&r.namespace, &r.name);
            let routed = tracker.info(RoutedKind::Route, &r.namespace, &r.name, acks);
            if let Some(st) = self
                .world
                .route_status(&derived, &key, Some(&r.status), &routed, now)
            {
                r.status = st;
            }
        }
        self.state.problems = self.problems.clone();
    }

    /// Moves the world's notices into the event log and the process log.
    pub fn record_notices(&mut self, now: Timestamp) {
        for n in self.world.take_notices() {
            n.log();
            let object = n.object();
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
        }
        let excess = self.state.events.len().saturating_sub(MAX_EVENTS);
        self.state.events.drain(..excess);
    }
}

fn acks_of(publisher: &Publisher) -> (Vec<Ack>, Vec<SubscriberRecord>) {
    let subs = publisher.subscribers();
    let acks = crate::routed::acks(&subs);
    let records = subs
        .into_iter()
        .map(|s| SubscriberRecord {
            node_id: s.node_id,
            role: s.role,
            connected: s.connected,
            acked: s.acked.map(|v| format!("e{}.v{}", v.epoch, v.version)),
            nacks: s.nack_count,
            last_error: s.last_nack_error,
        })
        .collect();
    (acks, records)
}

fn scan_dir(paths: &Paths) -> Result<Vec<FileScan>> {
    let files = loader::yaml_files(&paths.dir)
        .with_context(|| format!("listing {}", paths.dir.display()))?;
    Ok(files
        .iter()
        .map(|f| loader::scan_file(&paths.dir, f))
        .collect())
}

/// `keyway-operator run --local DIR`.
pub async fn run(opts: LocalOptions) -> Result<()> {
    let paths = Paths::new(&opts.dir);
    if !paths.dir.is_dir() {
        bail!("{} is not a directory", paths.dir.display());
    }
    state::ensure_state_dir(&paths)?;
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
    let token = state::load_or_create_token(&paths.token())?;
    let relay_ca_public_key = state::load_or_create_relay_ca(&paths.relay_ca())?;
    let mut st = StateFile::load(&paths.state())?;
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
    let mut local = Local::restore(st, settings);
    local.record_notices(Timestamp::now());

    let publisher = Publisher::new(epoch);
    let listener = tokio::net::TcpListener::bind(opts.grpc_listen)
        .await
        .with_context(|| format!("binding the snapshot server to {}", opts.grpc_listen))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    let info = state::OperatorInfo {
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

    let mut tracker = RoutedTracker::default();
    let mut acks_changed = publisher.acks_changed();
    let mut rescan = true;
    let mut last_saved: Option<StateFile> = None;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    loop {
        if rescan {
            match scan_dir(&paths) {
                Ok(scans) => local.apply_scan(&scans, now_ms()),
                Err(e) => error!("{e:#}"),
            }
            let derived = local.world.derive();
            let snap = local
                .world
                .snapshot(&derived, Timestamp::now().as_millisecond());
            match publisher.publish(snap) {
                Ok(v) => {
                    if let Some(cur) = publisher.current() {
                        tracker.observe(&cur);
                    }
                    tracing::debug!(version = %format!("e{}.v{}", v.epoch, v.version), "snapshot published");
                }
                Err(e) => error!("snapshot not published (consistency check failed): {e}"),
            }
        }
        let now = Timestamp::now();
        let (acks, subs) = acks_of(&publisher);
        local.update_statuses(&tracker, &acks, now);
        local.record_notices(now);
        local.state.snapshot = publisher.current().map(|s| SnapshotRecord {
            version: s
                .version
                .map(|v| format!("e{}.v{}", v.epoch, v.version))
                .unwrap_or_default(),
            leases: s.leases.len(),
            routes: s.routes.len(),
            subscribers: subs,
        });
        if last_saved.as_ref() != Some(&local.state) {
            match local.state.save(&paths.state()) {
                Ok(()) => last_saved = Some(local.state.clone()),
                Err(e) => error!("saving state: {e:#}"),
            }
        }
        if let Some(info) = info_pending.take() {
            state::write_atomic(
                &paths.operator_info(),
                &serde_json::to_vec_pretty(&info)?,
                0o644,
            )?;
            info!(dir = %paths.dir.display(), grpc = %info.grpc, epoch, "local mode started");
        }
        tokio::select! {
            _ = fs_rx.recv() => {
                // Debounce: editors write several events per save.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while fs_rx.try_recv().is_ok() {}
                rescan = true;
            }
            _ = acks_changed.changed() => { rescan = false; }
            _ = tokio::time::sleep(opts.rescan) => { rescan = true; }
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
