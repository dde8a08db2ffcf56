#!/usr/bin/env bash
# Installs the pinned tools the plugin builds and the tests need, into .tools/ (git-ignored)
# (Debian packages — the C compiler, redis-server — come from apt),
# and reuses what is already there. Pins: tools/requirements.txt (Python),
# tools/package.json + package-lock.json (JavaScript), the lists below (C).
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

# From Debian: clang 14 with wasi-libc and the wasm32 compiler runtime (C plugins), and
# redis-server (the tests start their own on a free port)...
packages=(clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32 redis-server)
if ! dpkg -s "${packages[@]}" > /dev/null 2>&1; then
  echo "tools: installing ${packages[*]} (apt)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${packages[@]}" > /dev/null
fi

# ...and wasm-tools + wit-bindgen from crates.io, pinned, into .tools/cargo.
cargo_tools=("wasm-tools@1.263.0" "wit-bindgen-cli@0.61.1")
if ! cmp -s <(printf '%s\n' "${cargo_tools[@]}") "$T/cargo/.installed" 2>/dev/null; then
  echo "tools: building ${cargo_tools[*]} into $T/cargo (a few minutes, once)" >&2
  cargo install --locked --quiet --root "$T/cargo" "${cargo_tools[@]}"
  printf '%s\n' "${cargo_tools[@]}" > "$T/cargo/.installed"
fi

# tansu, a Kafka-protocol broker in Rust, for the cluster tests (about 10 minutes, once).
tansu="tansu@0.6.0 --features libsql,dynostore"
if ! [ -x "$T/tansu/bin/tansu" ] || ! cmp -s <(echo "$tansu") "$T/tansu/.installed" 2>/dev/null; then
  echo "tools: building $tansu into $T/tansu (about 10 minutes, once)" >&2
  # shellcheck disable=SC2086 # the pin is a crate and its feature flags
  cargo install --locked --quiet --root "$T/tansu" $tansu
  echo "$tansu" > "$T/tansu/.installed"
fi
