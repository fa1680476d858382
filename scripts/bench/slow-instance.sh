#!/usr/bin/env bash
# Traffic policies against misbehaving instances (issue 18): three instances, one of them slow or
# failing; switchyard, nginx and HAProxy side by side in the same run, under the same
# latency-correct load (examples/bench_harness.rs `open-loop`: requests at a fixed rate, each
# latency counted from when the request was due, so a stall cannot hide behind a waiting client).
#
# Backends: three small Python asyncio HTTP/1.1 servers (b1, b2, b3) answering "hello from bN";
# /health always answers 200 at once. Scenarios, each measured through every proxy in turn:
#   healthy   all three answer at once (the reference p99)
#   slow      b3 answers BENCH_SLOW_MS [50] ms later (its /health at once: it passes its checks)
#   errors    b3 answers 503 to BENCH_ERROR_PCT [30] % of requests
#   stall     b3 stalls for the first 200 ms of every second (a GC pause): requests that come
#             then wait for its end (not in the default BENCH_SCENARIOS)
# Proxies (all keep-alive to the instances, access logs off):
#   switchyard  p2c_ewma; in "errors" also retry_on = ["5xx"] (outlier detection is on by default)
#   nginx       least_conn; in "errors" proxy_next_upstream error timeout http_503 (its retry)
#   haproxy     leastconn; in "errors" retry-on 503 with retries 2 and option redispatch
# Reported per scenario and proxy: p50, p99, p99.9 (ms), client-visible errors, and the share of
# requests b3 answered.
#
# Environment (defaults in brackets):
#   BENCH_QUICK=1         5 s per measurement instead of BENCH_DURATION
#   BENCH_DURATION [20]   seconds per measurement;  BENCH_RATE [600] requests per second
#   BENCH_SCENARIOS ["healthy slow errors"];  BENCH_SLOW_MS [50];  BENCH_ERROR_PCT [30]
#   SWITCHYARD_BIN, BENCH_HARNESS, BENCH_OUT, BENCH_KEEP=1 (as the other scripts)
# Default runtime: 3 scenarios x 3 proxies x (20 s + 3 s warm-up), about 4 minutes.
set -euo pipefail
source "$(dirname "$0")/common.sh"

if [[ "${BENCH_QUICK:-0}" == 1 ]]; then DURATION="${BENCH_DURATION:-5}"; else DURATION="${BENCH_DURATION:-20}"; fi
RATE="${BENCH_RATE:-600}"
SCENARIOS="${BENCH_SCENARIOS:-healthy slow errors}"
SLOW_MS="${BENCH_SLOW_MS:-50}"
ERROR_PCT="${BENCH_ERROR_PCT:-30}"
((DURATION >= 1 && DURATION <= 300)) || die "BENCH_DURATION must be 1..300"
((RATE >= 10 && RATE <= 20000)) || die "BENCH_RATE must be 10..20000"

"$BENCH_ROOT/scripts/install-deps.sh" nginx haproxy
BIN=$(switchyard_bin)
HARNESS=$(harness_bin)

# The instance: GET only, keep-alive; DELAY_MS before every answer, FAIL_PCT % of them 503.
cat >"$WORK/backend.py" <<'PY'
import asyncio, random, sys, time
port, name, delay_ms, fail_pct = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
stall = len(sys.argv) > 5 and sys.argv[5] == "stall"
ok = f"hello from {name}\n".encode()
bad = f"{name} unavailable\n".encode()
def answer(status, body):
    return b"HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.split(b" ", 2)[1].startswith(b"/health"):
                writer.write(answer(b"200 OK", b"ok\n"))
            else:
                if delay_ms:
                    await asyncio.sleep(delay_ms / 1000)
                if stall and time.monotonic() % 1.0 < 0.2:
                    await asyncio.sleep(0.2 - time.monotonic() % 1.0)
                if fail_pct and random.random() * 100 < fail_pct:
                    writer.write(answer(b"503 Service Unavailable", bad))
                else:
                    writer.write(answer(b"200 OK", ok))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, IndexError):
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()
asyncio.run(main())
PY

# start_backends SLOW_MS FAIL_PCT [stall]: b1, b2 normal; b3 with the given delay, failure share
# (and stalls).
start_backends() {
    local i delay fail mode
    for i in 1 2 3; do
        delay=0 fail=0 mode=""
        [[ $i == 3 ]] && delay="$1" fail="$2" mode="${3:-}"
        PORT[$i]=$(free_port)
        python3 "$WORK/backend.py" "${PORT[$i]}" "b$i" "$delay" "$fail" $mode >"$WORK/b$i.log" 2>&1 &
        BPID[$i]=$!
        PIDS+=("${BPID[$i]}")
        wait_http "http://127.0.0.1:${PORT[$i]}/health" "backend b$i"
    done
}

stop_backends() { for i in 1 2 3; do stop_pid "${BPID[$i]}"; done; }

# start_peers SCENARIO: nginx (least_conn) and HAProxy (leastconn) in front of b1..b3.
start_peers() {
    local scenario="$1" dir="$WORK/nginx-$1" next="error timeout" hretry=""
    [[ "$scenario" == errors ]] && next="error timeout http_503" \
        && hretry=$'    retry-on 503\n    retries 2\n    option redispatch 1'
    NP=$(free_port) HP=$(free_port)
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<EOF
$(nginx_main "$dir" 1)
events { worker_connections 4096; }
http {
$(nginx_http_common "$dir")
    upstream backends {
        least_conn;
        server 127.0.0.1:${PORT[1]};
        server 127.0.0.1:${PORT[2]};
        server 127.0.0.1:${PORT[3]};
        keepalive 256;
    }
    server {
        listen 127.0.0.1:$NP;
        location / {
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream $next;
        }
    }
}
EOF
    nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/stdout.log" 2>&1 &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")
    cat >"$WORK/haproxy-$scenario.cfg" <<EOF
global
    nbthread 1
    maxconn 4000
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 1s
    timeout client 30s
    timeout server 30s
frontend bench
    bind 127.0.0.1:$HP
    default_backend backends
backend backends
    balance leastconn
$hretry
    server b1 127.0.0.1:${PORT[1]}
    server b2 127.0.0.1:${PORT[2]}
    server b3 127.0.0.1:${PORT[3]}
EOF
    haproxy -db -f "$WORK/haproxy-$scenario.cfg" >"$WORK/haproxy-$scenario.log" 2>&1 &
    HAPROXY_PID=$!
    PIDS+=("$HAPROXY_PID")
    wait_http "http://127.0.0.1:$NP/" "nginx" "hello from"
    wait_http "http://127.0.0.1:$HP/" "haproxy" "hello from"
}

# start_sy SCENARIO: switchyard with p2c_ewma (and retry_on 5xx for "errors") over b1..b3.
start_sy() {
    local scenario="$1" extra
    SP=$(free_port) SA=$(free_port)
    extra=$'[traffic]\npolicy = "p2c_ewma"'
    [[ "$scenario" == errors ]] && extra+=$'\nretry_on = ["reset", "5xx"]'
    write_switchyard_config "$WORK/sy-$scenario.toml" "127.0.0.1:$SP" "127.0.0.1:$SA" 1 "$extra"
    start_switchyard "$BIN" "$WORK/sy-$scenario.toml" "127.0.0.1:$SA"
    for i in 1 2 3; do etcd_put "/services/bench/b$i" "127.0.0.1:${PORT[$i]}"; done
    python3 - "$SA" <<'PY' || die "switchyard did not admit the three instances"
import json, sys, time, urllib.request
deadline = time.time() + 10
while time.time() < deadline:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/services/bench", timeout=1) as r:
            if json.load(r).get("usable") == 3:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.05)
sys.exit(1)
PY
}

ROWS="$WORK/rows.tsv"
: >"$ROWS"
log "$(machine_line)"
log "rate=$RATE/s duration=${DURATION}s scenarios: $SCENARIOS; binary $BIN"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
start_etcd
for scenario in $SCENARIOS; do
    case "$scenario" in
    healthy) start_backends 0 0 ;;
    slow) start_backends "$SLOW_MS" 0 ;;
    errors) start_backends 0 "$ERROR_PCT" ;;
    stall) start_backends 0 0 stall ;;
    *) die "unknown scenario $scenario" ;;
    esac
    start_peers "$scenario"
    start_sy "$scenario"
    declare -A ADDR=([switchyard]="127.0.0.1:$SP" [nginx]="127.0.0.1:$NP" [haproxy]="127.0.0.1:$HP")
    for proxy in switchyard nginx haproxy; do
        # a warm-up at the same rate (connections, latency estimates, and the first ejections)
        "$HARNESS" open-loop --proxy "${ADDR[$proxy]}" --rate "$RATE" --duration-ms 3000 >/dev/null
        "$HARNESS" open-loop --proxy "${ADDR[$proxy]}" --rate "$RATE" \
            --duration-ms "$((DURATION * 1000))" --label "$scenario	$proxy" | tee -a "$ROWS" >&2
    done
    if [[ "$scenario" == errors ]]; then
        log "switchyard metrics: $(python3 - "$SA" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=2).read().decode()
print("; ".join(l for l in text.splitlines() if not l.startswith("#") and ("outlier" in l or "retr" in l) and "bench" in l))
PY
)"
    fi
    stop_pid "$SY_PID"
    stop_pid "$HAPROXY_PID"
    stop_pid "$NGINX_PID"
    stop_backends
    python3 - "$ETCD_URL" <<'PY'
import base64, json, sys, urllib.request
b = lambda s: base64.b64encode(s.encode()).decode()
req = urllib.request.Request(sys.argv[1] + "/v3/kv/deleterange",
    data=json.dumps({"key": b("/services/"), "range_end": b("/services0")}).encode())
urllib.request.urlopen(req, timeout=5).read()
PY
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$ROWS" "$RATE" "$DURATION" "$SLOW_MS" "$ERROR_PCT" "$LOAD_BEFORE" "$LOAD_AFTER" <<'PY' | tee "${BENCH_OUT:-/dev/null}"
import sys
path, rate, dur, slow, pct, before, after = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
print(f"open loop {rate} requests/s for {dur} s per row; b3 slow by {slow} ms / answering 503 to {pct} % /"
      f" stalling 200 ms a second;"
      f" load average before {before}, after {after}\n")
print("| scenario | proxy | p50 ms | p99 ms | p99.9 ms | max ms | client errors | b3's share |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
p99 = {}
for scenario, proxy, n, errs, p50, q99, q999, mx, shares in rows:
    by = dict(kv.split("=") for kv in shares.split(",") if "=" in kv)
    n = int(n)
    b3 = int(by.get("b3", 0))
    p99[(scenario, proxy)] = float(q99)
    print(f"| {scenario} | {proxy} | {float(p50):.2f} | {float(q99):.2f} | {float(q999):.2f} | {float(mx):.1f} | "
          f"{int(errs)} of {n} ({100 * int(errs) / max(n, 1):.2f} %) | {100 * b3 / max(n, 1):.1f} % |")
if ("healthy", "switchyard") in p99 and ("slow", "switchyard") in p99:
    print(f"\nswitchyard's p99 with a slow instance / with three healthy ones: "
          f"{p99[('slow', 'switchyard')] / p99[('healthy', 'switchyard')]:.2f}x (target <= 2x)")
PY
