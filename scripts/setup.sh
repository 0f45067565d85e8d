#!/usr/bin/env bash
# Create .venv and install classmood into it. Idempotent: a second run is quick.
# Usage: scripts/setup.sh [--dev] [--with-browser]
#   (no flag)       what the server and the bot need: `pip install -e .` (no TensorFlow)
#   --dev           also training and test tools: `pip install -e ".[dev]"` (TensorFlow, pytest, ...)
#   --with-browser  also Debian's chromium, for the browser end-to-end test
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
want="runtime"; browser=""
for arg in "$@"; do
    case "$arg" in
        --dev) want="dev" ;;
        --with-browser) browser=1 ;;
        *) echo "setup: unknown option $arg (use --dev, --with-browser)" >&2; exit 2 ;;
    esac
done
if [ ! -x .venv/bin/pip ]; then
    # A half-made .venv (python but no pip) is what a failed `venv` leaves behind: start over.
    rm -rf .venv
    if ! "$PYTHON" -m venv .venv 2>/dev/null; then
        # Debian/Ubuntu split venv/ensurepip into python3-venv.
        rm -rf .venv
        echo "setup: $PYTHON cannot create a venv; installing python3-venv with apt" >&2
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-venv >/dev/null
        "$PYTHON" -m venv .venv
    fi
fi
# The stamp holds what was installed ("runtime" or "dev"); a dev install also serves scripts/run.sh.
stamp=".venv/.classmood-installed"
have="$(cat "$stamp" 2>/dev/null || true)"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || { [ "$want" = dev ] && [ "$have" != dev ]; }; then
    [ "$have" = dev ] && want="dev"    # pyproject.toml changed: refresh what is there, do not shrink it
    .venv/bin/python -m pip install --quiet --upgrade pip
    if [ "$want" = dev ]; then
        .venv/bin/python -m pip install --quiet -e ".[dev]"
    else
        .venv/bin/python -m pip install --quiet -e .
    fi
    echo "$want" > "$stamp"
fi
if [ -n "$browser" ] && ! /usr/bin/chromium --version >/dev/null 2>&1; then
    # Checks that it runs, not that it exists (Ubuntu's `chromium` package is a stub for a snap).
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
