#!/usr/bin/env bash
# Renders manifests/install.yaml from charts/keyway with the real Helm library
# (helm-sdkpy) and refreshes the chart's copies of crds/*.yaml and
# deploy/prometheus/alerts.yaml. `--check`: change nothing, fail if stale.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/chart-venv.sh
venv=${CHART_VENV:-target/chart-venv}
export HELM_DRIVER=memory  # read by Helm at load time; see scripts/chart-test.sh
export HELM_CACHE_HOME=$PWD/$venv/helm/cache HELM_CONFIG_HOME=$PWD/$venv/helm/config HELM_DATA_HOME=$PWD/$venv/helm/data
exec "$venv/bin/python" tests/chart/render_manifests.py "$@"
