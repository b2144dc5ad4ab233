//! The libp2p host gateways and provider agents share: TCP + noise + yamux
//! and QUIC, a persisted identity, raw streams through `libp2p-stream`.
//!
//! The swarm runs in its own task; [`Host`] is the cheap, cloneable handle
//! the rest of the process uses. Choices that follow the rust-libp2p
//! pitfalls (shared/LESSONS.md):
//! - yamux keeps its default config (any setter falls back to a fixed
//!   256 KiB window in libp2p-yamux 0.47);
//! - the idle-connection timeout is raised from 10 s, so a gateway reuses its
//!   connection to an agent across SSH logins;
//! - whoever calls [`Host::incoming`] must spawn a task per stream at once
//!   (libp2p-stream hands streams over a zero-capacity channel);
//! - the gateway dials with the lease's addresses explicitly, then opens the
//!   stream on the connection that exists.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt as _;
use libp2p::connection_limits::{self, ConnectionLimits};
use libp2p::identity::Keypair;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt as _};
use tracing::{debug, info, warn};

use crate::xe;

/// A `/xe/tunnel/2.0.0` stream in tokio's I/O traits.
pub type TunnelStream = Compat<libp2p::Stream>;

/// Why a tunnel could not be opened (gateway side).
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("bad provider peer id {0:?}")]
    BadPeerId(String),
    #[error("bad provider address {0:?}: {1}")]
    BadAddress(String, String),
    #[error("the lease names no provider address to dial")]
    NoAddresses,
    #[error("provider {peer} unreachable: {why}")]
    Unreachable { peer: PeerId, why: String },
    #[error("opening {} to {peer}: {why}", xe::PROTOCOL)]
    Stream { peer: PeerId, why: String },
    #[error(transparent)]
    Handshake(#[from] xe::OpenError),
    #[error("the libp2p host has stopped")]
    Stopped,
}

impl DialError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            DialError::BadPeerId(_) | DialError::BadAddress(..) | DialError::NoAddresses => {
                "config"
            }
            DialError::Unreachable { .. } | DialError::Stopped => "unreachable",
            DialError::Stream { .. } => "stream",
            DialError::Handshake(xe::OpenError::Refused(_)) => "refused",
            DialError::Handshake(_) => "protocol",
        }
    }
}

/// Settings of a [`Host`].
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Addresses to listen on (agents); empty for a dial-only host (gateways).
    pub listen: Vec<Multiaddr>,
    /// How long a connection without streams stays open.
    pub idle_timeout: Duration,
    /// Connections still in their noise handshake, from all peers.
    pub max_pending_incoming: u32,
    /// Established connections per remote peer.
    pub max_per_peer: u32,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            listen: Vec::new(),
            idle_timeout: Duration::from_secs(300),
            max_pending_incoming: 128,
            max_per_peer: 8,
        }
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    stream: libp2p_stream::Behaviour,
}

enum Command {
    Connect {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<(), Refused>>,
    },
}

/// Why the swarm could not connect to a peer.
enum Refused {
    NoAddresses,
    Dial(String),
}

/// A running libp2p host. Clone it freely; the swarm stops when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Host {
    peer_id: PeerId,
    control: libp2p_stream::Control,
    commands: mpsc::Sender<Command>,
    listening: watch::Receiver<Vec<Multiaddr>>,
}

impl Host {
    /// Starts the swarm on the current tokio runtime.
    pub fn start(keypair: Keypair, cfg: HostConfig) -> Result<Host, String> {
        let peer_id = keypair.public().to_peer_id();
        let limits = ConnectionLimits::default()
            .with_max_pending_incoming(Some(cfg.max_pending_incoming))
            .with_max_established_per_peer(Some(cfg.max_per_peer));
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                libp2p::tcp::Config::default().nodelay(true),
                libp2p::noise::Config::new,
                libp2p::yamux::Config::default,
            )
            .map_err(|e| format!("libp2p TCP transport: {e}"))?
            .with_quic()
            .with_behaviour(|_| Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                stream: libp2p_stream::Behaviour::new(),
            })
            .map_err(|e| format!("libp2p behaviour: {e}"))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(cfg.idle_timeout))
            .build();
        for addr in &cfg.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| format!("listening on {addr}: {e}"))?;
        }
        let control = swarm.behaviour().stream.new_control();
        let (commands, rx) = mpsc::channel(256);
        let (listen_tx, listening) = watch::channel(Vec::new());
        tokio::spawn(drive(swarm, rx, listen_tx));
        Ok(Host {
            peer_id,
            control,
            commands,
            listening,
        })
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The addresses the host listens on, once `want` of them are bound (or
    /// after `timeout`, whatever is bound by then).
    pub async fn listen_addrs(&self, want: usize, timeout: Duration) -> Vec<Multiaddr> {
        let mut rx = self.listening.clone();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|a| a.len() >= want)).await;
        rx.borrow().clone()
    }

    /// Inbound `/xe/tunnel/2.0.0` streams. Spawn a task per stream at once.
    pub fn incoming(&self) -> Result<libp2p_stream::IncomingStreams, String> {
        self.control
            .clone()
            .accept(StreamProtocol::new(xe::PROTOCOL))
            .map_err(|e| e.to_string())
    }

    /// Opens a tunnel to `lease_hash` at the agent `peer`, dialing `addrs`
    /// when no connection is open. On `Ok` the stream carries the VM's SSH
    /// bytes. Bounded by the caller's timeout.
    pub async fn open(
        &self,
        peer: &str,
        addrs: &[String],
        lease_hash: &[u8; 32],
    ) -> Result<TunnelStream, DialError> {
        let mut stream = self.open_raw(peer, addrs).await?;
        xe::open(&mut stream, lease_hash).await?;
        Ok(stream)
    }

    /// A `/xe/tunnel/2.0.0` stream before the handshake (for diagnostics
    /// and tests; [`Host::open`] is the way to a VM).
    pub async fn open_raw(&self, peer: &str, addrs: &[String]) -> Result<TunnelStream, DialError> {
        let peer: PeerId = peer
            .parse()
            .map_err(|_| DialError::BadPeerId(peer.to_string()))?;
        let addrs = addrs
            .iter()
            .map(|a| {
                a.parse::<Multiaddr>()
                    .map_err(|e| DialError::BadAddress(a.clone(), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Connect { peer, addrs, reply })
            .await
            .map_err(|_| DialError::Stopped)?;
        match answer.await {
            Ok(Ok(())) => {}
            Ok(Err(Refused::NoAddresses)) => return Err(DialError::NoAddresses),
            Ok(Err(Refused::Dial(why))) => return Err(DialError::Unreachable { peer, why }),
            Err(_) => return Err(DialError::Stopped),
        }
        let stream = self
            .control
            .clone()
            .open_stream(peer, StreamProtocol::new(xe::PROTOCOL))
            .await
            .map_err(|e| DialError::Stream {
                peer,
                why: e.to_string(),
            })?;
        Ok(stream.compat())
    }
}

/// The swarm's event loop: dials on request, answers the dialers, records
/// listen addresses. Ends when every [`Host`] handle is gone.
async fn drive(
    mut swarm: libp2p::Swarm<Behaviour>,
    mut commands: mpsc::Receiver<Command>,
    listening: watch::Sender<Vec<Multiaddr>>,
) {
    let mut waiting: HashMap<PeerId, Vec<oneshot::Sender<Result<(), Refused>>>> = HashMap::new();
    loop {
        tokio::select! {
            cmd = commands.recv() => {
                let Some(Command::Connect { peer, addrs, reply }) = cmd else { break };
                if swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(()));
                    continue;
                }
                if addrs.is_empty() {
                    let _ = reply.send(Err(Refused::NoAddresses));
                    continue;
                }
                let opts = DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                match swarm.dial(opts) {
                    Ok(()) | Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {
                        waiting.entry(peer).or_default().push(reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(Refused::Dial(e.to_string())));
                    }
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                    debug!(%peer_id, addr = %endpoint.get_remote_address(), "libp2p connection");
                    for w in waiting.remove(&peer_id).unwrap_or_default() {
                        let _ = w.send(Ok(()));
                    }
                }
                SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                    let why = error.to_string();
                    debug!(%peer, "libp2p dial failed: {why}");
                    for w in waiting.remove(&peer).unwrap_or_default() {
                        let _ = w.send(Err(Refused::Dial(why.clone())));
                    }
                }
                SwarmEvent::NewListenAddr { address, .. } => {
                    info!(%address, "libp2p listening");
                    listening.send_modify(|a| a.push(address));
                }
                SwarmEvent::ExpiredListenAddr { address, .. } => {
                    listening.send_modify(|a| a.retain(|x| x != &address));
                }
                SwarmEvent::ListenerError { error, .. } => warn!("libp2p listener: {error}"),
                SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                    debug!(from = %send_back_addr, "libp2p inbound connection failed: {error}");
                }
                _ => {}
            },
        }
    }
}

/// Reads the host's identity from `path`, creating it on first use (Ed25519,
/// libp2p protobuf encoding, mode 0600). Concurrent first runs on a shared
/// volume converge on one key: the new key is written completely to a
/// temporary file and hard-linked into place, so a loser reads the winner's.
///
/// An Ed25519 key in PKCS#8 PEM is read too, so a key made by `openssl
/// genpkey -algorithm ed25519` or Helm's `genPrivateKey "ed25519"` (a
/// Secret shared by every gateway replica) gives a stable peer id.
pub fn load_or_create_identity(path: &Path) -> Result<Keypair, String> {
    match std::fs::read(path) {
        Ok(bytes) => {
            return decode_identity(&bytes).map_err(|e| format!("{}: {e}", path.display()));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let key = Keypair::generate_ed25519();
    let bytes = key
        .to_protobuf_encoding()
        .map_err(|e| format!("encoding the identity: {e}"))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    write_private(&tmp, &bytes).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            info!(path = %path.display(), peer = %key.public().to_peer_id(), "created a libp2p identity");
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create_identity(path),
        Err(e) => Err(format!("creating {}: {e}", path.display())),
    }
}

/// A libp2p protobuf-encoded keypair, or an Ed25519 private key in PKCS#8
/// PEM (read by the PKCS#8 reader the host key and relay CA use).
fn decode_identity(bytes: &[u8]) -> Result<Keypair, String> {
    use keyway_crds::keys::{PKCS8_BEGIN, ed25519_from_pkcs8_pem};
    let pem = std::str::from_utf8(bytes)
        .ok()
        .filter(|t| t.trim_start().starts_with(PKCS8_BEGIN));
    let Some(pem) = pem else {
        return Keypair::from_protobuf_encoding(bytes).map_err(|e| {
            format!(
                "not a libp2p identity key (protobuf-encoded) or an Ed25519 PKCS#8 PEM key: {e}"
            )
        });
    };
    let key = ed25519_from_pkcs8_pem(pem)
        .map_err(|e| format!("only Ed25519 PKCS#8 keys are supported: {e}"))?;
    let seed = key
        .key_data()
        .ed25519()
        .ok_or("only Ed25519 PKCS#8 keys are supported")?
        .private
        .to_bytes();
    Keypair::ed25519_from_bytes(seed).map_err(|e| format!("the Ed25519 key: {e}"))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[test]
    fn identity_is_created_once_and_reread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/identity");
        let a = load_or_create_identity(&path).unwrap();
        let b = load_or_create_identity(&path).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        std::fs::write(&path, b"garbage").unwrap();
        let e = load_or_create_identity(&path).unwrap_err();
        assert!(e.contains("not a libp2p identity"), "{e}");
    }

    /// A PKCS#8 PEM key (what Helm's genPrivateKey and openssl write) is the
    /// same identity as its seed; other PEM keys are refused by name.
    #[test]
    fn identity_from_a_pkcs8_pem_key() {
        use ed25519_dalek::pkcs8::EncodePrivateKey as _;
        let seed = [7u8; 32];
        let pem = ed25519_dalek::SigningKey::from_bytes(&seed)
            .to_pkcs8_pem(Default::default())
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, format!("\n{}\n", pem.as_str())).unwrap();
        let a = load_or_create_identity(&path).unwrap();
        let b = Keypair::ed25519_from_bytes(seed).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        // A PKCS#8 PEM that is not an Ed25519 key (the start of a P-256 one).
        let other = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgA7Ny5wCuqJ4Pl6tB\n-----END PRIVATE KEY-----\n";
        std::fs::write(&path, other).unwrap();
        let e = load_or_create_identity(&path).unwrap_err();
        assert!(e.contains("only Ed25519"), "{e}");
    }

    /// Two hosts on loopback, over TCP and over QUIC: accepted tunnels carry
    /// bytes both ways, a refusal carries its message, a wrong peer id at
    /// the right address fails the noise handshake.
    #[tokio::test]
    async fn tunnels_over_tcp_and_quic() {
        let agent = Host::start(
            Keypair::generate_ed25519(),
            HostConfig {
                listen: vec![
                    "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
                    "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap(),
                ],
                ..HostConfig::default()
            },
        )
        .unwrap();
        let mut incoming = agent.incoming().unwrap();
        tokio::spawn(async move {
            while let Some((_, s)) = incoming.next().await {
                tokio::spawn(async move {
                    let mut s = s.compat();
                    let hash = xe::read_request(&mut s, xe::HANDSHAKE_DEADLINE).await?;
                    if hash == [0; 32] {
                        return xe::refuse(&mut s, "no such lease").await;
                    }
                    xe::accept(&mut s).await?;
                    let mut buf = [0u8; 5];
                    s.read_exact(&mut buf).await?;
                    s.write_all(&buf).await?;
                    s.flush().await
                });
            }
        });
        let addrs = agent.listen_addrs(2, Duration::from_secs(5)).await;
        assert_eq!(addrs.len(), 2, "{addrs:?}");
        for addr in &addrs {
            let gw = Host::start(Keypair::generate_ed25519(), HostConfig::default()).unwrap();
            let peer = agent.peer_id().to_string();
            let mut s = gw.open(&peer, &[addr.to_string()], &[1; 32]).await.unwrap();
            s.write_all(b"hello").await.unwrap();
            s.flush().await.unwrap();
            let mut back = [0u8; 5];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"hello", "{addr}");
            match gw.open(&peer, &[addr.to_string()], &[0; 32]).await {
                Err(DialError::Handshake(xe::OpenError::Refused(m))) => {
                    assert_eq!(m, "no such lease")
                }
                Err(e) => panic!("{addr}: {e}"),
                Ok(_) => panic!("{addr}: accepted"),
            }
            let stranger = Keypair::generate_ed25519()
                .public()
                .to_peer_id()
                .to_string();
            let e = gw
                .open(&stranger, &[addr.to_string()], &[1; 32])
                .await
                .err()
                .unwrap();
            assert_eq!(e.label(), "unreachable", "{addr}: {e}");
        }
        let gw = Host::start(Keypair::generate_ed25519(), HostConfig::default()).unwrap();
        let e = gw
            .open(&agent.peer_id().to_string(), &[], &[1; 32])
            .await
            .err()
            .unwrap();
        assert!(matches!(e, DialError::NoAddresses), "{e}");
        let e = gw.open("nonsense", &[], &[1; 32]).await.err().unwrap();
        assert!(matches!(e, DialError::BadPeerId(_)), "{e}");
    }
}
