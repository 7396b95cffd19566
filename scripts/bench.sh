#!/usr/bin/env bash
# `make bench`: runs the benchmarks and writes docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo run -q --release -p knocker-e2e --bin knocker-bench
