#!/usr/bin/env bash
# The filter as an OCI image in the "compat" layout Istio's WasmPlugin, Envoy Gateway's
# EnvoyExtensionPolicy and `oci://` URLs read: FROM scratch, one layer holding
# /plugin.wasm (what deploy/filter.Dockerfile builds with a container engine), written
# here as an OCI image layout without one, byte for byte reproducible:
#
#   scripts/oci-filter.sh [WASM] [OUT]    # defaults: target/wasm/knocker_filter.wasm, target/oci/knocker-filter
#
# Push it with skopeo or oras, e.g.
#   skopeo copy oci:target/oci/knocker-filter:0.1.0 docker://registry.example/knocker-filter:0.1.0
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WASM="${1:-$ROOT/target/wasm/knocker_filter.wasm}"
OUT="${2:-$ROOT/target/oci/knocker-filter}"
VERSION="$(grep -m1 '^version' "$ROOT/Cargo.toml" | cut -d'"' -f2)"
[[ -f "$WASM" ]] || { echo "no filter at $WASM: run scripts/build-filter.sh first" >&2; exit 1; }
python3 - "$WASM" "$OUT" "$VERSION" <<'PY'
import gzip, hashlib, io, json, os, shutil, sys, tarfile

wasm_path, out, version = sys.argv[1:4]
wasm = open(wasm_path, "rb").read()

# One layer: /plugin.wasm, owned by root, mode 0444, time 0 (reproducible).
raw = io.BytesIO()
with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
    info = tarfile.TarInfo("plugin.wasm")
    info.size, info.mode, info.mtime, info.uid, info.gid = len(wasm), 0o444, 0, 0, 0
    tar.addfile(info, io.BytesIO(wasm))
layer_tar = raw.getvalue()
zipped = io.BytesIO()
with gzip.GzipFile(fileobj=zipped, mode="wb", mtime=0, compresslevel=9) as gz:
    gz.write(layer_tar)
layer = zipped.getvalue()

def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()

config = json.dumps({
    "architecture": "amd64", "os": "linux",
    "config": {}, "created": "1970-01-01T00:00:00Z",
    "rootfs": {"type": "layers", "diff_ids": [digest(layer_tar)]},
    "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "COPY plugin.wasm /plugin.wasm"}],
}, sort_keys=True, separators=(",", ":")).encode()
manifest = json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config), "size": len(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(layer), "size": len(layer)}],
    "annotations": {
        "org.opencontainers.image.title": "knocker-filter",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.description": "Knocker for Envoy: the proxy-wasm filter (/plugin.wasm)",
    },
}, sort_keys=True, separators=(",", ":")).encode()
index = json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest(manifest), "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": version},
    }],
}, sort_keys=True, indent=2).encode()

shutil.rmtree(out, ignore_errors=True)
blobs = os.path.join(out, "blobs", "sha256")
os.makedirs(blobs)
for blob in (layer, config, manifest):
    with open(os.path.join(blobs, hashlib.sha256(blob).hexdigest()), "wb") as f:
        f.write(blob)
with open(os.path.join(out, "oci-layout"), "w") as f:
    f.write('{"imageLayoutVersion":"1.0.0"}')
with open(os.path.join(out, "index.json"), "wb") as f:
    f.write(index)
print(f"built {out} (knocker-filter:{version}, manifest {digest(manifest)})")
PY
