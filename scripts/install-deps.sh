#!/usr/bin/env bash
# Installs what switchyard needs to build and test, when missing (Debian/Ubuntu, as root or with sudo):
#   protobuf-compiler libprotobuf-dev  (etcd-client's protos), cmake (pingora's zlib-ng),
#   etcd-server (integration tests and the demo), python3 and python3-venv (the gRPC tests' peers:
#   grpcio, pip-installed into target/grpc-venv when python3 cannot import it), curl (HTTP/2 and
#   TLS tests). Extra packages can be passed as arguments.
set -euo pipefail

wanted=(protobuf-compiler libprotobuf-dev cmake etcd-server python3 python3-venv curl "$@")
missing=()
for pkg in "${wanted[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]} == 0)); then
    exit 0
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    SUDO="sudo"
fi
echo "installing: ${missing[*]}" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# the etcd-server package may try to start a system etcd on 2379; tests use their own ports
