#!/usr/bin/env bash
# Set up, lint, and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check selfsup tests benchmarks
.venv/bin/ruff format --check selfsup tests benchmarks
exec .venv/bin/python -m pytest "$@"
