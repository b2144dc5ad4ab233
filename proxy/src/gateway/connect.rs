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
use tracing::{debug, info};

use super::{Gateway, backend, proxy_header};
use crate::routes::ConnectDecision;

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

    /// Counts `result` and answers `status` with a one-line reason.
    fn refuse(&self, result: &str, status: StatusCode, reason: impl Into<String>) -> Reply {
        self.count(result);
        let mut r = Response::new(Full::new(Bytes::from(format!("{}\n", reason.into()))));
        *r.status_mut() = status;
        r
    }

    /// Checks a fresh `Keyway-SSHSIG` proof for `authority`.
    fn check_fresh(
        &self,
        header: &str,
        authority: &str,
        allow: &std::collections::HashSet<String>,
    ) -> Result<String, proof::ProofError> {
        let p = proof::parse(header)?;
        let mut replay = self.replay.lock().unwrap_or_else(|e| e.into_inner());
        proof::verify(&p, authority, proof::unix_now(), allow, &mut replay)
    }
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
    while let Some((tcp, peer)) = super::accept(&listener, &stop).await {
        let Ok(permit) = shared.gw.total.clone().try_acquire_owned() else {
            shared.count("refused_limit");
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
        let limit = shared.gw.limits.proxy_header_timeout;
        match proxy_header::read_by(&mut tcp, limit, deadline).await {
            Ok(Some((src, _))) => peer = src,
            Ok(None) => {}
            Err(e) => {
                proxy_header::log_refusal(peer, &e);
                shared.count("proxy_header_refused");
                return;
            }
        }
    }
    let tls = match tokio::time::timeout_at(deadline, shared.tls.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(%peer, "TLS handshake failed: {e}");
            shared.count("tls_failed");
            return;
        }
        Err(_) => {
            shared.count("timeout");
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

async fn handle(shared: Arc<Shared>, peer: SocketAddr, req: Request<Incoming>) -> Reply {
    if req.method() == Method::POST && req.uri().path().starts_with("/tunnel/") {
        return handle_upgrade(&shared, peer, req).await;
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
    let Some(d) = shared
        .gw
        .table()
        .connect(&host, port, shared.lease_domain.as_deref())
    else {
        return shared.refuse(
            "not_found",
            StatusCode::NOT_FOUND,
            format!("no route for {authority}"),
        );
    };
    if !d.allow_unauthenticated {
        let header = req
            .headers()
            .get(hyper::header::PROXY_AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        match shared.check_fresh(header, &authority, &d.allow) {
            Ok(fp) => debug!(%peer, %authority, key = %fp, "CONNECT proof accepted"),
            Err(e) => {
                info!(%peer, %authority, "CONNECT refused: {e}");
                return shared.refuse(
                    "forbidden",
                    StatusCode::FORBIDDEN,
                    format!("not allowed: {e}"),
                );
            }
        }
    }
    open_tunnel(&shared, peer, &authority, &d, req, false).await
}

/// `POST /tunnel/{leaseHash}/tcp`: a fresh proof (`Proxy-Authorization`) or,
/// unless `--require-fresh-upgrade-proofs`, the plain `X-Signature`.
async fn handle_upgrade(shared: &Arc<Shared>, peer: SocketAddr, req: Request<Incoming>) -> Reply {
    use keyway_tunnel::upgrade;
    let Some(hash) = upgrade::parse_path(req.uri().path()) else {
        return shared.refuse(
            "bad_request",
            StatusCode::NOT_FOUND,
            "expected /tunnel/<64 hex lease hash>/tcp",
        );
    };
    let hash_hex = hex::encode(hash);
    let Some((d, keys)) = shared.gw.table().upgrade(&hash) else {
        return shared.refuse(
            "not_found",
            StatusCode::NOT_FOUND,
            format!("no lease {hash_hex}"),
        );
    };
    let authority = upgrade::authority(&hash_hex);
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let checked = match (header("proxy-authorization"), header("x-signature")) {
        (Some(p), _) => shared.check_fresh(p, &authority, &d.allow),
        (None, Some(_)) if shared.require_fresh => Err(proof::ProofError::Malformed(
            "this gateway requires a fresh proof (Proxy-Authorization), not X-Signature".into(),
        )),
        (None, Some(sig)) => upgrade::verify_plain(&hash, sig, &keys),
        (None, None) => Err(proof::ProofError::Missing),
    };
    match checked {
        Ok(fp) => debug!(%peer, lease = %d.label, key = %fp, "upgrade proof accepted"),
        Err(e) => {
            info!(%peer, lease = %d.label, "upgrade refused: {e}");
            return shared.refuse(
                "forbidden",
                StatusCode::FORBIDDEN,
                format!("not allowed: {e}"),
            );
        }
    }
    open_tunnel(shared, peer, &authority, &d, req, true).await
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
