//! The server's side of the protocol, driven message by message through the
//! generated gRPC client (no subscriber library), so every rule is checked
//! on the wire: authentication, hello deadline, request size cap, one
//! unacknowledged response, stale nonces, NACKs, latest-wins, shutdown.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use keyway_snapshot::pb::snapshot_service_client::SnapshotServiceClient;
use keyway_snapshot::pb::{self, SnapshotResponse, SubscribeRequest};
use keyway_snapshot::server::{Publisher, ServeOptions};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

/// An open Subscribe call: send requests with `tx`, read responses.
struct Raw {
    tx: mpsc::Sender<SubscribeRequest>,
    rx: Streaming<SnapshotResponse>,
}

async fn call(endpoint: &str, token: Option<&str>) -> Result<Raw, Status> {
    let mut client = SnapshotServiceClient::connect(endpoint.to_string())
        .await
        .unwrap()
        .max_decoding_message_size(keyway_snapshot::MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel(8);
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let rx = client.subscribe(req).await?.into_inner();
    Ok(Raw { tx, rx })
}

fn hello(applied: Option<pb::Version>) -> SubscribeRequest {
    SubscribeRequest {
        node_id: "raw".into(),
        applied,
        role: "test".into(),
        ..Default::default()
    }
}

fn answer(nonce: &str, applied: Option<pb::Version>, error: &str) -> SubscribeRequest {
    SubscribeRequest {
        node_id: "raw".into(),
        applied,
        response_nonce: nonce.into(),
        error_detail: error.into(),
        role: "test".into(),
        ..Default::default()
    }
}

/// A hello from a subscriber that applies deltas.
fn delta_hello(applied: Option<pb::Version>) -> SubscribeRequest {
    SubscribeRequest {
        accepts_deltas: true,
        ..hello(applied)
    }
}

fn lease_names(leases: &[pb::Lease]) -> Vec<&str> {
    leases.iter().map(|l| l.name.as_str()).collect()
}

fn removed_names(refs: &[pb::ObjectRef]) -> Vec<&str> {
    refs.iter().map(|r| r.name.as_str()).collect()
}

/// `n` leases, with lease `l{edited}` pointing elsewhere when given.
fn many(n: usize, edited: Option<usize>) -> pb::Snapshot {
    pb::Snapshot {
        leases: (0..n)
            .map(|i| {
                let mut l = lease(&format!("l{i:06}"), 0, "10.0.0.1");
                l.lease_hash = (i as u64).to_be_bytes().repeat(4);
                l.ip = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
                if edited == Some(i) {
                    l.target = Some(pb::lease::Target::Address("127.0.0.2:22".into()));
                }
                l
            })
            .collect(),
        generated_unix_ms: 1,
        ..Default::default()
    }
}

impl Raw {
    async fn send(&self, m: SubscribeRequest) {
        self.tx.send(m).await.unwrap();
    }

    async fn next(&mut self) -> SnapshotResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("no response in time")
            .unwrap()
            .expect("stream ended")
    }

    async fn error(&mut self) -> Status {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("no answer in time")
            .expect_err("expected the stream to fail")
    }
}

#[tokio::test]
async fn calls_without_the_right_bearer_token_are_refused() {
    let srv = Server::start(1).await;
    srv.publisher.publish(snap(1)).unwrap();
    for (token, why) in [
        (None, "missing authorization"),
        (Some("wrong"), "wrong snapshot token"),
        (Some(""), "wrong snapshot token"),
        (Some("secretX"), "wrong snapshot token"),
    ] {
        let status = call(&srv.endpoint, token).await.err().expect("accepted");
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
        assert!(status.message().contains(why), "{token:?}: {status}");
    }
    assert!(srv.publisher.subscribers().is_empty());
    assert_eq!(srv.publisher.totals().sent, 0);
}

#[tokio::test]
async fn one_unacked_response_stale_nonces_ignored_latest_wins() {
    let srv = Server::start(3).await;
    let p = &srv.publisher;
    let v1 = p.publish(snap(1)).unwrap();
    let mut raw = call(&srv.endpoint, Some(TOKEN)).await.unwrap();
    raw.send(hello(None)).await;
    let r1 = raw.next().await;
    assert_eq!(r1.version, Some(v1));
    assert_eq!(r1.snapshot.as_ref().unwrap().version, Some(v1));
    assert_eq!(r1.snapshot.as_ref().unwrap().leases.len(), 1);

    // Not acknowledged yet: newer versions must wait.
    p.publish(snap(2)).unwrap();
    // An answer with another nonce is ignored (it is not the ACK of r1).
    raw.send(answer("not-the-nonce", Some(v1), "")).await;
    let v3 = p.publish(snap(3)).unwrap();
    raw.send(answer(&r1.nonce, Some(v1), "")).await;
    // Had anything been sent before that ACK, it would be read first.
    let r3 = raw.next().await;
    assert_eq!(r3.version, Some(v3), "v2 or an early response was sent");
    assert_eq!(r3.snapshot.as_ref().unwrap().leases.len(), 3);
    assert_ne!(r3.nonce, r1.nonce);
    let t = p.totals();
    assert_eq!((t.sent, t.acks, t.nacks), (2, 1, 0));
    let s = &p.subscribers()[0];
    assert_eq!((s.acked, s.sent), (Some(v1), Some(v3)));
    assert!(!p.acked_by_all_connected(&v3));

    raw.send(answer(&r3.nonce, Some(v3), "")).await;
    until_acked(p, "raw", v3).await;
    assert!(p.acked_by_all_connected(&v3));
}

#[tokio::test]
async fn a_nacked_version_is_not_resent_and_claims_of_other_writers_do_not_count() {
    let srv = Server::start(3).await;
    let p = &srv.publisher;
    let v1 = p.publish(snap(1)).unwrap();
    let mut raw = call(&srv.endpoint, Some(TOKEN)).await.unwrap();
    // Holds a version of another epoch: not ours, not "acked".
    raw.send(hello(Some(v(2, 40)))).await;
    let r1 = raw.next().await;
    assert_eq!(p.subscribers()[0].acked, None);
    raw.send(answer(&r1.nonce, Some(v(2, 40)), "bad lease"))
        .await;
    let s = until("the NACK", || {
        p.subscribers().into_iter().find(|s| s.nack_count == 1)
    })
    .await;
    assert_eq!(s.last_nack_version, Some(v1));
    assert_eq!(s.last_nack_error.as_deref(), Some("bad lease"));
    assert_eq!(s.acked, None);
    assert!(!p.acked_by_all_connected(&v1));

    // Same content: same version, nothing new. A newer one is the next response.
    assert_eq!(p.publish(snap(1)).unwrap(), v1);
    let v2 = p.publish(snap(2)).unwrap();
    let r2 = raw.next().await;
    assert_eq!(r2.version, Some(v2), "the NACKed version was resent");
    raw.send(answer(&r2.nonce, Some(v2), "")).await;
    until_acked(p, "raw", v2).await;
    let t = p.totals();
    assert_eq!((t.sent, t.acks, t.nacks), (2, 1, 1));
}

#[tokio::test]
async fn the_current_version_is_sent_even_to_a_holder() {
    let srv = Server::start(3).await;
    let v1 = srv.publisher.publish(snap(1)).unwrap();
    let mut raw = call(&srv.endpoint, Some(TOKEN)).await.unwrap();
    raw.send(hello(Some(v1))).await;
    // A claim of one of our versions counts at once...
    let r = raw.next().await;
    assert_eq!(srv.publisher.subscribers()[0].acked, Some(v1));
    // ...and the full state is still sent (acked as a no-op) to a
    // subscriber without deltas; one with deltas gets an empty delta.
    assert_eq!(r.version, Some(v1));
    assert!(r.snapshot.is_some());
    let mut raw = call(&srv.endpoint, Some(TOKEN)).await.unwrap();
    raw.send(delta_hello(Some(v1))).await;
    let r = raw.next().await;
    assert_eq!(r.version, Some(v1));
    assert!(r.snapshot.is_none());
    let d = r.delta.unwrap();
    assert_eq!((d.base, d.version), (Some(v1), Some(v1)));
    assert!(keyway_snapshot::delta::is_empty(&d));
}

#[tokio::test]
async fn a_delta_subscriber_gets_the_changes_since_what_it_holds() {
    let srv = Server::start(3).await;
    let p = &srv.publisher;
    let v1 = p.publish(snap(1)).unwrap();
    p.publish(snap(2)).unwrap();
    let v3 = p.publish(snap(3)).unwrap();
    let mut raw = call(&srv.endpoint, Some(TOKEN)).await.unwrap();
    raw.send(delta_hello(Some(v1))).await;
    // Two published steps, merged into one delta from the held version.
    let r = raw.next().await;
    assert_eq!(r.version, Some(v3));
    assert!(r.snapshot.is_none());
    let d = r.delta.unwrap();
    assert_eq!((d.base, d.version), (Some(v1), Some(v3)));
    assert_eq!(lease_names(&d.upserted_leases), ["l2", "l3"]);
    assert!(d.removed_leases.is_empty());
    raw.send(answer(&r.nonce, Some(v3), "")).await;
    until_acked(p, "raw", v3).await;

    // Next: only what changed, from the ACKed version.
    let mut fewer = snap(3);
    fewer.leases.remove(1);
    let v4 = p.publish(fewer).unwrap();
    let r = raw.next().await;
    let d = r.delta.unwrap();
    assert_eq!((d.base, d.version), (Some(v3), Some(v4)));
    assert!(d.upserted_leases.is_empty());
    assert_eq!(removed_names(&d.removed_leases), ["l2"]);
    raw.send(answer(&r.nonce, Some(v4), "")).await;
    until_acked(p, "raw", v4).await;

    let t = p.totals();
    assert_eq!((t.sent, t.full_sent, t.deltas_sent), (2, 0, 2));
    let s = &p.subscribers()[0];
    assert!(s.accepts_deltas);
    assert_eq!((s.full_sent, s.deltas_sent), (0, 2));
    assert_eq!(s.bytes_sent, t.bytes_sent);
}

#[tokio::test]
async fn deltas_published_while_unacked_merge_per_key() {
    let srv = Server::start(3).await;
    let p = &srv.publisher;
    let v1 = p.publish(snap(5)).unwrap();
    let mut raw = call(&srv.endpoint, Some(TOKEN)).await.unwrap();
    raw.send(delta_hello(Some(v1))).await;
    let r = raw.next().await;
    // While the empty delta is unacknowledged: l6 added then removed, l2
    // removed, l1 changed twice.
    p.publish(snap(6)).unwrap();
    let mut s = snap(5);
    s.leases.remove(1);
    s.leases[0].user = "first".into();
    p.publish(s.clone()).unwrap();
    s.leases[0].user = "second".into();
    let last = p.publish(s).unwrap();
    raw.send(answer(&r.nonce, Some(v1), "")).await;
    let r = raw.next().await;
    assert_eq!(r.version, Some(last));
    let d = r.delta.unwrap();
    assert_eq!(d.base, Some(v1));
    assert_eq!(lease_names(&d.upserted_leases), ["l1"]);
    assert_eq!(d.upserted_leases[0].user, "second");
    // A merged delta may name a key that the held snapshot lacks (l6);
    // removing an absent key is a no-op for the subscriber.
    assert_eq!(removed_names(&d.removed_leases), ["l2", "l6"]);
}

#[tokio::test]
async fn a_nacked_delta_is_followed_by_the_whole_snapshot() {
    let srv = Server::start(3).await;
    let p = &srv.publisher;
    let v1 = p.publish(snap(1)).unwrap();
    let mut raw = call(&srv.endpoint, Some(TOKEN)).await.unwrap();
    raw.send(delta_hello(Some(v1))).await;
    let r = raw.next().await;
    raw.send(answer(&r.nonce, Some(v1), "")).await;
    until_acked(p, "raw", v1).await;
    let v2 = p.publish(snap(2)).unwrap();
    let r = raw.next().await;
    assert!(r.delta.is_some());
    raw.send(answer(&r.nonce, Some(v1), "cannot apply")).await;
    // Never the same delta again, never a delta from what it may not hold:
    // the next version comes whole.
    let v3 = p.publish(snap(3)).unwrap();
    let r = raw.next().await;
    assert_eq!(r.version, Some(v3));
    assert!(r.delta.is_none());
    assert_eq!(r.snapshot.as_ref().unwrap().leases.len(), 3);
    raw.send(answer(&r.nonce, Some(v3), "")).await;
    until_acked(p, "raw", v3).await;
    let s = &p.subscribers()[0];
    assert_eq!(s.last_nack_version, Some(v2));
    // Once a full snapshot is acked, deltas resume.
    let v4 = p.publish(snap(4)).unwrap();
    let r = raw.next().await;
    let d = r.delta.unwrap();
    assert_eq!((d.base, d.version), (Some(v3), Some(v4)));
}

#[tokio::test]
async fn versions_of_another_epoch_or_none_get_the_whole_snapshot() {
    let srv = Server::start(3).await;
    let v1 = srv.publisher.publish(snap(2)).unwrap();
    for held in [None, Some(v(2, 1)), Some(v(3, 7))] {
        let mut raw = call(&srv.endpoint, Some(TOKEN)).await.unwrap();
        raw.send(delta_hello(held)).await;
        let r = raw.next().await;
        assert_eq!(r.version, Some(v1), "{held:?}");
        assert!(r.delta.is_none(), "{held:?}");
        assert_eq!(r.snapshot.unwrap().leases.len(), 2, "{held:?}");
    }
}

#[tokio::test]
async fn a_one_lease_edit_costs_the_same_bytes_whatever_the_lease_count() {
    let mut sizes = Vec::new();
    for n in [100, 20_000] {
        let srv = Server::start(3).await;
        let p = &srv.publisher;
        let v1 = p.publish(many(n, None)).unwrap();
        let mut raw = call(&srv.endpoint, Some(TOKEN)).await.unwrap();
        raw.send(delta_hello(Some(v1))).await;
        let r = raw.next().await;
        raw.send(answer(&r.nonce, Some(v1), "")).await;
        until_acked(p, "raw", v1).await;
        let before = p.totals().bytes_sent;
        p.publish(many(n, Some(42))).unwrap();
        let r = raw.next().await;
        let d = r.delta.as_ref().unwrap();
        assert_eq!(lease_names(&d.upserted_leases), ["l000042"]);
        let wire = prost::Message::encoded_len(&r);
        // What the publisher counts is what went out.
        until("the bytes counted", || {
            (p.totals().bytes_sent > before).then_some(())
        })
        .await;
        assert_eq!(p.totals().bytes_sent - before, wire as u64);
        sizes.push(wire);
    }
    // Equal but for the random nonce's encoding (same length: hex of 16).
    assert_eq!(sizes[0], sizes[1], "{sizes:?}");
    assert!(sizes[0] < 4096, "{sizes:?}");
}

#[tokio::test]
async fn a_claim_beyond_what_was_published_does_not_count() {
    let srv = Server::start(3).await;
    srv.publisher.publish(snap(1)).unwrap();
    let mut raw = call(&srv.endpoint, Some(TOKEN)).await.unwrap();
    raw.send(hello(Some(v(3, 9)))).await;
    raw.next().await;
    assert_eq!(srv.publisher.subscribers()[0].acked, None);
}

#[tokio::test]
async fn a_silent_peer_is_dropped_at_the_hello_deadline() {
    let options = ServeOptions {
        hello_deadline: Duration::from_millis(200),
        ..ServeOptions::new(TOKEN.into())
    };
    let srv = Server::start_at(Publisher::new(1), "127.0.0.1".parse().unwrap(), 0, options).await;
    srv.publisher.publish(snap(1)).unwrap();
    let mut raw = call(&srv.endpoint, Some(TOKEN)).await.unwrap();
    // No hello; `raw.tx` stays open so the request stream does not end.
    let status = raw.error().await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status}");
    assert!(srv.publisher.subscribers().is_empty());
    assert_eq!(srv.publisher.totals().sent, 0);
}

#[tokio::test]
async fn oversized_requests_end_the_stream() {
    let srv = Server::start(1).await;
    srv.publisher.publish(snap(1)).unwrap();
    let mut raw = call(&srv.endpoint, Some(TOKEN)).await.unwrap();
    let mut big = hello(None);
    big.node_id = "x".repeat(100 * 1024);
    raw.send(big).await;
    let status = raw.error().await;
    assert_eq!(status.code(), Code::OutOfRange, "{status}");
    assert!(srv.publisher.subscribers().is_empty());
}

#[tokio::test]
async fn shutdown_ends_streams_in_every_state() {
    // A long hello deadline: only shutdown can end the silent stream.
    let options = ServeOptions {
        hello_deadline: Duration::from_secs(3600),
        ..ServeOptions::new(TOKEN.into())
    };
    let srv = Server::start_at(Publisher::new(1), "127.0.0.1".parse().unwrap(), 0, options).await;
    let publisher = srv.publisher.clone();
    publisher.publish(snap(1)).unwrap();
    // Before its hello.
    let silent = call(&srv.endpoint, Some(TOKEN)).await.unwrap();
    // Waiting for an ACK that never comes.
    let mut unacked = call(&srv.endpoint, Some(TOKEN)).await.unwrap();
    unacked.send(hello(None)).await;
    unacked.next().await;
    // Acked and waiting for a newer version.
    let mut idle = call(&srv.endpoint, Some(TOKEN)).await.unwrap();
    idle.send(hello(None)).await;
    let r = idle.next().await;
    idle.send(answer(&r.nonce, r.version, "")).await;
    until_acked(&publisher, "raw", v(1, 1)).await;

    srv.stop().await;
    assert!(publisher.subscribers().iter().all(|s| !s.connected));
    drop(silent);
}
