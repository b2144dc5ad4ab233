//! Throughput through the provider tunnel vs plain TCP on loopback, side by
//! side in one run: the same sender (this process), the same sink, 1 GiB
//! per transfer. Paths:
//! - plain TCP straight to the sink;
//! - plain TCP through one relay hop (HAProxy `mode tcp`), the same hop
//!   count as the tunnel;
//! - `/xe/tunnel/2.0.0` over libp2p TCP + noise + yamux to a release
//!   `keyway-proxy agent`, which forwards to the sink;
//! - the same over libp2p QUIC.
//!
//! Run by `make bench`; figures go to BENCHMARKS.md.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use keyway_e2e::stack::{free_port, http_get};
use keyway_e2e::*;
use keyway_tunnel::p2p::{Host, HostConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const BYTES: u64 = 1 << 30;
const RUNS: usize = 3;

/// Reads every connection to EOF, then answers with one byte and closes, so
/// the sender's clock stops when the last byte has arrived.
async fn sink() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                while n < BYTES {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k as u64,
                    }
                }
                let _ = s.write_all(b"!").await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> Duration {
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < BYTES {
        s.write_all(&chunk).await.unwrap();
        sent += chunk.len() as u64;
    }
    s.flush().await.unwrap();
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await.unwrap();
    start.elapsed()
}

fn mib_s(d: Duration) -> f64 {
    (BYTES as f64 / (1024.0 * 1024.0)) / d.as_secs_f64()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn haproxy(dir: &std::path::Path, front: u16, to: SocketAddr) -> Proc {
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 64\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend f\n  bind 127.0.0.1:{front}\n  default_backend b\nbackend b\n  server s {to}\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&cfg);
    let mut p = Proc::spawn(cmd, &dir.join("haproxy.log")).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{front}").parse().unwrap();
    wait_for(Duration::from_secs(20), "haproxy listening", || {
        assert!(p.running(), "{}", p.output());
        std::net::TcpStream::connect(addr).ok().map(|_| ())
    })
    .unwrap();
    p
}

#[tokio::main]
async fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("local");
    std::fs::create_dir_all(&dir).unwrap();
    let sink = sink().await;
    let identity = tmp.path().join("agent-identity");
    let peer = agent_peer_id(&identity);
    let (tcp_port, quic_port) = (free_port(), free_port());
    let tcp_addr = format!("/ip4/127.0.0.1/tcp/{tcp_port}");
    let quic_addr = format!("/ip4/127.0.0.1/udp/{quic_port}/quic-v1");
    let key = new_public_key(tmp.path(), "u");
    write_file(&dir.join("pool.yaml"), &pool_yaml("pool", &["127.0.70.1"]));
    write_file(
        &dir.join("lease.yaml"),
        &provider_lease_yaml("bench", "u", &key, &peer, std::slice::from_ref(&tcp_addr)),
    );
    let _operator = Operator::start(&dir).unwrap();
    let hash: [u8; 32] = wait_for(Duration::from_secs(30), "the lease Ready", || {
        let rows = status_json(&dir).ok()?;
        let r = rows.first().filter(|r| r["phase"] == "Ready")?;
        hex::decode(r["leaseHash"].as_str()?).ok()?.try_into().ok()
    })
    .unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new(bin("keyway-proxy"));
    cmd.args(["agent", "--local"])
        .arg(&dir)
        .arg("--identity")
        .arg(&identity)
        .args(["--listen", &tcp_addr, "--listen", &quic_addr])
        .args(["--forward", &sink.to_string()])
        .args(["--metrics-listen", &metrics.to_string()]);
    let mut agent = Proc::spawn(cmd, &tmp.path().join("agent.log")).unwrap();
    wait_for(Duration::from_secs(30), "the agent ready", || {
        assert!(agent.running(), "{}", agent.output());
        http_get(metrics, "/readyz").ok().filter(|(c, _)| *c == 200)
    })
    .unwrap();
    let relay_port = free_port();
    let _haproxy = haproxy(tmp.path(), relay_port, sink);
    let relay: SocketAddr = format!("127.0.0.1:{relay_port}").parse().unwrap();
    // One host per transport: a host reuses whatever connection it has to
    // the agent, so a shared one would carry QUIC runs over TCP.
    let host = || {
        Host::start(
            libp2p::identity::Keypair::generate_ed25519(),
            HostConfig::default(),
        )
        .unwrap()
    };
    let (over_tcp, over_quic) = (host(), host());

    let names = [
        "plain TCP, direct",
        "plain TCP via HAProxy (1 hop)",
        "libp2p TCP+noise+yamux via agent",
        "libp2p QUIC via agent",
    ];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
    // Interleaved, so a noisy moment hurts every path alike.
    for _ in 0..RUNS {
        for (i, t) in times.iter_mut().enumerate() {
            let d = match i {
                0 => send(tokio::net::TcpStream::connect(sink).await.unwrap()).await,
                1 => send(tokio::net::TcpStream::connect(relay).await.unwrap()).await,
                2 => {
                    send(
                        over_tcp
                            .open(&peer, std::slice::from_ref(&tcp_addr), &hash)
                            .await
                            .unwrap(),
                    )
                    .await
                }
                _ => {
                    send(
                        over_quic
                            .open(&peer, std::slice::from_ref(&quic_addr), &hash)
                            .await
                            .unwrap(),
                    )
                    .await
                }
            };
            t.push(d);
        }
    }
    let med: Vec<Duration> = times.into_iter().map(median).collect();
    let mut table = format!(
        "1 GiB per transfer, sender in the bench process, sink on loopback; median of {RUNS} interleaved runs. \
         Ratios are throughput relative to the one-hop plain TCP relay (same hop count as the tunnel) and to direct TCP.\n\n\
         | path | median | MiB/s | vs 1-hop TCP | vs direct TCP |\n|---|---|---|---|---|\n"
    );
    for (name, d) in names.iter().zip(&med) {
        table.push_str(&format!(
            "| {name} | {:.2} s | {:.0} | {:.2}x | {:.2}x |\n",
            d.as_secs_f64(),
            mib_s(*d),
            med[1].as_secs_f64() / d.as_secs_f64(),
            med[0].as_secs_f64() / d.as_secs_f64(),
        ));
    }
    bench_report(&table);
    agent.stop(Duration::from_secs(5));
}
