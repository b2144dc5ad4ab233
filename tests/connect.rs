//! CONNECT over TLS end to end: the real OpenSSH client with
//! `ProxyCommand='keyway tcp %h:%p --listen - …'` through the gateway's HTTPS
//! listener to a real sshd VM, with a local-mode operator deciding routes;
//! the HTTPS listener's own limits under an idle-socket flood, refusals that
//! do not tell live names from unknown ones, fresh upgrade proofs by
//! default, and PROXY headers of other transports refused.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyway_e2e::stack::*;
use keyway_e2e::*;

struct Connect {
    st: Stack,
    tls: TlsFiles,
    url: String,
    _certs: tempfile::TempDir,
}

fn start() -> Connect {
    start_with(&[])
}

fn start_with(extra: &[&str]) -> Connect {
    let certs = tempfile::tempdir().unwrap();
    let tls = make_tls(certs.path());
    let https = free_port();
    let url = format!("https://127.0.0.1:{https}");
    let mut args = tls.proxy_args(https);
    args.extend(["--lease-domain", "vm.test"].map(String::from));
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let st = Stack::start(
        &["127.0.55.1"],
        &[
            LeaseSpec::new("alice-1", "alice"),
            LeaseSpec::new("bob-1", "bob"),
        ],
        &args,
    )
    .unwrap();
    // Two CONNECT routes to alice's VM: one for alice's key, one open.
    let vm = st.leases["alice-1"].target.clone();
    write_file(
        &st.dir.join("routes.yaml"),
        &format!(
            "apiVersion: keyway.dev/v1alpha1\nkind: SshRoute\nmetadata:\n  name: alice-https\n\
             spec:\n  from: tcp+https://vm.example:22\n  to: tcp://{vm}\n  allowPublicKeys:\n    - \"{}\"\n\
             ---\napiVersion: keyway.dev/v1alpha1\nkind: SshRoute\nmetadata:\n  name: open\n\
             spec:\n  from: tcp+https://open.example:22\n  to: tcp://{vm}\n  allowUnauthenticated: true\n",
            st.public_key("alice")
        ),
    );
    let c = Connect {
        st,
        tls,
        url,
        _certs: certs,
    };
    // The routes are in the gateway's snapshot once the open one answers.
    wait_for(Duration::from_secs(30), "the CONNECT routes", || {
        let o = c.keyway_tcp("open.example:22", None);
        String::from_utf8_lossy(&o.stdout)
            .starts_with("SSH-2.0")
            .then_some(())
    })
    .unwrap();
    c
}

impl Connect {
    fn proxy_command(&self, key: &str) -> String {
        format!(
            "{} tcp %h:%p --listen - --url {} --ca {} -i {}",
            bin("keyway").display(),
            self.url,
            self.tls.ca.display(),
            self.st.key_path(key).display()
        )
    }

    fn ssh(&self, key: &str, host: &str) -> std::process::Output {
        let mut c = Command::new("ssh");
        c.arg("-F")
            .arg(self.st.ssh_config(&[key]))
            .arg("-o")
            .arg(format!("ProxyCommand={}", self.proxy_command(key)))
            .args(["-p", "22", host, "echo $KEYWAY_VM"]);
        run_with_timeout(c, Duration::from_secs(60))
    }

    /// `keyway tcp TARGET` with stdin closed: prints the backend's banner or
    /// the refusal.
    fn keyway_tcp(&self, target: &str, key: Option<&str>) -> std::process::Output {
        let mut c = Command::new(bin("keyway"));
        c.args(["tcp", target, "--listen", "-", "--url", &self.url])
            .arg("--ca")
            .arg(&self.tls.ca)
            .stdin(Stdio::null());
        if let Some(k) = key {
            c.arg("-i").arg(self.st.key_path(k));
        }
        run_with_timeout(c, Duration::from_secs(30))
    }
}

#[test]
fn ssh_through_connect_over_tls_with_a_key_proof() {
    let c = start();
    // alice's key proves the route; ssh lands in alice's VM.
    let o = c.ssh("alice", "vm.example");
    assert!(o.status.success(), "{o:?}\n{}", c.st.proxy_log());
    assert_eq!(stdout(&o), "alice-1");
    // A lease by name under --lease-domain, for the lease's own keys.
    let o = c.ssh("bob", "bob-1.default.vm.test");
    assert!(o.status.success(), "{o:?}\n{}", c.st.proxy_log());
    assert_eq!(stdout(&o), "bob-1");

    // bob's key is not allowed on alice's route: 403 with the reason (which
    // a name nothing routes gets too, see below).
    let o = c.keyway_tcp("vm.example:22", Some("bob"));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("403") && err.contains("not allowed on this route"),
        "{err}"
    );
    // No key at all: 403 too.
    let err = String::from_utf8_lossy(&c.keyway_tcp("vm.example:22", None).stderr).to_string();
    assert!(err.contains("403"), "{err}");
    // Another user's lease by name: 403.
    let err = String::from_utf8_lossy(
        &c.keyway_tcp("alice-1.default.vm.test:22", Some("bob"))
            .stderr,
    )
    .to_string();
    assert!(err.contains("403"), "{err}");
    // Nothing there: the same 403 as a route the key is not on, so the
    // answer does not say which names exist.
    let o = c.keyway_tcp("nowhere.example:22", Some("alice"));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("403")
            && err.contains("not allowed on this route (or no route has this name)"),
        "{err}"
    );
    // The wrong CA: the client refuses the gateway.
    let mut cmd = Command::new(bin("keyway"));
    cmd.args(["tcp", "open.example:22", "--listen", "-", "--url", &c.url])
        .arg("--ca")
        .arg(c.st.key_path("alice").with_extension("pub"))
        .stdin(Stdio::null());
    assert!(
        !run_with_timeout(cmd, Duration::from_secs(30))
            .status
            .success()
    );
    assert!(c.st.metric("keyway_connect_requests_total", &["forbidden"]) >= 3.0);
    assert!(c.st.metric("keyway_connect_requests_total", &["not_found"]) >= 1.0);
}

#[test]
fn withdrawing_a_route_closes_its_open_tunnels() {
    let c = start();
    let mut child = Command::new(bin("keyway"))
        .args(["tcp", "open.example:22", "--listen", "-", "--url", &c.url])
        .arg("--ca")
        .arg(&c.tls.ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let banner = first_line(&mut child);
    assert!(banner.starts_with("SSH-2.0"), "{banner:?}");
    // Keep only alice's route: the open one is withdrawn.
    let text = std::fs::read_to_string(c.st.dir.join("routes.yaml")).unwrap();
    let kept = text.split("---").next().unwrap().to_string();
    write_file(&c.st.dir.join("routes.yaml"), &kept);
    let closed = wait_for(Duration::from_secs(30), "the tunnel to close", || {
        child.try_wait().unwrap().map(|_| ())
    });
    assert!(closed.is_ok(), "{closed:?}\n{}", c.st.proxy_log());
    assert!(c.st.proxy_log().contains("closing the CONNECT tunnel"));
}

/// A rustls client trusting the test CA.
fn tls_client(c: &Connect) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(&c.tls.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// TLS to the gateway's HTTPS listener over `tcp`.
fn tls_over(
    c: &Connect,
    tcp: TcpStream,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let conn =
        rustls::ClientConnection::new(tls_client(c), "127.0.0.1".try_into().unwrap()).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// The HTTPS listener's `host:port`.
fn https_addr(c: &Connect) -> String {
    c.url.trim_start_matches("https://").to_string()
}

/// Sends one request head over TLS and returns every byte of the answer
/// (the gateway closes after a refusal).
fn exchange(c: &Connect, head: &str) -> Vec<u8> {
    let mut tls = tls_over(c, TcpStream::connect(https_addr(c)).unwrap());
    tls.write_all(head.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut b = [0u8; 4096];
    // EOF, or a TLS close without close_notify: either ends the answer.
    while let Ok(n) = tls.read(&mut b) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[..n]);
    }
    out
}

/// Sends `POST /tunnel/{hash}/tcp` over TLS with `headers`; returns the
/// status line and, after a 101, the first line the VM sends.
fn upgrade(c: &Connect, hash: &str, headers: &[(&str, String)]) -> (String, String) {
    use std::io::{BufRead, BufReader};
    let addr = https_addr(c);
    let mut tls = tls_over(c, TcpStream::connect(&addr).unwrap());
    let mut req = format!(
        "POST /tunnel/{hash}/tcp HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    tls.write_all(req.as_bytes()).unwrap();
    let mut r = BufReader::new(tls);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap() == 0 || l == "\r\n" {
            break;
        }
    }
    let mut first = String::new();
    if status.contains(" 101 ") {
        r.read_line(&mut first).unwrap();
    }
    (status.trim().to_string(), first.trim().to_string())
}

#[test]
fn the_upgrade_endpoint_takes_fresh_proofs_once_and_refuses_x_signature_by_default() {
    // The old flag still starts the gateway (a deprecated no-op, with a
    // warning), and the default it asked for is now everyone's.
    let c = start_with(&["--require-fresh-upgrade-proofs"]);
    assert!(
        c.st.proxy_log()
            .contains("--require-fresh-upgrade-proofs is deprecated"),
        "{}",
        c.st.proxy_log()
    );
    let lease = &c.st.leases["alice-1"];
    let mut hash = [0u8; 32];
    hex::decode_to_slice(&lease.hash, &mut hash).unwrap();
    let alice = ssh_key::PrivateKey::read_openssh_file(c.st.key_path("alice")).unwrap();
    let bob = ssh_key::PrivateKey::read_openssh_file(c.st.key_path("bob")).unwrap();

    // The plain X-Signature, even a good one by alice: refused by default.
    let plain = keyway_tunnel::upgrade::sign_plain(&alice, &hash).unwrap();
    let (status, _) = upgrade(&c, &lease.hash, &[("X-Signature", plain.clone())]);
    eprintln!("a good X-Signature without --allow-replayable-upgrade-proofs: {status}");
    assert!(status.contains("403"), "{status}");
    assert!(c.st.proxy_log().contains("requires a fresh proof"));
    // The fresh proof: accepted once, refused when replayed.
    let authority = keyway_tunnel::upgrade::authority(&lease.hash);
    let now = keyway_tunnel::proof::unix_now();
    let fresh = keyway_tunnel::proof::sign(&alice, &authority, now).unwrap();
    let (status, banner) = upgrade(&c, &lease.hash, &[("Proxy-Authorization", fresh.clone())]);
    assert!(
        status.contains("101") && banner.starts_with("SSH-2.0"),
        "{status} {banner}\n{}",
        c.st.proxy_log()
    );
    let (status, _) = upgrade(&c, &lease.hash, &[("Proxy-Authorization", fresh)]);
    assert!(status.contains("403"), "a replayed proof: {status}");
    assert!(c.st.proxy_log().contains("proof replayed"));
    // A fresh proof by a key the lease does not carry: 403.
    let by_bob = keyway_tunnel::proof::sign(&bob, &authority, now).unwrap();
    let (status, _) = upgrade(&c, &lease.hash, &[("Proxy-Authorization", by_bob)]);
    assert!(status.contains("403"), "{status}");
    // No lease by that hash: the same 403 a live one gives that request.
    let (status, _) = upgrade(&c, &"ab".repeat(32), &[("X-Signature", plain)]);
    assert!(status.contains("403"), "{status}");
}

#[test]
fn keyway_tcp_signs_with_an_ssh_agent() {
    let c = start();
    let sock = c.st.tmp.path().join("agent.sock");
    let mut agent = Command::new("ssh-agent");
    agent.arg("-D").arg("-a").arg(&sock);
    let _agent = Proc::spawn(agent, &c.st.tmp.path().join("agent.log")).unwrap();
    wait_for(Duration::from_secs(10), "ssh-agent", || {
        sock.exists().then_some(())
    })
    .unwrap();
    let st = Command::new("ssh-add")
        .arg(c.st.key_path("alice"))
        .env("SSH_AUTH_SOCK", &sock)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let run = |identity: Option<std::path::PathBuf>| {
        let mut cmd = Command::new(bin("keyway"));
        cmd.args(["tcp", "vm.example:22", "--listen", "-", "--url", &c.url])
            .arg("--ca")
            .arg(&c.tls.ca)
            .env("SSH_AUTH_SOCK", &sock)
            .stdin(Stdio::null());
        if let Some(i) = identity {
            cmd.arg("-i").arg(i);
        }
        run_with_timeout(cmd, Duration::from_secs(30))
    };
    // The agent's key chosen by its public half, and the agent's first key.
    for id in [Some(c.st.key_path("alice").with_extension("pub")), None] {
        let o = run(id.clone());
        assert!(
            String::from_utf8_lossy(&o.stdout).starts_with("SSH-2.0"),
            "{id:?}: {o:?}\n{}",
            c.st.proxy_log()
        );
    }
    // A key the agent does not hold: a clear error.
    let o = run(Some(c.st.key_path("bob").with_extension("pub")));
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("ssh-agent refused to sign"),
        "{o:?}"
    );
}

#[test]
fn x_signature_works_only_with_the_explicit_flag_and_is_then_replayable() {
    let c = start_with(&["--allow-replayable-upgrade-proofs"]);
    let lease = &c.st.leases["alice-1"];
    let mut hash = [0u8; 32];
    hex::decode_to_slice(&lease.hash, &mut hash).unwrap();
    let alice = ssh_key::PrivateKey::read_openssh_file(c.st.key_path("alice")).unwrap();
    let bob = ssh_key::PrivateKey::read_openssh_file(c.st.key_path("bob")).unwrap();
    let plain = keyway_tunnel::upgrade::sign_plain(&alice, &hash).unwrap();
    // The same header twice: both open a tunnel (what the flag accepts).
    for i in 1..=2 {
        let (status, banner) = upgrade(&c, &lease.hash, &[("X-Signature", plain.clone())]);
        eprintln!("X-Signature use #{i} with the flag: {status}");
        assert!(
            status.contains("101") && banner.starts_with("SSH-2.0"),
            "{status} {banner}\n{}",
            c.st.proxy_log()
        );
    }
    // A signature by a key the lease does not carry: 403.
    let bad = keyway_tunnel::upgrade::sign_plain(&bob, &hash).unwrap();
    let (status, _) = upgrade(&c, &lease.hash, &[("X-Signature", bad)]);
    assert!(status.contains("403"), "{status}");
}

#[test]
fn refusals_are_byte_identical_for_live_and_unknown_names() {
    let c = start();
    let lease = c.st.leases["alice-1"].clone();
    let connect = |authority: &str, proof: Option<String>| {
        let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some(p) = proof {
            head.push_str(&format!("Proxy-Authorization: {p}\r\n"));
        }
        head.push_str("\r\n");
        exchange(&c, &head)
    };
    let bob = ssh_key::PrivateKey::read_openssh_file(c.st.key_path("bob")).unwrap();
    let now = keyway_tunnel::proof::unix_now();
    let by_bob = |authority: &str| Some(keyway_tunnel::proof::sign(&bob, authority, now).unwrap());
    let mut pairs = vec![
        // A live lease by name and an unknown one, without a proof.
        (
            "lease name, no proof",
            connect("alice-1.default.vm.test:22", None),
            connect("nobody-1.default.vm.test:22", None),
        ),
        // A route and a name nothing routes, without a proof.
        (
            "route, no proof",
            connect("vm.example:22", None),
            connect("nowhere.example:22", None),
        ),
        // A valid proof by a key that is not the lease's (bob's).
        (
            "lease name, another key's proof",
            connect(
                "alice-1.default.vm.test:22",
                by_bob("alice-1.default.vm.test:22"),
            ),
            connect(
                "nobody-1.default.vm.test:22",
                by_bob("nobody-1.default.vm.test:22"),
            ),
        ),
    ];
    // The upgrade endpoint: a live lease hash and an unknown one.
    let post = |hash: &str| {
        exchange(
            &c,
            &format!(
                "POST /tunnel/{hash}/tcp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n"
            ),
        )
    };
    pairs.push((
        "upgrade, no proof",
        post(&lease.hash),
        post(&"ab".repeat(32)),
    ));
    for (what, live, unknown) in &pairs {
        eprintln!(
            "{what}: live and unknown both answer {} bytes:\n{}",
            live.len(),
            String::from_utf8_lossy(live)
        );
        assert!(
            live.starts_with(b"HTTP/1.1 403 "),
            "{what}: {}",
            String::from_utf8_lossy(live)
        );
        assert_eq!(
            String::from_utf8_lossy(live),
            String::from_utf8_lossy(unknown),
            "{what}"
        );
    }
    // The operator still sees which was which.
    assert!(c.st.metric("keyway_connect_requests_total", &["not_found"]) >= 4.0);
    assert!(c.st.metric("keyway_connect_requests_total", &["forbidden"]) >= 4.0);
    // After a valid proof the truth may show: alice's key reaches her VM.
    let o = c.keyway_tcp("alice-1.default.vm.test:22", Some("alice"));
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("SSH-2.0"),
        "{o:?}"
    );
}

/// A v2 PROXY header (`PROXY` command) for `fam` (0x11 TCP over IPv4,
/// 0x12 UDP over IPv4) from 198.51.100.7:50000 to `dst`.
fn proxy_v2(fam: u8, dst: std::net::SocketAddrV4) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, fam, 0, 12, 198, 51, 100, 7]);
    h.extend_from_slice(&dst.ip().octets());
    h.extend_from_slice(&50000u16.to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

/// A TCP connection from `src` (a loopback address) to `dst`.
fn connect_from(src: &str, dst: std::net::SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{src}:0").parse().unwrap()).unwrap();
        s.connect(dst).await.unwrap()
    });
    let s = s.into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Bytes until the peer closes (or a reset); the peer must close.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = [0u8; 1024];
    loop {
        match s.read(&mut b) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("the gateway did not close the connection: {e}"),
        }
    }
}

#[test]
fn a_proxy_v2_udp_header_from_a_trusted_edge_is_refused_on_both_listeners() {
    const EDGE: &str = "127.0.77.9";
    let c = start_with(&["--trusted-proxy-cidrs", EDGE]);
    let ip: std::net::Ipv4Addr = c.st.leases["alice-1"].ip.parse().unwrap();
    let ssh = std::net::SocketAddrV4::new(ip, c.st.ssh_port);
    let https: std::net::SocketAddrV4 = https_addr(&c).parse().unwrap();
    let ssh_before =
        c.st.metric("keyway_ssh_connections_total", &["proxy_header_refused"]);
    let https_before =
        c.st.metric("keyway_https_connections_total", &["proxy_header_refused"]);

    // UDP (DGRAM) headers: both listeners close without a byte.
    for dst in [ssh, https] {
        let mut s = connect_from(EDGE, dst.into());
        s.write_all(&proxy_v2(0x12, dst)).unwrap();
        let got = read_to_close(&mut s);
        assert!(got.is_empty(), "{dst}: {:?}", String::from_utf8_lossy(&got));
    }
    let ssh_refused =
        c.st.metric("keyway_ssh_connections_total", &["proxy_header_refused"]);
    let https_refused =
        c.st.metric("keyway_https_connections_total", &["proxy_header_refused"]);
    eprintln!(
        "UDP headers refused: SSH {ssh_before} -> {ssh_refused}, HTTPS {https_before} -> {https_refused}"
    );
    assert_eq!(ssh_refused, ssh_before + 1.0);
    assert_eq!(https_refused, https_before + 1.0);
    let log = c.st.proxy_log();
    assert_eq!(
        log.matches("the transport is DGRAM (UDP)").count(),
        2,
        "{log}"
    );

    // The same edge with TCP headers is served: the SSH banner, and a
    // CONNECT through TLS after the header.
    let mut s = connect_from(EDGE, ssh.into());
    s.write_all(&proxy_v2(0x11, ssh)).unwrap();
    let mut b = [0u8; 64];
    let n = s.read(&mut b).unwrap();
    assert!(
        b[..n].starts_with(b"SSH-2.0-"),
        "{:?}",
        String::from_utf8_lossy(&b[..n])
    );
    let mut s = connect_from(EDGE, https.into());
    s.write_all(&proxy_v2(0x11, https)).unwrap();
    let mut tls = tls_over(&c, s);
    tls.write_all(b"CONNECT open.example:22 HTTP/1.1\r\nHost: open.example:22\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("SSH-2.0-") {
        let n = tls.read(&mut b).unwrap();
        assert!(n > 0, "{:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&b[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200 "),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
}

#[test]
fn an_idle_socket_flood_on_https_locks_out_neither_ssh_nor_connect_users() {
    const FLOOD: usize = 300;
    // The flood and the clients' sockets in this process.
    rlimit::increase_nofile_limit(4096).unwrap();
    // Smaller than the flood on both listeners: before the HTTPS listener
    // had caps of its own, 300 idle sockets here took all 200 of the SSH
    // listener's permits and 5 of 5 SSH logins were refused.
    let c = start_with(&[
        "--max-connections",
        "200",
        "--https-max-connections",
        "150",
        "--https-max-unauthenticated",
        "100",
        "--https-handshake-timeout-secs",
        "20",
    ]);
    let ip = c.st.leases["alice-1"].ip.clone();
    let https = |r: &str| {
        c.st.metric("keyway_https_connections_total", &[&format!("\"{r}\"")])
    };
    let (accepted0, refused0, evicted0, timeout0) = (
        https("accepted"),
        https("refused_limit"),
        https("evicted_unauthenticated"),
        https("handshake_timeout"),
    );
    let ssh_refused0 =
        c.st.metric("keyway_ssh_connections_total", &["refused_limit"]);

    // From 30 addresses, 10 sockets each: a spread-out flood, within the
    // per-source limits, so only the listener's own caps stand against it.
    let dst: std::net::SocketAddr = https_addr(&c).parse().unwrap();
    let t0 = Instant::now();
    let flood: Vec<TcpStream> = (0..FLOOD)
        .map(|i| connect_from(&format!("127.0.1.{}", i % 30 + 1), dst))
        .collect();
    // Every flood socket accepted or refused by the gateway.
    wait_for(
        Duration::from_secs(60),
        "the gateway to see the flood",
        || {
            let seen = https("accepted") - accepted0 + https("refused_limit") - refused0;
            (seen >= FLOOD as f64).then_some(())
        },
    )
    .unwrap();
    let refused = https("refused_limit") - refused0;
    let evicted = https("evicted_unauthenticated") - evicted0;
    eprintln!(
        "{FLOOD} idle sockets in {:?}: HTTPS refused_limit {refused}, evicted_unauthenticated {evicted}, \
         open {}; SSH open {}",
        t0.elapsed(),
        c.st.metric("keyway_https_connections_open", &[]),
        c.st.metric("keyway_ssh_connections_open", &[])
    );
    // At most 100 may wait at once, so at least 200 were refused or evicted.
    assert!(
        refused + evicted >= (FLOOD - 100) as f64,
        "{refused} + {evicted}"
    );
    assert!(c.st.metric("keyway_https_connections_open", &[]) <= 150.0);

    // SSH logins with the real client while the flood holds its sockets.
    for i in 1..=5 {
        let t = Instant::now();
        let o = c.st.ssh_output(&["alice"], &[&ip, "echo $KEYWAY_VM"]);
        eprintln!(
            "SSH login {i} of 5 during the flood: {} in {:?}",
            if o.status.success() { "ok" } else { "refused" },
            t.elapsed()
        );
        assert_eq!(stdout(&o), "alice-1", "{o:?}\n{}", c.st.proxy_log());
    }
    assert_eq!(
        c.st.metric("keyway_ssh_connections_total", &["refused_limit"]),
        ssh_refused0
    );
    // A CONNECT user gets in too: a new connection evicts an idle one.
    let t = Instant::now();
    let o = c.ssh("alice", "vm.example");
    eprintln!(
        "ssh through CONNECT during the flood: {:?} in {:?}",
        o.status,
        t.elapsed()
    );
    assert_eq!(stdout(&o), "alice-1", "{o:?}\n{}", c.st.proxy_log());
    // EOF (or a reset) on a socket the gateway closed; WouldBlock on one
    // still waiting.
    let closed = flood
        .iter()
        .filter(|s| {
            let mut r: &TcpStream = s;
            r.set_nonblocking(true).unwrap();
            !matches!(r.read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count();
    eprintln!("flood sockets the gateway had closed by then: {closed} of {FLOOD}");

    // The idle sockets still held are closed at the handshake deadline.
    wait_for(
        Duration::from_secs(90),
        "the idle HTTPS sockets closed",
        || (c.st.metric("keyway_https_connections_open", &[]) == 0.0).then_some(()),
    )
    .unwrap();
    let timeouts = https("handshake_timeout") - timeout0;
    eprintln!(
        "after the deadline: handshake_timeout {timeouts}, evicted_unauthenticated {}, HTTPS open 0",
        https("evicted_unauthenticated") - evicted0
    );
    assert!(timeouts >= 1.0);
    drop(flood);
}

#[test]
fn one_source_cannot_hold_or_churn_the_https_listener() {
    // One source holds idle sockets, another opens and drops connections
    // in a loop; each is cut off by its own per-source limit, and users
    // elsewhere (the CONNECT client and ssh, from 127.0.0.1) get in.
    rlimit::increase_nofile_limit(4096).unwrap();
    const HOLDER: &str = "127.0.2.1";
    const CHURNER: &str = "127.0.2.2";
    let c = start_with(&[
        "--handshake-burst-per-source",
        "40",
        "--handshakes-per-source-per-sec",
        "1",
        "--max-unauthenticated-per-source",
        "32",
    ]);
    let ip = c.st.leases["alice-1"].ip.clone();
    let dst: std::net::SocketAddr = https_addr(&c).parse().unwrap();
    let https = |r: &str| {
        c.st.metric("keyway_https_connections_total", &[&format!("\"{r}\"")])
    };
    let (pending0, rate0) = (
        https("refused_source_pending"),
        https("refused_source_rate"),
    );

    // 100 idle sockets from one address: 32 wait for the handshake
    // deadline, the rest are closed before any TLS work.
    let held: Vec<TcpStream> = (0..100).map(|_| connect_from(HOLDER, dst)).collect();
    wait_for(
        Duration::from_secs(60),
        "the holder's sockets past its pending cap refused",
        || (https("refused_source_pending") - pending0 >= 68.0).then_some(()),
    )
    .unwrap();
    // 100 connections opened and dropped from another: its bucket of 40
    // (refilling at 1/s) runs dry.
    for _ in 0..100 {
        drop(connect_from(CHURNER, dst));
    }
    wait_for(
        Duration::from_secs(60),
        "the churner refused by its handshake rate",
        || (https("refused_source_rate") - rate0 >= 1.0).then_some(()),
    )
    .unwrap();
    let (pending, rate) = (
        https("refused_source_pending") - pending0,
        https("refused_source_rate") - rate0,
    );
    eprintln!(
        "one source holding 100 idle sockets, another churning 100: refused_source_pending {pending}, \
         refused_source_rate {rate}, HTTPS open {}",
        c.st.metric("keyway_https_connections_open", &[])
    );
    assert_eq!(pending, 68.0, "the holder keeps exactly its 32 pending");
    // The SSH listener's table is its own: nothing was refused there.
    assert_eq!(
        c.st.metric("keyway_ssh_connections_total", &["refused_source_pending"])
            + c.st
                .metric("keyway_ssh_connections_total", &["refused_source_rate"]),
        0.0
    );
    // Others get in through both listeners.
    let o = c.ssh("alice", "vm.example");
    assert_eq!(stdout(&o), "alice-1", "{o:?}\n{}", c.st.proxy_log());
    let o = c.st.ssh_output(&["alice"], &[&ip, "echo $KEYWAY_VM"]);
    assert_eq!(stdout(&o), "alice-1", "{o:?}\n{}", c.st.proxy_log());
    // The holder itself still gets a place once one of its sockets goes.
    drop(held);
    wait_for(
        Duration::from_secs(30),
        "the holder's sockets closed",
        || (c.st.metric("keyway_https_connections_open", &[]) == 0.0).then_some(()),
    )
    .unwrap();
    let mut tls = tls_over(&c, connect_from(HOLDER, dst));
    tls.write_all(b"CONNECT open.example:22 HTTP/1.1\r\nHost: open.example:22\r\n\r\n")
        .unwrap();
    let mut b = [0u8; 12];
    tls.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"HTTP/1.1 200");
}
