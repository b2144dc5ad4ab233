//! The operator side: [`Publisher`] versions snapshots and the gRPC service
//! streams them to subscribers, one unacknowledged response at a time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use futures::Stream;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::pb::snapshot_service_server::{SnapshotService, SnapshotServiceServer};
use crate::pb::{self, SnapshotResponse, SubscribeRequest};
use crate::{check, version};

/// How long a subscriber may take to send its hello.
pub const HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// Disconnected subscribers stay listed this long (for status).
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// Why a snapshot was not published.
#[derive(Debug, thiserror::Error)]
#[error("snapshot failed the consistency check: {}", .0.join("; "))]
pub struct PublishError(pub Vec<String>);

struct Published {
    snapshot: Arc<pb::Snapshot>,
    /// The encoding without version and timestamp: equal bytes = same content.
    content: Vec<u8>,
}

/// A subscriber as the operator sees it.
#[derive(Clone, Debug)]
pub struct SubscriberStatus {
    /// Node id from its hello.
    pub node_id: String,
    /// Role from its hello.
    pub role: String,
    /// Remote address.
    pub peer: Option<SocketAddr>,
    /// When its stream opened.
    pub connected_since: SystemTime,
    /// The stream is open.
    pub connected: bool,
    /// The version it last acknowledged.
    pub acked: Option<pb::Version>,
    /// NACKs received.
    pub nack_count: u64,
    /// Error of its last NACK.
    pub last_nack_error: Option<String>,
    /// Version it last refused.
    pub last_nack_version: Option<pb::Version>,
    disconnected_at: Option<SystemTime>,
}

/// Totals for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Responses sent.
    pub sent: u64,
    /// ACKs received.
    pub acks: u64,
    /// NACKs received.
    pub nacks: u64,
    /// Snapshots refused by the consistency check.
    pub refused: u64,
}

struct Inner {
    epoch: u64,
    /// Set on shutdown: every stream ends so connections can close.
    closing: watch::Sender<bool>,
    tx: watch::Sender<Option<Arc<Published>>>,
    subscribers: Mutex<HashMap<u64, SubscriberStatus>>,
    next_conn: AtomicU64,
    acks: watch::Sender<u64>,
    sent: AtomicU64,
    ack_count: AtomicU64,
    nack_count: AtomicU64,
    refused: AtomicU64,
}

/// Versions snapshots and hands them to every subscriber stream (cheap to clone).
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

fn content_bytes(s: &pb::Snapshot) -> Vec<u8> {
    let mut c = s.clone();
    c.version = None;
    c.generated_unix_ms = 0;
    c.encode_to_vec()
}

impl Publisher {
    /// A publisher writing under `epoch` (which must exceed every earlier writer's).
    pub fn new(epoch: u64) -> Self {
        let (tx, _) = watch::channel(None);
        let (acks, _) = watch::channel(0);
        let (closing, _) = watch::channel(false);
        Publisher {
            inner: Arc::new(Inner {
                epoch,
                closing,
                tx,
                subscribers: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(1),
                acks,
                sent: AtomicU64::new(0),
                ack_count: AtomicU64::new(0),
                nack_count: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            }),
        }
    }

    /// Checks and publishes a snapshot. Content identical to the current one
    /// keeps the current version; anything else gets the next version.
    pub fn publish(&self, mut snapshot: pb::Snapshot) -> Result<pb::Version, PublishError> {
        if let Err(errors) = check::check(&snapshot) {
            self.inner.refused.fetch_add(1, Ordering::Relaxed);
            return Err(PublishError(errors));
        }
        let content = content_bytes(&snapshot);
        let current = self.inner.tx.borrow().clone();
        if let Some(cur) = &current
            && cur.content == content
            && let Some(v) = cur.snapshot.version
        {
            return Ok(v);
        }
        let next = pb::Version {
            epoch: self.inner.epoch,
            version: current
                .and_then(|c| c.snapshot.version)
                .map_or(1, |v| v.version + 1),
        };
        snapshot.version = Some(next);
        self.inner.tx.send_replace(Some(Arc::new(Published {
            snapshot: Arc::new(snapshot),
            content,
        })));
        Ok(next)
    }

    /// Ends every subscriber stream (server shutdown); subscribers reconnect.
    pub fn close(&self) {
        self.inner.closing.send_replace(true);
    }

    /// The version being served, if any.
    pub fn current_version(&self) -> Option<pb::Version> {
        self.inner
            .tx
            .borrow()
            .as_ref()
            .and_then(|p| p.snapshot.version)
    }

    /// The snapshot being served, if any.
    pub fn current(&self) -> Option<Arc<pb::Snapshot>> {
        self.inner.tx.borrow().as_ref().map(|p| p.snapshot.clone())
    }

    /// Every subscriber seen recently, connected ones first.
    pub fn subscribers(&self) -> Vec<SubscriberStatus> {
        let mut subs = self.lock_subscribers();
        let now = SystemTime::now();
        subs.retain(|_, s| {
            s.disconnected_at
                .is_none_or(|t| now.duration_since(t).unwrap_or_default() < FORGET_AFTER)
        });
        let mut v: Vec<SubscriberStatus> = subs.values().cloned().collect();
        v.sort_by(|a, b| (!a.connected, &a.node_id).cmp(&(!b.connected, &b.node_id)));
        v
    }

    /// Whether every connected subscriber has acknowledged `v` or later.
    pub fn acked_by_all_connected(&self, v: &pb::Version) -> bool {
        self.lock_subscribers()
            .values()
            .filter(|s| s.connected)
            .all(|s| s.acked.as_ref().is_some_and(|a| version::cmp(a, v).is_ge()))
    }

    /// Bumps whenever a subscriber connects, disconnects, ACKs or NACKs.
    pub fn acks_changed(&self) -> watch::Receiver<u64> {
        self.inner.acks.subscribe()
    }

    /// Counters for metrics.
    pub fn totals(&self) -> Totals {
        Totals {
            sent: self.inner.sent.load(Ordering::Relaxed),
            acks: self.inner.ack_count.load(Ordering::Relaxed),
            nacks: self.inner.nack_count.load(Ordering::Relaxed),
            refused: self.inner.refused.load(Ordering::Relaxed),
        }
    }

    /// The gRPC service, refusing calls without `authorization: Bearer <token>`.
    pub fn service(&self, token: String) -> SnapshotServiceServer<Service> {
        SnapshotServiceServer::new(Service {
            publisher: self.clone(),
            token: Arc::new(token),
        })
        .max_decoding_message_size(64 * 1024)
        .max_encoding_message_size(crate::MAX_MESSAGE_BYTES)
    }

    fn lock_subscribers(&self) -> std::sync::MutexGuard<'_, HashMap<u64, SubscriberStatus>> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, conn: u64, f: impl FnOnce(&mut SubscriberStatus)) {
        if let Some(s) = self.lock_subscribers().get_mut(&conn) {
            f(s);
        }
        self.inner.acks.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The tonic service behind [`Publisher::service`].
pub struct Service {
    publisher: Publisher,
    token: Arc<String>,
}

fn authorized(req: &Request<Streaming<SubscribeRequest>>, token: &str) -> Result<(), Status> {
    let header = req
        .metadata()
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing authorization metadata (Bearer token)"))?;
    let given = header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(|| Status::unauthenticated("authorization must be \"Bearer <token>\""))?;
    if constant_time_eq::constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(Status::unauthenticated("wrong snapshot token"))
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SnapshotService for Service {
    type SubscribeStream = ResponseStream;

    async fn subscribe(
        &self,
        req: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        if let Err(status) = authorized(&req, &self.token) {
            warn!(peer = ?req.remote_addr(), "snapshot subscriber refused: {}", status.message());
            return Err(status);
        }
        let peer = req.remote_addr();
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(stream_task(self.publisher.clone(), peer, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One subscriber's stream: hello, then send / wait for ACK / conflate, until
/// either side goes away.
async fn stream_task(
    publisher: Publisher,
    peer: Option<SocketAddr>,
    mut inbound: Streaming<SubscribeRequest>,
    tx: mpsc::Sender<Result<SnapshotResponse, Status>>,
) {
    let hello = match tokio::time::timeout(HELLO_DEADLINE, inbound.message()).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            debug!(?peer, "subscriber stream failed before hello: {e}");
            return;
        }
        Err(_) => {
            let _ = tx
                .send(Err(Status::deadline_exceeded("no hello within 10 s")))
                .await;
            return;
        }
    };
    let conn = publisher.inner.next_conn.fetch_add(1, Ordering::Relaxed);
    {
        let mut subs = publisher.lock_subscribers();
        // A node that reconnects replaces its old, disconnected entry.
        subs.retain(|_, s| s.connected || s.node_id != hello.node_id);
        subs.insert(
            conn,
            SubscriberStatus {
                node_id: hello.node_id.clone(),
                role: hello.role.clone(),
                peer,
                connected_since: SystemTime::now(),
                connected: true,
                acked: hello.applied,
                nack_count: 0,
                last_nack_error: None,
                last_nack_version: None,
                disconnected_at: None,
            },
        );
    }
    publisher.update(conn, |_| {});
    info!(node = %hello.node_id, role = %hello.role, ?peer, holds = %version::show_opt(hello.applied.as_ref()), "subscriber connected");
    let mut closing = publisher.inner.closing.subscribe();
    let result = tokio::select! {
        r = serve_stream(&publisher, conn, &mut inbound, &tx) => r,
        _ = closing.wait_for(|c| *c) => Ok(()),
    };
    publisher.update(conn, |s| {
        s.connected = false;
        s.disconnected_at = Some(SystemTime::now());
    });
    info!(node = %hello.node_id, "subscriber disconnected{}", result.err().map(|e| format!(": {e:#}")).unwrap_or_default());
}

async fn serve_stream(
    publisher: &Publisher,
    conn: u64,
    inbound: &mut Streaming<SubscribeRequest>,
    tx: &mpsc::Sender<Result<SnapshotResponse, Status>>,
) -> anyhow::Result<()> {
    let mut rx = publisher.inner.tx.subscribe();
    let mut last_sent: Option<pb::Version> = None;
    loop {
        // Latest-wins: whatever is current when we are free to send goes out;
        // versions published while the subscriber was busy are skipped.
        let published = loop {
            let current = rx.borrow_and_update().clone();
            if let Some(p) = current
                && let Some(v) = p.snapshot.version
                && version::is_newer(&v, last_sent.as_ref())
            {
                break p;
            }
            tokio::select! {
                changed = rx.changed() => changed.context("publisher gone")?,
                () = tx.closed() => return Ok(()),
            }
        };
        let v = published.snapshot.version.unwrap_or_default();
        let nonce = hex::encode(rand::random::<[u8; 12]>());
        let response = SnapshotResponse {
            version: Some(v),
            nonce: nonce.clone(),
            snapshot: Some((*published.snapshot).clone()),
        };
        if tx.send(Ok(response)).await.is_err() {
            return Ok(());
        }
        publisher.inner.sent.fetch_add(1, Ordering::Relaxed);
        last_sent = Some(v);
        // At most one unacknowledged response: wait for the answer to this nonce.
        loop {
            let Some(msg) = inbound.message().await.context("reading ACK")? else {
                return Ok(());
            };
            if msg.response_nonce != nonce {
                continue; // stale answer to an earlier response
            }
            if msg.error_detail.is_empty() {
                publisher.inner.ack_count.fetch_add(1, Ordering::Relaxed);
                publisher.update(conn, |s| s.acked = msg.applied);
            } else {
                // Counted and recorded; never resent: we wait for a newer version.
                publisher.inner.nack_count.fetch_add(1, Ordering::Relaxed);
                warn!(node = %msg.node_id, version = %version::show(&v), "snapshot NACKed: {}", msg.error_detail);
                publisher.update(conn, |s| {
                    s.nack_count += 1;
                    s.last_nack_error = Some(msg.error_detail.clone());
                    s.last_nack_version = Some(v);
                    s.acked = msg.applied;
                });
            }
            break;
        }
    }
}

/// Serves the snapshot service on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    publisher: Publisher,
    token: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let closer = publisher.clone();
    let shutdown = async move {
        shutdown.await;
        closer.close();
    };
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(publisher.service(token))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("snapshot server")
}
