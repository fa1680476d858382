#!/usr/bin/env bash
# Failure: one of two instances dies (kill -9) or goes silent (SIGSTOP: the kernel still accepts
# connections, nothing answers) under load. examples/bench_harness.rs `failover` keeps
# BENCH_CONNS closed-loop keep-alive clients on switchyard, signals the victim after
# BENCH_BEFORE_MS, and reports failed client requests, latency, and how long the victim still got
# traffic: client view (last failed or slow request) and proxy view (the victim's pick counter and
# health in /api/services/bench, polled every 5 ms).
#
# Backends: two single-process nginx (b1, b2; b2 is the victim), registered with plain puts (no
# lease: the registration stays, as when a host dies and its lease has not expired yet).
# switchyard: 2 threads, proxy.read_timeout_ms = BENCH_READ_TIMEOUT_MS [5000] (default config has
# 30000), health per BENCH_HEALTH modes [default off] ("default" = embedded [health] defaults).
#
# Environment: BENCH_QUICK=1 (shorter windows), BENCH_CONNS [16], BENCH_BEFORE_MS [2000],
# BENCH_AFTER_MS [read timeout + 5000], BENCH_SIGNALS ["KILL STOP"], SWITCHYARD_BIN, BENCH_HARNESS,
# BENCH_OUT, BENCH_KEEP=1.
set -euo pipefail
source "$(dirname "$0")/common.sh"

READ_TIMEOUT_MS="${BENCH_READ_TIMEOUT_MS:-5000}"
if [[ "${BENCH_QUICK:-0}" == 1 ]]; then
    BEFORE_MS="${BENCH_BEFORE_MS:-1000}" AFTER_MS="${BENCH_AFTER_MS:-$((READ_TIMEOUT_MS + 1000))}"
else
    BEFORE_MS="${BENCH_BEFORE_MS:-2000}" AFTER_MS="${BENCH_AFTER_MS:-$((READ_TIMEOUT_MS + 5000))}"
fi
CONNS="${BENCH_CONNS:-16}"
MODES="${BENCH_HEALTH:-default off}"
SIGNALS="${BENCH_SIGNALS:-KILL STOP}"
((AFTER_MS <= 120000 && BEFORE_MS <= 60000)) || die "windows too long"

"$BENCH_ROOT/scripts/install-deps.sh" nginx
BIN=$(switchyard_bin)
HARNESS=$(harness_bin)
log "$(machine_line)"
start_etcd

ROWS="$WORK/rows.tsv"
: >"$ROWS"
for mode in $MODES; do
    for sig in $SIGNALS; do
        B1=$(free_port)
        B2=$(free_port)
        start_nginx_backend "$B1" b1
        BE1_PID=$BACKEND_PID
        start_nginx_backend "$B2" b2
        BE2_PID=$BACKEND_PID
        etcd_put /services/bench/b1 "127.0.0.1:$B1"
        etcd_put /services/bench/b2 "127.0.0.1:$B2"
        SP=$(free_port)
        SA=$(free_port)
        cfg="$WORK/switchyard-$mode-$sig.toml"
        write_switchyard_config "$cfg" "127.0.0.1:$SP" "127.0.0.1:$SA" 2 "$(health_toml "$mode")"
        sed -i "s/^threads = .*/&\nread_timeout_ms = $READ_TIMEOUT_MS/" "$cfg"
        start_switchyard "$BIN" "$cfg" "127.0.0.1:$SA"
        log "== health $mode, kill -$sig of b2 (pid $BE2_PID)"
        "$HARNESS" failover --proxy "127.0.0.1:$SP" --admin "127.0.0.1:$SA" --service bench \
            --victim-id b2 --victim-marker "hello from b2" --pid "$BE2_PID" --signal "$sig" \
            --conns "$CONNS" --before-ms "$BEFORE_MS" --after-ms "$AFTER_MS" \
            --label "$mode" | tee "$WORK/failover-$mode-$sig.txt" >&2
        grep '^ROW' "$WORK/failover-$mode-$sig.txt" >>"$ROWS"
        stop_pid "$SY_PID"
        stop_pid "$BE2_PID"
        stop_pid "$BE1_PID"
    done
done

python3 - "$ROWS" "$CONNS" "$READ_TIMEOUT_MS" "$BEFORE_MS" "$AFTER_MS" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY' | tee "${BENCH_OUT:-/dev/null}"
import sys
rows, conns, rt, before, after, load = sys.argv[1:]
print(f"{conns} closed-loop keep-alive clients, 2 instances, victim b2; signal {before} ms into the run, "
      f"observed for {after} ms after it; proxy.read_timeout_ms = {rt}; load average after: {load}\n")
print("| health | signal | rps before | rps after | requests | failed after | by status | p99 after ms | max after ms | last affected request ms | victim last picked ms | victim not healthy at ms |")
print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
nan = lambda v, word: word if v.lower() == "nan" else v
for line in open(rows):
    f = line.rstrip("\n").split("\t")
    _, label, sig, n, failed, codes, p99, mx, last_aff, last_pick, unhealthy, rb, ra = f
    last_aff, last_pick, unhealthy = nan(last_aff, "none"), nan(last_pick, "none"), nan(unhealthy, "never")
    print(f"| {label} | {sig} | {rb} | {ra} | {n} | {failed} | {codes} | {p99} | {mx} | {last_aff} | {last_pick} | {unhealthy} |")
PY
