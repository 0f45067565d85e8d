#!/usr/bin/env bash
# The main job: signaling server + Janus media server + a bot worker on loopback. Prints the teacher and
# student links. Installs only what the server and the bot need; scripts/test.sh adds the training and test tools.
# Extra flags go to `python -m bot run` (see --help), e.g. scripts/run.sh --server-port 9000
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-janus
exec .venv/bin/python -m bot run "$@"
