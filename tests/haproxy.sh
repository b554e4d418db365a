#!/usr/bin/env bash
# Scale-out test (issue 8): two mailer instances with separate spools and
# `proxy_protocol = true` behind one HAProxy frontend (send-proxy-v2) on loopback.
# The logic is in tests/haproxy.py; this wrapper finds or installs what it needs.
#
#   tests/haproxy.sh            uses target/debug/mailer (builds it when missing)
#   MAILER_BIN=path tests/haproxy.sh
#
# Installs HAProxy from Debian's packages when missing (needs root); prints SKIP and
# exits 0 when it cannot. Everything it starts is a child process it stops by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v haproxy >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
        echo "SKIP haproxy scale-out test: haproxy is not installed and we are not root"
        exit 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "SKIP haproxy scale-out test: haproxy is not installed and there is no apt-get"
        exit 0
    fi
    echo "== installing haproxy from the Debian packages"
    # Keep the package's init script from starting a system haproxy (Docker images
    # ship this policy already; add it only for the duration of the install).
    added_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    ok=
    if timeout 300 apt-get install -y -q --no-install-recommends haproxy >/dev/null 2>&1; then
        ok=1
    elif timeout 300 apt-get update -q >/dev/null 2>&1 &&
        timeout 300 apt-get install -y -q --no-install-recommends haproxy >/dev/null 2>&1; then
        ok=1
    fi
    if [ -n "$added_policy" ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    if [ -z "$ok" ] || ! command -v haproxy >/dev/null 2>&1; then
        echo "SKIP haproxy scale-out test: apt-get install haproxy failed"
        exit 0
    fi
fi
version=$(haproxy -v)
echo "${version%%$'\n'*}"

bin=${MAILER_BIN:-target/debug/mailer}
if [ ! -x "$bin" ]; then
    cargo build --quiet --bin mailer
fi
exec timeout 120 python3 tests/haproxy.py "$bin"
