#!/usr/bin/env bats
# The libFuzzer targets of tests/fuzz under ASan+UBSan: each replays its
# regression inputs (tests/fuzz/regress/TARGET/) and then fuzzes for
# FUZZ_CHECK_TIME seconds (30) from the qemu-img made seeds.  Any crash,
# leak, sanitizer report, timeout (10 s) or allocation over the limits
# fails the test; the input is left in build-fuzz/check/out/.  `make fuzz
# FUZZ_TIME=S` runs the same targets for longer.
#
# The fuzzers are sanitizer builds already, so `make check-sanitize`
# (SANITIZE=1) skips this file.

bats_require_minimum_version 1.5.0

ROOT="$(cd "$BATS_TEST_DIRNAME/.." && pwd)"
FUZZ_CHECK_TIME="${FUZZ_CHECK_TIME:-30}"
OUT="$ROOT/build-fuzz/check"

setup_file ()
{
    [ "${SANITIZE:-}" = 1 ] && return 0
    if ! command -v "${FUZZ_CC:-clang}" >/dev/null; then
        echo "clang is missing: run 'make deps'" >&3
        return 1
    fi
    make -C "$ROOT" -s -j2 fuzz-build >"$BATS_FILE_TMPDIR/build.log" 2>&1 || {
        tail -n 40 "$BATS_FILE_TMPDIR/build.log" >&3
        return 1
    }
}

setup ()
{
    [ "${SANITIZE:-}" != 1 ] || skip "the fuzzers are sanitizer builds already"
}

fuzz_target ()
{
    # A fixed seed keeps make check repeatable; make fuzz explores.
    SEEDS="$ROOT/build-fuzz/seeds" FUZZ_SEED="${FUZZ_SEED:-1}" \
        "$ROOT/tests/fuzz/run-fuzz.sh" "$ROOT/build-fuzz/fuzz-$1" \
        "$FUZZ_CHECK_TIME" "$OUT"
}

@test "fuzz-header: regression inputs and a short run find nothing" {
    fuzz_target header
}

@test "fuzz-read: regression inputs and a short run find nothing" {
    fuzz_target read
}

@test "fuzz-write: regression inputs and a short run find nothing" {
    fuzz_target write
}
