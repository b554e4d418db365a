#!/usr/bin/env bash
# Runs every fuzz target for a short, bounded time from the committed seed corpus and
# fails if any target finds a crash (a panic: every property is an assertion), a hang
# (one input over 10 s) or a memory blow-up (over 2 GiB).
#
#   FUZZ_SECONDS=20 fuzz/run-ci.sh        # seconds per target (default 20)
#   fuzz/run-ci.sh session data           # only these targets
#
# Works on the stable toolchain: the targets are built with `-s none` (no
# AddressSanitizer, which needs nightly or RUSTC_BOOTSTRAP=1; the crate has no `unsafe`,
# so ASan would only watch the dependencies). New inputs that libFuzzer finds go to a
# temporary directory, so the committed corpus only ever holds the seeds.
set -euo pipefail
cd "$(dirname "$0")"

secs=${FUZZ_SECONDS:-20}
start=$SECONDS

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
    echo "cargo-fuzz installed in $((SECONDS - start)) s"
fi
cargo fuzz --version

if [ $# -gt 0 ]; then
    targets="$*"
else
    targets=$(cargo fuzz list)
fi

cargo fmt -- --check

echo "== building fuzz targets"
built=$SECONDS
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! cargo fuzz build -s none >"$work/build.log" 2>&1; then
    grep -Ev '^\s+(Compiling|Downloaded|Downloading)' "$work/build.log" | tail -n 60
    echo "fuzz build failed"
    exit 1
fi
echo "built in $((SECONDS - built)) s"

failed=()
for t in $targets; do
    mkdir -p "$work/$t"
    log="$work/$t.log"
    ran=$SECONDS
    if cargo fuzz run -s none "$t" "$work/$t" "corpus/$t" -- \
        -max_total_time="$secs" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1; then
        runs=$(grep -Eo '^stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || echo '?')
        echo "fuzz $t: ok, $runs inputs in $((SECONDS - ran)) s"
    else
        echo "fuzz $t: FAILED; the end of its log:"
        tail -n 60 "$log"
        failed+=("$t")
    fi
done

echo "fuzzing took $((SECONDS - start)) s in all"
if [ ${#failed[@]} -gt 0 ]; then
    echo "crashes in: ${failed[*]} (reproduce: cd fuzz && cargo fuzz run -s none TARGET artifacts/TARGET/crash-...)"
    exit 1
fi
