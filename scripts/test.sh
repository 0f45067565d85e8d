#!/usr/bin/env bash
# The whole test suite, from a clean clone: installs what it needs (venv, pip packages, Debian chromium,
# janus and postgresql), then ruff, mypy and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev --with-browser --with-janus --with-postgres
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# Lint and types first: cheap, and a failure names the line.
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
