#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit tests, integration tests (real etcd
# processes and real HTTP backends on ephemeral loopback ports), doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
command -v etcd >/dev/null || { echo "etcd not found after install" >&2; exit 1; }
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
cargo test --doc --locked
