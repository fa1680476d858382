#!/usr/bin/env bash
# switchyard's fault suite (issue 17): the real release binary, a real etcd and real instances
# (single-process nginx), load from wrk, one fault per scenario, one verdict line per scenario:
#
#   PASS  etcd killed and restarted    20000 requests, 0 failed, ...; view = etcd 0.05 s after ...
#
# Scenarios (all by default, or name some): etcd-killed etcd-stopped compaction etcd-wiped
# big-catch-up own-address hung-instance slow-clients storm storm-unbounded dns-failure.
# The whole run takes about 2.5 minutes; each scenario is bounded at 120 s. Exit status 1 when a
# scenario fails. Not part of scripts/test.sh: an operator's check of a build.
# Opt-in (run only when named): soak, FAULTS_SOAK_S seconds (600) of paced load on two services,
# a registration and a deregistration a second, an instance SIGKILLed every 15 s and etcd every
# 60 s; sampled every 10 s (RSS, descriptors, threads, sockets, gauges, errors, p99), the table
# printed before its verdict.
#
# Needs: etcd (etcd-server), nginx, wrk, python3, prlimit and unshare (util-linux), root for the
# DNS scenario (a mount namespace with its own /etc/hosts); what is missing is installed with apt.
# Everything listens on 127.0.0.1 on ephemeral ports; processes are stopped by pid.
#
# Environment: SWITCHYARD_BIN (a binary to test instead of building target/release/switchyard),
# FAULTS_KEEP=1 (keep the work directory with every log), FAULTS_SOAK_S (the soak's seconds).
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/install-deps.sh nginx wrk util-linux >&2
for tool in etcd nginx wrk python3 prlimit unshare; do
    command -v "$tool" >/dev/null || { echo "faults: $tool not found after install" >&2; exit 1; }
done
if [[ -n "${SWITCHYARD_BIN:-}" ]]; then
    bin="$SWITCHYARD_BIN"
else
    cargo build --quiet --release --bin switchyard >&2
    bin=target/release/switchyard
fi
keep=()
[[ "${FAULTS_KEEP:-0}" == 1 ]] && keep=(--keep)
echo "faults: $("$bin" --version 2>/dev/null || echo "$bin"), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
exec python3 scripts/faults/faults.py --bin "$bin" "${keep[@]}" "$@"
