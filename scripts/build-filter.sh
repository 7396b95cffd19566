#!/usr/bin/env bash
# Builds the Envoy filter to target/wasm/knocker_filter.wasm.
# Uses rustup's wasm32-unknown-unknown target when installed, otherwise Debian's
# rustc-web with -Zbuild-std (scripts/setup.sh installs it). Each toolchain gets its own
# target dir so the two compilers never share a build cache.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="$ROOT/target/wasm/knocker_filter.wasm"
mkdir -p "$(dirname "$OUT")"

if rustup target list --installed 2>/dev/null | grep -q '^wasm32-unknown-unknown$'; then
  cargo build -q --profile wasm --target wasm32-unknown-unknown -p knocker-filter \
    --target-dir target/wasm-rustup
  cp target/wasm-rustup/wasm32-unknown-unknown/wasm/knocker_filter.wasm "$OUT"
elif [ -x /usr/bin/rustc ] && [ -d /usr/lib/rustlib/src/rust ]; then
  # lld-22 ships as ld.lld-22 / wasm-ld-22; the wasm target wants `rust-lld` or `wasm-ld`.
  LINKER="$(command -v wasm-ld-22 || command -v wasm-ld || true)"
  RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
    CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER="${LINKER:-rust-lld}" \
    /usr/bin/cargo build -q --profile wasm --target wasm32-unknown-unknown \
      -Zbuild-std=std,panic_abort -p knocker-filter --target-dir target/wasm-debian
  cp target/wasm-debian/wasm32-unknown-unknown/wasm/knocker_filter.wasm "$OUT"
else
  echo "no wasm toolchain: run scripts/setup.sh (installs Debian rustc-web) or 'rustup target add wasm32-unknown-unknown'" >&2
  exit 1
fi
echo "built $OUT ($(stat -c %s "$OUT") bytes)"
