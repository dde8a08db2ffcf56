#!/usr/bin/env bash
# Builds the example and test plugins (plugins/, a wasm32-wasip2 workspace) into
# target/wasm32-wasip2/release/*.wasm. Installs the wasm32-wasip2 target when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  echo "build-plugins: installing the wasm32-wasip2 target" >&2
  rustup target add wasm32-wasip2
fi
cargo build --release --locked --target wasm32-wasip2 \
  --manifest-path plugins/Cargo.toml --target-dir target
for p in enrich filter split faulty; do
  ls -l "target/wasm32-wasip2/release/$p.wasm" >&2
done
