#!/usr/bin/env bash
# System calls per proxied request: nginx, HAProxy and switchyard (1 worker/thread each, pinned to
# core 0, same two nginx backends on core 1), each traced with `strace -c -f` while wrk sends
# BENCH_DURATION [3] seconds of keep-alive load. strace slows the proxy down a lot; only the
# per-request counts mean anything, not the rates.
#
# With BENCH_THREADS=2 each proxy gets 2 workers/threads and nothing is pinned (the unpinned
# variant of throughput.sh); every worker process is traced.
#
# Environment: BENCH_DURATION [3], BENCH_CONNS [50], BENCH_THREADS [1], SWITCHYARD_BIN, BENCH_OUT,
# BENCH_KEEP=1.
set -euo pipefail
source "$(dirname "$0")/common.sh"

DURATION="${BENCH_DURATION:-3}"
CONNS="${BENCH_CONNS:-50}"
THREADS="${BENCH_THREADS:-1}"
((DURATION >= 1 && DURATION <= 60)) || die "BENCH_DURATION must be 1..60"
((THREADS >= 1 && THREADS <= 2)) || die "BENCH_THREADS must be 1 or 2"
if ((THREADS == 1)); then
    PROXY_CPUS=0 LOAD=(taskset -c 1)
else
    PROXY_CPUS="" LOAD=()
fi
"$BENCH_ROOT/scripts/install-deps.sh" wrk nginx haproxy strace util-linux
BIN=$(switchyard_bin)
log "$(machine_line)"

start_bench_backends "${PROXY_CPUS:+1}"
start_bench_proxies "$THREADS" "$PROXY_CPUS" "$WORK/switchyard.toml"
# nginx's workers, not its master, do the proxying
NGINX_WORKERS=$(pgrep -P "$NGINX_PID" | paste -sd,)

ROWS="$WORK/rows.tsv"
: >"$ROWS"
for target in nginx:"$NGINX_WORKERS":"$NP" haproxy:"$HAPROXY_PID":"$HP" switchyard:"$SY_PID":"$SP"; do
    IFS=: read -r name pids port <<<"$target"
    "${LOAD[@]}" wrk -t1 -c"$CONNS" -d1s -H 'Host: bench' "http://127.0.0.1:$port/" >/dev/null
    traced=()
    for pid in ${pids//,/ }; do traced+=(-p "$pid"); done
    strace -c -f -q -o "$WORK/strace-$name.txt" "${traced[@]}" &
    st=$!
    PIDS+=("$st")
    sleep 0.5
    "${LOAD[@]}" wrk -t1 -c"$CONNS" -d"${DURATION}s" -H 'Host: bench' "http://127.0.0.1:$port/" >"$WORK/wrk-$name.txt"
    sleep 0.2
    kill -INT "$st" 2>/dev/null || true
    wait "$st" 2>/dev/null || true
    python3 - "$name" "$WORK/wrk-$name.txt" "$WORK/strace-$name.txt" >>"$ROWS" <<'PY'
import re, sys
name, wrk, st = sys.argv[1:]
reqs = int(re.search(r"(\d+) requests in", open(wrk).read()).group(1))
calls = {}
for line in open(st):
    f = line.split()
    if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
        calls[f[-1]] = int(f[3])
total = sum(calls.values())
top = sorted(calls.items(), key=lambda kv: -kv[1])[:6]
print(f"{name}\t{reqs}\t{total/reqs:.2f}\t" + ", ".join(f"{k} {v/reqs:.2f}" for k, v in top))
PY
done
python3 - "$ROWS" <<'PY' | tee "${BENCH_OUT:-/dev/null}"
import sys
print("| proxy | requests traced | syscalls per request | top calls per request |")
print("| --- | ---: | ---: | --- |")
for line in open(sys.argv[1]):
    name, reqs, per, top = line.rstrip("\n").split("\t")
    print(f"| {name} | {reqs} | {per} | {top} |")
PY
