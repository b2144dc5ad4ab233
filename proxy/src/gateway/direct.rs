//! `direct-tcpip` for lease-hash logins (`ssh -J <hash>@gateway`, `ssh -W`):
//! a plain TCP connection to the lease's own target. The client's SSH runs
//! end to end with the VM's sshd; the gateway sees only ciphertext.

use std::sync::Arc;
use std::time::Instant;

use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Gateway;
use crate::routes::{Destination, Target};

/// Buffer per direction of a forwarded channel.
const COPY_BUF: usize = 64 * 1024;

/// Dials the lease's target; accepts the channel only once it answers.
pub async fn forward(
    gw: Arc<Gateway>,
    dest: Arc<Destination>,
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    cancel: CancellationToken,
) {
    let Target::Address(addr) = &dest.target else {
        debug!(to = %dest.label, "provider targets are not served by this gateway yet");
        reply.reject(ChannelOpenFailure::ConnectFailed).await;
        return;
    };
    let started = Instant::now();
    let dial = tokio::time::timeout(gw.limits.connect_timeout, TcpStream::connect(addr.as_str()));
    let tcp = tokio::select! {
        r = dial => r,
        () = cancel.cancelled() => return,
    };
    let mut tcp = match tcp {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            gw.observe_connect("tcp", "error", started);
            warn!(to = %dest.label, %addr, "target unreachable: {e}");
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
        Err(_) => {
            gw.observe_connect("tcp", "timeout", started);
            warn!(to = %dest.label, %addr, "target did not answer within {:?}", gw.limits.connect_timeout);
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
    };
    gw.observe_connect("tcp", "ok", started);
    let _ = tcp.set_nodelay(true);
    reply.accept().await;
    let gauge = gw
        .metrics
        .channels_active
        .with_label_values(&["direct-tcpip"]);
    gauge.inc();
    let mut stream = channel.into_stream();
    tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut stream, &mut tcp, COPY_BUF, COPY_BUF) => {
            if let Ok((up, down)) = r {
                gw.metrics.bytes.with_label_values(&["upstream"]).inc_by(up);
                gw.metrics.bytes.with_label_values(&["downstream"]).inc_by(down);
            }
        }
        () = cancel.cancelled() => {}
    }
    gauge.dec();
}
