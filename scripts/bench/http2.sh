#!/usr/bin/env bash
# HTTP/2, gRPC-shaped: h2load (-c 10 -m 20, content-type application/grpc) through HAProxy
# (proto h2 on both sides), nginx (grpc_pass) and switchyard (instances registered with protocol
# h2c), in front of the same two h2c backends (nginx, `listen ... http2`), and the backends direct.
#
# Each round measures every target once, in a rotated order. Reported per target: median rps,
# and the proxy's CPU time per request (user + system of its processes during the measurement,
# divided by the requests served), with the switchyard/HAProxy and switchyard/nginx ratios.
#
# Environment (defaults in brackets):
#   BENCH_QUICK=1        smoke run: 1 round, 3 s per measurement, 1 s warm-up
#   BENCH_ROUNDS [3]     rounds;   BENCH_DURATION [10] seconds per measurement;  BENCH_WARMUP [2]
#   BENCH_THREADS [2]    worker threads/processes of each proxy (nothing pinned)
#   SWITCHYARD_BIN       use this binary instead of building target/release/switchyard
#   BENCH_OUT            also write the markdown report to this file
#   BENCH_KEEP=1         keep the temporary directory (configs, logs, raw h2load output)
#   BENCH_BASE_BIN       also measure this switchyard binary (target switchyard-base), in the same
#                        rounds: the before/after of a change
#   BENCH_SWITCHYARD_TOML, BENCH_BASE_TOML  more sections for switchyard's / switchyard-base's config
#   BENCH_H2LOAD_ARGS    more h2load arguments (e.g. "-d FILE": POST FILE as each request's body,
#                        as a unary gRPC call sends its message)
#   BENCH_TARGETS        measure only these targets (e.g. "switchyard switchyard-base")
#   BENCH_FLOOR=1        also measure examples/h2_floor.rs: the least a relay on the h2 crate does
#                        per request (no routing, metrics or policies), a lower bound for switchyard
#   BENCH_PERF=1         also profile switchyard (perf record) while it is measured; prints the
#                        flat profile's top symbols
set -euo pipefail
source "$(dirname "$0")/common.sh"

if [[ "${BENCH_QUICK:-0}" == 1 ]]; then
    ROUNDS="${BENCH_ROUNDS:-1}" DURATION="${BENCH_DURATION:-3}" WARMUP="${BENCH_WARMUP:-1}"
else
    ROUNDS="${BENCH_ROUNDS:-3}" DURATION="${BENCH_DURATION:-10}" WARMUP="${BENCH_WARMUP:-2}"
fi
THREADS="${BENCH_THREADS:-2}"
PATH_="/bench.Service/Call"

"$BENCH_ROOT/scripts/install-deps.sh" nghttp2-client nginx haproxy
BIN=$(switchyard_bin)
[[ -x "$BIN" ]] || die "no switchyard binary at $BIN"

# wait_h2 URL WHAT: bounded poll (10 s) until URL answers 200 over h2c.
wait_h2() {
    for _ in $(seq 1 400); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' --http2-prior-knowledge "$1") == 200 ]] && return 0
        sleep 0.025
    done
    die "$2 did not answer 200 over h2c ($1)"
}

# start_h2c_backend PORT NAME: a single-process nginx answering every h2c request with 200.
start_h2c_backend() {
    local port="$1" name="$2" dir="$WORK/backend-$2"
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<EOF
$(nginx_main "$dir" 1)
master_process off;
events { worker_connections 4096; }
http {
$(nginx_http_common "$dir")
    http2_max_concurrent_streams 1024;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$port http2;
        default_type application/grpc;
        location / { return 200 "hello from $name\n"; }
    }
}
EOF
    nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/stdout.log" 2>&1 &
    PIDS+=($!)
    wait_h2 "http://127.0.0.1:$port/" "h2c backend $name"
}

B1=$(free_port)
B2=$(free_port)
start_h2c_backend "$B1" b1
start_h2c_backend "$B2" b2
start_etcd
for b in b1:$B1 b2:$B2; do
    etcd_put "/services/bench/${b%%:*}" "{\"addr\":\"127.0.0.1:${b#*:}\",\"metadata\":{\"protocol\":\"h2c\"}}"
done

HP=$(free_port)
mkdir -p "$WORK/haproxy"
cat >"$WORK/haproxy/haproxy.cfg" <<EOF
global
    nbthread $THREADS
    maxconn 4000
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
frontend bench
    bind 127.0.0.1:$HP proto h2
    default_backend backends
backend backends
    balance roundrobin
    http-reuse always
    server b1 127.0.0.1:$B1 proto h2
    server b2 127.0.0.1:$B2 proto h2
EOF
haproxy -db -f "$WORK/haproxy/haproxy.cfg" >"$WORK/haproxy/haproxy.log" 2>&1 &
PIDS+=($!)
HAPROXY_PID=$!
wait_h2 "http://127.0.0.1:$HP$PATH_" "haproxy"

NP=$(free_port)
mkdir -p "$WORK/nginx-proxy"
cat >"$WORK/nginx-proxy/nginx.conf" <<EOF
$(nginx_main "$WORK/nginx-proxy" $THREADS)
events { worker_connections 4096; }
http {
$(nginx_http_common "$WORK/nginx-proxy")
    http2_max_concurrent_streams 1024;
    upstream backends {
        server 127.0.0.1:$B1;
        server 127.0.0.1:$B2;
        keepalive 256;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NP http2;
        location / { grpc_pass grpc://backends; }
    }
}
EOF
nginx -p "$WORK/nginx-proxy" -c "$WORK/nginx-proxy/nginx.conf" -e "$WORK/nginx-proxy/error.log" \
    >"$WORK/nginx-proxy/stdout.log" 2>&1 &
PIDS+=($!)
NGINX_PID=$!
wait_h2 "http://127.0.0.1:$NP$PATH_" "nginx (grpc_pass)"

SP=$(free_port)
SA=$(free_port)
SWITCHYARD_ROUTE="
[health]
protocol = \"tcp\"

[[routing.routes]]
path_prefix = \"/bench.Service/\"
service = \"bench\"
"
write_switchyard_config "$WORK/switchyard.toml" "127.0.0.1:$SP" "127.0.0.1:$SA" "$THREADS" \
    "$SWITCHYARD_ROUTE${BENCH_SWITCHYARD_TOML:-}"
start_switchyard "$BIN" "$WORK/switchyard.toml" "127.0.0.1:$SA"
wait_h2 "http://127.0.0.1:$SP$PATH_" "switchyard"
SWITCHYARD_PID=$SY_PID

RESULTS="$WORK/results.tsv" # round target rps cpu_us_per_request errors
: >"$RESULTS"
targets=(direct haproxy nginx switchyard)
if [[ -n "${BENCH_BASE_BIN:-}" ]]; then
    [[ -x "$BENCH_BASE_BIN" ]] || die "BENCH_BASE_BIN $BENCH_BASE_BIN is not an executable"
    BP=$(free_port)
    BA=$(free_port)
    write_switchyard_config "$WORK/switchyard-base.toml" "127.0.0.1:$BP" "127.0.0.1:$BA" "$THREADS" \
        "$SWITCHYARD_ROUTE${BENCH_BASE_TOML:-}"
    start_switchyard "$BENCH_BASE_BIN" "$WORK/switchyard-base.toml" "127.0.0.1:$BA"
    wait_h2 "http://127.0.0.1:$BP$PATH_" "switchyard-base"
    BASE_PID=$SY_PID
    targets+=(switchyard-base)
fi
if [[ "${BENCH_FLOOR:-0}" == 1 ]]; then
    (cd "$BENCH_ROOT" && cargo build --release --quiet --example h2_floor)
    FP=$(free_port)
    "$BENCH_ROOT/target/release/examples/h2_floor" "127.0.0.1:$FP" "$THREADS" \
        "127.0.0.1:$B1" "127.0.0.1:$B2" >"$WORK/floor.log" 2>&1 &
    FLOOR_PID=$!
    PIDS+=($!)
    wait_h2 "http://127.0.0.1:$FP$PATH_" "h2_floor"
    targets+=(floor)
fi
if [[ -n "${BENCH_TARGETS:-}" ]]; then
    read -ra targets <<<"$BENCH_TARGETS"
fi
port_of() {
    case "$1" in
    direct) echo "$B1" ;;
    haproxy) echo "$HP" ;;
    nginx) echo "$NP" ;;
    switchyard) echo "$SP" ;;
    floor) echo "$FP" ;;
    switchyard-base) echo "$BP" ;;
    esac
}
pid_of() {
    case "$1" in
    direct) echo "" ;;
    haproxy) echo "$HAPROXY_PID" ;;
    nginx) echo "$NGINX_PID" ;;
    switchyard) echo "$SWITCHYARD_PID" ;;
    floor) echo "$FLOOR_PID" ;;
    switchyard-base) echo "$BASE_PID" ;;
    esac
}
log "$(machine_line)"
for round in $(seq 1 "$ROUNDS"); do
    n=${#targets[@]}
    for i in $(seq 0 $((n - 1))); do
        t=${targets[$(((i + round - 1) % n))]}
        url="http://127.0.0.1:$(port_of "$t")$PATH_"
        pid=$(pid_of "$t")
        out="$WORK/h2load-$round-$t.txt"
        h2load -c 10 -m 20 -t 1 -D "$DURATION" --warm-up-time "$WARMUP" \
            -H 'content-type: application/grpc' ${BENCH_H2LOAD_ARGS:-} "$url" >"$out" 2>&1 &
        load=$!
        sleep "$WARMUP"
        c0=$(cpu_ticks "$pid")
        if [[ "${BENCH_PERF:-0}" == 1 && "$t" == switchyard ]]; then
            perf record -q -F 999 ${BENCH_PERF_ARGS:-} -p "$pid" -o "$WORK/perf.data" -- sleep "$((DURATION - 1))" 2>/dev/null || true
        fi
        wait "$load" || true
        c1=$(cpu_ticks "$pid")
        rps=$(awk '/^finished in/ {for (i=1;i<=NF;i++) if ($i ~ /req\/s/) {gsub(",","",$(i-1)); print $(i-1)}}' "$out")
        total=$(awk '/^requests:/ {print $2}' "$out")
        errors=$(awk '/^requests:/ {print $10 + $12}' "$out")
        cpu=$(awk -v c="$((c1 - c0))" -v n="${total:-0}" 'BEGIN { if (n > 0 && c > 0) printf "%.1f", c * 10000 / n; else print "-" }')
        printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$t" "${rps:-0}" "$cpu" "${errors:-?}" >>"$RESULTS"
        log "round $round $t: ${rps:-0} req/s, ${cpu} us CPU/request, errors ${errors:-?}"
    done
done

report() {
    echo "HTTP/2 gRPC-shaped (h2load -c 10 -m 20, ${DURATION}s, $ROUNDS round(s), $THREADS threads per proxy, h2c backends); $(machine_line)"
    echo
    echo "| target | median req/s | median CPU us/request | errors |"
    echo "| --- | --- | --- | --- |"
    python3 - "$RESULTS" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines()]
by = {}
for _, t, rps, cpu, err in rows:
    by.setdefault(t, []).append((float(rps), None if cpu == "-" else float(cpu), err))
med = {}
for t in ["direct", "haproxy", "nginx", "switchyard", "switchyard-base", "floor"]:
    v = by.get(t, [])
    if not v:
        continue
    rps = statistics.median([r for r, _, _ in v]) if v else 0
    cpus = [c for _, c, _ in v if c is not None]
    cpu = statistics.median(cpus) if cpus else None
    med[t] = (rps, cpu)
    errs = ",".join(e for _, _, e in v)
    print(f"| {t} | {rps:,.0f} | {'-' if cpu is None else f'{cpu:.1f}'} | {errs} |")
s = med.get("switchyard", (0, None))
for other in ["haproxy", "nginx", "switchyard-base", "floor"]:
    o = med.get(other, (0, None))
    if o[0] and s[0]:
        line = f"switchyard/{other}: {s[0] / o[0]:.2f}x rps"
        if s[1] and o[1]:
            line += f", {s[1] / o[1]:.2f}x CPU per request"
        print(f"\n{line}")
PY
}
report | tee "${BENCH_OUT:-/dev/null}"
if [[ -s "$WORK/perf.data" ]]; then
    echo
    echo "switchyard's profile (self time, top 40 symbols):"
    perf report -i "$WORK/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -40
fi
