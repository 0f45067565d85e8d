#!/usr/bin/env bash
# The main job: signaling server + Janus media server + a bot worker on loopback. Prints the teacher and
# student links. Installs only what the server and the bot need; scripts/test.sh adds the training and test tools.
# Extra flags go to `python -m bot run` (see --help), e.g. scripts/run.sh --server-port 9000
# The worker key: --server-worker-key or CLASSMOOD_SERVER_WORKER_KEY, else a random one kept in
# .classmood-worker-key beside the database (scripts/worker-key.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-janus
if [[ " $* " != *" --server-worker-key"* ]]; then
  CLASSMOOD_SERVER_WORKER_KEY="$(scripts/worker-key.sh)"
  export CLASSMOOD_SERVER_WORKER_KEY
fi
exec .venv/bin/python -m bot run "$@"
