//! Tenant-safe under hostile load: what one tenant with a valid key, or an
//! anonymous peer with a socket, can do to everyone else through the real
//! gateway (real OpenSSH clients, real sshd VMs, loopback only).
//!
//! No timing thresholds: each login has a generous deadline only so a hang
//! fails the test instead of the suite; the measured times are printed and
//! `make bench` reports them as ratios.
#![allow(clippy::unwrap_used)]

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use keyway_e2e::stack::*;

/// Runs `echo ok` as `key` on `ip`; returns how long it took.
fn login(st: &Stack, key: &str, ip: &str, who: &str) -> Duration {
    let started = Instant::now();
    let o = run_with_timeout(st.ssh(&[key], &[ip, "echo ok"]), Duration::from_secs(60));
    let took = started.elapsed();
    assert!(
        o.status.success() && stdout(&o) == "ok",
        "{who}: {o:?}\n{}",
        st.proxy_log()
    );
    eprintln!("{who}: logged in and ran a command in {took:?}");
    took
}

#[test]
fn a_reader_that_stalls_freezes_only_its_own_channels() {
    let budget_mib = 64;
    let user_mib = 16;
    let per_user_channels = 12;
    let mut st = Stack::start(
        &["127.0.41.1"],
        &[
            LeaseSpec::with_keys("shared", "alice", &["carol"]),
            LeaseSpec::new("other", "bob"),
        ],
        &[
            "--relay-buffer-budget-mib",
            &budget_mib.to_string(),
            "--user-relay-buffer-mib",
            &user_mib.to_string(),
            "--max-channels-per-user",
            &per_user_channels.to_string(),
        ],
    )
    .unwrap();
    let ip = st.leases["shared"].ip.clone();
    let other_ip = st.leases["other"].ip.clone();
    // Warm the shared upstream login, then note the resting footprint.
    login(&st, "alice", &ip, "alice before the stall");
    let rss_before = st.proxy_rss_kib();

    // carol, one of the lease's two key holders, stalls 8 channels.
    let mut stalled: Vec<Child> = (0..8).map(|_| st.stalled_reader("carol", &ip)).collect();
    let moved = st.wait_for_stall();
    let rss_stalled = st.proxy_rss_kib();
    eprintln!(
        "8 stalled channels: {moved} bytes moved, then none; gateway RSS {rss_before} KiB -> {rss_stalled} KiB, window reserved {} bytes, held {} bytes",
        st.metric("keyway_relay_window_reserved_bytes", &[]),
        st.metric("keyway_relay_buffered_bytes", &[]),
    );

    // The other key holder, carol's own new connection, and another tenant
    // all get in while the stall lasts.
    login(&st, "alice", &ip, "alice during the stall");
    login(&st, "carol", &ip, "carol (new connection) during the stall");
    login(&st, "bob", &other_ip, "bob during the stall");

    // What the gateway holds stays within the budgets.
    let reserved = st.metric("keyway_relay_window_reserved_bytes", &[]);
    let held = st.metric("keyway_relay_buffered_bytes", &[]);
    assert!(held <= reserved, "held {held} > reserved {reserved}");
    assert!(
        reserved <= (user_mib << 20) as f64,
        "one user's windows ({reserved} bytes) exceed its {user_mib} MiB share"
    );
    let grown_kib = rss_stalled.saturating_sub(rss_before);
    assert!(
        grown_kib <= budget_mib << 10,
        "gateway RSS grew {grown_kib} KiB with 8 stalled channels, beyond the {budget_mib} MiB budget"
    );

    // Over the per-user channel cap: a clear message, not a hang.
    stalled.extend((0..4).map(|_| st.stalled_reader("carol", &ip)));
    keyway_e2e::wait_for(Duration::from_secs(30), "12 open channels", || {
        (st.metric("keyway_ssh_channels_active", &["session"]) >= per_user_channels as f64)
            .then_some(())
    })
    .unwrap();
    let o = run_with_timeout(
        st.ssh(&["alice"], &[&ip, "echo ok"]),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{o:?}");
    assert!(
        err.contains("keyway: user alice already has 12 channels open"),
        "{err}"
    );
    assert!(st.metric("keyway_limit_refusals_total", &["user_channels"]) >= 1.0);
    // Another tenant is not affected by alice's cap.
    login(&st, "bob", &other_ip, "bob while alice is at her cap");

    for mut c in stalled {
        let _ = c.kill();
        let _ = c.wait();
    }
    // Everything held is given back when the channels end.
    keyway_e2e::wait_for(Duration::from_secs(30), "windows released", || {
        (st.metric("keyway_relay_window_reserved_bytes", &[]) == 0.0
            && st.metric("keyway_relay_buffered_bytes", &[]) == 0.0)
            .then_some(())
    })
    .unwrap();
    eprintln!("after the stall: gateway RSS {} KiB", st.proxy_rss_kib());
    st.proxy.as_mut().unwrap().stop(Duration::from_secs(5));
}

/// `ssh` as a stranger (no key the gateway routes) from source address
/// `from`, forcing key exchange `kex`: the handshake completes, then the
/// login is refused. Returns the client's stderr.
fn stranger_handshake(st: &Stack, ip: &str, from: &str, kex: &str) -> String {
    let mut c = st.ssh(
        &["stranger"],
        &[
            "-o",
            "LogLevel=INFO",
            "-b",
            from,
            "-o",
            &format!("KexAlgorithms={kex}"),
            ip,
            "true",
        ],
    );
    c.stdin(Stdio::null());
    let o = run_with_timeout(c, Duration::from_secs(120));
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn pre_auth_key_exchange_loops_do_not_lock_other_users_out() {
    let st = Stack::start(&["127.0.42.1"], &[LeaseSpec::new("vm", "alice")], &[]).unwrap();
    let ip = st.leases["vm"].ip.clone();
    // The finite-field groups are not offered; the most expensive exchange
    // left is what the attack loops force.
    let candidates = [
        "diffie-hellman-group-exchange-sha256",
        "diffie-hellman-group18-sha512",
        "diffie-hellman-group16-sha512",
        "diffie-hellman-group14-sha256",
        "ecdh-sha2-nistp521",
        "sntrup761x25519-sha512@openssh.com",
        "curve25519-sha256",
    ];
    let mut offered = None;
    for k in candidates {
        let err = stranger_handshake(&st, &ip, "127.0.66.1", k);
        if err.contains("Permission denied") {
            offered = Some(k);
            break;
        }
        assert!(
            err.contains("no matching key exchange method") || err.contains("Unsupported KEX"),
            "{k}: {err}"
        );
    }
    let kex = offered.expect("some key exchange is offered");
    assert_eq!(kex, "curve25519-sha256", "a finite-field group is offered");
    eprintln!("most expensive key exchange offered to OpenSSH: {kex}");

    let quiet = login(&st, "alice", &ip, "alice, no attack");
    // Three loops, each its own source, forcing that exchange back to back.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let loops: Vec<_> = (1..=3)
        .map(|i| {
            let (stop, count) = (stop.clone(), count.clone());
            let cfg = st.ssh_config(&["stranger"]);
            let port = st.ssh_port.to_string();
            let ip = ip.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut c = std::process::Command::new("ssh");
                    c.arg("-F").arg(&cfg).args([
                        "-p",
                        &port,
                        "-b",
                        &format!("127.0.66.{}", i + 1),
                        "-o",
                        &format!("KexAlgorithms={kex}"),
                        &ip,
                        "true",
                    ]);
                    let _ = run_with_timeout(c, Duration::from_secs(60));
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let mut under: Vec<Duration> = (0..5)
        .map(|_| login(&st, "alice", &ip, "alice, under a key-exchange flood"))
        .collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in loops {
        let _ = l.join();
    }
    under.sort();
    eprintln!(
        "{} forced handshakes; alice's login {quiet:?} quiet, median {:?} under attack",
        count.load(std::sync::atomic::Ordering::Relaxed),
        under[under.len() / 2]
    );

    // One source flooding connections is cut off at its rate; another
    // source still gets in meanwhile.
    let mut flood = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import socket,sys,time\n\
             socks=[]\n\
             for i in range(300):\n\
             \x20   c=socket.socket(); c.bind(('127.0.66.9',0)); c.settimeout(5)\n\
             \x20   try:\n\
             \x20       c.connect((sys.argv[1],int(sys.argv[2]))); socks.append(c)\n\
             \x20   except OSError: pass\n\
             print(len(socks),flush=True)\n\
             time.sleep(5)\n",
        )
        .args([ip.as_str(), &st.ssh_port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(flood.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    login(&st, "alice", &ip, "alice while one source floods");
    let refused = st.metric("keyway_ssh_connections_total", &["refused_source_"]);
    let _ = flood.kill();
    let _ = flood.wait();
    eprintln!(
        "source flood: {} sockets opened, {refused} refused by the per-source limits",
        line.trim()
    );
    assert!(refused >= 1.0, "{}", st.metrics_text());
}

/// The audit line of `event` from the gateway's log that contains every
/// `needle`.
fn audit_line(st: &Stack, event: &str, needles: &[&str]) -> Option<String> {
    st.proxy_log()
        .lines()
        .filter(|l| l.contains("keyway_audit") && l.contains(&format!("event=\"{event}\"")))
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
}

#[test]
fn the_audit_trail_says_who_reached_which_vm_when() {
    let st = Stack::start(&["127.0.43.1"], &[LeaseSpec::new("web", "alice")], &[]).unwrap();
    let l = st.leases["web"].clone();
    // A relayed command with an exit status and some output.
    let o = run_with_timeout(
        st.ssh(&["alice"], &[&l.ip, "head -c 5000 /dev/zero; exit 3"]),
        Duration::from_secs(60),
    );
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    let key = std::process::Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(st.key_path("alice").with_extension("pub"))
        .output()
        .unwrap();
    let fp = String::from_utf8_lossy(&key.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    let found = keyway_e2e::wait_for(Duration::from_secs(10), "the audit lines", || {
        let chan = audit_line(
            &st,
            "channel",
            &[
                "kind=\"session\"",
                "lease=default/web",
                "bytes_down=5000",
                "exit=\"status 3\"",
                "result=\"closed\"",
            ],
        )?;
        let conn = audit_line(
            &st,
            "connection",
            &[
                "lease=default/web",
                "tenant=alice",
                &format!("key=\"{fp}\""),
                &format!("dst={}:{}", l.ip, st.ssh_port),
                "src=127.0.0.1:",
                "mode=\"relay\"",
                "channels=1",
                "bytes_down=5000",
                "result=\"closed\"",
            ],
        )?;
        Some((chan, conn))
    });
    let (chan, conn) = found.unwrap_or_else(|e| panic!("{e}\n{}", st.proxy_log()));
    eprintln!("{chan}\n{conn}");
    // Same session id on both lines.
    let session = |line: &str| {
        line.split_whitespace()
            .find(|w| w.starts_with("session="))
            .map(str::to_string)
    };
    assert_eq!(session(&chan), session(&conn));

    // A jump (ssh -J) is on the trail too, with its direct-tcpip channel.
    let (host, port) = l.target.rsplit_once(':').unwrap();
    let mut c = std::process::Command::new("ssh");
    c.arg("-F")
        .arg(st.ssh_config(&["alice"]))
        .args(["-J", &st.jump("web"), "-p", port])
        .arg(format!("root@{host}"))
        .arg("true");
    let o = run_with_timeout(c, Duration::from_secs(60));
    assert!(o.status.success(), "{o:?}");
    keyway_e2e::wait_for(Duration::from_secs(10), "the jump's audit lines", || {
        audit_line(
            &st,
            "channel",
            &["kind=\"direct-tcpip\"", "result=\"closed\""],
        )?;
        audit_line(&st, "connection", &["mode=\"jump\"", "lease=default/web"])
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", st.proxy_log()));
}

#[test]
fn a_stalled_channel_of_a_multiplexed_connection_leaves_its_siblings_alone() {
    let st = Stack::start(&["127.0.44.1"], &[LeaseSpec::new("vm", "alice")], &[]).unwrap();
    let ip = st.leases["vm"].ip.clone();
    let sock = st.tmp.path().join("mux.sock");
    let mux = |extra: &[&str]| {
        let mut c = st.ssh(
            &["alice"],
            &["-o", &format!("ControlPath={}", sock.display())],
        );
        c.args(extra);
        c
    };
    // One client connection, the OpenSSH ControlMaster, carries them all.
    let mut master = mux(&["-o", "ControlMaster=yes", "-N", &ip])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    keyway_e2e::wait_for(Duration::from_secs(30), "the control socket", || {
        sock.exists().then_some(())
    })
    .unwrap();
    let stalled: Vec<Child> = (0..4)
        .map(|_| {
            mux(&[&ip, "cat /dev/zero"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    st.wait_for_stall();
    assert_eq!(st.metric("keyway_ssh_sessions_active", &[]), 1.0);
    for i in 0..3 {
        let started = Instant::now();
        let o = run_with_timeout(mux(&[&ip, "echo ok"]), Duration::from_secs(60));
        assert!(
            o.status.success() && stdout(&o) == "ok",
            "{o:?}\n{}",
            st.proxy_log()
        );
        eprintln!(
            "sibling session {i} through the stalled master: {:?}",
            started.elapsed()
        );
    }
    for mut c in stalled {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = master.kill();
    let _ = master.wait();
}
