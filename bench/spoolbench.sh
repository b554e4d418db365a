#!/usr/bin/env bash
# bench/spoolbench.sh — the spool alone (no SMTP), every data_sync mode in alternation
# (issue 18): examples/spoolbench.rs at several thread counts, REPS times, medians.
#
#     bench/spoolbench.sh                           # MODES="file batch"
#     THREADS="1 8 32" REPS=5 SECS=4 DIR=/var/tmp/sb bench/spoolbench.sh
#
# Prints one JSON line per run on stderr and a markdown table of medians (msgs/s and
# p99 ms per mode and thread count) on stdout. DIR is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
MODES=${MODES:-"file batch"}
THREADS=${THREADS:-"1 8 32"}
REPS=${REPS:-3}
SECS=${SECS:-4}
SIZE=${SIZE:-4096}
DIR=${DIR:-/var/tmp/mailer-spoolbench}
cargo build --release --quiet --example spoolbench
BIN=$PWD/target/release/examples/spoolbench
field() { sed -n "s/.*\"$2\":\([0-9.]*\).*/\1/p" <<<"$1"; }
median() { tr ' ' '\n' | awk 'NF' | sort -g | awk '{a[NR]=$1} END {if (NR==0) print "n/a"; else if (NR%2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'; }
declare -A T L C
read -r -a mode_list <<<"$MODES"
for rep in $(seq 0 $((REPS - 1))); do
    for th in $THREADS; do
        n=${#mode_list[@]}
        for i in $(seq 0 $((n - 1))); do
            m=${mode_list[$(((i + rep) % n))]} # the order rotates per repetition
            sync -f "$(dirname "$DIR")" 2>/dev/null || sync
            # --keep: deleting between runs would slow the next run's file creation.
            out=$("$BIN" --dir "$DIR/$m" --threads "$th" --size "$SIZE" --secs "$SECS" --mode "$m" --keep)
            echo "$out" >&2
            T[$m,$th]+="$(field "$out" msgs_per_sec) "
            L[$m,$th]+="$(field "$out" p99_ms) "
            C[$m,$th]+="$(field "$out" cpu_us_per_msg) "
        done
    done
done
rm -rf "$DIR"
echo
echo "spoolbench, $SIZE-byte messages, medians of $REPS alternating runs of ${SECS}s; $(nproc) cores; $(uname -r); $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
printf '| threads |'
for m in $MODES; do printf ' %s msgs/s (p99 ms) [CPU us/msg] |' "$m"; done
echo
printf '|---:|'
for _ in $MODES; do printf -- '---:|'; done
echo
for th in $THREADS; do
    printf '| %s |' "$th"
    for m in $MODES; do printf ' %s (%s) [%s] |' "$(median <<<"${T[$m,$th]}")" "$(median <<<"${L[$m,$th]}")" "$(median <<<"${C[$m,$th]}")"; done
    echo
done
