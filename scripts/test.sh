#!/usr/bin/env bash
# Sets up everything (Python packages, redis-server, the Go-built Kubernetes
# control plane for the operator tests, cached under ~/.cache), runs the static
# gates (scripts/gates.sh: ruff, mypy, import-linter; a failure stops here) and
# then the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
PYTHON="${PYTHON:-python3}" bash scripts/gates.sh
echo "==> control-plane binaries (etcd, kube-apiserver, kwok, kubectl, helm)"
KUBEBUILDER_ASSETS="$(bash e2e/build-controlplane.sh | tail -n 1)"
export KUBEBUILDER_ASSETS
echo "==> KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
exec "${PYTHON:-python3}" -P -m pytest -q -p no:cacheprovider "$@"
