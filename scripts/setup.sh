#!/usr/bin/env bash
# Create .venv and install classmood with its test tools. Idempotent: a second run is quick.
# Usage: scripts/setup.sh [--with-browser] [--with-janus]   (Debian's chromium for e2e tests; Debian's janus for meetings)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
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
stamp=".venv/.classmood-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    touch "$stamp"
fi
apt_updated=""
apt_install() {
    [ -n "$apt_updated" ] || { $SUDO apt-get update -qq; apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}
for flag in "$@"; do
    case "$flag" in
        --with-browser)
            # Checks that it runs, not that it exists (Ubuntu's `chromium` package is a stub for a snap).
            /usr/bin/chromium --version >/dev/null 2>&1 || apt_install chromium ;;
        --with-janus)
            # The meeting's media server (Janus VideoRoom), started by `bot run` with its own config; the
            # package's own service is not used (Debian enables it, containers have no systemd).
            [ -x /usr/bin/janus ] || apt_install janus ;;
    esac
done
