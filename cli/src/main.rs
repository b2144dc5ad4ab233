//! `keyway`: the user CLI. `keyway tcp` opens a TCP tunnel through the
//! gateway's HTTPS CONNECT listener (port 443/8443), for networks that only
//! let users out on 443:
//!
//! ```sh
//! ssh -o ProxyCommand='keyway tcp %h:%p --listen - --url https://gw.example:443 -i ~/.ssh/id_ed25519' vm.example
//! ```

mod leases;
mod tcp;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "keyway", version, about = "Keyway's user CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where leases are looked up.
#[derive(clap::Args)]
struct Source {
    /// A local-mode directory (`keyway-operator run --local DIR`); default:
    /// the cluster ($KUBECONFIG or in-cluster).
    #[arg(long, value_name = "DIR")]
    local: Option<PathBuf>,
    /// Namespace to look in (cluster; default: all).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
}

impl Source {
    async fn leases(&self) -> anyhow::Result<Vec<leases::Lease>> {
        match &self.local {
            Some(dir) => leases::local(dir),
            None => leases::cluster(self.namespace.as_deref()).await,
        }
    }

    /// The gateway's SSH port: `port`, else 2222 for a local directory and
    /// 22 behind a cluster Service.
    fn port(&self, port: Option<u16>) -> u16 {
        port.unwrap_or(if self.local.is_some() { 2222 } else { 22 })
    }
}

#[derive(Subcommand)]
enum Command {
    /// ssh into a lease's VM by name: finds its pooled IP and runs ssh.
    #[command(
        after_help = "Examples:\n  keyway ssh my-vm\n  keyway ssh my-vm.team-a -i ~/.ssh/id_ed25519 -c uptime -- -L 8080:localhost:80\n  keyway ssh web --local examples/local --port 2222"
    )]
    Ssh {
        /// NAME or NAME.NAMESPACE.
        lease: String,
        #[command(flatten)]
        source: Source,
        /// The gateway's SSH port (2222 in local mode by default).
        #[arg(long)]
        port: Option<u16>,
        /// Key to offer (passed to ssh as -i, with IdentitiesOnly).
        #[arg(short = 'i', long, value_name = "FILE")]
        identity: Option<PathBuf>,
        /// Remote command (default: a login shell).
        #[arg(short = 'c', long)]
        command: Option<String>,
        /// Extra ssh options, after `--` (e.g. `-- -L 8080:localhost:80`).
        #[arg(last = true)]
        ssh_args: Vec<String>,
    },
    /// Print ssh_config Host blocks (`<lease>.<namespace>.keyway`) for leases.
    #[command(
        after_help = "Examples:\n  keyway config --user alice -i ~/.ssh/id_ed25519 >> ~/.ssh/config\n  keyway config --local examples/local --port 2222"
    )]
    Config {
        #[command(flatten)]
        source: Source,
        /// Only this user's leases.
        #[arg(long)]
        user: Option<String>,
        /// The gateway's SSH port (2222 in local mode by default).
        #[arg(long)]
        port: Option<u16>,
        /// IdentityFile to put in each block.
        #[arg(short = 'i', long, value_name = "FILE")]
        identity: Option<PathBuf>,
    },
    /// Open a TCP tunnel to HOST:PORT through the gateway's CONNECT listener.
    #[command(after_help = "Examples:\n  \
        ssh -o ProxyCommand='keyway tcp %h:%p --listen - --url https://gw.example -i ~/.ssh/id_ed25519' vm.example\n  \
        keyway tcp db.example:5432 --listen 127.0.0.1:15432 --url https://gw.example:8443 --ca ca.crt -i key")]
    Tcp {
        /// The CONNECT authority, matched by the gateway against
        /// `tcp+https://HOST:PORT` routes and `<lease>.<namespace>.<domain>`.
        target: String,
        /// `-` for stdin/stdout (ProxyCommand), or ADDR to accept local
        /// connections and tunnel each one.
        #[arg(long, default_value = "-")]
        listen: String,
        /// The gateway's HTTPS address.
        #[arg(long, env = "KEYWAY_URL")]
        url: url::Url,
        /// PEM CA certificate(s) to verify the gateway with (default: the
        /// system's roots are not bundled; pass the CA that signed the gateway).
        #[arg(long, value_name = "FILE", env = "KEYWAY_CA")]
        ca: Option<PathBuf>,
        /// OpenSSH private key proving you may use the route (routes with
        /// allowPublicKeys); omit for allowUnauthenticated routes.
        #[arg(short = 'i', long, value_name = "FILE")]
        identity: Option<PathBuf>,
    },
}

/// Runs ssh to the lease's pooled IP; returns its exit code.
async fn ssh(
    lease: &str,
    source: &Source,
    port: Option<u16>,
    identity: Option<PathBuf>,
    command: Option<String>,
    ssh_args: &[String],
) -> anyhow::Result<i32> {
    let all = source.leases().await?;
    let l = leases::find(&all, lease)?;
    let Some(ip) = &l.ip else {
        anyhow::bail!(
            "{}.{} has no address yet (phase {})",
            l.name,
            l.namespace,
            l.phase
        );
    };
    let port = source.port(port);
    let mut cmd = std::process::Command::new("ssh");
    cmd.args(["-p", &port.to_string()]);
    if let Some(i) = identity {
        cmd.arg("-i").arg(i).args(["-o", "IdentitiesOnly=yes"]);
    }
    // ssh stops reading options at the host: options go before it, the
    // remote command after.
    cmd.args(ssh_args).arg(ip);
    if let Some(c) = command {
        cmd.arg(c);
    }
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("running ssh: {e}"))?;
    Ok(status.code().unwrap_or(255))
}

#[tokio::main]
async fn main() {
    // libp2p's QUIC brings rustls' aws-lc-rs provider beside our ring one;
    // with two compiled in rustls picks neither by itself, so say which.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Ssh {
            lease,
            source,
            port,
            identity,
            command,
            ssh_args,
        } => ssh(&lease, &source, port, identity, command, &ssh_args).await,
        Command::Config {
            source,
            user,
            port,
            identity,
        } => source.leases().await.map(|ls| {
            let port = source.port(port);
            print!(
                "{}",
                leases::config(&ls, user.as_deref(), port, identity.as_deref())
            );
            0
        }),
        Command::Tcp {
            target,
            listen,
            url,
            ca,
            identity,
        } => tcp::run(tcp::Options {
            target,
            listen,
            url,
            ca,
            identity,
        })
        .await
        .map(|()| 0),
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keyway: {e:#}");
            1
        }
    };
    // Exit now: a blocking read of stdin (tokio runs it on a blocking
    // thread) would otherwise hold the runtime's shutdown until ssh closes
    // our stdin, and a ProxyCommand must end when its tunnel does.
    std::process::exit(code)
}
