"""The Helm chart, the rendered manifests and the examples, checked with the
real Helm library (helm-sdkpy), kubernetes-validate, HAProxy and openssl.
Run with `make chart-test` (part of `make test`)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

import keyway_chart as kc
import render_manifests

ROOT = kc.ROOT
CHART = kc.CHART
HERE = Path(__file__).resolve().parent
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a
# recent one.
K8S_VERSIONS = ["1.25", "1.33"]

VALUE_FILES = {
    "defaults": {},
    "full": kc.load_values(HERE / "values-full.yaml"),
    "hostnetwork": kc.load_values(HERE / "values-hostnetwork.yaml"),
}


class StrictLoader(yaml.SafeLoader):
    """YAML that refuses duplicate keys (kubectl does; PyYAML keeps the last)."""


def _mapping(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {dup}", node.start_mark)
    return dict(yaml.SafeLoader.construct_mapping(loader, node, deep))


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def docs(text: str) -> list[dict]:
    return [d for d in yaml.load_all(text, Loader=StrictLoader) if d]


_rendered: dict[str, list[dict]] = {}


def rendered(name: str) -> list[dict]:
    if name not in _rendered:
        _rendered[name] = docs(kc.render(VALUE_FILES[name]))
    return _rendered[name]


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(objs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def container(workload: dict, name: str) -> dict:
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def flags(c: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for a in c["args"][1:]:
        k, _, v = a.partition("=")
        out.setdefault(k, []).append(v)
    return out


# --- lint and schema ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_FILES))
def test_the_chart_lints_clean(name):
    result = kc.lint(VALUE_FILES[name])
    assert result["TotalChartsLinted"] == 1
    assert kc.lint_errors(result) == [], result


def test_the_schema_rejects_bad_values_and_only_the_schema_does():
    bad = kc.load_values(HERE / "values-bad.yaml")
    # Helm's lint fails on values.yaml (its schema check)...
    assert "values.yaml" in kc.lint_errors(kc.lint(bad))
    # ...and the same values without the schema lint clean, so the schema
    # is what refused them.
    with tempfile.TemporaryDirectory() as tmp:
        no_schema = Path(tmp) / "keyway"
        shutil.copytree(CHART, no_schema)
        (no_schema / "values.schema.json").unlink()
        assert "values.yaml" not in kc.lint_errors(kc.lint(bad, chart=no_schema))
    # Install names each violation.
    with pytest.raises(Exception) as e:
        kc.render(bad)
    msg = str(e.value)
    assert "don't meet the specifications of the schema" in msg, msg
    for where in ["/proxy/mode", "/proxy/poolIPs/0", "/proxy/replicas", "/operator/replicas", "'typo' not allowed"]:
        assert where in msg, f"{where} missing from: {msg}"


def test_the_schema_covers_every_default_and_is_strict():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = kc.load_values(CHART / "values.yaml")

    def walk(s: dict, v, path: str):
        if isinstance(v, dict) and s.get("type") == "object" and "properties" in s:
            assert s.get("additionalProperties") is False, f"{path}: additionalProperties must be false"
            for k, sub in v.items():
                assert k in s["properties"], f"{path}.{k} is not in values.schema.json"
                walk(s["properties"][k], sub, f"{path}.{k}")

    walk(schema, defaults, "")
    for f in VALUE_FILES.values():
        jsonschema.validate(kc.merge(defaults, f), schema)


def test_values_full_names_every_value():
    """values-full.yaml exercises every option: each key of values.yaml is in it."""
    missing = []

    def walk(defaults: dict, full: dict, path: str):
        for k, v in defaults.items():
            if k not in full:
                missing.append(f"{path}{k}")
            elif isinstance(v, dict) and v and isinstance(full[k], dict):
                walk(v, full[k], f"{path}{k}.")

    walk(kc.load_values(CHART / "values.yaml"), VALUE_FILES["full"], "")
    assert missing == []


# --- rendered objects -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_FILES))
def test_rendered_objects_validate_against_kubernetes_schemas(name):
    objs = rendered(name)
    checked = 0
    for o in objs:
        if o["apiVersion"].startswith("monitoring.coreos.com/"):
            assert o["kind"] in ("ServiceMonitor", "PrometheusRule"), o["kind"]
            continue
        for v in K8S_VERSIONS:
            kubernetes_validate.validate(o, v, strict=True)
        checked += 1
    assert checked >= 15


def test_crds_validate_and_the_chart_ships_identical_copies():
    ours = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    theirs = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert ours == theirs and len(ours) == 3
    for n in ours:
        assert (CHART / "crds" / n).read_bytes() == (ROOT / "crds" / n).read_bytes(), n
        for v in K8S_VERSIONS:
            kubernetes_validate.validate(yaml.safe_load((ROOT / "crds" / n).read_text()), v, strict=True)


def test_install_installs_the_crds():
    with kc.Release() as rel:
        rel.install()
        got = {c["metadata"]["name"] for c in rel.crds()} if rel.crds() else set()
        posted = [p for m, p in rel.api.requests if m == "POST" and "customresourcedefinitions" in p]
    assert len(posted) == 3, rel.api.requests
    assert got <= {"ippools.keyway.dev", "vmleases.keyway.dev", "sshroutes.keyway.dev"}


def test_images_match_the_dockerfiles():
    objs = rendered("defaults")
    for df, workload in [("operator", "keyway-operator"), ("proxy", "keyway-proxy")]:
        text = (ROOT / "docker" / f"{df}.Dockerfile").read_text()
        tag = re.search(r"-t (\S+) \.", text).group(1)
        assert container(one(objs, "Deployment", workload), df)["image"] == tag


def test_the_operator_deployment():
    d = one(rendered("defaults"), "Deployment", "keyway-operator")
    spec = d["spec"]["template"]["spec"]
    assert d["spec"]["replicas"] == 2
    c = container(d, "operator")
    f = flags(c)
    assert f["--leader-lease"] == ["keyway-operator"]
    for k in ["--lease-duration-secs", "--renew-deadline-secs", "--retry-period-secs", "--relay-ca-key", "--token-secret"]:
        assert k in f, k
    assert f["--grpc-listen"] == ["0.0.0.0:7070"] and f["--metrics-listen"] == ["0.0.0.0:9090"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": 7070, "metrics": 9090}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in c["env"]}
    assert env["POD_NAME"] == "metadata.name" and env["POD_NAMESPACE"] == "metadata.namespace"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"] and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["allowPrivilegeEscalation"] is False and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    # gRPC for proxies (only the leader is ready) and metrics for every replica.
    grpc = one(rendered("defaults"), "Service", "keyway-operator")
    assert [(p["port"], p["targetPort"]) for p in grpc["spec"]["ports"]] == [(7070, "grpc")]
    metrics = one(rendered("defaults"), "Service", "keyway-operator-metrics")
    assert metrics["spec"]["publishNotReadyAddresses"] is True
    assert metrics["spec"]["selector"] == grpc["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]


def _rules(objs: list[dict]) -> dict[str, set]:
    out: dict[str, set] = {"ClusterRole": set(), "Role": set()}
    for o in objs:
        if o["kind"] in out:
            for r in o["rules"]:
                for g in r["apiGroups"]:
                    for res in r["resources"]:
                        for verb in r["verbs"]:
                            for n in r.get("resourceNames") or [None]:
                                out[o["kind"]].add((g, res, verb, n))
    return out


def test_rbac_is_exactly_as_powerful_as_manifests_rbac_yaml():
    manifest = docs((ROOT / "manifests" / "rbac.yaml").read_text())
    objs = rendered("defaults")
    assert _rules(objs) == _rules(manifest)
    for kind in ["ClusterRoleBinding", "RoleBinding"]:
        b = one(objs, kind)
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "keyway-operator", "namespace": "keyway-system"}]
    d = one(objs, "Deployment", "keyway-operator")
    assert d["spec"]["template"]["spec"]["serviceAccountName"] == "keyway-operator"
    # The names the Role allows are the ones the operator uses, also with
    # another release name and lease name.
    objs = rendered("full")
    role = one(objs, "Role")
    f = flags(container(one(objs, "Deployment", "keyway-kw-operator"), "operator"))
    names = {n for (_, res, _, n) in _rules([role])["Role"] if n}
    assert names == {f["--leader-lease"][0], f["--token-secret"][0].split("/")[0]}
    # Gateways get no API access at all.
    for sa in find(rendered("defaults"), "ServiceAccount", "keyway-proxy"):
        assert sa["automountServiceAccountToken"] is False


def test_load_balancer_mode_one_shared_service_per_pool_ip_and_the_edge():
    objs = rendered("full")
    values = VALUE_FILES["full"]["proxy"]
    ips = values["poolIPs"]
    services = [s for s in find(objs, "Service") if s["spec"].get("type") == "LoadBalancer"]
    assert len(services) == len(ips)
    deploy = one(objs, "Deployment", "keyway-kw-proxy")
    edge = container(deploy, "edge")
    edge_ports = {p["name"]: p["containerPort"] for p in edge["ports"]}
    proxy_ports = {p["name"]: p["containerPort"] for p in container(deploy, "proxy")["ports"]}
    for i, (ip, svc) in enumerate(zip(ips, services)):
        a = svc["metadata"]["annotations"]
        assert a["metallb.universe.tf/allow-shared-ip"] == "keyway-public"
        assert svc["spec"]["loadBalancerIP"] == ip  # ipField: spec
        assert "metallb.universe.tf/loadBalancerIPs" not in a
        ports = {p["port"]: p["targetPort"] for p in svc["spec"]["ports"]}
        assert ports == {22: f"ssh-{i}", 443: "https"}
        assert edge_ports[f"ssh-{i}"] == 2400 + i
        assert svc["spec"]["externalTrafficPolicy"] == "Local"
    assert proxy_ports["https"] == 8443
    limits = {k: v for k, v in flags(container(deploy, "proxy")).items() if k.startswith("--max-")}
    assert limits == {
        "--max-unauthenticated": ["512"],
        "--max-connections": ["20000"],
        "--max-channels": ["32"],
        "--max-channel-window-kib": ["4096"],
        "--max-connections-per-user": ["100"],
        "--max-channels-per-user": ["200"],
        "--max-unauthenticated-per-source": ["64"],
    }
    budgets = flags(container(deploy, "proxy"))
    assert budgets["--relay-buffer-budget-mib"] == ["1024"]
    assert budgets["--user-relay-buffer-mib"] == ["128"]
    assert budgets["--kex-algorithms"] == ["curve25519-sha256,diffie-hellman-group14-sha256"]
    https = {k: v for k, v in flags(container(deploy, "proxy")).items()
             if k.startswith("--https-max-") or k.startswith("--https-handshake") or "upgrade-proofs" in k}
    assert https == {"--https-max-connections": ["2000"], "--https-max-unauthenticated": ["128"],
                     "--https-handshake-timeout-secs": ["5"], "--allow-replayable-upgrade-proofs": [""]}
    # With the default ipField, the MetalLB annotation names the IP instead.
    objs = docs(kc.render({"proxy": {"poolIPs": ["203.0.113.7"], "loadBalancer": {"edge": {"enabled": False}}}}))
    svc = next(s for s in find(objs, "Service") if s["spec"].get("type") == "LoadBalancer")
    assert svc["metadata"]["annotations"]["metallb.universe.tf/loadBalancerIPs"] == "203.0.113.7"
    assert "loadBalancerIP" not in svc["spec"]
    assert {p["port"]: p["targetPort"] for p in svc["spec"]["ports"]} == {22: "ssh", 443: "https"}
    assert flags(container(one(objs, "Deployment", "keyway-proxy"), "proxy"))["--ssh-listen"] == ["0.0.0.0:2222"]


def test_the_edge_config_is_valid_haproxy_and_names_each_pool_ip():
    objs = rendered("full")
    cfg = one(objs, "ConfigMap", "keyway-kw-proxy-edge")["data"]["haproxy.cfg"]
    ips = VALUE_FILES["full"]["proxy"]["poolIPs"]
    for i, ip in enumerate(ips):
        fam = "ipv6" if ":" in ip else "ipv4"
        assert f"bind :{2400 + i}\n  tcp-request connection set-dst {fam}({ip})" in cfg
    assert "server gateway 127.0.0.1:2522 send-proxy-v2" in cfg
    f = flags(container(one(objs, "Deployment", "keyway-kw-proxy"), "proxy"))
    assert f["--ssh-listen"] == ["127.0.0.1:2522"]
    assert f["--trusted-proxy-cidrs"][0].split(",")[0] == "127.0.0.1/32"
    with tempfile.NamedTemporaryFile("w", suffix=".cfg") as t:
        t.write(cfg)
        t.flush()
        out = subprocess.run(["haproxy", "-c", "-f", t.name], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_host_network_mode_is_a_daemonset_binding_the_pool_ips():
    objs = rendered("hostnetwork")
    assert not find(objs, "Deployment", "keyway-proxy")
    assert not [s for s in find(objs, "Service") if s["spec"].get("type") == "LoadBalancer"]
    ds = one(objs, "DaemonSet", "keyway-proxy")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["nodeSelector"]["keyway.dev/pool-ips"] == "true"
    c = container(ds, "proxy")
    f = flags(c)
    assert f["--ssh-listen"] == ["198.51.100.7:22", "198.51.100.8:22"]
    assert f["--https-listen"] == ["198.51.100.7:443", "198.51.100.8:443"]
    assert f["--metrics-listen"] == ["0.0.0.0:9190"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}
    # Unprivileged ports keep the gateway non-root.
    objs = docs(kc.render({"proxy": {"mode": "hostNetwork", "poolIPs": ["198.51.100.7"],
                                     "hostNetwork": {"sshPort": 2222, "httpsPort": 8443}}}))
    c = container(one(objs, "DaemonSet", "keyway-proxy"), "proxy")
    assert c["securityContext"]["runAsNonRoot"] is True and "add" not in c["securityContext"]["capabilities"]
    # The operator writes the port users dial into status.sshCommand.
    op = flags(container(one(objs, "Deployment", "keyway-operator"), "operator"))
    assert op["--public-ssh-port"] == ["2222"]
    # hostNetwork without addresses is refused with a reason.
    with pytest.raises(Exception, match="needs proxy.poolIPs"):
        kc.render({"proxy": {"mode": "hostNetwork"}})


def test_the_agent_daemonset_uses_the_agent_cli():
    assert not find(rendered("defaults"), "DaemonSet")
    ds = one(rendered("full"), "DaemonSet", "keyway-kw-agent")
    c = container(ds, "agent")
    assert c["args"][0] == "agent"
    f = flags(c)
    assert set(f) == {"--identity", "--listen", "--forward", "--endpoint", "--token-file", "--ca-file",
                      "--cache", "--metrics-listen"}
    assert f["--identity"] == ["/var/lib/keyway/agent-identity"]
    assert f["--listen"] == ["/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001"]
    assert f["--forward"] == ["127.0.0.1:2022"]
    assert f["--endpoint"] == ["https://keyway-kw-operator.keyway-system.svc:7070"]
    assert ds["spec"]["template"]["spec"]["hostNetwork"] is True
    assert c["image"] == "registry.example.com/keyway-agent:0.1.0-rc1"


def test_secrets_are_generated_in_formats_the_binaries_read_and_kept_on_upgrade():
    with kc.Release() as rel:
        first = docs(rel.install({"snapshotTLS": {"enabled": True}}))
        second = docs(rel.upgrade({"snapshotTLS": {"enabled": True}}))
    secrets = {s["metadata"]["name"]: s for s in find(first, "Secret")}
    assert set(secrets) == {"keyway-proxy-host-key", "keyway-gateway-identity", "keyway-relay-ca",
                            "keyway-snapshot-token", "keyway-connect-tls", "keyway-snapshot-tls"}
    for s in secrets.values():
        assert s["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert {s["metadata"]["name"]: s["data"] for s in find(second, "Secret")} == \
        {n: s["data"] for n, s in secrets.items()}, "an upgrade changed key material"
    # ed25519 in PKCS#8 PEM, as openssl sees it.
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["keyway-proxy-host-key", "keyway-gateway-identity", "keyway-relay-ca"]:
            pem = base64.b64decode(secrets[name]["data"]["key"])
            assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
            p = Path(tmp) / name
            p.write_bytes(pem)
            out = subprocess.run(["openssl", "pkey", "-in", str(p), "-noout", "-text"],
                                 capture_output=True, text=True)
            assert out.returncode == 0 and "ED25519 Private-Key" in out.stdout, out.stdout + out.stderr
        tls = secrets["keyway-snapshot-tls"]["data"]
        for k in ["tls.crt", "ca.crt"]:
            (Path(tmp) / k).write_bytes(base64.b64decode(tls[k]))
        out = subprocess.run(["openssl", "verify", "-CAfile", str(Path(tmp) / "ca.crt"), str(Path(tmp) / "tls.crt")],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        out = subprocess.run(["openssl", "x509", "-in", str(Path(tmp) / "tls.crt"), "-noout", "-ext", "subjectAltName"],
                             capture_output=True, text=True)
        assert "DNS:keyway-operator.keyway-system.svc" in out.stdout, out.stdout
    assert len(base64.b64decode(secrets["keyway-snapshot-token"]["data"]["token"])) >= 32
    # Existing Secrets are used, not generated; generate=false creates none.
    objs = rendered("full")
    assert not find(objs, "Secret", "my-relay-ca")
    assert not find(objs, "Secret", "my-gateway-identity")
    gw = flags(container(one(objs, "Deployment", "keyway-kw-proxy"), "proxy"))
    assert gw["--tunnel-identity"] == ["/etc/keyway/gateway-identity/identity"]
    assert not find(docs(kc.render({"secrets": {"generate": False}})), "Secret")


def test_network_policies():
    objs = rendered("full")
    op = one(objs, "NetworkPolicy", "keyway-kw-operator")["spec"]
    grpc = next(r for r in op["ingress"] if r["ports"][0]["port"] == 7070)
    names = [p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") for p in grpc["from"]]
    assert names[:2] == ["keyway-proxy", "keyway-agent"]
    assert {"ipBlock": {"cidr": "192.0.2.0/24"}} in grpc["from"]
    metrics = next(r for r in op["ingress"] if r["ports"][0]["port"] == 9090)
    assert metrics["from"][0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    px = one(objs, "NetworkPolicy", "keyway-kw-proxy")["spec"]
    assert set(px["policyTypes"]) == {"Ingress", "Egress"}
    users = {p["port"] for p in px["ingress"][0]["ports"]}
    assert users == {2400, 2401, 2402, 8443} and "from" not in px["ingress"][0]
    assert {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 22, "protocol": "TCP"}]} in px["egress"]
    assert any(r.get("ports") == [{"port": 7070, "protocol": "TCP"}] for r in px["egress"])
    users = {p["port"] for p in one(rendered("defaults"), "NetworkPolicy", "keyway-proxy")["spec"]["ingress"][0]["ports"]}
    assert users == {2222, 8443}


@pytest.mark.parametrize("name", sorted(VALUE_FILES))
def test_every_container_can_read_what_it_mounts_and_runs_as_a_known_user(name):
    """A Secret volume's files belong to root; a non-root container reads
    them through the world bits or, with fsGroup, the group bits. And an
    image whose USER is a name (HAProxy's) passes runAsNonRoot only with a
    numeric runAsUser."""
    for w in find(rendered(name), "Deployment") + find(rendered(name), "DaemonSet"):
        spec = w["spec"]["template"]["spec"]
        pod = spec.get("securityContext", {})
        for c in spec["containers"]:
            sc = {**pod, **c.get("securityContext", {})}
            assert "runAsUser" in sc, f"{w['metadata']['name']}/{c['name']}: no numeric runAsUser"
            root = sc["runAsUser"] == 0
            assert root or sc.get("runAsNonRoot") is True
            mounted = {m["name"] for m in c.get("volumeMounts", [])}
            for v in spec.get("volumes", []):
                if v["name"] not in mounted or not ("secret" in v or "configMap" in v):
                    continue
                mode = (v.get("secret") or v.get("configMap")).get("defaultMode", 0o644)
                readable = root or mode & 0o004 or (mode & 0o040 and pod.get("fsGroup") is not None)
                assert readable, f"{w['metadata']['name']}/{c['name']} cannot read volume {v['name']} ({mode:o})"


def test_disruption_budgets():
    objs = rendered("defaults")
    assert one(objs, "PodDisruptionBudget", "keyway-operator")["spec"]["minAvailable"] == 1
    assert one(objs, "PodDisruptionBudget", "keyway-proxy")["spec"]["maxUnavailable"] == 1


# --- monitoring ---------------------------------------------------------------------


def test_the_prometheus_rule_is_deploy_prometheus_alerts_yaml():
    alerts = (ROOT / "deploy" / "prometheus" / "alerts.yaml").read_bytes()
    assert (CHART / "files" / "alerts.yaml").read_bytes() == alerts
    rule = one(rendered("full"), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == yaml.safe_load(alerts)["groups"]
    assert rule["metadata"]["labels"]["release"] == "prometheus"


def test_service_monitor_and_scrape_annotations():
    objs = rendered("full")
    sm = one(objs, "ServiceMonitor")
    sel = sm["spec"]["selector"]["matchLabels"]
    scraped = [s for s in find(objs, "Service") if all(s["metadata"]["labels"].get(k) == v for k, v in sel.items())]
    assert sorted(s["metadata"]["name"] for s in scraped) == ["keyway-kw-operator-metrics", "keyway-kw-proxy-metrics"]
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    for s in scraped:
        assert s["spec"]["ports"][0]["name"] == "metrics"
    for w in find(rendered("defaults"), "Deployment"):
        a = w["spec"]["template"]["metadata"]["annotations"]
        assert a["prometheus.io/scrape"] == "true" and a["prometheus.io/path"] == "/metrics"
        ports = [p["containerPort"] for c in w["spec"]["template"]["spec"]["containers"] for p in c["ports"]
                 if p["name"] == "metrics"]
        assert ports == [int(a["prometheus.io/port"])]
    for w in find(objs, "Deployment"):
        assert "prometheus.io/scrape" not in w["spec"]["template"]["metadata"].get("annotations", {})


def documented_metrics() -> set[str]:
    text = (ROOT / "docs" / "metrics.md").read_text()
    names = set()
    for line in text.splitlines():
        if line.startswith("| `keyway_"):
            names |= set(re.findall(r"`(keyway_[a-z0-9_]+)`", line.split("|")[1]))
    return names


def dashboard_exprs(d: dict) -> list[str]:
    out = []

    def walk(panels):
        for p in panels:
            out.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(d["panels"])
    return out


def test_dashboards_use_only_documented_metrics_and_cover_the_topics():
    known = documented_metrics()
    assert len(known) > 20
    used: set[str] = set()
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert len(files) >= 2
    for f in files:
        d = json.loads(f.read_text())
        assert d["uid"] and d["title"] and d["id"] is None
        exprs = dashboard_exprs(d)
        assert exprs, f
        for e in exprs:
            for name in re.findall(r"\bkeyway_[a-z0-9_]+", e):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert name in known or base in known, f"{f.name}: {name} is not in docs/metrics.md"
                used.add(base if base in known else name)
    for topic in ["keyway_ssh_connections_total", "keyway_ssh_sessions_active", "keyway_ssh_bytes_total",
                  "keyway_ssh_handshake_duration_seconds", "keyway_operator_pool_addresses",
                  "keyway_operator_pool_max_leases_per_user", "keyway_snapshot_version",
                  "keyway_operator_snapshot_version", "keyway_snapshot_age_seconds"]:
        assert topic in used, f"no panel reads {topic}"
    # The ConfigMap for the Grafana sidecar carries each file unchanged.
    cm = one(rendered("full"), "ConfigMap", "keyway-kw-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert {k: json.loads(v) for k, v in cm["data"].items()} == {f.name: json.loads(f.read_text()) for f in files}
    assert not find(rendered("defaults"), "ConfigMap")


# --- manifests/ ---------------------------------------------------------------------


def test_install_yaml_is_rendered_from_the_chart_and_up_to_date():
    want = render_manifests.install_yaml()
    path = ROOT / "manifests" / "install.yaml"
    assert path.read_text() == want, "manifests/install.yaml is stale: run scripts/render-manifests.sh"
    objs = docs(want)
    assert objs[0]["kind"] == "Namespace" and len(find(objs, "CustomResourceDefinition")) == 3
    assert not find(objs, "Secret")


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "manifests").glob("*.yaml")))
def test_manifests_validate_against_kubernetes_schemas(path):
    objs = docs((ROOT / "manifests" / path).read_text())
    assert objs
    for o in objs:
        for v in K8S_VERSIONS:
            kubernetes_validate.validate(o, v, strict=True)


def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> JSON schema from the CRD's openAPIV3Schema, made
    strict (unknown fields are errors: the API server would prune them)."""

    def strict(s):
        if isinstance(s, dict):
            s = {k: strict(v) for k, v in s.items() if not k.startswith("x-kubernetes-")}
            if s.pop("nullable", False) and "type" in s:
                s["type"] = [s["type"], "null"]
            if s.get("type") in ("object", ["object", "null"]) and "properties" in s:
                s.setdefault("additionalProperties", False)
            return s
        if isinstance(s, list):
            return [strict(v) for v in s]
        return s

    out = {}
    for f in (ROOT / "crds").glob("*.yaml"):
        crd = yaml.safe_load(f.read_text())
        for ver in crd["spec"]["versions"]:
            schema = strict(ver["schema"]["openAPIV3Schema"])
            schema["properties"].update({"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                         "metadata": {"type": "object"}})
            out[(f"{crd['spec']['group']}/{ver['name']}", crd["spec"]["names"]["kind"])] = schema
    return out


def test_examples_validate_against_the_crd_schemas():
    schemas = crd_schemas()
    objs = []
    for f in sorted((ROOT / "manifests" / "examples").glob("*.yaml")):
        for o in docs(f.read_text()):
            schema = schemas[(o["apiVersion"], o["kind"])]
            jsonschema.validate(o, schema)
            objs.append(o)
    pools = find(objs, "IPPool")
    leases = find(objs, "VMLease")
    routes = find(objs, "SshRoute")
    assert pools and len({l["spec"]["user"] for l in leases}) >= 2
    assert all(l["spec"]["poolRef"] in {p["metadata"]["name"] for p in pools} for l in leases)
    assert any(r["spec"]["from"].startswith("tcp+https://") for r in routes)
    for r in routes:  # the CRD's CEL rules, which jsonschema cannot run
        assert ("to" in r["spec"]) != ("leaseRef" in r["spec"])
        assert r["spec"].get("allowPublicKeys") or r["spec"].get("allowUnauthenticated") is True
    # The strict schema does refuse a typo.
    bad = json.loads(json.dumps(leases[0]))
    bad["spec"]["poolref"] = bad["spec"].pop("poolRef")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schemas[(bad["apiVersion"], "VMLease")])


def test_install_deps_installs_python3_venv():
    script = (ROOT / "scripts" / "install-deps.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "install-deps.sh")]).returncode == 0
    packages = re.search(r"packages=\(([^)]*)\)", script).group(1).split()
    assert "python3-venv" in packages and "haproxy" in packages
