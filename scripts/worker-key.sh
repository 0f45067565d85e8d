#!/usr/bin/env bash
# Prints the bot worker key for scripts/run.sh: CLASSMOOD_SERVER_WORKER_KEY when given, else the one kept in
# .classmood-worker-key beside the database (made up on first run, mode 0600, reused afterwards). Never the
# public development key: whoever knows the worker key can seat a bot and receive the students' cameras.
set -euo pipefail
if [[ -n "${CLASSMOOD_SERVER_WORKER_KEY:-}" ]]; then
  printf '%s\n' "$CLASSMOOD_SERVER_WORKER_KEY"
  exit 0
fi
url="${CLASSMOOD_STORAGE_URL:-sqlite:///classmood.sqlite}"
dir=.
if [[ "$url" == sqlite:///* ]]; then
  dir="$(dirname "${url#sqlite:///}")"
fi
mkdir -p "$dir"
file="$dir/.classmood-worker-key"
if [[ ! -s "$file" ]]; then
  (umask 077 && head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n' > "$file.tmp" && mv "$file.tmp" "$file")
fi
chmod 600 "$file"
cat "$file"
