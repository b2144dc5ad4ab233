//! `keyway-operator`: allocates pooled IPs, writes status, and streams routing
//! snapshots to proxies. `run --local DIR` needs no cluster.

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
        after_help = "Examples:\n  keyway-operator run --local examples/local\n  keyway-operator run --local /srv/keyway --grpc-listen 127.0.0.1:7070"
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
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Run {
            local,
            grpc_listen,
            public_ssh_port,
            rescan_secs,
            relay_cert_validity_secs,
        } => {
            init_tracing();
            match local {
                Some(dir) => {
                    keyway_operator::local::run(keyway_operator::local::LocalOptions {
                        dir,
                        grpc_listen: grpc_listen
                            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7070))),
                        public_ssh_port: public_ssh_port.unwrap_or(2222),
                        rescan: Duration::from_secs(rescan_secs.max(1)),
                        relay_cert_validity_secs,
                    })
                    .await
                }
                None => Err(anyhow::anyhow!(
                    "cluster mode is not built yet; use `keyway-operator run --local DIR`"
                )),
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
