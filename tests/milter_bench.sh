#!/usr/bin/env bash
# Issue 16's measurement: durable throughput at 32 sessions (4 KiB, 1 rcpt, 10 messages
# per connection, pipelining, fsync on) without a milter and with OpenDKIM (verifying,
# Unix socket) in the path, in one run, alternating, REPS times each.
#
#   REPS=3 SECS=8 tests/milter_bench.sh     # root (NSD on 127.53.53.53:53); release build
#
# Prints one JSON line per run and the medians. Daemons are stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${REPS:-3}
secs=${SECS:-8}
cargo build -q --release --bin mailer --example loadgen
mailer=$PWD/target/release/mailer
loadgen=$PWD/target/release/examples/loadgen

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "${keep:-}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() {
    local what=$1; shift
    for _ in $(seq 200); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "timed out waiting for $what"; exit 1
}
tcp_open() { python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',int(sys.argv[1])),1)" "$1"; }

dns_ip=127.53.53.53
python3 tests/milter/real.py setup "$work" "$dns_ip" "$(free_port)" >/dev/null
# loadgen's messages carry no signature, so OpenDKIM looks nothing up: leave its
# resolver at the default. (Its libunbound reads ResolverConfiguration again per
# connection, and that parser is not thread-safe: under 32 concurrent sessions
# OpenDKIM 2.11 aborts with "fatal flex scanner internal error".)
sed -i '/^ResolverConfiguration/d' "$work/opendkim.conf"
nsd -d -c "$work/nsd.conf" >"$work/nsd.out" 2>&1 &
pids+=($!)
opendkim -f -x "$work/opendkim.conf" >"$work/opendkim.out" 2>&1 &
pids+=($!)
wait_for "OpenDKIM" test -S "$work/opendkim.sock"

start_mailer() { # name port [milter-address]
    mkdir -p "$work/$1"
    {
        printf 'hostname = "mx.test"\n[server]\nlisten = ["127.0.0.1:%s"]\nstats_interval_secs = 0\nmax_connections_per_ip = 1000\n' "$2"
        printf '[spool]\ndir = "%s"\nfsync = true\n' "$work/$1/spool"
        if [ -n "${3:-}" ]; then printf '[[milter]]\naddress = "%s"\n' "$3"; fi
    } >"$work/$1/mailer.toml"
    RUST_LOG=warn "$mailer" --config "$work/$1/mailer.toml" >"$work/$1/out" 2>&1 &
    pids+=($!)
    wait_for "mailer $1" tcp_open "$2"
}
plain_port=$(free_port)
dkim_port=$(free_port)
start_mailer plain "$plain_port"
start_mailer opendkim "$dkim_port" "unix:$work/opendkim.sock"

declare -A rates
for r in $(seq "$reps"); do
    for cell in plain opendkim; do
        port=$plain_port; [ $cell = opendkim ] && port=$dkim_port
        sync
        out=$("$loadgen" --host 127.0.0.1 --port "$port" --sessions 32 --messages 1000000 \
            --size 4096 --rcpts 1 --per-conn 10 --pipelining --timeout "$secs")
        echo "$cell rep $r: $out"
        rates[$cell]+="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["msgs_per_sec"])' "$out") "
    done
done
python3 - "${rates[plain]}" "${rates[opendkim]}" <<'PY'
import statistics, sys
plain = statistics.median(float(x) for x in sys.argv[1].split())
dkim = statistics.median(float(x) for x in sys.argv[2].split())
print("median msgs/s: no milter %.0f, OpenDKIM %.0f (%.0f %%)" % (plain, dkim, 100 * dkim / plain))
PY
