//! `make demo`'s script, run to the end of its tour (KEYWAY_DEMO_EXIT=1) on
//! ports of its own: what a person sees on a fresh machine must keep working.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use keyway_e2e::stack::{free_port, repo_root, run_with_timeout};

#[test]
fn the_demo_tour_runs_end_to_end() {
    let work = tempfile::tempdir().unwrap();
    let bin_dir = keyway_e2e::bin("keyway-proxy")
        .parent()
        .unwrap()
        .to_path_buf();
    let mut c = Command::new("bash");
    c.arg(repo_root().join("scripts/demo.sh"))
        .env("KEYWAY_DEMO_EXIT", "1")
        .env("KEYWAY_DEMO_WORK", work.path().join("demo"))
        .env("KEYWAY_DEMO_SSH_PORT", free_port().to_string())
        .env("KEYWAY_DEMO_METRICS", format!("127.0.0.1:{}", free_port()))
        .env("KEYWAY_BIN_DIR", bin_dir);
    let o = run_with_timeout(c, Duration::from_secs(180));
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{out}\n{err}");
    for want in [
        "alice landed in",
        "bob landed in",
        "Permission denied (publickey)",
        "bob, end to end, on",
        "the session ended",
        "Try it yourself",
    ] {
        assert!(
            out.contains(want) || err.contains(want),
            "{want:?} missing:\n{out}\n{err}"
        );
    }
}
