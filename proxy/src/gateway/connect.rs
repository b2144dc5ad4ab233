//! The HTTPS listener (8443): HTTP/1.1 CONNECT over TLS, for users whose
//! network only lets them out on 443. The CONNECT authority is matched
//! against `tcp+https://host:port` SshRoutes and, under `--lease-domain`,
//! `<lease>.<namespace>.<domain>`; routes with `allowPublicKeys` need a
//! proof of key possession (`keyway_tunnel::proof`).
//!
//! Without a valid proof every name gets the same 403 and the same work
//! (the proof is checked against an empty key set when nothing routes the
//! name), so the answer says nothing about which routes or leases exist;
//! only after a valid proof can 502 (backend down) appear.
//! `allowUnauthenticated` routes answer without a proof, by design.
//!
//! The listener has caps of its own, apart from the SSH listener's:
//! `--https-max-connections` open connections (tunnels included),
//! `--https-max-unauthenticated` connections that have not yet had a
//! request admitted (the oldest is evicted for a new one), and
//! `--https-handshake-timeout-secs` for the PROXY header, TLS handshake and
//! request head together. A flood of idle sockets here therefore neither
//! takes the SSH listener's `--max-connections` nor locks out CONNECT users
//! (a real client finishes its handshake in milliseconds). One source (an
//! IPv4 address or IPv6 /64, after the PROXY header) may start only so many
//! TLS handshakes per second and hold only so many connections without an
//! admitted request (`sources.rs`, the SSH listener's per-source flags, in a
//! table of this listener's own); beyond that it is closed before the TLS
//! handshake, so a handshake loop cannot spend the listener's CPU.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use keyway_tunnel::proof::{self, ReplayCache};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{Gateway, backend, proxy_header};
use crate::metrics::Metrics;
use crate::routes::ConnectDecision;

/// `result` labels of `keyway_connect_requests_total`: what a request got.
pub const REQUEST_RESULTS: [&str; 5] =
    ["ok", "not_found", "forbidden", "bad_request", "bad_gateway"];

/// `result` labels of `keyway_https_connections_total`: what happened to a
/// connection before (or instead of) a request being decided.
pub const CONNECTION_RESULTS: [&str; 8] = [
    "accepted",
    "refused_limit",
    "refused_source_rate",
    "refused_source_pending",
    "evicted_unauthenticated",
    "handshake_timeout",
    "tls_failed",
    "proxy_header_refused",
];

/// The HTTPS listener's own caps and deadline (flags `--https-…`).
#[derive(Clone, Debug)]
pub struct HttpsLimits {
    /// Open connections, tunnels included; beyond it new ones are closed.
    pub max_connections: usize,
    /// Connections with no request admitted yet; when full, a new one
    /// evicts the oldest.
    pub max_unauthenticated: usize,
    /// PROXY header, TLS handshake and request head, from accept.
    pub handshake_timeout: Duration,
    /// Per-source admission of TLS handshakes: the same limits as the SSH
    /// listener's, in a table of this listener's own, so a source flooding
    /// one listener uses up nothing on the other.
    pub sources: super::sources::SourceLimits,
}

impl Default for HttpsLimits {
    fn default() -> Self {
        HttpsLimits {
            max_connections: 1000,
            max_unauthenticated: 256,
            handshake_timeout: Duration::from_secs(10),
            sources: super::sources::SourceLimits::default(),
        }
    }
}

/// Loads the listener's certificate chain and key (PEM).
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// What the CONNECT listener needs besides the gateway.
pub struct ConnectConfig {
    /// TLS identity.
    pub tls: Arc<rustls::ServerConfig>,
    /// Domain under which `<lease>.<namespace>.<domain>` names a lease.
    pub lease_domain: Option<String>,
    /// Accept the replayable plain `X-Signature` on the upgrade endpoint
    /// (off by default: a captured header would open tunnels for as long
    /// as the key stays on the lease).
    pub allow_replayable_upgrade_proofs: bool,
    /// The listener's caps.
    pub limits: HttpsLimits,
}

/// Where a connection is in its life, for the eviction queue.
const PENDING: u8 = 0;
/// A request was admitted (tunnel): never evicted.
const ADMITTED: u8 = 1;
/// Evicted by a newer connection.
const EVICTED: u8 = 2;
/// Ended without an admitted request.
const ENDED: u8 = 3;

/// A connection in the eviction queue.
struct Pending {
    state: Arc<AtomicU8>,
    evict: CancellationToken,
}

/// An HTTPS connection's place under `--https-max-connections` and in the
/// open gauge; shared by the connection and the tunnel it becomes, so the
/// place is held until the last of them ends.
struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, metrics: Arc<Metrics>) -> Arc<Self> {
        metrics.https_connections_open.inc();
        Arc::new(Slot {
            _permit: permit,
            metrics,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.https_connections_open.dec();
    }
}

/// What a request handler knows of its connection.
struct ConnCtx {
    slot: Arc<Slot>,
    state: Arc<AtomicU8>,
    /// Cancelled when a request head has arrived: the handshake deadline
    /// no longer applies.
    head: CancellationToken,
}

impl ConnCtx {
    /// Takes the connection out of the eviction queue once a request is
    /// admitted; false when it was evicted first.
    fn admit(&self) -> bool {
        match self
            .state
            .compare_exchange(PENDING, ADMITTED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(now) => now == ADMITTED,
        }
    }
}

struct Shared {
    gw: Arc<Gateway>,
    tls: tokio_rustls::TlsAcceptor,
    lease_domain: Option<String>,
    allow_replayable: bool,
    replay: Mutex<ReplayCache>,
    limits: HttpsLimits,
    /// This listener's connection cap (never the SSH listener's).
    total: Arc<Semaphore>,
    pending: Mutex<VecDeque<Pending>>,
    /// Per-source admission of handshakes (this listener's own table).
    sources: Arc<super::sources::Sources>,
}

type Reply = Response<Full<Bytes>>;

impl Shared {
    /// Counts a request outcome.
    fn count(&self, result: &str) {
        self.gw
            .metrics
            .connect_requests
            .with_label_values(&[result])
            .inc();
    }

    /// Counts a connection outcome.
    fn count_conn(&self, result: &str) {
        self.gw
            .metrics
            .https_connections
            .with_label_values(&[result])
            .inc();
    }

    /// Counts `result` and answers `status` with a one-line reason.
    fn refuse(&self, result: &str, status: StatusCode, reason: impl Into<String>) -> Reply {
        self.count(result);
        let mut r = Response::new(Full::new(Bytes::from(format!("{}\n", reason.into()))));
        *r.status_mut() = status;
        r
    }

    /// Checks a fresh `Keyway-SSHSIG` proof for `authority` against
    /// `allow` (empty when nothing routes the name: the same checks run).
    fn check_fresh(
        &self,
        header: &str,
        authority: &str,
        allow: &HashSet<String>,
    ) -> Result<String, proof::ProofError> {
        let p = proof::parse(header)?;
        let mut replay = self.replay.lock().unwrap_or_else(|e| e.into_inner());
        proof::verify(&p, authority, proof::unix_now(), allow, &mut replay)
    }

    /// Queues a new connection, evicting the oldest unadmitted ones while
    /// the queue is at its cap (the SSH listener's rule, on its own queue).
    fn admit_unauthenticated(&self, new: Pending) {
        let mut q = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        q.retain(|p| p.state.load(Ordering::Acquire) == PENDING);
        while q.len() >= self.limits.max_unauthenticated.max(1) {
            let Some(old) = q.pop_front() else { break };
            // Only a connection still pending is evicted (one admitted a
            // moment ago keeps its tunnel).
            if old
                .state
                .compare_exchange(PENDING, EVICTED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.count_conn("evicted_unauthenticated");
                old.evict.cancel();
            }
        }
        q.push_back(new);
    }
}

/// The answer to a request that names nothing routed here and to one whose
/// proof does not admit it when something is: one status for both.
const DENIED: StatusCode = StatusCode::FORBIDDEN;

impl Gateway {
    /// Serves CONNECT on `listeners` until `stop`.
    pub async fn serve_connect(
        self: &Arc<Self>,
        listeners: Vec<TcpListener>,
        config: ConnectConfig,
        stop: CancellationToken,
    ) {
        let limits = config.limits;
        let shared = Arc::new(Shared {
            gw: self.clone(),
            tls: tokio_rustls::TlsAcceptor::from(config.tls),
            lease_domain: config.lease_domain,
            allow_replayable: config.allow_replayable_upgrade_proofs,
            replay: Mutex::new(ReplayCache::new(100_000)),
            total: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            pending: Mutex::new(VecDeque::new()),
            sources: super::sources::Sources::new(limits.sources),
            limits,
        });
        let mut accepts = tokio::task::JoinSet::new();
        for l in listeners {
            info!(
                addr = ?l.local_addr().ok(),
                max_connections = shared.limits.max_connections,
                max_unauthenticated = shared.limits.max_unauthenticated,
                handshake_timeout = ?shared.limits.handshake_timeout,
                "CONNECT listener (HTTPS)"
            );
            let shared = shared.clone();
            let stop = stop.clone();
            accepts.spawn(async move { accept_loop(shared, l, stop).await });
        }
        while accepts.join_next().await.is_some() {}
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, stop: CancellationToken) {
    while let Some((tcp, peer)) = super::accept(&listener, &stop).await {
        let Ok(permit) = shared.total.clone().try_acquire_owned() else {
            // Closed at once: a full HTTPS listener costs nothing more.
            shared.count_conn("refused_limit");
            drop(tcp);
            continue;
        };
        shared.count_conn("accepted");
        let state = Arc::new(AtomicU8::new(PENDING));
        let evict = CancellationToken::new();
        shared.admit_unauthenticated(Pending {
            state: state.clone(),
            evict: evict.clone(),
        });
        let ctx = Arc::new(ConnCtx {
            slot: Slot::new(permit, shared.gw.metrics.clone()),
            state,
            head: CancellationToken::new(),
        });
        let shared = shared.clone();
        let kill = shared.gw.kill.child_token();
        tokio::spawn(async move {
            let state = ctx.state.clone();
            tokio::select! {
                () = serve_conn(shared, tcp, peer, ctx) => {}
                () = evict.cancelled() => {
                    debug!(%peer, "evicted: the oldest HTTPS connection without an admitted request");
                }
                () = kill.cancelled() => {}
            }
            // Leaves the queue unless admitted (its tunnel lives on).
            let _ = state.compare_exchange(PENDING, ENDED, Ordering::AcqRel, Ordering::Acquire);
        });
    }
}

async fn serve_conn(
    shared: Arc<Shared>,
    mut tcp: TcpStream,
    mut peer: SocketAddr,
    ctx: Arc<ConnCtx>,
) {
    // One deadline for the PROXY header, the TLS handshake and the request
    // head: an idle socket holds its slot this long at most.
    let deadline = tokio::time::Instant::now() + shared.limits.handshake_timeout;
    let _ = tcp.set_nodelay(true);
    if shared.gw.limits.trusted_proxies.contains(peer.ip()) {
        let limit = shared.gw.limits.proxy_header_timeout;
        match proxy_header::read_by(&mut tcp, limit, deadline).await {
            Ok(Some((src, _))) => peer = src,
            Ok(None) => {}
            Err(e) => {
                proxy_header::log_refusal(peer, &e);
                shared.count_conn("proxy_header_refused");
                return;
            }
        }
    }
    // One source may start only so many TLS handshakes (sources.rs).
    let mut source = match shared.sources.admit(peer.ip(), std::time::Instant::now()) {
        Ok(p) => p,
        Err(r) => {
            debug!(%peer, "closing: too many HTTPS handshakes from this source ({r:?})");
            shared.count_conn(r.metric_label());
            return;
        }
    };
    let tls = match tokio::time::timeout_at(deadline, shared.tls.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(%peer, "TLS handshake failed: {e}");
            shared.count_conn("tls_failed");
            return;
        }
        Err(_) => {
            debug!(%peer, "no TLS handshake before the HTTPS handshake deadline");
            shared.count_conn("handshake_timeout");
            return;
        }
    };
    let svc_shared = shared.clone();
    let svc_ctx = ctx.clone();
    let service = hyper::service::service_fn(move |req| {
        let shared = svc_shared.clone();
        let ctx = svc_ctx.clone();
        async move {
            ctx.head.cancel();
            Ok::<_, Infallible>(handle(shared, peer, req, ctx).await)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.handshake_timeout)
        // One request per connection: it becomes a tunnel or gets its
        // answer and is closed, so a refused client cannot sit on an
        // admitted-looking connection and retry forever.
        .keep_alive(false)
        // Answers carry nothing that varies per request (no Date), so two
        // refusals are byte-identical whatever they were for.
        .auto_date_header(false)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(tls), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = &mut conn => {
            if let Err(e) = r {
                debug!(%peer, "HTTPS connection: {e}");
            }
            return;
        }
        // A request head arrived: no longer this source's pending handshake.
        () = ctx.head.cancelled() => source.done(),
        () = tokio::time::sleep_until(deadline) => {
            debug!(%peer, "no request head before the HTTPS handshake deadline");
            shared.count_conn("handshake_timeout");
            return;
        }
    }
    if let Err(e) = conn.await {
        debug!(%peer, "HTTPS connection: {e}");
    }
}

/// The metric label and the reason for a refused proof: `forbidden` when
/// something routes the name, else `not_found` (the answer is the same 403
/// either way; only the metric and the log tell them apart).
fn refusal<T>(
    routed: bool,
    checked: &Result<T, proof::ProofError>,
) -> (&'static str, proof::ProofError) {
    let result = if routed { "forbidden" } else { "not_found" };
    let why = match checked {
        Ok(_) => proof::ProofError::Missing,
        Err(e) => e.clone(),
    };
    (result, why)
}

async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
    ctx: Arc<ConnCtx>,
) -> Reply {
    if req.method() == Method::POST && req.uri().path().starts_with("/tunnel/") {
        return handle_upgrade(&shared, peer, req, &ctx).await;
    }
    if req.method() != Method::CONNECT {
        return shared.refuse(
            "bad_request",
            StatusCode::METHOD_NOT_ALLOWED,
            "only CONNECT is served here",
        );
    }
    let Some((host, port)) = req
        .uri()
        .authority()
        .and_then(|a| Some((a.host().to_string(), a.port_u16()?)))
    else {
        return shared.refuse(
            "bad_request",
            StatusCode::BAD_REQUEST,
            "CONNECT needs host:port",
        );
    };
    let authority = format!("{host}:{port}");
    let d = shared
        .gw
        .table()
        .connect(&host, port, shared.lease_domain.as_deref());
    if let Some(d) = d.as_ref().filter(|d| d.allow_unauthenticated) {
        // An open route, by its owner's explicit choice: no proof.
        return admit_and_open(&shared, peer, &authority, d, req, false, &ctx).await;
    }
    // From here an unknown name and a known one take the same path: the
    // proof is parsed, its time and signature checked, and its key looked
    // up in the route's keys, or in none.
    let none = HashSet::new();
    let header = req
        .headers()
        .get(hyper::header::PROXY_AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let checked = shared.check_fresh(header, &authority, d.as_ref().map_or(&none, |d| &d.allow));
    match (checked, &d) {
        (Ok(fp), Some(d)) => {
            debug!(%peer, %authority, key = %fp, "CONNECT proof accepted");
            admit_and_open(&shared, peer, &authority, d, req, false, &ctx).await
        }
        (checked, _) => {
            // Only the log (the operator's) tells the two apart.
            let (result, why) = refusal(d.is_some(), &checked);
            info!(%peer, %authority, routed = d.is_some(), "CONNECT refused: {why}");
            shared.refuse(result, DENIED, format!("not allowed: {why}"))
        }
    }
}

/// `POST /tunnel/{leaseHash}/tcp`: a fresh proof (`Proxy-Authorization`),
/// or with `--allow-replayable-upgrade-proofs` also the plain `X-Signature`.
async fn handle_upgrade(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
    ctx: &Arc<ConnCtx>,
) -> Reply {
    use keyway_tunnel::upgrade;
    let Some(hash) = upgrade::parse_path(req.uri().path()) else {
        return shared.refuse(
            "bad_request",
            StatusCode::NOT_FOUND,
            "expected /tunnel/<64 hex lease hash>/tcp",
        );
    };
    let hash_hex = hex::encode(hash);
    let found = shared.gw.table().upgrade(&hash);
    let authority = upgrade::authority(&hash_hex);
    // Like CONNECT: an unknown hash is checked against no keys, so it gets
    // the answer a live lease gives the same request.
    let none = HashSet::new();
    let (allow, keys) = match &found {
        Some((d, keys)) => (&d.allow, keys.as_slice()),
        None => (&none, &[][..]),
    };
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let checked = match (header("proxy-authorization"), header("x-signature")) {
        (Some(p), _) => shared.check_fresh(p, &authority, allow),
        (None, Some(_)) if !shared.allow_replayable => Err(proof::ProofError::Malformed(
            "this gateway requires a fresh proof (Proxy-Authorization: Keyway-SSHSIG), \
             not the replayable X-Signature"
                .into(),
        )),
        (None, Some(sig)) => upgrade::verify_plain(&hash, sig, keys),
        (None, None) => Err(proof::ProofError::Missing),
    };
    match (checked, &found) {
        (Ok(fp), Some((d, _))) => {
            debug!(%peer, lease = %d.label, key = %fp, "upgrade proof accepted");
            admit_and_open(shared, peer, &authority, d, req, true, ctx).await
        }
        (checked, _) => {
            let (result, why) = refusal(found.is_some(), &checked);
            let lease = found.as_ref().map_or("(none)", |(d, _)| d.label.as_str());
            info!(%peer, %lease, hash = %hash_hex, "upgrade refused: {why}");
            shared.refuse(result, DENIED, format!("not allowed: {why}"))
        }
    }
}

/// The request is allowed: the connection leaves the eviction queue (its
/// place under `--https-max-connections` goes with the tunnel), then the
/// tunnel opens.
async fn admit_and_open(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    authority: &str,
    d: &ConnectDecision,
    req: Request<Incoming>,
    upgrade: bool,
    ctx: &Arc<ConnCtx>,
) -> Reply {
    if !ctx.admit() {
        // Evicted between the head and the decision (counted then); the
        // socket is closing anyway.
        let mut r = Response::new(Full::new(Bytes::from_static(
            b"the gateway is overloaded; retry\n",
        )));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return r;
    }
    open_tunnel(shared, peer, authority, d, req, upgrade, ctx.slot.clone()).await
}

/// Dials the backend, answers (200 for CONNECT, 101 for the upgrade) and
/// pipes both ways until either side ends or the gateway settles the tunnel
/// (its route or lease withdrawn, see `Gateway::enforce`).
async fn open_tunnel(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    authority: &str,
    d: &ConnectDecision,
    mut req: Request<Incoming>,
    upgrade: bool,
    slot: Arc<Slot>,
) -> Reply {
    let upstream = match backend::dial(&shared.gw, &d.target).await {
        Ok(u) => u,
        Err(e) => {
            let why = format!("{}: backend unreachable: {e}", d.label);
            return shared.refuse("bad_gateway", StatusCode::BAD_GATEWAY, why);
        }
    };
    shared.count("ok");
    info!(%peer, %authority, to = %d.label, "CONNECT tunnel");
    let gw = shared.gw.clone();
    let (id, cancel) = gw.register_tunnel(d.key.clone(), d.label.clone());
    tokio::spawn(async move {
        // The tunnel holds the connection's place until it ends.
        let _slot = slot;
        let up = match hyper::upgrade::on(&mut req).await {
            Ok(up) => up,
            Err(e) => {
                debug!("CONNECT upgrade: {e}");
                gw.end_tunnel(id);
                return;
            }
        };
        let mut client = TokioIo::new(up);
        let mut upstream = upstream;
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                if let Ok((to, from)) = r {
                    gw.metrics.bytes.with_label_values(&["upstream"]).inc_by(to);
                    gw.metrics.bytes.with_label_values(&["downstream"]).inc_by(from);
                }
            }
            () = cancel.cancelled() => {}
        }
        gw.end_tunnel(id);
    });
    if !upgrade {
        return Response::new(Full::new(Bytes::new()));
    }
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    h.insert(
        hyper::header::UPGRADE,
        hyper::header::HeaderValue::from_static("tcp"),
    );
    r
}
