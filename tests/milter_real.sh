#!/usr/bin/env bash
# Issue 16: mailer with real milters, OpenDKIM (verifying, over a Unix socket) then
# OpenDMARC (RejectFailures, over TCP), resolving through NSD serving a throwaway test
# zone on a loopback address. DKIM keys are made at test time (RSA with
# opendkim-genkey, Ed25519 with PyNaCl) and fixtures are signed with dkimpy.
#
#   tests/milter_real.sh            # needs root (NSD binds port 53 on 127.53.53.53,
#                                   # OpenDMARC runs in its own mount namespace)
#
# OpenDKIM resolves with libunbound, pointed at NSD by its ResolverConfiguration.
# OpenDMARC uses the system resolver (port 53 only, from /etc/resolv.conf), so it runs
# under `unshare --mount` with a private resolv.conf bind-mounted: the host's resolver
# setting is never touched. Every daemon runs in the foreground and is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's python3, where python3-dkim and python3-nacl install (not a pyenv one on PATH).
python3() { /usr/bin/python3 "$@"; }

pkgs=()
command -v opendkim >/dev/null || pkgs+=(opendkim)
command -v opendkim-genkey >/dev/null || pkgs+=(opendkim-tools)
command -v opendmarc >/dev/null || pkgs+=(opendmarc)
command -v nsd >/dev/null || pkgs+=(nsd)
python3 -c 'import dkim' 2>/dev/null || pkgs+=(python3-dkim)
python3 -c 'import nacl.signing' 2>/dev/null || pkgs+=(python3-nacl)
if [ ${#pkgs[@]} -gt 0 ]; then
    echo "== installing ${pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >/dev/null
fi
# Debian's packages start their own daemons on install; ours use private configs and
# sockets, so those do not matter (and are not ours to stop).

cargo build -q --bin mailer
mailer=$PWD/target/debug/mailer

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "${keep:-}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Waits (bounded: 20 s) until `cmd` succeeds.
wait_for() {
    local what=$1; shift
    for _ in $(seq 200); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "timed out waiting for $what"; keep=1; exit 1
}
tcp_open() { python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',int(sys.argv[1])),1)" "$1"; }

dns_ip=127.53.53.53
dmarc_port=$(free_port)
smtp_port=$(free_port)
python3 tests/milter/real.py setup "$work" "$dns_ip" "$dmarc_port"

nsd -d -c "$work/nsd.conf" >"$work/nsd.out" 2>&1 &
pids+=($!)
wait_for "NSD" python3 -c "
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
# A query for test. SOA; any answer means NSD is serving.
s.sendto(bytes.fromhex('1234010000010000000000000474657374000006 0001'.replace(' ', '')), ('$dns_ip', 53))
s.recv(512)"

opendkim -f -x "$work/opendkim.conf" >"$work/opendkim.out" 2>&1 &
pids+=($!)
wait_for "OpenDKIM" test -S "$work/opendkim.sock"

unshare --mount sh -c "mount --bind '$work/resolv.conf' /etc/resolv.conf && exec opendmarc -f -c '$work/opendmarc.conf'" \
    >"$work/opendmarc.out" 2>&1 &
pids+=($!)
wait_for "OpenDMARC" tcp_open "$dmarc_port"

# Rspamd's milter proxy in self-scan mode, third in line, when it is installed and comes
# up within 60 s (its own ports and directories; DNS goes to NSD, which refuses
# everything outside the test zone at once).
rspamd_milter=""
if command -v rspamd >/dev/null && [ "${RSPAMD:-1}" = 1 ]; then
    rspamd_port=$(free_port)
    mkdir -p "$work/rspamd/local.d" "$work/rspamd/db" "$work/rspamd/run"
    cat >"$work/rspamd/local.d/worker-proxy.inc" <<RSP
bind_socket = "127.0.0.1:$rspamd_port";
milter = yes;
timeout = 30s;
upstream "local" {
  default = yes;
  self_scan = yes;
}
RSP
    echo "bind_socket = \"127.0.0.1:$(free_port)\";" >"$work/rspamd/local.d/worker-normal.inc"
    echo "bind_socket = \"127.0.0.1:$(free_port)\";" >"$work/rspamd/local.d/worker-controller.inc"
    printf 'type = "console";\nlevel = "warning";\n' >"$work/rspamd/local.d/logging.inc"
    printf 'dns { nameserver = ["%s:53"]; timeout = 0.5s; retransmits = 1; }\n' "$dns_ip" \
        >"$work/rspamd/local.d/options.inc"
    # Rspamd adds no header for a client on loopback unless told to.
    printf 'extended_spam_headers = true;\nskip_local = false;\n' >"$work/rspamd/local.d/milter_headers.conf"
    rspamd -f -i -u root -g root --var="LOCAL_CONFDIR=$work/rspamd" --var="DBDIR=$work/rspamd/db" \
        --var="RUNDIR=$work/rspamd/run" --var="LOGDIR=$work/rspamd" >"$work/rspamd.out" 2>&1 &
    pids+=($!)
    started=0
    for _ in $(seq 600); do
        if tcp_open "$rspamd_port" >/dev/null 2>&1; then started=1; break; fi
        sleep 0.1
    done
    if [ $started = 1 ]; then
        rspamd_milter="[[milter]]
address = \"inet:127.0.0.1:$rspamd_port\"
content_timeout_secs = 30"
        export RSPAMD_IN_PATH=1
    else
        echo "SKIP rspamd: not listening within 60 s"
    fi
fi

cat >"$work/mailer.toml" <<CONF
hostname = "mx.test"
[server]
listen = ["127.0.0.1:$smtp_port"]
workers = 4
stats_interval_secs = 0
[spool]
dir = "$work/spool"
fsync = false
[[milter]]
address = "unix:$work/opendkim.sock"
command_timeout_secs = 10
content_timeout_secs = 20
[[milter]]
address = "inet:127.0.0.1:$dmarc_port"
command_timeout_secs = 10
content_timeout_secs = 20
$rspamd_milter
CONF
RUST_LOG=${RUST_LOG:-info} "$mailer" --config "$work/mailer.toml" >"$work/mailer.out" 2>&1 &
pids+=($!)
wait_for "mailer" tcp_open "$smtp_port"

if ! python3 tests/milter/real.py run "$work" "$smtp_port"; then
    for f in mailer opendkim opendmarc nsd rspamd; do
        echo "---- $f"; tail -n 30 "$work/$f.out" || true
    done
    exit 1
fi
