//! Bench helper for `make bench`: opens N authenticated SSH connections to a
//! gateway with one key, keeps them idle, prints `ready N` and waits for stdin
//! to close. (The gateway's RSS is read from outside while they are held.)
//!
//!     cargo run --release -p keyway-proxy --example hold_connections -- ADDR KEYFILE N

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use russh::client;
use russh::keys::PrivateKeyWithHashAlg;

struct Accept;

impl client::Handler for Accept {
    type Error = russh::Error;
    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, key, n] = args.as_slice() else {
        bail!("usage: hold_connections ADDR KEYFILE N");
    };
    let n: usize = n.parse().context("N")?;
    let key = Arc::new(russh::keys::load_secret_key(key, None).context("loading the key")?);
    let config = Arc::new(client::Config {
        inactivity_timeout: None,
        ..Default::default()
    });
    let mut held = Vec::with_capacity(n);
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (addr, key, config, sem) = (addr.clone(), key.clone(), config.clone(), sem.clone());
        tasks.spawn(async move {
            let _p = sem.acquire().await;
            let mut h = client::connect(config, addr.as_str(), Accept).await?;
            let ok = h
                .authenticate_publickey("root", PrivateKeyWithHashAlg::new(key, None))
                .await?;
            if !ok.success() {
                bail!("authentication refused");
            }
            anyhow::Ok(h)
        });
    }
    while let Some(r) = tasks.join_next().await {
        held.push(r.context("task")??);
    }
    println!("ready {}", held.len());
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(held);
    Ok(())
}
