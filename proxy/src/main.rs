//! `keyway-proxy`: Keyway's data plane. `run` is the SSH gateway; `snapshot`
//! subscribes to the operator exactly as the gateway does and prints what it
//! receives; `agent` is the provider side of `/xe/tunnel/2.0.0`, on the same
//! subscription.

/// jemalloc rather than glibc's malloc: with millions of small objects built
/// on several threads (a snapshot load decodes on one and indexes on
/// another), glibc's per-thread arenas grow a page per system call and keep
/// freed memory (docs/operations.md, "Memory and scale").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod agent;
mod gateway;
mod keys;
mod metrics;
mod routes;
mod run;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use keyway_snapshot::client::{SubscriberConfig, subscribe};
use keyway_snapshot::pb;

#[derive(Parser)]
#[command(name = "keyway-proxy", version, about = "Keyway's data plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the SSH gateway: route by (destination IP, key), by lease hash and
    /// by SshRoute, relay sessions, forward direct-tcpip.
    #[command(
        after_help = "Examples:\n  keyway-proxy run --local examples/local\n  keyway-proxy run --endpoint http://keyway-operator:7070 --token-file /etc/keyway/token \\\n      --relay-ca-key /etc/keyway/relay-ca --host-key /var/lib/keyway/host_key"
    )]
    Run(Box<run::RunArgs>),
    /// Run the provider agent: serve /xe/tunnel/2.0.0 over libp2p to the VMs
    /// on this host, for leases whose target is this agent's peer id.
    #[command(
        after_help = "Examples:\n  keyway-proxy agent --local examples/local --forward 127.0.0.1:22\n  keyway-proxy agent --print-peer-id --identity /var/lib/keyway/agent-identity\n  keyway-proxy agent --endpoint https://keyway-operator:7070 --token-file /etc/keyway/token \\\n      --ca-file /etc/keyway/ca.crt --listen /ip4/0.0.0.0/tcp/4001 --forward 127.0.0.1:22"
    )]
    Agent(Box<agent::AgentArgs>),
    /// Subscribe to the operator's routing snapshot and print each version applied.
    #[command(
        after_help = "Examples:\n  keyway-proxy snapshot --local examples/local\n  keyway-proxy snapshot --local examples/local --follow"
    )]
    Snapshot {
        #[command(flatten)]
        source: Source,
        /// Keep printing every new version until interrupted.
        #[arg(long)]
        follow: bool,
        /// Print the snapshot as JSON instead of a summary.
        #[arg(long)]
        json: bool,
        /// Give up after this many seconds without a snapshot.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
    },
}

/// Where the operator is and how to authenticate.
#[derive(clap::Args)]
pub struct Source {
    /// Local mode: read the operator's address and token from DIR/.keyway/.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["endpoint", "token_file"])]
    local: Option<PathBuf>,
    /// Operator snapshot endpoint, e.g. http://127.0.0.1:7070.
    #[arg(long, value_name = "URL", requires = "token_file")]
    endpoint: Option<String>,
    /// File holding the snapshot token.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Name this subscriber reports to the operator.
    #[arg(long)]
    node_id: Option<String>,
    /// PEM CA certificate that signed the operator's TLS certificate (for an
    /// https:// endpoint).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
}

impl Source {
    /// `DIR/.keyway/<local>` in local mode, else `global`: where a process
    /// keeps its state files when no flag names them.
    pub fn state_path(&self, local: &str, global: &str) -> PathBuf {
        match &self.local {
            Some(d) => d.join(".keyway").join(local),
            None => PathBuf::from(global),
        }
    }

    /// The subscription every data-plane process makes: endpoint and token
    /// resolved (so a missing operator fails at start), `--node-id` or
    /// `default_node_id`, the CA read.
    pub fn subscriber(
        &self,
        role: &str,
        default_node_id: impl FnOnce() -> String,
        cache_path: Option<PathBuf>,
    ) -> Result<SubscriberConfig> {
        let (endpoint, token) = self.resolve()?;
        Ok(SubscriberConfig {
            endpoint,
            token,
            node_id: self.node_id.clone().unwrap_or_else(default_node_id),
            role: role.into(),
            cache_path,
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            ca_pem: self.ca_pem()?,
            reopen_after_full_bytes: keyway_snapshot::client::DEFAULT_REOPEN_AFTER_FULL_BYTES,
        })
    }

    /// The CA to verify an https:// operator with, if one is configured.
    pub fn ca_pem(&self) -> Result<Option<Vec<u8>>> {
        self.ca_file
            .as_ref()
            .map(|p| std::fs::read(p).with_context(|| format!("reading the CA {}", p.display())))
            .transpose()
    }

    pub fn resolve(&self) -> Result<(String, String)> {
        let read_token = |p: &PathBuf| -> Result<String> {
            Ok(std::fs::read_to_string(p)
                .with_context(|| format!("reading the token from {}", p.display()))?
                .trim()
                .to_string())
        };
        if let Some(dir) = &self.local {
            let paths = keyway_state::Paths::new(dir);
            let endpoint = keyway_state::OperatorInfo::load(&paths)?.grpc;
            return Ok((endpoint, read_token(&paths.token())?));
        }
        match (&self.endpoint, &self.token_file) {
            (Some(e), Some(t)) => Ok((e.clone(), read_token(t)?)),
            _ => anyhow::bail!(
                "say where the operator is: --local DIR, or --endpoint URL --token-file FILE"
            ),
        }
    }
}

fn summary(s: &pb::Snapshot) -> String {
    let v = s.version.unwrap_or_default();
    let mut out = format!(
        "snapshot e{}.v{}: {} lease(s), {} route(s)\n",
        v.epoch,
        v.version,
        s.leases.len(),
        s.routes.len()
    );
    for l in &s.leases {
        let target = match &l.target {
            Some(pb::lease::Target::Address(a)) => a.clone(),
            Some(pb::lease::Target::Provider(p)) => format!("provider {}", p.peer_id),
            None => "-".into(),
        };
        out.push_str(&format!(
            "  {}/{:<16} user={:<8} ip={:<15} hash={}… keys={} -> {}\n",
            l.namespace,
            l.name,
            l.user,
            l.ip,
            &hex::encode(&l.lease_hash)[..12.min(l.lease_hash.len() * 2)],
            l.access_keys.len(),
            target
        ));
    }
    for r in &s.routes {
        out.push_str(&format!("  route {}/{}: {}\n", r.namespace, r.name, r.from));
    }
    out
}

async fn snapshot_cmd(source: Source, follow: bool, json: bool, timeout: Duration) -> Result<()> {
    let config = source.subscriber("cli", || "keyway-proxy-snapshot".into(), None)?;
    let (sub, task) = subscribe(config, |_| Ok(()));
    let mut rx = sub.snapshot.clone();
    let mut last = None;
    loop {
        let next = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| s.as_ref().map(|s| s.version) != last),
        )
        .await;
        let snap = match next {
            Ok(Ok(s)) => s.clone(),
            Ok(Err(_)) => anyhow::bail!("the subscription ended"),
            Err(_) if follow && last.is_some() => continue,
            Err(_) => {
                let err = sub
                    .status
                    .borrow()
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "no answer".into());
                anyhow::bail!("no snapshot within {timeout:?}: {err}");
            }
        };
        let Some(held) = snap else { continue };
        last = Some(held.version);
        // A tool's copy: the whole snapshot, once per version shown.
        let snap = held.to_snapshot();
        let text = if json {
            format!("{}\n", serde_json::to_string_pretty(&to_json(&snap))?)
        } else {
            summary(&snap)
        };
        if !emit(&text)? {
            break; // the reader went away (`| head`)
        }
        if !follow {
            break;
        }
    }
    task.abort();
    Ok(())
}

/// Writes to stdout and flushes; `Ok(false)` when the pipe was closed.
fn emit(text: &str) -> Result<bool> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn to_json(s: &pb::Snapshot) -> serde_json::Value {
    let v = s.version.unwrap_or_default();
    serde_json::json!({
        "epoch": v.epoch,
        "version": v.version,
        "leases": s.leases.iter().map(|l| serde_json::json!({
            "namespace": l.namespace, "name": l.name, "user": l.user, "ip": l.ip, "pool": l.pool,
            "leaseHash": hex::encode(&l.lease_hash),
            "fingerprints": l.access_keys.iter().map(|k| k.fingerprint.clone()).collect::<Vec<_>>(),
            "target": match &l.target {
                Some(pb::lease::Target::Address(a)) => serde_json::json!({"address": a}),
                Some(pb::lease::Target::Provider(p)) => serde_json::json!({"provider": {"peerId": p.peer_id, "addresses": p.addresses}}),
                None => serde_json::Value::Null,
            },
            "upstreamUser": l.upstream_user,
        })).collect::<Vec<_>>(),
        "routes": s.routes.iter().map(|r| serde_json::json!({"namespace": r.namespace, "name": r.name, "from": r.from})).collect::<Vec<_>>(),
    })
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // libp2p's QUIC brings rustls' aws-lc-rs provider beside our ring one;
    // with two compiled in rustls picks neither by itself, so say which.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The audit trail (gateway/audit.rs) is on unless RUST_LOG says
    // otherwise; colours only on a terminal, so log files stay parseable.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,keyway_audit=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(*args).await,
        Command::Agent(args) => agent::run(*args).await,
        Command::Snapshot {
            source,
            follow,
            json,
            timeout_secs,
        } => {
            snapshot_cmd(
                source,
                follow,
                json,
                Duration::from_secs(timeout_secs.max(1)),
            )
            .await
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyway-proxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
