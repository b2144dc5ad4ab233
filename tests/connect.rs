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
    let certs = tempfile::tempdir().unwrap();
    let tls = make_tls(certs.path());
    let https = free_port();
    let url = format!("https://127.0.0.1:{https}");
    let st = Stack::start(
        &["127.0.55.1"],
        &[
            LeaseSpec::new("alice-1", "alice"),
            LeaseSpec::new("bob-1", "bob"),
        ],
        &[
            "--https-listen",
            &format!("127.0.0.1:{https}"),
            "--tls-cert",
            tls.cert.to_str().unwrap(),
            "--tls-key",
            tls.key.to_str().unwrap(),
            "--lease-domain",
            "vm.test",
        ],
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
    use std::io::{BufRead, BufReader};
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
    let mut banner = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut banner)
        .unwrap();
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
