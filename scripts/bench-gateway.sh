#!/usr/bin/env bash
# The gateway's benchmarks, side by side with their OpenSSH peers, in one run:
#   - 1 GiB through `ssh -J` via Keyway vs via OpenSSH's sshd as the jump host
#   - 1 GiB through `ssh -J` to a provider lease (libp2p tunnel through
#     `keyway-proxy agent`) vs the same VM as an address lease
#   - 1 GiB through relay mode vs ssh straight to the VM
#   - `ssh <ip> true` connect time, relay vs direct (median, p99 over 200 runs)
#   - RSS per idle authenticated connection at 1,000 and 10,000 connections
# Same cipher on every client hop (aes128-gcm@openssh.com). Loopback only.
# Appends a Markdown section to $KEYWAY_BENCH_OUT (default: stdout).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${KEYWAY_BENCH_OUT:-/dev/stdout}
RUNS=${KEYWAY_BENCH_CONNECT_RUNS:-200}
cargo build --release --locked -q -p keyway-operator -p keyway-proxy --bins
cargo build --release --locked -q -p keyway-proxy --example hold_connections
BIN=target/release
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
W=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_tcp() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0; sleep 0.1; done; echo "no listener on $1:$2" >&2; return 1; }

GPORT=$(port) VMPORT=$(port) JPORT=$(port) MPORT=$(port) APORT=$(port) AMPORT=$(port)
POOL_IP=127.0.40.1 VM_IP=127.0.41.1 JUMP_IP=127.0.42.1
ssh-keygen -q -t ed25519 -N '' -C bench -f "$W/user"
# The provider lease's own key: with the same key on the one pool IP, the
# (IP, key) route of the address lease would be ambiguous.
ssh-keygen -q -t ed25519 -N '' -C bench-p2p -f "$W/user-p2p"
PEER=$("$BIN/keyway-proxy" agent --print-peer-id --identity "$W/agent-identity")
mkdir -p "$W/local" "$W/vms/bench-vm" "$W/vms/jumphost"
cat >"$W/local/bench.yaml" <<YAML
apiVersion: keyway.dev/v1alpha1
kind: IPPool
metadata:
  name: bench
spec:
  addresses: ["$POOL_IP"]
---
apiVersion: keyway.dev/v1alpha1
kind: VMLease
metadata:
  name: bench-vm
spec:
  user: bench
  poolRef: bench
  accessPublicKeys: ["$(cat "$W/user.pub")"]
  target:
    address: "$VM_IP:$VMPORT"
---
apiVersion: keyway.dev/v1alpha1
kind: VMLease
metadata:
  name: bench-p2p
spec:
  user: bench-p2p
  poolRef: bench
  accessPublicKeys: ["$(cat "$W/user-p2p.pub")"]
  target:
    provider:
      peerId: "$PEER"
      addresses: ["/ip4/127.0.0.1/tcp/$APORT"]
YAML
"$BIN/keyway-operator" run --local "$W/local" --grpc-listen 127.0.0.1:0 --public-ssh-port "$GPORT" >"$W/operator.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do [ -s "$W/local/.keyway/operator.json" ] && break; sleep 0.1; done
json=$("$BIN/keyway-operator" status --local "$W/local" -o json)
field() { python3 -c 'import json,sys; print([r for r in json.loads(sys.argv[1]) if r["name"] == sys.argv[3]][0][sys.argv[2]])' "$json" "$1" "${2:-bench-vm}"; }
HASH=$(field leaseHash)
P2P_HASH=$(field leaseHash bench-p2p)
printf '%s\n%s\n' "$(field relayTrust)" "$(cat "$W/user.pub")" >"$W/vms/bench-vm/authorized_keys"
cp "$W/user.pub" "$W/vms/jumphost/authorized_keys"
VM_LOG_LEVEL=ERROR scripts/vm.sh "$W/vms" bench-vm "$VM_IP" "$VMPORT" >"$W/vm.log" 2>&1 &
pids+=($!)
VM_LOG_LEVEL=ERROR scripts/vm.sh "$W/vms" jumphost "$JUMP_IP" "$JPORT" >"$W/jump.log" 2>&1 &
pids+=($!)
"$BIN/keyway-proxy" agent --local "$W/local" --identity "$W/agent-identity" --listen "/ip4/127.0.0.1/tcp/$APORT" \
    --forward "$VM_IP:$VMPORT" --metrics-listen "127.0.0.1:$AMPORT" --cache "$W/agent-snapshot.pb" >"$W/agent.log" 2>&1 &
pids+=($!)
"$BIN/keyway-proxy" run --local "$W/local" --ssh-listen "$POOL_IP:$GPORT" --metrics-listen "127.0.0.1:$MPORT" \
    --max-connections 20000 --max-unauthenticated 2048 --max-connections-per-user 20000 \
    --handshake-burst-per-source 100000 --max-unauthenticated-per-source 100000 >"$W/proxy.log" 2>&1 &
proxy_pid=$!
pids+=($proxy_pid)
wait_tcp "$VM_IP" "$VMPORT"; wait_tcp "$JUMP_IP" "$JPORT"; wait_tcp "$POOL_IP" "$GPORT"
sleep 0.5

CIPHER=aes128-gcm@openssh.com
O="-F /dev/null -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes -o BatchMode=yes -o LogLevel=ERROR -i $W/user -c $CIPHER"
# shellcheck disable=SC2086
via_keyway_jump() { ssh $O -o "ProxyCommand=ssh $O -p $GPORT -W %h:%p $HASH@$POOL_IP" -p "$VMPORT" "root@$VM_IP" "$@"; }
# shellcheck disable=SC2086
via_keyway_jump_p2p() { ssh $O -o "ProxyCommand=ssh ${O/$W\/user /$W/user-p2p } -p $GPORT -W %h:%p $P2P_HASH@$POOL_IP" -p "$VMPORT" "root@$VM_IP" "$@"; }
# shellcheck disable=SC2086
via_openssh_jump() { ssh $O -o "ProxyCommand=ssh $O -p $JPORT -W %h:%p root@$JUMP_IP" -p "$VMPORT" "root@$VM_IP" "$@"; }
# shellcheck disable=SC2086
via_relay() { ssh $O -p "$GPORT" "root@$POOL_IP" "$@"; }
# shellcheck disable=SC2086
direct() { ssh $O -p "$VMPORT" "root@$VM_IP" "$@"; }
wait_tcp 127.0.0.1 "$AMPORT"
for f in via_keyway_jump via_keyway_jump_p2p via_openssh_jump via_relay direct; do
    [ "$($f 'echo ok')" = ok ] || { echo "$f does not work; logs in $W" >&2; cat "$W/proxy.log" >&2; exit 1; }
done

# Best of two runs: seconds to push 1 GiB through and discard it on the VM.
gib() {
    local best=""
    for _ in 1 2; do
        local s e t
        s=$(date +%s.%N)
        head -c 1073741824 /dev/zero | "$1" 'cat > /dev/null'
        e=$(date +%s.%N)
        t=$(python3 -c "print($e-$s)")
        best=$(python3 -c "print(min(x for x in [$t${best:+,$best}]))")
    done
    echo "$best"
}
echo "bench: 1 GiB transfers" >&2
kj=$(gib via_keyway_jump); oj=$(gib via_openssh_jump); pj=$(gib via_keyway_jump_p2p)
rl=$(gib via_relay); dr=$(gib direct)

echo "bench: connect times ($RUNS runs each, interleaved)" >&2
conn=$(python3 - "$RUNS" <<PY
import subprocess, sys, time, statistics
runs = int(sys.argv[1])
O = """$O""".split()
cmds = {
    "relay": ["ssh", *O, "-p", "$GPORT", "root@$POOL_IP", "true"],
    "direct": ["ssh", *O, "-p", "$VMPORT", "root@$VM_IP", "true"],
}
t = {k: [] for k in cmds}
for _ in range(runs):
    for k, c in cmds.items():
        s = time.perf_counter()
        subprocess.run(c, check=True)
        t[k].append(time.perf_counter() - s)
def q(v, p):
    v = sorted(v); return v[min(len(v) - 1, int(round(p * (len(v) - 1))))]
for k in cmds:
    print(k, statistics.median(t[k]) * 1000, q(t[k], 0.99) * 1000)
PY
)
rm_=$(awk '/^relay/{print $2}' <<<"$conn"); rp=$(awk '/^relay/{print $3}' <<<"$conn")
dm=$(awk '/^direct/{print $2}' <<<"$conn"); dp=$(awk '/^direct/{print $3}' <<<"$conn")

echo "bench: idle connections" >&2
rss() { awk '/^VmRSS/{print $2}' "/proc/$proxy_pid/status"; }
idle() { # idle N -> KiB per connection
    local n=$1 base after
    base=$(rss)
    coproc HOLD { target/release/examples/hold_connections "$POOL_IP:$GPORT" "$W/user" "$n" 2>&1; }
    local line; read -r line <&"${HOLD[0]}"
    [[ $line == "ready $n" ]] || { echo "hold_connections: $line" >&2; exit 1; }
    sleep 1
    after=$(rss)
    exec {HOLD[1]}>&-
    wait "$HOLD_PID" 2>/dev/null || true
    python3 -c "print(f'{($after-$base)/$n:.1f} {$base} {$after}')"
}
i1=$(idle 1000)
sleep 2
i10=$(idle 10000)

ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
mbps() { python3 -c "print(f'{1024/$1:.0f}')"; }
{
    echo "## SSH gateway (\`scripts/bench-gateway.sh\`)"
    echo
    echo "One VM (real sshd), the gateway and OpenSSH peers on loopback; client cipher $CIPHER"
    echo "on every hop the client controls; the relay's own upstream login prefers aes128-gcm too."
    echo
    echo "| 1 GiB, \`head -c 1G /dev/zero \| ssh … 'cat >/dev/null'\` | seconds | MiB/s | ratio |"
    echo "|---|---|---|---|"
    echo "| \`ssh -J\` via Keyway (lease hash) | $(printf %.2f "$kj") | $(mbps "$kj") | $(ratio "$oj" "$kj")x OpenSSH's throughput (target ≥ 1.0) |"
    echo "| \`ssh -J\` via OpenSSH sshd as jump host | $(printf %.2f "$oj") | $(mbps "$oj") | 1.00 |"
    echo "| \`ssh -J\` via Keyway to a provider lease (libp2p tunnel through \`keyway-proxy agent\`) | $(printf %.2f "$pj") | $(mbps "$pj") | $(ratio "$kj" "$pj")x the address lease's \`ssh -J\` (tunnel target ≥ 0.5) |"
    echo "| relay mode (\`ssh <pooled ip>\`) | $(printf %.2f "$rl") | $(mbps "$rl") | $(ratio "$dr" "$rl")x direct's throughput (target ≥ 0.8) |"
    echo "| ssh straight to the VM | $(printf %.2f "$dr") | $(mbps "$dr") | 1.00 |"
    echo
    echo "| \`ssh <ip> true\`, $RUNS runs each, interleaved | median ms | p99 ms | ratio (median / p99) |"
    echo "|---|---|---|---|"
    echo "| relay | $(printf %.1f "$rm_") | $(printf %.1f "$rp") | $(ratio "$rm_" "$dm") / $(ratio "$rp" "$dp") of direct (target ≤ 1.5) |"
    echo "| direct | $(printf %.1f "$dm") | $(printf %.1f "$dp") | 1.00 |"
    echo
    echo "| idle authenticated connections | gateway RSS before → after (KiB) | KiB per connection (target ≤ 64) |"
    echo "|---|---|---|"
    read -r per b a <<<"$i1"; echo "| 1,000 | $b → $a | $per |"
    read -r per b a <<<"$i10"; echo "| 10,000 | $b → $a | $per |"
    echo
} >>"$out"
echo "bench: gateway done" >&2
