//! The operator side: [`Publisher`] versions snapshots and [`serve`] streams
//! them to subscribers, one unacknowledged response at a time.
//!
//! Protocol decisions (see also the proto file and docs/snapshot-protocol.md):
//! - The call is authenticated before anything else by `authorization: Bearer
//!   <token>` metadata, compared in constant time. A refused caller is never
//!   registered and never sees a snapshot.
//! - The hello must arrive within [`HELLO_DEADLINE`]; request messages are
//!   capped at [`MAX_REQUEST_BYTES`] (they carry a node id and a short error).
//! - Each publish diffs the new snapshot against the current one and keeps
//!   the delta, encoded once, in a bounded history ([`HISTORY_MAX_STEPS`],
//!   [`HISTORY_MAX_BYTES`]). A subscriber that accepts deltas gets the changes
//!   from the version it holds (the hello's, then the one it last ACKed) to
//!   the newest, merged into one delta; it gets the whole snapshot only when
//!   those changes are gone from the history, belong to another epoch, would
//!   be bigger than the snapshot, or after it NACKed a delta.
//! - A response is sent right after the hello even when the subscriber holds
//!   the current version: an empty delta (or, for a subscriber without
//!   deltas, the full snapshot), which it acks as a no-op. So the first
//!   answer always tells the subscriber where it stands.
//! - After each response the stream waits for the answer carrying its nonce
//!   (messages with other nonces are ignored), then sends whatever is newest
//!   at that moment: versions published meanwhile conflate (latest wins, and
//!   for deltas the changes merge per key). A NACKed version is recorded and
//!   never resent; the next response is for a newer version.
//! - Full snapshots are encoded once per version, and only when a subscriber
//!   needs one; building any response (encoding, merging) runs on a blocking
//!   thread, never on the async workers.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use prost::Message;
use prost::bytes::{BufMut, Bytes};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Context as TaskContext, Poll, Service, StdError, http};
use tonic::server::{NamedService, StreamingService};
use tonic::{Status, Streaming};
use tracing::{debug, info, warn};

use crate::pb::{self, SnapshotResponse, SubscribeRequest};
use crate::table::Table;
use crate::{delta, version};

/// How long a subscriber may take to send its hello.
pub const HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// Largest request message (hello, ACK, NACK) the server reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Disconnected subscribers stay listed this long (unless the same node
/// reconnects sooner), so status can show who went away.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Published deltas kept for subscribers catching up, at most this many…
pub const HISTORY_MAX_STEPS: usize = 4096;
/// …and at most this many encoded bytes in all.
pub const HISTORY_MAX_BYTES: usize = 64 * 1024 * 1024;
/// NACK error texts are kept up to this many bytes.
const MAX_ERROR_BYTES: usize = 1024;
/// The one method's path (both sides speak it by hand: the server routes
/// it, the subscriber decodes its responses into a mirror type).
pub(crate) const SUBSCRIBE_PATH: &str = "/keyway.snapshot.v1.SnapshotService/Subscribe";

/// Why a snapshot was not published: every problem the consistency check found.
#[derive(Debug, thiserror::Error)]
#[error("snapshot failed the consistency check: {}", .0.join("; "))]
pub struct PublishError(pub Vec<String>);

/// A published snapshot, shared by every stream.
struct Published {
    /// The content, checked (persistent maps: versions share structure).
    table: Table,
    version: pb::Version,
    generated_unix_ms: i64,
    /// `SnapshotResponse.snapshot` as encoded on the wire (field key, length,
    /// the snapshot's bytes), built the first time a subscriber needs the
    /// whole snapshot.
    full: OnceLock<Bytes>,
}

impl Published {
    fn full(&self) -> Bytes {
        self.full
            .get_or_init(|| {
                self.table
                    .encode_full(Some(self.version), self.generated_unix_ms)
            })
            .clone()
    }

    fn objects(&self) -> usize {
        self.table.objects()
    }
}

/// One published change: the delta from the previous version, encoded once
/// (`SnapshotResponse.delta`: field key, length, the delta's bytes).
struct Step {
    base: pb::Version,
    version: pb::Version,
    delta: pb::SnapshotDelta,
    wire: Bytes,
}

impl Step {
    fn new(base: pb::Version, delta: pb::SnapshotDelta) -> Self {
        let wire = field_bytes(4, &delta);
        let version = delta.version.unwrap_or(base);
        Step {
            base,
            version,
            delta,
            wire,
        }
    }
}

/// `msg` encoded as field `tag` of a message: key, length, bytes.
fn field_bytes(tag: u32, msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut out = Vec::with_capacity(len + 16);
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(len as u64, &mut out);
    // Encoding into a Vec cannot run out of room.
    msg.encode_raw(&mut out);
    Bytes::from(out)
}

/// The published deltas, oldest first, consecutive.
#[derive(Default)]
struct History {
    steps: VecDeque<Arc<Step>>,
    bytes: usize,
}

impl History {
    fn push(&mut self, step: Arc<Step>) {
        self.bytes += step.wire.len();
        self.steps.push_back(step);
        while self.steps.len() > HISTORY_MAX_STEPS || self.bytes > HISTORY_MAX_BYTES {
            match self.steps.pop_front() {
                Some(old) => self.bytes -= old.wire.len(),
                None => break,
            }
        }
    }

    /// The steps from `held` to `target`, if every one is still here.
    fn between(&self, held: pb::Version, target: pb::Version) -> Option<Vec<Arc<Step>>> {
        let first = self.steps.iter().position(|s| s.base == held)?;
        let mut out = Vec::new();
        let mut at = held;
        for step in self.steps.iter().skip(first) {
            if at == target {
                break;
            }
            if step.base != at {
                return None;
            }
            at = step.version;
            out.push(step.clone());
        }
        (at == target).then_some(out)
    }
}

/// What one response carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Full,
    Delta,
}

/// A snapshot [`Publisher::prepare`] (or [`Publisher::prepare_delta`])
/// checked and versioned, not served yet.
pub struct Prepared {
    /// The version current when it was prepared.
    base: Option<pb::Version>,
    /// The version it is served as.
    version: pb::Version,
    /// `None`: same content as the current snapshot; nothing to serve.
    next: Option<Arc<Published>>,
    /// The change from the current snapshot (from nothing for the first one).
    change: Option<pb::SnapshotDelta>,
    /// Whether `change` is served as a delta (not for the first snapshot).
    step: bool,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("version", &self.version)
            .field("changed", &self.next.is_some())
            .finish_non_exhaustive()
    }
}

impl Prepared {
    /// The version it is served as (the current one when nothing changed).
    pub fn version(&self) -> pb::Version {
        self.version
    }

    /// What it changes, as a delta from the current snapshot (for the first
    /// snapshot, from nothing: everything is upserted); `None` when it
    /// equals the current one. Only what really differs is listed.
    pub fn change(&self) -> Option<&pb::SnapshotDelta> {
        self.next.as_ref().and(self.change.as_ref())
    }

    /// Leases and routes it holds (the current snapshot's when unchanged).
    pub fn counts(&self) -> Option<(usize, usize)> {
        self.next
            .as_ref()
            .map(|p| (p.table.lease_count(), p.table.route_count()))
    }
}

/// A subscriber as the operator sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct SubscriberStatus {
    /// Node id from its hello.
    pub node_id: String,
    /// Role from its hello (`proxy`, `agent`, `cli`).
    pub role: String,
    /// Remote address of its connection.
    pub peer: Option<SocketAddr>,
    /// When its stream opened.
    pub connected_since: SystemTime,
    /// The stream is open.
    pub connected: bool,
    /// When the stream closed, for a disconnected subscriber.
    pub disconnected_at: Option<SystemTime>,
    /// The newest version of this writer the subscriber is known to serve:
    /// the last one it ACKed, or what its hello or a NACK said it holds when
    /// that is a version of this writer's epoch. Versions of other epochs are
    /// not ours and never count.
    pub acked: Option<pb::Version>,
    /// The last version sent to it.
    pub sent: Option<pb::Version>,
    /// NACKs received on this stream.
    pub nack_count: u64,
    /// Error text of its last NACK (truncated to 1 KiB).
    pub last_nack_error: Option<String>,
    /// The version it last refused.
    pub last_nack_version: Option<pb::Version>,
    /// Its hello said it applies deltas.
    pub accepts_deltas: bool,
    /// Full snapshots sent to it on this stream.
    pub full_sent: u64,
    /// Deltas sent to it on this stream.
    pub deltas_sent: u64,
    /// Response bytes sent to this node (protobuf message bytes, before
    /// gRPC framing), summed over its streams for as long as it is listed:
    /// a reconnect carries the count over.
    pub bytes_sent: u64,
}

/// Counters since the publisher was created, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Responses sent (full snapshots and deltas).
    pub sent: u64,
    /// Of those, full snapshots.
    pub full_sent: u64,
    /// Of those, deltas.
    pub deltas_sent: u64,
    /// Response bytes sent to every subscriber (protobuf message bytes).
    pub bytes_sent: u64,
    /// ACKs received.
    pub acks: u64,
    /// NACKs received.
    pub nacks: u64,
    /// Snapshots refused by the consistency check in [`Publisher::publish`].
    pub refused: u64,
}

struct Inner {
    epoch: u64,
    /// Serializes publishers so two never assign the same version.
    publishing: Mutex<()>,
    tx: watch::Sender<Option<Arc<Published>>>,
    /// Deltas for subscribers catching up; appended before a version is
    /// served, so every step up to the current version is here unless it
    /// was evicted.
    history: Mutex<History>,
    subscribers: Mutex<HashMap<u64, SubscriberStatus>>,
    next_conn: AtomicU64,
    acks: watch::Sender<u64>,
    sent: AtomicU64,
    full_sent: AtomicU64,
    deltas_sent: AtomicU64,
    bytes_sent: AtomicU64,
    ack_count: AtomicU64,
    nack_count: AtomicU64,
    refused: AtomicU64,
}

/// Versions snapshots and hands them to every subscriber stream. Cheap to
/// clone: clones share one state.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("epoch", &self.inner.epoch)
            .field("current", &self.current_version())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Publisher {
    /// A publisher writing under `epoch`, which must exceed every earlier
    /// writer's so subscribers accept its versions.
    pub fn new(epoch: u64) -> Self {
        let (tx, _) = watch::channel(None);
        let (acks, _) = watch::channel(0);
        Publisher {
            inner: Arc::new(Inner {
                epoch,
                publishing: Mutex::new(()),
                tx,
                history: Mutex::new(History::default()),
                subscribers: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(1),
                acks,
                sent: AtomicU64::new(0),
                full_sent: AtomicU64::new(0),
                deltas_sent: AtomicU64::new(0),
                bytes_sent: AtomicU64::new(0),
                ack_count: AtomicU64::new(0),
                nack_count: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            }),
        }
    }

    /// The writer's epoch.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// Checks and publishes a snapshot; returns the version it is served as.
    ///
    /// Content identical to the current snapshot (everything but `version`
    /// and `generated_unix_ms`) keeps the current version and publishes
    /// nothing. Anything else becomes `(epoch, previous + 1)`. A snapshot
    /// failing [`crate::check::check`]'s rules publishes nothing and returns every
    /// problem found.
    ///
    /// Checks and diffs the whole snapshot on the calling thread (linear in
    /// its size; the wire carries only the diff). A writer that knows what
    /// changed uses [`Publisher::prepare_delta`], which costs only the
    /// change. [`Publisher::prepare`] and [`Publisher::commit`] are this in
    /// two steps, for a writer that must persist what it publishes first.
    pub fn publish(&self, snapshot: pb::Snapshot) -> Result<pb::Version, PublishError> {
        let _publishing = lock(&self.inner.publishing);
        let prepared = self.prepare_locked(snapshot)?;
        self.commit_locked(prepared)
    }

    /// Checks and versions a whole snapshot as [`Publisher::publish`]
    /// would, without serving it: nobody sees it before
    /// [`Publisher::commit`].
    pub fn prepare(&self, snapshot: pb::Snapshot) -> Result<Prepared, PublishError> {
        let _publishing = lock(&self.inner.publishing);
        self.prepare_locked(snapshot)
    }

    /// Prepares the next version from what changed: `proposed` lists the
    /// leases and routes to upsert and to remove (base and version are
    /// ignored; listing an object unchanged, or removing an absent one, is
    /// harmless). Costs O(change · log n): only what the change touches is
    /// checked. Nothing changed: the current version, nothing to serve.
    pub fn prepare_delta(&self, proposed: &pb::SnapshotDelta) -> Result<Prepared, PublishError> {
        let _publishing = lock(&self.inner.publishing);
        let current = self.inner.tx.borrow().clone();
        let empty = Table::default();
        let held = current.as_ref().map_or(&empty, |c| &c.table);
        let change = held.effective(proposed);
        let mut table = held.clone();
        if let Err(errors) = table.apply(&change) {
            self.inner.refused.fetch_add(1, Ordering::Relaxed);
            return Err(PublishError(errors));
        }
        Ok(self.versioned(current, table, change, proposed.generated_unix_ms))
    }

    /// Serves a prepared snapshot. Fails, serving nothing, when another
    /// snapshot was published since it was prepared (its version would be
    /// taken twice).
    pub fn commit(&self, prepared: Prepared) -> Result<pb::Version, PublishError> {
        let _publishing = lock(&self.inner.publishing);
        self.commit_locked(prepared)
    }

    fn prepare_locked(&self, snapshot: pb::Snapshot) -> Result<Prepared, PublishError> {
        let generated_unix_ms = snapshot.generated_unix_ms;
        let table = match Table::from_snapshot(snapshot) {
            Ok(t) => t,
            Err(errors) => {
                self.inner.refused.fetch_add(1, Ordering::Relaxed);
                return Err(PublishError(errors));
            }
        };
        let current = self.inner.tx.borrow().clone();
        let change = current
            .as_ref()
            .map_or_else(Table::default, |c| c.table.clone())
            .diff(&table);
        Ok(self.versioned(current, table, change, generated_unix_ms))
    }

    /// The next version holding `table`, which `change` leads to from the
    /// current one.
    fn versioned(
        &self,
        current: Option<Arc<Published>>,
        table: Table,
        mut change: pb::SnapshotDelta,
        generated_unix_ms: i64,
    ) -> Prepared {
        let base = current.as_ref().map(|c| c.version);
        if let Some(cur) = &current
            && delta::is_empty(&change)
        {
            return Prepared {
                base,
                version: cur.version,
                next: None,
                change: None,
                step: false,
            };
        }
        let next = pb::Version::new(
            self.inner.epoch,
            current.as_ref().map_or(1, |c| c.version.version + 1),
        );
        change.base = base;
        change.version = Some(next);
        change.generated_unix_ms = generated_unix_ms;
        Prepared {
            base,
            version: next,
            next: Some(Arc::new(Published {
                table,
                version: next,
                generated_unix_ms,
                full: OnceLock::new(),
            })),
            change: Some(change),
            step: current.is_some(),
        }
    }

    fn commit_locked(&self, prepared: Prepared) -> Result<pb::Version, PublishError> {
        if self.current_version() != prepared.base {
            return Err(PublishError(vec![
                "another snapshot was published after this one was prepared".into(),
            ]));
        }
        if let Some(next) = prepared.next {
            if prepared.step
                && let (Some(base), Some(change)) = (prepared.base, prepared.change)
            {
                lock(&self.inner.history).push(Arc::new(Step::new(base, change)));
            }
            self.inner.tx.send_replace(Some(next));
        }
        Ok(prepared.version)
    }

    /// What to send a subscriber that holds `held` (a version of ours, or
    /// `None`) so it reaches `target`: the merged delta when it accepts
    /// deltas and the history still has every step, else the full snapshot.
    /// Can be expensive (merging, encoding a full snapshot): call it on a
    /// blocking thread.
    fn response_body(
        &self,
        held: Option<pb::Version>,
        target: &Published,
        deltas: bool,
    ) -> (Kind, Bytes) {
        if deltas
            && let Some(held) = held
            && let Some(body) = self.delta_body(held, target)
        {
            return (Kind::Delta, body);
        }
        (Kind::Full, target.full())
    }

    fn delta_body(&self, held: pb::Version, target: &Published) -> Option<Bytes> {
        if held == target.version {
            let empty = pb::SnapshotDelta {
                base: Some(held),
                version: Some(held),
                generated_unix_ms: target.generated_unix_ms,
                ..Default::default()
            };
            return Some(field_bytes(4, &empty));
        }
        if held.epoch != self.inner.epoch || held > target.version {
            return None;
        }
        let steps = lock(&self.inner.history).between(held, target.version)?;
        match steps.as_slice() {
            [] => None,
            [one] => Some(one.wire.clone()),
            [first, rest @ ..] => {
                let mut merged = first.delta.clone();
                for step in rest {
                    merged = delta::merge(&merged, &step.delta).ok()?;
                }
                // Past this size the whole snapshot is the smaller message.
                (delta::changes(&merged) <= target.objects()).then(|| field_bytes(4, &merged))
            }
        }
    }

    /// The version being served, if any.
    pub fn current_version(&self) -> Option<pb::Version> {
        self.inner.tx.borrow().as_ref().map(|p| p.version)
    }

    /// The snapshot being served (its `version` set), if any. Copies it
    /// out: linear in its size.
    pub fn current(&self) -> Option<Arc<pb::Snapshot>> {
        self.inner
            .tx
            .borrow()
            .as_ref()
            .map(|p| Arc::new(p.table.to_snapshot(Some(p.version), p.generated_unix_ms)))
    }

    /// Version, leases and routes of the snapshot being served, if any.
    pub fn current_counts(&self) -> Option<(pb::Version, usize, usize)> {
        self.inner
            .tx
            .borrow()
            .as_ref()
            .map(|p| (p.version, p.table.lease_count(), p.table.route_count()))
    }

    /// Every subscriber seen recently, connected ones first, then by node id.
    pub fn subscribers(&self) -> Vec<SubscriberStatus> {
        let mut subs = lock(&self.inner.subscribers);
        forget_old(&mut subs);
        let mut v: Vec<SubscriberStatus> = subs.values().cloned().collect();
        v.sort_by(|a, b| {
            (!a.connected, &a.node_id, a.connected_since).cmp(&(
                !b.connected,
                &b.node_id,
                b.connected_since,
            ))
        });
        v
    }

    /// Whether every connected subscriber serves `v` or a later version of
    /// this writer. True when none is connected: the caller decides whether
    /// "no proxies" means routed.
    pub fn acked_by_all_connected(&self, v: &pb::Version) -> bool {
        lock(&self.inner.subscribers)
            .values()
            .filter(|s| s.connected)
            .all(|s| s.acked.is_some_and(|a| a >= *v))
    }

    /// Changes (the value is a counter) whenever a subscriber connects,
    /// disconnects, ACKs or NACKs: await `changed()` on it, then read
    /// [`Publisher::subscribers`] or [`Publisher::acked_by_all_connected`].
    pub fn acks_changed(&self) -> watch::Receiver<u64> {
        self.inner.acks.subscribe()
    }

    /// Counters for metrics.
    pub fn totals(&self) -> Totals {
        Totals {
            sent: self.inner.sent.load(Ordering::Relaxed),
            full_sent: self.inner.full_sent.load(Ordering::Relaxed),
            deltas_sent: self.inner.deltas_sent.load(Ordering::Relaxed),
            bytes_sent: self.inner.bytes_sent.load(Ordering::Relaxed),
            acks: self.inner.ack_count.load(Ordering::Relaxed),
            nacks: self.inner.nack_count.load(Ordering::Relaxed),
            refused: self.inner.refused.load(Ordering::Relaxed),
        }
    }

    /// `v` if it is a version this writer published; a subscriber's claim to
    /// hold anything else says nothing about our snapshots.
    fn ours(&self, v: Option<pb::Version>) -> Option<pb::Version> {
        let current = self.current_version()?;
        v.filter(|v| v.epoch == self.inner.epoch && *v <= current)
    }

    fn register(&self, hello: &SubscribeRequest, peer: Option<SocketAddr>) -> Registration {
        let conn = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        {
            let mut subs = lock(&self.inner.subscribers);
            forget_old(&mut subs);
            // A node that reconnects replaces its old, disconnected entry,
            // keeping its byte count (a counter across its streams).
            let mut carried = 0;
            subs.retain(|_, s| {
                let replaced = !s.connected && s.node_id == hello.node_id;
                if replaced {
                    carried += s.bytes_sent;
                }
                !replaced
            });
            subs.insert(
                conn,
                SubscriberStatus {
                    node_id: hello.node_id.clone(),
                    role: hello.role.clone(),
                    peer,
                    connected_since: SystemTime::now(),
                    connected: true,
                    disconnected_at: None,
                    acked: self.ours(hello.applied),
                    sent: None,
                    nack_count: 0,
                    last_nack_error: None,
                    last_nack_version: None,
                    accepts_deltas: hello.accepts_deltas,
                    full_sent: 0,
                    deltas_sent: 0,
                    bytes_sent: carried,
                },
            );
        }
        self.notify();
        Registration {
            publisher: self.clone(),
            conn,
        }
    }

    /// Updates a subscriber's entry and wakes [`Publisher::acks_changed`].
    fn update(&self, conn: u64, f: impl FnOnce(&mut SubscriberStatus)) {
        self.update_quietly(conn, f);
        self.notify();
    }

    /// Updates without waking anyone: for bookkeeping the operator does not
    /// act on (what was sent), so each response does not wake its loop.
    fn update_quietly(&self, conn: u64, f: impl FnOnce(&mut SubscriberStatus)) {
        if let Some(s) = lock(&self.inner.subscribers).get_mut(&conn) {
            f(s);
        }
    }

    fn notify(&self) {
        self.inner.acks.send_modify(|n| *n = n.wrapping_add(1));
    }
}

fn forget_old(subs: &mut HashMap<u64, SubscriberStatus>) {
    let now = SystemTime::now();
    subs.retain(|_, s| {
        s.disconnected_at
            .is_none_or(|t| now.duration_since(t).unwrap_or_default() < FORGET_AFTER)
    });
}

/// Marks the subscriber disconnected however its stream task ends
/// (return, cancellation by shutdown, panic).
struct Registration {
    publisher: Publisher,
    conn: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.publisher.update(self.conn, |s| {
            s.connected = false;
            s.disconnected_at = Some(SystemTime::now());
        });
    }
}

/// Options of [`serve_with`].
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The bearer token subscribers must present (non-empty).
    pub token: String,
    /// How long a subscriber may take to send its hello.
    pub hello_deadline: Duration,
    /// Serve TLS with this identity instead of plaintext.
    pub tls: Option<ServerTls>,
}

/// The snapshot server's TLS identity (PEM).
#[derive(Clone)]
pub struct ServerTls {
    /// Certificate chain.
    pub cert_pem: Vec<u8>,
    /// Private key.
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServeOptions {
    /// Defaults with `token`.
    pub fn new(token: String) -> Self {
        ServeOptions {
            token,
            hello_deadline: HELLO_DEADLINE,
            tls: None,
        }
    }
}

/// Serves the snapshot service on `listener` until `shutdown` resolves; then
/// ends every subscriber stream (subscribers reconnect elsewhere or later)
/// and returns once connections have closed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    publisher: Publisher,
    token: String,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_with(listener, publisher, ServeOptions::new(token), shutdown).await
}

/// [`serve`] with every option.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    publisher: Publisher,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !options.token.is_empty(),
        "refusing to serve snapshots without a token"
    );
    let local = listener.local_addr().ok();
    // Streams watch this; it flips when `shutdown` resolves and, being owned
    // by this call, also reads as closed if this future is dropped.
    let (closing_tx, closing) = watch::channel(false);
    let service = SnapshotGrpc {
        shared: Arc::new(Shared {
            publisher,
            token: options.token,
            hello_deadline: options.hello_deadline,
            closing,
        }),
    };
    let shutdown = async move {
        shutdown.await;
        info!("snapshot server shutting down; closing subscriber streams");
        closing_tx.send_replace(true);
    };
    info!(addr = ?local, tls = options.tls.is_some(), "snapshot server listening");
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &options.tls {
        let identity = tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .context("configuring TLS for the snapshot server")?;
    }
    builder
        .tcp_nodelay(true)
        // Dead peers (a proxy whose node vanished) are found and their
        // streams ended instead of being held forever.
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // Tens of MB per snapshot: let the window grow past 64 KiB.
        .http2_adaptive_window(Some(true))
        .max_concurrent_streams(Some(16))
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
        .context("snapshot server")
}

struct Shared {
    publisher: Publisher,
    token: String,
    hello_deadline: Duration,
    closing: watch::Receiver<bool>,
}

/// The gRPC service. Hand-written instead of the generated server so
/// responses can carry the snapshot's bytes encoded once at publish time
/// (the generated server would re-encode a `SnapshotResponse` per stream).
#[derive(Clone)]
struct SnapshotGrpc {
    shared: Arc<Shared>,
}

impl NamedService for SnapshotGrpc {
    const NAME: &'static str = pb::snapshot_service_server::SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for SnapshotGrpc
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != SUBSCRIBE_PATH {
            let path = req.uri().path().to_string();
            return Box::pin(async move {
                Ok(Status::unimplemented(format!("no method {path}")).into_http())
            });
        }
        let shared = self.shared.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(SnapshotCodec).apply_max_message_size_config(
                Some(MAX_REQUEST_BYTES),
                Some(crate::MAX_MESSAGE_BYTES),
            );
            Ok(grpc.streaming(Subscribe(shared), req).await)
        })
    }
}

/// One response on the wire: its small header (version, nonce) and the
/// body (a full snapshot or a delta), whose bytes are shared.
struct Outgoing {
    head: Vec<u8>,
    body: Bytes,
}

impl Outgoing {
    fn new(version: pb::Version, nonce: String, body: Bytes) -> Self {
        let head = SnapshotResponse {
            version: Some(version),
            nonce,
            ..Default::default()
        }
        .encode_to_vec();
        Outgoing { head, body }
    }

    fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }
}

/// Decodes requests with prost; encodes [`Outgoing`] by copying its bytes.
struct SnapshotCodec;

impl Codec for SnapshotCodec {
    type Encode = Outgoing;
    type Decode = SubscribeRequest;
    type Encoder = OutgoingEncoder;
    type Decoder = tonic_prost::ProstDecoder<SubscribeRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        OutgoingEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

struct OutgoingEncoder;

impl Encoder for OutgoingEncoder {
    type Item = Outgoing;
    type Error = Status;

    fn encode(&mut self, item: Outgoing, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.len());
        dst.put_slice(&item.head);
        dst.put_slice(&item.body);
        Ok(())
    }
}

/// The `Subscribe` method.
struct Subscribe(Arc<Shared>);

impl StreamingService<SubscribeRequest> for Subscribe {
    type Response = Outgoing;
    type ResponseStream = ReceiverStream<Result<Outgoing, Status>>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, Status>;

    fn call(&mut self, req: tonic::Request<Streaming<SubscribeRequest>>) -> Self::Future {
        let shared = self.0.clone();
        Box::pin(async move {
            let peer = req.remote_addr();
            if let Err(status) = authorize(req.metadata(), &shared.token) {
                warn!(?peer, "snapshot subscriber refused: {}", status.message());
                return Err(status);
            }
            let inbound = req.into_inner();
            // Capacity 1: at most one response waits in the channel, and the
            // protocol never has more than one outstanding anyway.
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(stream_task(shared, peer, inbound, tx));
            Ok(tonic::Response::new(ReceiverStream::new(rx)))
        })
    }
}

fn authorize(metadata: &tonic::metadata::MetadataMap, token: &str) -> Result<(), Status> {
    let header = metadata.get("authorization").ok_or_else(|| {
        Status::unauthenticated("missing authorization metadata: expected \"Bearer <token>\"")
    })?;
    let given = header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| Status::unauthenticated("authorization must be \"Bearer <token>\""))?;
    // Both sides non-empty: an empty configured token must not match an
    // empty presented one (serve refuses an empty token too).
    if !given.is_empty()
        && !token.is_empty()
        && constant_time_eq::constant_time_eq(given.as_bytes(), token.as_bytes())
    {
        Ok(())
    } else {
        Err(Status::unauthenticated("wrong snapshot token"))
    }
}

type Tx = mpsc::Sender<Result<Outgoing, Status>>;

/// One subscriber's stream: hello, then send / wait for the answer /
/// conflate, until the subscriber goes away or the server shuts down.
async fn stream_task(
    shared: Arc<Shared>,
    peer: Option<SocketAddr>,
    mut inbound: Streaming<SubscribeRequest>,
    tx: Tx,
) {
    let mut closing = shared.closing.clone();
    let run = async {
        let hello = match tokio::time::timeout(shared.hello_deadline, inbound.message()).await {
            Ok(Ok(Some(h))) => h,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(status)) => return Err(status),
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "no hello within {:?}",
                    shared.hello_deadline
                )));
            }
        };
        let publisher = &shared.publisher;
        let registration = publisher.register(&hello, peer);
        info!(node = %hello.node_id, role = %hello.role, ?peer, holds = %version::show_opt(hello.applied.as_ref()), "subscriber connected");
        let result = serve_stream(publisher, registration.conn, &hello, &mut inbound, &tx).await;
        match &result {
            Ok(()) => info!(node = %hello.node_id, "subscriber disconnected"),
            Err(e) => info!(node = %hello.node_id, "subscriber stream ended: {}", e.message()),
        }
        result
    };
    let result = tokio::select! {
        r = run => r,
        // Shutdown (or serve() dropped): end the stream so the connection
        // can close and graceful shutdown completes.
        _ = closing.wait_for(|c| *c) => Ok(()),
    };
    if let Err(status) = result {
        debug!(?peer, "snapshot stream error: {}", status.message());
        // Tell the subscriber why; it may already be gone.
        let _ = tx.try_send(Err(status));
    }
}

async fn serve_stream(
    publisher: &Publisher,
    conn: u64,
    hello: &SubscribeRequest,
    inbound: &mut Streaming<SubscribeRequest>,
    tx: &Tx,
) -> Result<(), Status> {
    let mut rx = publisher.inner.tx.subscribe();
    // What the subscriber holds, as far as we know: deltas start there.
    let mut held = publisher.ours(hello.applied);
    let mut last_sent: Option<pb::Version> = None;
    // After a NACKed delta the next response is a full snapshot.
    let mut force_full = false;
    loop {
        // Latest wins: whatever is current when we are free to send goes
        // out; versions published while the subscriber was busy conflate.
        // The first response goes out even if the subscriber holds it.
        let published = loop {
            let current = rx.borrow_and_update().clone();
            if let Some(p) = current
                && (last_sent.is_none() || version::is_newer(&p.version, last_sent.as_ref()))
            {
                break p;
            }
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Ok(()); // the publisher is gone
                    }
                }
                () = tx.closed() => return Ok(()),
            }
        };
        let v = published.version;
        let deltas = hello.accepts_deltas && !force_full;
        // Merging deltas or encoding a full snapshot can take a while for a
        // big world: off the async workers.
        let (kind, body) = {
            let publisher = publisher.clone();
            let published = published.clone();
            tokio::task::spawn_blocking(move || publisher.response_body(held, &published, deltas))
                .await
                .map_err(|e| Status::internal(format!("building the response: {e}")))?
        };
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let out = Outgoing::new(v, nonce.clone(), body);
        let bytes = out.len() as u64;
        if tx.send(Ok(out)).await.is_err() {
            return Ok(());
        }
        let inner = &publisher.inner;
        inner.sent.fetch_add(1, Ordering::Relaxed);
        inner.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        match kind {
            Kind::Full => inner.full_sent.fetch_add(1, Ordering::Relaxed),
            Kind::Delta => inner.deltas_sent.fetch_add(1, Ordering::Relaxed),
        };
        publisher.update_quietly(conn, |s| {
            s.sent = Some(v);
            s.bytes_sent += bytes;
            match kind {
                Kind::Full => s.full_sent += 1,
                Kind::Delta => s.deltas_sent += 1,
            }
        });
        last_sent = Some(v);
        // At most one unacknowledged response: wait for the answer to this
        // nonce before looking at the publisher again.
        let answer = loop {
            let Some(msg) = inbound.message().await? else {
                return Ok(());
            };
            if msg.response_nonce == nonce {
                break msg;
            }
            debug!(node = %hello.node_id, "ignoring an answer to an earlier response");
        };
        if answer.error_detail.is_empty() {
            inner.ack_count.fetch_add(1, Ordering::Relaxed);
            debug!(node = %hello.node_id, version = %v, ?kind, "snapshot acknowledged");
            held = Some(v);
            force_full = false;
            publisher.update(conn, |s| s.acked = Some(v));
        } else {
            // Counted and recorded; never resent: the loop above waits for a
            // version newer than `v`. The subscriber says what it kept; the
            // next response starts from nothing it might not hold.
            inner.nack_count.fetch_add(1, Ordering::Relaxed);
            let error = truncate(&answer.error_detail, MAX_ERROR_BYTES);
            warn!(node = %hello.node_id, version = %v, ?kind, kept = %version::show_opt(answer.applied.as_ref()), "snapshot refused by subscriber: {error}");
            let kept = publisher.ours(answer.applied);
            held = kept;
            force_full = kind == Kind::Delta;
            publisher.update(conn, |s| {
                s.nack_count += 1;
                s.last_nack_error = Some(error);
                s.last_nack_version = Some(v);
                if kept.is_some() {
                    s.acked = kept;
                }
            });
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn lease(i: u8) -> pb::Lease {
        pb::Lease {
            namespace: "d".into(),
            name: format!("l{i}"),
            lease_hash: vec![i; 32],
            user: format!("u{i}"),
            ip: "10.0.0.1".into(),
            pool: "p".into(),
            access_keys: vec![pb::AccessKey {
                openssh: "ssh-ed25519 AAAA".into(),
                fingerprint: format!("SHA256:{i}"),
            }],
            target: Some(pb::lease::Target::Address("127.0.0.1:22".into())),
            ..Default::default()
        }
    }

    fn snap(n: u8, generated: i64) -> pb::Snapshot {
        pb::Snapshot {
            leases: (1..=n).map(lease).collect(),
            relay: Some(pb::RelayTrust {
                ca_public_key: "ssh-ed25519 CA".into(),
                cert_validity_secs: 300,
            }),
            generated_unix_ms: generated,
            ..Default::default()
        }
    }

    #[test]
    fn versions_count_up_under_the_epoch_and_skip_unchanged_content() {
        let p = Publisher::new(4);
        assert_eq!(p.current_version(), None);
        assert_eq!(p.publish(snap(1, 10)).unwrap(), pb::Version::new(4, 1));
        // Only the timestamp differs: same content, same version, and the
        // published snapshot keeps its first timestamp.
        assert_eq!(p.publish(snap(1, 20)).unwrap(), pb::Version::new(4, 1));
        assert_eq!(p.current().unwrap().generated_unix_ms, 10);
        // A version set by the caller is ignored.
        let mut s = snap(2, 30);
        s.version = Some(pb::Version::new(99, 99));
        assert_eq!(p.publish(s).unwrap(), pb::Version::new(4, 2));
        let cur = p.current().unwrap();
        assert_eq!(cur.version, Some(pb::Version::new(4, 2)));
        assert_eq!(cur.generated_unix_ms, 30);
        assert_eq!(cur.leases.len(), 2);
        // Back to the first content: new content relative to the current one.
        assert_eq!(p.publish(snap(1, 40)).unwrap(), pb::Version::new(4, 3));
    }

    #[test]
    fn an_inconsistent_snapshot_publishes_nothing() {
        let p = Publisher::new(1);
        let v1 = p.publish(snap(1, 0)).unwrap();
        let mut bad = snap(2, 0);
        bad.leases[1].lease_hash = bad.leases[0].lease_hash.clone();
        let err = p.publish(bad).unwrap_err();
        assert!(err.to_string().contains("lease d/l2"), "{err}");
        assert_eq!(p.current_version(), Some(v1));
        assert_eq!(p.current().unwrap().leases.len(), 1);
        assert_eq!(p.totals().refused, 1);
        // The failed attempt used no version number.
        assert_eq!(p.publish(snap(3, 0)).unwrap(), pb::Version::new(1, 2));
    }

    fn decode(out: Outgoing) -> SnapshotResponse {
        let mut bytes = out.head.clone();
        bytes.extend_from_slice(&out.body);
        SnapshotResponse::decode(bytes.as_slice()).unwrap()
    }

    fn body(p: &Publisher, held: Option<pb::Version>, deltas: bool) -> (Kind, SnapshotResponse) {
        let published = p.inner.tx.borrow().clone().unwrap();
        let (kind, body) = p.response_body(held, &published, deltas);
        (
            kind,
            decode(Outgoing::new(published.version, "abc".into(), body)),
        )
    }

    #[test]
    fn the_wire_bytes_decode_to_the_published_snapshot() {
        let p = Publisher::new(2);
        p.publish(snap(3, 1234)).unwrap();
        let (kind, decoded) = body(&p, None, true);
        assert_eq!(kind, Kind::Full);
        assert_eq!(decoded.version, Some(pb::Version::new(2, 1)));
        assert_eq!(decoded.nonce, "abc");
        assert_eq!(decoded.snapshot.as_ref(), Some(&*p.current().unwrap()));
        assert_eq!(decoded.snapshot.unwrap().generated_unix_ms, 1234);
        assert!(decoded.delta.is_none());
    }

    #[test]
    fn a_subscriber_behind_gets_the_merged_changes_and_one_without_deltas_the_whole() {
        let p = Publisher::new(2);
        let v1 = p.publish(snap(3, 0)).unwrap();
        p.publish(snap(4, 0)).unwrap();
        let mut s = snap(4, 0);
        s.leases.remove(0);
        let v3 = p.publish(s).unwrap();
        let (kind, r) = body(&p, Some(v1), true);
        assert_eq!(kind, Kind::Delta);
        let d = r.delta.unwrap();
        assert_eq!((d.base, d.version), (Some(v1), Some(v3)));
        assert_eq!(d.upserted_leases.len(), 1);
        assert_eq!(d.removed_leases.len(), 1);
        assert!(r.snapshot.is_none());
        // Holding the current version: an empty delta.
        let (kind, r) = body(&p, Some(v3), true);
        assert_eq!(kind, Kind::Delta);
        assert!(delta::is_empty(&r.delta.unwrap()));
        // No deltas, another epoch, or a version we never had: the whole.
        assert_eq!(body(&p, Some(v1), false).0, Kind::Full);
        assert_eq!(body(&p, Some(pb::Version::new(1, 1)), true).0, Kind::Full);
        assert_eq!(body(&p, Some(pb::Version::new(2, 9)), true).0, Kind::Full);
    }

    #[test]
    fn evicted_history_falls_back_to_the_whole_snapshot() {
        let p = Publisher::new(2);
        let v1 = p.publish(snap(1, 0)).unwrap();
        for i in 0..HISTORY_MAX_STEPS + 1 {
            p.publish(snap(if i % 2 == 0 { 2 } else { 1 }, 0)).unwrap();
        }
        assert_eq!(lock(&p.inner.history).steps.len(), HISTORY_MAX_STEPS);
        assert_eq!(body(&p, Some(v1), true).0, Kind::Full);
        let recent = pb::Version::new(2, p.current_version().unwrap().version - 1);
        assert_eq!(body(&p, Some(recent), true).0, Kind::Delta);
    }

    #[test]
    fn subscribe_path_matches_the_generated_service_name() {
        assert_eq!(
            SUBSCRIBE_PATH,
            format!("/{}/Subscribe", pb::snapshot_service_server::SERVICE_NAME)
        );
    }

    #[test]
    fn bearer_token_is_required_and_compared() {
        let mut md = tonic::metadata::MetadataMap::new();
        let msg = |r: Result<(), Status>| r.unwrap_err().message().to_string();
        assert!(msg(authorize(&md, "s3cret")).contains("missing"));
        md.insert("authorization", "Basic s3cret".parse().unwrap());
        assert!(msg(authorize(&md, "s3cret")).contains("Bearer"));
        md.insert("authorization", "Bearer nope".parse().unwrap());
        assert!(msg(authorize(&md, "s3cret")).contains("wrong"));
        md.insert("authorization", "Bearer ".parse().unwrap());
        assert!(authorize(&md, "").is_err(), "empty matched empty");
        md.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert_eq!(authorize(&md, "s3cret").map_err(|e| e.to_string()), Ok(()));
    }

    #[test]
    fn nack_text_is_truncated_on_a_char_boundary() {
        assert_eq!(truncate("short", 10), "short");
        let long = "é".repeat(600); // 1200 bytes
        let t = truncate(&long, MAX_ERROR_BYTES);
        assert!(t.len() <= MAX_ERROR_BYTES + '…'.len_utf8());
        assert!(t.ends_with('…'));
    }
}
