//! The HTTPS listener (8443): HTTP/1.1 CONNECT over TLS, for users whose
//! network only lets them out on 443. The CONNECT authority is matched
//! against `tcp+https://host:port` SshRoutes and, under `--lease-domain`,
//! `<lease>.<namespace>.<domain>`; routes with `allowPublicKeys` need a
//! proof of key possession (`keyway_tunnel::proof`). Unknown → 404,
//! unauthorized → 403, backend down → 502, each with a one-line reason.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
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
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Gateway, proxy_header};
use crate::routes::{ConnectDecision, Target};

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
    /// Refuse the replayable plain `X-Signature` on the upgrade endpoint.
    pub require_fresh_upgrade_proofs: bool,
}

struct Shared {
    gw: Arc<Gateway>,
    tls: tokio_rustls::TlsAcceptor,
    lease_domain: Option<String>,
    require_fresh: bool,
    replay: Mutex<ReplayCache>,
}

impl Gateway {
    /// Serves CONNECT on `listeners` until `stop`.
    pub async fn serve_connect(
        self: &Arc<Self>,
        listeners: Vec<TcpListener>,
        config: ConnectConfig,
        stop: CancellationToken,
    ) {
        let shared = Arc::new(Shared {
            gw: self.clone(),
            tls: tokio_rustls::TlsAcceptor::from(config.tls),
            lease_domain: config.lease_domain,
            require_fresh: config.require_fresh_upgrade_proofs,
            replay: Mutex::new(ReplayCache::new(100_000)),
        });
        let mut accepts = tokio::task::JoinSet::new();
        for l in listeners {
            info!(addr = ?l.local_addr().ok(), "CONNECT listener (HTTPS)");
            let shared = shared.clone();
            let stop = stop.clone();
            accepts.spawn(async move { accept_loop(shared, l, stop).await });
        }
        while accepts.join_next().await.is_some() {}
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let Ok(permit) = shared.gw.total.clone().try_acquire_owned() else {
            shared
                .gw
                .metrics
                .connect_requests
                .with_label_values(&["refused_limit"])
                .inc();
            continue;
        };
        let shared = shared.clone();
        let kill = shared.gw.kill.child_token();
        tokio::spawn(async move {
            tokio::select! {
                () = serve_conn(shared, tcp, peer) => {}
                () = kill.cancelled() => {}
            }
            drop(permit);
        });
    }
}

async fn serve_conn(shared: Arc<Shared>, mut tcp: TcpStream, mut peer: SocketAddr) {
    let deadline = tokio::time::Instant::now() + shared.gw.limits.auth_timeout;
    let _ = tcp.set_nodelay(true);
    if shared.gw.limits.trusted_proxies.contains(peer.ip()) {
        match tokio::time::timeout_at(deadline, proxy_header::read(&mut tcp)).await {
            Ok(Ok(Some((src, _)))) => peer = src,
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                warn!(edge = %peer, "closing: {e}");
                shared
                    .gw
                    .metrics
                    .connect_requests
                    .with_label_values(&["proxy_header_refused"])
                    .inc();
                return;
            }
            Err(_) => return,
        }
    }
    let tls = match tokio::time::timeout_at(deadline, shared.tls.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(%peer, "TLS handshake failed: {e}");
            shared
                .gw
                .metrics
                .connect_requests
                .with_label_values(&["tls_failed"])
                .inc();
            return;
        }
        Err(_) => {
            shared
                .gw
                .metrics
                .connect_requests
                .with_label_values(&["timeout"])
                .inc();
            return;
        }
    };
    let svc_shared = shared.clone();
    let service = hyper::service::service_fn(move |req| {
        let shared = svc_shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, peer, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.gw.limits.auth_timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(tls), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        debug!(%peer, "HTTPS connection: {e}");
    }
}

fn reply(status: StatusCode, reason: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{reason}\n"))));
    *r.status_mut() = status;
    r
}

async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let count = |r: &str| {
        shared
            .gw
            .metrics
            .connect_requests
            .with_label_values(&[r])
            .inc()
    };
    if req.method() == Method::POST && req.uri().path().starts_with("/tunnel/") {
        return handle_upgrade(&shared, peer, req).await;
    }
    if req.method() != Method::CONNECT {
        count("bad_request");
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "only CONNECT is served here".into(),
        );
    }
    let Some((host, port)) = req
        .uri()
        .authority()
        .and_then(|a| Some((a.host().to_string(), a.port_u16()?)))
    else {
        count("bad_request");
        return reply(StatusCode::BAD_REQUEST, "CONNECT needs host:port".into());
    };
    let authority = format!("{host}:{port}");
    let Some(d) = shared
        .gw
        .table()
        .connect(&host, port, shared.lease_domain.as_deref())
    else {
        count("not_found");
        return reply(StatusCode::NOT_FOUND, format!("no route for {authority}"));
    };
    if !d.allow_unauthenticated {
        let header = req
            .headers()
            .get(hyper::header::PROXY_AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let checked = proof::parse(header).and_then(|p| {
            let mut replay = shared.replay.lock().unwrap_or_else(|e| e.into_inner());
            proof::verify(&p, &authority, now, &d.allow, &mut replay)
        });
        match checked {
            Ok(fp) => debug!(%peer, %authority, key = %fp, "CONNECT proof accepted"),
            Err(e) => {
                count("forbidden");
                info!(%peer, %authority, "CONNECT refused: {e}");
                return reply(StatusCode::FORBIDDEN, format!("not allowed: {e}"));
            }
        }
    }
    open_tunnel(&shared, peer, &authority, &d, req, false).await
}

/// Dials the backend, answers (200 for CONNECT, 101 for the upgrade) and
/// pipes both ways until either side ends or the route is withdrawn.
async fn open_tunnel(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    authority: &str,
    d: &ConnectDecision,
    mut req: Request<Incoming>,
    upgrade: bool,
) -> Response<Full<Bytes>> {
    let count = |r: &str| {
        shared
            .gw
            .metrics
            .connect_requests
            .with_label_values(&[r])
            .inc()
    };
    let Target::Address(addr) = &d.target else {
        count("bad_gateway");
        return reply(
            StatusCode::BAD_GATEWAY,
            "provider tunnels are not served by this gateway yet".into(),
        );
    };
    let upstream = match tokio::time::timeout(
        shared.gw.limits.connect_timeout,
        TcpStream::connect(addr.as_str()),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            count("bad_gateway");
            return reply(
                StatusCode::BAD_GATEWAY,
                format!("{}: backend unreachable: {e}", d.label),
            );
        }
        Err(_) => {
            count("bad_gateway");
            return reply(
                StatusCode::BAD_GATEWAY,
                format!("{}: backend timed out", d.label),
            );
        }
    };
    let _ = upstream.set_nodelay(true);
    count("ok");
    info!(%peer, %authority, to = %d.label, "CONNECT tunnel");
    let metrics = shared.gw.metrics.clone();
    let mut table = shared.gw.table.clone();
    let key = d.key.clone();
    let label = d.label.clone();
    tokio::spawn(async move {
        let up = match hyper::upgrade::on(&mut req).await {
            Ok(up) => up,
            Err(e) => {
                debug!("CONNECT upgrade: {e}");
                return;
            }
        };
        let mut client = TokioIo::new(up);
        let mut upstream = upstream;
        // Settlement: the tunnel ends when a snapshot withdraws its route
        // or lease, like SSH sessions do.
        let withdrawn = async {
            loop {
                if table.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                if !table.borrow().contains(&key) {
                    return;
                }
            }
        };
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                if let Ok((to, from)) = r {
                    metrics.bytes.with_label_values(&["upstream"]).inc_by(to);
                    metrics.bytes.with_label_values(&["downstream"]).inc_by(from);
                }
            }
            () = withdrawn => {
                info!(to = %label, "route withdrawn; closing the CONNECT tunnel");
                metrics.settled_closed.inc();
            }
        }
    });
    if upgrade {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("upgrade"),
        );
        r.headers_mut().insert(
            hyper::header::UPGRADE,
            hyper::header::HeaderValue::from_static("tcp"),
        );
        return r;
    }
    Response::new(Full::new(Bytes::new()))
}

/// `POST /tunnel/{leaseHash}/tcp`: a fresh proof (`Proxy-Authorization`) or,
/// unless `--require-fresh-upgrade-proofs`, the plain `X-Signature`.
async fn handle_upgrade(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    use keyway_tunnel::upgrade;
    let count = |r: &str| {
        shared
            .gw
            .metrics
            .connect_requests
            .with_label_values(&[r])
            .inc()
    };
    let Some(hash) = upgrade::parse_path(req.uri().path()) else {
        count("bad_request");
        return reply(
            StatusCode::NOT_FOUND,
            "expected /tunnel/<64 hex lease hash>/tcp".into(),
        );
    };
    let hash_hex = hex::encode(hash);
    let Some((d, keys)) = shared.gw.table().upgrade(&hash) else {
        count("not_found");
        return reply(StatusCode::NOT_FOUND, format!("no lease {hash_hex}"));
    };
    let authority = upgrade::authority(&hash_hex);
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let checked = match (header("proxy-authorization"), header("x-signature")) {
        (Some(p), _) => proof::parse(&p).and_then(|p| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let mut replay = shared.replay.lock().unwrap_or_else(|e| e.into_inner());
            proof::verify(&p, &authority, now, &d.allow, &mut replay)
        }),
        (None, Some(_)) if shared.require_fresh => Err(proof::ProofError::Malformed(
            "this gateway requires a fresh proof (Proxy-Authorization), not X-Signature".into(),
        )),
        (None, Some(sig)) => upgrade::verify_plain(&hash, &sig, &keys),
        (None, None) => Err(proof::ProofError::Missing),
    };
    match checked {
        Ok(fp) => debug!(%peer, lease = %d.label, key = %fp, "upgrade proof accepted"),
        Err(e) => {
            count("forbidden");
            info!(%peer, lease = %d.label, "upgrade refused: {e}");
            return reply(StatusCode::FORBIDDEN, format!("not allowed: {e}"));
        }
    }
    open_tunnel(shared, peer, &authority, &d, req, true).await
}
