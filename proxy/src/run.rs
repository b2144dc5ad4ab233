//! `keyway-proxy run`: wires the snapshot subscription, the routing table,
//! the SSH gateway and the metrics endpoint together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use keyway_snapshot::client::subscribe;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Source;
use crate::gateway::{self, Gateway, Limits};
use crate::keys::{self, RelayIssuer};
use crate::metrics::{self, Metrics};
use crate::routes::RouteTable;

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    source: Source,
    /// SSH listen address; repeat to listen on several (e.g. one per pooled IP).
    #[arg(
        long = "ssh-listen",
        value_name = "ADDR",
        default_value = "0.0.0.0:2222"
    )]
    ssh_listen: Vec<SocketAddr>,
    /// Metrics and health listen address (/metrics, /healthz, /readyz).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Ed25519 host key; created on first run. Share it between replicas so
    /// clients see one gateway. Default: DIR/.keyway/proxy-host-key in local
    /// mode, else /var/lib/keyway/host_key.
    #[arg(long, value_name = "FILE")]
    host_key: Option<PathBuf>,
    /// The relay CA's private key (OpenSSH format), used to mint the
    /// short-lived certificates relay logins use. Default in local mode:
    /// DIR/.keyway/relay-ca.
    #[arg(long, value_name = "FILE")]
    relay_ca_key: Option<PathBuf>,
    /// The gateway's libp2p identity for provider tunnels (agents may allow
    /// only known gateways with --allow-peer): a libp2p key, created on first
    /// run, or an Ed25519 PKCS#8 PEM key (one Secret for every replica).
    /// Default: DIR/.keyway/gateway-identity in local mode, else
    /// /var/lib/keyway/gateway-identity.
    #[arg(long, value_name = "FILE")]
    tunnel_identity: Option<PathBuf>,
    /// Where the last applied snapshot is kept, so a restart routes before the
    /// operator answers. Default: DIR/.keyway/proxy-snapshot.pb in local mode,
    /// else /var/lib/keyway/snapshot.pb.
    #[arg(long, value_name = "FILE")]
    cache: Option<PathBuf>,
    /// Seconds from accept to authenticated before a connection is closed.
    #[arg(long, default_value_t = 30)]
    auth_timeout_secs: u64,
    /// Connections still handshaking; beyond it the oldest is evicted.
    #[arg(long, default_value_t = 256)]
    max_unauthenticated: usize,
    /// All open connections; beyond it new ones are refused.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Open channels (sessions, forwards) per SSH connection; beyond it a
    /// channel open is refused with "resource shortage".
    #[arg(long, default_value_t = 64)]
    max_channels: usize,
    /// Seconds to reach a target (TCP, plus the SSH login for relays).
    #[arg(long, default_value_t = 10)]
    connect_timeout_secs: u64,
    /// Seconds SIGTERM waits for open connections before closing them.
    #[arg(long, default_value_t = 30)]
    drain_secs: u64,
    /// Messages buffered per channel before the connection pushes back.
    #[arg(long, default_value_t = 64)]
    channel_buffer: usize,
    /// Window (KiB) a bridged channel starts with, each direction; the
    /// gateway holds at most a channel's window for it.
    #[arg(long, default_value_t = 128, value_name = "KIB")]
    channel_window_kib: u32,
    /// Window (KiB) a busy channel may grow to while the budgets allow.
    #[arg(long, default_value_t = 2048, value_name = "KIB")]
    max_channel_window_kib: u32,
    /// Relay buffer budget (MiB): channel windows the whole gateway may have
    /// granted. A channel that does not fit is refused with a message.
    #[arg(long, default_value_t = 512, value_name = "MIB")]
    relay_buffer_budget_mib: u64,
    /// One user's share (MiB) of the relay buffer budget (user: the lease's
    /// spec.user).
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    user_relay_buffer_mib: u64,
    /// Key exchanges the SSH listener offers, in order. Default: the
    /// elliptic-curve ones only; `diffie-hellman-group14-sha256` and
    /// `diffie-hellman-group16-sha512` may be added for old clients (each
    /// handshake then costs the gateway 10-100x more CPU).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "mlkem768x25519-sha256,curve25519-sha256,curve25519-sha256@libssh.org"
    )]
    kex_algorithms: Vec<String>,
    /// New unauthenticated connections per second one source (an IPv4
    /// address or an IPv6 /64) may start, sustained; beyond it they are
    /// closed before the handshake. The SSH and HTTPS listeners each apply
    /// it (and the two below) in a table of their own.
    #[arg(long, default_value_t = 20.0)]
    handshakes_per_source_per_sec: f64,
    /// How many one source may start at once after a quiet spell.
    #[arg(long, default_value_t = 100)]
    handshake_burst_per_source: u32,
    /// Unauthenticated connections one source may hold open.
    #[arg(long, default_value_t = 32)]
    max_unauthenticated_per_source: usize,
    /// Authenticated connections one user may hold at once.
    #[arg(long, default_value_t = 256)]
    max_connections_per_user: usize,
    /// Open channels one user may hold over all its connections.
    #[arg(long, default_value_t = 512)]
    max_channels_per_user: usize,
    /// L4 edges (HAProxy `send-proxy-v2`, a load balancer) allowed to send a
    /// PROXY protocol v1/v2 header, whose destination address then routes
    /// the connection; comma-separated CIDRs or IPs. A header from any other
    /// peer closes the connection.
    #[arg(long, value_name = "CIDRS", value_delimiter = ',')]
    trusted_proxy_cidrs: Vec<String>,
    /// Milliseconds a trusted edge has to send its PROXY header after
    /// connecting; a silent connection (a TCP health check) is closed then.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    proxy_header_timeout_ms: u64,
    /// HTTPS (CONNECT) listen address; repeat for several. Served only with
    /// --tls-cert and --tls-key (default then: 0.0.0.0:8443).
    #[arg(long = "https-listen", value_name = "ADDR")]
    https_listen: Vec<SocketAddr>,
    /// TLS certificate chain (PEM) of the CONNECT listener.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of the CONNECT listener.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CONNECT to `<lease>.<namespace>.<DOMAIN>:<port>` reaches that lease's
    /// VM for the lease's own keys.
    #[arg(long, value_name = "DOMAIN")]
    lease_domain: Option<String>,
    /// Also accept the plain `X-Signature` on `POST /tunnel/{hash}/tcp`. It
    /// is the same bytes every time, so a captured header opens tunnels for
    /// as long as the key stays on the lease; by default only fresh,
    /// single-use `Proxy-Authorization: Keyway-SSHSIG` proofs are accepted.
    #[arg(long)]
    allow_replayable_upgrade_proofs: bool,
    /// Deprecated no-op: fresh upgrade proofs are required by default now
    /// (see --allow-replayable-upgrade-proofs). Kept so old command lines
    /// still start.
    #[arg(long, hide = true)]
    require_fresh_upgrade_proofs: bool,
    /// Open connections on the HTTPS (CONNECT) listener, tunnels included;
    /// beyond it new ones are closed. Separate from --max-connections, so a
    /// flood on one listener never refuses logins on the other.
    #[arg(long, default_value_t = 1000)]
    https_max_connections: usize,
    /// HTTPS connections without an admitted request yet (handshaking, or
    /// sending their request); beyond it the oldest is evicted.
    #[arg(long, default_value_t = 256)]
    https_max_unauthenticated: usize,
    /// Seconds from accept to a complete request head on the HTTPS listener
    /// (PROXY header, TLS handshake and request together).
    #[arg(long, default_value_t = 10)]
    https_handshake_timeout_secs: u64,
}

/// KiB to bytes, kept within what SSH windows can say (at least 1 KiB).
fn kib(k: u32) -> u32 {
    k.clamp(1, u32::MAX >> 10) << 10
}

pub async fn run(args: RunArgs) -> Result<()> {
    // Every connection is a socket, and relays add one upstream: lift the
    // soft descriptor limit to the hard one so --max-connections is reachable.
    if args.require_fresh_upgrade_proofs {
        warn!(
            "--require-fresh-upgrade-proofs is deprecated and does nothing: fresh upgrade proofs \
             are required by default (--allow-replayable-upgrade-proofs turns X-Signature back on)"
        );
    }
    // Each HTTPS tunnel is two sockets as well.
    let sockets = args
        .max_connections
        .saturating_mul(2)
        .saturating_add(args.https_max_connections.saturating_mul(2));
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if (n as usize) < sockets => warn!(
            limit = n,
            "the open-file limit is below 2 x (--max-connections + --https-max-connections); \
             raise it (LimitNOFILE / ulimit -n)"
        ),
        Ok(_) => {}
        Err(e) => warn!("could not raise the open-file limit: {e}"),
    }
    let src = &args.source;
    let cache = args
        .cache
        .clone()
        .unwrap_or_else(|| src.state_path("proxy-snapshot.pb", "/var/lib/keyway/snapshot.pb"));
    let subscription = src.subscriber("gateway", default_node_id, Some(cache))?;
    let host_key_path = args
        .host_key
        .clone()
        .unwrap_or_else(|| src.state_path("proxy-host-key", "/var/lib/keyway/host_key"));
    let host_key = keys::load_or_create_host_key(&host_key_path)?;
    let relay_ca_path = args
        .relay_ca_key
        .clone()
        .or_else(|| src.local.as_ref().map(|d| d.join(".keyway/relay-ca")));
    let relay = match &relay_ca_path {
        Some(p) => Some(Arc::new(RelayIssuer::new(keys::load_private(p)?)?)),
        None => {
            warn!("no --relay-ca-key: relay sessions are refused; lease-hash jumps (-J/-W) work");
            None
        }
    };
    let limits = Limits {
        auth_timeout: Duration::from_secs(args.auth_timeout_secs.max(1)),
        max_unauthenticated: args.max_unauthenticated.max(1),
        max_connections: args.max_connections.max(1),
        max_channels: args.max_channels.max(1),
        connect_timeout: Duration::from_secs(args.connect_timeout_secs.max(1)),
        drain: Duration::from_secs(args.drain_secs),
        channel_buffer: args.channel_buffer.max(1),
        trusted_proxies: gateway::proxy_header::Trusted::parse(&args.trusted_proxy_cidrs)
            .map_err(anyhow::Error::msg)?,
        proxy_header_timeout: Duration::from_millis(args.proxy_header_timeout_ms.max(1)),
        window: gateway::flow::WindowPolicy {
            initial: kib(args.channel_window_kib),
            max: kib(args.max_channel_window_kib.max(args.channel_window_kib)),
        },
        budgets: gateway::budget::BudgetLimits {
            gateway_bytes: args.relay_buffer_budget_mib.saturating_mul(1 << 20),
            tenant_bytes: args.user_relay_buffer_mib.saturating_mul(1 << 20),
            tenant_connections: args.max_connections_per_user.max(1),
            tenant_channels: args.max_channels_per_user.max(1),
        },
        sources: gateway::sources::SourceLimits {
            rate_per_sec: args.handshakes_per_source_per_sec.max(0.01),
            burst: args.handshake_burst_per_source.max(1),
            max_pending: args.max_unauthenticated_per_source.max(1),
        },
        kex: gateway::ssh::parse_kex(&args.kex_algorithms).map_err(anyhow::Error::msg)?,
        ..Limits::default()
    };

    let metrics = Metrics::new()?;
    let metrics_listener = metrics::bind(args.metrics_listen).await?;
    let listeners = gateway::bind(&args.ssh_listen).await?;
    let connect = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = gateway::connect::tls_config(cert, key)?;
            let addrs = if args.https_listen.is_empty() {
                vec![SocketAddr::from(([0, 0, 0, 0], 8443))]
            } else {
                args.https_listen.clone()
            };
            Some((gateway::bind(&addrs).await?, tls))
        }
        _ if !args.https_listen.is_empty() => {
            anyhow::bail!("--https-listen needs --tls-cert and --tls-key")
        }
        _ => None,
    };

    let (table_tx, table_rx) = watch::channel(Arc::new(RouteTable::default()));
    // A key the user named must work; the default path may sit on a
    // read-only filesystem, where a throwaway identity still serves agents
    // that do not pin gateways.
    let identity = match &args.tunnel_identity {
        Some(path) => keyway_tunnel::p2p::load_or_create_identity(path)
            .map_err(|e| anyhow::anyhow!("--tunnel-identity: {e}"))?,
        None => {
            let path = src.state_path("gateway-identity", "/var/lib/keyway/gateway-identity");
            keyway_tunnel::p2p::load_or_create_identity(&path).unwrap_or_else(|e| {
                warn!("{e}; provider tunnels use a throwaway libp2p identity (agents with --allow-peer will refuse it)");
                libp2p::identity::Keypair::generate_ed25519()
            })
        }
    };
    let p2p = keyway_tunnel::p2p::Host::start(identity, keyway_tunnel::p2p::HostConfig::default())
        .map_err(anyhow::Error::msg)?;
    info!(peer = %p2p.peer_id(), "libp2p host for provider tunnels");
    let gw = Gateway::new(
        host_key,
        limits,
        metrics.clone(),
        relay.clone(),
        table_rx,
        p2p,
    );

    let (sub, sub_task) = subscribe(subscription, |_| Ok(()));

    // Each applied snapshot: index it, swap it in, close what it withdrew.
    let apply = {
        let gw = gw.clone();
        let mut rx = sub.snapshot.clone();
        let relay = relay.clone();
        tokio::spawn(async move {
            let mut warned_ca = false;
            // The version the current route table indexes.
            let mut indexed: Option<(keyway_snapshot::pb::Version, Arc<RouteTable>)> = None;
            loop {
                let snap = rx.borrow_and_update().clone();
                if let Some(snap) = snap {
                    // The delta that led here, when it starts from what the
                    // table indexes (the watch keeps only the latest): O(change).
                    // Otherwise (start, full snapshot, skipped versions) the
                    // whole table is indexed again.
                    let table = match (&indexed, &snap.change) {
                        (Some((v, t)), Some(d)) if d.base == Some(*v) => {
                            Arc::new(t.apply(d, &snap.table))
                        }
                        _ => Arc::new(RouteTable::from_table(&snap.table)),
                    };
                    indexed = Some((snap.version, table.clone()));
                    let v = snap.version;
                    if let Some(r) = snap.table.relay() {
                        if r.cert_validity_secs > 0 {
                            gw.cert_validity_secs
                                .store(u64::from(r.cert_validity_secs), Ordering::Relaxed);
                        }
                        if let Some(issuer) = &relay
                            && !warned_ca
                            && issuer.ca_public() != r.ca_public_key.trim()
                        {
                            warned_ca = true;
                            warn!(
                                "the relay CA key does not match the snapshot's relay CA; VMs will refuse relay logins"
                            );
                        }
                    }
                    let _ = table_tx.send(table.clone());
                    gw.metrics.snapshot_applied(
                        v.epoch,
                        v.version,
                        table.leases(),
                        snap.generated_unix_ms,
                    );
                    info!(version = %format!("e{}.v{}", v.epoch, v.version), leases = table.leases(), "routing snapshot applied");
                    gw.enforce(&table);
                    // enforce() just settled every connection the table no
                    // longer routes, so their upstreams can go too.
                    gw.upstreams
                        .prune(gw.limits.upstream_idle, |k| table.contains(k))
                        .await;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    };
    // Idle upstream connections close without waiting for a snapshot.
    let janitor = {
        let gw = gw.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let table = gw.table();
                gw.upstreams
                    .prune(gw.limits.upstream_idle, |k| table.contains(k))
                    .await;
            }
        })
    };

    let stop = CancellationToken::new();
    let metrics_task = {
        let stop = stop.clone();
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) =
                metrics::serve(metrics_listener, m, async move { stop.cancelled().await }).await
            {
                warn!("{e:#}");
            }
        })
    };
    let addrs: Vec<String> = args.ssh_listen.iter().map(|a| a.to_string()).collect();
    info!(ssh = %addrs.join(","), metrics = %args.metrics_listen, "keyway-proxy gateway started");
    let signals = on_signal(stop.clone());
    // The data plane (every SSH and CONNECT connection, key exchanges and
    // TLS handshakes included) runs on a runtime of its own: whatever peers
    // make handshakes cost, the control plane on this one (/metrics,
    // /readyz, applying snapshots, settling withdrawn leases) keeps threads
    // of its own for the OS to schedule.
    let data_plane = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keyway-conn")
        .build()
        .context("starting the connection runtime")?;
    let connect_task = connect.map(|(listeners, tls)| {
        let gw = gw.clone();
        let stop = stop.clone();
        let lease_domain = args.lease_domain.clone();
        let allow_replayable_upgrade_proofs = args.allow_replayable_upgrade_proofs;
        let limits = gateway::connect::HttpsLimits {
            max_connections: args.https_max_connections.max(1),
            max_unauthenticated: args.https_max_unauthenticated.max(1),
            handshake_timeout: Duration::from_secs(args.https_handshake_timeout_secs.max(1)),
            // The same per-source flags as SSH, counted apart.
            sources: gw.limits.sources,
        };
        data_plane.spawn(async move {
            let config = gateway::connect::ConnectConfig {
                tls,
                lease_domain,
                allow_replayable_upgrade_proofs,
                limits,
            };
            gw.serve_connect(listeners, config, stop).await;
        })
    });
    let ssh = {
        let gw = gw.clone();
        let stop = stop.clone();
        data_plane.spawn(async move { gw.serve(listeners, stop).await })
    };
    if let Err(e) = ssh.await {
        warn!("the SSH listener task failed: {e}");
    }
    if let Some(t) = connect_task {
        t.abort();
    }
    // Dropping a runtime may block; this one has finished its work.
    data_plane.shutdown_background();
    stop.cancel();
    signals.abort();
    apply.abort();
    janitor.abort();
    sub.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(2), sub_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), metrics_task).await;
    info!("stopped");
    Ok(())
}

fn default_node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .map(|h| format!("{h}-{}", std::process::id()))
        .unwrap_or_else(|| format!("keyway-proxy-{}", std::process::id()))
}

/// Cancels `stop` on SIGTERM or Ctrl-C.
pub fn on_signal(stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    warn!("no SIGTERM handler: {e}");
                    let _ = tokio::signal::ctrl_c().await;
                    stop.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: no new connections; draining"),
            _ = tokio::signal::ctrl_c() => info!("interrupted: no new connections; draining"),
        }
        stop.cancel();
    })
}
