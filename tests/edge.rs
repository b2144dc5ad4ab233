//! Behind an L4 edge: real HAProxy in `mode tcp` with `send-proxy-v2` in
//! front of `keyway-proxy`, real OpenSSH clients and sshd VMs. The gateway
//! only ever sees HAProxy's address; the PROXY header carries the pooled IP
//! the user dialed, and routing must use it.
#![allow(clippy::unwrap_used)]

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use keyway_e2e::stack::*;
use keyway_e2e::*;

const POOL: [&str; 2] = ["127.0.50.1", "127.0.50.2"];
/// Where the gateway listens for the edge.
const GW_IP: &str = "127.0.51.1";
/// HAProxy's source address toward the gateway: trusted, and not.
const EDGE_TRUSTED: &str = "127.0.52.1";
const EDGE_UNTRUSTED: &str = "127.0.53.1";

fn haproxy(st: &Stack, gw_port: u16, front: u16, untrusted_front: u16) -> Proc {
    let cfg = st.tmp.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 256\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend pooled\n  bind {p0}:{front}\n  bind {p1}:{front}\n  default_backend gateway\n\
             backend gateway\n  server gw {GW_IP}:{gw_port} send-proxy-v2 source {EDGE_TRUSTED}\n\
             frontend stranger\n  bind {p0}:{untrusted_front}\n  default_backend gateway_untrusted\n\
             backend gateway_untrusted\n  server gw {GW_IP}:{gw_port} send-proxy-v2 source {EDGE_UNTRUSTED}\n",
            p0 = POOL[0],
            p1 = POOL[1],
        ),
    )
    .unwrap();
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&cfg);
    let mut p = Proc::spawn(cmd, &st.tmp.path().join("haproxy.log"))
        .expect("haproxy (Debian haproxy) is needed; `make deps` installs it");
    let addr = format!("{}:{front}", POOL[1]).parse().unwrap();
    wait_for(Duration::from_secs(20), "haproxy listening", || {
        assert!(p.running(), "haproxy exited:\n{}", p.output());
        TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            .ok()
            .map(|_| ())
    })
    .unwrap();
    p
}

fn ssh_via(st: &Stack, user: &str, port: u16, host: &str, extra: &[&str]) -> std::process::Output {
    let mut c = Command::new("ssh");
    c.arg("-F")
        .arg(st.ssh_config(&[user]))
        .args(["-p", &port.to_string()])
        .args(extra)
        .args([host, "echo $KEYWAY_VM"]);
    run_with_timeout(c, Duration::from_secs(60))
}

#[test]
fn haproxy_send_proxy_v2_routes_by_the_address_the_user_dialed() {
    let gw_port = free_port();
    let listen = format!("{GW_IP}:{gw_port}");
    let trusted = format!("{EDGE_TRUSTED}/32");
    let st = Stack::start(
        &POOL,
        &[
            LeaseSpec::new("alice-1", "alice"),
            LeaseSpec::new("alice-2", "alice"),
            LeaseSpec::new("bob-1", "bob"),
            LeaseSpec::new("bob-2", "bob"),
        ],
        &["--ssh-listen", &listen, "--trusted-proxy-cidrs", &trusted],
    )
    .unwrap();
    let (front, stranger) = (free_port(), free_port());
    let _edge = haproxy(&st, gw_port, front, stranger);

    // Every lease through the edge: the user dials the lease's pooled IP, the
    // gateway sees only HAProxy, and lands the user in that lease's VM.
    for (name, l) in &st.leases {
        let o = ssh_via(&st, &l.user, front, &l.ip, &[]);
        assert!(o.status.success(), "{name}: {o:?}\n{}", st.proxy_log());
        assert_eq!(stdout(&o), *name, "{}", st.proxy_log());
    }
    assert!(
        st.proxy_log().contains("PROXY header"),
        "the header was read"
    );

    // The same edge from an address not in --trusted-proxy-cidrs: refused.
    let before = st.metric("keyway_ssh_connections_total", &["proxy_header_refused"]);
    let o = ssh_via(&st, "alice", stranger, POOL[0], &[]);
    assert!(!o.status.success(), "{o:?}");
    assert!(
        st.proxy_log().contains("not in --trusted-proxy-cidrs"),
        "{}",
        st.proxy_log()
    );
    // A trusted address that sends no header is refused as well.
    let o = ssh_via(&st, "alice", gw_port, GW_IP, &["-b", "127.0.52.1"]);
    assert!(!o.status.success(), "{o:?}");
    wait_for(Duration::from_secs(10), "both refusals counted", || {
        let now = st.metric("keyway_ssh_connections_total", &["proxy_header_refused"]);
        (now >= before + 2.0).then_some(())
    })
    .unwrap();
    assert!(st.proxy_log().contains("sent no PROXY protocol header"));

    // A trusted address that connects and says nothing (a load balancer's
    // health check) is closed at the header deadline (1 s), long before the
    // handshake deadline (30 s).
    let before = st.metric("keyway_ssh_connections_total", &["proxy_header_refused"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let closed = rt.block_on(async {
        use tokio::io::AsyncReadExt as _;
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{EDGE_TRUSTED}:0").parse().unwrap())
            .unwrap();
        let mut s = sock.connect(listen.parse().unwrap()).await.unwrap();
        let mut buf = [0u8; 64];
        // EOF (or a reset) before the handshake deadline; the gateway says
        // nothing to an edge before its header.
        tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await
    });
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "{closed:?}\n{}",
        st.proxy_log()
    );
    wait_for(Duration::from_secs(10), "the silent edge counted", || {
        let now = st.metric("keyway_ssh_connections_total", &["proxy_header_refused"]);
        (now >= before + 1.0).then_some(())
    })
    .unwrap();
}
