#!/bin/sh
# Runs every fuzz target for a bounded time (default 60 s each) on its
# corpus; prints executions and time per target. Needs nightly and
# cargo-fuzz (`cargo install cargo-fuzz`).
#   fuzz/run.sh [SECONDS] [TARGET...]
set -eu
cd "$(dirname "$0")"
secs=${1:-60}
[ $# -gt 0 ] && shift
targets=${*:-"record handshake page receiver nfqueue beacon disk_writes nbd"}
cargo +nightly fuzz build -O
for t in $targets; do
    # New inputs go to work/ (not committed); corpus/ holds the seeds.
    mkdir -p "work/$t" "corpus/$t" "artifacts/$t"
    log=$(mktemp)
    if ! cargo +nightly fuzz run -O "$t" "work/$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        tail -40 "$log"
        echo "FAILED: $t (crash input in fuzz/artifacts/$t; copy it to fuzz/regressions/$t/)"
        exit 1
    fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
    echo "$t: $execs executions in ${secs} s, $(ls "work/$t" | wc -l) inputs in work/$t"
    rm -f "$log"
done
