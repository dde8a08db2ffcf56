#!/usr/bin/env bash
# Runs every test, installing what the tests need first. CI runs this (via .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
stage() { echo "== $1 ($((SECONDS - start)) s elapsed)"; }

# A CI run once ran out of disk while linking tests; say how much there is.
echo "disk free where the build goes: $(df -h --output=avail . | tail -1 | tr -d ' ')"

stage "toolchain components"
rustup component list --installed | grep -q '^clippy' || rustup component add clippy
rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt

stage "tools and plugins (wasm32-wasip2)"
bash scripts/tools.sh
bash scripts/build-plugins.sh

stage "format"
cargo fmt --all --check
cargo fmt --all --check --manifest-path plugins/Cargo.toml

stage "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --locked --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --target-dir target -- -D warnings

log=target/test-output.log
mkdir -p target && : > "$log"
# Every test binary runs even when one fails (--no-fail-fast); the failures are listed at the
# end and the script then exits non-zero.
failed=0
stage "tests: plugin logic (native)"
cargo test --locked --no-fail-fast --manifest-path plugins/Cargo.toml --target-dir target \
  -p enrich-core -p metrics-core 2>&1 | tee -a "$log" || failed=1

# The cluster and exactly-once tests start an Apache Kafka (Java) and a Redis of their own.
stage "tests: host, SDK and integration (against a real Apache Kafka and Redis)"
cargo test --workspace --locked --no-fail-fast 2>&1 | tee -a "$log" || failed=1

# One closing line for every test run above.
sum() { grep -E '^test result:' "$log" | grep -oE "[0-9]+ $1" | awk '{ n += $1 } END { print n + 0 }'; }
if [ "$failed" -ne 0 ] || grep -qE '^test .* FAILED$' "$log"; then
  echo "failed tests:"
  grep -E '^test .* FAILED$' "$log" | sed 's/^test /  /; s/ \.\.\. FAILED$//' || true
  grep -E '^error: .*(target|test).* failed' -A20 "$log" | grep -E '^\s+`' || true
  failed=1
fi
echo "target/ takes $(du -sh target | cut -f1)"
stage "done"
echo "tests: $(sum passed) passed, $(sum failed) failed"
exit "$failed"
