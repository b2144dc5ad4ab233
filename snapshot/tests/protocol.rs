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
    // ...and the full state is still sent (acked as a no-op).
    assert_eq!(r.version, Some(v1));
    assert!(r.snapshot.is_some());
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
