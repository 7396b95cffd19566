#!/usr/bin/env bash
# Renders an Envoy file of envoy/ that has variables (sidecar.yaml, gateway.yaml): every
# `${NAME:-default}` becomes the environment's NAME, or the default when NAME is unset or
# empty. The result goes to standard output; Envoy loads it as it is.
#
#   KNOCKER_LISTEN_PORT=15006 KNOCKER_APP_PORT=3000 \
#     scripts/envoy-config.sh envoy/sidecar.yaml > /etc/envoy/envoy.yaml
#
# Each file's header lists its variables and what they mean.
set -euo pipefail
if [[ $# -ne 1 || ! -f "$1" ]]; then
  echo "usage: $0 envoy/FILE.yaml > envoy.yaml   (variables from the environment)" >&2
  exit 2
fi
exec perl -pe '
  s/\$\{([A-Z][A-Z0-9_]*)(?::-([^\}]*))?\}/
    (defined $ENV{$1} && $ENV{$1} ne "") ? $ENV{$1}
      : defined $2 ? $2
      : die "$ARGV line $.: $1 is not set and has no default\n"
  /gex' "$1"
