#!/usr/bin/env bash
# Installs the pinned tools the plugin builds and the tests need, into .tools/ (git-ignored)
# (Debian packages — the C compiler, redis-server, OpenSSL — come from apt),
# and reuses what is already there. Pins: tools/requirements.txt (Python),
# tools/package.json + package-lock.json (JavaScript), tools/kafka/pom.xml (Apache Kafka),
# tools/jaeger/go.mod (Jaeger),
# the lists below (C).
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

# From Debian: clang 14 with wasi-libc and the wasm32 compiler runtime (C plugins),
# redis-server (the tests start their own on a free port; built with TLS), OpenSSL's headers
# and pkg-config (librdkafka's TLS and SASL, native-tls for Redis), Java 17 and Maven (the
# Kafka broker the tests start), the openssl command (the TLS tests' certificates), and
# Prometheus with promtool (the alert rules' tests; without the node exporter it recommends)...
packages=(clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32 redis-server libssl-dev pkg-config
  openssl openjdk-17-jre-headless maven)
# (`dpkg -s` also succeeds for a package removed with its configuration left: ask for the status.)
installed() { dpkg-query -W -f='${Status}\n' "$@" 2>/dev/null | grep -c '^install ok installed$'; }
if [ "$(installed "${packages[@]}" prometheus)" -ne $((${#packages[@]} + 1)) ]; then
  echo "tools: installing ${packages[*]} prometheus (apt)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${packages[@]}" > /dev/null
  apt-get install -y -qq --no-install-recommends prometheus > /dev/null
fi

# ...wasm-tools and wit-bindgen from crates.io, pinned, into .tools/cargo, with only the
# subcommands the C plugin's build uses (`component new`, `c`): a few minutes, once...
cargo_tools=("wasm-tools@1.263.0 --no-default-features --features component"
  "wit-bindgen-cli@0.61.1 --no-default-features --features c")
if ! cmp -s <(printf '%s\n' "${cargo_tools[@]}") "$T/cargo/.installed" 2>/dev/null; then
  echo "tools: building ${cargo_tools[*]} into $T/cargo (a few minutes, once)" >&2
  for tool in "${cargo_tools[@]}"; do
    # shellcheck disable=SC2086 # the pin is a crate and its feature flags
    cargo install --locked --quiet --root "$T/cargo" $tool
  done
  printf '%s\n' "${cargo_tools[@]}" > "$T/cargo/.installed"
fi

# ...and Apache Kafka's jars from Maven Central (the broker the tests start: a pinned
# dependency list, not a build of ours), into .tools/kafka/libs.
if ! cmp -s tools/kafka/pom.xml "$T/kafka/.installed" 2>/dev/null; then
  echo "tools: fetching Apache Kafka (tools/kafka/pom.xml) into $T/kafka/libs" >&2
  rm -rf "$T/kafka"
  mvn -B -q -f tools/kafka/pom.xml \
    org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$PWD/$T/kafka/libs"
  cp tools/kafka/pom.xml "$T/kafka/.installed"
fi

# Jaeger (the tracing tests' OTLP receiver and trace store) built from the Go module proxy,
# pinned by tools/jaeger/go.mod and go.sum, into .tools/jaeger: about 7 minutes on 2 cores, once.
if ! cmp -s <(cat tools/jaeger/go.mod tools/jaeger/go.sum) "$T/jaeger/.installed" 2>/dev/null; then
  echo "tools: building Jaeger (tools/jaeger/go.mod) into $T/jaeger (about 7 minutes, once)" >&2
  rm -rf "$T/jaeger"
  (cd tools/jaeger && GOFLAGS=-mod=readonly go build -o "$OLDPWD/$T/jaeger/jaeger" \
    github.com/jaegertracing/jaeger/cmd/jaeger)
  cat tools/jaeger/go.mod tools/jaeger/go.sum > "$T/jaeger/.installed"
fi
