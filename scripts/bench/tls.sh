#!/usr/bin/env bash
# TLS termination: wrk over https through nginx, HAProxy and switchyard (the TLS listener, a test
# certificate made here with openssl) to the same two HTTP/1.1 nginx backends. Two loads:
#   keepalive   wrk -c 50 on kept-alive connections: the cost of TLS records + proxying
#   handshakes  wrk -c 50 with "Connection: close": a full TLS handshake (no resumption) per request
# Each round measures every target once, in a rotated order; reported per target and load: median
# rps and the proxy's CPU time per request, with the switchyard/nginx and switchyard/HAProxy ratios.
#
# Environment (defaults in brackets):
#   BENCH_QUICK=1        smoke run: 1 round, 3 s per measurement, 1 s warm-up
#   BENCH_ROUNDS [3]     rounds;   BENCH_DURATION [10] seconds per measurement;  BENCH_WARMUP [2]
#   BENCH_THREADS [2]    worker threads/processes of each proxy (nothing pinned)
#   SWITCHYARD_BIN       use this binary instead of building target/release/switchyard
#   BENCH_OUT            also write the markdown report to this file
#   BENCH_KEEP=1         keep the temporary directory
set -euo pipefail
source "$(dirname "$0")/common.sh"

if [[ "${BENCH_QUICK:-0}" == 1 ]]; then
    ROUNDS="${BENCH_ROUNDS:-1}" DURATION="${BENCH_DURATION:-3}" WARMUP="${BENCH_WARMUP:-1}"
else
    ROUNDS="${BENCH_ROUNDS:-3}" DURATION="${BENCH_DURATION:-10}" WARMUP="${BENCH_WARMUP:-2}"
fi
THREADS="${BENCH_THREADS:-2}"

"$BENCH_ROOT/scripts/install-deps.sh" wrk nginx haproxy openssl
BIN=$(switchyard_bin)
[[ -x "$BIN" ]] || die "no switchyard binary at $BIN"

# a P-256 certificate for 127.0.0.1 (what nginx, HAProxy and rustls all serve fast)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=bench.test" -addext "subjectAltName=DNS:bench.test,IP:127.0.0.1" \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
cat "$WORK/cert.pem" "$WORK/key.pem" >"$WORK/haproxy.pem"

start_bench_backends ""

NP=$(free_port)
mkdir -p "$WORK/nginx-proxy"
cat >"$WORK/nginx-proxy/nginx.conf" <<EOF
$(nginx_main "$WORK/nginx-proxy" $THREADS)
events { worker_connections 4096; }
http {
$(nginx_http_common "$WORK/nginx-proxy")
    ssl_session_cache off;
    ssl_session_tickets off;
    upstream backends {
        server 127.0.0.1:$B1;
        server 127.0.0.1:$B2;
        keepalive 256;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NP ssl;
        ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem;
        location / {
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
        }
    }
}
EOF
nginx -p "$WORK/nginx-proxy" -c "$WORK/nginx-proxy/nginx.conf" -e "$WORK/nginx-proxy/error.log" \
    >"$WORK/nginx-proxy/stdout.log" 2>&1 &
PIDS+=($!)
NGINX_PID=$!

HP=$(free_port)
mkdir -p "$WORK/haproxy"
cat >"$WORK/haproxy/haproxy.cfg" <<EOF
global
    nbthread $THREADS
    maxconn 4000
    tune.ssl.cachesize 0
defaults
    mode http
    option http-keep-alive
    option forwardfor
    http-reuse always
    timeout connect 1s
    timeout client 30s
    timeout server 30s
frontend bench
    bind 127.0.0.1:$HP ssl crt $WORK/haproxy.pem no-tls-tickets
    default_backend backends
backend backends
    balance roundrobin
    server b1 127.0.0.1:$B1
    server b2 127.0.0.1:$B2
EOF
haproxy -db -f "$WORK/haproxy/haproxy.cfg" >"$WORK/haproxy/haproxy.log" 2>&1 &
PIDS+=($!)
HAPROXY_PID=$!

SP=$(free_port)
TP=$(free_port)
SA=$(free_port)
write_switchyard_config "$WORK/switchyard.toml" "127.0.0.1:$SP" "127.0.0.1:$SA" "$THREADS" "
[tls]
listen = \"127.0.0.1:$TP\"
[[tls.certificates]]
cert_file = \"$WORK/cert.pem\"
key_file = \"$WORK/key.pem\"

[[routing.routes]]
path_prefix = \"/\"
service = \"bench\"
"
start_switchyard "$BIN" "$WORK/switchyard.toml" "127.0.0.1:$SA"

wait_https() {
    for _ in $(seq 1 400); do
        [[ $(curl -sk -o /dev/null -w '%{http_code}' "$1") == 200 ]] && return 0
        sleep 0.025
    done
    die "$2 did not answer 200 over https ($1)"
}
wait_https "https://127.0.0.1:$NP/" nginx
wait_https "https://127.0.0.1:$HP/" haproxy
wait_https "https://127.0.0.1:$TP/" switchyard

RESULTS="$WORK/results.tsv" # load round target rps cpu_us errors
: >"$RESULTS"
targets=(nginx haproxy switchyard)
port_of() { case "$1" in nginx) echo "$NP" ;; haproxy) echo "$HP" ;; switchyard) echo "$TP" ;; esac; }
pid_of() { case "$1" in nginx) echo "$NGINX_PID" ;; haproxy) echo "$HAPROXY_PID" ;; switchyard) echo "$SY_PID" ;; esac; }
log "$(machine_line)"
for load in keepalive handshakes; do
    extra=()
    [[ "$load" == handshakes ]] && extra=(-H "Connection: close")
    for round in $(seq 1 "$ROUNDS"); do
        n=${#targets[@]}
        for i in $(seq 0 $((n - 1))); do
            t=${targets[$(((i + round - 1) % n))]}
            url="https://127.0.0.1:$(port_of "$t")/"
            pid=$(pid_of "$t")
            out="$WORK/wrk-$load-$round-$t.txt"
            wrk -t1 -c50 -d"${WARMUP}s" "${extra[@]}" "$url" >/dev/null 2>&1 || true
            c0=$(cpu_ticks "$pid")
            wrk -t1 -c50 -d"${DURATION}s" "${extra[@]}" "$url" >"$out" 2>&1 || true
            c1=$(cpu_ticks "$pid")
            python3 - "$out" "$load" "$round" "$t" "$((c1 - c0))" >>"$RESULTS" <<'PY'
import os, re, sys
path, load, rnd, target, ticks = sys.argv[1:]
text = open(path).read()
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
requests = int(re.search(r"(\d+) requests in", text).group(1))
errs = 0
m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
if m: errs += int(m.group(1))
m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
if m: errs += sum(int(x) for x in m.groups())
cpu = int(ticks) / os.sysconf("SC_CLK_TCK") * 1e6 / requests if requests else float("nan")
print(f"{load}\t{rnd}\t{target}\t{rps:.0f}\t{cpu:.1f}\t{errs}")
PY
            tail -n1 "$RESULTS" | awk -F'\t' '{printf "bench: %-10s round %s %-10s %8s rps  cpu/req %s us  errors %s\n", $1, $2, $3, $4, $5, $6}' >&2
        done
    done
done

report() {
    echo "TLS termination (wrk -c 50, ${DURATION}s, $ROUNDS round(s), $THREADS threads per proxy, P-256 certificate, no session resumption); $(machine_line)"
    echo
    echo "| load | target | median req/s | median CPU us/request | errors |"
    echo "| --- | --- | --- | --- | --- |"
    python3 - "$RESULTS" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines()]
by = {}
for load, _, t, rps, cpu, err in rows:
    by.setdefault((load, t), []).append((float(rps), float(cpu), err))
ratios = []
for load in ["keepalive", "handshakes"]:
    med = {}
    for t in ["nginx", "haproxy", "switchyard"]:
        v = by.get((load, t), [])
        rps = statistics.median([r for r, _, _ in v]) if v else 0
        cpu = statistics.median([c for _, c, _ in v]) if v else 0
        med[t] = (rps, cpu)
        print(f"| {load} | {t} | {rps:,.0f} | {cpu:.1f} | {','.join(e for _, _, e in v)} |")
    s = med["switchyard"]
    for o in ["nginx", "haproxy"]:
        if med[o][0] and med[o][1]:
            ratios.append(f"{load}: switchyard/{o} {s[0] / med[o][0]:.2f}x rps, {s[1] / med[o][1]:.2f}x CPU per request")
print()
for r in ratios:
    print(r + "  ")
PY
}
report | tee "${BENCH_OUT:-/dev/null}"
