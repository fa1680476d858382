# Shared helpers for the benchmark scripts in scripts/bench/ (sourced, not run).
#
# Everything runs on 127.0.0.1 and ephemeral ports. Every process a script starts is recorded in
# PIDS and stopped by pid on exit (newest first); the temporary directory WORK is removed unless
# BENCH_KEEP=1. Nothing here touches system services or system config files.

BENCH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PIDS=()
WORK="$(mktemp -d -t switchyard-bench.XXXXXX)"
chmod 755 "$WORK"

bench_cleanup() {
    local i pid
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid="${PIDS[$i]}"
        # a stopped process (SIGSTOP in the failure bench) must be continued to see SIGTERM
        kill -CONT "$pid" 2>/dev/null || true
        kill -TERM "$pid" 2>/dev/null || true
    done
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid="${PIDS[$i]}"
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.05
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
    if [[ "${BENCH_KEEP:-0}" == 1 ]]; then
        echo "bench: kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap bench_cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "bench: $*" >&2; }
die() {
    echo "bench: error: $*" >&2
    exit 1
}

# Stops one pid this script started and forgets it.
stop_pid() {
    local pid="$1" i
    kill -CONT "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for i in "${!PIDS[@]}"; do
        [[ "${PIDS[$i]}" == "$pid" ]] && unset 'PIDS[i]'
    done
    PIDS=("${PIDS[@]}")
}

# A TCP port on 127.0.0.1 that was free a moment ago.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_http URL WHAT [EXPECT_SUBSTRING]: bounded poll (10 s) until URL answers 2xx.
wait_http() {
    local url="$1" what="$2" expect="${3:-}"
    for _ in $(seq 1 400); do
        if python3 - "$url" "$expect" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=1) as r:
    if sys.argv[2] and sys.argv[2] not in r.read().decode():
        raise SystemExit(1)
PY
        sleep 0.025
    done
    die "$what did not come up ($url)"
}

# release_bin OVERRIDE PATH CARGO_TARGET_ARGS...: prints OVERRIDE when set, else builds (if needed)
# the release target and prints its PATH under the project root.
release_bin() {
    local override="$1" path="$2"
    shift 2
    if [[ -n "$override" ]]; then
        echo "$override"
        return
    fi
    (cd "$BENCH_ROOT" && cargo build --quiet --release "$@" >&2)
    echo "$BENCH_ROOT/$path"
}

# The release binary; SWITCHYARD_BIN overrides.
switchyard_bin() { release_bin "${SWITCHYARD_BIN:-}" target/release/switchyard --bin switchyard; }

# start_etcd: starts a fresh etcd with a temporary data dir; sets ETCD_URL and ETCD_PID.
# Optional $1: taskset cpu list (e.g. "1").
start_etcd() {
    local cpus="${1:-}" cport pport name
    cport=$(free_port)
    pport=$(free_port)
    name="sy-bench-$cport"
    local pre=()
    [[ -n "$cpus" ]] && pre=(taskset -c "$cpus")
    "${pre[@]}" etcd --name "$name" --data-dir "$WORK/etcd-$cport" \
        --listen-client-urls "http://127.0.0.1:$cport" --advertise-client-urls "http://127.0.0.1:$cport" \
        --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
        --initial-cluster "$name=http://127.0.0.1:$pport" --log-level warn \
        --quota-backend-bytes 4294967296 >"$WORK/etcd-$cport.log" 2>&1 &
    ETCD_PID=$!
    PIDS+=("$ETCD_PID")
    ETCD_URL="http://127.0.0.1:$cport"
    wait_http "$ETCD_URL/health" "etcd" '"health":"true"'
}

# etcd_put KEY VALUE: a plain put (no lease) through etcd's JSON gateway.
etcd_put() {
    python3 - "$ETCD_URL" "$1" "$2" <<'PY'
import base64, json, sys, urllib.request
url, k, v = sys.argv[1:]
b = lambda s: base64.b64encode(s.encode()).decode()
req = urllib.request.Request(url + "/v3/kv/put", data=json.dumps({"key": b(k), "value": b(v)}).encode())
urllib.request.urlopen(req, timeout=5).read()
PY
}

# nginx_http_common DIR: the http-block lines every bench nginx shares (no access log, temp files
# under DIR, unlimited keep-alive requests).
nginx_http_common() {
    cat <<EOF
    access_log off;
    client_body_temp_path $1/body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
    keepalive_requests 1000000;
EOF
}

root_user() { [[ $(id -u) -eq 0 ]] && echo "user root;" || true; }

# nginx_main DIR WORKERS: the main-context lines every nginx here starts with (its pid and error
# log under DIR, in the foreground, as root when run as root).
nginx_main() {
    root_user
    printf 'daemon off;\nworker_processes %s;\npid %s/nginx.pid;\nerror_log %s/error.log warn;\n' "$2" "$1" "$1"
}

# start_nginx_backend PORT NAME [CPUS]: a single-process nginx (master_process off) answering every
# request with a fixed 200 body. Sets BACKEND_PID.
start_nginx_backend() {
    local port="$1" name="$2" cpus="${3:-}" dir="$WORK/backend-$2" nofile
    # health checks keep a connection per instance (up to half of switchyard's open-file limit)
    nofile=$(ulimit -Hn)
    [[ "$nofile" =~ ^[0-9]+$ ]] && ((nofile <= 65536)) || nofile=65536
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<EOF
$(nginx_main "$dir" 1)
master_process off;
worker_rlimit_nofile $nofile;
events { worker_connections $((nofile - 512)); }
http {
$(nginx_http_common "$dir")
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$port reuseport;
        default_type text/plain;
        location / { return 200 "hello from $name\n"; }
    }
}
EOF
    local pre=()
    [[ -n "$cpus" ]] && pre=(taskset -c "$cpus")
    "${pre[@]}" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/stdout.log" 2>&1 &
    BACKEND_PID=$!
    PIDS+=("$BACKEND_PID")
    wait_http "http://127.0.0.1:$port/" "backend $name" "hello from $name"
}

# The Consul API off ([consul] enabled = false) when $BIN knows the section: benches may run two
# switchyards at once, and both would want 127.0.0.1:8500. Older binaries get nothing.
consul_off_toml() {
    local probe="$WORK/consul-off.toml"
    printf '[consul]\nenabled = false\n' >"$probe"
    if [[ -n "${BIN:-}" ]] && "$BIN" check-config "$probe" >/dev/null 2>&1; then
        cat "$probe"
    fi
}

# write_switchyard_config FILE LISTEN ADMIN THREADS [EXTRA_TOML]
write_switchyard_config() {
    local file="$1" listen="$2" admin="$3" threads="$4" extra="${5:-}"
    cat >"$file" <<EOF
[proxy]
listen = "$listen"
threads = $threads
keepalive_pool_size = 1024
${BENCH_SWITCHYARD_PROXY_TOML:-}

[admin]
listen = "$admin"

[etcd]
endpoints = ["$ETCD_URL"]

[log]
level = "warn"
access_log = false
$(consul_off_toml)
$extra
EOF
}

# start_switchyard BIN CONFIG ADMIN_ADDR [CPUS]: sets SY_PID; waits for /readyz.
start_switchyard() {
    local bin="$1" cfg="$2" admin="$3" cpus="${4:-}" pre=()
    [[ -n "$cpus" ]] && pre=(taskset -c "$cpus")
    "${pre[@]}" "$bin" serve --config "$cfg" >"$cfg.log" 2>&1 &
    SY_PID=$!
    PIDS+=("$SY_PID")
    wait_http "http://$admin/readyz" "switchyard"
}

# start_bench_backends CPUS: nginx backends b1 and b2 and an etcd, with both registered as service
# "bench", on CPUS ("" = unpinned). Sets B1, B2, BE1_PID, BE2_PID.
start_bench_backends() {
    local cpus="$1"
    B1=$(free_port)
    B2=$(free_port)
    start_nginx_backend "$B1" b1 "$cpus"
    BE1_PID=$BACKEND_PID
    start_nginx_backend "$B2" b2 "$cpus"
    BE2_PID=$BACKEND_PID
    start_etcd "$cpus"
    etcd_put /services/bench/b1 "127.0.0.1:$B1"
    etcd_put /services/bench/b2 "127.0.0.1:$B2"
}

# start_bench_proxies THREADS CPUS CONFIG: nginx, HAProxy and switchyard ($BIN, config written to
# CONFIG) in front of the bench backends, THREADS workers/threads each, on CPUS ("" = unpinned).
# Sets NP, HP, SP (proxy ports) and SA (switchyard's admin port).
start_bench_proxies() {
    local threads="$1" cpus="$2" cfg="$3"
    NP=$(free_port)
    HP=$(free_port)
    SP=$(free_port)
    SA=$(free_port)
    start_nginx_proxy "$NP" "$threads" "$cpus"
    start_haproxy "$HP" "$threads" "$cpus"
    write_switchyard_config "$cfg" "127.0.0.1:$SP" "127.0.0.1:$SA" "$threads" "${BENCH_SWITCHYARD_TOML:-}"
    start_switchyard "$BIN" "$cfg" "127.0.0.1:$SA" "$cpus"
}

# CPU time (user + system, in clock ticks of 1/100 s) of a pid and its child processes (nginx's
# workers); 0 for an empty pid.
cpu_ticks() {
    local pid="$1" t=0 q
    [[ -n "$pid" ]] || { echo 0; return; }
    for q in "$pid" $(pgrep -P "$pid" || true); do
        [[ -r "/proc/$q/stat" ]] || continue
        # fields after the ")" of the command name: utime and stime are the 12th and 13th
        t=$((t + $(sed 's/.*) //' "/proc/$q/stat" | awk '{print $12 + $13}')))
    done
    echo "$t"
}

# Resident set size of a pid in KiB.
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

machine_line() {
    local model
    model=$(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo)
    echo "nproc=$(nproc), CPU: ${model:-unknown}, load average: $(cut -d' ' -f1-3 /proc/loadavg)"
}

# The release harness example; BENCH_HARNESS overrides.
harness_bin() {
    release_bin "${BENCH_HARNESS:-}" target/release/examples/bench_harness --example bench_harness
}

# health_toml MODE: the [health] section for a bench config: "default" (nothing, the defaults
# apply) or "off" (enabled = false).
health_toml() {
    case "$1" in
    default) echo "" ;;
    off) printf '\n[health]\nenabled = false\n' ;;
    *) die "unknown health mode $1 (default|off)" ;;
    esac
}

# start_nginx_proxy PORT WORKERS CPUS: nginx as a round-robin proxy to 127.0.0.1:$B1 and :$B2
# (upstream keep-alive, access log off). Sets NGINX_PID.
start_nginx_proxy() {
    local port="$1" workers="$2" cpus="$3" dir="$WORK/nginx-proxy"
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<EOF
$(nginx_main "$dir" $workers)
events { worker_connections 4096; }
http {
$(nginx_http_common "$dir")
    upstream backends {
        server 127.0.0.1:$B1;
        server 127.0.0.1:$B2;
        keepalive 256;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$port;
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
    local pre=()
    [[ -n "$cpus" ]] && pre=(taskset -c "$cpus")
    "${pre[@]}" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/stdout.log" 2>&1 &
    PIDS+=($!)
    NGINX_PID=$!
    wait_http "http://127.0.0.1:$port/" "nginx proxy" "hello from"
}

# start_haproxy PORT THREADS CPUS: HAProxy, round robin to $B1 and $B2, http-reuse always, no
# logs. Sets HAPROXY_PID.
start_haproxy() {
    local port="$1" threads="$2" cpus="$3" dir="$WORK/haproxy"
    mkdir -p "$dir"
    cat >"$dir/haproxy.cfg" <<EOF
global
    nbthread $threads
    maxconn 4000
defaults
    mode http
    option http-keep-alive
    option forwardfor
    http-reuse always
    timeout connect 1s
    timeout client 30s
    timeout server 30s
frontend bench
    bind 127.0.0.1:$port
    default_backend backends
backend backends
    balance roundrobin
    server b1 127.0.0.1:$B1
    server b2 127.0.0.1:$B2
EOF
    local pre=()
    [[ -n "$cpus" ]] && pre=(taskset -c "$cpus")
    "${pre[@]}" haproxy -db -f "$dir/haproxy.cfg" >"$dir/haproxy.log" 2>&1 &
    PIDS+=($!)
    HAPROXY_PID=$!
    wait_http "http://127.0.0.1:$port/" "haproxy" "hello from"
}

