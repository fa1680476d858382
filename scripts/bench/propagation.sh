#!/usr/bin/env bash
# Propagation: time from an etcd write to the first request through switchyard that reflects it.
#
# Starts etcd, one nginx backend and the release switchyard (2 threads), registers BENCH_FILLER
# other services (1 instance each, pointing at the backend), then runs examples/bench_harness.rs
# `propagation`: per trial, put /services/<new service>/x and poll `Host: <new service>` every
# BENCH_POLL_US until it answers 200 (add), then delete the key and poll until it does not (delete).
# Times run from just before the etcd request is sent to the end of the first reflecting response.
# The harness also watches the prefix itself, which splits each trial in two: etcd's part (write to
# watch event: commit, fsync, delivery; the same for any etcd client) and the rest (switchyard's
# part: apply, snapshot, first health check, and the poll that sees it).
#
# Health modes (BENCH_HEALTH, default "default off"): "default" = the embedded [health] defaults
# (active HTTP checks; a new instance is admitted after its first passing check); "off" = no health
# checking, so the time is registry watch + snapshot swap only; "oneshot" = the defaults with
# reuse_connection = false (a new connection for every HTTP check); "admit" = the defaults with
# admit_immediately = true (checks run, but a new instance takes traffic before its first one,
# as Traefik and APISIX do).
#
# BENCH_NEW_BACKEND=own registers the new instances at a second nginx of their own instead of the
# one that also answers every filler instance's health checks (10,000 or more a second).
#
# Environment: BENCH_QUICK=1 (20 trials, 1,000 filler services), BENCH_TRIALS [200],
# BENCH_FILLER [10000], BENCH_POLL_US [250], BENCH_HEALTH, BENCH_NEW_BACKEND [shared], SWITCHYARD_BIN, BENCH_HARNESS,
# BENCH_OUT (also write the markdown table there), BENCH_KEEP=1.
set -euo pipefail
source "$(dirname "$0")/common.sh"

if [[ "${BENCH_QUICK:-0}" == 1 ]]; then
    TRIALS="${BENCH_TRIALS:-20}" FILLER="${BENCH_FILLER:-1000}"
else
    TRIALS="${BENCH_TRIALS:-200}" FILLER="${BENCH_FILLER:-10000}"
fi
POLL_US="${BENCH_POLL_US:-250}"
MODES="${BENCH_HEALTH:-default off}"
((TRIALS >= 1 && TRIALS <= 5000)) || die "BENCH_TRIALS must be 1..5000"

"$BENCH_ROOT/scripts/install-deps.sh" nginx
# Health modes: health_toml's ("default", "off"), "oneshot" and "admit" (see above).
bench_health_toml() {
    case "$1" in
    oneshot) printf '\n[health]\nreuse_connection = false\n' ;;
    admit) printf '\n[health]\nadmit_immediately = true\n' ;;
    *) health_toml "$1" ;;
    esac
}

# wait_first_checks ADMIN: bounded poll (180 s) until no instance is pending (waiting for its first
# check to pass) and no first check is queued (binaries older than that gauge: pending only).
wait_first_checks() {
    python3 - "$1" <<'PY' || die "switchyard still had instances waiting for their first check after 180 s"
import sys, time, urllib.request
url = f"http://{sys.argv[1]}/metrics"
deadline = time.time() + 180
while time.time() < deadline:
    pending, queued = 0.0, None
    for line in urllib.request.urlopen(url, timeout=60).read().decode().splitlines():
        if line.startswith("switchyard_upstream_instances{") and 'state="pending"' in line:
            pending += float(line.rsplit(" ", 1)[1])
        elif line.startswith("switchyard_health_first_checks_queued "):
            queued = float(line.rsplit(" ", 1)[1])
    if pending == 0 and queued in (None, 0):
        sys.exit(0)
    time.sleep(1)
sys.exit(1)
PY
}

BIN=$(switchyard_bin)
HARNESS=$(harness_bin)
log "$(machine_line)"

B1=$(free_port)
start_nginx_backend "$B1" b1
NEW_ADDR="127.0.0.1:$B1"
if [[ "${BENCH_NEW_BACKEND:-shared}" == own ]]; then
    B2=$(free_port)
    start_nginx_backend "$B2" b2
    NEW_ADDR="127.0.0.1:$B2"
fi
start_etcd
"$HARNESS" bulk-load --etcd "$ETCD_URL" --services "$FILLER" --addr "127.0.0.1:$B1" >&2

ROWS="$WORK/rows.tsv"
: >"$ROWS"
for mode in $MODES; do
    SP=$(free_port)
    SA=$(free_port)
    cfg="$WORK/switchyard-$mode.toml"
    write_switchyard_config "$cfg" "127.0.0.1:$SP" "127.0.0.1:$SA" 2 "$(bench_health_toml "$mode")"
    start_switchyard "$BIN" "$cfg" "127.0.0.1:$SA"
    # let the checker's first round over the filler instances pass before measuring (at 100,000
    # it takes seconds, and new instances' first checks would share the admission thread with it)
    wait_first_checks "127.0.0.1:$SA"
    sleep 2
    log "== health $mode: $TRIALS trials, $FILLER other services"
    "$HARNESS" propagation --etcd "$ETCD_URL" --proxy "127.0.0.1:$SP" --addr "$NEW_ADDR" \
        --trials "$TRIALS" --poll-us "$POLL_US" --label "$mode" | tee "$WORK/prop-$mode.txt" >&2
    grep '^ROW' "$WORK/prop-$mode.txt" >>"$ROWS"
    stop_pid "$SY_PID"
done

python3 - "$ROWS" "$FILLER" "$POLL_US" "$(cut -d' ' -f1-3 /proc/loadavg)" "${BENCH_NEW_BACKEND:-shared}" <<'PY' | tee "${BENCH_OUT:-/dev/null}"
import sys
rows, filler, poll, load, new = sys.argv[1:]
print(f"{filler} other services registered, polling every {poll} us, new instances at {new} backend; "
      f"load average after: {load}\n")
print("| health | change | trials | p50 ms | p90 ms | p99 ms | max ms | timeouts | etcd ack p50 / p99 ms "
      "| etcd to watch p50 / p99 ms | after the watch p50 / p99 ms |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for line in open(rows):
    _, label, kind, n, p50, p90, p99, mx, to, a50, a99, w50, w99, r50, r99 = line.rstrip("\n").split("\t")
    print(f"| {label} | {kind} | {n} | {p50} | {p90} | {p99} | {mx} | {to} | {a50} / {a99} | {w50} / {w99} | {r50} / {r99} |")
PY
