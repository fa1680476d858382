#!/usr/bin/env bash
# The main job, locally: a local etcd, switchyard with its embedded default config (proxy on :8080,
# admin on 127.0.0.1:9090), two demo backends registered as service "demo" with
# `switchyard register`, and requests routed through the proxy.
#
#   scripts/demo.sh          run, show routed requests, stop everything
#   scripts/demo.sh --stay   keep everything running until Ctrl-C (status page: http://127.0.0.1:9090/)
set -euo pipefail
cd "$(dirname "$0")/.."
STAY=0
[[ "${1:-}" == "--stay" ]] && STAY=1

scripts/install-deps.sh
cargo build --locked --bin switchyard
BIN=target/debug/switchyard
source scripts/lib.sh

echo "== starting etcd on 127.0.0.1:2379 (data in $WORK/etcd)"
etcd --data-dir "$WORK/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
    --log-level warn >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
wait_http http://127.0.0.1:2379/health "etcd"

echo "== starting switchyard (embedded default config)"
"$BIN" >"$WORK/switchyard.log" 2>&1 &
PIDS+=($!)
wait_http http://127.0.0.1:9090/healthz "switchyard"

for n in 1 2; do
    port=$((18080 + n))
    mkdir -p "$WORK/b$n"
    python3 - "$port" "demo-$n" >"$WORK/b$n.log" 2>&1 <<'PY' &
import sys, http.server
port, name = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {name} (path {self.path})\n".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
PY
    PIDS+=($!)
    wait_http "http://127.0.0.1:$port/" "backend demo-$n"
    echo "== registering demo-$n at 127.0.0.1:$port"
    "$BIN" register --service demo --addr "127.0.0.1:$port" --id "demo-$n" --meta "zone=z$n" \
        >"$WORK/register$n.log" 2>&1 &
    PIDS+=($!)
done

echo "== registered services (switchyard services)"
for _ in $(seq 1 100); do
    if "$BIN" services 2>/dev/null | grep -q demo-2; then break; fi
    sleep 0.05
done
"$BIN" services

echo "== requests through the proxy"
python3 - <<'PY'
import time, urllib.request
def get(path, host=None):
    req = urllib.request.Request("http://127.0.0.1:8080" + path)
    if host:
        req.add_header("Host", host)
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status, r.read().decode().strip()
deadline = time.time() + 10
while True:
    try:
        seen = {get("/", "demo")[1] for _ in range(4)}
        if len(seen) == 2:
            break
    except Exception:
        pass
    if time.time() > deadline:
        raise SystemExit("demo: requests were not routed to both instances")
    time.sleep(0.05)
for i in range(4):
    print("  curl -H 'Host: demo' localhost:8080/      ->", *get("/", "demo"))
print("  curl localhost:8080/demo/some/path          ->", *get("/demo/some/path"))
try:
    get("/nosuch/")
except urllib.error.HTTPError as e:
    print("  curl localhost:8080/nosuch/               ->", e.code, e.read().decode().strip())
PY
echo "== status: http://127.0.0.1:9090/  metrics: http://127.0.0.1:9090/metrics  API: http://127.0.0.1:9090/api/services"
if ((STAY)); then
    echo "== running; Ctrl-C stops everything"
    wait
fi
