#!/usr/bin/env bash
# Sets up selfsup on a fresh Debian machine: Fashion-MNIST from Debian, a virtual environment in
# .venv with a CPU build of PyTorch, and the package itself (editable, with the test tools).
set -euo pipefail
cd "$(dirname "$0")/.."

data=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -e "$data" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then
    sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: Fashion-MNIST is missing; install it with: apt-get install dataset-fashion-mnist" >&2
  fi
fi

# Chromium: the test that opens `selfsup report`'s page in a headless browser (skipped without it).
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null ||
      echo "note: installing chromium failed; the report's browser test will be skipped" >&2
  else
    echo "note: chromium is missing; the report's browser test is skipped (apt-get install chromium)" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  # --system-site-packages: reuse a torch that is already installed instead of fetching another.
  if ! python3 -m venv --system-site-packages .venv 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get install -y -qq python3-venv >/dev/null
    fi
    rm -rf .venv && python3 -m venv --system-site-packages .venv
  fi
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # An unpinned torch pulls a multi-GB CUDA build; TORCH_SPEC chooses another build.
  .venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
# digits: scikit-learn, which ships the 8x8 digits the transfer tests use (no torch pulled in);
# report: the same scikit-learn, for the t-SNE map of `selfsup report`;
# notebook: the Jupyter kernel and client that tests/test_notebook.py runs the example with;
# tensorboard, mlflow (mlflow-skinny): the train.loggers tests/engine/test_loggers.py reads back;
# onnx: `selfsup export --format onnx` and the onnxruntime that tests/eval/test_export_onnx.py runs.
.venv/bin/pip install -q -e ".[test,digits,report,notebook,tensorboard,mlflow,onnx]"
