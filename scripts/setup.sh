#!/usr/bin/env bash
# Prepare a fresh clone: .venv with torch 2.14.1 + torchvision 0.29.1 (installed from the
# local disk on our machines; other versions may download GBs), logquant in
# editable mode with its test tools, and the Fashion-MNIST Debian package when running as
# root and the data is absent. Safe to rerun: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing torch 2.14.1 + torchvision 0.29.1 (about 90 s)"
  "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
fi
if ! "$VENV/bin/python" -c "import logquant, pytest, hypothesis, ruff, timm, onnx, onnxscript, onnxruntime" 2>/dev/null; then
  "$VENV/bin/pip" install -q -e ".[test]"
fi

DATA_DIR=${LOGQUANT_DATA_DIR:-/usr/share/datasets/fashion-mnist}
if [ ! -e "$DATA_DIR/t10k-images-idx3-ubyte.gz" ] && [ ! -e "$DATA_DIR/t10k-images-idx3-ubyte" ]; then
  if [ "$(id -u)" = "0" ]; then
    echo "setup: installing the dataset-fashion-mnist Debian package"
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || {
      apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "setup: Fashion-MNIST is missing at $DATA_DIR; run as root or" \
         "'sudo apt-get install dataset-fashion-mnist', or set LOGQUANT_DATA_DIR" >&2
    exit 1
  fi
fi
