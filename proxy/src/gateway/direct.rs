//! `direct-tcpip` for lease-hash logins (`ssh -J <hash>@gateway`, `ssh -W`):
//! a plain byte stream to the lease's own target (TCP, or a libp2p tunnel to
//! its provider agent). The client's SSH runs
//! end to end with the VM's sshd; the gateway sees only ciphertext.

use std::sync::Arc;

use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Gateway, backend};
use crate::routes::Destination;

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
    let dial = backend::dial(&gw, &dest.target);
    let upstream = tokio::select! {
        r = dial => r,
        () = cancel.cancelled() => return,
    };
    let mut upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            // The client sees a channel-open failure (connect failed); the
            // reason is in the gateway's log and its dial metrics.
            warn!(to = %dest.label, "target unreachable: {e}");
            gw.metrics
                .channels_refused
                .with_label_values(&["target"])
                .inc();
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
    };
    reply.accept().await;
    let gauge = gw
        .metrics
        .channels_active
        .with_label_values(&["direct-tcpip"]);
    gauge.inc();
    let mut stream = channel.into_stream();
    tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut stream, &mut upstream, COPY_BUF, COPY_BUF) => {
            if let Ok((up, down)) = r {
                gw.metrics.bytes.with_label_values(&["upstream"]).inc_by(up);
                gw.metrics.bytes.with_label_values(&["downstream"]).inc_by(down);
            }
        }
        () = cancel.cancelled() => {}
    }
    gauge.dec();
}
