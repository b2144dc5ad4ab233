//! Helpers shared by the snapshot integration tests: a real server on a
//! loopback port, snapshot builders, and polling with a deadline.
#![allow(clippy::unwrap_used, dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use keyway_snapshot::client::{SubscriberConfig, Subscription};
use keyway_snapshot::pb;
use keyway_snapshot::server::{Publisher, ServeOptions, serve_with};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Upper bound for anything a test waits for; reaching it fails the test.
pub const WAIT: Duration = Duration::from_secs(20);
pub const TOKEN: &str = "secret";

pub fn lease(name: &str, hash: u8, ip: &str) -> pb::Lease {
    pb::Lease {
        namespace: "d".into(),
        name: name.into(),
        lease_hash: vec![hash; 32],
        user: name.into(),
        ip: ip.into(),
        pool: "p".into(),
        access_keys: vec![pb::AccessKey {
            openssh: "ssh-ed25519 AAAA".into(),
            fingerprint: format!("SHA256:{name}"),
        }],
        target: Some(pb::lease::Target::Address("127.0.0.1:22".into())),
        ..Default::default()
    }
}

/// A consistent snapshot with `n` leases (distinct content per `n`).
pub fn snap(n: u8) -> pb::Snapshot {
    pb::Snapshot {
        leases: (1..=n)
            .map(|i| lease(&format!("l{i}"), i, "10.0.0.1"))
            .collect(),
        ..Default::default()
    }
}

pub fn v(epoch: u64, version: u64) -> pb::Version {
    pb::Version::new(epoch, version)
}

/// A running snapshot server; stopped (without waiting) when dropped.
pub struct Server {
    pub publisher: Publisher,
    pub addr: SocketAddr,
    pub endpoint: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    pub async fn start(epoch: u64) -> Server {
        Self::start_at(
            Publisher::new(epoch),
            "127.0.0.1".parse().unwrap(),
            0,
            ServeOptions::new(TOKEN.into()),
        )
        .await
    }

    pub async fn start_at(
        publisher: Publisher,
        ip: IpAddr,
        port: u16,
        options: ServeOptions,
    ) -> Server {
        let listener = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = oneshot::channel();
        let task = tokio::spawn(serve_with(
            listener,
            publisher.clone(),
            options,
            async move {
                let _ = rx.await;
            },
        ));
        Server {
            publisher,
            addr,
            endpoint: format!("http://{addr}"),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Signals shutdown and waits (at most [`WAIT`]) for `serve` to return.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("serve did not return after shutdown")
            .unwrap()
            .unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub fn config(endpoint: &str, token: &str, cache: Option<std::path::PathBuf>) -> SubscriberConfig {
    SubscriberConfig {
        endpoint: endpoint.into(),
        token: token.into(),
        node_id: "test-node".into(),
        role: "proxy".into(),
        cache_path: cache,
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ca_pem: None,
        reopen_after_full_bytes: keyway_snapshot::client::DEFAULT_REOPEN_AFTER_FULL_BYTES,
    }
}

/// Polls `f` until it returns `Some`, failing the test after [`WAIT`].
pub async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The version the subscription serves.
pub fn applied(sub: &Subscription) -> Option<pb::Version> {
    sub.snapshot.borrow().as_ref().map(|s| s.version)
}

/// Waits until the subscription serves `want`.
pub async fn until_applied(sub: &Subscription, want: pb::Version) {
    until(&format!("{want} applied"), || {
        (applied(sub) == Some(want)).then_some(())
    })
    .await;
}

/// Waits until a connected subscriber `node` has acked `want` on `p`.
pub async fn until_acked(p: &Publisher, node: &str, want: pb::Version) {
    until(&format!("{node} acks {want}"), || {
        p.subscribers()
            .iter()
            .any(|s| s.node_id == node && s.connected && s.acked == Some(want))
            .then_some(())
    })
    .await;
}
