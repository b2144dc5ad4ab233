//! The operator's `/metrics`, `/healthz` and `/readyz` (ready = this replica
//! leads and has restored its state, so a Service in front of the snapshot
//! port only sends proxies to the leader).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use keyway_snapshot::server::Publisher;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the cluster-mode operator exports (names start `keyway_operator_`).
pub struct Metrics {
    registry: Registry,
    /// 1 while this replica holds the leader Lease.
    pub leader: IntGauge,
    /// Reconciles by kind and result (`ok`, `error`).
    pub reconciles: IntCounterVec,
    /// Status writes by kind and result.
    pub status_writes: IntCounterVec,
    /// Events published by reason.
    pub events: IntCounterVec,
    /// Objects known, by kind.
    pub objects: IntGaugeVec,
    /// Snapshot version published last.
    pub snapshot_version: IntGauge,
    /// Snapshot writer epoch.
    pub snapshot_epoch: IntGauge,
    /// Connected snapshot subscribers.
    pub subscribers: IntGauge,
    /// Duration of one status round (derive, publish, diff).
    pub round_seconds: Histogram,
    /// Rounds run.
    pub rounds: IntCounter,
    /// Per pool: addresses, leases holding one, users, the busiest user's
    /// leases, and leases waiting for an address.
    pub pool: PoolGauges,
    /// Snapshot responses and bytes, read from the publisher at scrape.
    traffic: Arc<SnapshotTraffic>,
    ready: AtomicBool,
}

impl Metrics {
    /// Registers everything.
    pub fn new() -> Result<Arc<Self>> {
        let registry = Registry::new();
        let m = Metrics {
            leader: IntGauge::new(
                "keyway_operator_leader",
                "1 while this replica is the leader",
            )?,
            reconciles: IntCounterVec::new(
                Opts::new(
                    "keyway_operator_reconciles_total",
                    "Reconciles by kind and result",
                ),
                &["kind", "result"],
            )?,
            status_writes: IntCounterVec::new(
                Opts::new(
                    "keyway_operator_status_writes_total",
                    "Status patches (server-side apply) by kind and result",
                ),
                &["kind", "result"],
            )?,
            events: IntCounterVec::new(
                Opts::new(
                    "keyway_operator_events_total",
                    "Kubernetes Events published by reason",
                ),
                &["reason"],
            )?,
            objects: IntGaugeVec::new(
                Opts::new(
                    "keyway_operator_objects",
                    "Objects the operator knows, by kind",
                ),
                &["kind"],
            )?,
            snapshot_version: IntGauge::new(
                "keyway_operator_snapshot_version",
                "Version of the routing snapshot published last",
            )?,
            snapshot_epoch: IntGauge::new(
                "keyway_operator_snapshot_epoch",
                "Writer epoch of the routing snapshots",
            )?,
            subscribers: IntGauge::new(
                "keyway_operator_snapshot_subscribers",
                "Connected snapshot subscribers",
            )?,
            round_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "keyway_operator_status_round_seconds",
                    "Time to derive allocations, publish the snapshot and diff statuses",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            )?,
            rounds: IntCounter::new("keyway_operator_status_rounds_total", "Status rounds run")?,
            pool: PoolGauges {
                addresses: prometheus::GaugeVec::new(
                    Opts::new("keyway_operator_pool_addresses", "Addresses in the pool"),
                    &["pool"],
                )?,
                leases: IntGaugeVec::new(
                    Opts::new(
                        "keyway_operator_pool_leases",
                        "Leases holding an address of the pool",
                    ),
                    &["pool"],
                )?,
                users: IntGaugeVec::new(
                    Opts::new(
                        "keyway_operator_pool_users",
                        "Users holding an address of the pool",
                    ),
                    &["pool"],
                )?,
                max_leases_per_user: IntGaugeVec::new(
                    Opts::new(
                        "keyway_operator_pool_max_leases_per_user",
                        "Live leases of the pool's busiest user (the pool serves users with up to its address count)",
                    ),
                    &["pool"],
                )?,
                pending: IntGaugeVec::new(
                    Opts::new(
                        "keyway_operator_pool_pending_leases",
                        "Leases waiting because their user holds every address of the pool",
                    ),
                    &["pool"],
                )?,
            },
            traffic: Arc::new(SnapshotTraffic::new()?),
            registry,
            ready: AtomicBool::new(false),
        };
        m.registry.register(Box::new(m.leader.clone()))?;
        m.registry.register(Box::new(m.reconciles.clone()))?;
        m.registry.register(Box::new(m.status_writes.clone()))?;
        m.registry.register(Box::new(m.events.clone()))?;
        m.registry.register(Box::new(m.objects.clone()))?;
        m.registry.register(Box::new(m.snapshot_version.clone()))?;
        m.registry.register(Box::new(m.snapshot_epoch.clone()))?;
        m.registry.register(Box::new(m.subscribers.clone()))?;
        m.registry.register(Box::new(m.round_seconds.clone()))?;
        m.registry.register(Box::new(m.rounds.clone()))?;
        m.registry.register(Box::new(m.pool.addresses.clone()))?;
        m.registry.register(Box::new(m.pool.leases.clone()))?;
        m.registry.register(Box::new(m.pool.users.clone()))?;
        m.registry
            .register(Box::new(m.pool.max_leases_per_user.clone()))?;
        m.registry.register(Box::new(m.pool.pending.clone()))?;
        m.registry
            .register(Box::new(SharedCollector(m.traffic.clone())))?;
        Ok(Arc::new(m))
    }

    /// Reports this publisher's traffic from now on (set once leading).
    pub fn watch_publisher(&self, publisher: &Publisher) {
        if let Ok(mut p) = self.traffic.publisher.lock() {
            *p = Some(publisher.clone());
        }
    }

    /// Marks the replica ready (leader, state restored) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!("encoding metrics: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// `keyway_operator_snapshot_responses_total{kind}` and
/// `keyway_operator_snapshot_bytes_sent_total{node}`, built from the
/// publisher's own counters when scraped (nothing to keep in step).
struct SnapshotTraffic {
    publisher: Mutex<Option<Publisher>>,
    descs: Vec<Desc>,
}

const RESPONSES: (&str, &str) = (
    "keyway_operator_snapshot_responses_total",
    "Snapshot responses sent to subscribers, by kind (full snapshot or delta)",
);
const BYTES_SENT: (&str, &str) = (
    "keyway_operator_snapshot_bytes_sent_total",
    "Snapshot response bytes (protobuf, before gRPC framing) sent, by subscriber node",
);

impl SnapshotTraffic {
    fn new() -> Result<Self> {
        let descs = [(RESPONSES, "kind"), (BYTES_SENT, "node")]
            .into_iter()
            .map(|((name, help), label)| {
                Desc::new(
                    name.into(),
                    help.into(),
                    vec![label.into()],
                    Default::default(),
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(SnapshotTraffic {
            publisher: Mutex::new(None),
            descs,
        })
    }

    fn families(&self) -> Result<Vec<MetricFamily>, prometheus::Error> {
        let Some(publisher) = self.publisher.lock().ok().and_then(|p| p.clone()) else {
            return Ok(Vec::new());
        };
        let responses = IntCounterVec::new(Opts::new(RESPONSES.0, RESPONSES.1), &["kind"])?;
        let totals = publisher.totals();
        responses
            .with_label_values(&["full"])
            .inc_by(totals.full_sent);
        responses
            .with_label_values(&["delta"])
            .inc_by(totals.deltas_sent);
        let bytes = IntCounterVec::new(Opts::new(BYTES_SENT.0, BYTES_SENT.1), &["node"])?;
        // Two streams may carry one node id: one series per node.
        let mut per_node = BTreeMap::<String, u64>::new();
        for s in publisher.subscribers() {
            *per_node.entry(s.node_id).or_default() += s.bytes_sent;
        }
        for (node, n) in per_node {
            bytes.with_label_values(&[node.as_str()]).inc_by(n);
        }
        let mut out = responses.collect();
        out.extend(bytes.collect());
        Ok(out)
    }
}

/// Registers an `Arc`'d collector (the registry wants ownership).
struct SharedCollector(Arc<SnapshotTraffic>);

impl Collector for SharedCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.0.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.families().unwrap_or_else(|e| {
            tracing::warn!("snapshot traffic metrics: {e}");
            Vec::new()
        })
    }
}

/// Per-pool gauges.
pub struct PoolGauges {
    /// `keyway_operator_pool_addresses`.
    pub addresses: prometheus::GaugeVec,
    /// `keyway_operator_pool_leases`.
    pub leases: IntGaugeVec,
    /// `keyway_operator_pool_users`.
    pub users: IntGaugeVec,
    /// `keyway_operator_pool_max_leases_per_user`.
    pub max_leases_per_user: IntGaugeVec,
    /// `keyway_operator_pool_pending_leases`.
    pub pending: IntGaugeVec,
}

impl PoolGauges {
    /// Replaces every pool's figures (pools that are gone disappear).
    pub fn set_all(&self, pools: &[(String, keyway_core::allocator::PoolStats)]) {
        for v in [
            &self.leases,
            &self.users,
            &self.max_leases_per_user,
            &self.pending,
        ] {
            v.reset();
        }
        self.addresses.reset();
        let i = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        for (name, st) in pools {
            let l = &[name.as_str()];
            // f64: an IPv6 pool's size does not fit an integer gauge.
            #[allow(clippy::cast_precision_loss)]
            self.addresses.with_label_values(l).set(st.capacity as f64);
            self.leases.with_label_values(l).set(i(st.allocated));
            self.users.with_label_values(l).set(i(st.users));
            self.max_leases_per_user
                .with_label_values(l)
                .set(i(st.max_leases_per_user));
            self.pending.with_label_values(l).set(i(st.pending));
        }
    }
}

/// Serves `/metrics`, `/healthz`, `/readyz` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let m1 = metrics.clone();
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
                let m = metrics.clone();
                async move {
                    if m.ready.load(Ordering::Relaxed) {
                        (StatusCode::OK, "leader\n")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "standby (not the leader) or starting\n",
                        )
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving metrics")
}
