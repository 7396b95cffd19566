#!/usr/bin/env bash
# `make run`: the control plane (embedded store under ./data), Envoy with the knocker
# filter in front of a demo target, all on the default loopback ports. Ctrl-C stops all.
# ENVOY_CONFIG picks the Envoy file: envoy/knocker.yaml (default), envoy/capture.yaml or
# envoy/fallback.yaml or envoy/broadcast.yaml; KNOCKER_CONFIG the control plane's file
# (examples/knocker.toml: the broadcast group `caches` of the two demo targets).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p .run
ENVOY_CONFIG="${ENVOY_CONFIG:-envoy/knocker.yaml}"
export KNOCKER_CONFIG="${KNOCKER_CONFIG:-examples/knocker.toml}"
[[ -f "$ENVOY_CONFIG" ]] || { echo "ENVOY_CONFIG: no such file: $ENVOY_CONFIG" >&2; exit 1; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

# Envoy opens its listener before it is ready to serve; its admin /ready says when it is.
wait_envoy_ready() {
  for _ in $(seq 1 200); do
    if exec 3<>/dev/tcp/127.0.0.1/9901 2>/dev/null; then
      printf 'GET /ready HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n' >&3
      local status=""; read -r status <&3 || true; exec 3>&- 3<&-
      [[ "$status" == *" 200"* ]] && return 0
    fi
    sleep 0.1
  done
  echo "Envoy did not become ready" >&2; return 1
}

wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 did not open" >&2; return 1; }

for port in 8000 9090 8080 8081 10000 9901; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use; stop whatever holds it (an earlier 'make run'?)" >&2
    exit 1
  fi
done

target/release/knocker echo --addr 127.0.0.1:8080 2>&1 | sed -u 's/^/[target] /' &
pids+=($!)
target/release/knocker echo --addr 127.0.0.1:8081 2>&1 | sed -u 's/^/[target2] /' &
pids+=($!)
# The demo's targets are on loopback, which client-chosen destinations (Knocker-Host,
# Knocker-Callback) may not reach by default: this demo opens it, on purpose. This
# stack's own ports (8000, 9090, Envoy's admin 9901) stay closed to them.
SCHEME="${SCHEME:-http}" KNOCKER_OUTBOUND_ALLOW="${KNOCKER_OUTBOUND_ALLOW:-127.0.0.0/8}" \
  target/release/knocker serve 2>&1 | sed -u 's/^/[knocker] /' &
pids+=($!)
wait_port 8000; wait_port 9090; wait_port 8080; wait_port 8081
.tools/venv/bin/envoy -c "$ENVOY_CONFIG" --concurrency 2 -l warning --base-id 7001 \
  2>&1 | grep --line-buffered -v "no configured limit to the number of allowed active downstream" | sed -u 's/^/[envoy] /' &
pids+=($!)
wait_envoy_ready

cat <<MSG

Knocker is running ($ENVOY_CONFIG):
  Envoy listener     http://127.0.0.1:10000  (admin :9901)
  control plane      http://127.0.0.1:8000   (gRPC :9090, data in ./data)
  demo targets       http://127.0.0.1:8080 and :8081 (log every request they get;
                     group "caches" in $KNOCKER_CONFIG)

Try it — a Knocker request through Envoy (answered at once, delivered in the background):
  curl -i -X POST -H 'Knocker-Host: 127.0.0.1:8080' -d 'hello' 'http://127.0.0.1:10000/orders?id=1'

Plain traffic passes through untouched:
  curl -i http://127.0.0.1:10000/hello

Broadcast to both demo targets (group "caches"):
  curl -i -X PURGE -H 'Knocker-Broadcast: caches' http://127.0.0.1:10000/page

Status:
  curl -s http://127.0.0.1:10000/knocker/status

Capture and fallback: ENVOY_CONFIG=envoy/capture.yaml make run (or fallback.yaml);
the README has a curl session for each.

Ctrl-C stops everything.
MSG
wait
