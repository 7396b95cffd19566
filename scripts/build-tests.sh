#!/usr/bin/env bash
# `make test`'s test build: the workspace's tests, compiled against the control plane
# `make build` made, not a second one.
#
# `cargo build -p knocker` resolves each dependency's features for the control plane
# alone; the test build resolves them for the whole workspace. Where one dependency
# gets other features there (a test crate taking a shared dependency with its default
# features, say), cargo compiles that dependency, the knocker library and the binary a
# second time — minutes — and `target/release/knocker` is replaced by a binary other
# than the one `make build` made and `make image` packed. Nothing else would notice, so
# this fails then, naming the fix. A second compile makes a new file under
# target/release/deps, which cargo links in place of the binary: its inode changes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CARGO="${CARGO:-cargo}"
BIN=target/release/knocker
[ -x "$BIN" ] || { echo "error: $BIN is missing: run \`make build\` first" >&2; exit 1; }
before=$(stat -c %i "$BIN")
"$CARGO" test --release --workspace --no-run
after=$(stat -c %i "$BIN")
if [ "$before" != "$after" ]; then
    cat >&2 <<'EOF'
error: the test build compiled the control plane again and replaced target/release/knocker:
  a dependency resolves with other features for the workspace's tests than for
  `cargo build --release -p knocker`. It is among the crates compiled above that are not
  the workspace's own; `cargo tree -e features -i <crate>`, with `-p knocker` and then with
  `--workspace`, shows who asks for what. Give it the same features on both sides (the
  workspace's [workspace.dependencies], or `default-features = false` in tests/Cargo.toml).
EOF
    exit 1
fi
