//! The subscriber library proxies and agents use: serves the disk copy at once,
//! keeps a stream to the operator with jittered exponential backoff, checks and
//! persists every snapshot before acknowledging it, and refuses anything older
//! than what it already applied.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;
use tracing::{debug, info, warn};

use crate::pb::snapshot_service_client::SnapshotServiceClient;
use crate::pb::{self, SubscribeRequest};
use crate::{check, version};

/// How to reach the operator.
#[derive(Clone, Debug)]
pub struct SubscriberConfig {
    /// `http://host:7070`.
    pub endpoint: String,
    /// The snapshot token.
    pub token: String,
    /// Stable name of this subscriber (pod or host name).
    pub node_id: String,
    /// `proxy`, `agent`, `cli`…
    pub role: String,
    /// Where the last applied snapshot is kept; `None` keeps nothing.
    pub cache_path: Option<PathBuf>,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
}

/// How the subscription is doing.
#[derive(Clone, Debug, Default)]
pub struct SubscriptionStatus {
    /// A stream to the operator is open.
    pub connected: bool,
    /// The version served now.
    pub applied: Option<pb::Version>,
    /// When it was applied (or loaded from disk).
    pub last_applied_at: Option<SystemTime>,
    /// The last connection or validation error.
    pub last_error: Option<String>,
    /// Streams opened after the first.
    pub reconnects: u64,
    /// Snapshots refused.
    pub nacks: u64,
}

/// The receiving ends of a subscription.
#[derive(Clone)]
pub struct Subscription {
    /// The snapshot served now (`None` until one is loaded or received).
    pub snapshot: watch::Receiver<Option<Arc<pb::Snapshot>>>,
    /// Connection state.
    pub status: watch::Receiver<SubscriptionStatus>,
}

type Validate = dyn Fn(&pb::Snapshot) -> Result<(), String> + Send + Sync;

/// Starts a subscription. `validate` runs after the consistency check; an
/// error NACKs the snapshot and keeps the current one.
pub fn subscribe(
    config: SubscriberConfig,
    validate: impl Fn(&pb::Snapshot) -> Result<(), String> + Send + Sync + 'static,
) -> (Subscription, JoinHandle<()>) {
    let (snap_tx, snap_rx) = watch::channel(None);
    let (status_tx, status_rx) = watch::channel(SubscriptionStatus::default());
    let validate: Arc<Validate> = Arc::new(validate);
    let task = tokio::spawn(run(config, validate, snap_tx, status_tx));
    (
        Subscription {
            snapshot: snap_rx,
            status: status_rx,
        },
        task,
    )
}

async fn run(
    config: SubscriberConfig,
    validate: Arc<Validate>,
    snap_tx: watch::Sender<Option<Arc<pb::Snapshot>>>,
    status_tx: watch::Sender<SubscriptionStatus>,
) {
    if let Some(path) = &config.cache_path {
        match load_cache(path, &*validate) {
            Ok(Some(s)) => {
                info!(version = %version::show_opt(s.version.as_ref()), path = %path.display(), "serving the snapshot kept on disk");
                status_tx.send_modify(|st| {
                    st.applied = s.version;
                    st.last_applied_at = Some(SystemTime::now());
                });
                snap_tx.send_replace(Some(Arc::new(s)));
            }
            Ok(None) => {}
            Err(e) => warn!(path = %path.display(), "ignoring the snapshot kept on disk: {e:#}"),
        }
    }
    let mut backoff = config.backoff_min;
    let mut streams = 0u64;
    loop {
        let established =
            match stream(&config, &*validate, &snap_tx, &status_tx, &mut streams).await {
                Ok(()) => {
                    debug!("snapshot stream closed by the operator");
                    true
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if msg.to_lowercase().contains("unauthenticated") {
                        warn!("the operator refused our snapshot token: {msg}");
                    } else {
                        debug!("snapshot stream: {msg}");
                    }
                    let established = status_tx.borrow().connected;
                    status_tx.send_modify(|st| st.last_error = Some(msg));
                    established
                }
            };
        status_tx.send_modify(|st| st.connected = false);
        if established {
            backoff = config.backoff_min;
        }
        // Full jitter keeps a fleet of proxies from reconnecting in lockstep.
        let jitter = rand::random::<f64>() * 0.5 + 0.5;
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(config.backoff_max);
    }
}

fn load_cache(path: &Path, validate: &Validate) -> Result<Option<pb::Snapshot>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let s = pb::Snapshot::decode(bytes.as_slice()).context("decoding")?;
    check::check(&s).map_err(|e| anyhow!("fails the consistency check: {}", e.join("; ")))?;
    validate(&s).map_err(|e| anyhow!("refused: {e}"))?;
    Ok(Some(s))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

async fn stream(
    config: &SubscriberConfig,
    validate: &Validate,
    snap_tx: &watch::Sender<Option<Arc<pb::Snapshot>>>,
    status_tx: &watch::Sender<SubscriptionStatus>,
    streams: &mut u64,
) -> Result<()> {
    let channel = Endpoint::from_shared(config.endpoint.clone())
        .with_context(|| format!("invalid endpoint {:?}", config.endpoint))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", config.endpoint))?;
    let bearer: MetadataValue<_> = format!("Bearer {}", config.token)
        .parse()
        .map_err(|_| anyhow!("the snapshot token has characters a header cannot carry"))?;
    let mut client =
        SnapshotServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        })
        .max_decoding_message_size(crate::MAX_MESSAGE_BYTES);

    let (req_tx, req_rx) = mpsc::channel::<SubscribeRequest>(4);
    let applied = || snap_tx.borrow().as_ref().and_then(|s| s.version);
    req_tx
        .send(SubscribeRequest {
            node_id: config.node_id.clone(),
            applied: applied(),
            response_nonce: String::new(),
            error_detail: String::new(),
            role: config.role.clone(),
        })
        .await
        .map_err(|_| anyhow!("request channel closed"))?;
    let mut inbound = client
        .subscribe(ReceiverStream::new(req_rx))
        .await
        .context("subscribing")?
        .into_inner();
    *streams += 1;
    status_tx.send_modify(|st| {
        st.connected = true;
        st.reconnects = streams.saturating_sub(1);
    });
    while let Some(resp) = inbound.message().await.context("receiving")? {
        let held = applied();
        let answer = |error: String, applied: Option<pb::Version>| SubscribeRequest {
            node_id: config.node_id.clone(),
            applied,
            response_nonce: resp.nonce.clone(),
            error_detail: error,
            role: config.role.clone(),
        };
        let verdict = match (&resp.snapshot, resp.version) {
            (None, _) | (_, None) => Err("response without snapshot or version".to_string()),
            (Some(s), Some(v)) => {
                if held.is_some_and(|h| version::cmp(&v, &h).is_lt()) {
                    Err(format!(
                        "stale: {} is older than the applied {}",
                        version::show(&v),
                        version::show_opt(held.as_ref())
                    ))
                } else if held.is_some_and(|h| version::cmp(&v, &h).is_eq()) {
                    Ok(None) // already serving it
                } else {
                    check::check(s)
                        .map_err(|e| format!("consistency check: {}", e.join("; ")))
                        .and_then(|()| validate(s))
                        .map(|()| Some((s.clone(), v)))
                }
            }
        };
        let reply = match verdict {
            Ok(None) => answer(String::new(), held),
            Ok(Some((mut s, v))) => {
                s.version = Some(v);
                if let Some(path) = &config.cache_path {
                    let bytes = s.encode_to_vec();
                    let path = path.clone();
                    // Persist before the ACK: an acknowledged version survives a crash.
                    let written = tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
                        .await
                        .map_err(|e| anyhow!("{e}"))
                        .and_then(|r| r);
                    if let Err(e) = written {
                        warn!("could not keep the snapshot on disk: {e:#}");
                    }
                }
                debug!(version = %version::show(&v), leases = s.leases.len(), "snapshot applied");
                snap_tx.send_replace(Some(Arc::new(s)));
                status_tx.send_modify(|st| {
                    st.applied = Some(v);
                    st.last_applied_at = Some(SystemTime::now());
                });
                answer(String::new(), Some(v))
            }
            Err(e) => {
                warn!(version = %version::show_opt(resp.version.as_ref()), "refusing snapshot: {e}");
                status_tx.send_modify(|st| {
                    st.nacks += 1;
                    st.last_error = Some(e.clone());
                });
                answer(e, held)
            }
        };
        req_tx
            .send(reply)
            .await
            .map_err(|_| anyhow!("request channel closed"))?;
    }
    Ok(())
}
