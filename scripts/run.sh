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
names=()
cleanup() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts a component with its output prefixed; `$!` after a process substitution is the
# component itself, not the prefixing `sed`, so Ctrl-C and a failure reach the program.
start() {
  local name="$1"; shift
  "$@" > >(sed -u -e "/no configured limit to the number of allowed active downstream/d" \
    -e "s/^/[$name] /") 2>&1 &
  pids+=($!); names+=("$name")
}

# Fails with the component's name and exit code if any started one has stopped.
check_alive() {
  local i
  for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      local code=0; wait "${pids[$i]}" || code=$?
      echo "${names[$i]} stopped (exit code $code); see its output above" >&2
      exit 1
    fi
  done
}

# Envoy opens its listener before it is ready to serve; its admin /ready says when it is.
wait_envoy_ready() {
  for _ in $(seq 1 200); do
    check_alive
    # The braces keep `2>/dev/null` to this exec: on `exec` itself it would hold for the
    # rest of the script and hide every later error.
    if { exec 3<>/dev/tcp/127.0.0.1/9901; } 2>/dev/null; then
      printf 'GET /ready HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n' >&3
      local status=""; read -r status <&3 || true; exec 3>&- 3<&-
      [[ "$status" == *" 200"* ]] && return 0
    fi
    sleep 0.1
  done
  echo "Envoy did not become ready" >&2; exit 1
}

wait_port() {
  for _ in $(seq 1 100); do
    check_alive
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "port $1 did not open" >&2; exit 1
}

for port in 8000 9090 8080 8081 10000 9901; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use; stop whatever holds it (an earlier 'make run'?)" >&2
    exit 1
  fi
done

start target target/release/knocker echo --addr 127.0.0.1:8080
start target2 target/release/knocker echo --addr 127.0.0.1:8081
# The demo's targets are on loopback, which client-chosen destinations (Knocker-Host,
# Knocker-Callback) may not reach by default: this demo opens it, on purpose. This
# stack's own ports (8000, 9090, Envoy's admin 9901) stay closed to them.
start knocker env SCHEME="${SCHEME:-http}" \
  KNOCKER_OUTBOUND_ALLOW="${KNOCKER_OUTBOUND_ALLOW:-127.0.0.0/8}" \
  target/release/knocker serve
wait_port 8000; wait_port 9090; wait_port 8080; wait_port 8081
start envoy .tools/venv/bin/envoy -c "$ENVOY_CONFIG" --concurrency 2 -l warning --base-id 7001
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
docs/guide.md has a session for each.

Ctrl-C stops everything.
MSG
# Until Ctrl-C, or until a component stops on its own (then all stop, non-zero).
interrupted=""
trap 'interrupted=1' INT TERM
set +e
wait -n -p stopped "${pids[@]}"
code=$?
if [[ -n "$interrupted" ]]; then
  echo "stopped"
  exit 130
fi
for i in "${!pids[@]}"; do
  [[ "${pids[$i]}" == "${stopped:-}" ]] && echo "${names[$i]} stopped (exit code $code); see its output above" >&2
done
exit 1
