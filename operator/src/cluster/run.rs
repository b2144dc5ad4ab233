//! The I/O of cluster mode: leader election, the start-up restore, the
//! controllers, the status round, Events and the snapshot server.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use k8s_openapi::jiff::Timestamp;
use keyway_crds::{IPPool, SshRoute, VMLease};
use keyway_snapshot::server::{Publisher, ServeOptions, ServerTls};
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::{Notify, watch};
use tracing::{debug, error, info, warn};

use super::index::{Index, Observed, StatusWrite, is_deleting, key_of};
use super::leader::{self, LeaderConfig};
use super::metrics::Metrics;
use super::{FIELD_MANAGER, FINALIZER};
use keyway_core::world::{Notice, Settings, Severity};
use keyway_core::{Kind, ObjKey};

/// Where the snapshot token comes from.
#[derive(Clone, Debug)]
pub enum TokenSource {
    /// A file (a Secret mounted into the pod).
    File(PathBuf),
    /// A Secret in the operator's namespace, read through the API.
    Secret {
        /// Secret name.
        name: String,
        /// Key inside `data`.
        key: String,
    },
}

/// PEM files of the snapshot server's TLS identity.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// Options of `keyway-operator run` (cluster mode).
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Snapshot gRPC listen address.
    pub grpc_listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz` listen address.
    pub metrics_listen: SocketAddr,
    /// Port users reach the proxies' SSH listener on.
    pub public_ssh_port: u16,
    /// Lifetime of relay certificates.
    pub relay_cert_validity_secs: u32,
    /// The relay CA (private key or `.pub` line), for `status.relayTrust`.
    pub relay_ca_key: PathBuf,
    /// The snapshot token.
    pub token: TokenSource,
    /// TLS for the snapshot server, when configured.
    pub tls: Option<TlsFiles>,
    /// The operator's namespace (Lease, Secret); default: the client's.
    pub namespace: Option<String>,
    /// Leader Lease name.
    pub lease_name: String,
    /// This replica's identity; default: `$POD_NAME`, else host name and pid.
    pub identity: Option<String>,
    /// Leader election timing.
    pub lease_duration: Duration,
    /// See [`LeaderConfig::renew_deadline`].
    pub renew_deadline: Duration,
    /// See [`LeaderConfig::retry_period`].
    pub retry_period: Duration,
}

/// The three kinds, as dynamic API resources (objects are read untyped so
/// one that bypassed the schema cannot stall a whole watch).
#[derive(Clone)]
struct Kinds {
    pool: ApiResource,
    lease: ApiResource,
    route: ApiResource,
}

impl Kinds {
    fn new() -> Self {
        Kinds {
            pool: ApiResource::erase::<IPPool>(&()),
            lease: ApiResource::erase::<VMLease>(&()),
            route: ApiResource::erase::<SshRoute>(&()),
        }
    }

    fn of(&self, key: &ObjKey) -> &ApiResource {
        match key {
            ObjKey::Pool(_) => &self.pool,
            ObjKey::Lease(_) => &self.lease,
            ObjKey::Route(_) => &self.route,
        }
    }

    fn api(&self, client: &Client, key: &ObjKey) -> Api<DynamicObject> {
        let ar = self.of(key);
        match key {
            ObjKey::Pool(_) => Api::all_with(client.clone(), ar),
            ObjKey::Lease(k) | ObjKey::Route(k) => {
                Api::namespaced_with(client.clone(), &k.namespace, ar)
            }
        }
    }
}

struct Ctx {
    client: Client,
    kinds: Kinds,
    index: Mutex<Index>,
    publisher: Publisher,
    metrics: Arc<Metrics>,
    /// Events to publish (bounded: a storm of notices drops Events, counted,
    /// rather than queueing without limit).
    events: tokio::sync::mpsc::Sender<(KubeEvent, ObjectReference, String)>,
    /// Wakes the status round.
    wake: Notify,
    /// Wakes the snapshot publisher (its own task, so a routing change does
    /// not wait behind a status round).
    publish_wake: Notify,
    /// Consecutive failures per object, for backoff.
    failures: Mutex<HashMap<(String, String, String), Failures>>,
    /// What the watches showed since the last status round.
    seen: Mutex<Seen>,
}

/// Objects a watch event named since the last status round (changed, a
/// status write coming back, or deleted), so a round looks only at those:
/// O(change), not O(objects). After a relist a watch names no deletions,
/// so `everything` makes the next round look at every object (as the 30 s
/// safety-net round does).
#[derive(Default)]
struct Seen {
    keys: HashSet<ObjKey>,
    everything: bool,
}

impl Ctx {
    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        // A panic while holding the lock is a bug elsewhere; the index itself
        // is still consistent between calls, so keep going.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn admit(&self, kind: Kind, obj: &DynamicObject) {
        if self.index().apply(kind, obj) {
            self.publish_wake.notify_one();
            self.wake.notify_one();
        }
    }

    fn remove(&self, key: &ObjKey) {
        if self.index().remove(key) {
            self.publish_wake.notify_one();
            self.wake.notify_one();
        }
    }

    /// Notes what a watch event names and wakes the status round.
    fn saw(&self, kind: Kind, ev: &Result<watcher::Event<DynamicObject>, watcher::Error>) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match ev {
            Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => {
                if let Some(k) = key_of(kind, o) {
                    seen.keys.insert(k);
                }
            }
            Ok(watcher::Event::InitDone) => seen.everything = true,
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) | Err(_) => return,
        }
        drop(seen);
        self.wake.notify_one();
    }

    fn take_seen(&self) -> Seen {
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Publishes the snapshot now if the world changed.
    fn publish_if_changed(&self) {
        publish_if_dirty(&mut self.index(), &self.publisher, &self.metrics);
    }
}

/// The one place snapshots are published from (the publish task, a lease's
/// cleanup, and the status round before it plans).
fn publish_if_dirty(idx: &mut Index, publisher: &Publisher, metrics: &Metrics) {
    let first = publisher.current_version().is_none();
    let Some(change) = idx.snapshot_change(Timestamp::now().as_millisecond(), first) else {
        return;
    };
    // Only the changed objects are checked and sent: O(change).
    let published = publisher.prepare_delta(&change).and_then(|p| {
        let served = p.change().cloned();
        publisher.commit(p).map(|v| (v, served))
    });
    match published {
        Ok((v, served)) => {
            idx.published(served.as_ref());
            metrics
                .snapshot_version
                .set(i64::try_from(v.version).unwrap_or(i64::MAX));
            debug!(version = %format!("e{}.v{}", v.epoch, v.version), "snapshot published");
        }
        // The change stays pending: the next publish proposes it again.
        Err(e) => error!("snapshot not published (consistency check failed): {e}"),
    }
}

#[derive(Debug, thiserror::Error)]
enum ReconcileError {
    /// The finalizer patch's `test` operation failed (422, "test failed") or
    /// conflicted (409): this reconcile saw an older object than the server
    /// holds (after a relist under churn, say). The watch brings the newer
    /// one; retried soon without escalating the backoff (up to
    /// [`STALE_RETRIES`] times in a row), or a burst of stale views would
    /// park every object for minutes.
    #[error("stale view of the object: {0}")]
    Stale(String),
    #[error("{0}")]
    Other(String),
}

impl ReconcileError {
    fn of(e: kube::runtime::finalizer::Error<ReconcileError>) -> ReconcileError {
        use kube::runtime::finalizer::Error as F;
        match &e {
            // 422 is any validation failure too: only a failed `test`
            // operation means the view was stale.
            F::AddFinalizer(kube::Error::Api(s)) | F::RemoveFinalizer(kube::Error::Api(s))
                if s.code == 409 || (s.code == 422 && s.message.contains("test failed")) =>
            {
                ReconcileError::Stale(e.to_string())
            }
            _ => ReconcileError::Other(e.to_string()),
        }
    }
}

fn identity_default() -> String {
    if let Ok(p) = std::env::var("POD_NAME")
        && !p.is_empty()
    {
        return p;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "keyway-operator".into());
    format!("{host}-{}", std::process::id())
}

/// Reads the relay CA's public key from its private key file (OpenSSH, or
/// ed25519 in PKCS#8 PEM as the Helm chart generates it) or a `.pub` line.
fn relay_ca_public(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the relay CA {}", path.display()))?;
    let public = crate::relay_ca::public_key(&text)
        .with_context(|| format!("the relay CA {}", path.display()))?;
    crate::local::secrets::trust_line(&public)
}

async fn read_token(client: &Client, namespace: &str, source: &TokenSource) -> Result<String> {
    let token = match source {
        TokenSource::File(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading the snapshot token {}", p.display()))?,
        TokenSource::Secret { name, key } => {
            let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
            let secret = api
                .get(name)
                .await
                .with_context(|| format!("reading Secret {namespace}/{name}"))?;
            let bytes = secret
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|b| b.0.clone())
                .or_else(|| {
                    secret
                        .string_data
                        .as_ref()
                        .and_then(|d| d.get(key))
                        .map(|s| s.as_bytes().to_vec())
                })
                .ok_or_else(|| anyhow!("Secret {namespace}/{name} has no key {key:?}"))?;
            String::from_utf8(bytes)
                .with_context(|| format!("Secret {namespace}/{name} key {key:?} is not UTF-8"))?
        }
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        bail!("the snapshot token is empty");
    }
    Ok(token)
}

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Lists every object of a kind, retrying transient errors with backoff.
async fn list_all(
    api: &Api<DynamicObject>,
    what: &str,
    stop: &watch::Receiver<bool>,
) -> Result<Vec<DynamicObject>> {
    let mut delay = Duration::from_millis(200);
    loop {
        match api.list(&ListParams::default()).await {
            Ok(l) => return Ok(l.items),
            Err(e) => {
                if *stop.borrow() {
                    bail!("stopped while listing {what}");
                }
                warn!("listing {what}: {e}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// Runs cluster mode until SIGTERM/SIGINT (clean exit, Lease handed back) or
/// until leadership is lost (error: the process restarts and re-reads
/// everything rather than trusting state from a term it no longer holds).
pub async fn run(opts: ClusterOptions) -> Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let namespace = opts
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let identity = opts.identity.clone().unwrap_or_else(identity_default);
    // Configuration errors surface now, not after winning an election.
    let relay_ca_public_key = relay_ca_public(&opts.relay_ca_key)?;
    if let TokenSource::File(_) = &opts.token {
        read_token(&client, &namespace, &opts.token).await?;
    }
    let tls = match &opts.tls {
        Some(t) => Some(ServerTls {
            cert_pem: std::fs::read(&t.cert)
                .with_context(|| format!("reading {}", t.cert.display()))?,
            key_pem: std::fs::read(&t.key)
                .with_context(|| format!("reading {}", t.key.display()))?,
        }),
        None => None,
    };
    let leader_config = LeaderConfig {
        namespace: namespace.clone(),
        name: opts.lease_name.clone(),
        identity: identity.clone(),
        lease_duration: opts.lease_duration,
        renew_deadline: opts.renew_deadline,
        retry_period: opts.retry_period,
    };
    leader_config.check()?;

    let metrics = Metrics::new()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics_listener = tokio::net::TcpListener::bind(opts.metrics_listen)
        .await
        .with_context(|| format!("binding the metrics listener to {}", opts.metrics_listen))?;
    let metrics_task = {
        let metrics = metrics.clone();
        let stop = stopped(stop_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = super::metrics::serve(metrics_listener, metrics, stop).await {
                warn!("{e:#}");
            }
        })
    };
    info!(%namespace, %identity, lease = %opts.lease_name, "cluster mode: waiting for leadership");

    let signal = shutdown_signal();
    tokio::pin!(signal);
    let leadership = tokio::select! {
        l = leader::acquire(Api::<Lease>::namespaced(client.clone(), &namespace), leader_config) => l?,
        () = &mut signal => {
            info!("shutting down (standby)");
            let _ = stop_tx.send(true);
            let _ = metrics_task.await;
            return Ok(());
        }
    };
    metrics.leader.set(1);
    metrics
        .snapshot_epoch
        .set(i64::try_from(leadership.epoch).unwrap_or(i64::MAX));
    let mut lost = leadership.lost.clone();
    let settings = Settings {
        public_ssh_port: opts.public_ssh_port,
        relay_ca_public_key,
        relay_cert_validity_secs: opts.relay_cert_validity_secs,
    };
    let outcome = tokio::select! {
        r = lead(client, &opts, &namespace, &identity, leadership.epoch, settings, tls, metrics.clone(), stop_rx.clone()) => {
            r.map(|()| "stopped")
        }
        _ = lost.wait_for(|l| *l) => Err(anyhow!("lost leadership")),
        () = &mut signal => Ok("signal"),
    };
    let _ = stop_tx.send(true);
    metrics.set_ready(false);
    metrics.leader.set(0);
    match outcome {
        Ok(why) => {
            info!(why, "shutting down; handing the Lease back");
            leadership.release().await;
            let _ = tokio::time::timeout(Duration::from_secs(5), metrics_task).await;
            Ok(())
        }
        Err(e) => {
            // Unless the Lease is already someone else's, hand it back so a
            // healthy replica can lead while this one restarts.
            if !*lost.borrow() {
                leadership.release().await;
            }
            Err(e.context("the operator stops so a fresh start re-reads every object"))
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn lead(
    client: Client,
    opts: &ClusterOptions,
    namespace: &str,
    identity: &str,
    epoch: u64,
    settings: Settings,
    tls: Option<ServerTls>,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    // The Secret may be created after the operator (an install applying
    // everything at once): wait for it, saying what is missing.
    let mut delay = Duration::from_millis(500);
    let token = loop {
        match read_token(&client, namespace, &opts.token).await {
            Ok(t) => break t,
            Err(e) if !*stop.borrow() => {
                error!("{e:#}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(e),
        }
    };
    let kinds = Kinds::new();
    // Assigned-first: every lease's recorded IP is taken back before anything
    // new is allocated (the controllers start only after this).
    let pools = list_all(
        &Api::all_with(client.clone(), &kinds.pool),
        "IPPools",
        &stop,
    )
    .await?;
    let leases = list_all(
        &Api::all_with(client.clone(), &kinds.lease),
        "VMLeases",
        &stop,
    )
    .await?;
    let routes = list_all(
        &Api::all_with(client.clone(), &kinds.route),
        "SshRoutes",
        &stop,
    )
    .await?;
    let index = Index::restore(settings, &pools, &leases, &routes);
    info!(
        pools = pools.len(),
        leases = leases.len(),
        routes = routes.len(),
        epoch,
        "restored allocations from status"
    );
    let publisher = Publisher::new(epoch);
    metrics.watch_publisher(&publisher);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(identity.to_string()),
        },
    );
    let (events, events_rx) = tokio::sync::mpsc::channel(EVENT_QUEUE);
    let events_task = tokio::spawn(event_loop(recorder, events_rx));
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        kinds: kinds.clone(),
        index: Mutex::new(index),
        publisher: publisher.clone(),
        metrics: metrics.clone(),
        events,
        wake: Notify::new(),
        publish_wake: Notify::new(),
        failures: Mutex::new(HashMap::new()),
        seen: Mutex::new(Seen {
            keys: HashSet::new(),
            everything: true,
        }),
    });
    ctx.publish_if_changed();

    let listener = tokio::net::TcpListener::bind(opts.grpc_listen)
        .await
        .with_context(|| format!("binding the snapshot server to {}", opts.grpc_listen))?;
    let server = {
        let publisher = publisher.clone();
        let shutdown = stopped(stop.clone());
        let mut options = ServeOptions::new(token);
        options.tls = tls;
        tokio::spawn(async move {
            keyway_snapshot::server::serve_with(listener, publisher, options, shutdown).await
        })
    };
    metrics.set_ready(true);

    let wc = watcher::Config::default();
    // As `Controller::new_with` builds it, with every watch event also
    // noted for the status round (deletions included, which the controller
    // does not reconcile).
    let controller = |kind: Kind, ar: &ApiResource| {
        let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
        let reader = writer.as_reader();
        let c = ctx.clone();
        let events = reflector::reflector(
            writer,
            watcher(Api::all_with(client.clone(), ar), wc.clone()),
        )
        .inspect(move |ev| c.saw(kind, ev))
        .applied_objects();
        Controller::for_stream_with(events, reader, ar.clone())
            .graceful_shutdown_on(stopped(stop.clone()))
    };
    let (pool_ctl, lease_ctl, route_ctl) = (
        controller(Kind::Pool, &kinds.pool),
        controller(Kind::Lease, &kinds.lease),
        controller(Kind::Route, &kinds.route),
    );
    let stores = [pool_ctl.store(), lease_ctl.store(), route_ctl.store()];
    let drive = |name: &'static str| {
        move |r: Result<_, kube::runtime::controller::Error<ReconcileError, watcher::Error>>| {
            if let Err(e) = r {
                debug!(controller = name, "{e}");
            }
            std::future::ready(())
        }
    };
    let controllers = futures::future::join3(
        pool_ctl
            .run(reconcile_pool, error_policy, ctx.clone())
            .for_each(drive("IPPool")),
        lease_ctl
            .run(reconcile_lease, error_policy, ctx.clone())
            .for_each(drive("VMLease")),
        route_ctl
            .run(reconcile_route, error_policy, ctx.clone())
            .for_each(drive("SshRoute")),
    );
    let rounds = async {
        tokio::join!(
            status_loop(ctx.clone(), stores, stop.clone()),
            publish_loop(ctx.clone(), stop.clone())
        );
    };
    info!(grpc = %opts.grpc_listen, "leading: controllers started");
    tokio::select! {
        _ = controllers => {}
        () = rounds => {}
    }
    events_task.abort();
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Err(e))) => warn!("snapshot server: {e:#}"),
        Ok(Err(e)) => warn!("snapshot server task: {e}"),
        _ => {}
    }
    Ok(())
}

fn obj_id(obj: &DynamicObject) -> (String, String) {
    (
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.metadata.name.clone().unwrap_or_default(),
    )
}

fn reconciled(ctx: &Ctx, kind: Kind, obj: &DynamicObject) {
    let (ns, name) = obj_id(obj);
    ctx.failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&(kind.name().to_string(), ns, name));
    ctx.metrics
        .reconciles
        .with_label_values(&[kind.name(), "ok"])
        .inc();
}

/// Retry after a stale view (the watch normally delivers the newer object
/// first, which reconciles at once).
const STALE_RETRY: Duration = Duration::from_secs(2);
/// Stale views retried at [`STALE_RETRY`] before backing off.
const STALE_RETRIES: u32 = 10;

fn obj_kind(obj: &DynamicObject) -> String {
    obj.types
        .as_ref()
        .map(|t| t.kind.clone())
        .unwrap_or_else(|| "object".into())
}

/// Safety-net resync of each object.
const RESYNC: Duration = Duration::from_secs(600);

async fn reconcile_pool(obj: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    Ok(reconcile_plain(Kind::Pool, &obj, &ctx))
}

async fn reconcile_route(obj: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    Ok(reconcile_plain(Kind::Route, &obj, &ctx))
}

/// Pools and routes carry no finalizer: admitted while they live, removed
/// when marked for deletion (or swept once gone).
fn reconcile_plain(kind: Kind, obj: &DynamicObject, ctx: &Ctx) -> Action {
    match key_of(kind, obj) {
        Some(key) if is_deleting(obj) => ctx.remove(&key),
        Some(_) => ctx.admit(kind, obj),
        None => {}
    }
    reconciled(ctx, kind, obj);
    Action::requeue(RESYNC)
}

/// Leases carry the finalizer: an IP is allocated only once it is in place,
/// and the object goes only after its IP is released and a snapshot without
/// its routes is published.
async fn reconcile_lease(obj: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    let (ns, _) = obj_id(&obj);
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &ctx.kinds.lease);
    let c = ctx.clone();
    let action = finalizer(&api, FINALIZER, obj.clone(), |ev| async move {
        match ev {
            FinalizerEvent::Apply(o) => {
                c.admit(Kind::Lease, &o);
                Ok::<_, ReconcileError>(Action::requeue(RESYNC))
            }
            FinalizerEvent::Cleanup(o) => {
                if let Some(key) = key_of(Kind::Lease, &o) {
                    c.remove(&key);
                    c.publish_if_changed();
                }
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(ReconcileError::of)?;
    reconciled(&ctx, Kind::Lease, &obj);
    Ok(action)
}

/// Transient errors retry with per-object exponential backoff (0.5 s … 5 min);
/// nothing here can stop the controller. A stale view retries sooner (about
/// 2 s, jittered so a relist's burst of them spreads out), but only
/// [`STALE_RETRIES`] times in a row: a view that stays stale is not catching
/// up, and backs off like any other failure.
fn error_policy(obj: Arc<DynamicObject>, err: &ReconcileError, ctx: Arc<Ctx>) -> Action {
    let kind = obj_kind(&obj);
    let (ns, name) = obj_id(&obj);
    let stale = matches!(err, ReconcileError::Stale(_));
    let (stale_n, errors_n) = {
        let mut f = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
        let f = f
            .entry((kind.clone(), ns.clone(), name.clone()))
            .or_default();
        if stale {
            f.stale = f.stale.saturating_add(1);
        }
        // Stale views beyond the quick retries back off like errors.
        if !stale || f.stale > STALE_RETRIES {
            f.errors = f.errors.saturating_add(1);
        }
        (f.stale, f.errors)
    };
    if let ReconcileError::Stale(e) = err {
        ctx.metrics
            .reconciles
            .with_label_values(&[kind.as_str(), "stale"])
            .inc();
        if stale_n <= STALE_RETRIES {
            debug!(object = ?obj_id(&obj), attempt = stale_n, "{e}; retrying");
            return Action::requeue(STALE_RETRY.mul_f64(0.5 + rand::random::<f64>()));
        }
    } else {
        ctx.metrics
            .reconciles
            .with_label_values(&[&kind, "error"])
            .inc();
    }
    let delay = Duration::from_millis(500)
        .saturating_mul(1u32 << errors_n.min(10).saturating_sub(1))
        .min(Duration::from_secs(300));
    warn!(%kind, namespace = %ns, %name, attempt = errors_n, retry_in = ?delay, "reconcile failed: {err}");
    Action::requeue(delay)
}

/// Consecutive failures of one object: errors (exponential backoff) and
/// stale views (quick retries, [`STALE_RETRIES`] of them before they count
/// as errors).
#[derive(Debug, Default)]
struct Failures {
    errors: u32,
    stale: u32,
}

/// An object as its watch shows it now.
fn lookup(
    stores: &[Store<DynamicObject>; 3],
    kinds: &Kinds,
    key: &ObjKey,
) -> Option<Arc<DynamicObject>> {
    let (namespace, name) = key.namespace_name();
    let r = ObjectRef::new_with(name, kinds.of(key).clone());
    let r = if namespace.is_empty() {
        r
    } else {
        r.within(namespace)
    };
    let store = match key {
        ObjKey::Pool(_) => &stores[0],
        ObjKey::Lease(_) => &stores[1],
        ObjKey::Route(_) => &stores[2],
    };
    store.get(&r)
}

/// Every object the watches show, and those of them not being deleted.
fn observe(stores: &[Store<DynamicObject>; 3]) -> (Observed, HashSet<ObjKey>) {
    let mut observed = Observed::new();
    let mut present = HashSet::new();
    for (kind, store) in Kind::ALL.into_iter().zip(stores) {
        for o in store.state() {
            if let Some(k) = key_of(kind, &o) {
                if !is_deleting(&o) {
                    present.insert(k.clone());
                }
                observed.insert(k, o);
            }
        }
    }
    (observed, present)
}

/// The status round: runs when an object was admitted or removed, when a
/// subscriber acknowledged a snapshot, and every 30 s as a safety net.
async fn status_loop(
    ctx: Arc<Ctx>,
    stores: [Store<DynamicObject>; 3],
    mut stop: watch::Receiver<bool>,
) {
    for s in &stores {
        // Until each watch has listed once, an empty store would read as
        // "everything was deleted".
        if s.wait_until_ready().await.is_err() {
            return;
        }
    }
    let mut acks = ctx.publisher.acks_changed();
    // Statuses written whose watch event has not come back yet: (resourceVersion
    // seen when written, what was written). Keeps a slow watch from causing
    // the same write twice.
    let mut inflight: HashMap<ObjKey, (Option<String>, serde_json::Value)> = HashMap::new();
    // The safety net looks at every object once per period, however busy
    // the watches keep the loop.
    let mut full = tokio::time::interval(SAFETY_NET);
    full.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    full.reset();
    loop {
        let failed = round(&ctx, &stores, &mut inflight).await;
        // Objects left for the next batch: go on at once.
        let pending = ctx.index().plan_pending();
        // A failed write waits its second first: the objects it left to plan
        // again must not make the next round follow at once.
        let retry = async {
            if failed {
                tokio::time::sleep(Duration::from_secs(1)).await;
            } else if !pending {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = ctx.wake.notified() => {}
            _ = acks.changed() => {}
            () = retry => {}
            _ = full.tick() => {
                ctx.seen.lock().unwrap_or_else(|p| p.into_inner()).everything = true;
            }
            _ = stop.wait_for(|s| *s) => return,
        }
        // Let a burst of changes land in one round.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How often a status round looks at every object, not only those watch
/// events named.
const SAFETY_NET: Duration = Duration::from_secs(30);

/// Publishes the snapshot soon after every admitted change (bursts coalesce:
/// a change that lands while a snapshot is being built goes into the next).
async fn publish_loop(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = ctx.publish_wake.notified() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        let started = std::time::Instant::now();
        let c = ctx.clone();
        // Building a large snapshot is CPU work: keep it off the reactor.
        if let Err(e) = tokio::task::spawn_blocking(move || c.publish_if_changed()).await {
            error!("publishing the snapshot: {e}");
        }
        // Under a burst (more changes arrived while this one was built) rest
        // as long as the build took, so publishing takes at most half the
        // time and allocation and status writes keep up. A lone edit is
        // published at once.
        if ctx.index().is_dirty() {
            tokio::time::sleep(started.elapsed()).await;
        }
    }
}

/// Objects a round finds gone (deleted, or being deleted).
enum Gone {
    /// Every admitted object but these (a round that looked at everything).
    AllBut(HashSet<ObjKey>),
    /// These (a round that looked at what watch events named).
    These(Vec<ObjKey>),
}

/// One round; returns whether a write failed (retried soon). It looks at
/// the objects watch events named since the last round, or at every object
/// after a relist and every 30 s (the safety net).
async fn round(
    ctx: &Arc<Ctx>,
    stores: &[Store<DynamicObject>; 3],
    inflight: &mut HashMap<ObjKey, (Option<String>, serde_json::Value)>,
) -> bool {
    let started = std::time::Instant::now();
    let seen = ctx.take_seen();
    let (observed, changed, gone): (Observed, Vec<ObjKey>, Gone) = if seen.everything {
        let (observed, present) = observe(stores);
        let changed = observed.keys().cloned().collect();
        inflight
            .retain(|k, (rv, _)| observed.get(k).map(|o| &o.metadata.resource_version) == Some(rv));
        (observed, changed, Gone::AllBut(present))
    } else {
        let mut observed = Observed::new();
        let mut gone = Vec::new();
        for key in seen.keys {
            match lookup(stores, &ctx.kinds, &key) {
                Some(o) => {
                    if is_deleting(&o) {
                        gone.push(key.clone());
                    }
                    // A watch event: an in-flight write came back (or was
                    // overtaken), so it no longer stands for the status.
                    if inflight
                        .get(&key)
                        .is_some_and(|(rv, _)| o.metadata.resource_version != *rv)
                    {
                        inflight.remove(&key);
                    }
                    observed.insert(key, o);
                }
                None => {
                    inflight.remove(&key);
                    gone.push(key);
                }
            }
        }
        let changed = observed.keys().cloned().collect();
        (observed, changed, Gone::These(gone))
    };
    let find = |k: &ObjKey| {
        observed
            .get(k)
            .cloned()
            .or_else(|| lookup(stores, &ctx.kinds, k))
    };
    let (writes, notices) = {
        let mut idx = ctx.index();
        // Asked again under the index lock: an object recreated under the
        // same name since the stores were read is in the store by now if the
        // controller admitted it (the reflector writes before it triggers).
        let still_gone = |k: &ObjKey| lookup(stores, &ctx.kinds, k).is_none_or(|o| is_deleting(&o));
        let swept = match &gone {
            Gone::AllBut(present) => idx.sweep(present, still_gone),
            Gone::These(keys) => keys
                .iter()
                .filter(|k| still_gone(k))
                .filter(|k| idx.remove(k))
                .count(),
        };
        if swept > 0 {
            debug!(swept, "objects gone without a finalizer");
        }
        let t0 = std::time::Instant::now();
        publish_if_dirty(&mut idx, &ctx.publisher, &ctx.metrics);
        let published = t0.elapsed();
        let acks = keyway_core::routed::acks(&ctx.publisher.subscribers());
        ctx.metrics
            .subscribers
            .set(i64::try_from(acks.iter().filter(|a| a.connected).count()).unwrap_or(0));
        ctx.metrics.pool.set_all(&idx.pool_stats());
        for (kind, n) in idx.counts() {
            ctx.metrics
                .objects
                .with_label_values(&[kind.name()])
                .set(i64::try_from(n).unwrap_or(0));
        }
        let plan = idx.plan_changed(&changed, find, &acks, Timestamp::now());
        debug!(
            observe = ?(t0 - started),
            publish = ?published,
            plan = ?(t0.elapsed() - published),
            writes = plan.len(),
            looked_at = changed.len(),
            everything = seen.everything,
            "status round"
        );
        (plan, idx.take_notices())
    };
    ctx.metrics
        .round_seconds
        .observe(started.elapsed().as_secs_f64());
    ctx.metrics.rounds.inc();
    let writes: Vec<(StatusWrite, Option<String>)> = writes
        .into_iter()
        .filter(|w| inflight.get(&w.key).is_none_or(|(_, v)| *v != w.status))
        .map(|w| {
            let rv = find(&w.key).and_then(|o| o.metadata.resource_version.clone());
            (w, rv)
        })
        .collect();
    let results: Vec<(StatusWrite, Option<String>, bool)> = futures::stream::iter(writes)
        .map(|(w, rv)| {
            let ctx = ctx.clone();
            async move {
                let ok = write_status(&ctx, &w).await;
                (w, rv, ok)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let mut failed = false;
    for (w, rv, ok) in results {
        if ok {
            inflight.insert(w.key, (rv, w.status));
        } else {
            ctx.index().replan(w.key);
            failed = true;
        }
    }
    for n in notices {
        let uid = find(&n.object).and_then(|o| o.metadata.uid.clone());
        publish_event(ctx, uid, n);
    }
    failed
}

async fn write_status(ctx: &Ctx, w: &StatusWrite) -> bool {
    let (_, name) = w.key.namespace_name();
    let ar = ctx.kinds.of(&w.key);
    let api = ctx.kinds.api(&ctx.client, &w.key);
    let body = serde_json::json!({
        "apiVersion": ar.api_version,
        "kind": ar.kind,
        "status": w.status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let kind = w.key.kind().name();
    match api.patch_status(name, &params, &Patch::Apply(&body)).await {
        Ok(_) => {
            ctx.metrics
                .status_writes
                .with_label_values(&[kind, "ok"])
                .inc();
            true
        }
        Err(kube::Error::Api(s)) if s.code == 404 => {
            // Deleted between the watch and the write: nothing to do.
            ctx.metrics
                .status_writes
                .with_label_values(&[kind, "gone"])
                .inc();
            true
        }
        Err(e) => {
            ctx.metrics
                .status_writes
                .with_label_values(&[kind, "error"])
                .inc();
            warn!(object = ?w.key, "writing status: {e}");
            false
        }
    }
}

fn publish_event(ctx: &Arc<Ctx>, uid: Option<String>, n: Notice) {
    let key = n.object.clone();
    let (namespace, name) = key.namespace_name();
    let ar = ctx.kinds.of(&key);
    let reference = ObjectReference {
        api_version: Some(ar.api_version.clone()),
        kind: Some(ar.kind.clone()),
        name: Some(name.to_string()),
        namespace: (!namespace.is_empty()).then(|| namespace.to_string()),
        uid,
        resource_version: None,
        field_path: None,
    };
    n.log();
    let object = key.to_string();
    let event = KubeEvent {
        type_: match n.severity {
            Severity::Normal => EventType::Normal,
            Severity::Warning => EventType::Warning,
        },
        reason: n.reason.to_string(),
        note: Some(n.message.chars().take(1000).collect()),
        action: n.reason.to_string(),
        secondary: None,
    };
    match ctx.events.try_send((event, reference, object)) {
        Ok(()) => ctx.metrics.events.with_label_values(&[n.reason]).inc(),
        Err(_) => ctx.metrics.events.with_label_values(&["Dropped"]).inc(),
    }
}

/// Events waiting to be published at most.
const EVENT_QUEUE: usize = 4096;
/// Events published at once.
const EVENT_CONCURRENCY: usize = 8;

/// Publishes Events, a few at a time. Best effort: a failure is logged and
/// the Event dropped, never retried in a loop.
async fn event_loop(
    recorder: Recorder,
    mut rx: tokio::sync::mpsc::Receiver<(KubeEvent, ObjectReference, String)>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(EVENT_CONCURRENCY));
    while let Some((event, reference, object)) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let recorder = recorder.clone();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                warn!(%object, "publishing an Event: {e}");
            }
            drop(permit);
        });
    }
}
