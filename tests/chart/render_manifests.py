"""Writes manifests/install.yaml from the chart, and the chart's copies of
crds/*.yaml and deploy/prometheus/alerts.yaml. `--check` writes nothing and
exits 1 when any of them is out of date. Run through scripts/render-manifests.sh.
"""

from __future__ import annotations

import sys
from pathlib import Path

import keyway_chart as kc

ROOT = kc.ROOT
INSTALL = ROOT / "manifests" / "install.yaml"
# Default values, except that key material is not generated: a rendered file
# that everyone applies must not carry one shared private key.
VALUES = {"secrets": {"generate": False}}

HEADER = """\
# Keyway, rendered from charts/keyway with its default values by
# scripts/render-manifests.sh (do not edit; `make chart-test` fails when it is
# out of date). Release "keyway" in namespace keyway-system; CRDs included.
#
#   kubectl apply --server-side -f manifests/install.yaml
#
# Key material is not in this file. Create the five Secrets first (the chart
# generates them instead):
#
#   kubectl create namespace keyway-system
#   ssh-keygen -q -t ed25519 -N '' -C keyway-relay-ca -f relay-ca
#   ssh-keygen -q -t ed25519 -N '' -C keyway-proxy -f host-key
#   openssl genpkey -algorithm ed25519 -out gateway-identity
#   openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \\
#       -subj /CN=ssh.example.com -addext subjectAltName=DNS:ssh.example.com \\
#       -keyout connect.key -out connect.crt
#   kubectl -n keyway-system create secret generic keyway-relay-ca --from-file=key=relay-ca
#   kubectl -n keyway-system create secret generic keyway-proxy-host-key --from-file=key=host-key
#   kubectl -n keyway-system create secret generic keyway-gateway-identity --from-file=key=gateway-identity
#   kubectl -n keyway-system create secret generic keyway-snapshot-token --from-literal=token=$(openssl rand -hex 32)
#   kubectl -n keyway-system create secret tls keyway-connect-tls --cert=connect.crt --key=connect.key
#
# The gateways serve pooled IPs only once proxy.poolIPs is set; use the chart
# for that (docs/operations.md).
"""

NAMESPACE = """\
apiVersion: v1
kind: Namespace
metadata:
  name: keyway-system
  labels:
    app.kubernetes.io/part-of: keyway
"""


def copies() -> dict[Path, bytes]:
    """Chart file -> what it must contain."""
    out = {kc.CHART / "files" / "alerts.yaml": (ROOT / "deploy/prometheus/alerts.yaml").read_bytes()}
    for crd in sorted((ROOT / "crds").glob("*.yaml")):
        out[kc.CHART / "crds" / crd.name] = crd.read_bytes()
    return out


def install_yaml() -> str:
    manifest = kc.render(VALUES)
    parts = [HEADER, "---\n", NAMESPACE]
    for crd in sorted((ROOT / "crds").glob("*.yaml")):
        parts += ["---\n", crd.read_text()]
    body = manifest.strip("\n")
    if body.startswith("---"):
        body = body[3:].lstrip("\n")
    parts += ["---\n", body, "\n"]
    text = "".join(parts)
    # Trailing spaces Helm's templates leave are noise in a committed file.
    return "\n".join(line.rstrip() for line in text.split("\n"))


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path, want in copies().items():
        if not path.exists() or path.read_bytes() != want:
            stale.append(path)
            if not check:
                path.write_bytes(want)
    # Chart copies first: install.yaml renders the chart as it now is.
    text = install_yaml()
    if not INSTALL.exists() or INSTALL.read_text() != text:
        stale.append(INSTALL)
        if not check:
            INSTALL.write_text(text)
    for p in stale:
        print(f"{'stale' if check else 'wrote'}: {p.relative_to(ROOT)}")
    if check and stale:
        print("run scripts/render-manifests.sh", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
