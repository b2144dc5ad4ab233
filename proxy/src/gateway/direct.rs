//! `direct-tcpip` for lease-hash logins (`ssh -J <hash>@gateway`, `ssh -W`):
//! a plain byte stream to the lease's own target (TCP, or a libp2p tunnel to
//! its provider agent). The client's SSH runs
//! end to end with the VM's sshd; the gateway sees only ciphertext.
//!
//! Client to target goes through a [`Pipe`] like a relayed channel (window
//! granted as the target takes the bytes); target to client is a fixed
//! buffer that waits for the client's window.

use std::sync::Arc;

use bytes::Bytes;
use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelMsg, ChannelOpenFailure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::flow::{Out, Pipe};
use super::relay::{fill, give_back};
use super::{Gateway, audit, backend, budget};
use crate::routes::Destination;

/// Buffer of the target-to-client direction.
pub const COPY_BUF: usize = 64 * 1024;

/// Dials the lease's target; accepts the channel only once it answers.
pub async fn forward(
    gw: Arc<Gateway>,
    dest: Arc<Destination>,
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    cancel: CancellationToken,
    budget: budget::Channel,
    session: Arc<audit::Session>,
) {
    let dial = backend::dial(&gw, &dest.target);
    let upstream = tokio::select! {
        r = dial => r,
        () = cancel.cancelled() => return,
    };
    let upstream = match upstream {
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
            audit::Channel::new(&session, &dest.label, "direct-tcpip")
                .ended(&format!("refused: target unreachable: {e}"));
            return;
        }
    };
    reply.accept().await;
    let gauge = gw
        .metrics
        .channels_active
        .with_label_values(&["direct-tcpip"]);
    gauge.inc();
    let audit = audit::Channel::new(&session, &dest.label, "direct-tcpip");
    tokio::select! {
        () = carry(&gw, channel, upstream, budget, &audit) => {}
        () = cancel.cancelled() => {}
    }
    gauge.dec();
    audit.ended("closed");
}

/// Moves bytes both ways until the client closes the channel, or the
/// target has closed and the client has finished.
async fn carry(
    gw: &Gateway,
    channel: Channel<Msg>,
    upstream: Box<dyn backend::Io>,
    budget: budget::Channel,
    audit: &audit::Channel<'_>,
) {
    let up_bytes = gw.metrics.bytes.with_label_values(&["upstream"]);
    let down_bytes = gw.metrics.bytes.with_label_values(&["downstream"]);
    let (read, write) = channel.split();
    let (mut tcp_r, mut tcp_w) = tokio::io::split(upstream);
    let pipe = Pipe::new(gw.limits.window, gw.metrics.relay_buffered_bytes.clone());
    let budget = std::sync::Mutex::new(budget);
    let closed = CancellationToken::new();
    let client_to_target = async {
        while let Some(out) = pipe.take().await {
            match out {
                Out::Data { ext, data } => {
                    let n = data.len();
                    // Only the main stream means anything on a forward.
                    if ext.is_none() {
                        if tcp_w.write_all(&data).await.is_err() {
                            return;
                        }
                        up_bytes.inc_by(n as u64);
                        audit.moved_up(n);
                    }
                    give_back(&pipe, n, &write, &budget).await;
                }
                Out::Msg(ChannelMsg::Eof) => {
                    let _ = tcp_w.shutdown().await;
                }
                Out::Msg(ChannelMsg::Close) => return,
                Out::Msg(_) => {}
                Out::Overrun(o) => {
                    warn!(
                        window = o.window,
                        sent = o.outstanding,
                        "client overran its channel window; closing the forward"
                    );
                    return;
                }
            }
        }
    };
    let target_to_client = async {
        let mut buf = vec![0u8; COPY_BUF];
        loop {
            match tcp_r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    down_bytes.inc_by(n as u64);
                    audit.moved_down(n);
                    if write
                        .data_bytes(Bytes::copy_from_slice(&buf[..n]))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = write.eof().await;
        // The client still closes its side; until then the other
        // direction may be finishing.
        std::future::pending::<()>().await;
    };
    let both = async {
        tokio::select! {
            () = client_to_target => {}
            () = target_to_client => {}
        }
        let _ = write.close().await;
        closed.cancel();
    };
    tokio::join!(fill(read, &pipe, closed.clone()), both);
}
