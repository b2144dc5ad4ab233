//! The snapshot protocol over a real tonic server and the real subscriber.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use common::*;
use keyway_snapshot::client::subscribe;
use keyway_snapshot::pb;
use keyway_snapshot::server::{Publisher, ServeOptions};
use prost::Message;

#[tokio::test]
async fn full_snapshot_on_connect_then_updates_acked() {
    let srv = Server::start(7).await;
    let v1 = srv.publisher.publish(snap(1)).unwrap();
    assert_eq!(v1, v(7, 1));
    // Same content: same version.
    assert_eq!(srv.publisher.publish(snap(1)).unwrap(), v1);
    let mut acks = srv.publisher.acks_changed();
    acks.mark_unchanged();

    let (sub, task) = subscribe(config(&srv.endpoint, TOKEN, None), |_| Ok(()));
    until_applied(&sub, v1).await;
    assert_eq!(sub.snapshot.borrow().as_ref().unwrap().lease_count(), 1);
    until_acked(&srv.publisher, "test-node", v1).await;
    assert!(acks.has_changed().unwrap(), "ack watch not notified");

    let v2 = srv.publisher.publish(snap(2)).unwrap();
    assert_eq!(v2, v(7, 2));
    until_applied(&sub, v2).await;
    until_acked(&srv.publisher, "test-node", v2).await;
    assert!(srv.publisher.acked_by_all_connected(&v2));
    assert!(srv.publisher.acked_by_all_connected(&v1));
    assert!(!srv.publisher.acked_by_all_connected(&v(7, 3)));

    let subs = srv.publisher.subscribers();
    assert_eq!(subs.len(), 1);
    let s = &subs[0];
    assert_eq!(
        (s.role.as_str(), s.sent, s.nack_count),
        ("proxy", Some(v2), 0)
    );
    assert_eq!(
        s.peer.map(|p| p.ip().to_string()).as_deref(),
        Some("127.0.0.1")
    );
    let st = sub.status.borrow().clone();
    assert!(st.connected && !st.from_disk && !st.auth_refused, "{st:?}");
    assert_eq!((st.applied, st.reconnects, st.nacks), (Some(v2), 0, 0));
    let t = srv.publisher.totals();
    assert_eq!((t.sent, t.acks, t.nacks), (2, 2, 0));

    // shutdown() ends the task and the server sees the stream go.
    sub.shutdown();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    assert!(!sub.status.borrow().connected);
    until("disconnect seen by the server", || {
        let subs = srv.publisher.subscribers();
        (subs.len() == 1 && !subs[0].connected && subs[0].disconnected_at.is_some()).then_some(())
    })
    .await;
    // Nobody connected: vacuously acked by all.
    assert!(srv.publisher.acked_by_all_connected(&v(7, 99)));
}

#[tokio::test]
async fn wrong_or_missing_token_is_refused() {
    let srv = Server::start(1).await;
    srv.publisher.publish(snap(1)).unwrap();
    // An empty token makes the client send no authorization at all.
    for (token, why) in [
        ("wrong", "wrong snapshot token"),
        ("", "missing authorization"),
    ] {
        let (sub, task) = subscribe(config(&srv.endpoint, token, None), |_| Ok(()));
        let st = until("an auth refusal", || {
            let st = sub.status.borrow().clone();
            st.auth_refused.then_some(st)
        })
        .await;
        let err = st.last_error.unwrap();
        assert!(err.contains(why), "{token:?}: {err}");
        assert!(!st.connected && st.applied.is_none());
        assert!(sub.snapshot.borrow().is_none());
        task.abort();
    }
    assert!(
        srv.publisher.subscribers().is_empty(),
        "a refused caller was registered"
    );
    assert_eq!(srv.publisher.totals().sent, 0);
}

#[tokio::test]
async fn nack_is_counted_and_never_resent() {
    let srv = Server::start(1).await;
    let v1 = srv.publisher.publish(snap(1)).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let refuse = Arc::new(AtomicBool::new(true));
    let (sub, task) = {
        let (seen, refuse) = (seen.clone(), refuse.clone());
        subscribe(config(&srv.endpoint, TOKEN, None), move |s| {
            seen.lock().unwrap().push(s.version);
            if refuse.load(Ordering::SeqCst) {
                Err("not today".into())
            } else {
                Ok(())
            }
        })
    };
    let st = until("the NACK recorded", || {
        srv.publisher
            .subscribers()
            .into_iter()
            .find(|s| s.nack_count == 1)
    })
    .await;
    assert_eq!(st.last_nack_error.as_deref(), Some("not today"));
    assert_eq!(st.last_nack_version, Some(v1));
    assert_eq!(st.acked, None, "a NACK counted as serving our version");
    assert!(!srv.publisher.acked_by_all_connected(&v1));
    assert_eq!(srv.publisher.totals().nacks, 1);
    assert!(sub.snapshot.borrow().is_none());
    let sst = sub.status.borrow().clone();
    assert_eq!(sst.nacks, 1);
    assert!(sst.last_error.unwrap().contains("not today"));

    // Republishing the same content is no new version: nothing to send.
    assert_eq!(srv.publisher.publish(snap(1)).unwrap(), v1);
    // A newer version is sent, and accepted.
    refuse.store(false, Ordering::SeqCst);
    let v2 = srv.publisher.publish(snap(2)).unwrap();
    assert_eq!(v2, v(1, 2));
    until_applied(&sub, v2).await;
    // Responses arrive in order, so a resend of v1 would be in the list by now.
    assert_eq!(
        *seen.lock().unwrap(),
        vec![v1, v2],
        "a NACKed version was resent"
    );
    assert_eq!(srv.publisher.totals().sent, 2);
    until_acked(&srv.publisher, "test-node", v2).await;
    task.abort();
}

/// A gate the validate callback waits on (bounded, so a failing test cannot
/// hang the runtime's blocking pool).
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    fn wait(&self) {
        let open = self.open.lock().unwrap();
        let _ = self.cv.wait_timeout_while(open, WAIT, |o| !*o).unwrap();
    }
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_wins_with_one_unacked_response() {
    let srv = Server::start(1).await;
    srv.publisher.publish(snap(1)).unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(Gate::default());
    let (sub, task) = {
        let (received, gate) = (received.clone(), gate.clone());
        subscribe(config(&srv.endpoint, TOKEN, None), move |s| {
            let version = s.version.version;
            received.lock().unwrap().push(version);
            // A slow subscriber: busy with v1 while v2..v30 are published.
            if version == 1 {
                gate.wait();
            }
            Ok(())
        })
    };
    until("v1 being validated", || {
        (!received.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    for n in 2..=30u8 {
        srv.publisher.publish(snap(n)).unwrap();
    }
    gate.open();
    until_applied(&sub, v(1, 30)).await;
    // v1 was unacknowledged while 2..=30 were published: nothing was sent
    // behind it, and after its ACK only the latest went out.
    assert_eq!(*received.lock().unwrap(), vec![1, 30]);
    assert_eq!(srv.publisher.totals().sent, 2);
    until_acked(&srv.publisher, "test-node", v(1, 30)).await;
    task.abort();
}

#[tokio::test]
async fn disk_copy_serves_while_the_operator_is_away_and_epochs_only_grow() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("state").join("snapshot.pb");
    // A loopback address of its own, so no parallel test takes the port
    // between the servers below.
    let ip = "127.0.0.57".parse().unwrap();
    let opts = || ServeOptions::new(TOKEN.into());

    let srv = Server::start_at(Publisher::new(5), ip, 0, opts()).await;
    let port = srv.addr.port();
    let endpoint = srv.endpoint.clone();
    srv.publisher.publish(snap(3)).unwrap();
    let (sub, task) = subscribe(config(&endpoint, TOKEN, Some(cache.clone())), |_| Ok(()));
    until_applied(&sub, v(5, 1)).await;
    until_acked(&srv.publisher, "test-node", v(5, 1)).await;
    // Acked implies persisted.
    let on_disk = pb::Snapshot::decode(std::fs::read(&cache).unwrap().as_slice()).unwrap();
    assert_eq!(on_disk.version, Some(v(5, 1)));
    assert_eq!(on_disk.leases.len(), 3);
    task.abort();
    srv.stop().await;

    // Operator gone: a restarted subscriber serves its disk copy at once.
    let (sub, task) = subscribe(config(&endpoint, TOKEN, Some(cache.clone())), |_| Ok(()));
    until_applied(&sub, v(5, 1)).await;
    assert_eq!(sub.snapshot.borrow().as_ref().unwrap().lease_count(), 3);
    let st = sub.status.borrow().clone();
    assert!(st.from_disk && st.applied == Some(v(5, 1)), "{st:?}");
    until("a failed connection attempt", || {
        sub.status.borrow().last_error.clone()
    })
    .await;
    assert_eq!(applied(&sub), Some(v(5, 1)));

    // An older writer (lower epoch) comes up at that address: refused.
    let old = Server::start_at(Publisher::new(4), ip, port, opts()).await;
    old.publisher.publish(snap(1)).unwrap();
    let nacked = until("the stale NACK", || {
        old.publisher
            .subscribers()
            .into_iter()
            .find(|s| s.nack_count == 1)
    })
    .await;
    let why = nacked.last_nack_error.unwrap();
    assert!(
        why.contains("stale: e4.v1 is older than the applied e5.v1"),
        "{why}"
    );
    // The subscriber serves e5.v1, which is not this writer's: not acked.
    assert_eq!(nacked.acked, None);
    assert!(!old.publisher.acked_by_all_connected(&v(4, 1)));
    assert_eq!(applied(&sub), Some(v(5, 1)));
    assert_eq!(sub.snapshot.borrow().as_ref().unwrap().lease_count(), 3);
    old.stop().await;

    // A newer writer (higher epoch): applied and persisted.
    let new = Server::start_at(Publisher::new(6), ip, port, opts()).await;
    new.publisher.publish(snap(2)).unwrap();
    until_applied(&sub, v(6, 1)).await;
    until_acked(&new.publisher, "test-node", v(6, 1)).await;
    let st = sub.status.borrow().clone();
    assert!(!st.from_disk && st.reconnects >= 1, "{st:?}");
    task.abort();
    new.stop().await;

    let (again, task) = subscribe(config(&endpoint, TOKEN, Some(cache)), |_| Ok(()));
    until_applied(&again, v(6, 1)).await;
    assert_eq!(again.snapshot.borrow().as_ref().unwrap().lease_count(), 2);
    task.abort();
}

#[tokio::test]
async fn a_corrupt_disk_copy_is_ignored_then_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("snapshot.pb");
    std::fs::write(&cache, b"\x0a\xff\xff\xff not protobuf").unwrap();
    let srv = Server::start(1).await;
    let (sub, task) = subscribe(
        config(&srv.endpoint, TOKEN, Some(cache.clone())),
        |_| Ok(()),
    );
    // The disk copy is read before connecting: once connected, it was seen.
    until("connected", || sub.status.borrow().connected.then_some(())).await;
    assert!(sub.snapshot.borrow().is_none());
    assert!(!sub.status.borrow().from_disk);
    let v1 = srv.publisher.publish(snap(2)).unwrap();
    until_applied(&sub, v1).await;
    until_acked(&srv.publisher, "test-node", v1).await;
    let on_disk = pb::Snapshot::decode(std::fs::read(&cache).unwrap().as_slice()).unwrap();
    assert_eq!(on_disk.version, Some(v1));
    task.abort();
}

#[tokio::test]
async fn a_disk_copy_the_caller_refuses_is_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("snapshot.pb");
    let mut old = snap(1);
    old.version = Some(v(1, 1));
    std::fs::write(&cache, old.encode_to_vec()).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let (sub, task) = {
        let calls = calls.clone();
        subscribe(
            config("http://127.0.0.1:9", TOKEN, Some(cache)),
            move |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                Err("no".into())
            },
        )
    };
    until("a connection attempt", || {
        sub.status.borrow().last_error.clone()
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(sub.snapshot.borrow().is_none());
    task.abort();
}

#[tokio::test]
async fn a_malformed_snapshot_is_never_published() {
    let srv = Server::start(1).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (sub, task) = {
        let seen = seen.clone();
        subscribe(config(&srv.endpoint, TOKEN, None), move |s| {
            seen.lock().unwrap().push((s.version, s.lease_count()));
            Ok(())
        })
    };
    let v1 = srv.publisher.publish(snap(1)).unwrap();
    until_applied(&sub, v1).await;

    let mut bad = snap(2);
    bad.leases[1].lease_hash = bad.leases[0].lease_hash.clone();
    let err = srv.publisher.publish(bad).unwrap_err();
    assert!(
        err.to_string().contains("lease d/l2: lease hash shared"),
        "{err}"
    );
    let mut bad = snap(2);
    bad.leases[0].ip = "not-an-ip".into();
    assert!(srv.publisher.publish(bad).is_err());
    assert_eq!(srv.publisher.totals().refused, 2);
    assert_eq!(srv.publisher.current_version(), Some(v1));

    let v2 = srv.publisher.publish(snap(3)).unwrap();
    assert_eq!(v2, v(1, 2), "a refused snapshot used up a version");
    until_applied(&sub, v2).await;
    assert_eq!(*seen.lock().unwrap(), vec![(v1, 1), (v2, 3)]);
    assert_eq!(srv.publisher.totals().sent, 2);
    task.abort();
}

#[tokio::test]
async fn server_shutdown_ends_streams_and_the_subscriber_keeps_serving() {
    let srv = Server::start(2).await;
    let publisher = srv.publisher.clone();
    let v1 = publisher.publish(snap(1)).unwrap();
    let (sub, task) = subscribe(config(&srv.endpoint, TOKEN, None), |_| Ok(()));
    until_applied(&sub, v1).await;
    until_acked(&publisher, "test-node", v1).await;
    // serve() returns although a subscriber stream was open.
    srv.stop().await;
    until("the server to mark the stream closed", || {
        (!publisher.subscribers()[0].connected).then_some(())
    })
    .await;
    until("the subscriber to notice", || {
        (!sub.status.borrow().connected).then_some(())
    })
    .await;
    assert_eq!(applied(&sub), Some(v1));
    task.abort();
}

#[tokio::test]
async fn a_reconnecting_node_replaces_its_old_entry() {
    let srv = Server::start(1).await;
    let v1 = srv.publisher.publish(snap(1)).unwrap();
    let (sub, task) = subscribe(config(&srv.endpoint, TOKEN, None), |_| Ok(()));
    until_applied(&sub, v1).await;
    until_acked(&srv.publisher, "test-node", v1).await;
    // Client goes away without a goodbye: the server's stream task ends.
    task.abort();
    until("the stream task to end", || {
        (!srv.publisher.subscribers()[0].connected).then_some(())
    })
    .await;
    let (sub, task) = subscribe(config(&srv.endpoint, TOKEN, None), |_| Ok(()));
    until_applied(&sub, v1).await;
    until_acked(&srv.publisher, "test-node", v1).await;
    let subs = srv.publisher.subscribers();
    assert_eq!(subs.len(), 1, "{subs:?}");
    assert!(subs[0].connected);
    task.abort();
}

/// Snapshots larger than gRPC's default 4 MiB limit go through (100,000
/// leases are ~31 MB: ~0.3 s end to end in a release build; 20,000 keep this
/// debug-build test short while still exceeding the default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_larger_than_the_grpc_default_limit_goes_through() {
    const N: u32 = 20_000;
    let leases: Vec<pb::Lease> = (0..N)
        .map(|i| {
            let mut hash = vec![0u8; 32];
            hash[..4].copy_from_slice(&i.to_be_bytes());
            pb::Lease {
                namespace: "tenants".into(),
                name: format!("vm-{i:06}"),
                lease_hash: hash,
                user: format!("user-{}", i / 4),
                ip: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                pool: "public".into(),
                access_keys: vec![pb::AccessKey {
                    openssh: format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{i:043}"),
                    fingerprint: format!("SHA256:{i:043}"),
                }],
                target: Some(pb::lease::Target::Address(format!("vm-{i}.internal:22"))),
                relay_principal: format!("lease-{i:058}"),
                ..Default::default()
            }
        })
        .collect();
    let big = pb::Snapshot {
        leases,
        ..Default::default()
    };
    let bytes = big.encoded_len();
    assert!(bytes > 5 << 20, "only {bytes} bytes");
    let srv = Server::start(1).await;
    let v1 = srv.publisher.publish(big).unwrap();
    let (sub, task) = subscribe(config(&srv.endpoint, TOKEN, None), |_| Ok(()));
    until_applied(&sub, v1).await;
    assert_eq!(
        sub.snapshot.borrow().as_ref().unwrap().lease_count(),
        N as usize
    );
    until_acked(&srv.publisher, "test-node", v1).await;
    task.abort();
}

/// A small deterministic generator, so a failure replays from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

#[tokio::test]
async fn random_edits_and_reconnects_converge_to_the_published_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("snapshot.pb");
    let ip = "127.0.0.58".parse().unwrap();
    let opts = || ServeOptions::new(TOKEN.into());
    let publisher = Publisher::new(9);
    let mut srv = Server::start_at(publisher.clone(), ip, 0, opts()).await;
    let port = srv.addr.port();
    let endpoint = srv.endpoint.clone();
    let mut rng = Rng(0x5eed_0000_0000_0001);
    let mut next_id = 0u64;
    let mut world = snap(0);
    let add = |world: &mut pb::Snapshot, next_id: &mut u64| {
        *next_id += 1;
        let mut l = lease(&format!("n{next_id}"), 0, "10.0.0.1");
        l.lease_hash = next_id.to_be_bytes().repeat(4);
        world.leases.push(l);
    };
    for _ in 0..40 {
        add(&mut world, &mut next_id);
    }
    publisher.publish(world.clone()).unwrap();
    let (mut sub, mut task) = subscribe(config(&endpoint, TOKEN, Some(cache.clone())), |_| Ok(()));

    for round in 0..60 {
        for _ in 0..=rng.below(4) {
            match rng.below(4) {
                0 => add(&mut world, &mut next_id),
                1 if !world.leases.is_empty() => {
                    let i = rng.below(world.leases.len() as u64) as usize;
                    world.leases.remove(i);
                }
                2 => {
                    world.relay = (rng.below(2) == 0).then(|| pb::RelayTrust {
                        ca_public_key: format!("ssh-ed25519 CA{round}"),
                        cert_validity_secs: 300,
                    });
                }
                _ if !world.leases.is_empty() => {
                    let i = rng.below(world.leases.len() as u64) as usize;
                    world.leases[i].target = Some(pb::lease::Target::Address(format!(
                        "127.0.0.{}:22",
                        rng.below(200) + 1
                    )));
                }
                _ => {}
            }
            // Published back to back: the subscriber sees some of these
            // versions only merged with the next ones.
            publisher.publish(world.clone()).unwrap();
        }
        match rng.below(6) {
            // The operator goes away and comes back (same publisher, same
            // history): the subscriber resumes from what it holds.
            0 => {
                srv.stop().await;
                if rng.below(2) == 0 {
                    publisher.publish(world.clone()).unwrap();
                }
                srv = Server::start_at(publisher.clone(), ip, port, opts()).await;
            }
            // The subscriber restarts from its disk copy.
            1 => {
                task.abort();
                let _ = task.await;
                (sub, task) = subscribe(config(&endpoint, TOKEN, Some(cache.clone())), |_| Ok(()));
            }
            // Wait until it has caught up.
            2 => until_applied(&sub, publisher.current_version().unwrap()).await,
            _ => {}
        }
    }
    let last = publisher.current_version().unwrap();
    until_applied(&sub, last).await;
    until_acked(&publisher, "test-node", last).await;
    // Rebuilt from deltas, the subscriber's snapshot is the writer's, byte
    // for byte, and so is its disk copy.
    let held = sub.snapshot.borrow().clone().unwrap();
    assert_eq!(held.to_snapshot(), *publisher.current().unwrap());
    let on_disk = keyway_snapshot::disk::DiskCopy::new(&cache)
        .load(&|_| Ok(()))
        .unwrap()
        .unwrap();
    assert_eq!(on_disk.to_snapshot(), held.to_snapshot());
    // Deltas went to the journal: the base alone is an older version.
    let base = pb::Snapshot::decode(std::fs::read(&cache).unwrap().as_slice()).unwrap();
    assert!(base.version <= Some(held.version));
    let t = publisher.totals();
    assert!(t.deltas_sent > t.full_sent, "{t:?}");
    assert_eq!(t.nacks, 0, "{t:?}");
    task.abort();
}

/// After a full snapshot bigger than `reopen_after_full_bytes`, the
/// subscriber reopens its stream at once from the version it holds (so the
/// transport's buffers, sized to that message, are let go); the operator
/// then sends only what is new, and deltas never reopen it.
#[tokio::test]
async fn a_big_full_snapshot_reopens_the_stream_and_then_deltas_flow() {
    let srv = Server::start(7).await;
    let v1 = srv.publisher.publish(snap(3)).unwrap();
    let mut cfg = config(&srv.endpoint, TOKEN, None);
    cfg.reopen_after_full_bytes = 1;
    let (sub, _task) = subscribe(cfg, |_| Ok(()));
    until_applied(&sub, v1).await;
    until("the stream reopened from v1", || {
        let st = sub.status.borrow().clone();
        (st.connected && st.reconnects == 1).then_some(())
    })
    .await;
    until_acked(&srv.publisher, "test-node", v1).await;
    let v2 = srv.publisher.publish(snap(4)).unwrap();
    until_applied(&sub, v2).await;
    until_acked(&srv.publisher, "test-node", v2).await;
    let st = sub.status.borrow().clone();
    assert_eq!((st.reconnects, st.nacks), (1, 0), "{st:?}");
    let t = srv.publisher.totals();
    assert_eq!(t.nacks, 0);
    let subs = srv.publisher.subscribers();
    assert_eq!(subs.len(), 1, "one node, one entry");
}
