//! Local mode end to end: the real `keyway-operator` binary on a directory of
//! YAML files, observed through `status` and a real snapshot subscriber.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keyway_e2e::*;
use keyway_snapshot::client::{SubscriberConfig, Subscription, subscribe};
use keyway_snapshot::pb;

const WAIT: Duration = Duration::from_secs(30);

fn ips(dir: &Path) -> BTreeMap<String, String> {
    status_json(dir)
        .unwrap()
        .into_iter()
        .filter_map(|l| {
            Some((
                l["name"].as_str()?.to_string(),
                l["ip"].as_str()?.to_string(),
            ))
        })
        .collect()
}

fn all_ready(dir: &Path, n: usize) -> Option<BTreeMap<String, String>> {
    let rows = status_json(dir).ok()?;
    let ready = rows.iter().filter(|l| l["phase"] == "Ready").count();
    (rows.len() == n && ready == n).then(|| ips(dir))
}

fn subscriber(op: &Operator, token: &str) -> (Subscription, tokio::task::JoinHandle<()>) {
    subscribe(
        SubscriberConfig {
            endpoint: op.endpoint(),
            token: token.to_string(),
            node_id: "e2e".into(),
            role: "test".into(),
            cache_path: None,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(500),
            ca_pem: None,
            reopen_after_full_bytes: keyway_snapshot::client::DEFAULT_REOPEN_AFTER_FULL_BYTES,
        },
        |_| Ok(()),
    )
}

async fn snapshot_where(
    sub: &Subscription,
    what: &str,
    f: impl Fn(&pb::Snapshot) -> bool,
) -> Arc<pb::Snapshot> {
    let rx = sub.snapshot.clone();
    wait_for_async(WAIT, what, || {
        // The tests' copy of the whole snapshot (small here).
        let s = rx
            .borrow()
            .as_ref()
            .map(|h| Arc::new(h.to_snapshot()))
            .filter(|s| f(s));
        async move { s }
    })
    .await
    .unwrap()
}

fn version(s: &pb::Snapshot) -> (u64, u64) {
    let v = s.version.unwrap();
    (v.epoch, v.version)
}

fn lease_names(s: &pb::Snapshot) -> Vec<String> {
    let mut v: Vec<String> = s.leases.iter().map(|l| l.name.clone()).collect();
    v.sort();
    v
}

#[test]
fn restart_keeps_every_ip_and_uniqueness_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("local");
    std::fs::create_dir(&dir).unwrap();
    let keys: Vec<String> = (0..3)
        .map(|u| new_public_key(tmp.path(), &format!("user{u}")))
        .collect();
    write_file(
        &dir.join("pool.yaml"),
        &pool_yaml("p", &["127.0.10.1-127.0.10.3"]),
    );
    let mut docs = Vec::new();
    for (u, key) in keys.iter().enumerate() {
        for v in 0..3 {
            docs.push(lease_yaml(
                &format!("u{u}-vm{v}"),
                &format!("user{u}"),
                "p",
                key,
                "127.0.0.1:22",
                false,
            ));
        }
    }
    write_file(&dir.join("leases.yaml"), &docs.join("---\n"));

    let mut op = Operator::start(&dir).unwrap();
    let before = wait_for(WAIT, "9 Ready leases", || all_ready(&dir, 9)).unwrap();
    // Per-user uniqueness: each user's three leases hold three different IPs.
    for u in 0..3 {
        let mut mine: Vec<&String> = before
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("u{u}-")))
            .map(|(_, v)| v)
            .collect();
        mine.sort();
        mine.dedup();
        assert_eq!(mine.len(), 3, "user{u} has a shared IP: {before:?}");
    }

    // A crash (SIGKILL), then a restart: nothing moves.
    op.proc.kill();
    let op2 = Operator::start(&dir).unwrap();
    let after = wait_for(WAIT, "9 Ready leases after restart", || all_ready(&dir, 9)).unwrap();
    assert_eq!(before, after);
    drop(op2);

    // While stopped: one lease deleted and a new one added for the same user.
    // The new one takes the freed address; the other eight stay put.
    let mut docs2: Vec<String> = docs
        .iter()
        .filter(|d| !d.contains("name: u0-vm1"))
        .cloned()
        .collect();
    docs2.push(lease_yaml(
        "u0-vm9",
        "user0",
        "p",
        &keys[0],
        "127.0.0.1:22",
        false,
    ));
    write_file(&dir.join("leases.yaml"), &docs2.join("---\n"));
    let _op3 = Operator::start(&dir).unwrap();
    let third = wait_for(WAIT, "9 Ready leases after edit", || all_ready(&dir, 9)).unwrap();
    for (name, ip) in &before {
        if name != "u0-vm1" {
            assert_eq!(third.get(name), Some(ip), "{name} moved");
        }
    }
    assert_eq!(third.get("u0-vm9"), before.get("u0-vm1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_adds_deletes_and_renames_reach_the_subscriber() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("local");
    std::fs::create_dir(&dir).unwrap();
    let alice = new_public_key(tmp.path(), "alice");
    let bob = new_public_key(tmp.path(), "bob");
    write_file(
        &dir.join("pool.yaml"),
        &pool_yaml("p", &["127.0.10.1", "127.0.10.2"]),
    );
    write_file(
        &dir.join("alice.yaml"),
        &lease_yaml("alice-1", "alice", "p", &alice, "127.0.0.1:2201", false),
    );
    let op = Operator::start(&dir).unwrap();
    let (sub, task) = subscriber(&op, &op.token());

    let s1 = snapshot_where(&sub, "alice-1 in the snapshot", |s| {
        lease_names(s) == ["alice-1"]
    })
    .await;
    let v1 = version(&s1);

    // Add a file.
    write_file(
        &dir.join("bob.yaml"),
        &lease_yaml("bob-1", "bob", "p", &bob, "127.0.0.1:2202", false),
    );
    let s2 = snapshot_where(&sub, "bob-1 added", |s| {
        lease_names(s) == ["alice-1", "bob-1"]
    })
    .await;
    assert!(version(&s2) > v1);

    // Edit: change bob's target.
    write_file(
        &dir.join("bob.yaml"),
        &lease_yaml("bob-1", "bob", "p", &bob, "127.0.0.1:2299", false),
    );
    let s3 = snapshot_where(&sub, "bob-1 retargeted", |s| {
        s.leases.iter().any(|l| {
            l.name == "bob-1"
                && l.target == Some(pb::lease::Target::Address("127.0.0.1:2299".into()))
        })
    })
    .await;
    assert!(version(&s3) > version(&s2));
    let bob_ip = s3
        .leases
        .iter()
        .find(|l| l.name == "bob-1")
        .unwrap()
        .ip
        .clone();
    assert_eq!(
        s2.leases.iter().find(|l| l.name == "bob-1").unwrap().ip,
        bob_ip,
        "an edit moved the IP"
    );

    // Rename: same objects, nothing changes for routing.
    std::fs::rename(dir.join("bob.yaml"), dir.join("bob-renamed.yaml")).unwrap();
    write_file(&dir.join("marker.yaml"), "# marker\n");
    wait_for(WAIT, "rename picked up", || {
        let st = state_json(&dir);
        (st["leases"]["default/bob-1"]["file"] == "bob-renamed.yaml").then_some(())
    })
    .unwrap();
    let s4 = sub.snapshot.borrow().clone().unwrap().to_snapshot();
    assert_eq!(lease_names(&s4), ["alice-1", "bob-1"]);
    assert_eq!(
        s4.leases.iter().find(|l| l.name == "bob-1").unwrap().ip,
        bob_ip
    );

    // Settle: withdrawn from the snapshot, phase Settled.
    write_file(
        &dir.join("alice.yaml"),
        &lease_yaml("alice-1", "alice", "p", &alice, "127.0.0.1:2201", true),
    );
    snapshot_where(&sub, "alice-1 withdrawn", |s| lease_names(s) == ["bob-1"]).await;
    wait_for(WAIT, "alice-1 Settled", || {
        status_json(&dir)
            .ok()?
            .iter()
            .find(|l| l["name"] == "alice-1" && l["phase"] == "Settled")
            .map(|_| ())
    })
    .unwrap();

    // Delete: gone from the snapshot and from status.
    std::fs::remove_file(dir.join("bob-renamed.yaml")).unwrap();
    snapshot_where(&sub, "bob-1 deleted", |s| s.leases.is_empty()).await;
    wait_for(WAIT, "bob-1 gone from status", || {
        (!status_json(&dir).ok()?.iter().any(|l| l["name"] == "bob-1")).then_some(())
    })
    .unwrap();

    // The operator saw our ACKs: its state lists us with the latest version.
    let latest = sub.snapshot.borrow().clone().unwrap();
    let want = format!("e{}.v{}", latest.version.epoch, latest.version.version);
    wait_for(WAIT, "operator records our ack", || {
        let st = state_json(&dir);
        let subs = st["snapshot"]["subscribers"].as_array()?.clone();
        subs.iter()
            .any(|s| s["nodeId"] == "e2e" && s["acked"] == want.as_str())
            .then_some(())
    })
    .unwrap();
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_with_wrong_token_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("local");
    std::fs::create_dir(&dir).unwrap();
    let key = new_public_key(tmp.path(), "k");
    write_file(&dir.join("pool.yaml"), &pool_yaml("p", &["127.0.10.1"]));
    write_file(
        &dir.join("a.yaml"),
        &lease_yaml("a", "alice", "p", &key, "127.0.0.1:22", false),
    );
    let op = Operator::start(&dir).unwrap();

    let (bad, bad_task) = subscriber(&op, "not-the-token");
    let status = bad.status.clone();
    wait_for_async(WAIT, "an authentication error", || {
        let st = status.borrow().clone();
        async move {
            st.last_error.filter(|e| {
                e.to_lowercase().contains("unauthenticated") || e.to_lowercase().contains("token")
            })
        }
    })
    .await
    .unwrap();
    assert!(
        bad.snapshot.borrow().is_none(),
        "a refused subscriber got a snapshot"
    );

    // The right token works against the same operator.
    let (good, good_task) = subscriber(&op, &op.token());
    snapshot_where(&good, "snapshot with the right token", |s| {
        s.leases.len() == 1
    })
    .await;
    // Routed turns true once the only connected subscriber ACKed the lease's
    // version; the refused caller does not count as a proxy.
    wait_for(WAIT, "lease Routed", || {
        status_json(&dir)
            .ok()?
            .first()
            .filter(|l| l["routed"] == true)
            .map(|_| ())
    })
    .unwrap();
    assert!(bad.snapshot.borrow().is_none());
    bad_task.abort();
    good_task.abort();
}

#[test]
fn bad_input_is_reported_and_the_rest_keeps_working() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("local");
    std::fs::create_dir(&dir).unwrap();
    let key = new_public_key(tmp.path(), "k");
    write_file(
        &dir.join("pool.yaml"),
        &pool_yaml("p", &["127.0.10.1-127.0.10.2"]),
    );
    write_file(
        &dir.join("badpool.yaml"),
        &pool_yaml("broken", &["10.0.0/24"]),
    );
    write_file(
        &dir.join("good.yaml"),
        &lease_yaml("good", "alice", "p", &key, "127.0.0.1:22", false),
    );
    write_file(
        &dir.join("malformed.yaml"),
        "apiVersion: keyway.dev/v1alpha1\nkind: VMLease\nmetadata: {name: x\n",
    );
    write_file(
        &dir.join("nopool.yaml"),
        &lease_yaml("orphan", "alice", "missing", &key, "127.0.0.1:22", false),
    );
    write_file(
        &dir.join("badkey.yaml"),
        &lease_yaml(
            "badkey",
            "bob",
            "p",
            "ssh-ed25519 AAAAnot-a-key",
            "127.0.0.1:22",
            false,
        ),
    );

    let _op = Operator::start(&dir).unwrap();
    wait_for(WAIT, "good Ready", || {
        status_json(&dir)
            .ok()?
            .iter()
            .any(|l| l["name"] == "good" && l["phase"] == "Ready")
            .then_some(())
    })
    .unwrap();
    // A duplicate added later, even in a file that sorts first, cannot hijack it.
    write_file(
        &dir.join("aa-dup.yaml"),
        &lease_yaml("good", "mallory", "p", &key, "127.0.0.1:9", false),
    );
    wait_for(WAIT, "the duplicate reported", || {
        state_json(&dir)["problems"]
            .as_array()?
            .iter()
            .any(|p| p["file"] == "aa-dup.yaml")
            .then_some(())
    })
    .unwrap();
    let rows = status_json(&dir).unwrap();
    let row = |n: &str| rows.iter().find(|l| l["name"] == n).cloned().unwrap();
    assert_eq!(
        row("good")["user"],
        "alice",
        "the duplicate replaced the original"
    );
    assert_eq!(row("orphan")["phase"], "Pending");
    assert!(
        row("orphan")["message"]
            .as_str()
            .unwrap()
            .contains("missing")
    );
    assert_eq!(row("badkey")["phase"], "Failed");
    assert!(
        row("badkey")["message"]
            .as_str()
            .unwrap()
            .contains("spec.accessPublicKeys[0]")
    );

    let problems: Vec<String> = state_json(&dir)["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{} | {} | {} | {}",
                p["file"], p["object"], p["field"], p["message"]
            )
        })
        .collect();
    let has = |file: &str, needle: &str| {
        assert!(
            problems
                .iter()
                .any(|p| p.contains(file) && p.contains(needle)),
            "no problem for {file} mentioning {needle:?} in {problems:#?}"
        )
    };
    has("malformed.yaml", "invalid YAML");
    has("badkey.yaml", "spec.accessPublicKeys[0]");
    has("badpool.yaml", "10.0.0/24");
    has("aa-dup.yaml", "duplicate");

    // The table names the problems too.
    let table = status_table(&dir).unwrap();
    assert!(table.contains("default/good"), "{table}");
    assert!(table.contains("malformed.yaml"), "{table}");
}

#[test]
fn a_broken_edit_keeps_the_last_good_objects() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("local");
    std::fs::create_dir(&dir).unwrap();
    let key = new_public_key(tmp.path(), "k");
    write_file(
        &dir.join("pool.yaml"),
        &pool_yaml("p", &["127.0.10.1-127.0.10.2"]),
    );
    let good = lease_yaml("vm", "alice", "p", &key, "127.0.0.1:22", false);
    write_file(&dir.join("vm.yaml"), &good);
    let _op = Operator::start(&dir).unwrap();
    let before = wait_for(WAIT, "Ready", || all_ready(&dir, 1)).unwrap();

    // A half-typed edit (YAML syntax error) must not delete the lease or the pool.
    write_file(&dir.join("vm.yaml"), &format!("{good}  oops: [\n"));
    write_file(
        &dir.join("pool.yaml"),
        "apiVersion: keyway.dev/v1alpha1\nkind: IPPool\nmetadata: {name: p\n",
    );
    wait_for(WAIT, "the syntax errors reported", || {
        let n = state_json(&dir)["problems"]
            .as_array()?
            .iter()
            .filter(|p| p["message"].as_str().unwrap_or("").contains("invalid YAML"))
            .count();
        (n == 2).then_some(())
    })
    .unwrap();
    assert_eq!(all_ready(&dir, 1), Some(before.clone()));

    // A valid-YAML but invalid edit (bad key) is rejected; the previous spec stays.
    write_file(
        &dir.join("vm.yaml"),
        &lease_yaml("vm", "alice", "p", "nonsense", "127.0.0.1:22", false),
    );
    let msg = wait_for(WAIT, "edit rejected", || {
        let rows = status_json(&dir).ok()?;
        rows[0]["message"]
            .as_str()
            .filter(|m| m.contains("rejected"))
            .map(str::to_string)
    })
    .unwrap();
    assert!(msg.contains("spec.accessPublicKeys[0]"), "{msg}");
    assert_eq!(all_ready(&dir, 1), Some(before));
}

fn lease_row(dir: &Path, name: &str) -> Option<serde_json::Value> {
    status_json(dir)
        .ok()?
        .into_iter()
        .find(|l| l["name"] == name)
}

fn problem_with(dir: &Path, file: &str, needle: &str) -> Option<String> {
    state_json(dir)["problems"]
        .as_array()?
        .iter()
        .filter(|p| p["file"] == file)
        .filter_map(|p| p["message"].as_str())
        .find(|m| m.contains(needle))
        .map(str::to_string)
}

/// Events the operator recorded about one object, as `reason` strings.
fn event_reasons(dir: &Path, object: &str) -> Vec<String> {
    state_json(dir)["events"]
        .as_array()
        .map(|evs| {
            evs.iter()
                .filter(|e| e["object"] == object)
                .filter_map(|e| e["reason"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn truncate_then_write_keeps_the_lease() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("local");
    std::fs::create_dir(&dir).unwrap();
    let key = new_public_key(tmp.path(), "k");
    write_file(
        &dir.join("pool.yaml"),
        &pool_yaml("p", &["127.0.10.1-127.0.10.2"]),
    );
    let good = lease_yaml("vm", "alice", "p", &key, "127.0.0.1:22", false);
    let file = dir.join("vm.yaml");
    write_file(&file, &good);
    let _op = Operator::start(&dir).unwrap();
    let before = wait_for(WAIT, "vm Ready", || {
        lease_row(&dir, "vm").filter(|r| r["phase"] == "Ready")
    })
    .unwrap();
    let hash = before["leaseHash"].as_str().unwrap().to_string();
    let uid = state_json(&dir)["leases"]["default/vm"]["uid"].clone();
    let events_before = event_reasons(&dir, "VMLease default/vm");

    // `: > vm.yaml`, then the content half a second later, in place.
    let start = std::time::Instant::now();
    std::fs::write(&file, "").unwrap();
    let seen = wait_for(WAIT, "the emptied file reported", || {
        problem_with(&dir, "vm.yaml", "keeps its last good version")
    })
    .unwrap();
    eprintln!("empty vm.yaml reported after {:?}: {seen}", start.elapsed());
    std::thread::sleep(Duration::from_millis(500).saturating_sub(start.elapsed()));
    std::fs::write(&file, &good).unwrap();
    wait_for(WAIT, "the problem cleared", || {
        problem_with(&dir, "vm.yaml", "keeps its last good version")
            .is_none()
            .then_some(())
    })
    .unwrap();
    eprintln!("content back after {:?}", start.elapsed());

    // Ordinary in-place saves (open with truncate, write) many times over.
    for _ in 0..100 {
        std::fs::write(&file, &good).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    let after = wait_for(WAIT, "vm Ready after the saves", || {
        lease_row(&dir, "vm").filter(|r| r["phase"] == "Ready")
    })
    .unwrap();
    assert_eq!(
        after["leaseHash"],
        hash.as_str(),
        "the lease was re-created"
    );
    assert_eq!(state_json(&dir)["leases"]["default/vm"]["uid"], uid);
    assert_eq!(after["ip"], before["ip"]);
    assert_eq!(
        event_reasons(&dir, "VMLease default/vm"),
        events_before,
        "the lease was released or allocated again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_file_is_refused_and_holds_nothing_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("local");
    std::fs::create_dir(&dir).unwrap();
    let key = new_public_key(tmp.path(), "k");
    write_file(
        &dir.join("pool.yaml"),
        &pool_yaml("p", &["127.0.10.1-127.0.10.2"]),
    );
    write_file(
        &dir.join("vm.yaml"),
        &lease_yaml("vm", "alice", "p", &key, "127.0.0.1:22", false),
    );
    write_file(
        &dir.join("other.yaml"),
        &lease_yaml("other", "bob", "p", &key, "127.0.0.1:22", false),
    );
    let op = Operator::start(&dir).unwrap();
    let (sub, task) = subscriber(&op, &op.token());
    snapshot_where(&sub, "both leases", |s| lease_names(s) == ["other", "vm"]).await;

    // 400 KB that held the old scan loop for minutes, a large flat file that
    // is slow to parse but legal to read, then an edit elsewhere.
    let n = 200_000;
    let start = std::time::Instant::now();
    write_file(
        &dir.join("nested.yaml"),
        &format!("a: {}{}", "[".repeat(n), "]".repeat(n)),
    );
    write_file(
        &dir.join("big.yaml"),
        &format!("a:\n{}", "- 1\n".repeat(1_000_000)),
    );
    write_file(
        &dir.join("vm.yaml"),
        &lease_yaml("vm", "alice", "p", &key, "127.0.0.1:22", true),
    );
    snapshot_where(&sub, "vm withdrawn", |s| lease_names(s) == ["other"]).await;
    let withdrawn = start.elapsed();
    wait_for(WAIT, "vm Settled", || {
        lease_row(&dir, "vm").filter(|r| r["phase"] == "Settled")
    })
    .unwrap();
    let settled = start.elapsed();
    let problem = wait_for(WAIT, "nested.yaml refused", || {
        problem_with(&dir, "nested.yaml", "nesting deeper than 64 levels")
    })
    .unwrap();
    let refused = start.elapsed();
    wait_for(WAIT, "big.yaml parsed", || {
        problem_with(&dir, "big.yaml", "missing kind")
    })
    .unwrap();
    let big = start.elapsed();
    eprintln!(
        "nested.yaml ({} bytes) refused after {refused:?}: {problem}\n\
         settled edit in vm.yaml: out of the snapshot after {withdrawn:?}, phase Settled after {settled:?}\n\
         big.yaml (4 MB, parsed on its own thread) done after {big:?}",
        2 * n + 3
    );
    // The rest keeps working.
    assert_eq!(lease_row(&dir, "other").unwrap()["phase"], "Ready");
    task.abort();
}

/// Waits on the subscription itself (no polling), so the caller acts the
/// moment the snapshot arrives.
async fn next_snapshot_where(
    sub: &Subscription,
    what: &str,
    f: impl Fn(&pb::Snapshot) -> bool,
) -> Arc<pb::Snapshot> {
    let mut rx = sub.snapshot.clone();
    let wait = async {
        loop {
            let held = rx.borrow_and_update().clone();
            if let Some(s) = held.map(|h| Arc::new(h.to_snapshot())).filter(|s| f(s)) {
                return s;
            }
            if rx.changed().await.is_err() {
                panic!("subscription ended waiting for {what}");
            }
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_right_after_publishing_keeps_what_was_published() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("local");
    std::fs::create_dir(&dir).unwrap();
    let key = new_public_key(tmp.path(), "k");
    write_file(
        &dir.join("pool.yaml"),
        &pool_yaml("p", &["127.0.10.1-127.0.10.8"]),
    );
    let mut lost = Vec::new();
    for i in 0..5 {
        let mut op = Operator::start(&dir).unwrap();
        let (sub, task) = subscriber(&op, &op.token());
        next_snapshot_where(&sub, "the first snapshot", |s| s.leases.len() == i).await;
        let name = format!("crash-{i}");
        write_file(
            &dir.join(format!("{name}.yaml")),
            &lease_yaml(&name, &format!("user{i}"), "p", &key, "127.0.0.1:22", false),
        );
        let snap = next_snapshot_where(&sub, "the new lease", |s| {
            s.leases.iter().any(|l| l.name == name)
        })
        .await;
        // kill -9 the moment a subscriber holds it.
        op.proc.kill();
        task.abort();
        let published = snap.leases.iter().find(|l| l.name == name).unwrap();
        let published = (hex::encode(&published.lease_hash), published.ip.clone());

        let _op = Operator::start(&dir).unwrap();
        let row = wait_for(WAIT, "the lease after the restart", || {
            lease_row(&dir, &name).filter(|r| r["phase"] == "Ready")
        })
        .unwrap();
        let restored = (
            row["leaseHash"].as_str().unwrap_or_default().to_string(),
            row["ip"].as_str().unwrap_or_default().to_string(),
        );
        eprintln!("try {i}: published {published:?}, after restart {restored:?}");
        if restored != published {
            lost.push(i);
        }
    }
    assert!(
        lost.is_empty(),
        "tries {lost:?} of 5 lost the published lease in the crash"
    );
}

/// `keyway-proxy run --local dir` with its metrics on `metrics`.
fn local_proxy(dir: &Path, metrics: std::net::SocketAddr, log: &Path) -> Proc {
    let mut cmd = std::process::Command::new(bin("keyway-proxy"));
    cmd.args(["run", "--local"])
        .arg(dir)
        .args([
            "--ssh-listen",
            &format!("127.0.0.1:{}", keyway_e2e::stack::free_port()),
        ])
        .args(["--metrics-listen", &metrics.to_string()])
        .env("RUST_LOG", "info");
    Proc::spawn_append(cmd, log).unwrap()
}

fn proxy_metric(metrics: std::net::SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = keyway_e2e::stack::http_get(metrics, "/metrics").ok()?;
    body.lines()
        .find(|l| l.split_whitespace().next() == Some(name))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// What a subscriber saw across a crash: each lease's first (hash, IP), any
/// lease that later showed another, and every version with its lease count.
#[derive(Default)]
struct Seen {
    leases: BTreeMap<String, (String, String)>,
    moved: Vec<String>,
    versions: BTreeMap<(u64, u64), usize>,
}

/// kill -9 of a proxy and then of the operator in the middle of a burst of
/// edits (new leases and edited ones, written 60 ms apart, the burst going on
/// while the operator is down): no allocation a subscriber ever saw moves or
/// is lost; the proxy restarted with the operator away serves its disk copy,
/// a version the operator published; once the operator is back, the proxy
/// converges to exactly its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_a_burst_of_edits_loses_no_allocation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("local");
    std::fs::create_dir(&dir).unwrap();
    let key = new_public_key(tmp.path(), "k");
    write_file(
        &dir.join("pool.yaml"),
        &pool_yaml("p", &["127.0.10.1-127.0.10.8"]),
    );
    let lease = |i: usize, port: u16| {
        lease_yaml(
            &format!("burst-{i}"),
            // At most 200 steps make 134 leases: 7 per user, the pool has 8.
            &format!("user{}", i % 20),
            "p",
            &key,
            &format!("127.0.0.1:{port}"),
            false,
        )
    };
    write_file(&dir.join("burst-0.yaml"), &lease(0, 22));
    // A fixed port, so the subscriber and a restarted operator meet again.
    let grpc = format!("127.0.0.1:{}", keyway_e2e::stack::free_port());
    let flags = ["--grpc-listen", grpc.as_str()];
    let mut op = Operator::start_with(&dir, &flags).unwrap();
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", keyway_e2e::stack::free_port())
        .parse()
        .unwrap();
    let plog = tmp.path().join("proxy.log");
    let mut px = local_proxy(&dir, metrics, &plog);
    wait_for(WAIT, "the proxy's first snapshot", || {
        (proxy_metric(metrics, "keyway_snapshot_leases")? >= 1.0).then_some(())
    })
    .unwrap();

    let (sub, task) = subscriber(&op, &op.token());
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let recorder = {
        let seen = seen.clone();
        let mut rx = sub.snapshot.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(held) = rx.borrow_and_update().clone() else {
                    continue;
                };
                let s = held.to_snapshot();
                let mut seen = seen.lock().unwrap();
                seen.versions.insert(version(&s), s.leases.len());
                for l in &s.leases {
                    let now = (hex::encode(&l.lease_hash), l.ip.clone());
                    match seen.leases.get(&l.name) {
                        None => {
                            seen.leases.insert(l.name.clone(), now);
                        }
                        Some(first) if *first != now => seen.moved.push(l.name.clone()),
                        Some(_) => {}
                    }
                }
            }
        })
    };

    // The burst: a new lease on two steps of three, an edit of the last one
    // (another target port) on the third. The proxy dies once it has applied
    // a few deltas, the operator once it has published a few versions more;
    // the burst goes on while the operator is down.
    let mut created = 1;
    let (mut px_killed, mut op_killed) = (false, false);
    let mut step = 0;
    while step < 45 || !op_killed {
        step += 1;
        assert!(step < 200, "the burst never reached its kill points");
        if step % 3 == 0 {
            write_file(
                &dir.join(format!("burst-{}.yaml", created - 1)),
                &lease(created - 1, 2000 + step),
            );
        } else {
            write_file(
                &dir.join(format!("burst-{created}.yaml")),
                &lease(created, 22),
            );
            created += 1;
        }
        std::thread::sleep(Duration::from_millis(60));
        if !px_killed
            && step >= 15
            && proxy_metric(metrics, "keyway_snapshot_leases").unwrap_or(0.0) >= 3.0
        {
            px.kill();
            px_killed = true;
        }
        if px_killed && !op_killed && step >= 30 && seen.lock().unwrap().versions.len() > 4 {
            op.proc.kill();
            op_killed = true;
        }
    }

    // The proxy again, with the operator away: it serves what it kept.
    let mut px = local_proxy(&dir, metrics, &plog);
    let (disk_version, disk_leases) = wait_for(WAIT, "the proxy serving its disk copy", || {
        assert!(px.running(), "keyway-proxy exited:\n{}", px.output());
        let leases = proxy_metric(metrics, "keyway_snapshot_leases")?;
        let epoch = proxy_metric(metrics, "keyway_snapshot_epoch")?;
        let v = proxy_metric(metrics, "keyway_snapshot_version")?;
        (leases >= 1.0).then_some(((epoch as u64, v as u64), leases as usize))
    })
    .unwrap();
    {
        let seen = seen.lock().unwrap();
        // The proxy died after applying deltas, not on its first snapshot.
        assert!(disk_leases >= 3, "disk copy of {disk_leases} leases");
        assert_eq!(
            seen.versions.get(&disk_version),
            Some(&disk_leases),
            "the proxy's disk copy {disk_version:?} ({disk_leases} leases) is not a version \
             the operator published: {:?}",
            seen.versions
        );
    }

    // The operator again: every lease Ready, nothing a subscriber saw moved.
    let op2 = Operator::start_with(&dir, &flags).unwrap();
    let rows = wait_for(WAIT, "every burst lease Ready", || {
        let rows = status_json(&dir).ok()?;
        (rows.len() == created && rows.iter().all(|r| r["phase"] == "Ready")).then_some(rows)
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:#?}\n{}",
            status_json(&dir).unwrap_or_default(),
            status_table(&dir).unwrap_or_default()
        )
    });
    let now: BTreeMap<String, (String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                (
                    r["leaseHash"].as_str().unwrap().to_string(),
                    r["ip"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect();
    let mut per_user: BTreeMap<String, Vec<&String>> = BTreeMap::new();
    for r in &rows {
        per_user
            .entry(r["user"].as_str().unwrap().to_string())
            .or_default()
            .push(&now[r["name"].as_str().unwrap()].1);
    }
    for (user, ips) in &mut per_user {
        let n = ips.len();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), n, "{user} holds one IP twice: {now:?}");
    }
    let final_version = wait_for(WAIT, "the subscriber to see every lease", || {
        let s = sub.snapshot.borrow().clone()?;
        (s.lease_count() == created).then_some((s.version.epoch, s.version.version))
    })
    .unwrap();
    let seen = seen.lock().unwrap();
    assert!(seen.moved.is_empty(), "leases moved: {:?}", seen.moved);
    for (name, first) in &seen.leases {
        assert_eq!(
            now.get(name),
            Some(first),
            "{name} changed across the crash"
        );
    }
    drop(seen);
    wait_for(WAIT, "the restarted proxy to converge", || {
        assert!(px.running(), "keyway-proxy exited:\n{}", px.output());
        let epoch = proxy_metric(metrics, "keyway_snapshot_epoch")? as u64;
        let v = proxy_metric(metrics, "keyway_snapshot_version")? as u64;
        let leases = proxy_metric(metrics, "keyway_snapshot_leases")? as usize;
        ((epoch, v) >= final_version && leases == created).then_some(())
    })
    .unwrap();
    eprintln!(
        "{created} leases; proxy disk copy {disk_version:?} with {disk_leases}; final {final_version:?}"
    );
    recorder.abort();
    task.abort();
    drop(op2);
}

/// Reading the directory is not a change: an idle operator runs no rounds
/// but its periodic rescan (`--rescan-secs 5` here). Its own listings and
/// reads once woke it every 20 ms, forever.
#[test]
fn an_idle_directory_costs_no_rounds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("local");
    std::fs::create_dir(&dir).unwrap();
    let key = new_public_key(tmp.path(), "idle");
    write_file(&dir.join("pool.yaml"), &pool_yaml("p", &["127.0.10.1"]));
    write_file(
        &dir.join("vm.yaml"),
        &lease_yaml("vm", "idle", "p", &key, "127.0.0.1:22", false),
    );
    let op = Operator::start(&dir).unwrap();
    wait_for(WAIT, "the lease Ready", || all_ready(&dir, 1)).unwrap();
    // `status` read the state: let its reads settle too.
    std::thread::sleep(Duration::from_secs(1));
    let rounds = || op.proc.output().matches(" round ").count();
    let before = rounds();
    std::thread::sleep(Duration::from_secs(3));
    let idle = rounds() - before;
    assert!(idle <= 1, "{idle} rounds in 3 idle seconds");
}

/// Lease `name`'s `Routed` condition as the state holds it.
fn routed_condition(dir: &Path, name: &str) -> Option<serde_json::Value> {
    state_json(dir)["leases"][format!("default/{name}")]["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Routed")
        .cloned()
}

/// Whether the operator holds one subscriber, connected or not.
fn subscriber_connected(dir: &Path, connected: bool) -> Option<()> {
    let subs = state_json(dir)["snapshot"]["subscribers"].clone();
    let subs = subs.as_array()?;
    (!subs.is_empty() && subs.iter().all(|s| s["connected"] == connected)).then_some(())
}

/// The only proxy leaving and coming back rewrites no status that did not
/// change: `Routed` of a lease it had applied stays true, with its
/// transition time, throughout. At a million leases every status rewritten
/// costs a round of about a minute, during which no edit is applied. A lease
/// added while no proxy is there is the one that says `NoProxy`, until one
/// applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_proxy_restarting_rewrites_no_status_it_had_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("local");
    std::fs::create_dir(&dir).unwrap();
    let key = new_public_key(tmp.path(), "lone");
    write_file(
        &dir.join("pool.yaml"),
        &pool_yaml("p", &["127.0.10.1", "127.0.10.2"]),
    );
    write_file(
        &dir.join("a.yaml"),
        &lease_yaml("a", "alice", "p", &key, "127.0.0.1:22", false),
    );
    let op = Operator::start(&dir).unwrap();
    let (sub, task) = subscriber(&op, &op.token());
    let applied = wait_for(WAIT, "a Routed", || {
        routed_condition(&dir, "a").filter(|c| c["status"] == "True")
    })
    .unwrap();
    assert_eq!(applied["reason"], "Applied", "{applied}");

    task.abort();
    drop(sub);
    wait_for(WAIT, "the subscriber gone", || {
        subscriber_connected(&dir, false)
    })
    .unwrap();
    write_file(
        &dir.join("b.yaml"),
        &lease_yaml("b", "bob", "p", &key, "127.0.0.1:22", false),
    );
    let b = wait_for(WAIT, "b published with no proxy", || {
        routed_condition(&dir, "b").filter(|c| c["reason"] == "NoProxy")
    })
    .unwrap();
    assert_eq!(b["status"], "False");
    assert_eq!(
        routed_condition(&dir, "a"),
        Some(applied.clone()),
        "with no proxy"
    );

    let (_sub, _task) = subscriber(&op, &op.token());
    wait_for(WAIT, "b Routed once a proxy applied it", || {
        routed_condition(&dir, "b").filter(|c| c["status"] == "True")
    })
    .unwrap();
    assert_eq!(
        routed_condition(&dir, "a"),
        Some(applied),
        "after it came back"
    );
}
