//! The snapshot protocol over a real tonic server and the real subscriber.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyway_snapshot::client::{SubscriberConfig, Subscription, subscribe};
use keyway_snapshot::pb;
use keyway_snapshot::server::{Publisher, serve};
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(20);

fn lease(name: &str, hash: u8, ip: &str) -> pb::Lease {
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

fn snap(n: u8) -> pb::Snapshot {
    pb::Snapshot {
        leases: (1..=n)
            .map(|i| lease(&format!("l{i}"), i, "10.0.0.1"))
            .collect(),
        ..Default::default()
    }
}

struct Server {
    publisher: Publisher,
    endpoint: String,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn server(epoch: u64, port: u16) -> Server {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let publisher = Publisher::new(epoch);
    let (stop, rx) = oneshot::channel();
    tokio::spawn(serve(
        listener,
        publisher.clone(),
        "secret".into(),
        async move {
            let _ = rx.await;
        },
    ));
    Server {
        publisher,
        endpoint,
        stop: Some(stop),
    }
}

fn config(endpoint: &str, token: &str, cache: Option<std::path::PathBuf>) -> SubscriberConfig {
    SubscriberConfig {
        endpoint: endpoint.into(),
        token: token.into(),
        node_id: "test-node".into(),
        role: "proxy".into(),
        cache_path: cache,
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
    }
}

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn applied(sub: &Subscription) -> Option<(u64, u64)> {
    sub.snapshot
        .borrow()
        .as_ref()
        .and_then(|s| s.version)
        .map(|v| (v.epoch, v.version))
}

#[tokio::test]
async fn full_snapshot_on_connect_then_updates_acked() {
    let srv = server(7, 0).await;
    let v1 = srv.publisher.publish(snap(1)).unwrap();
    assert_eq!((v1.epoch, v1.version), (7, 1));
    // Same content: same version.
    assert_eq!(srv.publisher.publish(snap(1)).unwrap(), v1);
    let (sub, task) = subscribe(config(&srv.endpoint, "secret", None), |_| Ok(()));
    until("v1", || (applied(&sub) == Some((7, 1))).then_some(())).await;
    srv.publisher.publish(snap(2)).unwrap();
    until("v2", || (applied(&sub) == Some((7, 2))).then_some(())).await;
    until("ack recorded", || {
        srv.publisher
            .subscribers()
            .iter()
            .find(|s| {
                s.node_id == "test-node" && s.connected && s.acked.map(|a| a.version) == Some(2)
            })
            .map(|_| ())
    })
    .await;
    assert!(srv.publisher.acked_by_all_connected(&pb::Version {
        epoch: 7,
        version: 2
    }));
    task.abort();
}

#[tokio::test]
async fn wrong_or_missing_token_is_refused() {
    let srv = server(1, 0).await;
    srv.publisher.publish(snap(1)).unwrap();
    for token in ["wrong", ""] {
        let (sub, task) = subscribe(config(&srv.endpoint, token, None), |_| Ok(()));
        let err = until("an auth error", || sub.status.borrow().last_error.clone()).await;
        assert!(
            err.to_lowercase().contains("unauthenticated") || err.contains("token"),
            "{err}"
        );
        assert!(sub.snapshot.borrow().is_none());
        task.abort();
    }
    assert!(
        srv.publisher.subscribers().is_empty(),
        "a refused caller was registered"
    );
}

#[tokio::test]
async fn nack_is_counted_and_never_resent() {
    let srv = server(1, 0).await;
    srv.publisher.publish(snap(1)).unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let refuse = Arc::new(AtomicBool::new(true));
    let (sub, task) = {
        let (seen, refuse) = (seen.clone(), refuse.clone());
        subscribe(config(&srv.endpoint, "secret", None), move |_| {
            seen.fetch_add(1, Ordering::SeqCst);
            if refuse.load(Ordering::SeqCst) {
                Err("not today".into())
            } else {
                Ok(())
            }
        })
    };
    until("a NACK", || {
        (srv.publisher.totals().nacks == 1).then_some(())
    })
    .await;
    let st = until("nack recorded", || {
        srv.publisher
            .subscribers()
            .into_iter()
            .find(|s| s.nack_count == 1)
    })
    .await;
    assert_eq!(st.last_nack_error.as_deref(), Some("not today"));
    assert!(sub.snapshot.borrow().is_none());
    // Republishing the same content does not resend the refused version.
    srv.publisher.publish(snap(1)).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "a NACKed version was resent"
    );
    assert_eq!(srv.publisher.totals().sent, 1);
    // A newer version is sent, and accepted.
    refuse.store(false, Ordering::SeqCst);
    srv.publisher.publish(snap(2)).unwrap();
    until("v2 applied", || {
        (applied(&sub) == Some((1, 2))).then_some(())
    })
    .await;
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_wins_with_one_unacked_response() {
    let srv = server(1, 0).await;
    srv.publisher.publish(snap(1)).unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let (sub, task) = {
        let received = received.clone();
        subscribe(config(&srv.endpoint, "secret", None), move |s| {
            received.lock().unwrap().push(s.version.unwrap().version);
            // A slow subscriber: the server must not queue versions behind it.
            std::thread::sleep(Duration::from_millis(200));
            Ok(())
        })
    };
    until("first response", || {
        (!received.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    for n in 2..=30u8 {
        srv.publisher.publish(snap(n)).unwrap();
    }
    until("the latest", || {
        (applied(&sub) == Some((1, 30))).then_some(())
    })
    .await;
    let got = received.lock().unwrap().clone();
    assert!(
        got.len() < 10,
        "intermediate versions were not conflated: {got:?}"
    );
    assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
    assert!(srv.publisher.totals().sent as usize == got.len());
    task.abort();
}

#[tokio::test]
async fn disk_copy_serves_while_the_operator_is_away_and_epochs_only_grow() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("snapshot.pb");
    let port;
    {
        let srv = server(5, 0).await;
        port = srv
            .endpoint
            .rsplit(':')
            .next()
            .unwrap()
            .parse::<u16>()
            .unwrap();
        srv.publisher.publish(snap(3)).unwrap();
        let (sub, task) = subscribe(config(&srv.endpoint, "secret", Some(cache.clone())), |_| {
            Ok(())
        });
        until("v1", || (applied(&sub) == Some((5, 1))).then_some(())).await;
        task.abort();
    }
    // Operator gone: a restarted subscriber serves its disk copy at once.
    let endpoint = format!("http://127.0.0.1:{port}");
    let (sub, task) = subscribe(config(&endpoint, "secret", Some(cache.clone())), |_| Ok(()));
    until("disk copy", || {
        (applied(&sub) == Some((5, 1))).then_some(())
    })
    .await;
    assert_eq!(sub.snapshot.borrow().as_ref().unwrap().leases.len(), 3);
    // An older writer (lower epoch) comes up at that address: refused.
    let old = server(4, port).await;
    old.publisher.publish(snap(1)).unwrap();
    until("stale NACK", || {
        (old.publisher.totals().nacks >= 1).then_some(())
    })
    .await;
    assert_eq!(applied(&sub), Some((5, 1)));
    drop(old);
    // A newer writer (higher epoch): applied and persisted.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let new = server(6, port).await;
    new.publisher.publish(snap(2)).unwrap();
    until("epoch 6", || (applied(&sub) == Some((6, 1))).then_some(())).await;
    task.abort();
    let (again, task) = subscribe(config("http://127.0.0.1:9", "secret", Some(cache)), |_| {
        Ok(())
    });
    until("persisted epoch 6", || {
        (applied(&again) == Some((6, 1))).then_some(())
    })
    .await;
    task.abort();
}

#[test]
fn publisher_refuses_inconsistent_snapshots() {
    let p = Publisher::new(1);
    let mut bad = snap(2);
    bad.leases[1].lease_hash = bad.leases[0].lease_hash.clone();
    assert!(p.publish(bad).is_err());
    assert!(p.current_version().is_none());
    assert_eq!(p.totals().refused, 1);
}
