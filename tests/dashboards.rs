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

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Every target expression of every panel.
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    panels(dashboard)
        .into_iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |t| Some((title.clone(), t["expr"].as_str()?.to_string())))
        })
        .collect()
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
    // Every lease here points at the one real VM.
    let vm_lease = |name: &str, user: &str, pool: &str, key: &str| {
        let mut l = lease_obj("t", name, user, pool, key);
        l["spec"]["target"]["address"] = json!(vm_addr);
        l
    };
    env.create("vmleases", vm_lease("alice-web", "alice", "public", &alice))
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

    // `make dashboard-pictures`: a few minutes of varied traffic, then every
    // panel's series over that window, for scripts/dashboard-pictures.py.
    if let Some(out) = std::env::var_os("KEYWAY_DASHBOARD_DATA") {
        // A second, larger pool (not served by this gateway) whose users
        // hold several leases, so pool usage moves.
        env.create("ippools", pool_obj("lab", &["127.0.73.1-127.0.73.8"]))
            .await
            .unwrap();
        let lab: Vec<(String, String)> = (0..3)
            .map(|n| {
                let user = format!("lab{n}");
                let key = new_public_key(&dir, &user);
                (user, key)
            })
            .collect();
        let start = unix_now();
        let mut held = Vec::new();
        for i in 0..60u32 {
            assert!(ssh("alice", "echo relayed-ok").status.success());
            if i % 3 == 0 {
                assert!(
                    ssh(
                        "alice",
                        "head -c 50000000 /dev/zero >/dev/null; head -c 20000000 /dev/zero"
                    )
                    .status
                    .success()
                );
            }
            if i % 2 == 1 || (20..26).contains(&i) {
                // A burst of refused keys in the middle.
                for _ in 0..if (20..26).contains(&i) { 8 } else { 1 } {
                    assert!(!ssh("stranger", "true").status.success());
                }
            }
            if i % 5 == 0 {
                let mut c = Command::new(bin("keyway"));
                c.args(["tcp", "nowhere.example:22", "--listen", "-"])
                    .args(["--url", &format!("https://127.0.0.1:{https}")])
                    .arg("--ca")
                    .arg(&tls.ca);
                let _ = run_with_timeout(c, WAIT);
            }
            if i % 10 == 5 {
                // Leases of new users fill the pool, one more each time.
                let user = format!("user{i}");
                let key = new_public_key(&dir, &user);
                env.create(
                    "vmleases",
                    vm_lease(&format!("{user}-vm"), &user, "public", &key),
                )
                .await
                .unwrap();
            }
            if i % 4 == 2 {
                let (user, key) = &lab[(i as usize / 4) % lab.len()];
                env.create(
                    "vmleases",
                    vm_lease(&format!("{user}-{i}"), user, "lab", key),
                )
                .await
                .unwrap();
            }
            if i % 15 == 7 {
                // Sessions held open for a while.
                let mut c = Command::new("ssh");
                c.arg("-F")
                    .arg(&ssh_config)
                    .arg("-i")
                    .arg(dir.join("alice"))
                    .args(["-p", &ssh_port.to_string(), POOL_IP, "sleep 40"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null());
                held.push(c.spawn().unwrap());
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        for mut h in held {
            let _ = h.wait();
        }
        std::thread::sleep(Duration::from_secs(5));
        let end = unix_now();
        let out = std::path::PathBuf::from(out);
        std::fs::create_dir_all(&out).unwrap();
        for f in &files {
            let d: Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
            let data = panel_series(prom, &d, start, end);
            let name = f.file_name().unwrap();
            std::fs::write(out.join(name), serde_json::to_vec_pretty(&data).unwrap()).unwrap();
        }
    }
    prometheus.stop(Duration::from_secs(5));
    proxy.stop(Duration::from_secs(5));
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Each panel (title, type, grid position, unit) with the series its
/// queries return over `[start, end]`, labelled by the panel's legend format.
fn panel_series(prom: SocketAddr, dashboard: &Value, start: f64, end: f64) -> Value {
    fn legend(format: &str, metric: &Value) -> String {
        let mut s = format.to_string();
        for (k, v) in metric.as_object().into_iter().flatten() {
            s = s.replace(&format!("{{{{{k}}}}}"), v.as_str().unwrap_or_default());
        }
        s
    }
    let mut out = Vec::new();
    for p in panels(dashboard) {
        let mut series = Vec::new();
        for t in p["targets"].as_array().into_iter().flatten() {
            let Some(expr) = t["expr"].as_str() else {
                continue;
            };
            let path = format!(
                "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step=2",
                percent_encode(&concrete(expr))
            );
            let (_, body) = http_get(prom, &path).unwrap();
            let v: Value = serde_json::from_str(&body).unwrap();
            for r in v["data"]["result"].as_array().into_iter().flatten() {
                series.push(json!({
                    "legend": legend(t["legendFormat"].as_str().unwrap_or(""), &r["metric"]),
                    "values": r["values"],
                }));
            }
        }
        out.push(json!({
            "title": p["title"], "type": p["type"], "gridPos": p["gridPos"],
            "unit": p["fieldConfig"]["defaults"]["unit"],
            "overrides": p["fieldConfig"]["overrides"], "series": series,
        }));
    }
    json!({"title": dashboard["title"], "uid": dashboard["uid"], "start": start, "end": end, "panels": out})
}
