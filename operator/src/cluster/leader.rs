//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! kube has no leader election of its own; the crates its docs point to
//! (`kube-leader-election` 0.44, `kube-coordinate` 2.0) are built on older kube
//! majors than the kube 5 we use, so this is the client-go algorithm, small
//! enough to read in one sitting:
//!
//! - a candidate takes the Lease when it does not exist, has no holder, or its
//!   record has not changed for the record's own `leaseDurationSeconds` as
//!   measured by the candidate's clock (never by comparing wall clocks across
//!   machines);
//! - every write is a `replace` carrying the `resourceVersion` that was read,
//!   so two candidates racing for one expired Lease cannot both win (the loser
//!   gets 409 Conflict);
//! - the holder renews every retry period and steps down (the process exits)
//!   when it has not renewed for the renew deadline, which is shorter than the
//!   lease duration, so it stops before anyone else can take over.
//!
//! The Lease also carries the snapshot writer epoch (`keyway.dev/epoch`): each
//! new leader takes one higher than the last, so proxies that followed the old
//! leader accept the new leader's snapshots (versions never go backwards).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// The annotation holding the snapshot writer epoch of the current leader.
pub const EPOCH_ANNOTATION: &str = "keyway.dev/epoch";

/// Timing and identity of a candidate.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How long a silent leader keeps the Lease.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it steps down.
    pub renew_deadline: Duration,
    /// How often candidates retry and the leader renews.
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// Checks the client-go rule `lease_duration > renew_deadline > retry_period`.
    pub fn check(&self) -> Result<()> {
        anyhow::ensure!(
            self.lease_duration > self.renew_deadline && self.renew_deadline > self.retry_period,
            "leader election needs lease duration ({:?}) > renew deadline ({:?}) > retry period ({:?})",
            self.lease_duration,
            self.renew_deadline,
            self.retry_period
        );
        Ok(())
    }
}

/// What a candidate should do with the Lease it read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease yet: create it, holding it.
    Create,
    /// Take it over (no holder, or the holder went silent).
    Take,
    /// We hold it: renew.
    Renew,
    /// Someone else holds it and is alive.
    Wait {
        /// The holder's identity.
        holder: String,
    },
}

/// The client-go rule, pure. `unchanged_for` is how long this candidate has
/// seen the same record (same resourceVersion).
pub fn decide(lease: Option<&Lease>, me: &str, unchanged_for: Duration) -> Decision {
    let Some(lease) = lease else {
        return Decision::Create;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.unwrap_or_default();
    if holder.is_empty() {
        return Decision::Take;
    }
    if holder == me {
        return Decision::Renew;
    }
    let duration =
        Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15));
    if unchanged_for >= duration {
        Decision::Take
    } else {
        Decision::Wait { holder }
    }
}

/// The epoch the next leader writes: above the last leader's and never below
/// the wall clock in seconds (so a lost Lease object cannot reset it).
pub fn next_epoch(lease: Option<&Lease>, now_secs: u64) -> u64 {
    let last = lease
        .and_then(|l| l.metadata.annotations.as_ref())
        .and_then(|a| a.get(EPOCH_ANNOTATION))
        .and_then(|e| e.parse::<u64>().ok())
        .unwrap_or(0);
    (last + 1).max(now_secs)
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn duration_secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// Held leadership: the epoch this leader writes with, and a receiver that
/// turns `true` when leadership is lost.
pub struct Leadership {
    /// Snapshot writer epoch.
    pub epoch: u64,
    /// Flips to `true` when the leader could not renew in time or saw
    /// someone else holding the Lease.
    pub lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
    api: Api<Lease>,
    config: LeaderConfig,
}

impl Leadership {
    /// Stops renewing and hands the Lease back so a standby takes over at once
    /// (graceful shutdown; a crash instead waits out the lease duration).
    pub async fn release(self) {
        self.task.abort();
        let Ok(mut lease) = self.api.get(&self.config.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(&self.config.identity) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now_micro());
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(lease = %self.config.name, "leadership released"),
            Err(e) => warn!(lease = %self.config.name, "releasing leadership: {e}"),
        }
    }
}

/// Blocks until this replica holds the Lease, then renews it in the
/// background. `on_wait` is told who holds it while waiting.
pub async fn acquire(api: Api<Lease>, config: LeaderConfig) -> Result<Leadership> {
    config.check()?;
    let mut seen: Option<(String, Instant)> = None;
    let mut last_holder = String::new();
    loop {
        match try_acquire(&api, &config, &mut seen).await {
            Ok(Some((lease, epoch))) => {
                info!(lease = %config.name, identity = %config.identity, epoch, "became the leader");
                let (lost_tx, lost) = watch::channel(false);
                let task = tokio::spawn(renew_loop(api.clone(), config.clone(), lease, lost_tx));
                return Ok(Leadership {
                    epoch,
                    lost,
                    task,
                    api,
                    config,
                });
            }
            Ok(None) => {}
            Err(AcquireError::Wait(holder)) => {
                if holder != last_holder {
                    info!(lease = %config.name, %holder, "standing by: another replica leads");
                    last_holder = holder;
                }
            }
            Err(AcquireError::Api(e)) => warn!(lease = %config.name, "leader election: {e:#}"),
        }
        tokio::time::sleep(config.retry_period).await;
    }
}

enum AcquireError {
    Wait(String),
    Api(anyhow::Error),
}

impl From<kube::Error> for AcquireError {
    fn from(e: kube::Error) -> Self {
        AcquireError::Api(anyhow::Error::new(e))
    }
}

/// One attempt: `Ok(Some)` when we now hold it, `Ok(None)` when we lost a race.
async fn try_acquire(
    api: &Api<Lease>,
    config: &LeaderConfig,
    seen: &mut Option<(String, Instant)>,
) -> Result<Option<(Lease, u64)>, AcquireError> {
    let current = api.get_opt(&config.name).await?;
    let rv = current
        .as_ref()
        .and_then(|l| l.metadata.resource_version.clone())
        .unwrap_or_default();
    let unchanged_for = match seen {
        Some((old, at)) if *old == rv => at.elapsed(),
        _ => {
            *seen = Some((rv, Instant::now()));
            Duration::ZERO
        }
    };
    let now_secs = u64::try_from(Timestamp::now().as_second()).unwrap_or(0);
    let epoch = next_epoch(current.as_ref(), now_secs);
    let decision = decide(current.as_ref(), &config.identity, unchanged_for);
    debug!(?decision, "leader election");
    let mine = |prev: Option<&Lease>| -> Lease {
        let transitions = prev
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.lease_transitions)
            .unwrap_or(0);
        let mut annotations: BTreeMap<String, String> = prev
            .and_then(|l| l.metadata.annotations.clone())
            .unwrap_or_default();
        annotations.insert(EPOCH_ANNOTATION.into(), epoch.to_string());
        Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                namespace: Some(config.namespace.clone()),
                resource_version: prev.and_then(|l| l.metadata.resource_version.clone()),
                annotations: Some(annotations),
                labels: prev.and_then(|l| l.metadata.labels.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(duration_secs(config.lease_duration)),
                acquire_time: Some(now_micro()),
                renew_time: Some(now_micro()),
                lease_transitions: Some(if prev.is_some() { transitions + 1 } else { 0 }),
                ..Default::default()
            }),
        }
    };
    let result = match decision {
        Decision::Wait { holder } => return Err(AcquireError::Wait(holder)),
        Decision::Create => api.create(&PostParams::default(), &mine(None)).await,
        // A replica restarted with our identity: take over as a new term
        // (new epoch) rather than trusting a renewal loop that died with it.
        Decision::Take | Decision::Renew => {
            api.replace(
                &config.name,
                &PostParams::default(),
                &mine(current.as_ref()),
            )
            .await
        }
    };
    match result {
        Ok(lease) => Ok(Some((lease, epoch))),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn renew_loop(
    api: Api<Lease>,
    config: LeaderConfig,
    mut held: Lease,
    lost: watch::Sender<bool>,
) {
    let mut last_renewed = Instant::now();
    loop {
        tokio::time::sleep(config.retry_period).await;
        let mut next = held.clone();
        if let Some(spec) = next.spec.as_mut() {
            spec.renew_time = Some(now_micro());
        }
        match api
            .replace(&config.name, &PostParams::default(), &next)
            .await
        {
            Ok(l) => {
                held = l;
                last_renewed = Instant::now();
            }
            Err(e) => {
                // A conflict means the record changed under us: read it to see
                // whether we still hold it.
                warn!(lease = %config.name, "renewing leadership: {e}");
                match api.get_opt(&config.name).await {
                    Ok(Some(l))
                        if l.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                            == Some(config.identity.as_str()) =>
                    {
                        held = l;
                    }
                    Ok(_) => {
                        warn!(lease = %config.name, "another replica holds the Lease now");
                        lost.send_replace(true);
                        return;
                    }
                    Err(e) => warn!(lease = %config.name, "reading the Lease: {e}"),
                }
            }
        }
        if last_renewed.elapsed() > config.renew_deadline {
            warn!(lease = %config.name, deadline = ?config.renew_deadline, "could not renew leadership in time; stepping down");
            lost.send_replace(true);
            return;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, epoch: Option<&str>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                annotations: epoch
                    .map(|e| BTreeMap::from([(EPOCH_ANNOTATION.to_string(), e.to_string())])),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: Some(10),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn decisions_follow_client_go() {
        let s = Duration::from_secs;
        assert_eq!(decide(None, "a", s(0)), Decision::Create);
        assert_eq!(decide(Some(&lease(None, None)), "a", s(0)), Decision::Take);
        assert_eq!(
            decide(Some(&lease(Some("a"), None)), "a", s(0)),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), None)), "a", s(9)),
            Decision::Wait { holder: "b".into() }
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), None)), "a", s(10)),
            Decision::Take
        );
    }

    #[test]
    fn epochs_only_grow() {
        assert_eq!(next_epoch(None, 100), 100);
        assert_eq!(next_epoch(Some(&lease(Some("b"), Some("500"))), 100), 501);
        assert_eq!(next_epoch(Some(&lease(Some("b"), Some("50"))), 100), 100);
        assert_eq!(next_epoch(Some(&lease(Some("b"), Some("junk"))), 100), 100);
    }

    #[test]
    fn config_is_checked() {
        let mut c = LeaderConfig {
            namespace: "n".into(),
            name: "l".into(),
            identity: "a".into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        };
        assert!(c.check().is_ok());
        c.renew_deadline = Duration::from_secs(20);
        assert!(c.check().is_err());
    }
}
