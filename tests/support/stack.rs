//! A whole Keyway on loopback: a local-mode operator, real `sshd` VMs (one
//! per lease, from `scripts/vm.sh`), the `keyway-proxy` gateway listening on
//! the pool's addresses, and the real OpenSSH client configured to reach it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::*;

/// One lease of the stack.
#[derive(Clone, Debug)]
pub struct LeaseSpec {
    pub name: String,
    pub user: String,
    /// The target accepts TCP and never says a word (a hung VM).
    pub silent: bool,
    /// Other key holders: their keys are access keys of this lease too.
    pub extra_keys: Vec<String>,
}

impl LeaseSpec {
    pub fn new(name: &str, user: &str) -> Self {
        LeaseSpec {
            name: name.into(),
            user: user.into(),
            silent: false,
            extra_keys: Vec::new(),
        }
    }

    /// A lease whose access keys are `user`'s and each of `others`'.
    pub fn with_keys(name: &str, user: &str, others: &[&str]) -> Self {
        LeaseSpec {
            extra_keys: others.iter().map(|s| s.to_string()).collect(),
            ..Self::new(name, user)
        }
    }

    /// A lease whose VM accepts connections and never answers.
    pub fn silent(name: &str, user: &str) -> Self {
        LeaseSpec {
            silent: true,
            ..Self::new(name, user)
        }
    }
}

/// What the operator assigned a lease.
#[derive(Clone, Debug)]
pub struct LeaseInfo {
    pub user: String,
    pub ip: String,
    pub hash: String,
    pub relay_trust: String,
    /// `host:port` of its VM's sshd.
    pub target: String,
}

/// A port free on loopback right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A running stack; everything stops when it is dropped.
pub struct Stack {
    pub tmp: tempfile::TempDir,
    /// The operator's directory of YAML.
    pub dir: PathBuf,
    pub pool_ips: Vec<String>,
    pub ssh_port: u16,
    pub metrics: SocketAddr,
    pub leases: BTreeMap<String, LeaseInfo>,
    pub operator: Option<Operator>,
    pub proxy: Option<Proc>,
    pub vms: BTreeMap<String, Proc>,
    /// Listeners standing in for hung VMs (never accepted from).
    pub silent: Vec<TcpListener>,
    specs: Vec<LeaseSpec>,
    proxy_args: Vec<String>,
    vm_port: u16,
}

impl Stack {
    /// Starts everything and waits until the gateway has a snapshot.
    pub fn start(pool_ips: &[&str], leases: &[LeaseSpec], proxy_args: &[&str]) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("local");
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all(tmp.path().join("keys"))?;
        std::fs::create_dir_all(tmp.path().join("vms"))?;
        let mut users: Vec<&str> = leases
            .iter()
            .flat_map(|l| {
                std::iter::once(l.user.as_str()).chain(l.extra_keys.iter().map(|k| k.as_str()))
            })
            .collect();
        users.sort();
        users.dedup();
        for u in users.iter().copied().chain(["stranger"]) {
            new_public_key(&tmp.path().join("keys"), u);
        }
        let ssh_port = free_port();
        let vm_port = free_port();
        let mut st = Stack {
            dir,
            pool_ips: pool_ips.iter().map(|s| s.to_string()).collect(),
            ssh_port,
            metrics: SocketAddr::from(([127, 0, 0, 1], free_port())),
            leases: BTreeMap::new(),
            operator: None,
            proxy: None,
            vms: BTreeMap::new(),
            silent: Vec::new(),
            specs: leases.to_vec(),
            proxy_args: proxy_args.iter().map(|s| s.to_string()).collect(),
            vm_port,
            tmp,
        };
        write_file(&st.dir.join("pool.yaml"), &pool_yaml("pool", pool_ips));
        st.write_leases(&[])?;
        st.start_operator()?;
        let n = leases.len();
        let rows = wait_for(Duration::from_secs(30), "every lease Ready", || {
            let rows = status_json(&st.dir).ok()?;
            (rows.len() == n && rows.iter().all(|r| r["phase"] == "Ready")).then_some(rows)
        })?;
        for (i, spec) in leases.iter().enumerate() {
            let r = rows
                .iter()
                .find(|r| r["name"] == spec.name.as_str())
                .context("lease missing from status")?;
            st.leases.insert(
                spec.name.clone(),
                LeaseInfo {
                    user: spec.user.clone(),
                    ip: r["ip"].as_str().unwrap_or_default().to_string(),
                    hash: r["leaseHash"].as_str().unwrap_or_default().to_string(),
                    relay_trust: r["relayTrust"].as_str().unwrap_or_default().to_string(),
                    target: vm_addr(i, vm_port),
                },
            );
        }
        for spec in leases {
            if spec.silent {
                let l = TcpListener::bind(st.leases[&spec.name].target.as_str())?;
                st.silent.push(l);
            } else {
                st.start_vm(&spec.name)?;
            }
        }
        st.start_proxy()?;
        Ok(st)
    }

    fn write_leases(&self, settled: &[&str]) -> Result<()> {
        let docs: Vec<String> = self
            .specs
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let keys: Vec<String> = std::iter::once(&l.user)
                    .chain(&l.extra_keys)
                    .map(|u| self.public_key(u))
                    .collect();
                lease_yaml_keys(
                    &l.name,
                    &l.user,
                    "pool",
                    &keys,
                    &vm_addr(i, self.vm_port),
                    settled.contains(&l.name.as_str()),
                )
            })
            .collect();
        write_file(&self.dir.join("leases.yaml"), &docs.join("---\n"));
        Ok(())
    }

    /// Marks leases settled (edits the YAML; the operator notices).
    pub fn settle(&self, names: &[&str]) -> Result<()> {
        self.write_leases(names)
    }

    pub fn start_operator(&mut self) -> Result<()> {
        let port = self.ssh_port.to_string();
        self.operator = Some(Operator::start_with(
            &self.dir,
            &["--public-ssh-port", &port],
        )?);
        Ok(())
    }

    fn start_vm(&mut self, name: &str) -> Result<()> {
        let info = self.leases[name].clone();
        let vms = self.tmp.path().join("vms");
        std::fs::create_dir_all(vms.join(name))?;
        std::fs::write(
            vms.join(name).join("authorized_keys"),
            format!("{}\n{}\n", info.relay_trust, self.public_key(&info.user)),
        )?;
        let (host, port) = info.target.rsplit_once(':').context("target")?;
        let mut cmd = Command::new(repo_root().join("scripts/vm.sh"));
        cmd.arg(&vms).args([name, host, port]);
        let mut proc = Proc::spawn(cmd, &vms.join(format!("{name}.log")))?;
        let addr: SocketAddr = info.target.parse()?;
        wait_for(
            Duration::from_secs(20),
            &format!("VM {name} listening"),
            || (!proc.running() || TcpStream::connect(addr).is_ok()).then_some(()),
        )?;
        if !proc.running() {
            bail!("VM {name} exited:\n{}", proc.output());
        }
        self.vms.insert(name.to_string(), proc);
        Ok(())
    }

    /// Starts (or restarts) the gateway and waits until it is ready.
    pub fn start_proxy(&mut self) -> Result<()> {
        self.proxy = None;
        let mut cmd = Command::new(bin("keyway-proxy"));
        cmd.arg("run").arg("--local").arg(&self.dir);
        for ip in &self.pool_ips {
            cmd.args(["--ssh-listen", &format!("{ip}:{}", self.ssh_port)]);
        }
        cmd.args(["--metrics-listen", &self.metrics.to_string()])
            .args(&self.proxy_args)
            .env("RUST_LOG", "info,keyway_proxy=debug");
        let log = self.tmp.path().join("proxy.log");
        // Appends across restarts, so a failure shows the whole story.
        let mut proc = Proc::spawn_append(cmd, &log)?;
        let metrics = self.metrics;
        wait_for(Duration::from_secs(30), "the gateway ready", || {
            if !proc.running() {
                return Some(());
            }
            http_get(metrics, "/readyz")
                .ok()
                .filter(|(code, _)| *code == 200)
                .map(|_| ())
        })?;
        if !proc.running() {
            bail!("keyway-proxy exited at start:\n{}", proc.output());
        }
        self.proxy = Some(proc);
        Ok(())
    }

    /// The gateway's log so far.
    pub fn proxy_log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("proxy.log")).unwrap_or_default()
    }

    pub fn key_path(&self, user: &str) -> PathBuf {
        self.tmp.path().join("keys").join(user)
    }

    pub fn public_key(&self, user: &str) -> String {
        std::fs::read_to_string(self.key_path(user).with_extension("pub"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// An ssh_config for `user`'s key(s) that trusts whatever host key it
    /// meets (the test's own gateway and VMs) and never prompts.
    pub fn ssh_config(&self, keys: &[&str]) -> PathBuf {
        let path = self
            .tmp
            .path()
            .join(format!("ssh_config.{}", keys.join("+")));
        if path.exists() {
            return path; // same keys, same text
        }
        let mut text = String::from(
            "Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  GlobalKnownHostsFile /dev/null\n  IdentitiesOnly yes\n  BatchMode yes\n  LogLevel ERROR\n  ConnectTimeout 10\n  ServerAliveInterval 5\n",
        );
        for k in keys {
            text.push_str(&format!("  IdentityFile {}\n", self.key_path(k).display()));
        }
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `ssh -F <config for keys> -p <gateway port> <args…>`.
    pub fn ssh(&self, keys: &[&str], args: &[&str]) -> Command {
        let mut c = Command::new("ssh");
        c.arg("-F")
            .arg(self.ssh_config(keys))
            .args(["-p", &self.ssh_port.to_string()])
            .args(args);
        c
    }

    /// Runs `ssh` with a deadline; returns its output.
    pub fn ssh_output(&self, keys: &[&str], args: &[&str]) -> Output {
        run_with_timeout(self.ssh(keys, args), Duration::from_secs(60))
    }

    /// The lease's hash@gateway for jumps.
    pub fn jump(&self, lease: &str) -> String {
        let l = &self.leases[lease];
        format!("{}@{}:{}", l.hash, l.ip, self.ssh_port)
    }

    /// The scraped metrics text.
    pub fn metrics_text(&self) -> String {
        http_get(self.metrics, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// The gateway's resident set, in KiB.
    pub fn proxy_rss_kib(&self) -> u64 {
        let pid = self.proxy.as_ref().and_then(|p| p.pid()).unwrap_or(0);
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// `ssh <ip> 'cat /dev/zero'` as `key`, whose stdout nobody reads: the
    /// client stops reading its channel once the pipe and its own window
    /// are full (a paused pager, a suspended ssh).
    pub fn stalled_reader(&self, key: &str, ip: &str) -> std::process::Child {
        use std::process::Stdio;
        self.ssh(&[key], &[ip, "cat /dev/zero"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Waits until stalled readers are fully stalled: no more bytes reach
    /// the clients and the gateway's footprint stopped growing. Returns the
    /// bytes moved to clients so far.
    pub fn wait_for_stall(&self) -> f64 {
        let mut last = (-1.0, 0u64);
        for _ in 0..200 {
            std::thread::sleep(Duration::from_millis(1000));
            let now = (
                self.metric("keyway_ssh_bytes_total", &["downstream"]),
                self.proxy_rss_kib(),
            );
            if now.0 == last.0 && now.0 > 0.0 && now.1.abs_diff(last.1) < 1024 {
                return now.0;
            }
            last = now;
        }
        panic!("the stalled channels never stopped moving data");
    }

    /// Sum of a metric's samples whose line contains every `needle`.
    pub fn metric(&self, name: &str, needles: &[&str]) -> f64 {
        metric_sum(&self.metrics_text(), name, needles)
    }
}

fn vm_addr(i: usize, port: u16) -> String {
    format!("127.0.20.{}:{port}", i + 1)
}

/// A minimal HTTP/1.0 GET (the tests' only HTTP client need).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let code = buf
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Ok((code, body))
}

/// Runs a command to completion, killing it after `timeout`. Output is read
/// while it runs, so a large output cannot block the child.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    use std::process::Stdio;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning a command");
    let pid = child.id().to_string();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let killer = std::thread::spawn(move || {
        if wait.recv_timeout(timeout).is_err() {
            let _ = Command::new("kill").args(["-9", &pid]).status();
        }
    });
    let out = child.wait_with_output().expect("collecting output");
    let _ = done.send(());
    let _ = killer.join();
    out
}

/// Text of stdout.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}
