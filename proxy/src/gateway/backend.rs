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
    let kind = match target {
        Target::Address(_) => "tcp",
        Target::Provider { .. } => "libp2p",
    };
    let label = match &result {
        Ok(_) => "ok",
        Err(DialError::Timeout(_)) => "timeout",
        Err(DialError::Tunnel(e)) => e.label(),
        Err(DialError::Tcp { .. }) => "error",
    };
    gw.observe_connect(kind, label, started);
    result
}
