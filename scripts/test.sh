#!/usr/bin/env bash
# Runs every test, installing what the tests need first. CI runs this (via .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
stage() { echo "== $1 ($((SECONDS - start)) s elapsed)"; }

stage "toolchain components"
rustup component list --installed | grep -q '^clippy' || rustup component add clippy
rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt

stage "plugins (wasm32-wasip2)"
bash scripts/build-plugins.sh

stage "format"
cargo fmt --all --check
cargo fmt --all --check --manifest-path plugins/Cargo.toml

stage "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --locked --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --target-dir target -- -D warnings

stage "tests: plugin logic (native)"
cargo test --locked --manifest-path plugins/Cargo.toml --target-dir target -p enrich-core

stage "tests: host, SDK and integration"
cargo test --workspace --locked

stage "done"
