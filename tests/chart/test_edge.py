"""loadBalancer mode's edge, for real: the HAProxy config the chart renders
runs in the real HAProxy in front of the real keyway-proxy (local mode, with
the flags the chart gives it), and real ssh clients reach real sshd VMs.

The gateway's host key and the relay CA are the ones the chart generated
(ed25519 in PKCS#8 PEM): the operator derives relayTrust from that CA, the
gateway signs relay logins with it, and clients see that host key.

A Service hands every connection to the pod with the pod's address as the
destination; the edge's per-pool-IP port is all that says which pool IP the
user dialed. Here the client dials the edge's port i on 127.0.0.1 (not the
pool IP), so only the edge's set-dst + PROXY v2 header can route it to the
lease holding pool IP i. Needs the workspace binaries (`cargo build
--workspace --bins`; `make test` builds them first).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

import keyway_chart as kc

ROOT = kc.ROOT
POOL = ["127.0.73.1", "127.0.73.2"]
VMS = ["127.0.74.1", "127.0.74.2"]


def binary(name: str) -> Path:
    d = Path(os.environ.get("KEYWAY_BIN_DIR") or ROOT / "target" / "debug")
    p = d / name
    assert p.exists(), f"{p} not found: run `cargo build --workspace --bins` first (or set KEYWAY_BIN_DIR)"
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port p with p and p + 1 both free."""
    for _ in range(100):
        p = free_port()
        try:
            with socket.socket() as s:
                s.bind(("0.0.0.0", p + 1))
            with socket.socket() as s:
                s.bind(("0.0.0.0", p))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def wait(what: str, f, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        v = f()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Procs:
    """Processes stopped at the end; their logs shown when a test fails."""

    def __init__(self, tmp: Path):
        self.tmp, self.procs = tmp, []

    def start(self, name: str, args: list, env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        p = subprocess.Popen([str(a) for a in args], stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        self.procs.append((name, p))
        return p

    def logs(self) -> str:
        return "\n".join(f"----- {n} -----\n{(self.tmp / f'{n}.log').read_text(errors='replace')[-3000:]}"
                         for n, _ in self.procs)

    def stop(self):
        for _, p in reversed(self.procs):
            p.terminate()
        for _, p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


def test_the_rendered_edge_routes_each_pool_ip_to_its_lease():
    base, gw = free_port_pair(), free_port()
    manifest = kc.render({"proxy": {"poolIPs": POOL,
                                    "loadBalancer": {"edge": {"basePort": base, "gatewayPort": gw}}}})
    objs = kc.documents(manifest)
    cfg = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "keyway-proxy-edge")
    deploy = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "keyway-proxy")
    proxy_args = next(c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "proxy")["args"]
    # The two flags that make the edge work, as the chart sets them.
    edge_flags = [a for a in proxy_args if a.startswith(("--ssh-listen=", "--trusted-proxy-cidrs="))]
    assert edge_flags == [f"--ssh-listen=127.0.0.1:{gw}", "--trusted-proxy-cidrs=127.0.0.1/32"]

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        procs = Procs(tmp)
        try:
            secrets = {o["metadata"]["name"]: base64.b64decode(o["data"]["key"]) for o in objs
                       if o["kind"] == "Secret" and o["metadata"]["name"] in
                       ("keyway-proxy-host-key", "keyway-relay-ca", "keyway-gateway-identity")}
            _run(tmp, procs, cfg["data"]["haproxy.cfg"], edge_flags, base, secrets)
        except BaseException:
            print(procs.logs())
            raise
        finally:
            procs.stop()


def ssh_public_line(pkcs8_pem: bytes, tmp: Path) -> str:
    """The OpenSSH public key line of an ed25519 PKCS#8 key (via openssl)."""
    (tmp / "k.pem").write_bytes(pkcs8_pem)
    der = subprocess.run(["openssl", "pkey", "-in", tmp / "k.pem", "-pubout", "-outform", "DER"],
                         capture_output=True, check=True).stdout
    blob = b"".join(len(x).to_bytes(4, "big") + x for x in (b"ssh-ed25519", der[-32:]))
    return "ssh-ed25519 " + base64.b64encode(blob).decode()


def _run(tmp: Path, procs: Procs, haproxy_cfg: str, edge_flags: list[str], base: int, secrets: dict):
    assert all(v.startswith(b"-----BEGIN PRIVATE KEY-----") for v in secrets.values()) and len(secrets) == 3
    # One user, two leases: the pool's two IPs go one to each, so the pool IP
    # alone decides which VM a connection reaches.
    local = tmp / "local"
    (local / ".keyway").mkdir(parents=True)
    (local / ".keyway" / "relay-ca").write_bytes(secrets["keyway-relay-ca"])
    (tmp / "host-key").write_bytes(secrets["keyway-proxy-host-key"])
    (tmp / "gateway-identity").write_bytes(secrets["keyway-gateway-identity"])
    # The peer id agents pin, as the documented command computes it.
    peer = subprocess.run([binary("keyway-proxy"), "agent", "--print-peer-id", "--identity", tmp / "gateway-identity"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert peer.startswith("12D3KooW"), peer
    alice = keygen(tmp / "alice")
    vm_port = free_port()
    (local / "pool.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "keyway.dev/v1alpha1", "kind": "IPPool", "metadata": {"name": "pool"},
         "spec": {"addresses": POOL}}))
    (local / "leases.yaml").write_text(yaml.safe_dump_all(
        [{"apiVersion": "keyway.dev/v1alpha1", "kind": "VMLease", "metadata": {"name": f"vm-{i}"},
          "spec": {"user": "alice", "poolRef": "pool", "accessPublicKeys": [alice],
                   "target": {"address": f"{VMS[i]}:{vm_port}"}}} for i in range(2)]))
    procs.start("operator", [binary("keyway-operator"), "run", "--local", local, "--grpc-listen", "127.0.0.1:0"])

    def ready():
        out = subprocess.run([binary("keyway-operator"), "status", "--local", local, "-o", "json"],
                             capture_output=True, text=True)
        rows = json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else []
        return rows if len(rows) == 2 and all(r["phase"] == "Ready" for r in rows) else None

    rows = wait("both leases Ready", ready)
    by_ip = {r["ip"]: r for r in rows}
    assert set(by_ip) == set(POOL), rows
    ca = ssh_public_line(secrets["keyway-relay-ca"], tmp)
    assert all(r["relayTrust"].endswith(" " + ca + " keyway-relay-ca") for r in rows), (ca, rows)
    vms = tmp / "vms"
    for i, r in enumerate(sorted(rows, key=lambda r: r["name"])):
        (vms / r["name"]).mkdir(parents=True)
        (vms / r["name"] / "authorized_keys").write_text(r["relayTrust"] + "\n")
        procs.start(f"vm-{i}", [ROOT / "scripts" / "vm.sh", vms, r["name"], VMS[i], vm_port])
        wait(f"VM {r['name']}", lambda i=i: connects(VMS[i], vm_port))
    metrics = free_port()
    procs.start("proxy", [binary("keyway-proxy"), "run", "--local", local, *edge_flags,
                          "--host-key", tmp / "host-key", "--tunnel-identity", tmp / "gateway-identity",
                          "--metrics-listen", f"127.0.0.1:{metrics}"],
                env={"RUST_LOG": "keyway_proxy=info", "NO_COLOR": "1"})

    def proxy_ready():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{metrics}/readyz", timeout=2).status == 200
        except OSError:
            return False

    wait("the gateway ready", proxy_ready)
    # Every replica started from the Secret has that peer id.
    assert f"peer={peer}" in (tmp / "proxy.log").read_text(errors="replace"), "the gateway's libp2p peer id"
    (tmp / "haproxy.cfg").write_text(haproxy_cfg)
    procs.start("haproxy", ["haproxy", "-db", "-f", tmp / "haproxy.cfg"])
    for i in range(2):
        wait(f"the edge on {base + i}", lambda i=i: connects("127.0.0.1", base + i))

    # Clients see the chart's host key.
    scan = subprocess.run(["ssh-keyscan", "-t", "ed25519", "-p", str(base), "127.0.0.1"],
                          capture_output=True, text=True, timeout=60)
    host_key = ssh_public_line(secrets["keyway-proxy-host-key"], tmp)
    assert host_key in scan.stdout, scan.stdout + scan.stderr
    for i, ip in enumerate(POOL):
        out = subprocess.run(
            ["ssh", "-p", str(base + i), "-i", tmp / "alice", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
             "-o", "ConnectTimeout=10", "127.0.0.1", "echo $KEYWAY_VM"],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == by_ip[ip]["name"], f"edge port {base + i} ({ip}): {out.stdout!r}"
