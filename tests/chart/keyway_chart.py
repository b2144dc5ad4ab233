"""Helm, run for real on the Keyway chart.

helm-sdkpy (the Helm v4 library behind a C shim) has no `template` action,
and its `Lint` takes no values file and returns no manifests. So:

- lint(chart_dir, values): lints a copy of the chart whose values.yaml is the
  defaults with `values` merged over them (what `helm lint -f values` checks).
- render(values): a real `helm install` with client-side apply, storage in
  memory (HELM_DRIVER=memory) and no waiting, against RecordingAPI below, an
  HTTP endpoint that answers discovery and keeps every object it is sent.
  Helm renders, validates values against values.schema.json, runs `lookup`
  against the recorder (404 on a fresh install), installs crds/ and creates
  every object; the release manifest it returns is the rendered chart.
  Upgrades go through the same recorder, so `lookup` then sees what the
  install created, as it would in a cluster.

RecordingAPI is test code only: it stores objects as sent (no defaulting, no
validation, no admission); kubernetes-validate and the CRD schemas check the
objects instead.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "keyway"

# Memory storage for releases: nothing but the chart's own objects reaches
# the recorder. The Helm library (a Go c-shared object) reads the environment
# the process started with, so this must come from outside (the Makefile and
# scripts/render-manifests.sh set it); changing os.environ here is too late.
if os.environ.get("HELM_DRIVER") != "memory":
    raise RuntimeError("run with HELM_DRIVER=memory in the environment (see scripts/chart-test.sh)")

import helm_sdkpy  # noqa: E402  (after the check above)

# Kinds the recorder's discovery advertises: (group/version, plural, kind, namespaced).
KINDS = [
    ("v1", "namespaces", "Namespace", False),
    ("v1", "secrets", "Secret", True),
    ("v1", "configmaps", "ConfigMap", True),
    ("v1", "services", "Service", True),
    ("v1", "serviceaccounts", "ServiceAccount", True),
    ("apps/v1", "deployments", "Deployment", True),
    ("apps/v1", "daemonsets", "DaemonSet", True),
    ("rbac.authorization.k8s.io/v1", "roles", "Role", True),
    ("rbac.authorization.k8s.io/v1", "rolebindings", "RoleBinding", True),
    ("rbac.authorization.k8s.io/v1", "clusterroles", "ClusterRole", False),
    ("rbac.authorization.k8s.io/v1", "clusterrolebindings", "ClusterRoleBinding", False),
    ("networking.k8s.io/v1", "networkpolicies", "NetworkPolicy", True),
    ("policy/v1", "poddisruptionbudgets", "PodDisruptionBudget", True),
    ("monitoring.coreos.com/v1", "servicemonitors", "ServiceMonitor", True),
    ("monitoring.coreos.com/v1", "prometheusrules", "PrometheusRule", True),
    ("apiextensions.k8s.io/v1", "customresourcedefinitions", "CustomResourceDefinition", False),
]


class RecordingAPI:
    """Discovery plus a store of what clients create (see the module doc)."""

    def __init__(self) -> None:
        self.objects: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> dict:
                n = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(n)
                if "protobuf" in (self.headers.get("Content-Type") or ""):
                    return protobuf_head(raw)
                return json.loads(raw or b"{}")

            def do_GET(self):
                path = self.path.split("?")[0]
                outer.requests.append(("GET", self.path))
                found = outer._discovery(path)
                if found is not None:
                    return self._send(200, found)
                if path in outer.objects:
                    return self._send(200, outer.objects[path])
                self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                 "reason": "NotFound", "code": 404})

            def do_POST(self):
                obj = self._body()
                path = self.path.split("?")[0]
                outer.requests.append(("POST", path))
                key = f"{path}/{obj['metadata']['name']}"
                if key in outer.objects:
                    return self._send(409, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                            "reason": "AlreadyExists", "code": 409})
                obj.setdefault("metadata", {})["resourceVersion"] = "1"
                outer.objects[key] = obj
                self._send(201, obj)

            def do_PUT(self):
                obj = self._body()
                path = self.path.split("?")[0]
                outer.requests.append(("PUT", path))
                outer.objects[path] = obj
                self._send(200, obj)

            def do_PATCH(self):
                # Upgrades patch objects; the recorder keeps the installed
                # version (tests read the release manifest, not the store).
                self._body()
                path = self.path.split("?")[0]
                outer.requests.append(("PATCH", path))
                if path not in outer.objects:
                    return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                            "reason": "NotFound", "code": 404})
                self._send(200, outer.objects[path])

            def do_DELETE(self):
                path = self.path.split("?")[0]
                outer.requests.append(("DELETE", path))
                obj = outer.objects.pop(path, None)
                self._send(200 if obj else 404, obj or {"kind": "Status", "code": 404})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _discovery(self, path: str):
        if path == "/version":
            return {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            groups: dict[str, list] = {}
            for gv, *_ in KINDS:
                if "/" in gv:
                    g, v = gv.split("/")
                    if {"groupVersion": gv, "version": v} not in groups.setdefault(g, []):
                        groups[g].append({"groupVersion": gv, "version": v})
            return {"kind": "APIGroupList", "apiVersion": "v1",
                    "groups": [{"name": g, "versions": vs, "preferredVersion": vs[0]}
                               for g, vs in groups.items()]}
        m = re.fullmatch(r"/api/(v1)|/apis/([^/]+/[^/]+)", path)
        if m:
            gv = m.group(1) or m.group(2)
            resources = [{"name": plural, "singularName": kind.lower(), "namespaced": ns, "kind": kind,
                          "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                         for g, plural, kind, ns in KINDS if g == gv]
            if resources:
                return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                        "resources": resources}
        return None

    def store(self, obj: dict, namespace: str) -> None:
        """Keeps `obj` where a GET for it looks (the install's objects, from
        the release manifest, so `lookup` on upgrade sees their data)."""
        for gv, plural, kind, namespaced in KINDS:
            if obj.get("apiVersion") == gv and obj.get("kind") == kind:
                base = "/api/v1" if gv == "v1" else f"/apis/{gv}"
                ns = obj["metadata"].get("namespace", namespace)
                scope = f"/namespaces/{ns}" if namespaced else ""
                self.objects[f"{base}{scope}/{plural}/{obj['metadata']['name']}"] = obj
                return
        raise KeyError(f"{obj.get('apiVersion')} {obj.get('kind')} is not in KINDS")

    def kubeconfig(self) -> str:
        host, port = self.server.server_address[:2]
        return (
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: rec, cluster: {{server: 'http://{host}:{port}'}}}}]\n"
            "users: [{name: rec, user: {token: recorder}}]\n"
            "contexts: [{name: rec, context: {cluster: rec, user: rec}}]\n"
            "current-context: rec\n"
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            val, i = buf[i:i + n], i + n
        elif wire == 1:
            val, i = buf[i:i + 8], i + 8
        elif wire == 5:
            val, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield num, wire, val


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = val = 0
    while True:
        b = buf[i]
        i += 1
        val |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return val, i


def protobuf_head(raw: bytes) -> dict:
    """apiVersion, kind and metadata.name/namespace of an object client-go
    sent as Kubernetes protobuf ("k8s\\0" + runtime.Unknown{typeMeta, raw},
    the object's field 1 being its ObjectMeta). The rest of the object is not
    needed: tests read what Helm rendered from the release manifest."""
    if not raw.startswith(b"k8s\x00"):
        raise ValueError("not a Kubernetes protobuf envelope")
    head: dict = {"metadata": {}}
    for num, _, val in _fields(raw[4:]):
        if num == 1:
            for n, _, v in _fields(val):
                head[{1: "apiVersion", 2: "kind"}.get(n, "_")] = v.decode()
        elif num == 2:
            for n, _, v in _fields(val):
                if n == 1:
                    for m, _, w in _fields(v):
                        if m in (1, 3) and isinstance(w, bytes):
                            head["metadata"][{1: "name", 3: "namespace"}[m]] = w.decode()
    head.pop("_", None)
    return head


def load_values(path: Path | str) -> dict:
    return yaml.safe_load(Path(path).read_text()) or {}


def merge(base: dict, over: dict) -> dict:
    """Helm's values merge: maps merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def lint(values: dict | None = None, chart: Path = CHART) -> dict:
    """Helm's lint of the chart with `values` over the defaults.

    Returns Helm's result ({"Messages": [{"Severity", "Path", ...}], ...});
    Severity 3 is an error. (The shim serialises Go errors as {}, so the
    message text is lost: Path says which part failed.)"""
    with tempfile.TemporaryDirectory() as tmp:
        copy_dir = Path(tmp) / "keyway"
        shutil.copytree(chart, copy_dir)
        if values:
            merged = merge(load_values(chart / "values.yaml"), values)
            (copy_dir / "values.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
        config = helm_sdkpy.Configuration(namespace="keyway-system")
        return asyncio.run(helm_sdkpy.Lint(config).run(str(copy_dir)))


def lint_errors(result: dict) -> list[str]:
    """Paths of the error-level lint messages."""
    return [m.get("Path", "?") for m in result.get("Messages") or [] if m.get("Severity") == 3]


class Release:
    """A release installed (and maybe upgraded) into a RecordingAPI."""

    def __init__(self, name: str = "keyway", namespace: str = "keyway-system", chart: Path = CHART):
        self.name, self.namespace, self.chart = name, namespace, chart
        self.api = RecordingAPI()
        self.config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=self.api.kubeconfig())

    def install(self, values: dict | None = None) -> str:
        r = asyncio.run(helm_sdkpy.Install(self.config).run(
            self.name, str(self.chart), values=values or {}, wait=False, timeout=60))
        for obj in documents(r["manifest"]):
            self.api.store(obj, self.namespace)
        return r["manifest"]

    def upgrade(self, values: dict | None = None) -> str:
        r = asyncio.run(helm_sdkpy.Upgrade(self.config).run(
            self.name, str(self.chart), values=values or {}, wait=False, timeout=60))
        return r["manifest"]

    def crds(self) -> list[dict]:
        return [o for o in self.api.objects.values() if o.get("kind") == "CustomResourceDefinition"]

    def close(self) -> None:
        self.api.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def render(values: dict | None = None, name: str = "keyway", namespace: str = "keyway-system") -> str:
    """The chart's manifest as `helm install` renders it (see the module doc)."""
    with Release(name, namespace) as rel:
        return rel.install(values)


def documents(manifest: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(manifest) if d]
