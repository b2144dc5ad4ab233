//! The subscriber library proxies and agents use: serves the disk copy at once,
//! keeps a stream to the operator with jittered exponential backoff, checks and
//! persists every snapshot before acknowledging it, and refuses anything older
//! than what it already applied.
//!
//! Per response, in order: the consistency check and the caller's `validate`
//! (a refusal NACKs and keeps the current snapshot), the synced write of the
//! disk copy ([`crate::disk`]: a journal record per delta, a new base for a
//! full snapshot or when the journal is due for compaction), the switch of the
//! `snapshot` watch, then the ACK. So an ACKed version is already being served
//! and survives a restart.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Endpoint;
use tracing::{debug, error, info, warn};

use crate::disk::{DiskCopy, Saved};
use crate::held::{Held, LazySnapshot};
use crate::pb::{self, SubscribeRequest};
use crate::server::SUBSCRIBE_PATH;
use crate::version;

/// `SnapshotResponse` as the subscriber decodes it (same wire format): a
/// whole snapshot's leases stay encoded, slices of the received message, and
/// are decoded one at a time into the table, so the fully decoded snapshot
/// (about three times the bytes) never sits in memory beside it.
#[derive(Clone, PartialEq, prost::Message)]
struct Response {
    #[prost(message, optional, tag = "1")]
    version: Option<pb::Version>,
    #[prost(string, tag = "2")]
    nonce: String,
    #[prost(message, optional, tag = "3")]
    snapshot: Option<LazySnapshot>,
    #[prost(message, optional, tag = "4")]
    delta: Option<pb::SnapshotDelta>,
}

/// Shortest reconnect delay, whatever the config says (zero would spin).
const MIN_BACKOFF: Duration = Duration::from_millis(10);
/// NACK texts are cut to this many bytes: the operator reads requests of at
/// most 64 KiB, and a snapshot with 100,000 problems would exceed it.
const MAX_NACK_BYTES: usize = 4096;

/// How to reach the operator, and where to keep the last snapshot.
#[derive(Clone, Debug)]
pub struct SubscriberConfig {
    /// `http://host:7070`.
    pub endpoint: String,
    /// The snapshot token, sent as `authorization: Bearer <token>`; empty
    /// sends no authorization (the operator refuses the call).
    pub token: String,
    /// Stable name of this subscriber (pod or host name).
    pub node_id: String,
    /// `proxy`, `agent`, `cli`…
    pub role: String,
    /// Where the last applied snapshot is kept (protobuf bytes); `None`
    /// keeps nothing.
    pub cache_path: Option<PathBuf>,
    /// First reconnect delay (and the floor of every delay).
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// PEM CA certificate(s) trusted for an `https://` endpoint; `None`
    /// with `https://` trusts nothing and fails to connect.
    pub ca_pem: Option<Vec<u8>>,
    /// After a full snapshot of more than this many bytes, the stream is
    /// reopened (at once, from the version now held): the transport keeps
    /// its receive buffer, and the operator its send buffer, at the size of
    /// the largest message the stream carried, for as long as it lasts (a
    /// third of a proxy's memory at 1,000,000 leases). Usually
    /// [`DEFAULT_REOPEN_AFTER_FULL_BYTES`].
    pub reopen_after_full_bytes: usize,
}

/// See [`SubscriberConfig::reopen_after_full_bytes`].
pub const DEFAULT_REOPEN_AFTER_FULL_BYTES: usize = 64 << 20;

/// How a stream ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The operator closed it.
    ByOperator,
    /// We did, after a big full snapshot, to let its buffers go.
    ToFreeBuffers,
}

/// How the subscription is doing (for `/readyz` and metrics).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SubscriptionStatus {
    /// A stream to the operator is open.
    pub connected: bool,
    /// The version served now.
    pub applied: Option<pb::Version>,
    /// When it was applied (or loaded from disk).
    pub last_applied_at: Option<SystemTime>,
    /// The snapshot served is the disk copy and the operator has not yet
    /// confirmed or replaced it.
    pub from_disk: bool,
    /// The last connection, validation or persistence error (kept after
    /// recovery: it is the last one, not a current one).
    pub last_error: Option<String>,
    /// The last attempt was refused as unauthenticated (wrong or missing
    /// token); cleared when a stream opens.
    pub auth_refused: bool,
    /// Streams opened after the first one.
    pub reconnects: u64,
    /// Snapshots refused (NACKed).
    pub nacks: u64,
}

/// The receiving ends of a subscription. Clones share the subscription.
#[derive(Clone)]
pub struct Subscription {
    /// The snapshot served now (`None` until one is loaded or received).
    pub snapshot: watch::Receiver<Option<Arc<Held>>>,
    /// Connection state.
    pub status: watch::Receiver<SubscriptionStatus>,
    stop: Arc<watch::Sender<bool>>,
}

impl Subscription {
    /// Ends the subscription: the stream closes and the task returns (await
    /// its `JoinHandle` to know when). The last snapshot stays readable.
    /// Aborting the task ends it the same way.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }
}

use crate::disk::Validate;

/// Starts a subscription on the current tokio runtime.
///
/// `validate` runs (on a blocking thread) after the consistency check, on the
/// disk copy and on every new snapshot; an error refuses the snapshot (NACK
/// with that text) and keeps the current one.
///
/// The task runs until [`Subscription::shutdown`] or `JoinHandle::abort`;
/// dropping the `JoinHandle` detaches it (tokio semantics) and dropping every
/// `Subscription` does not stop it either.
pub fn subscribe(
    config: SubscriberConfig,
    validate: impl Fn(&Held) -> Result<(), String> + Send + Sync + 'static,
) -> (Subscription, JoinHandle<()>) {
    let (snap_tx, snap_rx) = watch::channel(None);
    let (status_tx, status_rx) = watch::channel(SubscriptionStatus::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let validate: Arc<Validate> = Arc::new(validate);
    let task = tokio::spawn(run(config, validate, snap_tx, status_tx, stop_rx));
    (
        Subscription {
            snapshot: snap_rx,
            status: status_rx,
            stop: Arc::new(stop_tx),
        },
        task,
    )
}

struct Shared {
    config: SubscriberConfig,
    /// The disk copy, when `cache_path` is set; used on blocking threads.
    disk: Option<Arc<Mutex<DiskCopy>>>,
    validate: Arc<Validate>,
    snap_tx: watch::Sender<Option<Arc<Held>>>,
    status_tx: watch::Sender<SubscriptionStatus>,
}

impl Shared {
    fn held(&self) -> Option<pb::Version> {
        self.snap_tx.borrow().as_ref().map(|s| s.version)
    }
}

async fn run(
    config: SubscriberConfig,
    validate: Arc<Validate>,
    snap_tx: watch::Sender<Option<Arc<Held>>>,
    status_tx: watch::Sender<SubscriptionStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let disk = config
        .cache_path
        .as_deref()
        .map(|p| Arc::new(Mutex::new(DiskCopy::new(p))));
    let shared = Shared {
        disk,
        config,
        validate,
        snap_tx,
        status_tx,
    };
    tokio::select! {
        biased;
        () = stopped(&mut stop) => {}
        () = run_until_stopped(&shared) => {}
    }
    shared.status_tx.send_modify(|st| st.connected = false);
    info!(endpoint = %shared.config.endpoint, "snapshot subscription ended");
}

/// Resolves on `shutdown()`; never when every `Subscription` was dropped,
/// since the task may still be wanted (it is ended by abort then).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn run_until_stopped(shared: &Shared) {
    load_disk_copy(shared).await;
    connect_loop(shared).await;
}

async fn load_disk_copy(shared: &Shared) {
    let Some(disk) = shared.disk.clone() else {
        return;
    };
    let validate = shared.validate.clone();
    let shown = shared
        .config
        .cache_path
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let job = move || match disk.lock() {
        Ok(mut d) => d.load(&*validate),
        Err(_) => Err(anyhow!("the disk copy's lock is poisoned")),
    };
    match tokio::task::spawn_blocking(job).await {
        Ok(Ok(Some(s))) => {
            let v = Some(s.version);
            info!(version = %s.version, leases = s.lease_count(), path = %shown, "serving the snapshot kept on disk");
            shared.snap_tx.send_replace(Some(Arc::new(s)));
            shared.status_tx.send_modify(|st| {
                st.applied = v;
                st.last_applied_at = Some(SystemTime::now());
                st.from_disk = true;
            });
        }
        Ok(Ok(None)) => debug!(path = %shown, "no snapshot kept on disk"),
        Ok(Err(e)) => warn!(path = %shown, "ignoring the snapshot kept on disk: {e:#}"),
        Err(e) => warn!(path = %shown, "ignoring the snapshot kept on disk: loading failed: {e}"),
    }
}

/// Reconnects forever with exponential backoff and full jitter between
/// `backoff_min` and a ceiling that doubles up to `backoff_max`; the ceiling
/// resets after a stream that delivered at least one snapshot, so a server
/// that accepts and at once drops us still gets backed off from.
async fn connect_loop(shared: &Shared) {
    let floor = shared.config.backoff_min.max(MIN_BACKOFF);
    let cap = shared.config.backoff_max.max(floor);
    let mut ceiling = floor;
    let mut streams = 0u64;
    let mut failures_in_row = 0u64;
    loop {
        let mut delivered = false;
        let outcome = stream(shared, &mut streams, &mut delivered).await;
        shared.status_tx.send_modify(|st| st.connected = false);
        let endpoint = &shared.config.endpoint;
        match outcome {
            Ok(Ended::ToFreeBuffers) => {
                failures_in_row = 0;
                ceiling = floor;
                continue;
            }
            Ok(Ended::ByOperator) => {
                failures_in_row = 0;
                info!(%endpoint, "the operator closed the snapshot stream; reconnecting");
            }
            Err(e) => {
                failures_in_row += 1;
                let auth = is_unauthenticated(&e);
                let msg = format!("{e:#}");
                if auth {
                    // Distinct and always loud: a config problem, not an
                    // outage. Still retried: the token may be rotated.
                    error!(%endpoint, "the operator refused our snapshot token; retrying with backoff: {msg}");
                } else if failures_in_row == 1 {
                    warn!(%endpoint, "snapshot stream failed; serving the last snapshot and retrying: {msg}");
                } else {
                    debug!(%endpoint, failures_in_row, "snapshot stream failed again: {msg}");
                }
                shared.status_tx.send_modify(|st| {
                    st.last_error = Some(msg);
                    st.auth_refused = auth;
                });
            }
        }
        if delivered {
            ceiling = floor;
        }
        let delay = floor + (ceiling - floor).mul_f64(rand::random::<f64>());
        ceiling = (ceiling * 2).min(cap);
        tokio::time::sleep(delay).await;
    }
}

fn is_unauthenticated(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<tonic::Status>())
        .any(|s| s.code() == tonic::Code::Unauthenticated)
}

fn bearer(token: &str) -> Result<Option<MetadataValue<Ascii>>> {
    if token.is_empty() {
        return Ok(None);
    }
    format!("Bearer {token}")
        .parse()
        .map(Some)
        .map_err(|_| anyhow!("the snapshot token has characters a header cannot carry"))
}

/// One stream: connect, hello, then answer every response. `Ok` when the
/// operator ends the stream cleanly.
async fn stream(shared: &Shared, streams: &mut u64, delivered: &mut bool) -> Result<Ended> {
    let config = &shared.config;
    let authorization = bearer(&config.token)?;
    let mut endpoint = Endpoint::from_shared(config.endpoint.clone())
        .with_context(|| format!("invalid endpoint {:?}", config.endpoint))?;
    if config.endpoint.starts_with("https://") {
        let ca = config.ca_pem.as_ref().with_context(|| {
            format!(
                "{} is https but no CA certificate is configured to verify it",
                config.endpoint
            )
        })?;
        endpoint = endpoint
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
            )
            .context("configuring TLS")?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        // Snapshots are tens of MB: let the receive window grow.
        .http2_adaptive_window(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {}", config.endpoint))?;
    let mut client = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::MAX_MESSAGE_BYTES);

    let request = |response_nonce: String, applied, error_detail: String| SubscribeRequest {
        node_id: config.node_id.clone(),
        applied,
        response_nonce,
        error_detail,
        role: config.role.clone(),
        accepts_deltas: true,
    };
    // One answer per response and we wait for the next response before
    // answering again, so the queue never holds more than the hello + one.
    let (req_tx, req_rx) = mpsc::channel::<SubscribeRequest>(2);
    req_tx
        .send(request(String::new(), shared.held(), String::new()))
        .await
        .map_err(|_| anyhow!("request channel closed"))?;
    let mut call = tonic::Request::new(ReceiverStream::new(req_rx));
    if let Some(a) = authorization {
        call.metadata_mut().insert("authorization", a);
    }
    client
        .ready()
        .await
        .map_err(|e| tonic::Status::unknown(format!("Service was not ready: {e}")))
        .context("subscribing")?;
    let codec = tonic_prost::ProstCodec::<SubscribeRequest, Response>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(SUBSCRIBE_PATH);
    let mut inbound = client
        .streaming(call, path, codec)
        .await
        .context("subscribing")?
        .into_inner();
    *streams += 1;
    let reconnects = streams.saturating_sub(1);
    shared.status_tx.send_modify(|st| {
        st.connected = true;
        st.auth_refused = false;
        st.reconnects = reconnects;
    });
    info!(endpoint = %config.endpoint, holds = %version::show_opt(shared.held().as_ref()), "snapshot stream open");

    while let Some(resp) = inbound.message().await.context("receiving a snapshot")? {
        *delivered = true;
        let nonce = resp.nonce.clone();
        let full_bytes = resp
            .snapshot
            .as_ref()
            .map_or(0, prost::Message::encoded_len);
        let held_snapshot = shared.snap_tx.borrow().clone();
        let held = held_snapshot.as_ref().map(|s| s.version);
        let offered = resp.version;
        // Check, validate and persist off the async threads: for 100,000
        // leases each takes a while, and `validate` is the caller's code.
        let job = {
            let validate = shared.validate.clone();
            let disk = shared.disk.clone();
            move || judge(resp, held_snapshot.as_deref(), &*validate, disk.as_deref())
        };
        let verdict = match tokio::task::spawn_blocking(job).await {
            Ok(v) => v,
            Err(e) if e.is_panic() => Verdict::Refuse("validation panicked".into()),
            Err(e) => return Err(anyhow!("checking the snapshot: {e}")),
        };
        // Reopened only after applying a new full snapshot (an operator that
        // resent the one held would otherwise be reconnected to forever).
        let mut reopen = false;
        let (applied, error) = match verdict {
            Verdict::Same(v) => {
                debug!(version = %v, "already serving the offered snapshot");
                shared.status_tx.send_modify(|st| st.from_disk = false);
                (Some(v), String::new())
            }
            Verdict::Apply {
                snapshot,
                version: v,
                persist_error,
            } => {
                if let Some(e) = &persist_error {
                    error!(version = %v, "could not keep the snapshot on disk (serving it anyway): {e}");
                }
                info!(version = %v, leases = snapshot.lease_count(), routes = snapshot.route_count(), "snapshot applied");
                reopen = full_bytes > config.reopen_after_full_bytes;
                shared.snap_tx.send_replace(Some(snapshot));
                shared.status_tx.send_modify(|st| {
                    st.applied = Some(v);
                    st.last_applied_at = Some(SystemTime::now());
                    st.from_disk = false;
                    if let Some(e) = persist_error {
                        st.last_error = Some(format!("could not keep the snapshot on disk: {e}"));
                    }
                });
                (Some(v), String::new())
            }
            Verdict::Refuse(e) => {
                let e = truncate(&e, MAX_NACK_BYTES);
                warn!(offered = %version::show_opt(offered.as_ref()), kept = %version::show_opt(held.as_ref()), "refusing snapshot: {e}");
                shared.status_tx.send_modify(|st| {
                    st.nacks += 1;
                    st.last_error = Some(format!("refused snapshot: {e}"));
                });
                (held, e)
            }
        };
        req_tx
            .send(request(nonce, applied, error))
            .await
            .map_err(|_| anyhow!("request channel closed"))?;
        if reopen {
            // The next hello names the version now held, which counts as
            // its acknowledgement should this one not get through.
            info!(endpoint = %config.endpoint, mib = full_bytes >> 20, "reopening the snapshot stream to let go of the full snapshot's buffers");
            return Ok(Ended::ToFreeBuffers);
        }
    }
    Ok(Ended::ByOperator)
}

enum Verdict {
    /// The offered version is the one served: a no-op ACK.
    Same(pb::Version),
    /// Passed every check (and was persisted, unless `persist_error`).
    Apply {
        snapshot: Arc<Held>,
        version: pb::Version,
        persist_error: Option<String>,
    },
    /// NACK with this reason; the current snapshot stays.
    Refuse(String),
}

/// Decides on one response; runs on a blocking thread. `held` is the
/// snapshot served now (a delta applies to it).
fn judge(
    resp: Response,
    held: Option<&Held>,
    validate: &Validate,
    disk: Option<&Mutex<DiskCopy>>,
) -> Verdict {
    let Some(v) = resp.version else {
        return Verdict::Refuse("response without a version".into());
    };
    if let Some(h) = held.map(|h| h.version) {
        if h.is_newer_than(&v) {
            return Verdict::Refuse(format!("stale: {v} is older than the applied {h}"));
        }
        if h == v {
            return Verdict::Same(v);
        }
    }
    // A delta is checked for what it touches, in O(change); a full
    // snapshot whole.
    let next = match (resp.snapshot, resp.delta) {
        (Some(mut s), None) => {
            if let Some(inner) = s.version
                && inner != v
            {
                return Verdict::Refuse(format!("response says {v} but its snapshot says {inner}"));
            }
            s.version = Some(v);
            Held::from_lazy(s).map_err(|e| e.to_string())
        }
        (None, Some(d)) => {
            if d.version != Some(v) {
                return Verdict::Refuse(format!(
                    "response says {v} but its delta leads to {}",
                    version::show_opt(d.version.as_ref())
                ));
            }
            let Some(base) = held else {
                return Verdict::Refuse(format!(
                    "a delta from {} but no snapshot is held",
                    version::show_opt(d.base.as_ref())
                ));
            };
            base.apply(&d)
                .map_err(|e| format!("delta not applicable: {e}"))
        }
        (Some(_), Some(_)) => {
            return Verdict::Refuse("response carries both a snapshot and a delta".into());
        }
        (None, None) => return Verdict::Refuse("response without a snapshot or a delta".into()),
    };
    let next = match next {
        Ok(n) => n,
        Err(e) => return Verdict::Refuse(e),
    };
    if let Err(e) = validate(&next) {
        return Verdict::Refuse(e);
    }
    let persist_error = disk.and_then(|disk| {
        let Ok(mut disk) = disk.lock() else {
            return Some("the disk copy's lock is poisoned".to_string());
        };
        let e = match disk.save(&next, next.change.as_deref()) {
            Ok(saved) => {
                if saved == Saved::Rewrote && next.change.is_some() {
                    debug!(version = %v, "disk copy compacted");
                }
                return None;
            }
            Err(e) => e,
        };
        // A disk copy older than what we serve could bring back routes that
        // are gone (settled leases) if we restart while the operator is
        // away; better to start with nothing.
        if let Err(rm) = disk.remove() {
            return Some(format!("{e:#}; removing the older copy failed too: {rm:#}"));
        }
        Some(format!("{e:#} (older copy removed)"))
    });
    Verdict::Apply {
        snapshot: Arc::new(next),
        version: v,
        persist_error,
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
    use crate::pb::SnapshotResponse;
    use prost::Message;

    /// What the subscriber decodes from this response on the wire.
    fn judge(
        resp: SnapshotResponse,
        held: Option<&Held>,
        validate: &Validate,
        disk: Option<&Mutex<DiskCopy>>,
    ) -> Verdict {
        let wire = Response::decode(resp.encode_to_vec().as_slice()).unwrap();
        super::judge(wire, held, validate, disk)
    }

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

    fn response(v: pb::Version, n: u8) -> SnapshotResponse {
        SnapshotResponse {
            version: Some(v),
            nonce: "n".into(),
            snapshot: Some(pb::Snapshot {
                version: Some(v),
                leases: (1..=n).map(lease).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// `Response` (and the `LazySnapshot` in it) mirror the generated
    /// messages: every field of a fully populated response survives the trip
    /// through them byte for byte (prost drops fields it does not know, so a
    /// field added to the proto but not to the mirrors fails here).
    #[test]
    fn the_mirrored_response_keeps_every_field() {
        let v = pb::Version {
            epoch: 3,
            version: 9,
        };
        let route = pb::Route {
            namespace: "d".into(),
            name: "r".into(),
            from: "alice@127.0.0.1".into(),
            allow_unauthenticated: true,
            ..Default::default()
        };
        let relay = pb::RelayTrust {
            ca_public_key: "ssh-ed25519 AAAA".into(),
            cert_validity_secs: 60,
        };
        let mut full = response(v, 2);
        if let Some(s) = full.snapshot.as_mut() {
            s.routes = vec![route.clone()];
            s.relay = Some(relay.clone());
            s.generated_unix_ms = 1234;
        }
        let mut delta = delta_response(
            v,
            pb::Version {
                epoch: 3,
                version: 10,
            },
            3,
        );
        if let Some(d) = delta.delta.as_mut() {
            d.removed_leases = vec![pb::ObjectRef {
                namespace: "d".into(),
                name: "gone".into(),
            }];
            d.upserted_routes = vec![route];
            d.removed_routes = vec![pb::ObjectRef::default()];
            d.relay = Some(relay);
            d.relay_removed = true;
            d.generated_unix_ms = 5678;
        }
        for resp in [full, delta] {
            let wire = resp.encode_to_vec();
            let mirrored = Response::decode(wire.as_slice()).unwrap();
            assert_eq!(mirrored.encode_to_vec(), wire, "{resp:?}");
        }
    }

    fn delta_response(base: pb::Version, v: pb::Version, n: u8) -> SnapshotResponse {
        SnapshotResponse {
            version: Some(v),
            nonce: "n".into(),
            delta: Some(pb::SnapshotDelta {
                base: Some(base),
                version: Some(v),
                upserted_leases: vec![lease(n)],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn held(v: pb::Version, n: u8) -> Held {
        Held::from_snapshot(response(v, n).snapshot.unwrap()).unwrap()
    }

    fn ok(_: &Held) -> Result<(), String> {
        Ok(())
    }

    fn refused(v: Verdict) -> String {
        match v {
            Verdict::Refuse(e) => e,
            Verdict::Same(_) => panic!("expected a refusal, got Same"),
            Verdict::Apply { .. } => panic!("expected a refusal, got Apply"),
        }
    }

    #[test]
    fn older_versions_are_refused_epoch_first() {
        let h = held(pb::Version::new(5, 1), 1);
        let held = Some(&h);
        let e = refused(judge(response(pb::Version::new(4, 9), 1), held, &ok, None));
        assert!(
            e.contains("stale: e4.v9 is older than the applied e5.v1"),
            "{e}"
        );
        assert!(matches!(
            judge(response(pb::Version::new(5, 1), 1), held, &ok, None),
            Verdict::Same(_)
        ));
        assert!(matches!(
            judge(response(pb::Version::new(6, 1), 1), held, &ok, None),
            Verdict::Apply { .. }
        ));
    }

    #[test]
    fn a_delta_applies_to_the_held_snapshot_and_only_to_it() {
        let (v1, v2) = (pb::Version::new(5, 1), pb::Version::new(5, 2));
        let h = held(v1, 1);
        let Verdict::Apply {
            snapshot, version, ..
        } = judge(delta_response(v1, v2, 2), Some(&h), &ok, None)
        else {
            panic!("not applied");
        };
        assert_eq!(version, v2);
        assert_eq!(snapshot.version, v2);
        assert_eq!(snapshot.to_snapshot().leases, vec![lease(1), lease(2)]);
        assert!(snapshot.change.is_some(), "reached by a delta");
        // From a version we do not hold, or with nothing held: refused.
        let e = refused(judge(
            delta_response(pb::Version::new(5, 0), v2, 2),
            Some(&h),
            &ok,
            None,
        ));
        assert!(e.contains("delta not applicable"), "{e}");
        let e = refused(judge(delta_response(v1, v2, 2), None, &ok, None));
        assert!(e.contains("no snapshot is held"), "{e}");
        // A delta whose result fails the check is refused like a snapshot.
        let mut bad = delta_response(v1, v2, 2);
        bad.delta.as_mut().unwrap().upserted_leases[0].lease_hash = vec![1; 32];
        let e = refused(judge(bad, Some(&h), &ok, None));
        assert!(e.contains("consistency check failed"), "{e}");
        // Both or a mismatched version: refused.
        let mut both = delta_response(v1, v2, 2);
        both.snapshot = response(v2, 2).snapshot;
        assert!(refused(judge(both, Some(&h), &ok, None)).contains("both"));
        let mut off = delta_response(v1, v2, 2);
        off.version = Some(pb::Version::new(5, 3));
        assert!(refused(judge(off, Some(&h), &ok, None)).contains("leads to"));
        // The empty delta to the held version is a no-op.
        let mut same = delta_response(v1, v1, 2);
        same.delta.as_mut().unwrap().upserted_leases.clear();
        assert!(matches!(judge(same, Some(&h), &ok, None), Verdict::Same(_)));
    }

    #[test]
    fn inconsistent_or_refused_snapshots_are_nacked() {
        let mut bad = response(pb::Version::new(1, 1), 2);
        bad.snapshot.as_mut().unwrap().leases[1].ip = "nope".into();
        assert!(refused(judge(bad, None, &ok, None)).contains("consistency check failed"));
        let no = |_: &Held| Err("no thanks".to_string());
        assert_eq!(
            refused(judge(response(pb::Version::new(1, 1), 1), None, &no, None)),
            "no thanks"
        );
        let mut mismatch = response(pb::Version::new(1, 2), 1);
        mismatch.snapshot.as_mut().unwrap().version = Some(pb::Version::new(1, 1));
        assert!(refused(judge(mismatch, None, &ok, None)).contains("says"));
        let empty = SnapshotResponse::default();
        assert!(refused(judge(empty, None, &ok, None)).contains("without"));
    }

    #[test]
    fn a_huge_list_of_problems_makes_a_small_nack() {
        let errors: Vec<String> = (0..100_000).map(|i| format!("lease d/l{i}: bad")).collect();
        let s = crate::held::summarize(&errors);
        assert!(s.ends_with("(and 99990 more)"), "{s}");
        assert!(s.len() < MAX_NACK_BYTES);
    }

    #[test]
    fn applied_snapshots_are_persisted_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("snapshot.pb");
        let v = pb::Version::new(3, 7);
        let Verdict::Apply {
            snapshot,
            persist_error,
            ..
        } = judge(
            response(v, 2),
            None,
            &ok,
            Some(&Mutex::new(DiskCopy::new(&path))),
        )
        else {
            panic!("not applied");
        };
        assert_eq!(persist_error, None);
        let loaded = DiskCopy::new(&path).load(&ok).unwrap().unwrap();
        assert_eq!(loaded.to_snapshot(), snapshot.to_snapshot());
        assert_eq!(loaded.version, v);
        // No temp files left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("snapshot.pb")]);
    }

    #[test]
    fn a_bad_disk_copy_is_an_error_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.pb");
        let load = || DiskCopy::new(&path).load(&ok);
        assert!(load().unwrap().is_none());
        std::fs::write(&path, b"\xff\xff\xff garbage").unwrap();
        assert!(load().is_err());
        // Decodes, but has no version.
        std::fs::write(&path, pb::Snapshot::default().encode_to_vec()).unwrap();
        let e = load().unwrap_err();
        assert!(format!("{e:#}").contains("no version"), "{e:#}");
    }

    #[test]
    fn a_failed_write_is_reported_and_still_applies() {
        let dir = tempfile::tempdir().unwrap();
        // The cache path's parent is a file: the write must fail.
        let blocker = dir.path().join("blocker");
        std::fs::write(&blocker, b"").unwrap();
        let path = blocker.join("snapshot.pb");
        let Verdict::Apply { persist_error, .. } = judge(
            response(pb::Version::new(1, 1), 1),
            None,
            &ok,
            Some(&Mutex::new(DiskCopy::new(&path))),
        ) else {
            panic!("not applied");
        };
        assert!(persist_error.is_some());
    }

    #[test]
    fn an_empty_token_sends_no_authorization() {
        assert!(bearer("").unwrap().is_none());
        assert_eq!(bearer("t").unwrap().unwrap(), "Bearer t");
        assert!(bearer("bad\ntoken").is_err());
    }
}
