#!/usr/bin/env bash
# docs/dashboards/*.png from real data: runs the dashboards test (a
# cluster-mode operator, a gateway, a real-sshd VM and a real Prometheus)
# with KEYWAY_DASHBOARD_DATA set, which adds about three minutes of varied
# traffic and writes every panel's series; then draws each dashboard with
# matplotlib (venv under target/, like the chart tools).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${PICTURES_VENV:-target/pictures-venv}
reqs=(matplotlib==3.10.7)
stamp="$venv/.keyway-reqs"
if ! [[ -x $venv/bin/python && -f $stamp && "$(cat "$stamp")" == "${reqs[*]}" ]]; then
    echo "pictures-venv: installing ${reqs[*]} into $venv" >&2
    rm -rf "$venv"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "${reqs[@]}"
    echo "${reqs[*]}" >"$stamp"
fi
data=target/dashboard-data
rm -rf "$data"
cargo build --workspace --bins --locked
KEYWAY_DASHBOARD_DATA=$PWD/$data cargo test -p keyway-e2e --locked --test dashboards -- --nocapture
"$venv/bin/python" scripts/dashboard-pictures.py "$data" docs/dashboards
