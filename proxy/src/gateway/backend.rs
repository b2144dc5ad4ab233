//! Reaching a destination's target: a TCP connection to `host:port`, or a
//! `/xe/tunnel/2.0.0` stream to the provider agent beside the VM. Relay
//! logins, `direct-tcpip` and CONNECT tunnels all dial through here, so a
//! provider lease works in every mode.

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::Gateway;
use crate::routes::Target;

/// A connected backend byte stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why a backend could not be reached; the text is for logs and for the
/// HTTP reason of a refused CONNECT.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{addr} unreachable: {source}")]
    Tcp {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tunnel(#[from] keyway_tunnel::p2p::DialError),
    #[error("{0} did not answer within the connect timeout")]
    Timeout(String),
}

/// Where a target is, for logs.
pub fn describe(target: &Target) -> String {
    match target {
        Target::Address(a) => a.clone(),
        Target::Provider { peer_id, .. } => format!("provider {peer_id}"),
    }
}

/// Connects to `target` within the gateway's connect timeout and records
/// the attempt in `keyway_upstream_connect_duration_seconds` (kind `tcp` or
/// `libp2p`).
pub async fn dial(gw: &Gateway, target: &Target) -> Result<Box<dyn Io>, DialError> {
    let started = Instant::now();
    let attempt = async {
        match target {
            Target::Address(addr) => {
                let tcp =
                    TcpStream::connect(addr.as_str())
                        .await
                        .map_err(|source| DialError::Tcp {
                            addr: addr.clone(),
                            source,
                        })?;
                let _ = tcp.set_nodelay(true);
                Ok(Box::new(tcp) as Box<dyn Io>)
            }
            Target::Provider {
                peer_id,
                addresses,
                lease_hash,
            } => {
                let s = gw.p2p.open(peer_id, addresses, lease_hash).await?;
                Ok(Box::new(s) as Box<dyn Io>)
            }
        }
    };
    let result = match tokio::time::timeout(gw.limits.connect_timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(DialError::Timeout(describe(target))),
    };
    let (kind, label) = match (target, &result) {
        (Target::Address(_), Ok(_)) => ("tcp", "ok"),
        (Target::Address(_), Err(DialError::Timeout(_))) => ("tcp", "timeout"),
        (Target::Address(_), Err(_)) => ("tcp", "error"),
        (Target::Provider { .. }, Ok(_)) => ("libp2p", "ok"),
        (Target::Provider { .. }, Err(DialError::Timeout(_))) => ("libp2p", "timeout"),
        (Target::Provider { .. }, Err(DialError::Tunnel(e))) => ("libp2p", e.label()),
        (Target::Provider { .. }, Err(_)) => ("libp2p", "error"),
    };
    gw.observe_connect(kind, label, started);
    result
}
