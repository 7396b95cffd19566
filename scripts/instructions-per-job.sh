#!/usr/bin/env bash
# Instructions the control plane spends per job, counted by callgrind:
#   scripts/instructions-per-job.sh KNOCKER_BIN [JOBS] [CONNECTIONS]
# The embedded store, the HTTP ingress, JOBS POSTs (a 58-byte JSON body, Knocker-Host a
# `knocker echo --quiet` sink, a fresh id each) from CONNECTIONS keep-alive connections;
# counted from start-up over the load and the drain (until the status URL says no tasks
# are left). Instruction counts repeat for the same binary and input whatever else the
# machine is doing, so two builds can be compared on a noisy machine, one after the
# other: for A/B of a change, not a measure of the product (`make bench` is that).
# Needs valgrind (Debian's package), curl and python3.
set -euo pipefail
bin=${1:?knocker binary}
jobs=${2:-5000}
connections=${3:-16}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http=$(free_port); grpc=$(free_port); sink=$(free_port)

"$bin" echo --addr "127.0.0.1:$sink" --quiet > /dev/null 2>&1 &
KNOCKER_HTTP_ADDR=127.0.0.1:$http KNOCKER_GRPC_ADDR=127.0.0.1:$grpc KNOCKER_DATA_DIR=$work/data \
  SCHEME=http KNOCKER_OUTBOUND_ALLOW=127.0.0.0/8 LOG_LEVEL=warning \
  valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" "$bin" serve \
  > "$work/log" 2>&1 &
pid=$!
for _ in $(seq 300); do curl -sf "127.0.0.1:$http/knocker/status" > /dev/null && break; sleep 0.2; done

python3 - "$http" "$sink" "$jobs" "$connections" <<'EOF'
import http.client, sys, threading
port, sink, total, connections = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
body = b'{"event":"order.created","order":12345,"amount":"19.99"}'.ljust(58)
lock, sent = threading.Lock(), [0]
def client():
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while True:
        with lock:
            if sent[0] >= total:
                return
            sent[0] += 1
        c.request("POST", "/hook", body, {"Knocker-Host": "127.0.0.1:" + sink,
                                          "Content-Type": "application/json"})
        r = c.getresponse(); r.read()
        if r.status != 200:
            sys.exit(f"the control plane answered {r.status}")
threads = [threading.Thread(target=client) for _ in range(connections)]
for t in threads: t.start()
for t in threads: t.join()
EOF

tasks() { curl -sf "127.0.0.1:$http/knocker/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tasks"])'; }
for _ in $(seq 600); do [[ $(tasks) == 0 ]] && break; sleep 0.5; done
[[ $(tasks) == 0 ]] || { echo "jobs were still pending after 5 minutes" >&2; exit 1; }
kill -TERM "$pid"; wait "$pid" || true

total=$(callgrind_annotate "$work/callgrind.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
awk -v t="$total" -v n="$jobs" 'BEGIN { printf "%d instructions in all, %.1fk per job (%d jobs)\n", t, t / n / 1000, n }'
