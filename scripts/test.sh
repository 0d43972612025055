#!/usr/bin/env bash
# Set up, lint, and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check selfsup tests benchmarks
.venv/bin/python -m ruff format --check selfsup tests benchmarks
exec .venv/bin/python -m pytest "$@"
