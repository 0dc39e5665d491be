# syntax=docker/dockerfile:1
# pingme's container image: `pingme` (the server) and `pingme-loadgen`.
#
#   docker build -t pingme:dev --build-arg PINGME_GIT_COMMIT="$(git rev-parse HEAD)" .
#
# Three stages: cargo-chef writes a recipe of the workspace's dependencies,
# the builder compiles that recipe first (a Docker layer that stays cached
# until Cargo.toml or Cargo.lock change), then the workspace; the runtime
# stage is Debian slim with the two binaries, run as an unprivileged user.
# Not built on the development machines (no image registry is reachable
# there); CI lints this file with hadolint (.ci/deploy-check.sh).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS chef
# Build tools for the C parts of the dependency tree (mimalloc, and
# librdkafka, which rdkafka-sys builds from source with configure + make).
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential pkg-config zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# Dependencies only: this layer is reused until the lock file changes.
RUN cargo chef cook --release --locked --recipe-path recipe.json \
    -p pingme-gateway -p pingme-loadgen
COPY . .
# The build context has no .git (see .dockerignore): the commit shown by
# `pingme version` and GET /version comes from the build argument.
ARG PINGME_GIT_COMMIT=unknown
ENV PINGME_GIT_COMMIT=${PINGME_GIT_COMMIT}
RUN cargo build --release --locked -p pingme-gateway --bin pingme \
    && cargo build --release --locked -p pingme-loadgen --bin pingme-loadgen

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: the push webhook and OTLP endpoints may be https.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 pingme \
    && useradd --system --uid 10001 --gid pingme --home-dir /var/lib/pingme --shell /usr/sbin/nologin pingme \
    && install -d -o pingme -g pingme -m 0750 /var/lib/pingme
COPY --from=builder /src/target/release/pingme /src/target/release/pingme-loadgen /usr/local/bin/
# Listeners on all interfaces, embedded store under /var/lib/pingme; the
# compose file mounts its own configuration over this one.
COPY deploy/pingme.yaml /etc/pingme/pingme.yaml
USER 10001:10001
WORKDIR /var/lib/pingme
VOLUME ["/var/lib/pingme"]
# 7000 TCP, 7443 TLS (tcp) and QUIC (udp), 8080 HTTP API and WebSocket,
# 9093 metrics and health (keep it on a private network).
EXPOSE 7000/tcp 7443/tcp 7443/udp 8080/tcp 9093/tcp
ENV APP_CONF=/etc/pingme/pingme.yaml
ENTRYPOINT ["pingme"]
CMD ["serve"]
