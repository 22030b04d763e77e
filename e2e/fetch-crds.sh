#!/usr/bin/env bash
# Provides the third-party CRDs the operator tests install into the harness's
# apiserver: the Prometheus Operator's (PodMonitor, ServiceMonitor) and
# cert-manager's (Certificate, Issuer), taken from their Go modules through the
# module proxy into ~/.cache, keyed by version. Prints the directory on the
# last line.
set -euo pipefail

PROMETHEUS_OPERATOR_VERSION=${PROMETHEUS_OPERATOR_VERSION:-0.85.0}
CERT_MANAGER_VERSION=${CERT_MANAGER_VERSION:-1.19.1}
CACHE=${EPD_CONTROLPLANE_CACHE:-$HOME/.cache/epd-controlplane}
OUT="$CACHE/crds/prometheus-operator-${PROMETHEUS_OPERATOR_VERSION}_cert-manager-${CERT_MANAGER_VERSION}"
FILES=(monitoring.coreos.com_podmonitors.yaml monitoring.coreos.com_servicemonitors.yaml
       cert-manager.io_certificates.yaml cert-manager.io_issuers.yaml)

have_all() { for f in "${FILES[@]}"; do [ -s "$OUT/$f" ] || return 1; done; }
if have_all; then echo "$OUT"; exit 0; fi

command -v go >/dev/null || { echo "Go is required to fetch the CRDs (apt-get install golang or go.dev)" >&2; exit 1; }
export GOMODCACHE="$CACHE/gomodcache" GOFLAGS=-mod=mod
module_dir() { (cd "$(mktemp -d)" && go mod download -json "$1" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p'); }
mkdir -p "$OUT"
prom=$(module_dir "github.com/prometheus-operator/prometheus-operator@v$PROMETHEUS_OPERATOR_VERSION")
cp "$prom/example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml" \
   "$prom/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml" "$OUT/"
certs=$(module_dir "github.com/cert-manager/cert-manager@v$CERT_MANAGER_VERSION")
cp "$certs/deploy/crds/cert-manager.io_certificates.yaml" "$certs/deploy/crds/cert-manager.io_issuers.yaml" "$OUT/"
chmod u+w "$OUT"/*
have_all || { echo "CRDs missing in $OUT" >&2; exit 1; }
echo "$OUT"
