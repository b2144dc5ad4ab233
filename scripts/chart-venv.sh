#!/usr/bin/env bash
# The Python tools the chart tests and scripts/render-manifests.sh use, in a
# venv under target/ (idempotent: reinstalls only when this list changes).
#   helm-sdkpy           the real Helm (v4) library; its wheel says Python
#                        >= 3.12 but works on Debian 12's 3.11, hence
#                        --ignore-requires-python
#   kubernetes-validate  JSON schemas of the built-in Kubernetes kinds
#   jsonschema, pyyaml   CRD schemas for the examples; YAML
#   pytest               the runner
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CHART_VENV:-target/chart-venv}
python=${PYTHON:-/usr/bin/python3}
[[ -x $python ]] || python=python3
reqs=(helm-sdkpy==0.1.32 kubernetes-validate==1.37.0 jsonschema==4.26.0 pyyaml==6.0.3 pytest==9.2.0)
stamp="$venv/.keyway-reqs"
if [[ -x $venv/bin/python && -f $stamp && "$(cat "$stamp")" == "${reqs[*]}" ]]; then
    exit 0
fi
echo "chart-venv: installing ${reqs[*]} into $venv" >&2
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check --ignore-requires-python "${reqs[@]}"
echo "${reqs[*]}" >"$stamp"
