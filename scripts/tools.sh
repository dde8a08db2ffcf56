#!/usr/bin/env bash
# Installs the pinned tools that plugins in other languages need, into .tools/ (git-ignored),
# and reuses what is already there. Pins: tools/requirements.txt (Python),
# tools/package.json + package-lock.json (JavaScript).
set -euo pipefail
cd "$(dirname "$0")/.."
T=.tools
mkdir -p "$T"

# Python: componentize-py in a virtualenv.
if ! cmp -s tools/requirements.txt "$T/venv/.installed" 2>/dev/null; then
  echo "tools: installing $(tr '\n' ' ' < tools/requirements.txt)into $T/venv" >&2
  rm -rf "$T/venv"
  python3 -m venv "$T/venv"
  "$T/venv/bin/pip" install --quiet --disable-pip-version-check -r tools/requirements.txt
  cp tools/requirements.txt "$T/venv/.installed"
fi

# JavaScript: componentize-js from the lock file.
if ! cmp -s tools/package-lock.json "$T/node/.installed" 2>/dev/null; then
  echo "tools: installing @bytecodealliance/componentize-js into $T/node" >&2
  rm -rf "$T/node"
  mkdir -p "$T/node"
  cp tools/package.json tools/package-lock.json "$T/node/"
  # `npm ci` trips over optional per-platform packages missing from the lock; install honours the lock too.
  (cd "$T/node" && npm install --no-audit --no-fund --loglevel=error)
  cp tools/package-lock.json "$T/node/.installed"
fi
