#!/usr/bin/env bash
# Consul API blocking queries: BENCH_QUERIES (1,000) concurrent `GET /v1/health/service/<name>
# ?index=I&wait=5m` held open on switchyard's Consul-compatible API, then a registration change.
#
# Starts etcd and the release switchyard (Consul API on a free port), registers service "bench"
# through the API, then per round:
#   1. opens BENCH_QUERIES connections, each with one blocking query at the current index, and
#      waits until switchyard_consul_blocking_queries says all are held;
#   2. samples switchyard's RSS (VmRSS) while they are held; memory per held query is the RSS
#      over the RSS before the first round (same connections idle), divided by the number held;
#   3. registers one more instance through the API (PUT /v1/agent/service/register) and times,
#      for every query, from just before that PUT is sent to the end of its answer.
# Reported: memory per held query (KiB, user space: kernel socket buffers are not in RSS) and the
# time from the change to each answer: the first (the change's own way through etcd and
# switchyard), p50, p99 and the last, over all rounds. The client is one Python asyncio process
# reading every answer in turn: past the first answer, the times include its own pace.
#
# Environment: BENCH_QUERIES [1000], BENCH_ROUNDS [5], SWITCHYARD_BIN, BENCH_OUT (also write the
# markdown table there), BENCH_KEEP=1.
set -euo pipefail
source "$(dirname "$0")/common.sh"

QUERIES="${BENCH_QUERIES:-1000}"
ROUNDS="${BENCH_ROUNDS:-5}"
((QUERIES >= 1 && QUERIES <= 20000)) || die "BENCH_QUERIES must be 1..20000"
((ROUNDS >= 1 && ROUNDS <= 100)) || die "BENCH_ROUNDS must be 1..100"

"$BENCH_ROOT/scripts/install-deps.sh"
BIN=$(switchyard_bin)
# a descriptor per held query, on both sides
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
(($(ulimit -n) > QUERIES + 200)) || die "ulimit -n $(ulimit -n) is too low for $QUERIES queries"

start_etcd
SP=$(free_port)
SA=$(free_port)
SC=$(free_port)
cfg="$WORK/switchyard.toml"
write_switchyard_config "$cfg" "127.0.0.1:$SP" "127.0.0.1:$SA" 2 \
    "$(printf '[health]\nenabled = false\n')"
# the Consul API on (write_switchyard_config turned it off): replace that section
python3 - "$cfg" "$SC" <<'PY'
import sys
path, port = sys.argv[1], sys.argv[2]
text = open(path).read().replace("[consul]\nenabled = false\n", "")
open(path, "w").write(text + f'\n[consul]\nlisten = "127.0.0.1:{port}"\n')
PY
start_switchyard "$BIN" "$cfg" "127.0.0.1:$SA"
log "switchyard $SY_PID: Consul API on 127.0.0.1:$SC, $QUERIES blocking queries x $ROUNDS rounds"

python3 - "$SC" "127.0.0.1:$SA" "$SY_PID" "$QUERIES" "$ROUNDS" "${BENCH_OUT:-}" <<'PY'
import asyncio, json, resource, sys, time, urllib.request

consul, admin, pid, n, rounds, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

def rss_kib():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit("no VmRSS")

def register(i):
    body = json.dumps({"Name": "bench", "ID": f"bench-{i}", "Address": "127.0.0.1", "Port": 10000 + i}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{consul}/v1/agent/service/register", data=body, method="PUT")
    urllib.request.urlopen(req, timeout=10).read()

def index():
    with urllib.request.urlopen(f"http://127.0.0.1:{consul}/v1/health/service/bench", timeout=10) as r:
        return int(r.headers["X-Consul-Index"])

def held():
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("switchyard_consul_blocking_queries "):
            return float(line.split()[1])
    return 0.0

async def open_conn():
    return await asyncio.open_connection("127.0.0.1", int(consul))

async def ask(conn, idx):
    reader, writer = conn
    writer.write(f"GET /v1/health/service/bench?index={idx}&wait=5m HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    await writer.drain()

async def answer(conn):
    reader, _ = conn
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length"))
    await reader.readexactly(length)
    return time.perf_counter()

async def main():
    register(0)
    conns = [await open_conn() for _ in range(n)]
    await asyncio.sleep(0.5)
    base = rss_kib()
    per_query, delays = [], []
    for r in range(1, rounds + 1):
        idx = index()
        for c in conns:
            await ask(c, idx)
        deadline = time.time() + 30
        while held() < n:
            if time.time() > deadline:
                raise SystemExit(f"only {held()} of {n} queries held after 30 s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        per_query.append((rss_kib() - base) / n)
        waiting = [asyncio.ensure_future(answer(c)) for c in conns]
        t0 = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, register, r)
        done = await asyncio.gather(*waiting)
        delays.extend((t - t0) * 1000 for t in done)
        print(f"round {r}: {per_query[-1]:.1f} KiB per held query, all {n} answered "
              f"{max(done) - t0:.3f} s after the change", file=sys.stderr)
    delays.sort()
    pct = lambda p: delays[min(len(delays) - 1, int(p * len(delays)))]
    per_query.sort()
    mem = per_query[len(per_query) // 2]
    table = (
        f"| held queries | rounds | memory per held query (median) | change → first answered | p50 | p99 | all (max) |\n"
        f"| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        f"| {n:,} | {rounds} | {mem:.1f} KiB | {delays[0]:.1f} ms | {pct(0.50):.1f} ms | {pct(0.99):.1f} ms | {delays[-1]:.1f} ms |\n"
    )
    print(table)
    if out:
        open(out, "w").write(table)

asyncio.run(main())
PY
