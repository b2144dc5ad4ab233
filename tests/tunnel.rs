//! Provider tunnels: `keyway-proxy agent` serving `/xe/tunnel/2.0.0` over
//! libp2p, with real sshd VMs and the real OpenSSH client.
//!
//! `a_vm_behind_its_own_network_namespace` builds two network namespaces the
//! test owns: `gw` (operator, gateway, the ssh client) and `prov` (the agent
//! and a VM listening only on prov's own loopback). A veth pair joins them;
//! the only way from the gateway to the VM is the agent.
//!
//! `agent_handshakes` talks the protocol itself (a libp2p host in the test)
//! to an agent on loopback: good, settled, wrong-provider, unknown and
//! stalled handshakes, and settlement of an open tunnel.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use keyway_e2e::stack::*;
use keyway_e2e::*;
use keyway_tunnel::p2p::{DialError, Host, HostConfig};
use keyway_tunnel::xe;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A network namespace that lives as long as the value.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("kw{tag}{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("`ip` (Debian iproute2) is needed; `make deps` installs it");
        assert!(
            ok.success(),
            "ip netns add {name} failed (the test needs root, as CI has)"
        );
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// `program` run inside the namespace.
    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// GET over HTTP/1.0 from inside the namespace (bash's /dev/tcp).
    fn http_get(&self, addr: &str, path: &str) -> Option<String> {
        let (host, port) = addr.rsplit_once(':')?;
        let script = format!(
            "exec 3<>/dev/tcp/{host}/{port} && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
        );
        let mut c = self.cmd("bash");
        c.args(["-c", &script]);
        let out = run_with_timeout(c, Duration::from_secs(10));
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ready_rows(dir: &Path, n: usize) -> Vec<serde_json::Value> {
    wait_for(Duration::from_secs(30), "leases Ready", || {
        let rows = status_json(dir).ok()?;
        (rows.iter().filter(|r| r["phase"] == "Ready").count() == n).then_some(rows)
    })
    .unwrap()
}

fn row<'a>(rows: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    rows.iter().find(|r| r["name"] == name).unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_vm_behind_its_own_network_namespace() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("local");
    let keys = tmp.path().join("keys");
    let vms = tmp.path().join("vms");
    for d in [&dir, &keys, &vms] {
        std::fs::create_dir_all(d).unwrap();
    }
    let gw = Netns::new("gw");
    let prov = Netns::new("pv");
    // A veth pair created straight into the two namespaces.
    let (va, vb) = (
        format!("kwa{}", std::process::id()),
        format!("kwb{}", std::process::id()),
    );
    sh(&[
        "ip", "link", "add", &va, "netns", &gw.name, "type", "veth", "peer", "name", &vb, "netns",
        &prov.name,
    ]);
    sh(&[
        "ip",
        "-n",
        &gw.name,
        "addr",
        "add",
        "10.77.0.1/24",
        "dev",
        &va,
    ]);
    sh(&[
        "ip",
        "-n",
        &prov.name,
        "addr",
        "add",
        "10.77.0.2/24",
        "dev",
        &vb,
    ]);
    sh(&["ip", "-n", &gw.name, "link", "set", &va, "up"]);
    sh(&["ip", "-n", &prov.name, "link", "set", &vb, "up"]);

    let alice = new_public_key(&keys, "alice");
    let identity = tmp.path().join("agent-identity");
    let peer = agent_peer_id(&identity);
    write_file(&dir.join("pool.yaml"), &pool_yaml("pool", &["127.0.10.1"]));
    let lease = |settled: bool| {
        provider_lease_yaml(
            "nat-vm",
            "alice",
            &alice,
            &peer,
            &["/ip4/10.77.0.2/tcp/4001".to_string()],
        ) + &format!("  settled: {settled}\n")
    };
    write_file(&dir.join("leases.yaml"), &lease(false));

    // The operator, in gw, serving snapshots on the veth so the agent can
    // subscribe across it.
    let mut op = gw.cmd(bin("keyway-operator"));
    op.args(["run", "--local"])
        .arg(&dir)
        .args(["--grpc-listen", "10.77.0.1:7070", "--rescan-secs", "5"])
        .env("RUST_LOG", "info");
    let mut operator = Proc::spawn(op, &tmp.path().join("operator.log")).unwrap();
    let rows = wait_for(Duration::from_secs(30), "the provider lease Ready", || {
        assert!(operator.running(), "{}", operator.output());
        let rows = status_json(&dir).ok()?;
        (rows.len() == 1 && rows[0]["phase"] == "Ready").then_some(rows)
    })
    .unwrap();
    let (ip, hash, trust) = (
        rows[0]["ip"].as_str().unwrap().to_string(),
        rows[0]["leaseHash"].as_str().unwrap().to_string(),
        rows[0]["relayTrust"].as_str().unwrap().to_string(),
    );
    assert_eq!(ip, "127.0.10.1");

    // The VM: sshd on prov's own loopback only.
    std::fs::create_dir_all(vms.join("nat-vm")).unwrap();
    std::fs::write(
        vms.join("nat-vm/authorized_keys"),
        format!("{trust}\n{alice}\n"),
    )
    .unwrap();
    let mut vm = prov.cmd(repo_root().join("scripts/vm.sh"));
    vm.arg(&vms).args(["nat-vm", "127.0.0.1", "2200"]);
    let mut vm = Proc::spawn(vm, &vms.join("nat-vm.log")).unwrap();

    // The agent beside it.
    let agent_metrics = "127.0.0.1:9091";
    let mut ag = prov.cmd(bin("keyway-proxy"));
    ag.args(["agent", "--local"])
        .arg(&dir)
        .arg("--identity")
        .arg(&identity)
        .args([
            "--listen",
            "/ip4/10.77.0.2/tcp/4001",
            "--forward",
            "127.0.0.1:2200",
            "--metrics-listen",
            agent_metrics,
            "--cache",
        ])
        .arg(tmp.path().join("agent-snapshot.pb"))
        .env("RUST_LOG", "info,keyway_proxy=debug");
    let mut agent = Proc::spawn(ag, &tmp.path().join("agent.log")).unwrap();

    // The gateway, in gw.
    let mut px = gw.cmd(bin("keyway-proxy"));
    px.args(["run", "--local"])
        .arg(&dir)
        .args([
            "--ssh-listen",
            "127.0.10.1:2222",
            "--metrics-listen",
            "127.0.0.1:9090",
        ])
        .env("RUST_LOG", "info,keyway_proxy=debug");
    let mut proxy = Proc::spawn(px, &tmp.path().join("proxy.log")).unwrap();
    for (what, ns, addr, p) in [
        ("agent", &prov, agent_metrics, &mut agent),
        ("gateway", &gw, "127.0.0.1:9090", &mut proxy),
    ] {
        wait_for(Duration::from_secs(30), &format!("{what} ready"), || {
            assert!(p.running(), "{what} exited:\n{}", p.output());
            ns.http_get(addr, "/readyz")
                .filter(|b| b.contains(" 200 "))
                .map(|_| ())
        })
        .unwrap();
    }
    assert!(vm.running(), "{}", vm.output());
    assert!(
        agent
            .output()
            .contains(&format!("listening on /ip4/10.77.0.2/tcp/4001/p2p/{peer}")),
        "the agent says where it listens:\n{}",
        agent.output()
    );

    // From gw, the VM itself is out of reach: nothing listens on gw's
    // 127.0.0.1:2200, and prov's loopback is not routed.
    let mut probe = gw.cmd("bash");
    probe.args(["-c", "exec 3<>/dev/tcp/127.0.0.1/2200"]);
    assert!(
        !run_with_timeout(probe, Duration::from_secs(10))
            .status
            .success()
    );

    let cfg = tmp.path().join("ssh_config");
    std::fs::write(
        &cfg,
        format!(
            "Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  IdentitiesOnly yes\n  BatchMode yes\n  LogLevel ERROR\n  ConnectTimeout 10\n  IdentityFile {}\n",
            keys.join("alice").display()
        ),
    )
    .unwrap();
    let ssh = |args: &[&str]| {
        let mut c = gw.cmd("ssh");
        c.arg("-F").arg(&cfg).args(["-p", "2222"]).args(args);
        c
    };

    // Relay: ssh to the pooled IP, the gateway logs in through the tunnel.
    let out = run_with_timeout(
        ssh(&["127.0.10.1", "echo $KEYWAY_VM; hostname"]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out), "nat-vm\nnat-vm", "{}", text(&out));

    // direct-tcpip: ssh -J <hash>@gateway, end to end with the VM's sshd.
    let jump = format!("{hash}@127.0.10.1:2222");
    let out = run_with_timeout(
        ssh(&["-J", &jump, "root@vm.invalid", "echo $KEYWAY_VM"]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out), "nat-vm");

    // 8 MiB each way through the tunnel.
    let out = run_with_timeout(
        ssh(&[
            "127.0.10.1",
            "head -c 8388608 /dev/zero | sha256sum | cut -c1-16",
        ]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out), "2daeb1f36095b44b");

    let agent_metric = |name: &str, needles: &[&str]| {
        metric_sum(
            &prov.http_get(agent_metrics, "/metrics").unwrap_or_default(),
            name,
            needles,
        )
    };
    assert!(agent_metric("keyway_agent_handshakes_total", &["result=\"ok\""]) >= 2.0);
    let gw_metrics = gw.http_get("127.0.0.1:9090", "/metrics").unwrap();
    assert!(
        metric_sum(
            &gw_metrics,
            "keyway_upstream_connect_duration_seconds_count",
            &["kind=\"libp2p\"", "result=\"ok\""]
        ) >= 2.0,
        "{gw_metrics}"
    );

    // A session held open; settling the lease closes it and its tunnel.
    let mut held = ssh(&["-J", &jump, "root@vm.invalid", "sleep 120"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(30), "a tunnel open", || {
        (agent_metric("keyway_agent_tunnels_active", &[]) >= 1.0).then_some(())
    })
    .unwrap();
    write_file(&dir.join("leases.yaml"), &lease(true));
    wait_for(Duration::from_secs(30), "the held session closed", || {
        held.try_wait().unwrap().map(|_| ())
    })
    .unwrap();
    wait_for(
        Duration::from_secs(30),
        "the agent's tunnels closed",
        || (agent_metric("keyway_agent_tunnels_active", &[]) == 0.0).then_some(()),
    )
    .unwrap();
    let out = run_with_timeout(ssh(&["127.0.10.1", "true"]), Duration::from_secs(60));
    assert!(!out.status.success(), "a settled lease still routes");
    drop((operator, proxy, agent, vm));
}

/// An agent on loopback and a test-side libp2p host speaking the protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_handshakes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("local");
    std::fs::create_dir_all(&dir).unwrap();
    let identity = tmp.path().join("agent-identity");
    let peer = agent_peer_id(&identity);
    let other = agent_peer_id(&tmp.path().join("other-identity"));
    let key = new_public_key(tmp.path(), "alice");
    // The "VM": a TCP server that greets, then echoes.
    let vm = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let vm_addr = vm.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = vm.accept().await {
            tokio::spawn(async move {
                s.write_all(b"SSH-2.0-test-vm\r\n").await?;
                let (mut r, mut w) = s.split();
                tokio::io::copy(&mut r, &mut w).await
            });
        }
    });
    let agent_port = free_port();
    let addr = format!("/ip4/127.0.0.1/tcp/{agent_port}");
    let leases = |settled_mine: bool| {
        [
            provider_lease_yaml("mine", "alice", &key, &peer, std::slice::from_ref(&addr))
                + &format!("  settled: {settled_mine}\n"),
            provider_lease_yaml("theirs", "bob", &key, &other, std::slice::from_ref(&addr)),
            provider_lease_yaml("gone", "carol", &key, &peer, std::slice::from_ref(&addr))
                + "  settled: true\n",
        ]
        .join("---\n")
    };
    write_file(&dir.join("pool.yaml"), &pool_yaml("pool", &["127.0.61.1"]));
    write_file(&dir.join("leases.yaml"), &leases(false));
    let _operator = Operator::start(&dir).unwrap();
    let rows = ready_rows(&dir, 2);
    let hash_of = |rows: &[serde_json::Value], name: &str| -> [u8; 32] {
        hex::decode(row(rows, name)["leaseHash"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap()
    };
    let (mine, theirs) = (hash_of(&rows, "mine"), hash_of(&rows, "theirs"));
    let gone = {
        let all = status_json(&dir).unwrap();
        hash_of(&all, "gone")
    };

    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new(bin("keyway-proxy"));
    cmd.args(["agent", "--local"])
        .arg(&dir)
        .arg("--identity")
        .arg(&identity)
        .args(["--listen", &addr, "--forward", &vm_addr.to_string()])
        .args(["--metrics-listen", &metrics_addr.to_string()])
        .args(["--handshake-timeout-secs", "2"])
        .env("RUST_LOG", "info,keyway_proxy=debug");
    let mut agent = Proc::spawn(cmd, &tmp.path().join("agent.log")).unwrap();
    wait_for(Duration::from_secs(30), "the agent ready", || {
        assert!(agent.running(), "{}", agent.output());
        http_get(metrics_addr, "/readyz")
            .ok()
            .filter(|(c, _)| *c == 200)
    })
    .unwrap();
    let scrape = || {
        http_get(metrics_addr, "/metrics")
            .map(|x| x.1)
            .unwrap_or_default()
    };

    let host = Host::start(
        libp2p::identity::Keypair::generate_ed25519(),
        HostConfig::default(),
    )
    .unwrap();
    let open = |hash: [u8; 32]| {
        let host = host.clone();
        let (peer, addr) = (peer.clone(), addr.clone());
        async move { host.open(&peer, &[addr], &hash).await }
    };

    // Good: the VM's greeting, then an echo.
    let mut s = open(mine).await.unwrap();
    let mut greeting = [0u8; 17];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"SSH-2.0-test-vm\r\n");
    s.write_all(b"ping").await.unwrap();
    s.flush().await.unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");

    // Refusals carry a message.
    for (hash, expect) in [
        (theirs, "another provider"),
        (gone, "no live lease"),
        ([0xab; 32], "no live lease"),
    ] {
        match open(hash).await {
            Err(DialError::Handshake(xe::OpenError::Refused(m))) => {
                assert!(m.contains(expect), "{m}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a tunnel for {} was accepted", hex::encode(hash)),
        }
    }

    // A stalled handshake: a raw stream that never sends the hash is
    // dropped by the agent at its deadline (2 s here).
    let mut raw = host
        .open_raw(&peer, std::slice::from_ref(&addr))
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1];
    let ended = tokio::time::timeout(Duration::from_secs(30), raw.read(&mut buf)).await;
    assert!(
        matches!(ended, Ok(Ok(0)) | Ok(Err(_))),
        "the stalled stream was not closed: {ended:?}"
    );
    eprintln!("stalled handshake dropped after {:?}", started.elapsed());
    wait_for(Duration::from_secs(10), "the timeout counted", || {
        (metric_sum(
            &scrape(),
            "keyway_agent_handshakes_total",
            &["result=\"timeout\""],
        ) == 1.0)
            .then_some(())
    })
    .unwrap();

    // Settling the lease closes the open tunnel.
    assert_eq!(
        metric_sum(&scrape(), "keyway_agent_tunnels_active", &[]),
        1.0
    );
    write_file(&dir.join("leases.yaml"), &leases(true));
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the tunnel outlived its lease");
    let text = scrape();
    assert_eq!(metric_sum(&text, "keyway_agent_tunnels_active", &[]), 0.0);
    assert_eq!(
        metric_sum(&text, "keyway_agent_tunnels_settled_total", &[]),
        1.0
    );
    assert_eq!(
        metric_sum(
            &text,
            "keyway_agent_handshakes_total",
            &["result=\"wrong_provider\""]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(
            &text,
            "keyway_agent_handshakes_total",
            &["result=\"unknown_lease\""]
        ),
        2.0
    );
    match open(mine).await {
        Err(DialError::Handshake(xe::OpenError::Refused(m))) => {
            assert!(m.contains("no live lease"))
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a settled lease's tunnel was accepted"),
    }
    agent.stop(Duration::from_secs(5));
}
