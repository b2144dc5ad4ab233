//! CONNECT over TLS through `keyway-proxy` vs HAProxy terminating the same
//! TLS in `mode tcp`, side by side: one client (rustls), one sink, the same
//! certificate; the only difference is the CONNECT request line. Run by
//! `make bench`; figures go to BENCHMARKS.md.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyway_e2e::stack::{free_port, http_get};
use keyway_e2e::{Proc, bin, make_tls, wait_for, write_file};

const BYTES: u64 = 1 << 30;
const RUNS: usize = 3;

/// Reads every connection to EOF, then closes it.
fn sink() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = vec![0u8; 256 * 1024];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

fn client_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// Sends BYTES through TLS to `addr` (after CONNECT when `connect` names an
/// authority) and returns the time until the far side closed.
fn transfer(addr: SocketAddr, tls: &Arc<rustls::ClientConfig>, connect: Option<&str>) -> Duration {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    let conn = rustls::ClientConnection::new(tls.clone(), "127.0.0.1".try_into().unwrap()).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let start = Instant::now();
    if let Some(a) = connect {
        write!(s, "CONNECT {a} HTTP/1.1\r\nHost: {a}\r\n\r\n").unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        assert!(
            String::from_utf8_lossy(&head).contains(" 200 "),
            "{}",
            String::from_utf8_lossy(&head)
        );
    }
    let chunk = vec![0x5au8; 256 * 1024];
    let mut sent = 0u64;
    while sent < BYTES {
        s.write_all(&chunk).unwrap();
        sent += chunk.len() as u64;
    }
    s.conn.send_close_notify();
    s.flush().unwrap();
    let _ = s.sock.shutdown(std::net::Shutdown::Write);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    start.elapsed()
}

/// One CONNECT answered 200 (the route reached the gateway).
fn route_ready(https: SocketAddr, cc: &Arc<rustls::ClientConfig>) -> Option<()> {
    let tcp = TcpStream::connect(https).ok()?;
    let conn = rustls::ClientConnection::new(cc.clone(), "127.0.0.1".try_into().ok()?).ok()?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    write!(
        s,
        "CONNECT sink.bench:9 HTTP/1.1\r\nHost: sink.bench:9\r\n\r\n"
    )
    .ok()?;
    let mut b = [0u8; 12];
    s.read_exact(&mut b).ok()?;
    String::from_utf8_lossy(&b).contains("200").then_some(())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tls = make_tls(dir);
    let sink = sink();
    // keyway: a local-mode operator with one open CONNECT route to the sink.
    let local = dir.join("local");
    std::fs::create_dir_all(&local).unwrap();
    write_file(
        &local.join("route.yaml"),
        &format!(
            "apiVersion: keyway.dev/v1alpha1\nkind: SshRoute\nmetadata:\n  name: sink\n\
             spec:\n  from: tcp+https://sink.bench:9\n  to: tcp://{sink}\n  allowUnauthenticated: true\n"
        ),
    );
    let mut op = Command::new(bin("keyway-operator"));
    op.args(["run", "--local"])
        .arg(&local)
        .args(["--grpc-listen", &format!("127.0.0.1:{}", free_port())]);
    let _op = Proc::spawn(op, &dir.join("operator.log")).unwrap();
    wait_for(Duration::from_secs(30), "the operator", || {
        local.join(".keyway/operator.json").exists().then_some(())
    })
    .unwrap();
    let https: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut px = Command::new(bin("keyway-proxy"));
    px.args(["run", "--local"])
        .arg(&local)
        .args(["--ssh-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-listen", &metrics.to_string()])
        .args(["--https-listen", &https.to_string()])
        .arg("--tls-cert")
        .arg(&tls.cert)
        .arg("--tls-key")
        .arg(&tls.key)
        .env("RUST_LOG", "warn");
    let _px = Proc::spawn(px, &dir.join("proxy.log")).unwrap();
    wait_for(Duration::from_secs(30), "the gateway ready", || {
        http_get(metrics, "/readyz")
            .ok()
            .filter(|(c, _)| *c == 200)
            .map(|_| ())
    })
    .unwrap();
    // HAProxy terminating the same certificate, forwarding to the same sink.
    let pem = dir.join("haproxy.pem");
    let mut both = std::fs::read(&tls.cert).unwrap();
    both.extend(std::fs::read(&tls.key).unwrap());
    std::fs::write(&pem, both).unwrap();
    let hport = free_port();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 64\n  tune.ssl.default-dh-param 2048\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend tls\n  bind 127.0.0.1:{hport} ssl crt {}\n  default_backend sink\n\
             backend sink\n  server s {sink}\n",
            pem.display()
        ),
    )
    .unwrap();
    let mut hp = Command::new("haproxy");
    hp.arg("-db").arg("-f").arg(&cfg);
    let _hp = Proc::spawn(hp, &dir.join("haproxy.log")).unwrap();
    let haddr: SocketAddr = format!("127.0.0.1:{hport}").parse().unwrap();
    wait_for(Duration::from_secs(20), "haproxy", || {
        TcpStream::connect(haddr).ok().map(|_| ())
    })
    .unwrap();

    let cc = client_config(&tls.ca);
    // Warm up both (and wait for the route to reach the gateway).
    wait_for(Duration::from_secs(30), "the CONNECT route", || {
        route_ready(https, &cc)
    })
    .unwrap();
    let (mut best_k, mut best_h) = (Duration::MAX, Duration::MAX);
    for _ in 0..RUNS {
        best_k = best_k.min(transfer(https, &cc, Some("sink.bench:9")));
        best_h = best_h.min(transfer(haddr, &cc, None));
    }
    let mib_s = |d: Duration| (BYTES as f64 / (1024.0 * 1024.0)) / d.as_secs_f64();
    let table = format!(
        "| 1 GiB client → sink over TLS (best of {RUNS}) | time | MiB/s | ratio | target |\n|---|---|---|---|---|\n\
         | keyway-proxy CONNECT (rustls) | {:.2} s | {:.0} | {:.2}x | ≥ 0.8x |\n\
         | HAProxy `mode tcp`, `ssl crt` (OpenSSL) | {:.2} s | {:.0} | 1.00x | — |\n",
        best_k.as_secs_f64(),
        mib_s(best_k),
        best_h.as_secs_f64() / best_k.as_secs_f64(),
        best_h.as_secs_f64(),
        mib_s(best_h),
    );
    keyway_e2e::bench_report(&table);
}
