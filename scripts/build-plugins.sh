#!/usr/bin/env bash
# Builds the plugins into target/wasm32-wasip2/release/:
#   enrich, metrics, filter, split, faulty, faulty_stateful   Rust (the plugins/ workspace; installs the wasm32-wasip2 target if missing)
#   enrich-python, metrics-python   Python, componentize-py   (with `all`)
#   enrich-js                       JavaScript, componentize-js (with `all`)
#   enrich-c                        C, clang + wit-bindgen + wasm-tools (with `all`)
# Usage: build-plugins.sh [rust|all]   (default: all). Tools come from scripts/tools.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:-all}
out=target/wasm32-wasip2/release

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  echo "build-plugins: installing the wasm32-wasip2 target" >&2
  rustup target add wasm32-wasip2
fi
cargo build --release --locked --target wasm32-wasip2 \
  --manifest-path plugins/Cargo.toml --target-dir target
built=(enrich metrics filter split faulty faulty_stateful)

if [ "$which" = all ]; then
  bash scripts/tools.sh
  # Rebuild only when a source or the contract changed.
  stale() { [ ! -f "$1" ] || [ -n "$(find "${@:2}" -newer "$1" -type f | head -n 1)" ]; }
  # Python plugins: (name, world); each is plugins/python/<name>/app.py plus the shared
  # modules in plugins/python/common.
  for entry in enrich:batch metrics:stateful; do
    name=${entry%%:*} world=${entry#*:}
    if stale "$out/$name-python.wasm" "plugins/python/$name" plugins/python/common wit tools/requirements.txt; then
      .tools/venv/bin/componentize-py --quiet -d wit -w "$world" componentize \
        -p "plugins/python/$name" -p plugins/python/common app -o "$out/$name-python.wasm"
    fi
  done
  if stale "$out/enrich-js.wasm" plugins/js/enrich wit tools/package-lock.json; then
    .tools/node/node_modules/.bin/componentize-js plugins/js/enrich/enrich.js \
      --wit wit --world-name per-record --disable http fetch-event -o "$out/enrich-js.wasm"
  fi
  if stale "$out/enrich-c.wasm" plugins/c/enrich wit; then
    c=target/c-enrich
    rm -rf "$c" && mkdir -p "$c"
    .tools/cargo/bin/wit-bindgen c wit --world per-record --out-dir "$c/bindings" > /dev/null
    cargo run --quiet --locked -p wasi-adapter -- "$c/wasi_snapshot_preview1.reactor.wasm"
    clang-14 --target=wasm32-wasi -O2 -Wall -Wextra -Werror -mexec-model=reactor -I"$c/bindings" \
      plugins/c/enrich/enrich.c "$c/bindings/per_record.c" "$c/bindings/per_record_component_type.o" \
      -o "$c/enrich.core.wasm"
    .tools/cargo/bin/wasm-tools component new "$c/enrich.core.wasm" \
      --adapt "wasi_snapshot_preview1=$c/wasi_snapshot_preview1.reactor.wasm" -o "$out/enrich-c.wasm"
  fi
  built+=(enrich-python metrics-python enrich-js enrich-c)
fi
for p in "${built[@]}"; do
  ls -l "$out/$p.wasm" >&2
done
