//! Allocator throughput: 1,000,000 leases of 100,000 users on a 256-address
//! pool, from scratch and incrementally, and one more lease on top.
//! `cargo bench -p keyway-operator --bench allocator` (single-threaded code).
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::time::{Duration, Instant};

use keyway_core::allocator::{Allocator, Assignment, LeaseKey, LeaseRequest};
use keyway_crds::addresses::AddressSet;

const LEASES: usize = 1_000_000;
const USERS: usize = 100_000;

fn req(i: usize) -> LeaseRequest {
    LeaseRequest {
        key: LeaseKey {
            namespace: format!("ns{}", i % 1000),
            name: format!("vm-{i}"),
        },
        created: i as u64,
        user: format!("user{}", i % USERS),
        pool: "pool".into(),
        settled: false,
        status_ip: None,
    }
}

fn pool() -> (String, AddressSet) {
    (
        "pool".into(),
        AddressSet::new(&["198.51.100.0/24".to_string()], &[]).unwrap(),
    )
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn main() {
    let reqs: Vec<LeaseRequest> = (0..LEASES).map(req).collect();

    // (a) restore from scratch, no status IPs.
    let t = Instant::now();
    let (scratch, _) = Allocator::restore([pool()], reqs.clone());
    let restore_scratch = t.elapsed();
    assert_eq!(scratch.len(), LEASES);
    drop(scratch);

    // (b) one upsert at a time.
    let mut a = Allocator::new();
    let [(name, set)] = [pool()];
    a.set_pool(&name, set);
    let t = Instant::now();
    for r in reqs.iter().cloned() {
        a.upsert_lease(r);
    }
    let sequential = t.elapsed();

    // (c) one more lease on top: each a fresh lease of an existing user,
    // removed again so every sample sees the same 1M-lease state.
    let mut samples = Vec::with_capacity(10_000);
    for i in 0..10_000 {
        let mut r = req(LEASES + i);
        r.user = format!("user{}", i * 7 % USERS);
        let key = r.key.clone();
        let t = Instant::now();
        a.upsert_lease(r);
        samples.push(t.elapsed());
        a.remove_lease(&key);
    }
    samples.sort();
    let median = samples[samples.len() / 2];
    let p99 = samples[samples.len() * 99 / 100];

    // (d) restart from status: all 1M leases carry their IP.
    let with_status: Vec<LeaseRequest> = reqs
        .iter()
        .map(|r| {
            let mut r = r.clone();
            if let Some(Assignment::Assigned(ip)) = a.assignment(&r.key) {
                r.status_ip = Some(*ip);
            }
            r
        })
        .collect();
    let t = Instant::now();
    let (restored, events) = Allocator::restore([pool()], with_status);
    let restore_status = t.elapsed();
    let moved = events
        .iter()
        .filter(|e| {
            matches!(
                e,
                keyway_core::allocator::Event::Moved { .. }
                    | keyway_core::allocator::Event::Conflict { .. }
            )
        })
        .count();
    let stats = restored.pool_stats("pool").unwrap();

    let table = format!(
        "| what ({LEASES} leases, {USERS} users, 256-address pool) | figure | target |\n|---|---|---|\n\
         | allocate from scratch (`restore`, no status) | {} | < 2 s |\n\
         | allocate one by one (`upsert_lease` ×{LEASES}) | {} | — |\n\
         | one more lease on top, median (10,000 samples) | {} | < 50 µs |\n\
         | one more lease on top, p99 | {} | — |\n\
         | restart from status (all {LEASES} keep their IP) | {} | — |\n\
         | leases moved by the restart | {moved} | 0 |\n\
         | busiest user / pool users / allocated | {} / {} / {} | — |\n",
        ms(restore_scratch),
        ms(sequential),
        us(median),
        us(p99),
        ms(restore_status),
        stats.max_leases_per_user,
        stats.users,
        stats.allocated,
    );
    print!("{table}");
    if let Some(path) = std::env::var_os("KEYWAY_BENCH_OUT") {
        let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(table.as_bytes()).unwrap();
    }
}
