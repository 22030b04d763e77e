#!/usr/bin/env bash
# Installs everything epd-serve needs into the current Python environment:
# redis-server (apt, when missing), torch (the CPU wheel from /opt/wheels when
# present, so pip does not pull the multi-GB CUDA build), the package itself, its
# test extras and the static gates' tools (ruff, mypy, import-linter; pinned).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

if ! command -v redis-server >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; then
  echo "==> installing redis-server and g++ (the CPU paged-attention kernel is compiled on first use)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server g++ >/dev/null
fi

if ! command -v prometheus >/dev/null 2>&1; then
  echo "==> installing prometheus (the operator's Prometheus metrics source is tested against it)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  if compgen -G "/opt/wheels/torch-*.whl" >/dev/null; then
    echo "==> installing torch from /opt/wheels (CPU build)"
    "$PYTHON" -m pip install -q --no-index --find-links /opt/wheels torch
  fi
fi

echo "==> installing epd-serve (editable), its test extras and the static gates' pinned tools"
"$PYTHON" -m pip install -q -e ".[test,lint]"

echo "==> building the CPU paged-attention kernel (cached under ~/.cache/torch_extensions)"
"$PYTHON" -P -c "from epd.workers.engine.cpu_attention import kernel; import sys; sys.exit(kernel() is None)"
