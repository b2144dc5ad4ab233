//! `keyway-proxy agent`: the provider side of `/xe/tunnel/2.0.0`.
//!
//! Runs next to VMs that no gateway can dial (behind NAT, on a provider's
//! own network). It is a libp2p host with a persisted identity; gateways dial
//! it at the addresses in the lease's `spec.target.provider` and open one
//! stream per tunnel. The agent follows the routing snapshot itself and lets
//! a stream through only to a live lease whose provider is this agent's peer
//! id; a snapshot that withdraws the lease closes its tunnels.

mod book;
mod metrics;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt as _;
use keyway_snapshot::client::subscribe;
use keyway_tunnel::p2p::{self, Host, HostConfig};
use keyway_tunnel::xe;
use libp2p::{Multiaddr, PeerId};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::compat::FuturesAsyncReadCompatExt as _;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Source;
use book::{Book, Forwards, Refusal, State};
use metrics::AgentMetrics;

#[derive(clap::Args)]
pub struct AgentArgs {
    #[command(flatten)]
    source: Source,
    /// The agent's libp2p identity (Ed25519, protobuf-encoded); created on
    /// first run. Its peer id is what leases put in `spec.target.provider.peerId`.
    /// Default: DIR/.keyway/agent-identity in local mode, else
    /// /var/lib/keyway/agent-identity.
    #[arg(long, value_name = "FILE")]
    identity: Option<PathBuf>,
    /// Print the peer id (creating the identity if needed) and exit.
    #[arg(long)]
    print_peer_id: bool,
    /// libp2p listen address; repeat for several (TCP and QUIC).
    #[arg(
        long,
        value_name = "MULTIADDR",
        default_values = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"]
    )]
    listen: Vec<Multiaddr>,
    /// The VM's SSH address tunnels go to.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:22")]
    forward: String,
    /// A lease whose VM is elsewhere: NAMESPACE/NAME=HOST:PORT; repeatable.
    #[arg(long, value_name = "NS/NAME=HOST:PORT")]
    lease_forward: Vec<String>,
    /// Only these peers (gateways) may open tunnels; repeatable. Default:
    /// any peer that knows a live lease hash of this agent.
    #[arg(long, value_name = "PEER_ID")]
    allow_peer: Vec<String>,
    /// Where the last applied snapshot is kept. Default:
    /// DIR/.keyway/agent-snapshot.pb in local mode, else
    /// /var/lib/keyway/agent-snapshot.pb.
    #[arg(long, value_name = "FILE")]
    cache: Option<PathBuf>,
    /// Metrics and health listen address (/metrics, /healthz, /readyz).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9090")]
    metrics_listen: std::net::SocketAddr,
    /// Seconds an opened stream has to send the 32-byte lease hash.
    #[arg(long, default_value_t = xe::HANDSHAKE_DEADLINE.as_secs())]
    handshake_timeout_secs: u64,
    /// Streams still in the handshake; beyond it new streams are dropped.
    #[arg(long, default_value_t = 256)]
    max_handshakes: usize,
    /// Open tunnels; beyond it handshakes are refused.
    #[arg(long, default_value_t = 10_000)]
    max_tunnels: usize,
    /// Seconds to reach the VM's sshd.
    #[arg(long, default_value_t = 10)]
    connect_timeout_secs: u64,
    /// Seconds a libp2p connection without tunnels stays open.
    #[arg(long, default_value_t = 300)]
    idle_timeout_secs: u64,
    /// Seconds SIGTERM waits for open tunnels before closing them.
    #[arg(long, default_value_t = 30)]
    drain_secs: u64,
}

/// Buffer per direction of a tunnel: large enough to fill noise's 64 KiB
/// frames (tokio's default 8 KiB quarters the per-frame work).
const COPY_BUF: usize = 256 * 1024;

/// What every stream handler shares.
struct Agent {
    state: Mutex<State>,
    metrics: AgentMetrics,
    allow: Option<Vec<PeerId>>,
    handshakes: Arc<Semaphore>,
    handshake_timeout: Duration,
    connect_timeout: Duration,
    max_tunnels: usize,
}

impl Agent {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub async fn run(args: AgentArgs) -> Result<()> {
    let src = &args.source;
    let identity_path = args
        .identity
        .clone()
        .unwrap_or_else(|| src.state_path("agent-identity", "/var/lib/keyway/agent-identity"));
    let keypair = p2p::load_or_create_identity(&identity_path).map_err(anyhow::Error::msg)?;
    let me = keypair.public().to_peer_id();
    if args.print_peer_id {
        println!("{me}");
        return Ok(());
    }
    let forwards = Arc::new(
        Forwards::new(args.forward.clone(), &args.lease_forward).map_err(anyhow::Error::msg)?,
    );
    let allow = if args.allow_peer.is_empty() {
        None
    } else {
        Some(
            args.allow_peer
                .iter()
                .map(|p| {
                    p.parse::<PeerId>()
                        .with_context(|| format!("--allow-peer {p:?} is not a peer id"))
                })
                .collect::<Result<Vec<_>>>()?,
        )
    };
    let cache = args.cache.clone().unwrap_or_else(|| {
        src.state_path("agent-snapshot.pb", "/var/lib/keyway/agent-snapshot.pb")
    });
    let subscription = src.subscriber("agent", || format!("agent-{me}"), Some(cache))?;

    let base = crate::metrics::Metrics::for_agent()?;
    let agent = Arc::new(Agent {
        state: Mutex::new(State::default()),
        metrics: AgentMetrics::new(base.registry())?,
        allow,
        handshakes: Arc::new(Semaphore::new(args.max_handshakes.max(1))),
        handshake_timeout: Duration::from_secs(args.handshake_timeout_secs.max(1)),
        connect_timeout: Duration::from_secs(args.connect_timeout_secs.max(1)),
        max_tunnels: args.max_tunnels,
    });
    let metrics_listener = crate::metrics::bind(args.metrics_listen).await?;
    let host = Host::start(
        keypair,
        HostConfig {
            listen: args.listen.clone(),
            idle_timeout: Duration::from_secs(args.idle_timeout_secs.max(1)),
            ..HostConfig::default()
        },
    )
    .map_err(anyhow::Error::msg)?;
    let mut incoming = host.incoming().map_err(anyhow::Error::msg)?;

    let (sub, sub_task) = subscribe(subscription, |_| Ok(()));
    // Each applied snapshot becomes the book in force; what it withdraws closes.
    let apply = {
        let agent = agent.clone();
        let base = base.clone();
        let me = me.to_string();
        let mut rx = sub.snapshot.clone();
        tokio::spawn(async move {
            loop {
                if let Some(snap) = rx.borrow_and_update().clone() {
                    let book = Arc::new(Book::from_leases(
                        snap.table.leases(),
                        &me,
                        forwards.clone(),
                    ));
                    let served = book.served();
                    let closed = agent.state().replace(book);
                    agent.metrics.settled.inc_by(closed as u64);
                    let v = snap.version;
                    base.snapshot_applied(v.epoch, v.version, served, snap.generated_unix_ms);
                    info!(version = %format!("e{}.v{}", v.epoch, v.version), served, closed, "routing snapshot applied");
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    };

    let stop = CancellationToken::new();
    let signals = crate::run::on_signal(stop.clone());
    let metrics_task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            if let Err(e) =
                crate::metrics::serve(
                    metrics_listener,
                    base,
                    async move { stop.cancelled().await },
                )
                .await
            {
                warn!("{e:#}");
            }
        })
    };
    let addrs = host
        .listen_addrs(args.listen.len(), Duration::from_secs(5))
        .await;
    if addrs.is_empty() {
        anyhow::bail!("the agent could not listen on any of {:?}", args.listen);
    }
    let shown: Vec<String> = addrs.iter().map(|a| format!("{a}/p2p/{me}")).collect();
    // Operators copy these into spec.target.provider; say them once, plainly.
    println!("keyway-proxy agent {me} listening on {}", shown.join(" "));

    loop {
        let next = tokio::select! {
            s = incoming.next() => s,
            () = stop.cancelled() => None,
        };
        let Some((peer, stream)) = next else { break };
        // One task per stream, at once: libp2p-stream drops streams that
        // wait (zero-capacity channel).
        tokio::spawn(serve_stream(agent.clone(), peer, stream));
    }
    drop(incoming);
    let drain = Duration::from_secs(args.drain_secs);
    let deadline = Instant::now() + drain;
    while agent.state().live() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.state().close_all();
    signals.abort();
    apply.abort();
    sub.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(2), sub_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), metrics_task).await;
    info!("stopped");
    Ok(())
}

/// One inbound stream: handshake, checks, VM dial, then the byte pipe.
async fn serve_stream(agent: Arc<Agent>, peer: PeerId, stream: libp2p::Stream) {
    let m = &agent.metrics;
    let Ok(permit) = agent.handshakes.clone().try_acquire_owned() else {
        m.handshake("busy");
        debug!(%peer, "too many handshakes; stream dropped");
        return;
    };
    let mut s = stream.compat();
    let hash = match xe::read_request(&mut s, agent.handshake_timeout).await {
        Ok(h) => h,
        Err(e) => {
            let label = if e.kind() == std::io::ErrorKind::TimedOut {
                "timeout"
            } else {
                "malformed"
            };
            m.handshake(label);
            debug!(%peer, "tunnel handshake dropped: {e}");
            return;
        }
    };
    let admitted = if agent.allow.as_ref().is_some_and(|a| !a.contains(&peer)) {
        Err(Refusal::PeerNotAllowed)
    } else {
        agent.state().admit(&hash, agent.max_tunnels)
    };
    let (id, entry, cancel) = match admitted {
        Ok(a) => a,
        Err(r) => {
            m.handshake(r.label());
            info!(%peer, lease = %hex::encode(hash), "tunnel refused: {}", r.message());
            let _ = xe::refuse(&mut s, r.message()).await;
            return;
        }
    };
    let end = |agent: &Agent| agent.state().end(id);
    let dial = tokio::time::timeout(agent.connect_timeout, TcpStream::connect(&entry.forward));
    let mut vm = match dial.await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            end(&agent);
            m.handshake("vm_unreachable");
            warn!(lease = %entry.label, to = %entry.forward, "VM unreachable: {e}");
            let _ = xe::refuse(&mut s, &format!("the VM's sshd is unreachable: {e}")).await;
            return;
        }
        Err(_) => {
            end(&agent);
            m.handshake("vm_unreachable");
            warn!(lease = %entry.label, to = %entry.forward, "VM did not answer");
            let _ = xe::refuse(&mut s, "the VM's sshd did not answer in time").await;
            return;
        }
    };
    if cancel.is_cancelled() {
        m.handshake(Refusal::UnknownLease.label());
        let _ = xe::refuse(&mut s, Refusal::UnknownLease.message()).await;
        return; // replace() already removed it
    }
    let _ = vm.set_nodelay(true);
    if let Err(e) = xe::accept(&mut s).await {
        end(&agent);
        debug!(%peer, "tunnel accept: {e}");
        return;
    }
    drop(permit);
    m.handshake("ok");
    m.active.inc();
    info!(%peer, lease = %entry.label, to = %entry.forward, "tunnel open");
    tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut s, &mut vm, COPY_BUF, COPY_BUF) => match r {
            Ok((to_vm, from_vm)) => {
                m.bytes.with_label_values(&["to_vm"]).inc_by(to_vm);
                m.bytes.with_label_values(&["from_vm"]).inc_by(from_vm);
            }
            Err(e) => debug!(lease = %entry.label, "tunnel ended: {e}"),
        },
        () = cancel.cancelled() => info!(lease = %entry.label, "tunnel closed: lease withdrawn"),
    }
    m.active.dec();
    end(&agent);
}
