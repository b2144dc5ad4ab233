//! Local mode at provider scale (issue 14's measurement): one IPPool /24, N
//! leases in multi-document files of 50,000, `keyway-proxy run --local`
//! subscribed; then edits of one lease in a second, small file, each timed
//! from the write to the proxy's `keyway_snapshot_version` changing. Also
//! cold starts, RSS of both processes, the state database's size and the
//! snapshot bytes the operator sent. Real release binaries
//! (`KEYWAY_BIN_DIR`); run by `make bench`, figures go to BENCHMARKS.md.
//!
//! `KEYWAY_SCALE_LEASES` (comma-separated counts, default `10000,100000`)
//! and `KEYWAY_SCALE_EDITS` (default 50) change the run. Leases belong to
//! at most 100,000 users (`user-{i % 100000}`), so 1,000,000 leases are ten
//! per user on the /24.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use keyway_e2e::cluster::hex_key;
use keyway_e2e::stack::{free_port, http_get};
use keyway_e2e::*;

/// Leases per generated file.
const LEASES_PER_FILE: usize = 50_000;

/// Generous: the baseline takes tens of seconds per step at 100,000 leases.
const SLOW: Duration = Duration::from_secs(1800);

fn fmt(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    }
}

fn mib(kib: u64) -> String {
    if kib >= 1024 * 1024 {
        format!("{:.2} GiB", kib as f64 / (1024.0 * 1024.0))
    } else {
        format!("{} MiB", kib / 1024)
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn rss_kib(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").ok()?;
    body.lines()
        .find(|l| l.split_whitespace().next() == Some(name))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn lease_doc(i: usize, user: &str, target: &str) -> String {
    format!(
        "---\napiVersion: keyway.dev/v1alpha1\nkind: VMLease\nmetadata:\n  name: {}\nspec:\n  user: {user}\n  poolRef: bench\n  accessPublicKeys:\n    - \"{}\"\n  target:\n    address: \"{target}\"\n",
        if i == usize::MAX {
            "edited".to_string()
        } else {
            format!("vm-{i:07}")
        },
        hex_key(u32::try_from(i % (1 << 31)).unwrap_or(0)),
    )
}

/// The snapshot record the operator last saved (read alone: the objects
/// are millions of rows at this scale).
fn snapshot_record(dir: &Path) -> Option<keyway_state::SnapshotRecord> {
    let store = keyway_state::Store::open_existing(&keyway_state::Paths::new(dir)).ok()??;
    store.snapshot_record().ok()?
}

/// Bytes the operator says it sent its subscribers.
fn bytes_sent(dir: &Path) -> Option<u64> {
    Some(
        snapshot_record(dir)?
            .subscribers
            .iter()
            .map(|s| s.bytes_sent)
            .sum(),
    )
}

struct Run {
    leases: usize,
    operator_first_snapshot: Duration,
    proxy_first: Duration,
    proxy_restart: Duration,
    samples: Vec<Duration>,
    operator_restart: Duration,
    op_rss: (u64, u64),
    proxy_rss: (u64, u64),
    state_bytes: u64,
    sent_per_edit: Option<u64>,
}

fn proxy(dir: &Path, metrics: SocketAddr, log: &Path) -> Proc {
    let mut cmd = Command::new(bin("keyway-proxy"));
    cmd.arg("run")
        .arg("--local")
        .arg(dir)
        .args(["--ssh-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-listen", &metrics.to_string()])
        .env("RUST_LOG", "warn");
    Proc::spawn_append(cmd, log).unwrap()
}

/// Starts the operator on `dir` and waits until its state records a
/// published snapshot of `total` leases.
fn operator(dir: &Path, log: &Path, total: usize) -> Proc {
    let mut cmd = Command::new(bin("keyway-operator"));
    cmd.args(["run", "--local"])
        .arg(dir)
        .args(["--grpc-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn");
    let mut op = Proc::spawn_append(cmd, log).unwrap();
    // The state is big at this scale: read it only when the database changed.
    let mut seen = None;
    let started = std::time::SystemTime::now();
    wait_for(SLOW, "the operator's first snapshot", || {
        assert!(op.running(), "keyway-operator exited:\n{}", op.output());
        let stamp = ["state.db", "state.db-wal", "operator.json"].map(|f| {
            std::fs::metadata(dir.join(".keyway").join(f))
                .ok()
                .map(|m| (m.modified().ok(), m.len()))
        });
        // operator.json is written once this run's first round is saved.
        let fresh = stamp[2].and_then(|(m, _)| m).is_some_and(|m| m >= started);
        if !fresh || Some(stamp) == seen {
            return None;
        }
        seen = Some(stamp);
        (snapshot_record(dir)?.leases == total).then_some(())
    })
    .unwrap();
    op
}

fn wait_leases(p: &mut Proc, metrics: SocketAddr, n: usize, what: &str) {
    wait_for(SLOW, what, || {
        assert!(p.running(), "keyway-proxy exited:\n{}", p.output());
        (metric(metrics, "keyway_snapshot_leases")? as usize == n).then_some(())
    })
    .unwrap();
}

fn run(n: usize, edits: usize) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("leases");
    std::fs::create_dir_all(&dir).unwrap();
    write_file(
        &dir.join("pool.yaml"),
        &pool_yaml("bench", &["127.0.61.0/24"]),
    );
    // Files of at most 50,000 leases (about 12 MB; local mode reads files
    // up to 32 MiB).
    for (f, first) in (0..n).step_by(LEASES_PER_FILE).enumerate() {
        let mut all = String::with_capacity(LEASES_PER_FILE * 240);
        for i in first..n.min(first + LEASES_PER_FILE) {
            let user = format!("user-{}", i % 100_000);
            all.push_str(&lease_doc(i, &user, "127.0.0.1:22"));
        }
        write_file(&dir.join(format!("leases-{f:03}.yaml")), &all);
    }
    let edit_path = dir.join("edit.yaml");
    write_file(
        &edit_path,
        &lease_doc(usize::MAX, "editor", "127.0.0.1:2000"),
    );
    let total = n + 1;

    let log = tmp.path().join("operator.log");
    let t0 = Instant::now();
    let mut op = operator(&dir, &log, total);
    let operator_first_snapshot = t0.elapsed();

    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let plog = tmp.path().join("proxy.log");
    let t0 = Instant::now();
    let mut px = proxy(&dir, metrics, &plog);
    wait_leases(&mut px, metrics, total, "the proxy to hold every lease");
    let proxy_first = t0.elapsed();
    let op_start = rss_kib(op.pid());
    let proxy_start = rss_kib(px.pid());
    // The first edit also flushes the record of the initial full snapshot's
    // bytes (written with the state after the ACK): untimed, uncounted.
    let mut sent_before = None;
    let mut samples = Vec::with_capacity(edits);
    for e in 0..=edits {
        if e == 1 {
            std::thread::sleep(Duration::from_millis(500));
            sent_before = bytes_sent(&dir);
        }
        let version = metric(metrics, "keyway_snapshot_version").unwrap();
        let text = lease_doc(usize::MAX, "editor", &format!("127.0.0.1:{}", 2001 + e));
        let t0 = Instant::now();
        write_file(&edit_path, &text);
        // Polled every 2 ms (wait_for's 50 ms would be most of the figure).
        while metric(metrics, "keyway_snapshot_version").is_none_or(|v| v == version) {
            assert!(t0.elapsed() < SLOW, "the proxy did not apply the edit");
            std::thread::sleep(Duration::from_millis(2));
        }
        if e > 0 {
            samples.push(t0.elapsed());
        }
    }
    // The operator records the bytes once the last ACK is in.
    std::thread::sleep(Duration::from_millis(500));
    let sent_per_edit = bytes_sent(&dir)
        .zip(sent_before)
        .map(|(after, before)| after.saturating_sub(before) / edits.max(1) as u64);
    let op_after = rss_kib(op.pid());
    let proxy_after = rss_kib(px.pid());
    let state_bytes: u64 = ["state.db", "state.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(".keyway").join(f)).ok())
        .map(|m| m.len())
        .sum();

    // A proxy restart: its disk copy, then the operator's answer.
    px.stop(Duration::from_secs(10));
    let t0 = Instant::now();
    let mut px = proxy(&dir, metrics, &plog);
    wait_leases(
        &mut px,
        metrics,
        total,
        "the restarted proxy to hold every lease",
    );
    let proxy_restart = t0.elapsed();
    px.stop(Duration::from_secs(10));
    op.stop(Duration::from_secs(30));
    // An operator restart: from its database to the first snapshot saved.
    let t0 = Instant::now();
    let mut op = operator(&dir, &log, total);
    let operator_restart = t0.elapsed();
    op.stop(Duration::from_secs(30));
    samples.sort();
    Run {
        leases: n,
        operator_first_snapshot,
        proxy_first,
        proxy_restart,
        samples,
        operator_restart,
        op_rss: (op_start, op_after),
        proxy_rss: (proxy_start, proxy_after),
        state_bytes,
        sent_per_edit,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let counts: Vec<usize> = std::env::var("KEYWAY_SCALE_LEASES")
        .unwrap_or_else(|_| "10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let edits: usize = std::env::var("KEYWAY_SCALE_EDITS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let mut table = format!(
        "| leases (+1 edited, one /24 pool, local mode) | edit → proxy applied, min / median / p99 / max ({edits} edits) | snapshot bytes sent per edit | operator RSS start → after | proxy RSS start → after | state.db (+ WAL) | operator: start → first snapshot (empty state / restart) | proxy: start → all leases (first / restart) |\n|---|---|---|---|---|---|---|---|\n"
    );
    for n in counts {
        let r = run(n, edits);
        let s = &r.samples;
        table.push_str(&format!(
            "| {} | {} / {} / {} / {} | {} | {} → {} | {} → {} | {} | {} / {} | {} / {} |\n",
            r.leases,
            fmt(s[0]),
            fmt(s[s.len() / 2]),
            fmt(s[(s.len() * 99).div_ceil(100).saturating_sub(1)]),
            fmt(s[s.len() - 1]),
            r.sent_per_edit.map_or("not recorded".into(), bytes),
            mib(r.op_rss.0),
            mib(r.op_rss.1),
            mib(r.proxy_rss.0),
            mib(r.proxy_rss.1),
            bytes(r.state_bytes),
            fmt(r.operator_first_snapshot),
            fmt(r.operator_restart),
            fmt(r.proxy_first),
            fmt(r.proxy_restart),
        ));
        eprintln!("{n} leases done");
    }
    bench_report(&table);
}
