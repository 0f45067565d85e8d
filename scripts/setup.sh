#!/usr/bin/env bash
# Create .venv and install classmood into it. Idempotent: a second run is quick.
# Usage: scripts/setup.sh [--dev] [--with-browser] [--with-janus] [--with-postgres]
#   (no flag)       what the server and the bot need: `pip install -e .`
#   --dev           also training and test tools: `pip install -e ".[dev]"` (TensorFlow, pytest, ...)
#   --with-browser  also Debian's chromium, for the browser end-to-end tests
#   --with-janus    also Debian's janus, the meetings' media server (scripts/run.sh, the meeting tests)
#   --with-postgres also Debian's postgresql server binaries, for the storage tests on PostgreSQL (the tests
#                   start their own server in a temporary folder; the package's system service is not used)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
want="runtime"; browser=""; janus=""; postgres=""
for arg in "$@"; do
    case "$arg" in
        --dev) want="dev" ;;
        --with-browser) browser=1 ;;
        --with-janus) janus=1 ;;
        --with-postgres) postgres=1 ;;
        *) echo "setup: unknown option $arg (use --dev, --with-browser, --with-janus, --with-postgres)" >&2; exit 2 ;;
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
apt_updated=""
apt_install() {
    [ -n "$apt_updated" ] || { $SUDO apt-get update -qq; apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}
# Checks that it runs, not that it exists (Ubuntu's `chromium` package is a stub for a snap).
if [ -n "$browser" ] && ! /usr/bin/chromium --version >/dev/null 2>&1; then
    apt_install chromium
fi
# The meeting's media server (Janus VideoRoom), started by `bot run` with its own configuration; the
# package's own system service is not used (Debian enables it; containers have no systemd).
if [ -n "$janus" ] && [ ! -x /usr/bin/janus ]; then
    apt_install janus
fi
# PostgreSQL for the storage tests: Debian keeps initdb/pg_ctl in /usr/lib/postgresql/<major>/bin.
if [ -n "$postgres" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    apt_install postgresql
fi
