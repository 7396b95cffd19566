# syntax=docker/dockerfile:1
# The control plane image: docker build -t knocker .
# `make image` runs the same steps without a container engine (scripts/image.sh) and
# tests/e2e/images.rs starts what they produce as this image would (its user, its
# environment, its command) and runs its health check.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p knocker \
 && strip -o /knocker target/release/knocker

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/knocker \
 && chown 65532:65532 /var/lib/knocker
COPY --from=build /knocker /usr/local/bin/knocker
USER 65532:65532
# Listens beyond loopback: it starts only with KNOCKER_ADMIN_TOKEN and KNOCKER_GRPC_TOKEN
# (from a Secret), or KNOCKER_INSECURE_NO_TOKEN=true where a network policy keeps callers out.
ENV KNOCKER_HTTP_ADDR=0.0.0.0:8000 \
    KNOCKER_GRPC_ADDR=0.0.0.0:9090 \
    KNOCKER_DATA_DIR=/var/lib/knocker
VOLUME /var/lib/knocker
EXPOSE 8000 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD ["knocker", "status", "--url", "http://127.0.0.1:8000"]
ENTRYPOINT ["knocker"]
CMD ["serve"]
