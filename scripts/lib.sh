# Shared helpers for scripts/demo.sh and scripts/status-page-screenshot.sh (sourced, not run).
# Sets WORK (a temporary directory) and PIDS; on exit, stops the recorded pids newest first
# (registrars deregister on SIGTERM) and removes WORK.

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill "${PIDS[$i]}" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# wait_http URL WHAT: waits up to 10 s for URL to answer 2xx.
wait_http() {
    for _ in $(seq 1 200); do
        python3 -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$1" \
            2>/dev/null && return 0
        sleep 0.05
    done
    echo "$2 did not come up ($1)" >&2
    exit 1
}

# free_port: a loopback port that was free a moment ago.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
