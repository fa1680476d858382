#!/usr/bin/env bash
# Checks the status page in a real headless browser (Debian's chromium): starts etcd, switchyard
# and two registered backends (one healthy, one draining), loads http://<admin>/ in chromium,
# checks the rendered DOM shows them, and saves a screenshot.
#
#   scripts/status-page-screenshot.sh [OUT.png]      (default: target/status-page.png)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/status-page.png}
scripts/install-deps.sh chromium
cargo build --locked --bin switchyard
BIN=target/debug/switchyard
source scripts/lib.sh
port() { free_port; }
EP=$(port); PP=$(port); PROXY=$(port); ADMIN=$(port); B1=$(port); B2=$(port)
etcd --name shot --data-dir "$WORK/etcd" --listen-client-urls "http://127.0.0.1:$EP" \
    --advertise-client-urls "http://127.0.0.1:$EP" --listen-peer-urls "http://127.0.0.1:$PP" \
    --initial-advertise-peer-urls "http://127.0.0.1:$PP" --initial-cluster "shot=http://127.0.0.1:$PP" \
    --log-level warn >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$EP/health" etcd
"$BIN" serve --listen "127.0.0.1:$PROXY" --admin-listen "127.0.0.1:$ADMIN" --etcd "http://127.0.0.1:$EP" \
    >"$WORK/switchyard.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$ADMIN/readyz" switchyard
echo ok >"$WORK/health" # python's file server then answers the /health check with 200
for p in "$B1" "$B2"; do
    python3 -m http.server "$p" --bind 127.0.0.1 --directory "$WORK" >/dev/null 2>&1 &
    PIDS+=($!)
    wait_http "http://127.0.0.1:$p/" backend
done
"$BIN" register --service catalog --addr "127.0.0.1:$B1" --id web-1 --meta zone=a --meta version=1.4.2 \
    --etcd "http://127.0.0.1:$EP" >"$WORK/r1.log" 2>&1 &
PIDS+=($!)
"$BIN" register --service catalog --addr "127.0.0.1:$B2" --id web-2 --weight 0 --meta zone=b \
    --etcd "http://127.0.0.1:$EP" >"$WORK/r2.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
    curl_out=$(python3 -c 'import sys,urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())' \
        "http://127.0.0.1:$ADMIN/api/services/catalog" 2>/dev/null || true)
    [[ "$curl_out" == *web-2* ]] && break
    sleep 0.1
done
# a little traffic so the counters show something (web-1 may still be waiting for its first check)
python3 - "http://127.0.0.1:$PROXY/" <<'PY'
import sys, time, urllib.request
ok, deadline = 0, time.time() + 10
while ok < 3 and time.time() < deadline:
    try:
        urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers={"Host": "catalog"})).read()
        ok += 1
    except Exception:
        time.sleep(0.1)
PY
CHROME=(chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run
    --disable-background-networking --disable-component-update --disable-sync
    --user-data-dir="$WORK/chrome" --window-size=1200,900)
DOM=$("${CHROME[@]}" --dump-dom "http://127.0.0.1:$ADMIN/" 2>/dev/null)
for want in "catalog" "web-1" "web-2" ">draining<" ">healthy<" "zone=a" "connected"; do
    if [[ "$DOM" != *"$want"* ]]; then
        echo "status page as rendered by chromium lacks '$want'" >&2
        exit 1
    fi
done
mkdir -p "$(dirname "$OUT")"
"${CHROME[@]}" --screenshot="$OUT" "http://127.0.0.1:$ADMIN/" >/dev/null 2>&1
test -s "$OUT"
echo "status page ok in chromium; screenshot: $OUT"
