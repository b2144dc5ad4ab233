//! The audit trail: one structured log line when an authenticated SSH
//! connection ends and one when each of its channels ends, so a provider can
//! answer "who reached which VM when, and how much moved".
//!
//! Contract: lines go to the tracing target `keyway_audit` at INFO
//! (`RUST_LOG=keyway_audit=info` keeps just them), with the fields listed in
//! docs/operations.md ("Audit trail"). Connections that never authenticate
//! are counted in metrics and logged at DEBUG only, so a flood cannot turn
//! into a log flood. No I/O beyond the log line.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tracing::info;

use super::AuthInfo;
use crate::routes::Via;

/// One SSH connection, from accept on.
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    /// The client (from the PROXY header behind a trusted edge).
    pub src: SocketAddr,
    /// The address the client dialed (the pooled IP).
    pub dst: SocketAddr,
    started: Instant,
    up: AtomicU64,
    down: AtomicU64,
    channels: AtomicU64,
}

impl Session {
    pub fn new(id: u64, src: SocketAddr, dst: SocketAddr) -> Self {
        Session {
            id,
            src,
            dst,
            started: Instant::now(),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            channels: AtomicU64::new(0),
        }
    }

    /// The next channel's number within this connection (1, 2, …).
    pub fn next_channel(&self) -> u64 {
        self.channels.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The connection ended; `result` is `closed`, `settled` or a refusal.
    pub fn ended(&self, auth: &AuthInfo, result: &str) {
        info!(
            target: "keyway_audit",
            event = "connection",
            session = self.id,
            lease = %auth.dest.label,
            tenant = %auth.dest.tenant,
            user = %auth.user,
            key = auth.fingerprint.as_deref().unwrap_or("none"),
            src = %self.src,
            dst = %self.dst,
            mode = mode(auth.dest.via),
            channels = self.channels.load(Ordering::Relaxed),
            bytes_up = self.up.load(Ordering::Relaxed),
            bytes_down = self.down.load(Ordering::Relaxed),
            duration_ms = millis(self.started),
            result,
            "ssh connection ended"
        );
    }
}

/// `relay` (the gateway logs into the VM) or `jump` (ciphertext only).
pub fn mode(via: Via) -> &'static str {
    match via {
        Via::LeaseHash => "jump",
        Via::PooledIp | Via::Route => "relay",
    }
}

fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One channel of a session; [`Channel::ended`] writes its line. Both
/// directions of a bridge count into it at once, hence the atomics.
pub struct Channel<'a> {
    session: &'a Session,
    lease: &'a str,
    kind: &'a str,
    number: u64,
    started: Instant,
    up: AtomicU64,
    down: AtomicU64,
    /// `status N`, `signal NAME`, or nothing.
    exit: std::sync::Mutex<Option<String>>,
}

impl<'a> Channel<'a> {
    pub fn new(session: &'a Session, lease: &'a str, kind: &'a str) -> Self {
        Channel {
            session,
            lease,
            kind,
            number: session.next_channel(),
            started: Instant::now(),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            exit: std::sync::Mutex::new(None),
        }
    }

    /// Counts client-to-target payload, for the channel and the connection.
    pub fn moved_up(&self, n: usize) {
        self.up.fetch_add(n as u64, Ordering::Relaxed);
        self.session.up.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts target-to-client payload.
    pub fn moved_down(&self, n: usize) {
        self.down.fetch_add(n as u64, Ordering::Relaxed);
        self.session.down.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// How the command on the VM ended (`status 0`, `signal TERM`).
    pub fn exit(&self, how: String) {
        *self.exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(how);
    }

    /// The channel ended: `closed`, or why it was refused.
    pub fn ended(&self, result: &str) {
        let exit = self.exit.lock().unwrap_or_else(|e| e.into_inner()).clone();
        info!(
            target: "keyway_audit",
            event = "channel",
            session = self.session.id,
            channel = self.number,
            kind = self.kind,
            lease = %self.lease,
            src = %self.session.src,
            dst = %self.session.dst,
            bytes_up = self.up.load(Ordering::Relaxed),
            bytes_down = self.down.load(Ordering::Relaxed),
            duration_ms = millis(self.started),
            exit = exit.as_deref().unwrap_or("none"),
            result,
            "ssh channel ended"
        );
    }
}
