#!/usr/bin/env bash
# Scale: time from process start to /readyz 200, and resident memory, with 0, 10,000, 50,000 and
# 100,000 instances registered (BENCH_SCALE_PER_SERVICE [10] instances per service). For each size a fresh
# etcd is bulk-loaded (examples/bench_harness.rs `bulk-load`: 128-put txns, 16 in flight), then
# `scale-probe` starts the release switchyard, polls /readyz every 2 ms, reads VmRSS at ready and
# again after BENCH_SETTLE_MS (with the peak in between), the CPU used while settling, then the
# time and size of one /metrics scrape and VmRSS 1 s after it, the same for /api/services.
# All instances point at one live nginx backend, so active health checks (when on) succeed.
#
# BENCH_SCALE_TRAFFIC=1: then one request through the proxy to each service, and VmRSS 1 s after
# (a service's request metrics and pooled connection: memory with traffic, not only idle).
#
# Environment: BENCH_QUICK=1 (sizes 0 1000, 2 s settle), BENCH_SCALE_SIZES ["0 10000 50000 100000"],
# BENCH_HEALTH ["default off"; also "oneshot"], BENCH_SETTLE_MS [5000], SWITCHYARD_BIN, BENCH_HARNESS, BENCH_OUT,
# BENCH_KEEP=1.
set -euo pipefail
source "$(dirname "$0")/common.sh"

if [[ "${BENCH_QUICK:-0}" == 1 ]]; then
    SIZES="${BENCH_SCALE_SIZES:-0 1000}" SETTLE_MS="${BENCH_SETTLE_MS:-2000}"
else
    SIZES="${BENCH_SCALE_SIZES:-0 10000 50000 100000}" SETTLE_MS="${BENCH_SETTLE_MS:-5000}"
fi
PER="${BENCH_SCALE_PER_SERVICE:-10}"
MODES="${BENCH_HEALTH:-default off}"

"$BENCH_ROOT/scripts/install-deps.sh" nginx
# Health modes: health_toml's ("default", "off") and "oneshot": the defaults with
# reuse_connection = false, a new connection for every HTTP check.
bench_health_toml() {
    case "$1" in
    oneshot) printf '\n[health]\nreuse_connection = false\n' ;;
    *) health_toml "$1" ;;
    esac
}

BIN=$(switchyard_bin)
HARNESS=$(harness_bin)
log "$(machine_line)"
B1=$(free_port)
start_nginx_backend "$B1" b1

ROWS="$WORK/rows.tsv"
: >"$ROWS"
TRAFFIC_ROWS="$WORK/traffic.tsv"
: >"$TRAFFIC_ROWS"
for n in $SIZES; do
    ((n <= 1000000)) || die "size $n too large"
    start_etcd
    services=0
    if ((n > 0)); then
        services=$(((n + PER - 1) / PER))
        "$HARNESS" bulk-load --etcd "$ETCD_URL" --services "$services" --per-service "$PER" \
            --addr "127.0.0.1:$B1" >&2
    fi
    for mode in $MODES; do
        SP=$(free_port)
        SA=$(free_port)
        cfg="$WORK/switchyard-$n-$mode.toml"
        write_switchyard_config "$cfg" "127.0.0.1:$SP" "127.0.0.1:$SA" 2 "$(bench_health_toml "$mode")"
        pidfile="$WORK/sy-$n-$mode.pid"
        traffic=()
        [[ "${BENCH_SCALE_TRAFFIC:-0}" == 1 ]] && traffic=(--proxy "127.0.0.1:$SP" --traffic "$services")
        "$HARNESS" scale-probe --admin "127.0.0.1:$SA" --pid-file "$pidfile" --settle-ms "$SETTLE_MS" \
            --label "$n/$mode" "${traffic[@]}" -- "$BIN" serve --config "$cfg" >"$WORK/scale-$n-$mode.txt" &
        probe=$!
        PIDS+=("$probe")
        # the probe stops switchyard itself; this records its pid for the exit trap as well
        for _ in $(seq 1 100); do [[ -s "$pidfile" ]] && break; sleep 0.02; done
        [[ -s "$pidfile" ]] && PIDS+=("$(cat "$pidfile")")
        wait "$probe" || die "scale-probe failed for $n/$mode: $(tail -5 "$pidfile.log" 2>/dev/null)"
        grep -q 'NOT READY' "$WORK/scale-$n-$mode.txt" &&
            log "switchyard log (last lines): $(grep -v '^ *[0-9]*:\|^ *at ' "$pidfile.log" | tail -3)"
        cat "$WORK/scale-$n-$mode.txt" >&2
        grep '^ROW' "$WORK/scale-$n-$mode.txt" >>"$ROWS"
        grep '^TRAFFIC' "$WORK/scale-$n-$mode.txt" >>"$TRAFFIC_ROWS" || true
    done
    stop_pid "$ETCD_PID"
done

python3 - "$ROWS" "$PER" "$SETTLE_MS" "$(cut -d' ' -f1-3 /proc/loadavg)" "$TRAFFIC_ROWS" <<'PY' | tee "${BENCH_OUT:-/dev/null}"
import sys
rows, per, settle, load, traffic = sys.argv[1:]
print(f"{per} instances per service; RSS sampled at ready and {int(settle)/1000:g} s later; load average after: {load}\n")
print("| instances / health | ready ms | RSS at ready MiB | RSS settled MiB | peak MiB | CPU while settling (cores) | one /metrics scrape | RSS 1 s after it MiB | /api/services: services / instances listed | RSS 1 s after it MiB |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
for line in open(rows):
    f = line.rstrip("\n").split("\t")
    f += ["-"] * (11 - len(f))  # not ready: no scrape or API columns
    _, label, ready, r0, r1, peak, cpu, scrape, r2, api, r3 = f
    print(f"| {label} | {ready} | {r0} | {r1} | {peak} | {cpu} | {scrape} | {r2} | {api} | {r3} |")
lines = open(traffic).read().splitlines()
if lines:
    print("\nThen one request through the proxy to each service (RSS 1 s after):\n")
    print("| instances / health | answered 200 | RSS before MiB | RSS after MiB | bytes per service |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for line in lines:
        _, label, ok, before, after, per = line.split("\t")
        print(f"| {label} | {ok} | {before} | {after} | {per} |")
PY
