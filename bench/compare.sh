#!/usr/bin/env bash
# bench/compare.sh — mailer against Postfix and Postfix's smtp-sink, side by side, on
# loopback (issue 9). Run as root on a Debian machine from a clone of the repository:
#
#     sudo bench/compare.sh                 # REPS=3 SECS=6 IDLE=1000 by default
#
# It installs Postfix from Debian's packages if missing (never starting the system
# instance), starts three servers on free loopback ports:
#   - smtp-sink       protocol only, stores nothing: the practical ceiling;
#   - Postfix         a private instance (own config_directory and queue_directory under
#                     a temp dir). Accepted mail goes to its hold queue (an access-table
#                     HOLD action), so what is measured is smtpd + cleanup writing the
#                     queue file and fsyncing it before the 250, as shipped, and no
#                     delivery work afterwards (mailer does none either);
#   - mailer          release build, spool.fsync = true, spool in the temp dir,
#                     spool.data_sync = $DATA_SYNC ("file" by default, or "batch");
# then runs every cell against all three in alternation (the order rotates per
# repetition), REPS times, and prints a markdown table of medians and ratios.
# Every run starts on an empty store: mailer is restarted on a new spool directory and
# Postfix's hold queue is moved aside, so that no run measures the backlog its
# predecessors left (a directory of 100,000s of never-read messages) and the rotation
# of the order is not undone by a store that only ever grows.
# Everything it starts is stopped by PID (or by `postfix -c <its own dir> stop`) and the
# temp dir is removed on exit. Absolute figures depend on the disk; the ratios are the
# point.
set -euo pipefail
ulimit -n 65536 2>/dev/null || true # a thousand held connections, on both sides
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
SECS=${SECS:-6}        # each load run stops starting messages after SECS seconds
IDLE=${IDLE:-1000}     # connections held open for the memory cell
BIG=${BIG:-26214400}   # the one large message of the memory cell (25 MiB)
CELLS=${CELLS:-"tput tput8 lat big mem"} # which cells to run
DATA_SYNC=${DATA_SYNC:-file} # mailer's [spool] data_sync
case $DATA_SYNC in file | batch) ;; *)
    echo "compare.sh: DATA_SYNC must be file or batch" >&2
    exit 2
    ;;
esac

if [ "$(id -u)" != 0 ]; then
    echo "compare.sh: run as root (it installs Postfix and runs a private instance)" >&2
    exit 2
fi
log() { echo "compare.sh: $*" >&2; }

# --- Postfix from Debian's packages -------------------------------------------------
if ! command -v smtp-sink >/dev/null || ! command -v postfix >/dev/null; then
    log "installing postfix"
    # "No configuration": no /etc/postfix/main.cf, so the system instance cannot start.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq
    timeout 900 apt-get install -y -qq --no-install-recommends postfix >/dev/null
    # Should the package have started the system instance anyway, stop it.
    if command -v systemctl >/dev/null && systemctl is-active --quiet postfix 2>/dev/null; then
        systemctl stop postfix || true
    fi
    if [ -s /var/spool/postfix/pid/master.pid ] &&
        kill -0 "$(tr -d ' ' </var/spool/postfix/pid/master.pid)" 2>/dev/null; then
        postfix stop || true
    fi
fi

# --- build -------------------------------------------------------------------------
log "building (release)"
cargo build --release --quiet --bin mailer --example loadgen
MAILER=$PWD/target/release/mailer
LOADGEN=$PWD/target/release/examples/loadgen

# --- workspace and cleanup -----------------------------------------------------------
WORK=$(mktemp -d /tmp/mailer-bench.XXXXXX)
chmod 755 "$WORK" # Postfix daemons run as user postfix and must reach their queue
PF=$WORK/postfix
SINK_PID=""
MAILER_PID=""
PF_STARTED=0
HOLD_PID=""
cleanup() {
    set +e
    [ -n "$HOLD_PID" ] && kill "$HOLD_PID" 2>/dev/null
    [ -n "$SINK_PID" ] && kill "$SINK_PID" 2>/dev/null
    [ -n "$MAILER_PID" ] && kill "$MAILER_PID" 2>/dev/null
    [ "$PF_STARTED" = 1 ] && timeout 30 postfix -c "$PF/etc" stop >/dev/null 2>&1
    for p in $SINK_PID $MAILER_PID; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    local p
    for p in $(shuf -i 20000-29999 -n 100); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
    log "no free port"
    exit 1
}

wait_port() { # port: until it accepts, at most 15 s
    local i
    for i in $(seq 150); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    log "nothing listens on port $1"
    exit 1
}

# --- smtp-sink -------------------------------------------------------------------------
SINK_PORT=$(free_port)
# -u: smtp-sink refuses to run as root; backlog 1000.
smtp-sink -u postfix "127.0.0.1:$SINK_PORT" 1000 >"$WORK/sink.log" 2>&1 &
SINK_PID=$!

# --- private Postfix instance -----------------------------------------------------------
PF_PORT=$(free_port)
mkdir -p "$PF/etc" "$PF/queue" "$PF/data"
chown postfix "$PF/data"
cp /etc/postfix/master.cf "$PF/etc/master.cf"
cat >"$PF/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $PF/queue
data_directory = $PF/data
myhostname = postfix-bench.test
mydestination = example.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# Accepted mail stays in the hold queue: written and fsynced by cleanup before the
# 250, as shipped, and never delivered (no delivery work competes for the CPU).
smtpd_data_restrictions = check_client_access static:HOLD
# Held mail is never picked up by qmgr, so it returns no flow-control tokens; without
# this smtpd would pause up to 1 s per message once the tokens run out.
in_flow_delay = 0
local_recipient_maps =
alias_maps =
alias_database =
biff = no
maillog_file = $PF/maillog
maillog_file_prefixes = $PF
EOF
postconf -c "$PF/etc" -F '*/*/chroot = n'
postconf -c "$PF/etc" -MX smtp/inet
postconf -c "$PF/etc" -M "127.0.0.1:$PF_PORT/inet=127.0.0.1:$PF_PORT inet n - n - - smtpd"
timeout 60 postfix -c "$PF/etc" set-permissions >/dev/null 2>&1 || true
PF_STARTED=1
timeout 60 postfix -c "$PF/etc" start >/dev/null 2>&1 || {
    log "private Postfix did not start: $(tail -5 "$PF/maillog" 2>/dev/null)"
    exit 1
}

# --- mailer -------------------------------------------------------------------------------
MAILER_PORT=$(free_port)
STORE_N=0 # stores made so far; the old ones stay until the end (deleting many files
# right before a run slows ext4's next file creations, see clear_store)
start_mailer() {
    STORE_N=$((STORE_N + 1))
    SPOOL=$WORK/spool.$STORE_N
    cat >"$WORK/mailer.toml" <<EOF
hostname = "mailer-bench.test"
[server]
listen = ["127.0.0.1:$MAILER_PORT"]
workers = $((IDLE + 64))
max_connections_per_ip = $((IDLE + 64))
stats_interval_secs = 0
[limits]
max_message_size = $((BIG + 1048576))
[spool]
dir = "$SPOOL"
fsync = true
data_sync = "$DATA_SYNC"
EOF
    RUST_LOG=info "$MAILER" --config "$WORK/mailer.toml" >>"$WORK/mailer.log" 2>&1 &
    MAILER_PID=$!
    wait_port "$MAILER_PORT"
}
stop_mailer() {
    kill "$MAILER_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$MAILER_PID" 2>/dev/null || break; sleep 0.1; done
    MAILER_PID=""
}
start_mailer
wait_port "$SINK_PORT"
wait_port "$PF_PORT"

port_of() {
    case $1 in
    sink) echo "$SINK_PORT" ;;
    postfix) echo "$PF_PORT" ;;
    mailer) echo "$MAILER_PORT" ;;
    esac
}

# Removes what a run of large messages stored (disk space). Small messages stay: on
# ext4, creating files right after deleting thousands makes the inode allocator scan
# the recently freed inodes (recently_deleted() in the kernel profile), for minutes,
# which would slow whichever server runs next.
clear_store() {
    case $1 in
    postfix) find "$PF/queue/hold" -type f -delete ;;
    mailer) find "$SPOOL/new" -type f -delete ;;
    esac
    timeout 60 sync -f "$WORK" || true
}

# fresh_store TARGET: an empty store for the run about to start (see the top). A
# restarted mailer gets a few messages first, so that it runs warm like the others.
fresh_store() {
    case $1 in
    mailer)
        stop_mailer
        start_mailer
        "$LOADGEN" --port "$MAILER_PORT" --sessions 4 --messages 200 --size 4096 \
            --pipelining >/dev/null 2>"$WORK/loadgen.err" || {
            log "warming mailer up failed: $(head -c 500 "$WORK/loadgen.err")"
            exit 1
        }
        ;;
    postfix)
        STORE_N=$((STORE_N + 1))
        local q=$PF/queue
        mkdir "$q/hold.new"
        chown --reference="$q/hold" "$q/hold.new"
        chmod --reference="$q/hold" "$q/hold.new"
        mv "$q/hold" "$WORK/postfix-hold.$STORE_N"
        mv "$q/hold.new" "$q/hold"
        ;;
    esac
}

field() { sed -n "s/.*\"$2\":\([0-9.]*\).*/\1/p" <<<"$1"; }

median() { tr ' ' '\n' | awk 'NF' | sort -g | awk '{a[NR]=$1} END {if (NR==0) print "n/a"; else if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }

settle() {
    timeout 60 sync -f "$WORK" || true
    sleep 0.5
}

# run TARGET ARGS... -> prints the loadgen JSON line; aborts on failed messages
run() {
    local target=$1 out
    shift
    # Start every run from a quiet disk: what the previous server left dirty (its
    # queue files' metadata) is written back now, not during this run's fsyncs.
    [ -n "${SETTLED:-}" ] || settle
    out=$(timeout $((SECS + 120)) "$LOADGEN" --port "$(port_of "$target")" --messages 100000000 \
        --timeout "$SECS" --pipelining "$@" 2>"$WORK/loadgen.err") || {
        log "loadgen against $target failed: $out $(head -c 500 "$WORK/loadgen.err")"
        exit 1
    }
    case " $* " in *" --size 1048576 "*) clear_store "$target" ;; esac
    echo "$out"
}

TARGETS=(sink postfix mailer)
order() { # rep -> the targets, rotated
    local r=$1 i
    for i in 0 1 2; do echo "${TARGETS[$(((i + r) % 3))]}"; done
}

log "warm-up"
for t in "${TARGETS[@]}"; do
    SECS=1 run "$t" --sessions 4 --size 4096 --per-conn 10 >/dev/null
done

declare -A R # R[cell,target] = "v1 v2 v3"
for c in tput tput8 lat big; do for t in "${TARGETS[@]}"; do R[$c,$t]=""; done; done
declare -A CPU # CPU[target] = one note per tput run
for t in "${TARGETS[@]}"; do CPU[$t]=""; done
# machine_cpu -> "busy total" jiffies summed over all CPUs (iowait counts as idle)
machine_cpu() { awk '/^cpu / {print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
# proc_cpu PID -> utime+stime jiffies of that process (all its threads), 0 without one
proc_cpu() { if [ -n "$1" ]; then awk '{print $14+$15}' "/proc/$1/stat"; else echo 0; fi; }
cell() { # name metric loadgen-args...
    local name=$1 metric=$2 rep t out v
    shift 2
    for rep in $(seq 0 $((REPS - 1))); do
        for t in $(order "$rep"); do
            fresh_store "$t"
            if [ "$name" = tput ]; then
                # Where the CPU goes (is the box saturated? who uses it?): the whole
                # machine from /proc/stat, the generator by `time`, the server's own
                # process (Postfix is many processes: not counted).
                local pid="" sb sa b0 b1 tb ta
                case $t in sink) pid=$SINK_PID ;; mailer) pid=$MAILER_PID ;; esac
                settle
                sb=$(proc_cpu "$pid")
                read -r b0 tb < <(machine_cpu)
                TIMEFORMAT='%U %S %R'
                { time out=$(SETTLED=1 run "$t" "$@"); } 2>"$WORK/time"
                read -r b1 ta < <(machine_cpu)
                sa=$(proc_cpu "$pid")
                CPU[$t]+="$(awk -v s=$((sa - sb)) -v hz="$(getconf CLK_TCK)" -v busy=$((b1 - b0)) \
                    -v tot=$((ta - tb)) -v n="$(field "$out" messages)" -v srv="$pid" \
                    '{printf "%s: machine busy %.0f%%, loadgen %.0f us/msg, server %s us/msg;", t, 100*busy/tot, 1e6*($1+$2)/n, (srv == "" ? "n/a" : sprintf("%.0f", 1e6*s/hz/n))}' t="$t" "$WORK/time") "
            else
                out=$(run "$t" "$@")
            fi
            v=$(field "$out" "$metric")
            R[$name,$t]+="$v "
            log "$name rep $((rep + 1)) $t: $out"
        done
    done
}

has() { case " $CELLS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
if has tput; then
    log "cell 1: 4 KiB x 1 rcpt x 10 per connection, 32 sessions"
    cell tput msgs_per_sec --sessions 32 --size 4096 --rcpts 1 --per-conn 10
fi
if has tput8; then
    log "cell 1b: the same at 8 sessions"
    cell tput8 msgs_per_sec --sessions 8 --size 4096 --rcpts 1 --per-conn 10
fi
if has lat; then
    log "cell 2: 1 session latency"
    cell lat p99_ms --sessions 1 --size 4096 --rcpts 1 --per-conn 10
fi
if has big; then
    log "cell 3: 1 MiB at 8 sessions"
    cell big mib_per_sec --sessions 8 --size 1048576 --rcpts 1 --per-conn 10
fi

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$MAILER_PID/status"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$MAILER_PID/status"; }

has mem && log "cell 4: memory ($IDLE idle connections; one $BIG-byte message)"
IDLE_RSS=""
GROWTH=""
for rep in $(seq "$REPS"); do
    has mem || break
    stop_mailer
    start_mailer
    fifo=$WORK/hold.fifo
    rm -f "$fifo"
    mkfifo "$fifo"
    "$LOADGEN" --port "$MAILER_PORT" --idle "$IDLE" --hold-secs 120 --timeout 60 \
        <"$fifo" >"$WORK/idle.out" 2>"$WORK/idle.err" &
    HOLD_PID=$!
    exec 7>"$fifo" # keeps the holder's stdin open; closing it releases the connections
    for _ in $(seq 600); do
        grep -q idle_open "$WORK/idle.out" 2>/dev/null && break
        kill -0 "$HOLD_PID" 2>/dev/null || break
        sleep 0.1
    done
    grep -q idle_open "$WORK/idle.out" || {
        log "holding $IDLE connections failed: $(cat "$WORK/idle.err")"
        exit 1
    }
    sleep 1
    IDLE_RSS+="$(($(rss_kib) / 1024)) "
    exec 7>&-
    wait "$HOLD_PID" || true
    HOLD_PID=""
    # One small message first so that the path is warm, then reset the peak (VmHWM).
    "$LOADGEN" --port "$MAILER_PORT" --messages 1 --size 4096 >/dev/null
    echo 5 >"/proc/$MAILER_PID/clear_refs"
    base=$(rss_kib)
    "$LOADGEN" --port "$MAILER_PORT" --messages 1 --size "$BIG" --timeout 120 >"$WORK/big.out"
    peak=$(hwm_kib)
    GROWTH+="$(awk -v a="$base" -v b="$peak" 'BEGIN {printf "%.1f", (b-a)/1024}') "
    log "memory rep $rep: RSS with $IDLE connections (MiB): $IDLE_RSS; growth over one large message (MiB): $GROWTH"
done

# --- table ------------------------------------------------------------------------------
m() { median <<<"${R[$1,$2]}"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b+0 == 0) print "n/a"; else printf "%.2f", a/b}'; }
verdict() { awk -v x="$1" -v op="$2" -v t="$3" 'BEGIN {ok = (op == ">=") ? (x >= t) : (x <= t); print (ok ? "met" : "NOT met")}'; }

S1=$(m tput sink) P1=$(m tput postfix) M1=$(m tput mailer)
S8=$(m tput8 sink) P8=$(m tput8 postfix) M8=$(m tput8 mailer)
S2=$(m lat sink) P2=$(m lat postfix) M2=$(m lat mailer)
S3=$(m big sink) P3=$(m big postfix) M3=$(m big mailer)
R1P=$(ratio "$M1" "$P1") R1S=$(ratio "$M1" "$S1")
R8P=$(ratio "$M8" "$P8") R8S=$(ratio "$M8" "$S8")
R2P=$(ratio "$M2" "$P2") R2S=$(ratio "$M2" "$S2")
R3P=$(ratio "$M3" "$P3") R3S=$(ratio "$M3" "$S3")
MI=$(median <<<"$IDLE_RSS") MG=$(median <<<"$GROWTH")

cat <<EOF

Medians of $REPS alternating runs, ${SECS}s each; $(nproc) cores; $(uname -r); $(date -u +%Y-%m-%d).
Postfix $(postconf -d -h mail_version 2>/dev/null), held in its queue after fsync; mailer with spool.fsync = true, data_sync = "$DATA_SYNC".

| cell | metric | smtp-sink | Postfix | mailer | mailer/Postfix | mailer/smtp-sink | target | |
|---|---|---:|---:|---:|---:|---:|---|---|
| 4 KiB, 1 rcpt, 10/conn, 32 sessions | msgs/s | $S1 | $P1 | $M1 | $R1P | $R1S | ≥ 2.0 × Postfix, ≥ 0.45 × sink | $(verdict "$R1P" ">=" 2.0), $(verdict "$R1S" ">=" 0.45) |
| 4 KiB, 1 rcpt, 10/conn, 8 sessions | msgs/s | $S8 | $P8 | $M8 | $R8P | $R8S | | |
| 4 KiB, 1 session | p99 ms, MAIL→250 | $S2 | $P2 | $M2 | $R2P | $R2S | ≤ 1.0 × Postfix | $(verdict "$R2P" "<=" 1.0) |
| 1 MiB, 8 sessions | MiB/s | $S3 | $P3 | $M3 | $R3P | $R3S | ≥ 0.8 × sink | $(verdict "$R3S" ">=" 0.8) |
| $IDLE idle connections | mailer RSS MiB | | | $MI | | | ≤ 64 MiB | $(verdict "$MI" "<=" 64) |
| one 25 MiB message | mailer RSS growth MiB | | | $MG | | | a few MiB (≤ 8) | $(verdict "$MG" "<=" 8) |

All runs: ${R[tput,sink]}| ${R[tput,postfix]}| ${R[tput,mailer]}(msgs/s sink | postfix | mailer);
${R[tput8,sink]}| ${R[tput8,postfix]}| ${R[tput8,mailer]}(8 sessions, msgs/s);
${R[lat,sink]}| ${R[lat,postfix]}| ${R[lat,mailer]}(p99 ms); ${R[big,sink]}| ${R[big,postfix]}| ${R[big,mailer]}(MiB/s);
RSS $IDLE_RSS(MiB); growth $GROWTH(MiB).
CPU in the 32-session runs: ${CPU[sink]}${CPU[postfix]}${CPU[mailer]}
EOF
