//! Helpers for Keyway's end-to-end tests: start the real binaries, wait for
//! conditions with deadlines (never sleep-and-hope), and clean up on drop.
#![allow(clippy::unwrap_used)]

pub mod cluster;
pub mod stack;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Where the workspace's binaries are (`cargo build --workspace --bins` first).
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("KEYWAY_BIN_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(|t| PathBuf::from(t).join("debug")))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace --bins` first (or set KEYWAY_BIN_DIR)",
        path.display()
    );
    path
}

/// Polls `f` until it returns `Some`, or fails after `timeout` with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first line a spawned child writes to its piped stdout (which it
/// takes; the child keeps running).
pub fn first_line(child: &mut Child) -> String {
    use std::io::BufRead as _;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout is piped"))
        .read_line(&mut line)
        .expect("reading the child's stdout");
    line
}

/// Async flavour of [`wait_for`].
pub async fn wait_for_async<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process killed when dropped; its output goes to a log file.
pub struct Proc {
    child: Option<Child>,
    /// Where stdout and stderr go.
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with output to `log`.
    pub fn spawn(cmd: Command, log: &Path) -> Result<Self> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        Self::spawn_into(cmd, out, log)
    }

    /// Like [`Proc::spawn`], appending to the log.
    pub fn spawn_append(cmd: Command, log: &Path) -> Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        Self::spawn_into(cmd, out, log)
    }

    fn spawn_into(mut cmd: Command, out: std::fs::File, log: &Path) -> Result<Self> {
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Proc {
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// Sends SIGTERM and waits for the exit (SIGKILL after `grace`).
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Kills at once (SIGKILL), like a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Its process id while it has one.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// True while the process has not exited.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The log so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A local-mode operator on a directory.
pub struct Operator {
    /// The process.
    pub proc: Proc,
    /// Its directory.
    pub dir: PathBuf,
}

impl Operator {
    /// Starts `keyway-operator run --local dir` on an ephemeral gRPC port and
    /// waits until it has written its first state.
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_with(dir, &[])
    }

    /// [`Operator::start`] with extra flags.
    pub fn start_with(dir: &Path, extra: &[&str]) -> Result<Self> {
        let info = dir.join(".keyway/operator.json");
        let _ = std::fs::remove_file(&info);
        let mut cmd = Command::new(bin("keyway-operator"));
        cmd.args(["run", "--local"])
            .arg(dir)
            .args(["--rescan-secs", "5"]);
        if !extra.contains(&"--grpc-listen") {
            cmd.args(["--grpc-listen", "127.0.0.1:0"]);
        }
        cmd.args(extra)
            .env("RUST_LOG", "info,keyway_operator=debug");
        let log = dir.with_extension(format!("operator-{}.log", std::process::id()));
        let mut proc = Proc::spawn(cmd, &log)?;
        wait_for(Duration::from_secs(30), "operator.json", || {
            if !proc.running() {
                return Some(());
            }
            (info.exists() && dir.join(".keyway/state.db").exists()).then_some(())
        })?;
        if !proc.running() {
            bail!("operator exited at start:\n{}", proc.output());
        }
        Ok(Operator {
            proc,
            dir: dir.to_path_buf(),
        })
    }

    /// The gRPC endpoint it wrote.
    pub fn endpoint(&self) -> String {
        let info: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.dir.join(".keyway/operator.json")).unwrap())
                .unwrap();
        info["grpc"].as_str().unwrap().to_string()
    }

    /// The snapshot token.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join(".keyway/token"))
            .unwrap()
            .trim()
            .to_string()
    }
}

/// Runs `keyway-operator status --local dir -o json`.
pub fn status_json(dir: &Path) -> Result<Vec<serde_json::Value>> {
    let out = Command::new(bin("keyway-operator"))
        .args(["status", "--local"])
        .arg(dir)
        .args(["-o", "json"])
        .output()?;
    if !out.status.success() {
        bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Runs `keyway-operator status --local dir` (the table).
pub fn status_table(dir: &Path) -> Result<String> {
    let out = Command::new(bin("keyway-operator"))
        .args(["status", "--local"])
        .arg(dir)
        .output()?;
    if !out.status.success() {
        bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The local-mode state (from `.keyway/state.db`) as JSON; `Null` when there
/// is none yet.
pub fn state_json(dir: &Path) -> serde_json::Value {
    keyway_state::read(&keyway_state::Paths::new(dir))
        .ok()
        .flatten()
        .and_then(|st| serde_json::to_value(st).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Writes a file atomically (rename), as editors and config tools do, so the
/// operator never reads half a file.
pub fn write_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A fresh ed25519 OpenSSH public key line (from ssh-keygen, the real tool).
pub fn new_public_key(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .status()
        .expect("ssh-keygen (Debian openssh-client) is needed; `make deps` installs it");
    assert!(st.success());
    std::fs::read_to_string(path.with_extension("pub"))
        .unwrap()
        .trim()
        .to_string()
}

/// YAML of an IPPool.
pub fn pool_yaml(name: &str, addresses: &[&str]) -> String {
    let list: Vec<String> = addresses
        .iter()
        .map(|a| format!("    - \"{a}\"\n"))
        .collect();
    format!(
        "apiVersion: keyway.dev/v1alpha1\nkind: IPPool\nmetadata:\n  name: {name}\nspec:\n  addresses:\n{}",
        list.concat()
    )
}

/// YAML of a VMLease.
pub fn lease_yaml(
    name: &str,
    user: &str,
    pool: &str,
    key: &str,
    target: &str,
    settled: bool,
) -> String {
    lease_yaml_keys(name, user, pool, &[key.to_string()], target, settled)
}

/// [`lease_yaml`] with several access keys.
pub fn lease_yaml_keys(
    name: &str,
    user: &str,
    pool: &str,
    keys: &[String],
    target: &str,
    settled: bool,
) -> String {
    let keys: String = keys.iter().map(|k| format!("    - \"{k}\"\n")).collect();
    format!(
        "apiVersion: keyway.dev/v1alpha1\nkind: VMLease\nmetadata:\n  name: {name}\nspec:\n  user: {user}\n  poolRef: {pool}\n  accessPublicKeys:\n{keys}  target:\n    address: \"{target}\"\n  settled: {settled}\n"
    )
}

/// YAML of a VMLease whose target is a provider agent (`peer` at `addrs`);
/// append `  settled: …` to settle it.
pub fn provider_lease_yaml(
    name: &str,
    user: &str,
    key: &str,
    peer: &str,
    addrs: &[String],
) -> String {
    let list: String = addrs
        .iter()
        .map(|a| format!("        - \"{a}\"\n"))
        .collect();
    format!(
        "apiVersion: keyway.dev/v1alpha1\nkind: VMLease\nmetadata:\n  name: {name}\nspec:\n  user: {user}\n  poolRef: pool\n  accessPublicKeys:\n    - \"{key}\"\n  target:\n    provider:\n      peerId: \"{peer}\"\n      addresses:\n{list}"
    )
}

/// The agent peer id of an identity file (created if missing), from
/// `keyway-proxy agent --print-peer-id`.
pub fn agent_peer_id(identity: &Path) -> String {
    let out = Command::new(bin("keyway-proxy"))
        .args(["agent", "--print-peer-id", "--identity"])
        .arg(identity)
        .output()
        .expect("running keyway-proxy agent --print-peer-id");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Sum of a scrape's samples of metric `name` whose line contains every
/// `needle`.
pub fn metric_sum(scrape: &str, name: &str, needles: &[&str]) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// PEM files of a test CA and a server certificate it signs.
pub struct TlsFiles {
    /// The server certificate (SANs: localhost, 127.0.0.1).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The CA certificate clients trust.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// `keyway-proxy run` flags serving CONNECT with this certificate on
    /// 127.0.0.1:`port`.
    pub fn proxy_args(&self, port: u16) -> Vec<String> {
        vec![
            "--https-listen".into(),
            format!("127.0.0.1:{port}"),
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
        ]
    }
}

/// Makes a CA and a server certificate in `dir` with the real openssl
/// (webpki refuses a CA certificate used as the server's own, so two steps).
pub fn make_tls(dir: &Path) -> TlsFiles {
    let script = "set -e
        ec='-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'
        openssl req -x509 $ec -days 1 -subj /CN=keyway-test-ca -keyout ca.key -out ca.crt
        openssl req $ec -subj /CN=keyway-test-server -keyout tls.key -out tls.csr
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' >leaf.ext
        openssl x509 -req -days 1 -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -extfile leaf.ext -out tls.crt";
    let out = Command::new("bash")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .expect("bash and openssl (Debian openssl; `make deps` installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    TlsFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        ca: dir.join("ca.crt"),
    }
}

/// Prints a benchmark's Markdown table and appends it to `$KEYWAY_BENCH_OUT`
/// (BENCHMARKS.md in the making) when `make bench` set it.
pub fn bench_report(table: &str) {
    use std::io::Write;
    print!("{table}");
    if let Some(path) = std::env::var_os("KEYWAY_BENCH_OUT") {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", Path::new(&path).display()));
        f.write_all(table.as_bytes()).unwrap();
    }
}
