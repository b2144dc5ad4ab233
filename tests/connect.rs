//! CONNECT over TLS end to end: the real OpenSSH client with
//! `ProxyCommand='keyway tcp %h:%p --listen - …'` through the gateway's HTTPS
//! listener to a real sshd VM, with a local-mode operator deciding routes.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

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

    // bob's key is not allowed on alice's route: 403 with the reason.
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
    // Nothing there: 404 naming the authority.
    let o = c.keyway_tcp("nowhere.example:22", Some("alice"));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("404") && err.contains("no route for nowhere.example:22"),
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

/// Sends `POST /tunnel/{hash}/tcp` over TLS with `headers`; returns the
/// status line and, after a 101, the first line the VM sends.
fn upgrade(c: &Connect, hash: &str, headers: &[(&str, String)]) -> (String, String) {
    use rustls::pki_types::pem::PemObject;
    use std::io::{BufRead, BufReader, Write};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(&c.tls.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let addr = c.url.trim_start_matches("https://");
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(cfg), "127.0.0.1".try_into().unwrap())
            .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
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
fn the_upgrade_endpoint_takes_good_signatures_and_refuses_bad_and_replayed_ones() {
    let c = start();
    let lease = &c.st.leases["alice-1"];
    let mut hash = [0u8; 32];
    hex::decode_to_slice(&lease.hash, &mut hash).unwrap();
    let alice = ssh_key::PrivateKey::read_openssh_file(c.st.key_path("alice")).unwrap();
    let bob = ssh_key::PrivateKey::read_openssh_file(c.st.key_path("bob")).unwrap();
    let plain = keyway_tunnel::upgrade::sign_plain(&alice, &hash).unwrap();

    // The plain X-Signature of existing clients: accepted (and replayable).
    let (status, banner) = upgrade(&c, &lease.hash, &[("X-Signature", plain.clone())]);
    assert!(status.contains("101"), "{status}\n{}", c.st.proxy_log());
    assert!(banner.starts_with("SSH-2.0"), "{banner}");
    // A signature by a key the lease does not carry: 403.
    let bad = keyway_tunnel::upgrade::sign_plain(&bob, &hash).unwrap();
    let (status, _) = upgrade(&c, &lease.hash, &[("X-Signature", bad)]);
    assert!(status.contains("403"), "{status}");
    // The fresh proof: accepted once, refused when replayed.
    let now = keyway_tunnel::proof::unix_now();
    let fresh =
        keyway_tunnel::proof::sign(&alice, &keyway_tunnel::upgrade::authority(&lease.hash), now)
            .unwrap();
    let (status, banner) = upgrade(&c, &lease.hash, &[("Proxy-Authorization", fresh.clone())]);
    assert!(
        status.contains("101") && banner.starts_with("SSH-2.0"),
        "{status} {banner}"
    );
    let (status, _) = upgrade(&c, &lease.hash, &[("Proxy-Authorization", fresh)]);
    assert!(status.contains("403"), "a replayed proof: {status}");
    assert!(c.st.proxy_log().contains("proof replayed"));
    // No lease by that hash: 404.
    let (status, _) = upgrade(&c, &"ab".repeat(32), &[("X-Signature", plain)]);
    assert!(status.contains("404"), "{status}");
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
fn fresh_proofs_can_be_required_on_the_upgrade_endpoint() {
    let c = start_with(&["--require-fresh-upgrade-proofs"]);
    let lease = &c.st.leases["alice-1"];
    let mut hash = [0u8; 32];
    hex::decode_to_slice(&lease.hash, &mut hash).unwrap();
    let alice = ssh_key::PrivateKey::read_openssh_file(c.st.key_path("alice")).unwrap();
    let plain = keyway_tunnel::upgrade::sign_plain(&alice, &hash).unwrap();
    let (status, _) = upgrade(&c, &lease.hash, &[("X-Signature", plain)]);
    assert!(status.contains("403"), "{status}");
    assert!(c.st.proxy_log().contains("requires a fresh proof"));
    let now = keyway_tunnel::proof::unix_now();
    let fresh =
        keyway_tunnel::proof::sign(&alice, &keyway_tunnel::upgrade::authority(&lease.hash), now)
            .unwrap();
    let (status, banner) = upgrade(&c, &lease.hash, &[("Proxy-Authorization", fresh)]);
    assert!(
        status.contains("101") && banner.starts_with("SSH-2.0"),
        "{status} {banner}"
    );
}
