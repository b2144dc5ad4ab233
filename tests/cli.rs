//! The `keyway` user CLI against a local-mode stack: `keyway ssh` and
//! `keyway config` reach each user's VM through the gateway with real ssh.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use keyway_e2e::stack::*;
use keyway_e2e::*;

const NO_PROMPTS: [&str; 6] = [
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
];

#[test]
fn keyway_ssh_and_keyway_config_land_in_the_right_vm() {
    let st = Stack::start(
        &["127.0.58.1", "127.0.58.2"],
        &[
            LeaseSpec::new("alice-1", "alice"),
            LeaseSpec::new("alice-2", "alice"),
            LeaseSpec::new("bob-1", "bob"),
        ],
        &[],
    )
    .unwrap();
    let port = st.ssh_port.to_string();
    for (name, l) in &st.leases {
        let mut c = Command::new(bin("keyway"));
        c.args(["ssh", name, "--local"])
            .arg(&st.dir)
            .args(["--port", &port, "-c", "echo $KEYWAY_VM", "-i"])
            .arg(st.key_path(&l.user))
            .arg("--")
            .args(NO_PROMPTS);
        let o = run_with_timeout(c, Duration::from_secs(60));
        assert!(o.status.success(), "{name}: {o:?}\n{}", st.proxy_log());
        assert_eq!(stdout(&o), *name);
    }
    // Unknown and ambiguous names are clear errors.
    let mut c = Command::new(bin("keyway"));
    c.args(["ssh", "nope", "--local"]).arg(&st.dir);
    let o = run_with_timeout(c, Duration::from_secs(30));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no lease \"nope\""));

    // keyway config: alice's Host blocks only, usable as an ssh_config.
    let mut c = Command::new(bin("keyway"));
    c.args(["config", "--user", "alice", "--local"])
        .arg(&st.dir)
        .args(["--port", &port, "-i"])
        .arg(st.key_path("alice"));
    let o = run_with_timeout(c, Duration::from_secs(30));
    assert!(o.status.success(), "{o:?}");
    let cfg = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        cfg.contains("Host alice-1.default.keyway") && !cfg.contains("bob-1"),
        "{cfg}"
    );
    let path = st.tmp.path().join("keyway_config");
    std::fs::write(&path, &cfg).unwrap();
    let mut c = Command::new("ssh");
    c.arg("-F")
        .arg(&path)
        .args(NO_PROMPTS)
        .args(["alice-2.default.keyway", "echo $KEYWAY_VM"]);
    let o = run_with_timeout(c, Duration::from_secs(60));
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o), "alice-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyway_config_reads_lease_status_from_the_cluster() {
    use keyway_e2e::cluster::*;
    let env = ClusterEnv::start().await.unwrap();
    env.create("ippools", pool_obj("public", &["127.0.59.1"]))
        .await
        .unwrap();
    env.create(
        "vmleases",
        lease_obj("team-a", "web", "alice", "public", &hex_key(1)),
    )
    .await
    .unwrap();
    let _op = env.operator("op-a", &[]).unwrap();
    wait_for(Duration::from_secs(60), "the lease Ready", || {
        env.ready_ips().contains_key("team-a/web").then_some(())
    })
    .unwrap();
    let mut c = Command::new(bin("keyway"));
    c.args(["config", "--user", "alice"])
        .env("KUBECONFIG", env.dir.path().join("kubeconfig-test"));
    let o = run_with_timeout(c, Duration::from_secs(30));
    assert!(o.status.success(), "{o:?}");
    let cfg = String::from_utf8_lossy(&o.stdout);
    assert!(
        cfg.contains("Host web.team-a.keyway\n  HostName 127.0.59.1\n  Port 22\n"),
        "{cfg}"
    );
}
