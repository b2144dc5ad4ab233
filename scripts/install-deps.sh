#!/usr/bin/env bash
# Installs the Debian packages Keyway's demo and tests use as real peers.
# Idempotent: installs only what is missing; safe to run on every `make`.
set -euo pipefail

packages=(openssh-client openssh-server tmux python3 python3-venv util-linux openssl haproxy prometheus iproute2)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
    exit 0
fi
sudo=""
if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
echo "installing: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq || echo "apt-get update failed; trying the install anyway" >&2
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
