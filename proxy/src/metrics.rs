//! Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoints.
//!
//! Every name starts with `keyway_`; docs/metrics.md lists them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use anyhow::{Context, Result};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// All of the gateway's metrics.
pub struct Metrics {
    registry: Registry,
    /// Connections by how they ended up (`accepted`, `refused_limit`, …).
    pub connections: IntCounterVec,
    /// Open TCP connections on the SSH listener.
    pub connections_open: IntGauge,
    /// Connections that have not authenticated yet.
    pub unauthenticated: IntGauge,
    /// Authenticated connections by mode (`relay`, `jump`).
    pub sessions_active: IntGaugeVec,
    /// Open channels by kind (`session`, `direct-tcpip`).
    pub channels_active: IntGaugeVec,
    /// Channel opens refused, by reason (`limit`, `target`).
    pub channels_refused: IntCounterVec,
    /// Rejected authentication attempts by method.
    pub auth_failures: IntCounterVec,
    /// Bytes bridged channels hold right now (bounded by their windows).
    pub relay_buffered_bytes: IntGauge,
    /// Channel window bytes reserved from the relay buffer budget.
    pub relay_reserved_bytes: IntGauge,
    /// Connections, channels and windows refused by a budget or a per-user
    /// cap, by limit.
    pub limit_refusals: IntCounterVec,
    /// Payload bytes relayed, by direction (`upstream`: client to target).
    pub bytes: IntCounterVec,
    /// Accept to authenticated.
    pub handshake_seconds: Histogram,
    /// Dialing a target, by kind (`ssh` login or `tcp`) and result.
    pub upstream_connect_seconds: HistogramVec,
    /// Connections closed because their lease or route was withdrawn.
    pub settled_closed: prometheus::IntCounter,
    /// CONNECT requests on the HTTPS listener by result.
    pub connect_requests: IntCounterVec,
    /// HTTPS listener connections by what happened to them; its own
    /// series, because its caps are its own (a flood there is not the SSH
    /// listener's business).
    pub https_connections: IntCounterVec,
    /// Open TCP connections on the HTTPS listener (tunnels included).
    pub https_connections_open: IntGauge,
    pub snapshot_epoch: IntGauge,
    pub snapshot_version: IntGauge,
    pub snapshot_leases: IntGauge,
    snapshot_age: prometheus::Gauge,
    snapshot_generated_ms: AtomicI64,
    ready: AtomicBool,
}

impl Metrics {
    /// The gateway's metrics (`keyway-proxy run`).
    pub fn new() -> Result<Arc<Self>> {
        Self::build(true)
    }

    /// Only the snapshot series; the agent registers its own beside them
    /// through [`Metrics::registry`].
    pub fn for_agent() -> Result<Arc<Self>> {
        Self::build(false)
    }

    /// Where further series go.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn build(gateway: bool) -> Result<Arc<Self>> {
        let r = Registry::new();
        let buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let m = Metrics {
            connections: IntCounterVec::new(
                Opts::new(
                    "keyway_ssh_connections_total",
                    "SSH listener connections by result",
                ),
                &["result"],
            )?,
            connections_open: IntGauge::new(
                "keyway_ssh_connections_open",
                "Open TCP connections on the SSH listener",
            )?,
            unauthenticated: IntGauge::new(
                "keyway_ssh_unauthenticated_connections",
                "Connections still in the handshake or authentication",
            )?,
            sessions_active: IntGaugeVec::new(
                Opts::new(
                    "keyway_ssh_sessions_active",
                    "Authenticated SSH connections by mode",
                ),
                &["mode"],
            )?,
            channels_active: IntGaugeVec::new(
                Opts::new("keyway_ssh_channels_active", "Open SSH channels by kind"),
                &["kind"],
            )?,
            channels_refused: IntCounterVec::new(
                Opts::new(
                    "keyway_ssh_channels_refused_total",
                    "SSH channel opens refused, by reason",
                ),
                &["reason"],
            )?,
            relay_buffered_bytes: IntGauge::new(
                "keyway_relay_buffered_bytes",
                "Bytes bridged SSH channels hold in the gateway now",
            )?,
            relay_reserved_bytes: IntGauge::new(
                "keyway_relay_window_reserved_bytes",
                "Channel window bytes reserved from the relay buffer budget",
            )?,
            limit_refusals: IntCounterVec::new(
                Opts::new(
                    "keyway_limit_refusals_total",
                    "Connections and channels refused by a budget or a per-user cap, by limit",
                ),
                &["limit"],
            )?,
            auth_failures: IntCounterVec::new(
                Opts::new(
                    "keyway_ssh_auth_failures_total",
                    "Rejected authentication attempts by method",
                ),
                &["method"],
            )?,
            bytes: IntCounterVec::new(
                Opts::new(
                    "keyway_ssh_bytes_total",
                    "Channel payload bytes carried, by direction",
                ),
                &["direction"],
            )?,
            handshake_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "keyway_ssh_handshake_duration_seconds",
                    "From accept to successful authentication",
                )
                .buckets(buckets.clone()),
            )?,
            upstream_connect_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "keyway_upstream_connect_duration_seconds",
                    "Time to reach a target: TCP dial, or TCP plus SSH login for relays",
                )
                .buckets(buckets),
                &["kind", "result"],
            )?,
            connect_requests: IntCounterVec::new(
                Opts::new(
                    "keyway_connect_requests_total",
                    "CONNECT requests on the HTTPS listener by result",
                ),
                &["result"],
            )?,
            https_connections: IntCounterVec::new(
                Opts::new(
                    "keyway_https_connections_total",
                    "HTTPS (CONNECT) listener connections by result",
                ),
                &["result"],
            )?,
            https_connections_open: IntGauge::new(
                "keyway_https_connections_open",
                "Open TCP connections on the HTTPS (CONNECT) listener, tunnels included",
            )?,
            settled_closed: prometheus::IntCounter::new(
                "keyway_ssh_settled_closed_total",
                "Connections closed because their lease or route was withdrawn",
            )?,
            snapshot_epoch: IntGauge::new(
                "keyway_snapshot_epoch",
                "Epoch of the routing snapshot in use",
            )?,
            snapshot_version: IntGauge::new(
                "keyway_snapshot_version",
                "Version (within the epoch) of the routing snapshot in use",
            )?,
            snapshot_leases: IntGauge::new(
                "keyway_snapshot_leases",
                "Leases in the routing snapshot in use",
            )?,
            snapshot_age: prometheus::Gauge::new(
                "keyway_snapshot_age_seconds",
                "Seconds since the operator built the snapshot in use",
            )?,
            snapshot_generated_ms: AtomicI64::new(0),
            ready: AtomicBool::new(false),
            registry: r,
        };
        let reg = &m.registry;
        reg.register(Box::new(m.snapshot_epoch.clone()))?;
        reg.register(Box::new(m.snapshot_version.clone()))?;
        reg.register(Box::new(m.snapshot_leases.clone()))?;
        reg.register(Box::new(m.snapshot_age.clone()))?;
        if !gateway {
            return Ok(Arc::new(m));
        }
        reg.register(Box::new(m.connections.clone()))?;
        reg.register(Box::new(m.connections_open.clone()))?;
        reg.register(Box::new(m.unauthenticated.clone()))?;
        reg.register(Box::new(m.sessions_active.clone()))?;
        reg.register(Box::new(m.channels_active.clone()))?;
        reg.register(Box::new(m.channels_refused.clone()))?;
        reg.register(Box::new(m.auth_failures.clone()))?;
        reg.register(Box::new(m.relay_buffered_bytes.clone()))?;
        reg.register(Box::new(m.relay_reserved_bytes.clone()))?;
        reg.register(Box::new(m.limit_refusals.clone()))?;
        reg.register(Box::new(m.bytes.clone()))?;
        reg.register(Box::new(m.handshake_seconds.clone()))?;
        reg.register(Box::new(m.upstream_connect_seconds.clone()))?;
        reg.register(Box::new(m.settled_closed.clone()))?;
        reg.register(Box::new(m.connect_requests.clone()))?;
        reg.register(Box::new(m.https_connections.clone()))?;
        reg.register(Box::new(m.https_connections_open.clone()))?;
        // Series that exist from the start, so dashboards see zeros, not gaps.
        for r in [
            "accepted",
            "authenticated",
            "refused_limit",
            "evicted_unauthenticated",
            "auth_timeout",
            "closed_unauthenticated",
            "proxy_header_refused",
            "refused_source_rate",
            "refused_source_pending",
            "settled",
        ] {
            m.connections.with_label_values(&[r]);
        }
        for r in crate::gateway::connect::REQUEST_RESULTS {
            m.connect_requests.with_label_values(&[r]);
        }
        for r in crate::gateway::connect::CONNECTION_RESULTS {
            m.https_connections.with_label_values(&[r]);
        }
        for mode in ["relay", "jump"] {
            m.sessions_active.with_label_values(&[mode]);
        }
        for k in ["session", "direct-tcpip"] {
            m.channels_active.with_label_values(&[k]);
        }
        for r in ["limit", "target"] {
            m.channels_refused.with_label_values(&[r]);
        }
        for l in crate::gateway::budget::Refusal::LABELS {
            m.limit_refusals.with_label_values(&[l]);
        }
        for method in ["publickey", "password", "keyboard-interactive", "none"] {
            m.auth_failures.with_label_values(&[method]);
        }
        for d in ["upstream", "downstream"] {
            m.bytes.with_label_values(&[d]);
        }
        Ok(Arc::new(m))
    }

    /// Records the snapshot now in use.
    pub fn snapshot_applied(&self, epoch: u64, version: u64, leases: usize, generated_ms: i64) {
        self.snapshot_epoch
            .set(i64::try_from(epoch).unwrap_or(i64::MAX));
        self.snapshot_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        self.snapshot_leases
            .set(i64::try_from(leases).unwrap_or(i64::MAX));
        self.snapshot_generated_ms
            .store(generated_ms, Ordering::Relaxed);
        self.ready.store(true, Ordering::Release);
    }

    /// Ready once a snapshot (live or from disk) is loaded.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let generated = self.snapshot_generated_ms.load(Ordering::Relaxed);
        if generated > 0 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(generated);
            self.snapshot_age
                .set(((now - generated).max(0) as f64) / 1000.0);
        }
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let m1 = metrics.clone();
    let m2 = metrics;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m1.clone();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                        m.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let m = m2.clone();
                async move {
                    if m.is_ready() {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "no routing snapshot yet\n")
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving metrics")
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener to {addr}"))
}
