//! The SSH gateway: the listener, each connection's lifecycle, limits,
//! settlement and drain. The russh handler lives in [`ssh`]; what happens to
//! a channel lives in [`relay`] (through an upstream SSH login) and
//! [`direct`] (straight TCP to a lease's target).
//!
//! Every connection is one task that owns a cancellation token. Channels are
//! tasks of their own that end with that token, so nothing outlives its
//! connection, and cancelling it (auth deadline, settlement, drain) closes
//! the socket for certain (see [`stream`]).

pub mod audit;
pub mod backend;
pub mod budget;
pub mod connect;
pub mod direct;
pub mod flow;
pub mod proxy_header;
pub mod relay;
pub mod sources;
pub mod ssh;
pub mod stream;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::keys::RelayIssuer;
use crate::metrics::Metrics;
use crate::routes::{Destination, RouteTable};

/// Caps and deadlines; every one has a flag.
#[derive(Clone, Debug)]
pub struct Limits {
    /// From accept to authenticated.
    pub auth_timeout: Duration,
    /// Connections still handshaking or authenticating. When full, a new
    /// connection evicts the oldest of them (like sshd's MaxStartups, but
    /// deterministic): a flood of stalled handshakes cannot lock real users
    /// out, because a real handshake finishes in milliseconds.
    pub max_unauthenticated: usize,
    /// All open connections.
    pub max_connections: usize,
    /// Open channels per authenticated connection (sessions and forwards):
    /// each holds a task, buffers and often an upstream channel, so one
    /// client cannot open them without bound. Beyond it a channel open is
    /// refused with "resource shortage".
    pub max_channels: usize,
    /// Dialing a target (TCP, plus the SSH login for relays).
    pub connect_timeout: Duration,
    /// How long SIGTERM waits for connections to finish.
    pub drain: Duration,
    /// Messages buffered per channel before russh pushes back.
    pub channel_buffer: usize,
    /// Idle upstream SSH connections are kept this long for reuse.
    pub upstream_idle: Duration,
    /// Peers whose PROXY protocol header (v1/v2) gives the destination; a
    /// header from anyone else closes the connection.
    pub trusted_proxies: proxy_header::Trusted,
    /// How long a trusted edge has to send its header. An edge writes it as
    /// soon as it connects; a connection that stays silent (a load
    /// balancer's TCP health check, a stuck edge) is closed after this
    /// instead of holding a slot for the whole handshake deadline.
    pub proxy_header_timeout: Duration,
    /// Channel windows of bridged channels (flow.rs).
    pub window: flow::WindowPolicy,
    /// Relay buffer budgets and per-user caps (budget.rs).
    pub budgets: budget::BudgetLimits,
    /// Unauthenticated connections per source (sources.rs).
    pub sources: sources::SourceLimits,
    /// Key exchanges offered (ssh.rs: no finite-field groups by default).
    pub kex: Vec<russh::kex::Name>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            auth_timeout: Duration::from_secs(30),
            max_unauthenticated: 256,
            max_connections: 10_000,
            max_channels: 64,
            connect_timeout: Duration::from_secs(10),
            drain: Duration::from_secs(30),
            channel_buffer: 64,
            upstream_idle: Duration::from_secs(30),
            trusted_proxies: proxy_header::Trusted::default(),
            proxy_header_timeout: Duration::from_secs(1),
            window: flow::WindowPolicy::default(),
            budgets: budget::BudgetLimits::default(),
            sources: sources::SourceLimits::default(),
            kex: ssh::DEFAULT_KEX.to_vec(),
        }
    }
}

/// What a connection authenticated as; kept to re-check it against every
/// new snapshot.
#[derive(Clone, Debug)]
pub struct AuthInfo {
    pub user: String,
    pub dst: IpAddr,
    pub fingerprint: Option<String>,
    pub dest: Arc<Destination>,
}

struct Pending {
    cancel: CancellationToken,
    /// Set once the connection authenticated or ended.
    done: Arc<AtomicBool>,
}

struct Live {
    auth: AuthInfo,
    handle: russh::server::Handle,
    cancel: CancellationToken,
}

/// An open CONNECT/upgrade tunnel, settled like SSH connections.
struct Tunnel {
    key: crate::routes::DestKey,
    label: String,
    cancel: CancellationToken,
}

/// State shared by every connection.
pub struct Gateway {
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    table: watch::Receiver<Arc<RouteTable>>,
    pub relay: Option<Arc<RelayIssuer>>,
    /// Relay certificate lifetime, from the snapshot.
    pub cert_validity_secs: AtomicU64,
    pub upstreams: relay::Upstreams,
    /// What tenants, and all of them, may hold.
    pub budgets: Arc<budget::Budgets>,
    sources: Arc<sources::Sources>,
    /// The libp2p host provider targets are dialed through.
    pub p2p: keyway_tunnel::p2p::Host,
    ssh_config: Arc<russh::server::Config>,
    live: std::sync::Mutex<HashMap<u64, Live>>,
    tunnels: std::sync::Mutex<HashMap<u64, Tunnel>>,
    next_id: AtomicU64,
    pending: std::sync::Mutex<VecDeque<Pending>>,
    total: Arc<Semaphore>,
    /// Cancelled at the end of the drain: every connection ends.
    kill: CancellationToken,
}

impl Gateway {
    pub fn new(
        host_key: ssh_key::PrivateKey,
        limits: Limits,
        metrics: Arc<Metrics>,
        relay: Option<Arc<RelayIssuer>>,
        table: watch::Receiver<Arc<RouteTable>>,
        p2p: keyway_tunnel::p2p::Host,
    ) -> Arc<Self> {
        let ssh_config = ssh::server_config(host_key, &limits);
        Arc::new(Gateway {
            pending: Default::default(),
            total: Arc::new(Semaphore::new(limits.max_connections)),
            upstreams: relay::Upstreams::default(),
            budgets: budget::Budgets::new(limits.budgets, metrics.relay_reserved_bytes.clone()),
            sources: sources::Sources::new(limits.sources),
            limits,
            metrics,
            table,
            relay,
            p2p,
            cert_validity_secs: AtomicU64::new(300),
            ssh_config: Arc::new(ssh_config),
            live: Default::default(),
            tunnels: Default::default(),
            next_id: AtomicU64::new(1),
            kill: CancellationToken::new(),
        })
    }

    /// The routing table in use.
    pub fn table(&self) -> Arc<RouteTable> {
        self.table.borrow().clone()
    }

    /// Accepts until `stop` fires, then drains: waits up to the drain
    /// deadline for connections to finish, then cuts the rest.
    pub async fn serve(self: &Arc<Self>, listeners: Vec<TcpListener>, stop: CancellationToken) {
        let mut accepts = tokio::task::JoinSet::new();
        for l in listeners {
            let gw = self.clone();
            let stop = stop.clone();
            accepts.spawn(async move { gw.accept_loop(l, stop).await });
        }
        while accepts.join_next().await.is_some() {}
        let open = self.metrics.connections_open.get();
        info!(open, deadline = ?self.limits.drain, "draining");
        let until = Instant::now() + self.limits.drain;
        while self.metrics.connections_open.get() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.metrics.connections_open.get();
        if left > 0 {
            warn!(
                left,
                "drain deadline reached; closing the remaining connections"
            );
        }
        self.kill.cancel();
        self.upstreams.close_all().await;
        let until = Instant::now() + Duration::from_secs(2);
        while self.metrics.connections_open.get() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        while let Some((tcp, peer)) = accept(&listener, &stop).await {
            let Ok(total) = self.total.clone().try_acquire_owned() else {
                self.metrics
                    .connections
                    .with_label_values(&["refused_limit"])
                    .inc();
                drop(tcp);
                continue;
            };
            let cancel = self.kill.child_token();
            let done = Arc::new(AtomicBool::new(false));
            self.admit_unauthenticated(Pending {
                cancel: cancel.clone(),
                done: done.clone(),
            });
            let gw = self.clone();
            tokio::spawn(async move {
                gw.serve_conn(tcp, peer, cancel, done).await;
                drop(total);
            });
        }
    }

    async fn serve_conn(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        cancel: CancellationToken,
        done: Arc<AtomicBool>,
    ) {
        let done_on_exit = done.clone();
        let _done = scopeguard(move || done_on_exit.store(true, Ordering::Relaxed));
        let m = self.metrics.clone();
        m.connections.with_label_values(&["accepted"]).inc();
        m.connections_open.inc();
        m.unauthenticated.inc();
        let _open = scopeguard(move || m.connections_open.dec());
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + self.limits.auth_timeout);
        let mut tcp = tcp;
        let mut peer = peer;
        let mut local = match tcp.local_addr() {
            Ok(a) => a,
            Err(e) => {
                debug!(%peer, "no local address: {e}");
                self.metrics.unauthenticated.dec();
                return;
            }
        };
        let _ = tcp.set_nodelay(true);
        let trusted = self.limits.trusted_proxies.contains(peer.ip());
        if trusted {
            // The edge's header says which address the user dialed; routing
            // uses it. It must come at once (and within the handshake deadline).
            let limit = self.limits.proxy_header_timeout;
            match proxy_header::read_by(&mut tcp, limit, deadline).await {
                Ok(Some((src, dst))) => {
                    debug!(edge = %peer, client = %src, dst = %dst, "PROXY header");
                    peer = src;
                    local = dst;
                }
                Ok(None) => debug!(edge = %peer, "PROXY header without addresses (LOCAL)"),
                Err(e) => {
                    proxy_header::log_refusal(peer, &e);
                    self.end_unauthenticated("proxy_header_refused", &cancel);
                    return;
                }
            }
        }
        // One source may start only so many handshakes (sources.rs).
        let mut source = match self.sources.admit(peer.ip(), Instant::now()) {
            Ok(p) => p,
            Err(r) => {
                debug!(%peer, "closing: too many handshakes from this source ({r:?})");
                self.end_unauthenticated(r.metric_label(), &cancel);
                return;
            }
        };
        // Anyone else sending a PROXY header is refused, not misrouted.
        let stream = stream::KillableStream::new(tcp, cancel.clone()).refuse_proxy_header(!trusted);
        let (auth_tx, auth_rx) = tokio::sync::oneshot::channel();
        let session = Arc::new(audit::Session::new(
            self.next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            local,
        ));
        let handler = ssh::Conn::new(self.clone(), session.clone(), auth_tx, cancel.clone());
        let running = tokio::time::timeout_at(
            deadline,
            russh::server::run_stream(self.ssh_config.clone(), stream, handler),
        )
        .await;
        let running = match running {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let e = format!("{e:?}");
                if e.contains(stream::UNTRUSTED_PROXY_HEADER) {
                    warn!(%peer, "closing: a PROXY header from a peer not in --trusted-proxy-cidrs");
                    self.end_unauthenticated("proxy_header_refused", &cancel);
                } else {
                    debug!(%peer, "handshake failed: {e}");
                    self.end_unauthenticated("closed_unauthenticated", &cancel);
                }
                return;
            }
            Err(_) => {
                debug!(%peer, "no SSH identification before the auth deadline");
                self.end_unauthenticated("auth_timeout", &cancel);
                return;
            }
        };
        let handle = running.handle();
        tokio::pin!(running);
        let auth = tokio::select! {
            r = &mut running => {
                debug!(%peer, "closed before authenticating: {:?}", r.err());
                self.end_unauthenticated("closed_unauthenticated", &cancel);
                return;
            }
            a = auth_rx => match a {
                Ok(a) => a,
                Err(_) => {
                    self.end_unauthenticated("closed_unauthenticated", &cancel);
                    let _ = tokio::time::timeout(Duration::from_secs(1), &mut running).await;
                    return;
                }
            },
            () = tokio::time::sleep_until(deadline) => {
                debug!(%peer, "authentication deadline passed");
                self.end_unauthenticated("auth_timeout", &cancel);
                let _ = tokio::time::timeout(Duration::from_secs(1), &mut running).await;
                return;
            }
        };
        self.metrics.unauthenticated.dec();
        done.store(true, Ordering::Relaxed);
        source.done();
        self.metrics
            .connections
            .with_label_values(&["authenticated"])
            .inc();
        self.metrics
            .handshake_seconds
            .observe(started.elapsed().as_secs_f64());
        let mode = audit::mode(auth.dest.via);
        info!(%peer, dst = %local, user = %auth.user, to = %auth.dest.label, mode, "authenticated");
        // The tenant's connection cap; the client is told why.
        let _slot = match self.budgets.connection(&auth.dest.tenant) {
            Ok(s) => s,
            Err(r) => {
                self.refused(&r);
                info!(%peer, to = %auth.dest.label, "connection refused: {r}");
                session.ended(&auth, &format!("refused: {r}"));
                let _ = tokio::time::timeout(
                    Duration::from_millis(300),
                    handle.disconnect(
                        russh::Disconnect::TooManyConnections,
                        format!("keyway: {r}"),
                        String::new(),
                    ),
                )
                .await;
                let _ = tokio::time::timeout(Duration::from_secs(1), &mut running).await;
                cancel.cancel();
                return;
            }
        };
        let gauge = self.metrics.sessions_active.with_label_values(&[mode]);
        gauge.inc();
        let id = session.id;
        let audit_auth = auth.clone();
        let still_routed = self
            .table()
            .decide(&auth.user, auth.dst, auth.fingerprint.as_deref())
            .is_some_and(|d| d.key == auth.dest.key);
        self.lock_live().insert(
            id,
            Live {
                auth,
                handle: handle.clone(),
                cancel: cancel.clone(),
            },
        );
        // A snapshot may have withdrawn the lease between auth and registering.
        if !still_routed {
            self.settle(id);
        }
        let _ = (&mut running).await;
        let settled = self.lock_live().remove(&id).is_none();
        gauge.dec();
        session.ended(&audit_auth, if settled { "settled" } else { "closed" });
        // Ends every channel task of this connection.
        cancel.cancel();
        debug!(%peer, "connection closed");
    }

    fn end_unauthenticated(&self, result: &str, cancel: &CancellationToken) {
        self.metrics.unauthenticated.dec();
        // An evicted connection was counted when it was evicted.
        if !cancel.is_cancelled() {
            self.metrics.connections.with_label_values(&[result]).inc();
        }
        cancel.cancel();
    }

    /// Queues a new unauthenticated connection, evicting the oldest one
    /// when the queue is at its cap.
    fn admit_unauthenticated(&self, new: Pending) {
        let mut q = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        q.retain(|p| !p.done.load(Ordering::Relaxed) && !p.cancel.is_cancelled());
        while q.len() >= self.limits.max_unauthenticated.max(1) {
            let Some(old) = q.pop_front() else { break };
            self.metrics
                .connections
                .with_label_values(&["evicted_unauthenticated"])
                .inc();
            old.cancel.cancel();
        }
        q.push_back(new);
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Live>> {
        // A poisoned map is still a consistent map (entries are whole values).
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers an open tunnel; its token is cancelled when a table no
    /// longer routes `key` (or at the end of the drain).
    pub(crate) fn register_tunnel(
        &self,
        key: crate::routes::DestKey,
        label: String,
    ) -> (u64, CancellationToken) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = self.kill.child_token();
        let routed = self.table().contains(&key);
        self.lock_tunnels().insert(
            id,
            Tunnel {
                key,
                label,
                cancel: cancel.clone(),
            },
        );
        // A snapshot may have withdrawn it between the decision and now.
        if !routed {
            self.settle_tunnel(id);
        }
        (id, cancel)
    }

    /// Forgets a tunnel that ended.
    pub(crate) fn end_tunnel(&self, id: u64) {
        self.lock_tunnels().remove(&id);
    }

    fn lock_tunnels(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Tunnel>> {
        self.tunnels.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn settle_tunnel(&self, id: u64) {
        if let Some(t) = self.lock_tunnels().remove(&id) {
            info!(to = %t.label, "route withdrawn; closing the CONNECT tunnel");
            self.metrics.settled_closed.inc();
            t.cancel.cancel();
        }
    }

    /// Applies a new table: connections and tunnels it no longer routes are
    /// closed.
    pub fn enforce(&self, table: &RouteTable) {
        let stale_tunnels: Vec<u64> = self
            .lock_tunnels()
            .iter()
            .filter(|(_, t)| !table.contains(&t.key))
            .map(|(id, _)| *id)
            .collect();
        for id in stale_tunnels {
            self.settle_tunnel(id);
        }
        let stale: Vec<u64> = self
            .lock_live()
            .iter()
            .filter(|(_, l)| {
                table
                    .decide(&l.auth.user, l.auth.dst, l.auth.fingerprint.as_deref())
                    .is_none_or(|d| d.key != l.auth.dest.key)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.settle(id);
        }
    }

    /// Tells the client why, then cuts the connection; well inside 1 s.
    fn settle(&self, id: u64) {
        let Some(live) = self.lock_live().remove(&id) else {
            return;
        };
        info!(user = %live.auth.user, to = %live.auth.dest.label, "route withdrawn; closing the connection");
        self.metrics.settled_closed.inc();
        self.metrics
            .connections
            .with_label_values(&["settled"])
            .inc();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_millis(300),
                live.handle.disconnect(
                    russh::Disconnect::ByApplication,
                    "keyway: this VM's lease was settled or withdrawn".into(),
                    String::new(),
                ),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            live.cancel.cancel();
        });
    }

    /// Counts a budget or limit refusal.
    pub fn refused(&self, r: &budget::Refusal) {
        self.metrics
            .limit_refusals
            .with_label_values(&[r.metric_label()])
            .inc();
    }

    /// Records how long reaching a target took, by kind and result.
    pub fn observe_connect(&self, kind: &str, result: &str, started: Instant) {
        self.metrics
            .upstream_connect_seconds
            .with_label_values(&[kind, result])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Runs `f` when dropped.
pub fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// The next accepted connection, or `None` once `stop` fires. Accept errors
/// (EMFILE and friends) back off instead of spinning.
pub(crate) async fn accept(
    listener: &TcpListener,
    stop: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => return Some(x),
                Err(e) => {
                    warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = stop.cancelled() => return None,
        }
    }
}

/// Binds the SSH listeners.
pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for a in addrs {
        out.push(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding the SSH listener to {a}"))?,
        );
    }
    Ok(out)
}
