#!/usr/bin/env bash
# The main job: set up, pre-train VICReg on Fashion-MNIST, evaluate (kNN, linear probe) against
# the raw-pixel baselines. Extra arguments are config overrides, e.g. train.epochs=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/selfsup demo "$@"
