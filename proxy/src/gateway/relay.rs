//! Relay mode: the gateway logs into the VM itself and carries the client's
//! session channels (and `-L` forwards) over that upstream connection.
//!
//! The upstream login uses a short-lived OpenSSH user certificate from the
//! relay CA whose principal is the lease's `relay_principal`; the VM trusts it
//! through `status.relayTrust` (`cert-authority,principals="…" <CA>`). One
//! upstream connection per (destination, target, user) is shared by all the
//! client connections that need it and closed after it idles.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use russh::client;
use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelMsg, ChannelOpenFailure};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::flow::{Out, Pipe};
use super::{Gateway, audit, backend, budget};
use crate::routes::{DestKey, Destination};

/// The upstream client's handler: the VM's host key is not pinned (the
/// gateway reaches VMs over the provider's own network; see
/// docs/security.md), so it is logged and accepted.
pub struct Upstream;

impl client::Handler for Upstream {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        debug!("upstream host key {key:?}");
        Ok(true)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    dest: DestKey,
    addr: String,
    user: String,
}

#[derive(Default)]
struct Slot {
    conn: tokio::sync::Mutex<Option<Arc<client::Handle<Upstream>>>>,
    users: AtomicUsize,
    idle_since: std::sync::Mutex<Option<Instant>>,
}

/// Shared upstream connections.
#[derive(Default)]
pub struct Upstreams {
    slots: std::sync::Mutex<HashMap<Key, Arc<Slot>>>,
}

/// A borrowed upstream connection; returning it starts the idle clock.
pub struct Borrowed {
    slot: Arc<Slot>,
    pub handle: Arc<client::Handle<Upstream>>,
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        release(&self.slot);
    }
}

/// One user fewer; the last one starts the idle clock (so a slot whose dials
/// fail is pruned like an idle one).
fn release(slot: &Slot) {
    if slot.users.fetch_sub(1, Ordering::AcqRel) == 1 {
        *slot.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }
}

impl Upstreams {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An authenticated upstream connection for `dest`, shared when one is
    /// open, else dialed (one dial at a time per key).
    async fn get(&self, gw: &Gateway, dest: &Destination) -> Result<Borrowed> {
        let addr = backend::describe(&dest.target);
        let key = Key {
            dest: dest.key.clone(),
            addr: addr.clone(),
            user: dest.upstream_user.clone(),
        };
        let slot = self.slots().entry(key).or_default().clone();
        slot.users.fetch_add(1, Ordering::AcqRel);
        *slot.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let borrowed = |handle| Borrowed {
            slot: slot.clone(),
            handle,
        };
        let mut conn = slot.conn.lock().await;
        if let Some(h) = conn.as_ref().filter(|h| !h.is_closed()) {
            return Ok(borrowed(h.clone()));
        }
        let started = Instant::now();
        let dialed = tokio::time::timeout(gw.limits.connect_timeout, dial(gw, dest, &addr)).await;
        let handle = match dialed {
            Ok(Ok(h)) => {
                gw.observe_connect("ssh", "ok", started);
                Arc::new(h)
            }
            Ok(Err(e)) => {
                gw.observe_connect("ssh", "error", started);
                release(&slot);
                return Err(e);
            }
            Err(_) => {
                gw.observe_connect("ssh", "timeout", started);
                release(&slot);
                bail!("no upstream login within {:?}", gw.limits.connect_timeout);
            }
        };
        *conn = Some(handle.clone());
        Ok(borrowed(handle))
    }

    /// Closes upstream connections nobody uses for `idle`, and those whose
    /// destination the gateway no longer routes.
    pub async fn prune(&self, idle: Duration, still_routed: impl Fn(&DestKey) -> bool) {
        let now = Instant::now();
        let doomed: Vec<Arc<Slot>> = {
            let mut slots = self.slots();
            let keys: Vec<Key> = slots
                .iter()
                .filter(|(k, s)| {
                    let unused = s.users.load(Ordering::Acquire) == 0
                        && s.idle_since
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .is_some_and(|t| now.duration_since(t) >= idle);
                    unused || !still_routed(&k.dest)
                })
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter().filter_map(|k| slots.remove(k)).collect()
        };
        for s in doomed {
            if let Some(h) = s.conn.lock().await.take() {
                let _ = h
                    .disconnect(russh::Disconnect::ByApplication, "idle", "")
                    .await;
            }
        }
    }

    /// Closes everything (shutdown).
    pub async fn close_all(&self) {
        self.prune(Duration::ZERO, |_| false).await;
    }
}

/// AES-GCM first for the gateway's own logins: hardware-accelerated on the
/// machines gateways run on, where ChaCha20 is not.
const UPSTREAM_CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_128_CTR,
];

async fn dial(gw: &Gateway, dest: &Destination, addr: &str) -> Result<client::Handle<Upstream>> {
    let issuer = gw
        .relay
        .as_ref()
        .ok_or_else(|| anyhow!("relay mode needs the relay CA key (--relay-ca-key)"))?;
    let upstream = backend::dial(gw, &dest.target).await?;
    let config = Arc::new(client::Config {
        nodelay: true,
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        channel_buffer_size: gw.limits.channel_buffer.max(1),
        // Windows follow consumption (flow.rs): the VM can never make the
        // gateway hold more for a channel than its window.
        window_size: gw.limits.window.initial,
        manual_window_adjust: true,
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(UPSTREAM_CIPHERS),
            ..Default::default()
        },
        ..Default::default()
    });
    let mut handle = client::connect_stream(config, upstream, Upstream)
        .await
        .with_context(|| format!("SSH handshake with {addr}"))?;
    let validity = gw.cert_validity_secs.load(Ordering::Relaxed);
    let cert = issuer.issue(
        &dest.relay_principal,
        &format!("keyway relay for {}", dest.label),
        validity,
    )?;
    let res = handle
        .authenticate_openssh_cert(dest.upstream_user.clone(), issuer.key(), cert)
        .await
        .with_context(|| format!("logging into {addr}"))?;
    if !res.success() {
        bail!(
            "{addr} refused the relay certificate for {}@ (principal {}); does the VM's authorized_keys carry the lease's status.relayTrust line?",
            dest.upstream_user,
            dest.relay_principal
        );
    }
    info!(to = %dest.label, %addr, user = %dest.upstream_user, "upstream login");
    Ok(handle)
}

/// Messages a bridge carries; the rest (window notices, replies to the
/// gateway's own requests) are dropped as they arrive, so they never take
/// room in a pipe whose other side is stalled.
fn carried(msg: &ChannelMsg) -> bool {
    !matches!(
        msg,
        ChannelMsg::WindowAdjusted { .. }
            | ChannelMsg::Success
            | ChannelMsg::XonXoff { .. }
            | ChannelMsg::Open { .. }
    )
}

/// Drains a channel into `pipe` as messages arrive, until the side closes
/// or `closed` says the bridge closed it: russh drops a channel it sent
/// CLOSE on, so the peer's answering CLOSE never reaches the read half and
/// waiting for it would keep the bridge alive forever.
pub(super) async fn fill(mut read: russh::ChannelReadHalf, pipe: &Pipe, closed: CancellationToken) {
    let run = async {
        while let Some(msg) = read.wait().await {
            if !carried(&msg) {
                continue;
            }
            let last = matches!(msg, ChannelMsg::Close);
            pipe.put(msg).await;
            if last {
                return;
            }
        }
    };
    tokio::select! {
        () = run => {}
        () = closed.cancelled() => {}
    }
    pipe.close();
}

/// `n` bytes from `pipe` reached the other side: grants the source the
/// window that frees (and growth the budget allows). A source that is gone
/// needs no window.
pub(super) async fn give_back<S>(
    pipe: &Pipe,
    n: usize,
    source: &russh::ChannelWriteHalf<S>,
    budget: &std::sync::Mutex<budget::Channel>,
) where
    S: From<(russh::ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    let grant = pipe.taken(n, |want| {
        budget.lock().unwrap_or_else(|e| e.into_inner()).grow(want)
    });
    if grant > 0 {
        let _ = source.adjust_window(grant).await;
    }
}

/// Carries a client's channel and the matching upstream channel both ways:
/// data, extended data, requests, EOF, exit status and signals, close.
///
/// Each direction drains its source at once into a [`Pipe`] and grants the
/// source window only as the other side takes the bytes (see [`flow`]): a
/// client that stops reading stalls this channel alone, and what the
/// gateway holds for it stays within its window.
///
/// On a `session` channel the VM's EOF is held back until its exit status
/// (or signal, or close) has been passed on. sshd often sends EOF first; an
/// OpenSSH client that has sent its own EOF answers ours with CLOSE at once,
/// russh then closes the channel, and an exit status still in flight would
/// be lost (the client reports 255 instead of the command's status).
async fn bridge(
    gw: &Gateway,
    down: Channel<Msg>,
    up: Channel<client::Msg>,
    down_handle: russh::server::Handle,
    session: bool,
    budget: &std::sync::Mutex<budget::Channel>,
    audit: &audit::Channel<'_>,
) {
    let id = down.id();
    let (down_r, down_w) = down.split();
    let (up_r, up_w) = up.split();
    let to_vm_bytes = gw.metrics.bytes.with_label_values(&["upstream"]);
    let to_client_bytes = gw.metrics.bytes.with_label_values(&["downstream"]);
    let held = gw.metrics.relay_buffered_bytes.clone();
    let to_vm = Pipe::new(gw.limits.window, held.clone());
    let to_client = Pipe::new(gw.limits.window, held);
    let (down_closed, up_closed) = (CancellationToken::new(), CancellationToken::new());
    let fill_from_client = fill(down_r, &to_vm, down_closed.clone());
    let fill_from_vm = fill(up_r, &to_client, up_closed.clone());
    let client_to_vm = async {
        while let Some(out) = to_vm.take().await {
            let msg = match out {
                Out::Data { ext, data } => {
                    let n = data.len();
                    to_vm_bytes.inc_by(n as u64);
                    audit.moved_up(n);
                    let r = match ext {
                        None => up_w.data_bytes(data).await,
                        Some(ext) => up_w.extended_data_bytes(ext, data).await,
                    };
                    if r.is_err() {
                        break;
                    }
                    give_back(&to_vm, n, &down_w, budget).await;
                    continue;
                }
                Out::Overrun(o) => {
                    warn!(
                        window = o.window,
                        sent = o.outstanding,
                        "client overran its channel window; closing the channel"
                    );
                    break;
                }
                Out::Msg(m) => m,
            };
            let r = match msg {
                ChannelMsg::Eof => up_w.eof().await,
                ChannelMsg::Close => break,
                ChannelMsg::RequestPty {
                    term,
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                    terminal_modes,
                    ..
                } => {
                    up_w.request_pty(
                        false,
                        &term,
                        col_width,
                        row_height,
                        pix_width,
                        pix_height,
                        &terminal_modes,
                    )
                    .await
                }
                ChannelMsg::SetEnv {
                    variable_name,
                    variable_value,
                    ..
                } => up_w.set_env(false, variable_name, variable_value).await,
                ChannelMsg::RequestShell { .. } => up_w.request_shell(true).await,
                ChannelMsg::Exec { command, .. } => up_w.exec(true, command).await,
                ChannelMsg::RequestSubsystem { name, .. } => {
                    up_w.request_subsystem(true, name).await
                }
                ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                } => {
                    up_w.window_change(col_width, row_height, pix_width, pix_height)
                        .await
                }
                ChannelMsg::Signal { signal } => up_w.signal(signal).await,
                _ => Ok(()),
            };
            if r.is_err() {
                break;
            }
        }
        let _ = up_w.close().await;
        up_closed.cancel();
    };
    let vm_to_client = async {
        let mut eof_held = false;
        while let Some(out) = to_client.take().await {
            let msg = match out {
                Out::Data { ext, data } => {
                    let n = data.len();
                    to_client_bytes.inc_by(n as u64);
                    audit.moved_down(n);
                    let r = match ext {
                        None => down_w.data_bytes(data).await,
                        Some(ext) => down_w.extended_data_bytes(ext, data).await,
                    };
                    if r.is_err() {
                        break;
                    }
                    give_back(&to_client, n, &up_w, budget).await;
                    continue;
                }
                Out::Overrun(o) => {
                    warn!(
                        window = o.window,
                        sent = o.outstanding,
                        "VM overran its channel window; closing the channel"
                    );
                    break;
                }
                Out::Msg(m) => m,
            };
            let ends_command = matches!(
                msg,
                ChannelMsg::ExitStatus { .. } | ChannelMsg::ExitSignal { .. }
            );
            let r = match msg {
                ChannelMsg::Eof if session => {
                    eof_held = true;
                    Ok(())
                }
                ChannelMsg::Eof => down_w.eof().await,
                ChannelMsg::ExitStatus { exit_status } => {
                    audit.exit(format!("status {exit_status}"));
                    down_w.exit_status(exit_status).await
                }
                ChannelMsg::ExitSignal {
                    signal_name,
                    core_dumped,
                    error_message,
                    lang_tag,
                } => {
                    audit.exit(format!("signal {signal_name:?}"));
                    down_handle
                        .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                        .await
                        .map_err(|()| russh::Error::SendError)
                }
                ChannelMsg::Failure => {
                    // The VM refused a shell, exec or subsystem the gateway
                    // already accepted (see ssh.rs): say so and end it.
                    let _ = down_w
                        .extended_data_bytes(1, &b"keyway: the VM refused the request\r\n"[..])
                        .await;
                    let _ = down_w.exit_status(1).await;
                    let _ = down_w.eof().await;
                    break;
                }
                ChannelMsg::Close => break,
                _ => Ok(()),
            };
            if ends_command && std::mem::take(&mut eof_held) {
                let _ = down_w.eof().await;
            }
            if r.is_err() {
                break;
            }
        }
        if eof_held {
            let _ = down_w.eof().await;
        }
        let _ = down_w.close().await;
        down_closed.cancel();
    };
    // Each fill ends at its side's Close (or when russh drops the channel,
    // or once the bridge closed that side); each writer ends at the Close it
    // carries, closing the other side and ending that side's fill, which
    // ends the other writer. Connection end cancels all.
    tokio::join!(fill_from_client, fill_from_vm, client_to_vm, vm_to_client);
}

/// The client's side of a channel being opened.
pub struct Down {
    /// The connection it belongs to (for the audit line).
    pub session: Arc<audit::Session>,
    pub channel: Channel<Msg>,
    pub reply: ChannelOpenHandle,
    /// The client connection's handle (exit signals go through it).
    pub handle: russh::server::Handle,
}

/// What a client channel becomes on the VM.
pub enum Open {
    /// A `session` channel (shell, exec, subsystem, …).
    Session,
    /// A `direct-tcpip` channel from a relay-mode client (`-L`): the VM
    /// makes the connection.
    DirectTcpip {
        host: String,
        port: u32,
        originator_address: String,
        originator_port: u32,
    },
}

/// A client channel carried over the lease's upstream login: opened on the
/// VM first, then accepted, then bridged until either side closes or the
/// connection ends.
pub async fn channel(
    gw: Arc<Gateway>,
    dest: Arc<Destination>,
    open: Open,
    down: Down,
    cancel: CancellationToken,
    budget: budget::Channel,
) {
    let Down {
        session: conn,
        channel: down,
        reply,
        handle: down_handle,
    } = down;
    let kind = match open {
        Open::Session => "session",
        Open::DirectTcpip { .. } => "direct-tcpip",
    };
    let opened = async {
        let up = gw.upstreams.get(&gw, &dest).await?;
        let chan = match &open {
            Open::Session => up
                .handle
                .channel_open_session()
                .await
                .context("opening a session on the VM")?,
            Open::DirectTcpip {
                host,
                port,
                originator_address,
                originator_port,
            } => up
                .handle
                .channel_open_direct_tcpip(
                    host.clone(),
                    *port,
                    originator_address.clone(),
                    *originator_port,
                )
                .await
                .with_context(|| format!("the VM refused to forward to {host}:{port}"))?,
        };
        anyhow::Ok((up, chan))
    };
    let (up, chan) = tokio::select! {
        r = opened => match r {
            Ok(x) => x,
            Err(e) => {
                warn!(to = %dest.label, kind, "relayed channel refused: {e:#}");
                gw.metrics.channels_refused.with_label_values(&["target"]).inc();
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                audit::Channel::new(&conn, &dest.label, kind).ended(&format!("refused: {e:#}"));
                return;
            }
        },
        () = cancel.cancelled() => return,
    };
    let audit = audit::Channel::new(&conn, &dest.label, kind);
    reply.accept().await;
    let gauge = gw.metrics.channels_active.with_label_values(&[kind]);
    gauge.inc();
    let budget = std::sync::Mutex::new(budget);
    tokio::select! {
        () = bridge(&gw, down, chan, down_handle, matches!(open, Open::Session), &budget, &audit) => {}
        () = cancel.cancelled() => {}
    }
    audit.ended("closed");
    gauge.dec();
    drop(up);
}

/// A session channel the gateway will not carry (a budget or limit said
/// no): accepted, so the client can be told why on stderr, then ended with
/// status 1. The message goes out after the client's shell, exec or
/// subsystem request so every client prints it.
pub async fn refuse_session(down: Channel<Msg>, reply: ChannelOpenHandle, why: String) {
    reply.accept().await;
    let (mut read, write) = down.split();
    let asked = async {
        while let Some(m) = read.wait().await {
            if matches!(
                m,
                ChannelMsg::RequestShell { .. }
                    | ChannelMsg::Exec { .. }
                    | ChannelMsg::RequestSubsystem { .. }
            ) {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), asked).await;
    let _ = write
        .extended_data_bytes(1, format!("keyway: {why}\r\n").into_bytes())
        .await;
    let _ = write.exit_status(1).await;
    let _ = write.eof().await;
    let _ = write.close().await;
}
