# Multi-stage build of the txnflow binary (same features as CI's build).
FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends libpq-dev libssl-dev pkg-config && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked --bin txnflow

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libpq5 libssl3 ca-certificates curl && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/txnflow /usr/local/bin/txnflow
COPY config /etc/txnflow/config
WORKDIR /etc/txnflow
USER 65534
ENTRYPOINT ["txnflow"]
