//! Where local mode keeps its files, and the small files beside the database.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Name of the state directory inside DIR.
pub const STATE_DIR: &str = ".keyway";

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
    /// The state database (SQLite; `-wal` and `-shm` files beside it).
    pub fn database(&self) -> PathBuf {
        self.state_dir.join("state.db")
    }
    /// The JSON state file of releases before the database; imported once.
    pub fn legacy_state(&self) -> PathBuf {
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

/// How proxies find a running local-mode operator (`operator.json`).
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

impl OperatorInfo {
    /// Reads `operator.json` of `paths`, with an error that says what to run.
    pub fn load(paths: &Paths) -> Result<Self> {
        let path = paths.operator_info();
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "reading {}; is `keyway-operator run --local {}` running?",
                path.display(),
                paths.dir.display()
            )
        })?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
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
