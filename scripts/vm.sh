#!/usr/bin/env bash
# A demo/test "VM": a real OpenSSH sshd on one loopback address, with its own
# hostname (a UTS namespace, where the machine allows one) and its own
# authorized_keys. Used by `make demo`, the end-to-end tests and `make bench`.
#
#   scripts/vm.sh DIR NAME ADDR PORT
#
# DIR/NAME/authorized_keys must exist (the lease's relayTrust line, plus any
# keys that may log in end to end through `ssh -J`). Runs sshd in the
# foreground (exec), logging to stderr; stop it with SIGTERM.
set -euo pipefail
if [ $# -ne 4 ]; then
  echo "usage: $0 DIR NAME ADDR PORT" >&2
  exit 2
fi
dir=$1 name=$2 addr=$3 port=$4
vm="$(cd "$dir" && pwd)/$name"
mkdir -p "$vm"
[ -f "$vm/authorized_keys" ] || { echo "vm.sh: $vm/authorized_keys is missing" >&2; exit 2; }
[ -f "$vm/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -C "$name" -f "$vm/ssh_host_ed25519_key"
mkdir -p /run/sshd 2>/dev/null || true
cat > "$vm/sshd_config" <<CFG
ListenAddress $addr:$port
HostKey $vm/ssh_host_ed25519_key
PidFile none
AuthorizedKeysFile $vm/authorized_keys
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding yes
PermitUserEnvironment no
AcceptEnv LANG LC_* KEYWAY_*
Subsystem sftp internal-sftp
SetEnv KEYWAY_VM=$name
LogLevel ${VM_LOG_LEVEL:-INFO}
MaxStartups 1000:30:2000
MaxSessions 100
CFG
sshd=$(command -v sshd || echo /usr/sbin/sshd)
if unshare --uts true 2>/dev/null; then
  exec unshare --uts sh -c 'hostname "$1" && exec "$2" -D -e -f "$3"' sh "$name" "$sshd" "$vm/sshd_config"
fi
exec "$sshd" -D -e -f "$vm/sshd_config"
