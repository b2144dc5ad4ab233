#!/usr/bin/env bash
# The chart tests (tests/chart, pytest) with the real Helm library,
# kubernetes-validate, HAProxy and openssl. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/chart-venv.sh
venv=${CHART_VENV:-target/chart-venv}
# Helm reads these at load time: release storage in memory (nothing but the
# chart's objects reaches the test's API recorder), and its cache/config
# under target/ instead of $HOME.
export HELM_DRIVER=memory
export HELM_CACHE_HOME=$PWD/$venv/helm/cache HELM_CONFIG_HOME=$PWD/$venv/helm/config HELM_DATA_HOME=$PWD/$venv/helm/data
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/chart "$@"
