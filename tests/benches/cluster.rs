//! Cluster mode through the API double: time from creating N leases (10,000
//! by default, `KEYWAY_CLUSTER_LEASES` to change) to all Ready, and from a
//! lease edit to a subscriber (the proxy's snapshot client) applying it. Run
//! by `make bench`; figures go to BENCHMARKS.md.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use keyway_e2e::cluster::*;
use keyway_e2e::wait_for;
use keyway_snapshot::client::{SubscriberConfig, subscribe};
use kube::api::{Patch, PatchParams};
use serde_json::json;

const EDITS: usize = 200;

fn fmt(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    }
}

/// Waits until every lease matches `pred`, counted in place every `poll`:
/// listing 100,000 objects per poll would hold the double's store and slow
/// the status writes it measures.
async fn until_every_lease(
    env: &ClusterEnv,
    leases: u32,
    what: &str,
    deadline: Instant,
    poll: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) {
    loop {
        let n = env.api.count("keyway.dev", "vmleases", &pred);
        if n == leases as usize {
            return;
        }
        assert!(Instant::now() < deadline, "{n} of {leases} leases {what}");
        tokio::time::sleep(poll).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let leases: u32 = std::env::var("KEYWAY_CLUSTER_LEASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let users = (leases / 10).max(1);
    // etcd keeps minutes of history; the double's default (10,000 changes)
    // is a few seconds of this bench's creates, and a watch that falls
    // further behind relists.
    let env = ClusterEnv::start_with(keyway_apiserver_double::Options {
        history_limit: 2_000_000,
        ..Default::default()
    })
    .await
    .unwrap();
    env.create("ippools", pool_obj("bench", &["127.0.60.0/24"]))
        .await
        .unwrap();
    let op = env.operator("op-bench", &[]).unwrap();
    wait_for(Duration::from_secs(60), "the operator to lead", || {
        op.ready().then_some(())
    })
    .unwrap();

    let start = Instant::now();
    futures::stream::iter(0..leases)
        .map(|i| {
            let env = &env;
            async move {
                env.create(
                    "vmleases",
                    lease_obj(
                        "bench",
                        &format!("vm-{i:06}"),
                        &format!("user-{}", i % users),
                        "bench",
                        &hex_key(i),
                    ),
                )
                .await
                .unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    let created = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(3600);
    until_every_lease(
        &env,
        leases,
        "Ready",
        deadline,
        Duration::from_secs(1),
        |l| l["status"]["phase"] == "Ready",
    )
    .await;
    let all_ready = start.elapsed();

    let (sub, _task) = subscribe(
        SubscriberConfig {
            endpoint: op.endpoint(),
            token: env.token.clone(),
            node_id: "bench".into(),
            role: "proxy".into(),
            cache_path: None,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(500),
            ca_pem: None,
            reopen_after_full_bytes: keyway_snapshot::client::DEFAULT_REOPEN_AFTER_FULL_BYTES,
        },
        |_| Ok(()),
    );
    let mut snaps = sub.snapshot.clone();
    snaps
        .wait_for(|s| {
            s.as_ref()
                .is_some_and(|s| s.lease_count() == leases as usize)
        })
        .await
        .unwrap();
    // The first acknowledgement turns every lease's Routed from NoProxy to
    // Applied: 100,000 status writes, which load the double (and would load
    // a real API server) for a while. Timed on its own; the edits measure
    // the steady state after it.
    let t0 = Instant::now();
    until_every_lease(
        &env,
        leases,
        "Routed",
        deadline,
        Duration::from_millis(200),
        |l| {
            l["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Routed" && c["status"] == "True")
            })
        },
    )
    .await;
    let all_routed = t0.elapsed();
    let api = env.dynamic("vmleases", Some("bench"));
    let mut samples = Vec::with_capacity(EDITS);
    for i in 0..EDITS {
        let name = format!("vm-{:06}", i * 37 % leases as usize);
        let user = format!("edit-{i}");
        let t0 = Instant::now();
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"upstreamUser": user}})),
        )
        .await
        .unwrap();
        tokio::time::timeout(
            Duration::from_secs(60),
            snaps.wait_for(|s| {
                s.as_ref().is_some_and(|s| {
                    s.table
                        .lease("bench", &name)
                        .is_some_and(|l| l.upstream_user == user)
                })
            }),
        )
        .await
        .unwrap()
        .unwrap();
        samples.push(t0.elapsed());
    }
    samples.sort();
    let median = samples[samples.len() / 2];
    let p99 = samples[samples.len() * 99 / 100];
    let rounds = op
        .metrics_text()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("keyway_operator_status_rounds_total "))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
        })
        .unwrap_or_default();
    let table = format!(
        "| what ({leases} leases of {users} users, one /24 pool, through the API double) | figure |\n|---|---|\n\
         | create {leases} leases (32 concurrent POSTs) | {} |\n\
         | from the first create to all {leases} Ready (status written) | {} |\n\
         | from the first proxy's full sync to all {leases} Routed (every status rewritten) | {} |\n\
         | lease edit → the subscriber applied it, median ({EDITS} edits) | {} |\n\
         | lease edit → the subscriber applied it, p99 | {} |\n\
         | operator status rounds in the run | {rounds} |\n",
        fmt(created),
        fmt(all_ready),
        fmt(all_routed),
        fmt(median),
        fmt(p99),
    );
    keyway_e2e::bench_report(&table);
}
