//! The metrics reference (docs/metrics.md) against real scrapes: every
//! `keyway_` family a running gateway, a running cluster-mode operator and a
//! running provider agent expose is documented, every documented one is
//! exposed (after traffic that touches each), and Prometheus' own `promtool
//! check metrics` accepts every scrape.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use keyway_e2e::cluster::*;
use keyway_e2e::stack::*;
use keyway_e2e::*;

/// Documented names in the table that follows `heading` in docs/metrics.md.
fn documented(heading: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo_root().join("docs/metrics.md")).unwrap();
    let start = text
        .find(heading)
        .unwrap_or_else(|| panic!("no {heading:?} in docs/metrics.md"));
    let section = &text[start..];
    let end = section[heading.len()..]
        .find("\n## ")
        .map_or(section.len(), |i| i + heading.len());
    section[..end]
        .lines()
        .filter(|l| l.starts_with("| `keyway_"))
        .flat_map(|l| {
            let first = l.split('|').nth(1).unwrap_or_default();
            first
                .split('`')
                .filter(|w| w.starts_with("keyway_"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Metric families in a scrape (from `# TYPE` lines).
fn exposed(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("keyway_"))
        .map(str::to_string)
        .collect()
}

fn promtool_check(scrape: &str, what: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian prometheus) is needed; `make deps` installs it");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics on the {what} scrape:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_gateway_scrape_matches_the_reference_and_passes_promtool() {
    let certs = tempfile::tempdir().unwrap();
    let tls = make_tls(certs.path());
    let https = free_port();
    let args = tls.proxy_args(https);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let st = Stack::start(
        &["127.0.56.1"],
        &[LeaseSpec::new("alice-1", "alice")],
        &args,
    )
    .unwrap();
    // Traffic that touches every labelled family: a relayed session, a
    // refused key, and a CONNECT nobody routes.
    let o = st.ssh_output(&["alice"], &["127.0.56.1", "echo ok"]);
    assert!(o.status.success(), "{o:?}");
    let o = st.ssh_output(&["stranger"], &["127.0.56.1", "true"]);
    assert!(!o.status.success());
    let mut c = Command::new(bin("keyway"));
    c.args([
        "tcp",
        "nowhere.example:22",
        "--listen",
        "-",
        "--url",
        &format!("https://127.0.0.1:{https}"),
    ])
    .arg("--ca")
    .arg(&tls.ca)
    .stdin(Stdio::null());
    assert!(
        !run_with_timeout(c, Duration::from_secs(30))
            .status
            .success()
    );
    let scrape = wait_for(
        Duration::from_secs(10),
        "every family in the scrape",
        || {
            let s = st.metrics_text();
            (exposed(&s) == documented("# Metrics")).then_some(s)
        },
    );
    let scrape = scrape.unwrap_or_else(|_| {
        let s = st.metrics_text();
        panic!(
            "gateway: exposed but not documented {:?}; documented but not exposed {:?}",
            exposed(&s)
                .difference(&documented("# Metrics"))
                .collect::<Vec<_>>(),
            documented("# Metrics")
                .difference(&exposed(&s))
                .collect::<Vec<_>>()
        )
    });
    promtool_check(&scrape, "gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_scrape_matches_the_reference_and_passes_promtool() {
    let env = ClusterEnv::start().await.unwrap();
    env.create("ippools", pool_obj("public", &["127.0.57.1"]))
        .await
        .unwrap();
    env.create("vmleases", lease_obj("t", "vm", "u", "public", &hex_key(1)))
        .await
        .unwrap();
    let op = env.operator("op-a", &[]).unwrap();
    // A subscribed proxy, so the per-subscriber families have a series.
    let proxy_metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let ssh = format!("127.0.0.1:{}", free_port());
    let _proxy = Proc::spawn(
        env.proxy_command(&op.endpoint(), &ssh, proxy_metrics),
        &env.dir.path().join("proxy.log"),
    )
    .unwrap();
    let want = documented("## Operator (cluster mode)");
    let scrape = wait_for(
        Duration::from_secs(60),
        "every operator family in the scrape",
        || op.metrics_text().filter(|s| exposed(s) == want),
    );
    let scrape = scrape.unwrap_or_else(|_| {
        let s = op.metrics_text().unwrap_or_default();
        panic!(
            "operator: exposed but not documented {:?}; documented but not exposed {:?}",
            exposed(&s).difference(&want).collect::<Vec<_>>(),
            want.difference(&exposed(&s)).collect::<Vec<_>>()
        )
    });
    promtool_check(&scrape, "operator");
}

#[test]
fn the_alert_rules_pass_promtool_and_fire_only_where_they_should() {
    let dir = repo_root().join("deploy/prometheus");
    for args in [
        vec!["check", "rules", "alerts.yaml"],
        vec!["test", "rules", "alerts_test.yaml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("promtool (Debian prometheus) is needed; `make deps` installs it");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every metric an alert reads is one the reference documents.
    let rules = std::fs::read_to_string(dir.join("alerts.yaml")).unwrap();
    let mut known = documented("# Metrics");
    known.extend(documented("## Operator (cluster mode)"));
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("keyway_") {
            assert!(
                known.contains(word),
                "alerts.yaml reads {word}, which docs/metrics.md does not list"
            );
        }
    }
}

#[test]
fn the_agent_scrape_matches_the_reference_and_passes_promtool() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("local");
    std::fs::create_dir_all(&dir).unwrap();
    write_file(&dir.join("pool.yaml"), &pool_yaml("pool", &["127.0.58.1"]));
    let _operator = Operator::start(&dir).unwrap();
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new(bin("keyway-proxy"));
    cmd.args(["agent", "--local"]).arg(&dir).args([
        "--listen",
        &format!("/ip4/127.0.0.1/tcp/{}", free_port()),
        "--metrics-listen",
        &metrics.to_string(),
    ]);
    let mut agent = Proc::spawn(cmd, &tmp.path().join("agent.log")).unwrap();
    let want = documented("## Agent");
    let scrape = wait_for(Duration::from_secs(30), "every agent family", || {
        assert!(agent.running(), "{}", agent.output());
        keyway_e2e::stack::http_get(metrics, "/metrics")
            .ok()
            .map(|(_, s)| s)
            .filter(|s| exposed(s) == want)
    })
    .unwrap_or_else(|_| {
        let s = keyway_e2e::stack::http_get(metrics, "/metrics")
            .map(|x| x.1)
            .unwrap_or_default();
        panic!(
            "agent: exposed but not documented {:?}; documented but not exposed {:?}",
            exposed(&s).difference(&want).collect::<Vec<_>>(),
            want.difference(&exposed(&s)).collect::<Vec<_>>()
        )
    });
    promtool_check(&scrape, "agent");
}
