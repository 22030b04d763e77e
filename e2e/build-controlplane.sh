#!/usr/bin/env bash
# Provides etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl, kwok and helm for the control-plane tests (the envtest convention).
# Uses $KUBEBUILDER_ASSETS when it already holds them; otherwise builds them
# from Go modules through the module proxy into ~/.cache, keyed by version, so
# a second run is instant. Prints the bin directory on the last line.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-1.34.4}
ETCD_VERSION=${ETCD_VERSION:-3.6.16}
KWOK_VERSION=${KWOK_VERSION:-0.7.0}
HELM_VERSION=${HELM_VERSION:-3.19.0}
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm)

have_all() { for b in "${BINARIES[@]}"; do [ -x "$1/$b" ] || return 1; done; }

if [ -n "${KUBEBUILDER_ASSETS:-}" ] && have_all "$KUBEBUILDER_ASSETS"; then
  echo "$KUBEBUILDER_ASSETS"; exit 0
fi

CACHE=${EPD_CONTROLPLANE_CACHE:-$HOME/.cache/epd-controlplane}
KEY="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_helm-${HELM_VERSION}"
BIN="$CACHE/$KEY/bin"
if have_all "$BIN"; then echo "$BIN"; exit 0; fi

command -v go >/dev/null || { echo "Go is required to build the control plane (apt-get install golang or go.dev)" >&2; exit 1; }
mkdir -p "$BIN"
export GOPATH="$CACHE/gopath" GOMODCACHE="$CACHE/gomodcache" GOCACHE="$CACHE/gocache" CGO_ENABLED=0 GOFLAGS=-mod=mod
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
LDFLAGS="-s -w"

build_module() {  # dir module-requirements... ; writes go.mod for a throwaway main module
  local dir=$1; shift
  mkdir -p "$dir"; (cd "$dir" && go mod init epd.dev/controlplane-build >/dev/null 2>&1 && "$@")
}

if [ ! -x "$BIN/etcd" ]; then
  echo "==> building etcd v$ETCD_VERSION" >&2
  mkdir -p "$WORK/etcd"
  cat > "$WORK/etcd/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  build_module "$WORK/etcd" go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >&2
  (cd "$WORK/etcd" && go mod tidy >&2 && go build -trimpath -ldflags "$LDFLAGS" -o "$BIN/etcd" .) >&2
fi

if [ ! -x "$BIN/kube-apiserver" ] || [ ! -x "$BIN/kubectl" ] || [ ! -x "$BIN/kube-scheduler" ] || [ ! -x "$BIN/kube-controller-manager" ]; then
  echo "==> building Kubernetes v$K8S_VERSION (kube-apiserver, controller-manager, scheduler, kubectl)" >&2
  mkdir -p "$WORK/k8s"
  cd "$WORK/k8s"
  go mod init epd.dev/controlplane-build >/dev/null 2>&1
  gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  # k8s.io/kubernetes replaces its staging modules with local paths; pin them to the published v0.x tags.
  staging=$(grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging' "$gomod" | awk '{print $1}')
  for m in $staging; do go mod edit -replace "$m=$m@v0.${K8S_VERSION#1.}"; done
  go mod edit -require "k8s.io/kubernetes@v$K8S_VERSION"
  cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  go mod tidy >&2
  for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    go build -trimpath -ldflags "$LDFLAGS" -o "$BIN/$cmd" "k8s.io/kubernetes/cmd/$cmd" >&2
  done
  cd - >/dev/null
fi

if [ ! -x "$BIN/kwok" ]; then
  echo "==> building kwok v$KWOK_VERSION" >&2
  mkdir -p "$WORK/kwok"
  cat > "$WORK/kwok/tools.go" <<'GO'
//go:build tools

package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
GO
  build_module "$WORK/kwok" go get "sigs.k8s.io/kwok@v$KWOK_VERSION" >&2
  (cd "$WORK/kwok" && go mod tidy >&2 && go build -trimpath -ldflags "$LDFLAGS" -o "$BIN/kwok" sigs.k8s.io/kwok/cmd/kwok) >&2
fi

if [ ! -x "$BIN/helm" ]; then
  echo "==> building helm v$HELM_VERSION" >&2
  GOBIN="$BIN" go install -trimpath -ldflags "$LDFLAGS" "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION" >&2
fi

have_all "$BIN" || { echo "control-plane build incomplete in $BIN" >&2; exit 1; }
echo "$BIN"
