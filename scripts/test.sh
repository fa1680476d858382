#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit tests, integration tests (real etcd
# processes and real HTTP backends on ephemeral loopback ports). Ends with one summary line,
# "tests: N passed, M failed in S s" (the whole run, checks included).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
scripts/install-deps.sh
command -v etcd >/dev/null || { echo "etcd not found after install" >&2; exit 1; }
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --all-targets --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed", p, f }' "$log"
echo " in $((SECONDS - started)) s"
exit "$status"
