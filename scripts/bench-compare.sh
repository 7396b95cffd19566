#!/usr/bin/env bash
# Two builds of the control plane side by side, in one run, taking turns:
#   scripts/bench-compare.sh OLD_KNOCKER_BIN NEW_KNOCKER_BIN [ROUNDS] [SECONDS]
# For each build and round: a fresh data directory, the embedded store, the HTTP ingress
# driven by wrk (-t1 -c50, POSTs with Knocker-Host and a fresh id each), delivery off
# (acceptance alone) and on (to a `knocker echo` sink). Prints accepted/s and the control
# plane's CPU time per accepted job (user + system, from /proc), with the medians and
# the new/old ratios. For checking that a change costs nothing; `make bench` measures the
# product.
set -euo pipefail
old=${1:?old knocker binary}
new=${2:?new knocker binary}
rounds=${3:-3}
seconds=${4:-8}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

cat > "$work/post.lua" <<'EOF'
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("POST", "/hook", {["Knocker-Host"] = host_port, ["Knocker-Scheme"] = "http",
    ["Knocker-Id"] = string.format("%d-%d", os.time(), counter)}, "hello")
end
EOF

sink_port=$(free_port)
"$new" echo --addr "127.0.0.1:$sink_port" --quiet &
sleep 0.5

run() { # binary delivery → "accepted/s cpu_us_per_job"
  local bin=$1 delivery=$2 http grpc dir pid before after accepted
  http=$(free_port); grpc=$(free_port); dir=$(mktemp -d -p "$work")
  KNOCKER_HTTP_ADDR=127.0.0.1:$http KNOCKER_GRPC_ADDR=127.0.0.1:$grpc KNOCKER_DATA_DIR=$dir \
    KNOCKER_DELIVERY=$delivery KNOCKER_OUTBOUND_ALLOW=127.0.0.0/8 LOG_LEVEL=warning \
    "$bin" serve > "$dir/log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do curl -sf "127.0.0.1:$http/knocker/status" > /dev/null && break; sleep 0.05; done
  before=$(cpu_ticks "$pid")
  sed "1i host_port = \"127.0.0.1:$sink_port\"" "$work/post.lua" > "$dir/post.lua"
  accepted=$(wrk -t1 -c50 -d"${seconds}s" -s "$dir/post.lua" "http://127.0.0.1:$http" \
    | awk '/Requests\/sec/ {print $2}')
  after=$(cpu_ticks "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  awk -v a="$accepted" -v t=$((after - before)) -v hz="$hz" -v s="$seconds" \
    'BEGIN { printf "%.0f %.1f\n", a, (t / hz) * 1e6 / (a * s) }'
}

median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

declare -A acc cpu
printf '| round | set-up | old accepted/s | new accepted/s | old CPU µs/job | new CPU µs/job |\n'
printf '| ---: | --- | ---: | ---: | ---: | ---: |\n'
for r in $(seq "$rounds"); do
  for delivery in off on; do
    # Alternate which build goes first, so drift hits both alike.
    if (( r % 2 )); then order="old new"; else order="new old"; fi
    for which in $order; do
      bin=$old; [[ $which == new ]] && bin=$new
      read -r a c < <(run "$bin" "$delivery")
      acc[$which-$delivery]+="$a "; cpu[$which-$delivery]+="$c "
      eval "last_$which=\"$a $c\""
    done
    read -r oa oc <<< "$last_old"; read -r na nc <<< "$last_new"
    printf '| %s | delivery %s | %s | %s | %s | %s |\n' "$r" "$delivery" "$oa" "$na" "$oc" "$nc"
  done
done
echo
for delivery in off on; do
  oa=$(tr ' ' '\n' <<< "${acc[old-$delivery]}" | grep . | median)
  na=$(tr ' ' '\n' <<< "${acc[new-$delivery]}" | grep . | median)
  oc=$(tr ' ' '\n' <<< "${cpu[old-$delivery]}" | grep . | median)
  nc=$(tr ' ' '\n' <<< "${cpu[new-$delivery]}" | grep . | median)
  awk -v d="$delivery" -v oa="$oa" -v na="$na" -v oc="$oc" -v nc="$nc" 'BEGIN {
    printf "delivery %s, medians: accepted/s %d → %d (new/old %.2f); CPU per job %.1f → %.1f µs (new/old %.2f)\n",
      d, oa, na, na / oa, oc, nc, nc / oc }'
done
