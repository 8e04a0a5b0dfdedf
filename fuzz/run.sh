#!/usr/bin/env bash
# Builds every fuzz target and runs each for a bounded time, for CI:
#
#   fuzz/run.sh [RUNS]
#
# Each target runs RUNS inputs (default 20000) or FUZZ_MAX_TIME seconds
# (default 30), whichever ends first, starting from its seed corpus in
# fuzz/corpus/<target>. New inputs go to a scratch directory, so the checked-in
# corpus stays as it is. Exits non-zero if any target crashes; the crashing
# input is kept under fuzz/artifacts/<target>/.
#
# Targets are built without a sanitizer: they exercise safe Rust, where
# AddressSanitizer finds nothing that bounds checks do not, and it would
# double the build time.
set -euo pipefail

runs=${1:-20000}
max_time=${FUZZ_MAX_TIME:-30}
cd "$(dirname "$0")"
# Instrumented builds of every dependency take minutes; FUZZ_TARGET_DIR can
# keep them somewhere that outlives a fresh clone.
target_dir=$(realpath -m "${FUZZ_TARGET_DIR:-target}")

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

cargo +nightly fuzz build --sanitizer none --target-dir "$target_dir"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

failed=0
passed=0
crashed=0
for target in $(cargo +nightly fuzz list); do
    mkdir -p "$scratch/$target"
    log="$scratch/$target.log"
    start=$SECONDS
    if cargo +nightly fuzz run --sanitizer none --target-dir "$target_dir" "$target" \
        "$scratch/$target" "corpus/$target" -- \
        -runs="$runs" -max_total_time="$max_time" -timeout=10 -print_final_stats=1 \
        >"$log" 2>&1; then
        verdict=ok
        passed=$((passed + 1))
    else
        verdict=FAILED
        failed=1
        crashed=$((crashed + 1))
    fi
    executed=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    echo "$target: ${executed:-?} runs in $((SECONDS - start))s, $verdict"
    if [ "$verdict" = FAILED ]; then
        # The panic message, libFuzzer's summary and where the input was saved.
        grep -E "panicked at|^SUMMARY|Test unit written to|^==[0-9]+== ERROR" "$log" >&2 || tail -n 30 "$log" >&2
    fi
done
echo "fuzz: $passed passed, $crashed failed"
exit "$failed"
