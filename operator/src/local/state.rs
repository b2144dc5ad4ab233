//! Local mode's files under `DIR/.keyway/`: the state file (the truth for
//! allocations, written atomically), the snapshot token, the relay CA and the
//! operator's address for proxies to find.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use keyway_crds::{
    IPPoolSpec, IPPoolStatus, SshRouteSpec, SshRouteStatus, VMLeaseSpec, VMLeaseStatus,
};
use serde::{Deserialize, Serialize};

use super::loader::Problem;

/// Name of the state directory inside DIR.
pub const STATE_DIR: &str = ".keyway";
/// Current state file format.
pub const FORMAT: u32 = 1;

/// Paths of everything local mode keeps.
#[derive(Clone, Debug)]
pub struct Paths {
    /// DIR.
    pub dir: PathBuf,
    /// DIR/.keyway.
    pub state_dir: PathBuf,
}

impl Paths {
    /// Paths for a local-mode directory.
    pub fn new(dir: &Path) -> Self {
        Paths {
            dir: dir.to_path_buf(),
            state_dir: dir.join(STATE_DIR),
        }
    }
    /// The state file.
    pub fn state(&self) -> PathBuf {
        self.state_dir.join("state.json")
    }
    /// The snapshot token subscribers must present.
    pub fn token(&self) -> PathBuf {
        self.state_dir.join("token")
    }
    /// The relay CA private key (OpenSSH format).
    pub fn relay_ca(&self) -> PathBuf {
        self.state_dir.join("relay-ca")
    }
    /// Where the operator says how to reach it.
    pub fn operator_info(&self) -> PathBuf {
        self.state_dir.join("operator.json")
    }
    /// Held while an operator runs on this directory.
    pub fn lock(&self) -> PathBuf {
        self.state_dir.join("lock")
    }
}

/// A lease as local mode remembers it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRecord {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Random identity given when first seen; the lease hash derives from it.
    pub uid: String,
    /// When first seen (unix ms); older leases win conflicts.
    pub created_ms: u64,
    /// File it was last read from.
    pub file: String,
    /// Bumped whenever the spec in the file changes.
    pub generation: i64,
    /// The spec as last read (valid or not), to detect edits.
    pub seen_spec: serde_json::Value,
    /// The last valid spec, kept when an edit is rejected or the file breaks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<VMLeaseSpec>,
    /// Status as last computed.
    #[serde(default)]
    pub status: VMLeaseStatus,
}

/// A pool as local mode remembers it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolRecord {
    /// Name.
    pub name: String,
    /// When first seen (unix ms).
    pub created_ms: u64,
    /// File it was last read from.
    pub file: String,
    /// Bumped whenever the spec in the file changes.
    pub generation: i64,
    /// The spec as last read.
    pub seen_spec: serde_json::Value,
    /// The last valid spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<IPPoolSpec>,
    /// Status as last computed.
    #[serde(default)]
    pub status: IPPoolStatus,
}

/// A route as local mode remembers it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteRecord {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// When first seen (unix ms).
    pub created_ms: u64,
    /// File it was last read from.
    pub file: String,
    /// Bumped whenever the spec in the file changes.
    pub generation: i64,
    /// The spec as last read.
    pub seen_spec: serde_json::Value,
    /// The spec as last read, if it parsed as an SshRoute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<SshRouteSpec>,
    /// Status as last computed.
    #[serde(default)]
    pub status: SshRouteStatus,
}

/// Something the operator did, kept for `status` (the last few hundred).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EventRecord {
    /// RFC 3339 time.
    pub time: String,
    /// `Normal` or `Warning`.
    pub severity: String,
    /// CamelCase reason.
    pub reason: String,
    /// `Kind namespace/name`.
    pub object: String,
    /// What happened.
    pub message: String,
}

/// A subscriber as last seen, for `status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SubscriberRecord {
    /// Node id it gave.
    pub node_id: String,
    /// Role it gave.
    pub role: String,
    /// Connected now.
    pub connected: bool,
    /// Version it acknowledged last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked: Option<String>,
    /// NACKs it sent.
    pub nacks: u64,
    /// Its last NACK's error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Snapshot bytes sent to it (full snapshots and deltas).
    #[serde(default)]
    pub bytes_sent: u64,
}

/// The routing snapshot as last published.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRecord {
    /// `e<epoch>.v<version>`.
    pub version: String,
    /// Leases in it.
    pub leases: usize,
    /// Routes in it.
    pub routes: usize,
    /// Subscribers.
    pub subscribers: Vec<SubscriberRecord>,
}

/// Everything local mode persists. Allocations live in the lease statuses; on
/// restart they are restored before anything new is allocated.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StateFile {
    /// File format.
    pub format: u32,
    /// Writer epoch of the last run; the next run's epoch is larger.
    pub epoch: u64,
    /// Pools by name.
    #[serde(default)]
    pub pools: BTreeMap<String, PoolRecord>,
    /// Leases by `namespace/name`.
    #[serde(default)]
    pub leases: BTreeMap<String, LeaseRecord>,
    /// Routes by `namespace/name`.
    #[serde(default)]
    pub routes: BTreeMap<String, RouteRecord>,
    /// Problems found in the directory on the last scan.
    #[serde(default)]
    pub problems: Vec<Problem>,
    /// Recent events, oldest first.
    #[serde(default)]
    pub events: Vec<EventRecord>,
    /// The snapshot as last published.
    #[serde(default)]
    pub snapshot: Option<SnapshotRecord>,
}

impl StateFile {
    /// Reads the state file; a missing file is an empty state. A corrupt one is
    /// an error: overwriting it would forget every allocation.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(StateFile {
                    format: FORMAT,
                    ..Default::default()
                });
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let state: StateFile = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is corrupt; it holds every allocation, so it is not overwritten. \
                 Fix or move it away (all IPs are then allocated afresh)",
                path.display()
            )
        })?;
        if state.format != FORMAT {
            bail!(
                "{} has format {}, this operator reads format {FORMAT}",
                path.display(),
                state.format
            );
        }
        Ok(state)
    }

    /// Writes the state file atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).context("encoding state")?;
        write_atomic(path, &bytes, 0o644)
    }
}

/// Writes a file so readers see the old or the new content, never a mix, and
/// the new content survives a crash once this returns.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().context("path has no parent directory")?;
    let name = path.file_name().context("path has no file name")?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}

/// Creates the state directory (mode 0700: it holds secrets).
pub fn ensure_state_dir(paths: &Paths) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&paths.state_dir)
        .with_context(|| format!("creating {}", paths.state_dir.display()))
}

/// Reads the snapshot token, creating a random one on first run.
pub fn load_or_create_token(path: &Path) -> Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => bail!("{} is empty; delete it to get a new token", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    write_atomic(path, format!("{token}\n").as_bytes(), 0o600)?;
    Ok(token)
}

/// Reads the relay CA (OpenSSH, or ed25519 in PKCS#8 PEM), creating an
/// ed25519 one on first run. Returns its public key as an OpenSSH line.
pub fn load_or_create_relay_ca(path: &Path) -> Result<String> {
    use ssh_key::{Algorithm, LineEnding, PrivateKey, getrandom::SysRng, rand_core::UnwrapErr};
    let key = match std::fs::read_to_string(path) {
        Ok(text) => {
            let public = crate::relay_ca::public_key(&text)
                .with_context(|| format!("the relay CA {}", path.display()))?;
            return trust_line(&public);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = PrivateKey::random(&mut UnwrapErr(SysRng), Algorithm::Ed25519)
                .context("generating the relay CA")?;
            key.set_comment("keyway-relay-ca");
            let pem = key
                .to_openssh(LineEnding::LF)
                .context("encoding the relay CA")?;
            write_atomic(path, pem.as_bytes(), 0o600)?;
            let public = key
                .public_key()
                .to_openssh()
                .context("encoding the relay CA")?;
            write_atomic(
                &path.with_extension("pub"),
                format!("{public}\n").as_bytes(),
                0o644,
            )?;
            key
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    trust_line(key.public_key())
}

/// The relay CA's public key as the bare OpenSSH line (no comment) that
/// goes into `status.relayTrust`.
pub fn trust_line(public: &ssh_key::PublicKey) -> Result<String> {
    let mut public = public.clone();
    public.set_comment("");
    Ok(public
        .to_openssh()
        .context("encoding the relay CA")?
        .trim()
        .to_string())
}

/// How proxies find a running local-mode operator.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OperatorInfo {
    /// gRPC endpoint, `http://127.0.0.1:7070`.
    pub grpc: String,
    /// Process id.
    pub pid: u32,
    /// Writer epoch.
    pub epoch: u64,
}
