# pgshard router image: build with the Rust toolchain, run on a slim Debian.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin pgshard --bin shardctl

FROM debian:bookworm-slim
RUN useradd --system pgshard
COPY --from=build /src/target/release/pgshard /src/target/release/shardctl /usr/local/bin/
USER pgshard
EXPOSE 6432 9930
ENTRYPOINT ["pgshard", "--config", "/etc/pgshard/pgshard.toml"]
