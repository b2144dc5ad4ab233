#!/usr/bin/env bash
# `make demo`: the operator in local mode on a copy of examples/local/, the
# allocation table, and a snapshot subscriber watching the version bump when a
# file changes. Runs on a fresh machine; leaves nothing running when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${KEYWAY_BIN_DIR:-target/debug}
WORK=target/demo
DIR=$WORK/local
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
wait_until() { # wait_until SECONDS DESCRIPTION COMMAND...
    local secs=$1 what=$2; shift 2
    for _ in $(seq $((secs * 10))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "timed out waiting for $what" >&2
    return 1
}

rm -rf "$WORK"
mkdir -p "$WORK"
cp -r examples/local "$DIR"
rm -rf "$DIR/keys" "$DIR/.keyway"

say "Objects (copied from examples/local/ into $DIR)"
grep -hE '^(kind|  name|  user|  poolRef|    - 127)' "$DIR"/*.yaml | sed 's/^/  /'

say "Starting: keyway-operator run --local $DIR"
"$BIN/keyway-operator" run --local "$DIR" --grpc-listen 127.0.0.1:0 >"$WORK/operator.log" 2>&1 &
pids+=($!)
wait_until 30 "the operator" test -s "$DIR/.keyway/operator.json"
wait_until 30 "three Ready leases" bash -c "$BIN/keyway-operator status --local $DIR -o json | grep -c '\"phase\": \"Ready\"' | grep -qx 3"

say "Allocation: keyway-operator status --local $DIR"
"$BIN/keyway-operator" status --local "$DIR"
cat <<'EOF'

  alice's two VMs hold different addresses; bob shares one of them with alice.
  (dst IP, key) names exactly one VM, so sharing is safe.
EOF

say "A subscriber (what every proxy runs): keyway-proxy snapshot --local $DIR --follow"
"$BIN/keyway-proxy" snapshot --local "$DIR" --follow --node-id demo-subscriber >"$WORK/subscriber.log" 2>&1 &
pids+=($!)
wait_until 30 "the first snapshot" grep -q '^snapshot' "$WORK/subscriber.log"
cat "$WORK/subscriber.log"

say "Edit: bob gets a second VM (new file $DIR/bob-ci.yaml)"
bob_key=$(awk '/name: bob-dev/{f=1} f && /ssh-ed25519/{print $2" "$3; exit}' "$DIR/leases.yaml")
cat >"$DIR/bob-ci.yaml" <<EOF
apiVersion: keyway.dev/v1alpha1
kind: VMLease
metadata:
  name: bob-ci
spec:
  user: bob
  poolRef: demo
  accessPublicKeys:
    - $bob_key
  target:
    address: 127.0.20.4:22
EOF
wait_until 30 "the next snapshot" bash -c "grep -c '^snapshot' $WORK/subscriber.log | grep -qx 2"
tail -n +$(( $(grep -n '^snapshot' "$WORK/subscriber.log" | tail -1 | cut -d: -f1) )) "$WORK/subscriber.log"

say "Edit: settle alice-db (its address is released, its route withdrawn)"
sed -i '/name: alice-db/,/address:/ s/^  target:/  settled: true\n  target:/' "$DIR/leases.yaml"
wait_until 30 "the next snapshot" bash -c "grep -c '^snapshot' $WORK/subscriber.log | grep -qx 3"
tail -n +$(( $(grep -n '^snapshot' "$WORK/subscriber.log" | tail -1 | cut -d: -f1) )) "$WORK/subscriber.log"

say "Status now"
"$BIN/keyway-operator" status --local "$DIR"

say "Restart the operator: every IP stays"
before=$("$BIN/keyway-operator" status --local "$DIR" -o json | grep '"ip"')
kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true
rm -f "$DIR/.keyway/operator.json"
"$BIN/keyway-operator" run --local "$DIR" --grpc-listen 127.0.0.1:0 >>"$WORK/operator.log" 2>&1 &
pids[0]=$!
wait_until 30 "the operator" test -s "$DIR/.keyway/operator.json"
after=$("$BIN/keyway-operator" status --local "$DIR" -o json | grep '"ip"')
if [[ "$before" == "$after" ]]; then echo "  unchanged:"; echo "$after" | sed 's/^ */    /'; else echo "  IPs CHANGED"; diff <(echo "$before") <(echo "$after"); exit 1; fi

cat <<EOF

Try it yourself:
  $BIN/keyway-operator run --local $DIR          # (stopped when this demo exits)
  $BIN/keyway-operator status --local $DIR -o json
  $BIN/keyway-proxy snapshot --local $DIR --follow
  edit, add, rename or delete YAML files in $DIR and watch the version move.
Logs: $WORK/operator.log, $WORK/subscriber.log
EOF
