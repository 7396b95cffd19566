#!/usr/bin/env bash
# `make image`: the images' contents without a container engine.
#   target/image/control-plane/rootfs  what the Dockerfile's final stage holds of ours:
#                                      /usr/local/bin/knocker (stripped) and its data dir
#   target/oci/knocker-filter          the filter's OCI image (scripts/oci-filter.sh)
# With an engine: docker build -t knocker . ; docker build -f deploy/filter.Dockerfile .
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ROOTFS=target/image/control-plane/rootfs
rm -rf "$ROOTFS"
mkdir -p "$ROOTFS/usr/local/bin" "$ROOTFS/var/lib/knocker"
strip -o "$ROOTFS/usr/local/bin/knocker" target/release/knocker
echo "built $ROOTFS ($(du -h "$ROOTFS/usr/local/bin/knocker" | cut -f1) knocker)"
scripts/oci-filter.sh
