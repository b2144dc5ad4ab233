#!/usr/bin/env bash
# `make bench`: runs every benchmark in one go and writes BENCHMARKS.md.
# Figures are measured, never asserted; targets are listed beside them.
set -euo pipefail
cd "$(dirname "$0")/.."

out=$(mktemp)
trap 'rm -f "$out"' EXIT
{
    echo "# Benchmarks"
    echo
    echo "Written by \`make bench\` (scripts/bench.sh) on $(date -u +%Y-%m-%d), $(nproc) cores,"
    echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(rustc --version)."
    echo "Release build; each figure is one run of the command shown above its table (the
gateway's transfers: best of two)."
    echo
} >"$out"

run() { # run TITLE CARGO-ARGS...
    local title=$1; shift
    echo "## $title" >>"$out"
    echo >>"$out"
    echo "\`cargo bench $*\`" >>"$out"
    echo >>"$out"
    KEYWAY_BENCH_OUT="$out" cargo bench --locked "$@"
    echo >>"$out"
}

run "Allocator" -p keyway-core --bench allocator
run "Routing snapshot" -p keyway-core --bench snapshot
KEYWAY_BENCH_OUT="$out" bash scripts/bench-gateway.sh
# CONNECT over TLS vs HAProxy terminating the same TLS.
cargo build --release --locked -q -p keyway-operator -p keyway-proxy --bins
echo "## CONNECT over TLS vs HAProxy" >>"$out"
echo >>"$out"
echo "\`KEYWAY_BIN_DIR=target/release cargo bench -p keyway-e2e --bench connect\`" >>"$out"
echo >>"$out"
KEYWAY_BIN_DIR="$PWD/target/release" KEYWAY_BENCH_OUT="$out" cargo bench --locked -p keyway-e2e --bench connect
echo >>"$out"
# The provider tunnel (libp2p, TCP and QUIC) vs plain TCP.
echo "## Provider tunnel vs plain TCP" >>"$out"
echo >>"$out"
echo "\`KEYWAY_BIN_DIR=target/release cargo bench -p keyway-e2e --bench tunnel\`" >>"$out"
echo >>"$out"
KEYWAY_BIN_DIR="$PWD/target/release" KEYWAY_BENCH_OUT="$out" cargo bench --locked -p keyway-e2e --bench tunnel
echo >>"$out"
# Another tenant's logins while one attack runs (issue 13).
echo "## Under attack" >>"$out"
echo >>"$out"
echo "\`KEYWAY_BIN_DIR=target/release cargo bench -p keyway-e2e --bench attack\`" >>"$out"
echo >>"$out"
KEYWAY_BIN_DIR="$PWD/target/release" KEYWAY_BENCH_OUT="$out" cargo bench --locked -p keyway-e2e --bench attack
echo >>"$out"
# Cluster mode through the API double, with the release operator binary.
echo "## Cluster mode (API double)" >>"$out"
echo >>"$out"
echo "\`KEYWAY_BIN_DIR=target/release cargo bench -p keyway-e2e --bench cluster\`" >>"$out"
echo >>"$out"
KEYWAY_BIN_DIR="$PWD/target/release" KEYWAY_BENCH_OUT="$out" cargo bench --locked -p keyway-e2e --bench cluster
echo >>"$out"
# Local mode at 10,000 and 100,000 leases (issue 14).
echo "## Local mode at scale" >>"$out"
echo >>"$out"
echo "\`KEYWAY_BIN_DIR=target/release cargo bench -p keyway-e2e --bench scale\`" >>"$out"
echo >>"$out"
KEYWAY_BIN_DIR="$PWD/target/release" KEYWAY_BENCH_OUT="$out" cargo bench --locked -p keyway-e2e --bench scale
echo >>"$out"

mv "$out" BENCHMARKS.md
trap - EXIT
echo "wrote BENCHMARKS.md"
