//! Under attack: another tenant's login latency and the gateway's RSS while
//! (a) one tenant stalls 64 channels, (b) unauthenticated loops force the
//! most expensive key exchange the gateway offers, (c) an idle-socket flood
//! hits the HTTPS/CONNECT port — each beside the same figures with no
//! attack, as ratios. Real OpenSSH clients and sshd VMs on loopback; run by
//! `make bench` with the release binaries; figures go to BENCHMARKS.md.
#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keyway_e2e::stack::*;
use keyway_e2e::{bench_report, make_tls};

const LOGINS: usize = 30;
const STALLED: usize = 64;
const KEX_LOOPS: usize = 3;
const IDLE_SOCKETS: usize = 10_100;

struct Figures {
    median: Duration,
    p99: Duration,
    failed: usize,
    rss_kib: u64,
}

/// `LOGINS` sequential `ssh <ip> true` of bob's.
fn logins(st: &Stack, ip: &str) -> Figures {
    let mut t = Vec::new();
    let mut failed = 0;
    for _ in 0..LOGINS {
        let started = Instant::now();
        let o = run_with_timeout(st.ssh(&["bob"], &[ip, "true"]), Duration::from_secs(60));
        if o.status.success() {
            t.push(started.elapsed());
        } else {
            failed += 1;
        }
    }
    t.sort();
    let pick = |q: f64| {
        t.get(((t.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
            .unwrap_or(Duration::from_secs(60))
    };
    Figures {
        median: pick(0.5),
        p99: pick(0.99),
        failed,
        rss_kib: st.proxy_rss_kib(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn kill_all(children: Vec<Child>) {
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn main() {
    let tls_dir = tempfile::tempdir().unwrap();
    let tls = make_tls(tls_dir.path());
    let https_port = free_port();
    let https = format!("127.0.0.1:{https_port}");
    let budget_mib = 512;
    let st = Stack::start(
        &["127.0.80.1"],
        &[
            LeaseSpec::new("mallory-vm", "mallory"),
            LeaseSpec::new("bob-vm", "bob"),
        ],
        &[
            "--https-listen",
            &https,
            "--tls-cert",
            tls.cert.to_str().unwrap(),
            "--tls-key",
            tls.key.to_str().unwrap(),
            "--relay-buffer-budget-mib",
            &budget_mib.to_string(),
        ],
    )
    .unwrap();
    let ip = st.leases["bob-vm"].ip.clone();
    let mallory_ip = st.leases["mallory-vm"].ip.clone();
    logins(&st, &ip);
    let quiet = logins(&st, &ip);

    // (a) mallory stalls 64 channels.
    let stalled: Vec<Child> = (0..STALLED)
        .map(|_| st.stalled_reader("mallory", &mallory_ip))
        .collect();
    st.wait_for_stall();
    let stall = logins(&st, &ip);
    kill_all(stalled);
    std::thread::sleep(Duration::from_secs(2));

    // (b) key-exchange loops, each from its own source.
    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..KEX_LOOPS)
        .map(|i| {
            let stop = stop.clone();
            let cfg = st.ssh_config(&["stranger"]);
            let port = st.ssh_port.to_string();
            let ip = ip.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut c = Command::new("ssh");
                    c.arg("-F").arg(&cfg).args([
                        "-p",
                        &port,
                        "-b",
                        &format!("127.0.81.{}", i + 1),
                        "-o",
                        "KexAlgorithms=curve25519-sha256",
                        &ip,
                        "true",
                    ]);
                    let _ = run_with_timeout(c, Duration::from_secs(60));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let kex = logins(&st, &ip);
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        let _ = l.join();
    }

    // (c) idle sockets on the HTTPS port, each from its own address (a
    // spread-out flood: one source alone is held to 32 by the per-source cap).
    let mut flood = Command::new("python3")
        .arg("-c")
        .arg(
            "import resource,socket,sys,time\n\
             s,h=resource.getrlimit(resource.RLIMIT_NOFILE)\n\
             resource.setrlimit(resource.RLIMIT_NOFILE,(h,h))\n\
             socks=[]\n\
             for i in range(int(sys.argv[3])):\n\
             \x20   c=socket.socket(); c.settimeout(5)\n\
             \x20   c.bind(('127.1.%d.%d'%(i//250,i%250+1),0))\n\
             \x20   try:\n\
             \x20       c.connect((sys.argv[1],int(sys.argv[2]))); socks.append(c)\n\
             \x20   except OSError: pass\n\
             print(len(socks),flush=True)\n\
             time.sleep(600)\n",
        )
        .args([
            "127.0.0.1",
            &https_port.to_string(),
            &IDLE_SOCKETS.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut opened = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(flood.stdout.as_mut().unwrap()),
        &mut opened,
    )
    .unwrap();
    let idle = logins(&st, &ip);
    let _ = flood.kill();
    let _ = flood.wait();

    let row = |what: &str, f: &Figures| {
        format!(
            "| {what} | {:.0} | {:.0} | {:.2} / {:.2} | {} of {LOGINS} | {} |\n",
            ms(f.median),
            ms(f.p99),
            ms(f.median) / ms(quiet.median),
            ms(f.p99) / ms(quiet.p99),
            f.failed,
            f.rss_kib / 1024,
        )
    };
    let mut t = String::new();
    t.push_str(&format!(
        "Another tenant's `ssh <pooled ip> true` ({LOGINS} in a row, relay mode, reused upstream login) \
         while one attack runs; gateway defaults except a {budget_mib} MiB relay buffer budget and the \
         HTTPS listener on. Targets: ≤ 1.5x login latency, RSS within the budget, no failed login.\n\n"
    ));
    t.push_str("| attack | median ms | p99 ms | ratio to no attack (median / p99) | logins failed | gateway RSS MiB |\n|---|---|---|---|---|---|\n");
    t.push_str(&row("none", &quiet));
    t.push_str(&row(
        &format!(
            "(a) one tenant stalls {STALLED} channels (`ssh vm 'cat /dev/zero'`, stdout never read)"
        ),
        &stall,
    ));
    t.push_str(&row(
        &format!("(b) {KEX_LOOPS} loops of unauthenticated curve25519 handshakes (the costliest exchange OpenSSH 9.2 can negotiate here; mlkem768x25519, also offered, needs OpenSSH ≥ 9.9), one source each"),
        &kex,
    ));
    t.push_str(&row(
        &format!(
            "(c) {} idle sockets held on the HTTPS port, one per source address",
            opened.trim()
        ),
        &idle,
    ));
    t.push('\n');
    bench_report(&t);
}
