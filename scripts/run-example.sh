#!/usr/bin/env bash
# The quick start: builds the example plugins (installing the wasm32-wasip2 target if it is
# missing) and `weir`, then runs `enrich` over examples/events.jsonl (10,000 events with
# malformed records and duplicates) on embedded defaults, no services needed.
# Outputs, dead letters, state and the summary go to out/ (cleared first).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/build-plugins.sh rust
cargo build --locked -p weir-host --bin weir
rm -rf out
./target/debug/weir run \
  --plugin target/wasm32-wasip2/release/enrich.wasm \
  --input examples/events.jsonl \
  --id /id \
  --output out/enriched.jsonl \
  --dlq out/dlq.jsonl \
  --state out/state \
  --summary-json out/summary.json
echo
echo "outputs:      out/enriched.jsonl ($(wc -l < out/enriched.jsonl) records)"
echo "dead letters: out/dlq.jsonl (inspect with: ./target/debug/weir dlq list --dlq out/dlq.jsonl)"
echo "summary:      out/summary.json"
