#!/usr/bin/env bash
# Runs one libFuzzer target: first replays tests/fuzz/regress/NAME/*,
# then fuzzes for SECONDS on a fresh copy of the seeds plus the
# regression inputs.  Any crash, leak, timeout, out-of-memory or
# sanitizer report fails (exit non-zero); the input is saved as
# OUTDIR/out/fuzz-NAME-crash-* (or leak-, timeout-, oom-).
# Usage: [SEEDS=DIR] run-fuzz.sh BUILD-FUZZ/fuzz-NAME SECONDS OUTDIR
# (the seeds are taken from $SEEDS/NAME, by default OUTDIR/seeds/NAME).
set -euo pipefail

bin="$1" secs="$2" outdir="$3"
name="$(basename "$bin")"          # fuzz-read
short="${name#fuzz-}"              # read
here="$(cd "$(dirname "$0")" && pwd)"
regress="$here/regress/$short"
seeds="${SEEDS:-$outdir/seeds}/$short"
corpus="$outdir/corpus/$short"

# Hard limits: a hang or an unbounded allocation is a finding.
flags=(-timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512)
export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

mkdir -p "$outdir/out"
rm -rf "$corpus"
mkdir -p "$corpus"
[ -d "$seeds" ] && cp "$seeds"/* "$corpus"/ 2>/dev/null || true

inputs=()
if [ -d "$regress" ]; then
    for f in "$regress"/*; do [ -f "$f" ] && inputs+=("$f"); done
fi
if [ ${#inputs[@]} -gt 0 ]; then
    echo "== $name: replaying ${#inputs[@]} regression input(s)"
    "$bin" "${flags[@]}" "${inputs[@]}" >"$outdir/out/$name-regress.log" 2>&1 || {
        tail -n 60 "$outdir/out/$name-regress.log"
        echo "FAIL: $name: a regression input in $regress fails" >&2
        exit 1
    }
    cp "${inputs[@]}" "$corpus"/
fi

[ "$secs" -gt 0 ] || exit 0
echo "== $name: fuzzing for $secs s ($(ls "$corpus" | wc -l) corpus inputs)"
log="$outdir/out/$name.log"
# FUZZ_SEED makes the mutation sequence repeatable (make check sets it).
[ -z "${FUZZ_SEED:-}" ] || flags+=("-seed=$FUZZ_SEED")
if ! "$bin" "${flags[@]}" -max_total_time="$secs" -print_final_stats=1 \
        -artifact_prefix="$outdir/out/$name-" "$corpus" >"$log" 2>&1; then
    grep -E -A 60 'ERROR: |runtime error|==[0-9]+==|Test unit written' "$log" |
        head -n 120
    echo "FAIL: $name found a problem; log: $log" >&2
    exit 1
fi
grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb|cov:' "$log" |
    tail -n 3
echo "== $name: no findings"
