#!/usr/bin/env bash
# `make demo`: the whole story on one machine, in local mode.
#   - the operator on a copy of examples/local/ (YAML in a directory),
#   - three demo VMs: real sshd, each on its own loopback address with its own
#     hostname, trusting the Keyway relay CA through the lease's relayTrust,
#   - the keyway-proxy gateway on the pooled addresses 127.0.10.1-2, port 2222,
#   - real `ssh` sessions: alice and bob reach different VMs through the same
#     pooled IP; a lease-hash jump; a rejection; settlement closing a session.
# Then it prints commands to try and keeps running until Ctrl-C
# (KEYWAY_DEMO_EXIT=1 stops after the tour, as the tests do).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${KEYWAY_BIN_DIR:-target/debug}
WORK=${KEYWAY_DEMO_WORK:-target/demo}
DIR=$WORK/local
SSH_PORT=${KEYWAY_DEMO_SSH_PORT:-2222}
METRICS=${KEYWAY_DEMO_METRICS:-127.0.0.1:9090}
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'echo; echo "stopping"; exit 0' INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '\033[36m$ %s\033[0m\n' "$*"; "$@"; }
wait_until() { # wait_until SECONDS DESCRIPTION COMMAND...
    local secs=$1 what=$2; shift 2
    for _ in $(seq $((secs * 10))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "timed out waiting for $what" >&2
    return 1
}
port_free() { ! (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

rm -rf "$WORK"
mkdir -p "$WORK/vms"
cp -r examples/local "$DIR"
mv "$DIR/keys" "$WORK/keys"
chmod 600 "$WORK/keys/alice" "$WORK/keys/bob"
rm -rf "$DIR/.keyway"
cat >"$WORK/ssh_config" <<CFG
# The demo's client settings: the gateway on port $SSH_PORT, logging in as root.
Host 127.0.10.*
  Port $SSH_PORT
  User root
  IdentitiesOnly yes
  StrictHostKeyChecking accept-new
  UserKnownHostsFile $(realpath -m "$WORK")/known_hosts
  LogLevel ERROR
Host 127.0.20.*
  User root
  IdentitiesOnly yes
  StrictHostKeyChecking accept-new
  UserKnownHostsFile $(realpath -m "$WORK")/known_hosts
  LogLevel ERROR
CFG
SSH=(ssh -F "$WORK/ssh_config")

# name target-address pairs from the example leases
mapfile -t vms < <(awk '/^  name:/{n=$2} /^    address:/{print n, $2}' "$DIR/leases.yaml")
for v in "${vms[@]}"; do
    addr=${v#* }
    port_free "${addr%:*}" "${addr#*:}" || { echo "${addr} is taken; the demo VMs need it" >&2; exit 1; }
done
for a in 127.0.10.1 127.0.10.2; do
    port_free "$a" "$SSH_PORT" || { echo "$a:$SSH_PORT is taken (set KEYWAY_DEMO_SSH_PORT)" >&2; exit 1; }
done

say "Objects (copied from examples/local/ into $DIR)"
grep -hE '^(kind|  name|  user|  poolRef|    - 127|    address)' "$DIR"/*.yaml | sed 's/^/  /'

say "The operator: keyway-operator run --local $DIR --public-ssh-port $SSH_PORT"
"$BIN/keyway-operator" run --local "$DIR" --grpc-listen 127.0.0.1:0 --public-ssh-port "$SSH_PORT" >"$WORK/operator.log" 2>&1 &
pids+=($!)
wait_until 30 "the operator" test -s "$DIR/.keyway/operator.json"
wait_until 30 "three Ready leases" bash -c "$BIN/keyway-operator status --local $DIR -o json | grep -c '\"phase\": \"Ready\"' | grep -qx 3"
"$BIN/keyway-operator" status --local "$DIR"

say "Demo VMs: real sshd, each with its own hostname, trusting its lease's relayTrust line"
"$BIN/keyway-operator" status --local "$DIR" -o json >"$WORK/leases.json"
for v in "${vms[@]}"; do
    name=${v% *} addr=${v#* }
    user=$(python3 -c 'import json,sys; print([l["user"] for l in json.load(open(sys.argv[1])) if l["name"]==sys.argv[2]][0])' "$WORK/leases.json" "$name")
    trust=$(python3 -c 'import json,sys; print([l["relayTrust"] for l in json.load(open(sys.argv[1])) if l["name"]==sys.argv[2]][0])' "$WORK/leases.json" "$name")
    mkdir -p "$WORK/vms/$name"
    printf '%s\n%s\n' "$trust" "$(cat "$WORK/keys/$user.pub")" >"$WORK/vms/$name/authorized_keys"
    scripts/vm.sh "$WORK/vms" "$name" "${addr%:*}" "${addr#*:}" >"$WORK/vms/$name.log" 2>&1 &
    pids+=($!)
    wait_until 20 "VM $name" bash -c "! (exec 3<>/dev/tcp/${addr%:*}/${addr#*:}) 2>/dev/null && exit 1 || exit 0"
    echo "  $name ($user) sshd on $addr; authorized_keys: $(cut -c1-60 <<<"$trust")…"
done

say "The gateway: keyway-proxy run --local $DIR --ssh-listen 127.0.10.1:$SSH_PORT --ssh-listen 127.0.10.2:$SSH_PORT"
"$BIN/keyway-proxy" run --local "$DIR" --ssh-listen "127.0.10.1:$SSH_PORT" --ssh-listen "127.0.10.2:$SSH_PORT" \
    --metrics-listen "$METRICS" >"$WORK/proxy.log" 2>&1 &
pids+=($!)
wait_until 30 "the gateway" python3 -c "import urllib.request,sys; urllib.request.urlopen('http://$METRICS/readyz', timeout=1)"
echo "  ready: http://$METRICS/readyz, metrics at http://$METRICS/metrics"

ip_of() { python3 -c 'import json,sys; print([l["ip"] for l in json.load(open(sys.argv[1])) if l["name"]==sys.argv[2]][0])' "$WORK/leases.json" "$1"; }
hash_of() { python3 -c 'import json,sys; print([l["leaseHash"] for l in json.load(open(sys.argv[1])) if l["name"]==sys.argv[2]][0])' "$WORK/leases.json" "$1"; }
bob_ip=$(ip_of bob-dev)
alice_there=$(python3 -c 'import json,sys; print([l["name"] for l in json.load(open(sys.argv[1])) if l["ip"]==sys.argv[2] and l["user"]=="alice"][0])' "$WORK/leases.json" "$bob_ip")

say "Same pooled IP ($bob_ip), two users, two VMs: the key decides"
run "${SSH[@]}" -i "$WORK/keys/alice" "$bob_ip" 'echo "alice landed in $(hostname)"'
run "${SSH[@]}" -i "$WORK/keys/bob" "$bob_ip" 'echo "bob landed in $(hostname)"'
echo "  (alice's VM there is $alice_there; bob's is bob-dev)"

say "alice's other VM, on the other address"
for n in alice-web alice-db; do
    ip=$(ip_of $n)
    [[ $ip == "$bob_ip" ]] && continue
    run "${SSH[@]}" -i "$WORK/keys/alice" "$ip" 'hostname; uptime'
done

say "bob on an address where he holds no VM: rejected like any wrong key"
other_ip=127.0.10.1; [[ $bob_ip == 127.0.10.1 ]] && other_ip=127.0.10.2
run "${SSH[@]}" -o BatchMode=yes -i "$WORK/keys/bob" "$other_ip" true || echo "  (exit $?, as expected)"

say "End to end with the VM's own sshd: ssh -J <leaseHash>@gateway (the gateway sees only ciphertext)"
h=$(hash_of bob-dev)
bob_target=$(for v in "${vms[@]}"; do [[ ${v% *} == bob-dev ]] && echo "${v#* }"; done)
jump="ProxyCommand=ssh -F $WORK/ssh_config -i $WORK/keys/bob -W %h:%p $h@$bob_ip"
run "${SSH[@]}" -i "$WORK/keys/bob" -o "$jump" -p "${bob_target#*:}" "${bob_target%:*}" 'echo "bob, end to end, on $(hostname)"'

say "Settlement: alice-db gets settled while alice has a session open on it"
adb=$(ip_of alice-db)
"${SSH[@]}" -i "$WORK/keys/alice" "$adb" 'echo "  session open on $(hostname)"; exec sleep 600' &
sess=$!
sleep 1.5
sed -i '/name: alice-db/,/address:/ s/^  target:/  settled: true\n  target:/' "$DIR/leases.yaml"
t0=$(date +%s.%N)
wait $sess || true
t1=$(date +%s.%N)
printf '  the session ended %.2f s after the file edit (debounce, snapshot, close)\n' "$(echo "$t1 - $t0" | bc 2>/dev/null || python3 -c "print($t1-$t0)")"
sed -i '/name: alice-db/,/address:/ { /^  settled: true$/d }' "$DIR/leases.yaml"
wait_until 30 "alice-db back" bash -c "$BIN/keyway-operator status --local $DIR -o json | grep -c '\"phase\": \"Ready\"' | grep -qx 3"
echo "  (and un-settled again, so you can try it below)"

say "Gateway metrics (a few)"
python3 -c "import urllib.request; print(urllib.request.urlopen('http://$METRICS/metrics').read().decode())" \
    | grep -E '^keyway_(ssh_connections_total|ssh_settled|snapshot_version|ssh_auth_failures_total\{method="publickey"\})' | sed 's/^/  /'

cat <<EOF

Try it yourself (keys are demo-only, in $WORK/keys):
  ${SSH[*]} -i $WORK/keys/alice 127.0.10.1
  ${SSH[*]} -i $WORK/keys/bob $bob_ip
  scp -F $WORK/ssh_config -i $WORK/keys/bob README.md $bob_ip:/tmp/
  ${SSH[*]} -i $WORK/keys/bob -o "$jump" -p ${bob_target#*:} ${bob_target%:*}
      (ssh -J $h@$bob_ip:$SSH_PORT … works the same when the key is in your agent)
  $BIN/keyway-operator status --local $DIR
  edit $DIR/leases.yaml (e.g. settled: true) and watch sessions close
  curl http://$METRICS/metrics
Logs: $WORK/operator.log, $WORK/proxy.log, $WORK/vms/*.log
EOF
if [[ ${KEYWAY_DEMO_EXIT:-0} == 1 ]]; then exit 0; fi
echo "Running until Ctrl-C."
while true; do sleep 3600 & wait $! || true; done
