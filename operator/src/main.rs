//! `keyway-operator`: allocates pooled IPs, writes status, and streams routing
//! snapshots to proxies. `run --local DIR` needs no cluster.

/// jemalloc rather than glibc's malloc: with millions of small objects built
/// on several threads (a snapshot load decodes on one and indexes on
/// another), glibc's per-thread arenas grow a page per system call and keep
/// freed memory (docs/operations.md, "Memory and scale").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "keyway-operator",
    version,
    about = "Keyway's control plane: pooled-IP allocation and routing snapshots"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator.
    #[command(
        after_help = "Examples:\n  keyway-operator run --local examples/local\n  keyway-operator run --local /srv/keyway --grpc-listen 127.0.0.1:7070\n  keyway-operator run --relay-ca-key /etc/keyway/relay-ca/key --token-secret keyway-snapshot-token"
    )]
    Run {
        /// Local mode: read IPPool/VMLease/SshRoute YAML from DIR, keep state in DIR/.keyway/.
        #[arg(long, value_name = "DIR")]
        local: Option<PathBuf>,
        /// Address of the snapshot gRPC server (local mode defaults to loopback).
        #[arg(long, value_name = "ADDR")]
        grpc_listen: Option<SocketAddr>,
        /// Port users reach the proxy's SSH listener on, for status.sshCommand
        /// (default: 2222 in local mode, 22 in a cluster).
        #[arg(long, value_name = "PORT")]
        public_ssh_port: Option<u16>,
        /// Rescan the directory at least this often, in seconds (file events trigger rescans sooner).
        #[arg(long, default_value_t = 30, value_name = "SECS")]
        rescan_secs: u64,
        /// Lifetime of the relay certificates proxies mint, in seconds.
        #[arg(long, default_value_t = 300, value_name = "SECS")]
        relay_cert_validity_secs: u32,
        /// Local mode: seconds a file must stay as it is before the objects it
        /// lost (it became empty, lost documents, or was removed) are deleted,
        /// so an editor's truncate-then-write or replace-the-file save keeps
        /// them. 0 deletes at once.
        #[arg(long, default_value_t = 2.0, value_name = "SECS")]
        edit_grace: f64,
        #[command(flatten)]
        cluster: Box<ClusterArgs>,
    },
    /// Print what the operator decided for a local-mode directory.
    #[command(
        after_help = "Examples:\n  keyway-operator status --local examples/local\n  keyway-operator status --local examples/local -o json | jq '.[].ip'"
    )]
    Status {
        /// The local-mode directory.
        #[arg(long, value_name = "DIR")]
        local: PathBuf,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Write the CRD YAML generated from the API types.
    Crdgen {
        /// Directory to write keyway.dev_*.yaml into; stdout if omitted.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

/// Cluster-mode flags (ignored with --local).
#[derive(clap::Args)]
#[command(next_help_heading = "Cluster mode")]
struct ClusterArgs {
    /// The relay CA: its private key (the Secret proxies also mount) or its
    /// public `.pub` line; goes into every lease's status.relayTrust.
    #[arg(long, value_name = "FILE", env = "KEYWAY_RELAY_CA_KEY")]
    relay_ca_key: Option<PathBuf>,
    /// File holding the snapshot token (a mounted Secret).
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "token_secret",
        env = "KEYWAY_TOKEN_FILE"
    )]
    token_file: Option<PathBuf>,
    /// Secret (in the operator's namespace) holding the snapshot token under
    /// key `token`; NAME or NAME/KEY.
    #[arg(long, value_name = "NAME[/KEY]", env = "KEYWAY_TOKEN_SECRET")]
    token_secret: Option<String>,
    /// TLS certificate (PEM) for the snapshot server; needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the snapshot server.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// /metrics, /healthz and /readyz (ready = leader).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Namespace of the leader Lease and token Secret (default: the
    /// service account's, or the kubeconfig context's).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// Name of the coordination.k8s.io Lease replicas elect a leader on.
    #[arg(long, default_value = "keyway-operator")]
    leader_lease: String,
    /// This replica's identity in the Lease (default: $POD_NAME, else host-pid).
    #[arg(long)]
    identity: Option<String>,
    /// Seconds a silent leader keeps the Lease (a standby takes over after it).
    #[arg(long, default_value_t = 15.0, value_name = "SECS")]
    lease_duration_secs: f64,
    /// Seconds the leader keeps failing to renew before it steps down.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    renew_deadline_secs: f64,
    /// Seconds between renewals and between a standby's attempts.
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    retry_period_secs: f64,
}

fn secs(what: &str, v: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(v).map_err(|e| anyhow::anyhow!("--{what}: {e}"))
}

fn cluster_options(
    args: ClusterArgs,
    grpc_listen: Option<SocketAddr>,
    public_ssh_port: Option<u16>,
    relay_cert_validity_secs: u32,
) -> Result<keyway_operator::cluster::ClusterOptions> {
    use keyway_operator::cluster::{ClusterOptions, TlsFiles, TokenSource};
    let token = match (args.token_file, args.token_secret) {
        (Some(f), _) => TokenSource::File(f),
        (None, Some(s)) => {
            let (name, key) = s.split_once('/').unwrap_or((s.as_str(), "token"));
            TokenSource::Secret {
                name: name.to_string(),
                key: key.to_string(),
            }
        }
        (None, None) => anyhow::bail!(
            "cluster mode needs the snapshot token: --token-file FILE or --token-secret NAME (or --local DIR for local mode)"
        ),
    };
    let relay_ca_key = args.relay_ca_key.ok_or_else(|| {
        anyhow::anyhow!("cluster mode needs --relay-ca-key FILE (the relay CA proxies sign with)")
    })?;
    Ok(ClusterOptions {
        grpc_listen: grpc_listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 7070))),
        metrics_listen: args.metrics_listen,
        public_ssh_port: public_ssh_port.unwrap_or(22),
        relay_cert_validity_secs,
        relay_ca_key,
        token,
        tls: args
            .tls_cert
            .zip(args.tls_key)
            .map(|(cert, key)| TlsFiles { cert, key }),
        namespace: args.namespace,
        lease_name: args.leader_lease,
        identity: args.identity,
        lease_duration: secs("lease-duration-secs", args.lease_duration_secs)?,
        renew_deadline: secs("renew-deadline-secs", args.renew_deadline_secs)?,
        retry_period: secs("retry-period-secs", args.retry_period_secs)?,
    })
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // libp2p's QUIC brings rustls' aws-lc-rs provider beside our ring one;
    // with two compiled in rustls picks neither by itself, so say which.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Run {
            local,
            grpc_listen,
            public_ssh_port,
            rescan_secs,
            relay_cert_validity_secs,
            edit_grace,
            cluster,
        } => {
            init_tracing();
            match local {
                Some(dir) => match secs("edit-grace", edit_grace) {
                    Ok(edit_grace) => {
                        keyway_operator::local::run(keyway_operator::local::LocalOptions {
                            dir,
                            grpc_listen: grpc_listen
                                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7070))),
                            public_ssh_port: public_ssh_port.unwrap_or(2222),
                            rescan: Duration::from_secs(rescan_secs.max(1)),
                            relay_cert_validity_secs,
                            edit_grace,
                        })
                        .await
                    }
                    Err(e) => Err(e),
                },
                None => match cluster_options(
                    *cluster,
                    grpc_listen,
                    public_ssh_port,
                    relay_cert_validity_secs,
                ) {
                    Ok(opts) => keyway_operator::cluster::run(opts).await,
                    Err(e) => Err(e),
                },
            }
        }
        Command::Status { local, output } => {
            keyway_operator::report::print(&local, matches!(output, Output::Json))
        }
        Command::Crdgen { out } => keyway_operator::crdgen::write(out.as_deref()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyway-operator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
