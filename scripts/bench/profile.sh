#!/usr/bin/env bash
# CPU profile of switchyard under the pinned throughput load: two nginx backends and etcd on core 1,
# switchyard (threads = 1) on core 0, wrk on core 1, `perf record -e cpu-clock` on the switchyard
# pid for BENCH_DURATION seconds [10]. Prints the flat profile (self time, top symbols), the
# process's threads, and with BENCH_CALLGRAPH=fp|dwarf the callers of the top kernel symbols
# (fp: frame pointers, good for kernel stacks; dwarf: user stacks too, heavier).
# perf comes from Debian's linux-perf (installed if missing).
#
# Environment: BENCH_DURATION [10], BENCH_CONNS [50], BENCH_CALLGRAPH [none], SWITCHYARD_BIN,
# BENCH_OUT (copy of the report), BENCH_KEEP=1 (keep perf.data).
set -euo pipefail
source "$(dirname "$0")/common.sh"

DURATION="${BENCH_DURATION:-10}"
CONNS="${BENCH_CONNS:-50}"
((DURATION >= 1 && DURATION <= 120)) || die "BENCH_DURATION must be 1..120"
"$BENCH_ROOT/scripts/install-deps.sh" wrk nginx util-linux
command -v perf >/dev/null || "$BENCH_ROOT/scripts/install-deps.sh" linux-perf
BIN=$(switchyard_bin)
log "$(machine_line)"

start_bench_backends 1
SP=$(free_port)
SA=$(free_port)
write_switchyard_config "$WORK/switchyard.toml" "127.0.0.1:$SP" "127.0.0.1:$SA" 1
start_switchyard "$BIN" "$WORK/switchyard.toml" "127.0.0.1:$SA" 0
taskset -c 1 wrk -t1 -c"$CONNS" -d2s -H 'Host: bench' "http://127.0.0.1:$SP/" >/dev/null

CG="${BENCH_CALLGRAPH:-none}"
case "$CG" in
none) callgraph=() ;;
fp) callgraph=(-g) ;;
dwarf) callgraph=(--call-graph dwarf,16384) ;;
*) die "BENCH_CALLGRAPH must be none, fp or dwarf" ;;
esac
THREADS=$(ls "/proc/$SY_PID/task" | wc -l)
THREAD_NAMES=$(cat /proc/"$SY_PID"/task/*/comm | sort | uniq -c | awk '{printf "%s x%s, ", $2, $1}')
perf record -e cpu-clock -F 2999 "${callgraph[@]}" -o "$WORK/perf.data" -p "$SY_PID" \
    -- sleep "$DURATION" >"$WORK/perf-record.log" 2>&1 &
PERF_PID=$!
PIDS+=("$PERF_PID")
taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -H 'Host: bench' "http://127.0.0.1:$SP/" >&2
wait "$PERF_PID" || die "perf record failed: $(tail -3 "$WORK/perf-record.log")"
{
    echo "## switchyard threads: $THREADS ($THREAD_NAMES)"
    echo
    echo "## flat profile (self time), switchyard pinned to core 0, wrk -c$CONNS"
    perf report -i "$WORK/perf.data" --no-children --sort symbol --percent-limit 0.7 --stdio -g none 2>/dev/null |
        grep -v '^#' | grep -v '^$' | sed 's/[[:space:]-]*$//' | head -60
    echo
    echo "## by shared object"
    perf report -i "$WORK/perf.data" --no-children --sort dso --stdio 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -15
    if [[ "$CG" != none ]]; then
        echo
        echo "## callers of the top symbols (caller graph, >= 5%)"
        perf report -i "$WORK/perf.data" --no-children --sort symbol --percent-limit 5 --stdio \
            -g caller,0.5,callee,function,percent --max-stack 14 2>/dev/null |
            grep -v '^#' | grep -v '^$' | sed 's/[[:space:]-]*$//' | head -150
    fi
} | tee "${BENCH_OUT:-/dev/null}"
