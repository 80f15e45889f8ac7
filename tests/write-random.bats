#!/usr/bin/env bats
# Random write workloads: the same seeded op sequence is applied through
# the plugin (libnbd) to one copy of an image and by qemu-io to another
# copy; afterwards the two must read identically and the plugin's copy must
# pass `qemu-img check` with no leaks and no errors.
#
# Reproduce a failing case by hand (see the failure output for the seed):
#   tests/tools/randops.py gen --seed S --size N --cluster C --ops K
#   tests/tools/randops.py apply URI  --seed S ...   # through the plugin
#   tests/tools/randops.py qemu-io    --seed S ... | qemu-io -f qcow2 COPY

bats_require_minimum_version 1.5.0
load helpers

RANDOPS="$BATS_TEST_DIRNAME/tools/randops.py"
NOPS="${NOPS:-80}"

teardown () { stop_nbdkit; }

# qcheck IMG: qemu-img check must be clean (rc 0: no errors, no leaks).
qcheck ()
{
    local out rc=0
    out="$(qemu-img check "$1" 2>&1)" || rc=$?
    if [ "$rc" -ne 0 ] || ! grep -q 'No errors were found' <<<"$out"; then
        echo "qemu-img check $1: rc=$rc" >&3
        echo "$out" >&3
        return 1
    fi
}

# qio_script IMG SCRIPT: run a qemu-io command script, fail on any error.
qio_script ()
{
    local out
    out="$(qemu-io -f qcow2 "$1" <"$2" 2>&1)" &&
        ! grep -qiE 'failed|error|invalid|cannot' <<<"$out" ||
        { echo "qemu-io script on $1 failed:" >&3; echo "$out" | tail -20 >&3;
          return 1; }
}

# prefill IMG SIZE: scattered data (and an explicit zero region) so that
# partial writes have something to copy.
prefill ()
{
    local img="$1" s="$2"
    qemu-io -f qcow2 \
        -c "write -P 0xa1 0 $((s / 8))" \
        -c "write -P 0xa2 $((s / 4 + 4096)) $((s / 16))" \
        -c "write -P 0xa3 $((s / 2 + 777)) 300000" \
        -c "write -z $((s / 2 + 2 * 1048576)) 1M" \
        -c "write -P 0xa4 $((3 * s / 4)) $((s / 8))" \
        -c "write -P 0xa5 $((s - 65536)) 65536" \
        "$img" >/dev/null
}

# run_seed IMG SIZE CLUSTER SEED: copy IMG to A and B, apply the workload
# through the plugin to A and through qemu-io to B, then compare and check.
run_seed ()
{
    local img="$1" size="$2" cl="$3" seed="$4"
    local a="$BATS_TEST_TMPDIR/A-$seed.qcow2" b="$BATS_TEST_TMPDIR/B-$seed.qcow2"
    local script="$BATS_TEST_TMPDIR/ops-$seed.qemu-io" out rc=0
    local args=(--seed "$seed" --size "$size" --cluster "$cl" --ops "$NOPS")
    cp --sparse=always "$img" "$a"
    cp --sparse=always "$img" "$b"

    start_nbdkit "$PLUGIN" file="$a"
    /usr/bin/python3 "$RANDOPS" apply "$uri" "${args[@]}" || rc=$?
    stop_nbdkit
    if [ "$rc" -ne 0 ]; then
        echo "randops apply failed: ${args[*]}" >&3
        grep -iE 'error|qcow2' "$nbdkit_log" | tail -20 >&3
        return 1
    fi

    /usr/bin/python3 "$RANDOPS" qemu-io "${args[@]}" >"$script"
    qio_script "$b" "$script"

    out="$(qemu-img compare -f qcow2 -F qcow2 "$a" "$b" 2>&1)" || {
        echo "MISMATCH (plugin A vs qemu B): ${args[*]}" >&3
        echo "$out" >&3
        return 1
    }
    qcheck "$a" || { echo "after: ${args[*]}" >&3; return 1; }
}

# run_matrix IMG SIZE CLUSTER SEEDS...
run_matrix ()
{
    local img="$1" size="$2" cl="$3" seed; shift 3
    for seed in "$@"; do
        run_seed "$img" "$size" "$cl" "$seed" || return 1
    done
}

# newimg OPTS SIZE: create and prefill $img (an image named base.qcow2).
newimg ()
{
    img="$BATS_TEST_TMPDIR/base.qcow2"
    qemu-img create -q -f qcow2 ${1:+-o "$1"} "$img" "$2"
    prefill "$img" "$(numfmt --from=iec "$2")"
}

@test "random writes: v2 (compat=0.10)" {
    newimg compat=0.10 64M
    run_matrix "$img" $((64 << 20)) 65536 1 2 3
}

@test "random writes: v3" {
    newimg compat=1.1 64M
    run_matrix "$img" $((64 << 20)) 65536 11 12 13
}

@test "random writes: 512 B clusters" {
    newimg cluster_size=512 64M
    run_matrix "$img" $((64 << 20)) 512 21 22
}

@test "random writes: v2, 512 B clusters" {
    newimg compat=0.10,cluster_size=512 64M
    run_matrix "$img" $((64 << 20)) 512 23
}

@test "random writes: 2 MiB clusters" {
    newimg cluster_size=2M 128M
    run_matrix "$img" $((128 << 20)) $((2 << 20)) 31 32
}

@test "random writes: refcount_bits=1" {
    newimg refcount_bits=1 64M
    run_matrix "$img" $((64 << 20)) 65536 41 42
}

@test "random writes: refcount_bits=64" {
    newimg refcount_bits=64 64M
    run_matrix "$img" $((64 << 20)) 65536 51 52
}

@test "random writes: extended_l2=on (64k clusters)" {
    newimg extended_l2=on,cluster_size=64k 64M
    run_matrix "$img" $((64 << 20)) 65536 61 62 63
}

@test "random writes: extended_l2=on over a qcow2 backing file" {
    local base="$BATS_TEST_TMPDIR/backing.qcow2"
    qemu-img create -q -f qcow2 "$base" 64M
    prefill "$base" $((64 << 20))
    img="$BATS_TEST_TMPDIR/base.qcow2"
    qemu-img create -q -f qcow2 -o extended_l2=on -b "$base" -F qcow2 "$img"
    qemu-io -f qcow2 -c 'write -P 0xb1 1M 100k' -c 'write -z 40M 200k' \
        "$img" >/dev/null
    run_matrix "$img" $((64 << 20)) 65536 65 66
}

@test "random writes: zstd image with compressed clusters" {
    local src="$BATS_TEST_TMPDIR/src.qcow2"
    qemu-img create -q -f qcow2 "$src" 64M
    prefill "$src" $((64 << 20))
    img="$BATS_TEST_TMPDIR/base.qcow2"
    qemu-img convert -c -O qcow2 -o compression_type=zstd "$src" "$img"
    qemu-img check "$img" | grep -q 'compressed clusters'
    run_matrix "$img" $((64 << 20)) 65536 71 72 73
}

@test "random writes: zlib image with compressed clusters" {
    local src="$BATS_TEST_TMPDIR/src.qcow2"
    qemu-img create -q -f qcow2 "$src" 64M
    prefill "$src" $((64 << 20))
    img="$BATS_TEST_TMPDIR/base.qcow2"
    qemu-img convert -c -O qcow2 "$src" "$img"
    run_matrix "$img" $((64 << 20)) 65536 74
}

@test "random writes: image with an internal snapshot" {
    newimg "" 64M
    qemu-img snapshot -c s1 "$img"
    # diverge a little after the snapshot: some clusters refcount 1, most 2
    qemu-io -f qcow2 -c 'write -P 0xc1 2M 3M' -c 'write -z 5M 1M' \
        "$img" >/dev/null
    local ref="$BATS_TEST_TMPDIR/s1-before.raw"
    qemu-img convert -l snapshot.name=s1 -O raw "$img" "$ref"
    local seed
    for seed in 81 82; do
        run_seed "$img" $((64 << 20)) 65536 "$seed"
        local x
        for x in A B; do
            qemu-img convert -l snapshot.name=s1 -O raw \
                "$BATS_TEST_TMPDIR/$x-$seed.qcow2" "$BATS_TEST_TMPDIR/s1-$x.raw"
            cmp "$ref" "$BATS_TEST_TMPDIR/s1-$x.raw" || {
                echo "snapshot s1 of $x changed (seed $seed)" >&3; return 1; }
        done
        [ "$(qemu-img snapshot -l "$BATS_TEST_TMPDIR/A-$seed.qcow2" | grep -c s1)" = 1 ]
    done
}

@test "random writes: qcow2 overlay over a qcow2 base" {
    local base="$BATS_TEST_TMPDIR/backing.qcow2"
    qemu-img create -q -f qcow2 "$base" 64M
    prefill "$base" $((64 << 20))
    img="$BATS_TEST_TMPDIR/base.qcow2"
    qemu-img create -q -f qcow2 -b "$base" -F qcow2 "$img"
    qemu-io -f qcow2 -c 'write -P 0xb1 1M 100k' -c 'write -z 40M 200k' \
        "$img" >/dev/null
    run_matrix "$img" $((64 << 20)) 65536 91 92 93
}

@test "random writes: qcow2 overlay over a raw base" {
    local base="$BATS_TEST_TMPDIR/backing.raw"
    /usr/bin/python3 -c '
import random, sys
r = random.Random(5)
with open(sys.argv[1], "wb") as f:
    f.truncate(64 << 20)
    for i in range(0, 64, 3):
        f.seek(i << 20); f.write(bytes([r.randrange(1, 256)]) * (1 << 19))
' "$base"
    img="$BATS_TEST_TMPDIR/base.qcow2"
    qemu-img create -q -f qcow2 -b "$base" -F raw "$img"
    run_matrix "$img" $((64 << 20)) 65536 101 102
}

@test "random writes: 64k overlay over 4k clusters (compressed, zero, unallocated) over a shorter raw base" {
    # Copy-on-write pieces come from several layers: raw data, 4k normal,
    # compressed and zero clusters, and zeros past the end of the 48 MiB
    # raw base and of the 56 MiB middle image.
    local raw="$BATS_TEST_TMPDIR/bottom.raw" mid="$BATS_TEST_TMPDIR/mid.qcow2"
    /usr/bin/python3 -c '
import random, sys
r = random.Random(7)
with open(sys.argv[1], "wb") as f:
    for i in range(48 * 16):
        f.write(bytes([r.randrange(1, 256)]) * 65536)
' "$raw"
    qemu-img create -q -f qcow2 -o cluster_size=4096 -b "$raw" -F raw "$mid" 56M
    qemu-io -f qcow2 -c 'write -c -P 0xc1 0 1M' -c 'write -P 0xc2 2M 1M' \
        -c 'write -z 5M 1M' -c 'write -P 0xc3 20000 5000' \
        -c 'write -c -P 0xc4 40M 256k' -c 'write -z 47M 2M' "$mid" >/dev/null
    img="$BATS_TEST_TMPDIR/base.qcow2"
    qemu-img create -q -f qcow2 -b "$mid" -F qcow2 "$img" 64M
    run_matrix "$img" $((64 << 20)) 65536 131 132 133
}

@test "random writes: v2 overlay over a qcow2 base" {
    local base="$BATS_TEST_TMPDIR/backing.qcow2"
    qemu-img create -q -f qcow2 "$base" 64M
    prefill "$base" $((64 << 20))
    img="$BATS_TEST_TMPDIR/base.qcow2"
    qemu-img create -q -f qcow2 -o compat=0.10 -b "$base" -F qcow2 "$img"
    qemu-io -f qcow2 -c 'write -P 0xb2 3M 100k' "$img" >/dev/null
    run_matrix "$img" $((64 << 20)) 65536 111 112
}

@test "random writes: lazy_refcounts=on" {
    newimg lazy_refcounts=on 64M
    run_matrix "$img" $((64 << 20)) 65536 121 122
}

@test "random writes: preallocation=metadata" {
    newimg preallocation=metadata 64M
    run_matrix "$img" $((64 << 20)) 65536 131 132
}

@test "random writes: preallocation=falloc" {
    newimg preallocation=falloc 64M
    run_matrix "$img" $((64 << 20)) 65536 141 142
}

@test "512 B clusters, refcount_bits=64: 17 MiB of data grows the refcount table" {
    img="$BATS_TEST_TMPDIR/big.qcow2"
    local data="$BATS_TEST_TMPDIR/data.raw"
    qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 "$img" 20M
    [ "$(od -An -tu4 --endian=big -j 56 -N 4 "$img" | tr -d ' ')" = 1 ]
    head -c $((17 << 20)) /dev/urandom >"$data"
    truncate -s 20M "$data"
    start_nbdkit "$PLUGIN" file="$img"
    /usr/bin/python3 - "$uri" "$data" <<'EOF'
import sys
sys.path.insert(0, "/usr/lib/python3/dist-packages")
import nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
data = open(sys.argv[2], "rb").read()
step = 256 * 1024 + 512          # not a multiple of the refcount block span
for off in range(0, 17 << 20, step):
    h.pwrite(data[off:min(off + step, 17 << 20)], off)
h.flush()
assert h.pread(1 << 20, 16 << 20) == data[16 << 20:17 << 20]
h.shutdown()
EOF
    stop_nbdkit
    qcheck "$img"
    run -0 qemu-img compare -f raw -F qcow2 "$data" "$img"
    # the refcount table really had to grow: 17 MiB of 512 B clusters
    # needs ~35k refcounts = ~550 refcount blocks = more than the 64
    # entries one 512 B table cluster holds (header field at offset 56).
    local rt_clusters
    rt_clusters="$(od -An -tu4 --endian=big -j 56 -N 4 "$img" | tr -d ' ')"
    echo "refcount_table_clusters=$rt_clusters" >&3
    [ "$rt_clusters" -gt 1 ]
}
