//! Cluster mode end to end: the real `keyway-operator` binary against the
//! in-process Kubernetes API double (tests/apiserver), a real snapshot
//! subscriber and the real `keyway-proxy`. What the double does not prove is
//! listed in tests/apiserver/README.md.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use keyway_e2e::cluster::*;
use keyway_e2e::stack::free_port;
use keyway_e2e::{Proc, wait_for};
use kube::api::{DeleteParams, Patch, PatchParams};
use serde::Deserialize;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

fn cond_status(obj: &Value, type_: &str) -> Option<String> {
    condition(obj, type_).and_then(|c| c["status"].as_str().map(str::to_string))
}

/// Requests the operator replicas made that change status.
fn status_writers(env: &ClusterEnv, since: usize) -> BTreeSet<String> {
    env.api.requests()[since..]
        .iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/status"))
        .filter_map(|r| r.user.clone())
        .collect()
}

fn per_user_ips(env: &ClusterEnv) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in env.leases() {
        if l["status"]["phase"] == "Ready" {
            m.entry(l["spec"]["user"].as_str().unwrap().to_string())
                .or_default()
                .push(l["status"]["ip"].as_str().unwrap().to_string());
        }
    }
    m
}

async fn create_leases(env: &ClusterEnv, n: u32, users: u32, pool: &str) {
    for i in 0..n {
        let ns = if i % 2 == 0 { "tenant-a" } else { "tenant-b" };
        env.create(
            "vmleases",
            lease_obj(
                ns,
                &format!("vm-{i:03}"),
                &format!("user-{}", i % users),
                pool,
                &hex_key(i),
            ),
        )
        .await
        .unwrap();
    }
}

fn events_with(env: &ClusterEnv, reason: &str, name: &str) -> Vec<Value> {
    env.events()
        .into_iter()
        .filter(|e| e["reason"] == reason && e["regarding"]["name"] == name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_leases_of_ten_users_get_unique_ips_that_survive_a_restart() {
    let env = ClusterEnv::start().await.unwrap();
    env.create("ippools", pool_obj("public", &["127.0.20.1-127.0.20.6"]))
        .await
        .unwrap();
    create_leases(&env, 50, 10, "public").await;
    let mut op = env.operator("op-a", &[]).unwrap();
    let before = wait_for(WAIT, "50 Ready leases", || {
        let ips = env.ready_ips();
        (ips.len() == 50).then_some(ips)
    })
    .unwrap();
    for (user, ips) in per_user_ips(&env) {
        let unique: BTreeSet<_> = ips.iter().collect();
        assert_eq!(unique.len(), ips.len(), "{user} shares an IP: {ips:?}");
    }
    for l in env.leases() {
        let st = &l["status"];
        assert_eq!(st["leaseHash"].as_str().unwrap().len(), 64);
        assert!(
            st["sshCommand"]
                .as_str()
                .unwrap()
                .contains(st["ip"].as_str().unwrap())
        );
        assert!(
            st["relayTrust"]
                .as_str()
                .unwrap()
                .starts_with("cert-authority"),
            "{st}"
        );
        assert_eq!(st["observedGeneration"], l["metadata"]["generation"]);
        assert_eq!(cond_status(&l, "Allocated").as_deref(), Some("True"));
        assert_eq!(
            l["metadata"]["finalizers"],
            json!(["keyway.dev/release"]),
            "{}",
            l["metadata"]
        );
    }
    let pool = wait_for(WAIT, "pool status", || {
        env.pool("public")
            .filter(|p| p["status"]["allocated"] == 50)
    })
    .unwrap();
    assert_eq!(pool["status"]["capacity"], "6");
    assert_eq!(pool["status"]["users"], 10);
    assert_eq!(pool["status"]["maxLeasesPerUser"], 5);
    assert_eq!(cond_status(&pool, "Ready").as_deref(), Some("True"));
    assert_eq!(cond_status(&pool, "Exhausted").as_deref(), Some("False"));
    wait_for(WAIT, "Allocated Events", || {
        (!events_with(&env, "Allocated", "vm-000").is_empty()).then_some(())
    })
    .unwrap();

    // A crash (SIGKILL) and a restart: every IP is taken back from status.
    op.proc.kill();
    let op2 = env.operator("op-a", &[]).unwrap();
    wait_for(WAIT, "the restarted operator to lead", || {
        op2.ready().then_some(())
    })
    .unwrap();
    env.create(
        "vmleases",
        lease_obj("tenant-a", "vm-new", "user-0", "public", &hex_key(99)),
    )
    .await
    .unwrap();
    wait_for(WAIT, "the new lease Ready", || {
        env.ready_ips()
            .contains_key("tenant-a/vm-new")
            .then_some(())
    })
    .unwrap();
    let after = env.ready_ips();
    for (k, ip) in &before {
        assert_eq!(after.get(k), Some(ip), "{k} moved after a restart");
    }
    assert_rbac_covers(&env);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_one_writer_and_failover_keeps_every_ip() {
    let env = ClusterEnv::start().await.unwrap();
    env.create("ippools", pool_obj("public", &["127.0.21.1-127.0.21.3"]))
        .await
        .unwrap();
    create_leases(&env, 6, 2, "public").await;
    let mut a = env.operator("op-a", &[]).unwrap();
    wait_for(WAIT, "op-a to lead", || {
        (env.leader().as_deref() == Some("op-a")).then_some(())
    })
    .unwrap();
    let b = env.operator("op-b", &[]).unwrap();
    let before = wait_for(WAIT, "6 Ready leases", || {
        let ips = env.ready_ips();
        (ips.len() == 6).then_some(ips)
    })
    .unwrap();
    wait_for(WAIT, "op-b up as a standby", || {
        b.metrics_text()
            .filter(|m| m.contains("keyway_operator_leader 0"))
    })
    .unwrap();
    assert!(a.ready() && !b.ready(), "only the leader is ready");
    assert_eq!(
        status_writers(&env, 0),
        BTreeSet::from(["op-a".to_string()])
    );
    let epoch_a = lease_epoch(&env);

    // The leader dies without handing the Lease back.
    a.proc.kill();
    let killed = Instant::now();
    // Counted after the kill: every later request is op-b's or the test's.
    let mark = env.api.requests().len();
    wait_for(WAIT, "op-b to take over", || {
        (env.leader().as_deref() == Some("op-b")).then_some(())
    })
    .unwrap();
    let takeover = killed.elapsed();
    println!("takeover after {takeover:?} (lease duration 4 s, retry 0.5 s)");
    assert!(
        lease_epoch(&env) > epoch_a,
        "the new leader writes a higher epoch"
    );
    wait_for(WAIT, "op-b ready", || b.ready().then_some(())).unwrap();
    env.create(
        "vmleases",
        lease_obj("tenant-a", "vm-late", "user-new", "public", &hex_key(77)),
    )
    .await
    .unwrap();
    wait_for(WAIT, "a lease created after the failover Ready", || {
        env.ready_ips()
            .contains_key("tenant-a/vm-late")
            .then_some(())
    })
    .unwrap();
    let after = env.ready_ips();
    for (k, ip) in &before {
        assert_eq!(after.get(k), Some(ip), "{k} moved in the failover");
    }
    assert_eq!(
        status_writers(&env, mark),
        BTreeSet::from(["op-b".to_string()])
    );
    assert_rbac_covers(&env);
}

fn lease_epoch(env: &ClusterEnv) -> u64 {
    env.api
        .object("coordination.k8s.io", "leases", Some(NS), "keyway-operator")
        .and_then(|l| {
            l["metadata"]["annotations"]["keyway.dev/epoch"]
                .as_str()?
                .parse()
                .ok()
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hand_edited_duplicate_ip_is_resolved_older_wins_with_an_event() {
    let env = ClusterEnv::start().await.unwrap();
    env.create("ippools", pool_obj("public", &["127.0.22.1", "127.0.22.2"]))
        .await
        .unwrap();
    env.create(
        "vmleases",
        lease_obj("t", "a-older", "u", "public", &hex_key(1)),
    )
    .await
    .unwrap();
    env.create(
        "vmleases",
        lease_obj("t", "b-newer", "u", "public", &hex_key(2)),
    )
    .await
    .unwrap();
    let mut op = env.operator("op-a", &[]).unwrap();
    let ips = wait_for(WAIT, "both Ready", || {
        let ips = env.ready_ips();
        (ips.len() == 2).then_some(ips)
    })
    .unwrap();
    let ip_a = ips["t/a-older"].clone();
    op.proc.stop(Duration::from_secs(10));

    // Someone gives the newer lease the older one's IP by hand.
    env.dynamic("vmleases", Some("t"))
        .patch_status(
            "b-newer",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"ip": ip_a}})),
        )
        .await
        .unwrap();
    let _op = env.operator("op-a", &[]).unwrap();
    wait_for(
        WAIT,
        "the newer lease to move off the older one's IP",
        || {
            let ips = env.ready_ips();
            (ips.get("t/b-newer").is_some_and(|ip| *ip != ip_a)).then_some(())
        },
    )
    .unwrap();
    assert_eq!(
        env.ready_ips()["t/a-older"],
        ip_a,
        "the older lease keeps its IP"
    );
    let moved = wait_for(WAIT, "an Event on the newer lease", || {
        let ev = events_with(&env, "Conflict", "b-newer");
        (!ev.is_empty()).then_some(ev)
    })
    .unwrap();
    assert!(
        moved[0]["note"]
            .as_str()
            .unwrap()
            .contains("the older t/a-older keeps it"),
        "{}",
        moved[0]
    );
    assert_eq!(moved[0]["type"], "Warning");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finalizer_releases_exhaustion_waits_and_shrink_moves_only_removed_ips() {
    let env = ClusterEnv::start().await.unwrap();
    env.create("ippools", pool_obj("small", &["127.0.23.1", "127.0.23.2"]))
        .await
        .unwrap();
    for (i, name) in ["l1", "l2", "l3"].into_iter().enumerate() {
        env.create(
            "vmleases",
            lease_obj("t", name, "u", "small", &hex_key(i as u32)),
        )
        .await
        .unwrap();
    }
    let _op = env.operator("op-a", &[]).unwrap();
    let pending = wait_for(WAIT, "l3 Pending", || {
        env.lease("t", "l3")
            .filter(|l| l["status"]["phase"] == "Pending")
    })
    .unwrap();
    let allocated = condition(&pending, "Allocated").unwrap();
    assert_eq!(allocated["status"], "False");
    assert_eq!(allocated["reason"], "PoolExhausted", "{allocated}");
    wait_for(WAIT, "pool Exhausted", || {
        env.pool("small")
            .filter(|p| cond_status(p, "Exhausted").as_deref() == Some("True"))
    })
    .unwrap();
    wait_for(WAIT, "an Exhausted Event", || {
        (!events_with(&env, "Exhausted", "l3").is_empty()).then_some(())
    })
    .unwrap();
    let ips = env.ready_ips();
    let ip1 = ips["t/l1"].clone();

    // Deleting l1 runs the finalizer: its IP goes to the waiting lease.
    env.dynamic("vmleases", Some("t"))
        .delete("l1", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(WAIT, "l1 gone", || {
        env.lease("t", "l1").is_none().then_some(())
    })
    .unwrap();
    wait_for(WAIT, "l3 takes the released IP", || {
        (env.ready_ips().get("t/l3") == Some(&ip1)).then_some(())
    })
    .unwrap();
    assert_eq!(env.ready_ips()["t/l2"], ips["t/l2"]);
    wait_for(WAIT, "a Released Event", || {
        (!events_with(&env, "Released", "l1").is_empty()).then_some(())
    })
    .unwrap();
    wait_for(WAIT, "pool no longer Exhausted", || {
        env.pool("small")
            .filter(|p| cond_status(p, "Exhausted").as_deref() == Some("False"))
    })
    .unwrap();

    // Settling a lease releases its IP too (the object stays).
    env.dynamic("vmleases", Some("t"))
        .patch(
            "l2",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"settled": true}})),
        )
        .await
        .unwrap();
    let settled = wait_for(WAIT, "l2 Settled", || {
        env.lease("t", "l2")
            .filter(|l| l["status"]["phase"] == "Settled")
    })
    .unwrap();
    assert!(
        settled["status"].get("ip").is_none(),
        "{}",
        settled["status"]
    );
    wait_for(WAIT, "a Released Event for the settled lease", || {
        (!events_with(&env, "Released", "l2").is_empty()).then_some(())
    })
    .unwrap();

    // Shrinking a pool moves only the leases whose IP left it.
    env.create("ippools", pool_obj("wide", &["127.0.24.1-127.0.24.3"]))
        .await
        .unwrap();
    for (i, user) in ["v1", "v2", "v3"].into_iter().enumerate() {
        env.create(
            "vmleases",
            lease_obj("w", user, user, "wide", &hex_key(10 + i as u32)),
        )
        .await
        .unwrap();
    }
    let wide = wait_for(WAIT, "3 Ready in the wide pool", || {
        let ips: BTreeMap<String, String> = env
            .ready_ips()
            .into_iter()
            .filter(|(k, _)| k.starts_with("w/"))
            .collect();
        (ips.len() == 3).then_some(ips)
    })
    .unwrap();
    let (victim, _) = wide.iter().find(|(_, ip)| *ip == "127.0.24.3").unwrap();
    env.dynamic("ippools", None)
        .patch(
            "wide",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"addresses": ["127.0.24.1", "127.0.24.2"]}})),
        )
        .await
        .unwrap();
    wait_for(WAIT, "the lease on the removed IP to move", || {
        let ips = env.ready_ips();
        let moved = ips.get(victim).is_some_and(|ip| ip != "127.0.24.3");
        moved.then_some(())
    })
    .unwrap();
    let now = env.ready_ips();
    for (k, ip) in &wide {
        if k != victim {
            assert_eq!(&now[k], ip, "{k} moved although its IP stayed in the pool");
        }
    }
    assert_rbac_covers(&env);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_objects_fail_with_the_field_and_the_rest_keeps_reconciling() {
    let env = ClusterEnv::start().await.unwrap();
    env.create("ippools", pool_obj("public", &["127.0.25.1"]))
        .await
        .unwrap();
    env.create("ippools", pool_obj("broken", &["10.0.0.0/33"]))
        .await
        .unwrap();
    // The double has no schema validation, so these reach the operator the
    // way objects that bypassed the schema would.
    let mut bad_type = lease_obj("t", "bad-type", "u", "public", &hex_key(1));
    bad_type["spec"]["user"] = json!(42);
    env.create("vmleases", bad_type).await.unwrap();
    let mut bad_key = lease_obj("t", "bad-key", "u", "public", &hex_key(2));
    bad_key["spec"]["accessPublicKeys"] = json!(["ssh-ed25519 not-a-key"]);
    env.create("vmleases", bad_key).await.unwrap();
    let _op = env.operator("op-a", &[]).unwrap();
    for (name, field) in [
        ("bad-type", "spec.user"),
        ("bad-key", "spec.accessPublicKeys[0]"),
    ] {
        let l = wait_for(WAIT, "Failed", || {
            env.lease("t", name)
                .filter(|l| l["status"]["phase"] == "Failed")
        })
        .unwrap();
        let msg = l["status"]["message"].as_str().unwrap();
        assert!(msg.contains(field), "{name}: {msg}");
    }
    let pool = wait_for(WAIT, "broken pool not Ready", || {
        env.pool("broken")
            .filter(|p| cond_status(p, "Ready").as_deref() == Some("False"))
    })
    .unwrap();
    assert!(
        condition(&pool, "Ready").unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("addresses[0]"),
        "{pool}"
    );
    // Transient API errors (the next status and finalizer writes fail) are
    // retried with backoff.
    env.api.fail_next("PATCH", "vmleases", 4, 500);
    env.create(
        "vmleases",
        lease_obj("t", "good", "u", "public", &hex_key(3)),
    )
    .await
    .unwrap();
    wait_for(WAIT, "the valid lease Ready", || {
        env.ready_ips().contains_key("t/good").then_some(())
    })
    .unwrap();
    let failed = env
        .api
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH" && r.status == 500)
        .count();
    assert_eq!(failed, 4, "the injected failures were hit");
}

fn proxy(env: &ClusterEnv, endpoint: &str, extra: &[&str]) -> (Proc, std::net::SocketAddr) {
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let ssh = format!("127.0.0.1:{}", free_port());
    let mut cmd = env.proxy_command(endpoint, &ssh, metrics);
    cmd.args(extra);
    (
        Proc::spawn(cmd, &env.dir.path().join("proxy.log")).unwrap(),
        metrics,
    )
}

fn proxy_leases(metrics: std::net::SocketAddr) -> Option<u64> {
    let (_, body) = http_get(metrics, "/metrics")?;
    body.lines()
        .find(|l| l.starts_with("keyway_snapshot_leases "))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Starts a proxy, waits until it holds the `already` leases that exist, adds
/// one and checks the proxy gets it and `Routed` turns true after its ack.
async fn routed_after_the_proxy_acks(
    env: &ClusterEnv,
    endpoint: &str,
    proxy_extra: &[&str],
    already: u64,
) {
    env.create("ippools", pool_obj("public", &["127.0.26.1"]))
        .await
        .unwrap();
    let (_proxy, pm) = proxy(env, endpoint, proxy_extra);
    wait_for(WAIT, "the proxy's first snapshot", || {
        proxy_leases(pm).filter(|n| *n == already)
    })
    .unwrap();
    env.create("vmleases", lease_obj("t", "vm", "u", "public", &hex_key(5)))
        .await
        .unwrap();
    wait_for(WAIT, "the proxy to hold the new lease", || {
        proxy_leases(pm).filter(|n| *n == already + 1)
    })
    .unwrap();
    let l = wait_for(WAIT, "Routed=True", || {
        env.lease("t", "vm")
            .filter(|l| cond_status(l, "Routed").as_deref() == Some("True"))
    })
    .unwrap();
    let routed = condition(&l, "Routed").unwrap();
    assert_eq!(routed["reason"], "Applied", "{routed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscribed_proxy_gets_new_leases_and_routed_follows_its_ack() {
    let env = ClusterEnv::start().await.unwrap();
    let op = env.operator("op-a", &[]).unwrap();
    wait_for(WAIT, "the operator to lead", || op.ready().then_some(())).unwrap();
    // Before any proxy connects, Routed says so.
    env.create("ippools", pool_obj("early", &["127.0.27.1"]))
        .await
        .unwrap();
    env.create(
        "vmleases",
        lease_obj("t", "early", "u", "early", &hex_key(9)),
    )
    .await
    .unwrap();
    let early = wait_for(WAIT, "Routed=False with no proxy", || {
        env.lease("t", "early")
            .filter(|l| cond_status(l, "Routed").as_deref() == Some("False"))
    })
    .unwrap();
    assert_eq!(condition(&early, "Routed").unwrap()["reason"], "NoProxy");
    routed_after_the_proxy_acks(&env, &op.endpoint(), &[], 1).await;
    wait_for(WAIT, "the earlier lease Routed too", || {
        env.lease("t", "early")
            .filter(|l| cond_status(l, "Routed").as_deref() == Some("True"))
    })
    .unwrap();
}

/// Pools and routes carry no finalizer: their deletion reaches the operator
/// only as a watch event, and the round acts on it (here before any other
/// change could wake it): the lease goes Pending and leaves the proxy's
/// table, and comes back with its pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_pool_takes_its_leases_off_the_proxy_and_recreating_it_brings_them_back() {
    let env = ClusterEnv::start().await.unwrap();
    let op = env.operator("op-a", &[]).unwrap();
    wait_for(WAIT, "the operator to lead", || op.ready().then_some(())).unwrap();
    env.create("ippools", pool_obj("doomed", &["127.0.28.1"]))
        .await
        .unwrap();
    env.create("vmleases", lease_obj("t", "vm", "u", "doomed", &hex_key(3)))
        .await
        .unwrap();
    let (_proxy, pm) = proxy(&env, &op.endpoint(), &[]);
    wait_for(WAIT, "the proxy to hold the lease", || {
        proxy_leases(pm).filter(|n| *n == 1)
    })
    .unwrap();
    env.dynamic("ippools", None)
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(WAIT, "the proxy to drop the lease", || {
        proxy_leases(pm).filter(|n| *n == 0)
    })
    .unwrap();
    let pending = wait_for(WAIT, "the lease Pending", || {
        env.lease("t", "vm")
            .filter(|l| l["status"]["phase"] == "Pending")
    })
    .unwrap();
    let allocated = condition(&pending, "Allocated").unwrap();
    assert!(
        allocated["message"].as_str().unwrap().contains("not found"),
        "{allocated}"
    );
    env.create("ippools", pool_obj("doomed", &["127.0.28.1"]))
        .await
        .unwrap();
    wait_for(WAIT, "the lease back on the proxy", || {
        proxy_leases(pm).filter(|n| *n == 1)
    })
    .unwrap();
    wait_for(WAIT, "the lease Ready again", || {
        (env.ready_ips().get("t/vm").map(String::as_str) == Some("127.0.28.1")).then_some(())
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_snapshot_server_speaks_tls_when_certificates_are_configured() {
    let env = ClusterEnv::start().await.unwrap();
    let dir = env.dir.path();
    let keyway_e2e::TlsFiles { cert, key, ca } = keyway_e2e::make_tls(dir);
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let op = env
        .operator("op-a", &["--tls-cert", c, "--tls-key", k])
        .unwrap();
    wait_for(WAIT, "the operator to lead", || op.ready().then_some(())).unwrap();
    let endpoint = format!("https://localhost:{}", op.grpc.port());
    routed_after_the_proxy_acks(&env, &endpoint, &["--ca-file", ca.to_str().unwrap()], 0).await;
}

/// Every request an operator replica made is allowed by manifests/rbac.yaml.
fn assert_rbac_covers(env: &ClusterEnv) {
    let text = std::fs::read_to_string(keyway_e2e::stack::repo_root().join("manifests/rbac.yaml"))
        .unwrap();
    let mut rules: Vec<(bool, Value)> = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let v: Value = serde_norway::Value::deserialize(doc)
            .map(|y| serde_json::to_value(y).unwrap())
            .unwrap();
        let cluster = match v["kind"].as_str() {
            Some("ClusterRole") => true,
            Some("Role") => false,
            _ => continue,
        };
        for r in v["rules"].as_array().unwrap() {
            rules.push((cluster, r.clone()));
        }
    }
    let has = |list: &Value, x: &str| list.as_array().is_some_and(|l| l.iter().any(|i| i == x));
    for r in env.api.requests() {
        let Some(user) = r.user.as_deref() else {
            continue;
        };
        if !user.starts_with("op-") {
            continue;
        }
        let a = attributes(&r.method, &r.path, &r.query);
        let allowed = rules.iter().any(|(cluster, rule)| {
            (*cluster || a.namespace.as_deref() == Some(NS))
                && has(&rule["apiGroups"], &a.group)
                && has(&rule["resources"], &a.resource)
                && has(&rule["verbs"], &a.verb)
                && (rule.get("resourceNames").is_none()
                    || a.name
                        .as_deref()
                        .is_some_and(|n| has(&rule["resourceNames"], n)))
        });
        assert!(
            allowed,
            "{user}: {} {}?{} is not allowed by manifests/rbac.yaml ({a:?})",
            r.method, r.path, r.query
        );
    }
}

#[derive(Debug)]
struct Attributes {
    group: String,
    resource: String,
    verb: String,
    namespace: Option<String>,
    name: Option<String>,
}

/// Kubernetes' request attributes of an API path (what RBAC decides on).
fn attributes(method: &str, path: &str, query: &str) -> Attributes {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segs.first() {
        Some(&"api") => (String::new(), &segs[2..]),
        _ => (segs[1].to_string(), &segs[3..]),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let resource = match rest {
        [res, _, sub] => format!("{res}/{sub}"),
        [res, ..] => res.to_string(),
        [] => String::new(),
    };
    let name = rest.get(1).map(|s| s.to_string());
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (method, name.is_some()) {
        ("GET", true) => "get",
        ("GET", false) if watch => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    }
    .to_string();
    Attributes {
        group,
        resource,
        verb,
        namespace,
        name,
    }
}
