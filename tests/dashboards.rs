//! The Grafana dashboards (charts/keyway/dashboards/*.json) against a real
//! Prometheus: a cluster-mode operator (against the API double), a gateway
//! subscribed to it and a real-sshd VM carry real traffic (a relayed ssh
//! session, a refused key, a CONNECT nobody routes) while Prometheus (Debian
//! `prometheus`) scrapes both every second; then every query of every panel
//! must return data through Prometheus' HTTP API.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use keyway_e2e::cluster::*;
use keyway_e2e::stack::{free_port, http_get, repo_root, run_with_timeout, stdout};
use keyway_e2e::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
const POOL_IP: &str = "127.0.71.1";
const VM_IP: &str = "127.0.72.1";

/// Grafana's template variables, replaced by what Grafana would send.
fn concrete(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("${__rate_interval}", "1m")
        .replace("$__interval", "5s")
        .replace("$__range", "5m")
}

/// Every target expression of every panel (rows' nested panels included).
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((p["title"].as_str().unwrap_or("?").to_string(), e.into()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `/api/v1/query` for `expr`: the result array, or why there is none.
fn query(prom: SocketAddr, expr: &str) -> Result<Vec<Value>, String> {
    let (code, body) = http_get(
        prom,
        &format!("/api/v1/query?query={}", percent_encode(expr)),
    )
    .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{code}: {e}: {body}"))?;
    if v["status"] != "success" {
        return Err(format!("{code}: {body}"));
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_dashboard_panel_returns_data_from_a_real_prometheus() {
    let env = ClusterEnv::start().await.unwrap();
    let dir = env.dir.path().to_path_buf();
    let alice = new_public_key(&dir, "alice");
    new_public_key(&dir, "stranger");

    // A pool, a lease whose VM is a real sshd, and the operator.
    let vm_port = free_port();
    let vm_addr = format!("{VM_IP}:{vm_port}");
    env.create("ippools", pool_obj("public", &[POOL_IP]))
        .await
        .unwrap();
    env.create(
        "vmleases",
        json!({
            "apiVersion": "keyway.dev/v1alpha1", "kind": "VMLease",
            "metadata": {"name": "alice-web", "namespace": "t"},
            "spec": {"user": "alice", "poolRef": "public", "accessPublicKeys": [alice],
                     "target": {"address": vm_addr}},
        }),
    )
    .await
    .unwrap();
    let op = env.operator("op-a", &[]).unwrap();
    wait_for(WAIT, "the operator to lead", || op.ready().then_some(())).unwrap();
    let lease = wait_for(WAIT, "the lease Ready", || {
        env.lease("t", "alice-web")
            .filter(|l| l["status"]["phase"] == "Ready")
    })
    .unwrap();
    assert_eq!(lease["status"]["ip"], POOL_IP);
    let vms = dir.join("vms");
    std::fs::create_dir_all(vms.join("alice-web")).unwrap();
    std::fs::write(
        vms.join("alice-web/authorized_keys"),
        format!("{}\n", lease["status"]["relayTrust"].as_str().unwrap()),
    )
    .unwrap();
    let mut vm_cmd = Command::new(repo_root().join("scripts/vm.sh"));
    vm_cmd
        .arg(&vms)
        .args(["alice-web", VM_IP, &vm_port.to_string()]);
    let mut vm = Proc::spawn(vm_cmd, &dir.join("vm.log")).unwrap();
    let addr: SocketAddr = vm_addr.parse().unwrap();
    wait_for(Duration::from_secs(20), "the VM's sshd", || {
        (!vm.running() || TcpStream::connect(addr).is_ok()).then_some(())
    })
    .unwrap();
    assert!(vm.running(), "VM exited:\n{}", vm.output());

    // The gateway, subscribed to the operator, with a CONNECT listener.
    let tls = make_tls(&dir);
    let ssh_port = free_port();
    let https = free_port();
    let proxy_metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cmd = env.proxy_command(
        &op.endpoint(),
        &format!("{POOL_IP}:{ssh_port}"),
        proxy_metrics,
    );
    cmd.args(tls.proxy_args(https)).env("RUST_LOG", "info");
    let mut proxy = Proc::spawn(cmd, &dir.join("proxy.log")).unwrap();
    wait_for(WAIT, "the gateway ready", || {
        if !proxy.running() {
            return Some(());
        }
        http_get(proxy_metrics, "/readyz")
            .ok()
            .filter(|(code, _)| *code == 200)
            .map(|_| ())
    })
    .unwrap();
    assert!(proxy.running(), "gateway exited:\n{}", proxy.output());

    // Prometheus scraping both every second.
    let prom = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n\
             \x20 - job_name: keyway-operator\n    static_configs:\n      - targets: ['{}']\n\
             \x20 - job_name: keyway-proxy\n    static_configs:\n      - targets: ['{proxy_metrics}']\n",
            op.metrics
        ),
    )
    .unwrap();
    let mut prom_cmd = Command::new("prometheus");
    prom_cmd
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={prom}"))
        .stdin(Stdio::null());
    let mut prometheus = Proc::spawn(prom_cmd, &dir.join("prometheus.log"))
        .expect("prometheus (Debian prometheus) is needed; `make deps` installs it");
    wait_for(WAIT, "both targets up in Prometheus", || {
        if !prometheus.running() {
            return Some(());
        }
        let up = query(prom, "up == 1").ok()?;
        (up.len() == 2).then_some(())
    })
    .unwrap();
    assert!(
        prometheus.running(),
        "prometheus exited:\n{}",
        prometheus.output()
    );

    // Traffic: a relayed session, a refused key, a CONNECT nobody routes.
    let ssh_config = dir.join("ssh_config");
    std::fs::write(
        &ssh_config,
        "Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  GlobalKnownHostsFile /dev/null\n  IdentitiesOnly yes\n  BatchMode yes\n  LogLevel ERROR\n  ConnectTimeout 10\n",
    )
    .unwrap();
    let ssh = |key: &str, cmd: &str| {
        let mut c = Command::new("ssh");
        c.arg("-F")
            .arg(&ssh_config)
            .arg("-i")
            .arg(dir.join(key))
            .args(["-p", &ssh_port.to_string(), POOL_IP, cmd]);
        run_with_timeout(c, WAIT)
    };
    let o = ssh("alice", "echo relayed-ok");
    assert!(o.status.success(), "{o:?}\n{}", proxy.output());
    assert_eq!(stdout(&o), "relayed-ok");
    assert!(!ssh("stranger", "true").status.success());
    let mut c = Command::new(bin("keyway"));
    c.args(["tcp", "nowhere.example:22", "--listen", "-"])
        .args(["--url", &format!("https://127.0.0.1:{https}")])
        .arg("--ca")
        .arg(&tls.ca);
    assert!(!run_with_timeout(c, WAIT).status.success());

    // Every panel query returns data.
    let mut files: Vec<_> = std::fs::read_dir(repo_root().join("charts/keyway/dashboards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    let mut checked = 0;
    let mut empty = Vec::new();
    for f in &files {
        let d: Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
        let queries = panel_queries(&d);
        assert!(!queries.is_empty(), "{} has no queries", f.display());
        for (panel, expr) in queries {
            let q = concrete(&expr);
            let got = wait_for(WAIT, &format!("data for {q}"), || {
                query(prom, &q).ok().filter(|r| !r.is_empty())
            });
            match got {
                Ok(_) => checked += 1,
                Err(_) => empty.push(format!(
                    "{} / {panel}: {q} -> {:?}",
                    f.file_name().unwrap().to_string_lossy(),
                    query(prom, &q)
                )),
            }
        }
    }
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );
    assert!(checked >= 20, "only {checked} queries");
    prometheus.stop(Duration::from_secs(5));
    proxy.stop(Duration::from_secs(5));
}
