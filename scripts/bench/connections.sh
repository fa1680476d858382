#!/usr/bin/env bash
# Memory per idle client connection: nginx, HAProxy and switchyard (1 worker/thread each, the
# same two nginx backends) each get BENCH_IDLE_CONNS [3000] keep-alive client connections that
# make one request each and then stay open and idle. Reported: the proxy's resident memory before,
# with every connection just served, and after BENCH_IDLE_WAIT [3] seconds of idleness (switchyard
# holds no buffers for an idle connection: they are taken when the next request's bytes arrive), in
# total and per connection.
#
# Environment: BENCH_IDLE_CONNS [3000] (at most 3500: the bench nginx allows 4096 connections and
# HAProxy 4000),
# BENCH_IDLE_WAIT [3], SWITCHYARD_BIN, BENCH_OUT, BENCH_KEEP=1.
set -euo pipefail
source "$(dirname "$0")/common.sh"

N="${BENCH_IDLE_CONNS:-3000}"
WAIT="${BENCH_IDLE_WAIT:-3}"
((N >= 1 && N <= 3500)) || die "BENCH_IDLE_CONNS must be 1..3500"
((WAIT >= 0 && WAIT <= 60)) || die "BENCH_IDLE_WAIT must be 0..60"
"$BENCH_ROOT/scripts/install-deps.sh" nginx haproxy
BIN=$(switchyard_bin)
log "$(machine_line)"

start_bench_backends ""
start_bench_proxies 1 "" "$WORK/switchyard.toml"
# nginx's master process does not serve: measure its worker
NGINX_WORKER=$(awk -v p="$NGINX_PID" '$4 == p {print $1; exit}' /proc/[0-9]*/stat 2>/dev/null || true)
[[ -n "$NGINX_WORKER" ]] || die "no nginx worker found"

ROWS="$WORK/rows.tsv"
: >"$ROWS"
for target in nginx:"$NP":"$NGINX_WORKER" haproxy:"$HP":"$HAPROXY_PID" switchyard:"$SP":"$SY_PID"; do
    IFS=: read -r name port pid <<<"$target"
    python3 - "$name" "$port" "$pid" "$N" "$WAIT" >>"$ROWS" <<'PY'
import socket, sys, time
name, port, pid, n, wait = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
before = rss()
req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
socks = []
deadline = time.time() + 120
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(req)
    got = b""
    while b"hello from" not in got:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit(f"{name}: connection {i} closed")
        got += chunk
    socks.append(s)
    if time.time() > deadline:
        sys.exit(f"{name}: too slow")
served = rss()
time.sleep(wait)
idle = rss()
for s in socks:
    s.close()
print(f"{name}\t{n}\t{before}\t{served}\t{idle}")
PY
done

python3 - "$ROWS" "$WAIT" <<'PY' | tee "${BENCH_OUT:-/dev/null}"
import sys
rows = [l.split("\t") for l in open(sys.argv[1]) if l.strip()]
print(f"idle keep-alive client connections, one request each, then {sys.argv[2]} s idle\n")
print("| proxy | connections | RSS before MiB | RSS served MiB | RSS idle MiB | KiB per connection (served) | KiB per connection (idle) |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for name, n, before, served, idle in rows:
    n, before, served, idle = int(n), int(before), int(served), int(idle)
    print(f"| {name} | {n} | {before/1024:.1f} | {served/1024:.1f} | {idle/1024:.1f} | "
          f"{(served-before)/n:.1f} | {(idle-before)/n:.1f} |")
PY
