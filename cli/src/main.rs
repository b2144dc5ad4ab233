//! `keyway`: the user CLI. `keyway tcp` opens a TCP tunnel through the
//! gateway's HTTPS CONNECT listener (port 443/8443), for networks that only
//! let users out on 443:
//!
//! ```sh
//! ssh -o ProxyCommand='keyway tcp %h:%p --listen - --url https://gw.example:443 -i ~/.ssh/id_ed25519' vm.example
//! ```

mod tcp;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "keyway", version, about = "Keyway's user CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Tcp {
            target,
            listen,
            url,
            ca,
            identity,
        } => {
            tcp::run(tcp::Options {
                target,
                listen,
                url,
                ca,
                identity,
            })
            .await
        }
    };
    let code = match result {
        Ok(()) => 0,
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
