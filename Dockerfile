# The `weir` worker image of docker-compose.yml: the binary and the example plugins.
FROM rust:1.95-bookworm AS build
RUN rustup target add wasm32-wasip2
WORKDIR /src
COPY . .
RUN cargo build --locked --release -p weir-host --bin weir \
 && cargo build --locked --release --manifest-path plugins/Cargo.toml --target wasm32-wasip2 \
      --target-dir target

FROM debian:bookworm-slim
COPY --from=build /src/target/release/weir /usr/local/bin/weir
COPY --from=build /src/target/wasm32-wasip2/release/*.wasm /opt/weir/plugins/
ENTRYPOINT []
CMD ["weir", "--help"]
