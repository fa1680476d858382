#!/usr/bin/env bash
# Throughput and latency: the same two loopback backends served directly, through nginx, through
# HAProxy and through switchyard (backends registered in a real etcd), loaded with wrk.
#
# Targets: direct, nginx, haproxy, switchyard and, with BENCH_BASE_BIN, switchyard-base: another
# switchyard binary (an earlier commit, for a before/after) measured in the same rounds.
#
# Two variants:
#   pinned    proxy on core 0 (1 worker / 1 thread); backends, wrk and etcd on core 1
#   unpinned  proxy with 2 workers / 2 threads; nothing pinned
# Each variant runs BENCH_ROUNDS rounds; in each round every target is measured once, in a rotated
# order, so the proxies take turns. Reported: median rps, p50, p99 per target and the ratios
# switchyard/nginx, switchyard/HAProxy and proxy/direct, and each proxy's CPU time per request
# (user + system time of its processes during the measurement, divided by the requests served):
# the cost per request, steadier than rps when the other core is the bottleneck.
#
# Environment (defaults in brackets):
#   BENCH_QUICK=1        smoke run: 1 round, 2 s per measurement, 1 s warm-up
#   BENCH_ROUNDS [3]     rounds per variant
#   BENCH_DURATION [10]  seconds per measurement;  BENCH_WARMUP [2] seconds of warm-up before each
#   BENCH_CONNS [50]     wrk connections;          BENCH_WRK_THREADS [1]
#   BENCH_VARIANTS ["pinned unpinned"]
#   BENCH_BASE_BIN       also measure this switchyard binary (target switchyard-base)
#   SWITCHYARD_BIN       use this binary instead of building target/release/switchyard
#   BENCH_OUT            also write the markdown report to this file
#   BENCH_SWITCHYARD_PROXY_TOML  extra lines for switchyard's [proxy] section (e.g. "work_stealing = false")
#   BENCH_SWITCHYARD_TOML, BENCH_BASE_TOML  more sections for switchyard's / switchyard-base's config
#                        (e.g. BENCH_BASE_BIN=<the same binary> BENCH_BASE_TOML=$'[traffic]\npolicy = "p2c_ewma"'
#                        compares two policies in the same rounds)
#   BENCH_KEEP=1         keep the temporary directory (configs, logs, raw wrk output)
# Default runtime: about 2 variants x 3 rounds x 5 targets x 12 s = 6 minutes.
set -euo pipefail
source "$(dirname "$0")/common.sh"

if [[ "${BENCH_QUICK:-0}" == 1 ]]; then
    ROUNDS="${BENCH_ROUNDS:-1}" DURATION="${BENCH_DURATION:-2}" WARMUP="${BENCH_WARMUP:-1}"
else
    ROUNDS="${BENCH_ROUNDS:-3}" DURATION="${BENCH_DURATION:-10}" WARMUP="${BENCH_WARMUP:-2}"
fi
CONNS="${BENCH_CONNS:-50}"
WRK_THREADS="${BENCH_WRK_THREADS:-1}"
VARIANTS="${BENCH_VARIANTS:-pinned unpinned}"
BASE_BIN="${BENCH_BASE_BIN:-}"
[[ -z "$BASE_BIN" || -x "$BASE_BIN" ]] || die "BENCH_BASE_BIN $BASE_BIN is not an executable"
((ROUNDS >= 1 && ROUNDS <= 20)) || die "BENCH_ROUNDS must be 1..20"
((DURATION >= 1 && DURATION <= 120)) || die "BENCH_DURATION must be 1..120"

"$BENCH_ROOT/scripts/install-deps.sh" wrk nginx haproxy util-linux
BIN=$(switchyard_bin)
[[ -x "$BIN" ]] || die "no switchyard binary at $BIN"

RESULTS="$WORK/results.tsv" # variant round target rps p50_ms p99_ms errors cpu_us_per_request
: >"$RESULTS"
# wait_routes_both ADDR: bounded poll until requests with Host: bench reach both b1 and b2.
wait_routes_both() {
    python3 - "$1" <<'PY' || die "switchyard at $1 did not route to both backends"
import http.client, sys, time
host, port = sys.argv[1].split(":")
deadline = time.time() + 10
while time.time() < deadline:
    seen = set()
    try:
        for _ in range(4):
            c = http.client.HTTPConnection(host, int(port), timeout=1)
            c.request("GET", "/", headers={"Host": "bench"})
            seen.add(c.getresponse().read().decode().strip())
            c.close()
    except OSError:
        pass
    if {"hello from b1", "hello from b2"} <= seen:
        sys.exit(0)
    time.sleep(0.05)
sys.exit(1)
PY
}

# run_wrk VARIANT ROUND TARGET URL CPUS PID (PID: the proxy, "" for direct)
run_wrk() {
    local variant="$1" round="$2" target="$3" url="$4" cpus="$5" pid="$6" pre=() out t0 t1
    [[ -n "$cpus" ]] && pre=(taskset -c "$cpus")
    out="$WORK/wrk-$variant-$round-$target.txt"
    "${pre[@]}" wrk -t"$WRK_THREADS" -c"$CONNS" -d"${WARMUP}s" -H "Host: bench" "$url" >/dev/null
    t0=$(cpu_ticks "$pid")
    "${pre[@]}" wrk -t"$WRK_THREADS" -c"$CONNS" -d"${DURATION}s" --latency -H "Host: bench" "$url" >"$out"
    t1=$(cpu_ticks "$pid")
    python3 - "$out" "$variant" "$round" "$target" "$((t1 - t0))" "$pid" >>"$RESULTS" <<'PY'
import os, re, sys
path, variant, rnd, target, ticks, pid = sys.argv[1:]
text = open(path).read()
def ms(v):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", v)
    n, u = float(m.group(1)), m.group(2)
    return n * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[u]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p50 = ms(re.search(r"^\s+50%\s+(\S+)", text, re.M).group(1))
p99 = ms(re.search(r"^\s+99%\s+(\S+)", text, re.M).group(1))
errs = 0
m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
if m: errs += int(m.group(1))
m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
if m: errs += sum(int(x) for x in m.groups())
requests = int(re.search(r"(\d+) requests in", text).group(1))
cpu_us = int(ticks) / os.sysconf("SC_CLK_TCK") * 1e6 / requests if pid and requests else float("nan")
print(f"{variant}\t{rnd}\t{target}\t{rps:.0f}\t{p50:.3f}\t{p99:.3f}\t{errs}\t{cpu_us:.2f}")
PY
    tail -n1 "$RESULTS" | awk -F'\t' '{printf "bench: %-8s round %s %-18s %8s rps  p50 %7s ms  p99 %7s ms  errors %s  cpu/req %s us\n", $1, $2, $3, $4, $5, $6, $7, $8}' >&2
}

log "$(machine_line)"
log "rounds=$ROUNDS duration=${DURATION}s warmup=${WARMUP}s wrk -t$WRK_THREADS -c$CONNS; binary $BIN"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

for variant in $VARIANTS; do
    case "$variant" in
    pinned) PROXY_CPUS=0 SIDE_CPUS=1 WORKERS=1 ;;
    unpinned) PROXY_CPUS="" SIDE_CPUS="" WORKERS=2 ;;
    *) die "unknown variant $variant" ;;
    esac
    log "== variant $variant (proxy cpus: ${PROXY_CPUS:-any}, workers/threads: $WORKERS)"
    start_bench_backends "$SIDE_CPUS"
    start_bench_proxies "$WORKERS" "$PROXY_CPUS" "$WORK/switchyard-$variant.toml"
    wait_routes_both "127.0.0.1:$SP"
    SYN_PID=$SY_PID
    if [[ -n "$BASE_BIN" ]]; then
        PP=$(free_port)
        PA=$(free_port)
        # the base binary's own config (an older one may not know sections the new one has)
        BIN="$BASE_BIN" write_switchyard_config "$WORK/switchyard-base-$variant.toml" \
            "127.0.0.1:$PP" "127.0.0.1:$PA" "$WORKERS" "${BENCH_BASE_TOML:-}"
        start_switchyard "$BASE_BIN" "$WORK/switchyard-base-$variant.toml" "127.0.0.1:$PA" "$PROXY_CPUS"
        wait_routes_both "127.0.0.1:$PP"
        SYP_PID=$SY_PID
    fi

    declare -A PROXY_PID=([direct]="" [nginx]="$NGINX_PID" [haproxy]="$HAPROXY_PID" [switchyard]="$SYN_PID")
    declare -A URL=(
        [direct]="http://127.0.0.1:$B1/"
        [nginx]="http://127.0.0.1:$NP/"
        [haproxy]="http://127.0.0.1:$HP/"
        [switchyard]="http://127.0.0.1:$SP/"
    )
    targets=(direct nginx haproxy switchyard)
    if [[ -n "$BASE_BIN" ]]; then
        URL[switchyard-base]="http://127.0.0.1:$PP/"
        PROXY_PID[switchyard-base]="$SYP_PID"
        targets+=(switchyard-base)
    fi
    for ((r = 1; r <= ROUNDS; r++)); do
        for ((k = 0; k < ${#targets[@]}; k++)); do
            t="${targets[$(((k + r - 1) % ${#targets[@]}))]}"
            run_wrk "$variant" "$r" "$t" "${URL[$t]}" "$SIDE_CPUS" "${PROXY_PID[$t]}"
        done
    done
    log "switchyard RSS after the $variant runs: $(rss_kib "$SYN_PID") KiB"
    stop_pid "$SYN_PID"
    if [[ -n "$BASE_BIN" ]]; then
        log "switchyard-base RSS after the $variant runs: $(rss_kib "$SYP_PID") KiB"
        stop_pid "$SYP_PID"
    fi
    stop_pid "$HAPROXY_PID"
    stop_pid "$NGINX_PID"
    stop_pid "$ETCD_PID"
    stop_pid "$BE2_PID"
    stop_pid "$BE1_PID"
done

LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$RESULTS" "$ROUNDS" "$DURATION" "$CONNS" "$WRK_THREADS" "$LOAD_BEFORE" "$LOAD_AFTER" <<'PY' | tee "${BENCH_OUT:-/dev/null}"
import statistics, sys
from collections import defaultdict
path, rounds, dur, conns, wt, load_before, load_after = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
by = defaultdict(lambda: defaultdict(list))
for v, r, t, rps, p50, p99, errs, cpu in rows:
    by[v][t].append((float(rps), float(p50), float(p99), int(errs), float(cpu)))
med = statistics.median
def cpu(xs):
    v = [x[4] for x in xs if x[4] == x[4]]
    return f"{med(v):.2f}" if v else "-"
print(f"wrk -t{wt} -c{conns} -d{dur}s, median of {rounds} round(s); load average before {load_before}, after {load_after}\n")
print("| variant | target | rps | p50 ms | p99 ms | errors | proxy CPU µs/request | rps per round |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
for v, ts in by.items():
    for t in ["direct", "nginx", "haproxy", "switchyard", "switchyard-base"]:
        if t not in ts: continue
        xs = ts[t]
        print(f"| {v} | {t} | {med(x[0] for x in xs):.0f} | {med(x[1] for x in xs):.3f} | "
              f"{med(x[2] for x in xs):.3f} | {sum(x[3] for x in xs)} | {cpu(xs)} | {', '.join(f'{x[0]:.0f}' for x in xs)} |")
print()
# ratios two ways: of the medians, and the median of the per-round ratios (each round measures
# every target back to back, so a per-round ratio cancels slow drift in background load)
print("| variant | ratio | rps (of medians) | rps (median of per-round ratios) | p50 | p99 | CPU per request |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
for v, ts in by.items():
    m = {t: (med(x[0] for x in xs), med(x[1] for x in xs), med(x[2] for x in xs)) for t, xs in ts.items()}
    c = {t: cpu(xs) for t, xs in ts.items()}
    pairs = [("switchyard", "nginx"), ("switchyard", "haproxy"), ("nginx", "direct"),
             ("haproxy", "direct"), ("switchyard", "direct"), ("switchyard", "switchyard-base"),
             ("switchyard-base", "nginx"), ("switchyard-base", "haproxy")]
    for a, b in pairs:
        if a in m and b in m:
            per_round = med(x[0] / y[0] for x, y in zip(ts[a], ts[b]))
            cr = f"{float(c[a]) / float(c[b]):.2f}" if "-" not in (c[a], c[b]) else "-"
            print(f"| {v} | {a}/{b} | {m[a][0]/m[b][0]:.2f} | {per_round:.2f} | {m[a][1]/m[b][1]:.2f} | {m[a][2]/m[b][2]:.2f} | {cr} |")
PY
