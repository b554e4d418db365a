#!/usr/bin/env bash
# bench/mailboxes.sh — durable throughput with [mailboxes] against v1's single spool,
# in the same run (issue 15):
#
#     bench/mailboxes.sh                    # REPS=3 MESSAGES=4000 SESSIONS=32
#
# Four cells, each a fresh release-build mailer (spool.fsync = true, spool and mailboxes
# in one temp dir on the disk of the working tree) loaded by examples/loadgen.rs with
# SESSIONS pipelining sessions of 4 KiB messages:
#   v1-1     no [mailboxes], 1 recipient per message        (one file per message)
#   v1-5     no [mailboxes], 5 recipients per message       (one file per message)
#   mbox-1   1 recipient, a mailbox                          (one file per message)
#   mbox-5   5 recipients, 5 different mailboxes             (five files per message)
# The cells alternate REPS times; the median messages/s of each is printed as a table.
# Every server is stopped by its PID; the temp dir is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
MESSAGES=${MESSAGES:-4000}
SESSIONS=${SESSIONS:-32}

cargo build --release --quiet --bin mailer --example loadgen
BIN=target/release/mailer
LOADGEN=target/release/examples/loadgen

WORK=$(mktemp -d "$PWD/target/bench-mailboxes.XXXXXX")
PID=""
cleanup() {
    [ -n "$PID" ] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# run CELL RCPTS MAILBOXES(0/1) -> prints messages/s
run_cell() {
    local cell=$1 rcpts=$2 mailboxes=$3 port dir
    port=$(free_port)
    dir="$WORK/$cell.$RANDOM"
    mkdir -p "$dir"
    {
        echo "hostname = \"mx.test\""
        echo "[server]"
        echo "listen = [\"127.0.0.1:$port\"]"
        echo "workers = 64"
        echo "max_connections_per_ip = 64"
        echo "stats_interval_secs = 0"
        echo "[spool]"
        echo "dir = \"$dir/spool\""
        if [ "$mailboxes" = 1 ]; then
            echo "[mailboxes]"
            echo "root = \"$dir/mail\""
            echo "users = [\"rcpt0@example.test\", \"rcpt1@example.test\", \"rcpt2@example.test\", \"rcpt3@example.test\", \"rcpt4@example.test\"]"
        fi
    } >"$dir/config.toml"
    RUST_LOG=warn "$BIN" --config "$dir/config.toml" 2>"$dir/log" &
    PID=$!
    python3 - "$port" <<'EOF'
import socket, sys, time
deadline = time.monotonic() + 20
while True:
    try:
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
        s.recv(100)
        s.close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("server did not start")
        time.sleep(0.05)
EOF
    sync
    "$LOADGEN" --host 127.0.0.1 --port "$port" --sessions "$SESSIONS" --messages "$MESSAGES" \
        --size 4096 --rcpts "$rcpts" --per-conn 50 --pipelining --domain example.test \
        >"$dir/result.json"
    kill -TERM "$PID" && wait "$PID" || true
    PID=""
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); assert r.get("failed",0)==0, r; print(round(r["msgs_per_sec"]))' "$dir/result.json"
    rm -rf "$dir"
}

declare -A results
for rep in $(seq 1 "$REPS"); do
    for spec in "v1-1 1 0" "mbox-1 1 1" "v1-5 5 0" "mbox-5 5 1"; do
        set -- $spec
        r=$(run_cell "$1" "$2" "$3") || { echo "bench/mailboxes.sh: cell $1 failed" >&2; exit 1; }
        echo "bench/mailboxes.sh: rep $rep $1: $r msg/s" >&2
        results[$1]="${results[$1]:-} $r"
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo
echo "| cell | recipients | stored files per message | messages/s (median of $REPS) |"
echo "|---|---|---|---|"
echo "| v1 spool | 1 | 1 | $(echo "${results[v1-1]}" | median) |"
echo "| mailbox | 1 | 1 | $(echo "${results[mbox-1]}" | median) |"
echo "| v1 spool | 5 | 1 | $(echo "${results[v1-5]}" | median) |"
echo "| 5 mailboxes | 5 | 5 | $(echo "${results[mbox-5]}" | median) |"
