#!/usr/bin/env bats
# Backing chains, external data files, the magic key form, and chains
# the plugin must refuse (too deep, loops).

bats_require_minimum_version 1.5.0
load helpers
load read-helpers

M=$((1024 * 1024))

build_chain ()
{
    local d="$BATS_FILE_TMPDIR/chain"
    mkdir -p "$d/base" "$d/top"

    # base/base.raw: raw, 20M+12k, shorter than both overlays; the end
    # falls inside a cluster of mid (64k) and of top (4k x 3).
    qemu-img create -q -f raw "$d/base/base.raw" $((20 * M + 12288))
    qio "$d/base/base.raw" -f raw \
        -c "write -P 0x01 0 $M" \
        -c "write -P 0x02 $((5 * M + 100)) 300000" \
        -c "write -P 0x03 $((12 * M)) $((2 * M))" \
        -c "write -P 0x04 $((20 * M)) 12288"

    # mid.qcow2: v2, 64k clusters, 48M, backing names relative to its own
    # directory ("base/base.raw"), created from inside the directory.
    ( cd "$d" &&
      qemu-img create -q -f qcow2 -o compat=0.10 -b base/base.raw -F raw mid.qcow2 48M ) || return 1
    qio "$d/mid.qcow2" \
        -c "write -P 0x11 $((512 * 1024)) $M" \
        -c "write -z $((5 * M)) 65536" \
        -c "write -P 0x16 $((12 * M)) $M" \
        -c "discard $((12 * M)) $((512 * 1024))" \
        -c "write -P 0x12 $((13 * M + 100)) 1000" \
        -c "write -P 0x13 $((20 * M - 4096)) 4096" \
        -c "write -P 0x14 $((30 * M)) 100000" \
        -c "write -P 0x15 $((48 * M - 512)) 512"

    # top/top.qcow2: v3, 4k clusters, 64M, backing "../mid.qcow2",
    # created from inside top/.
    ( cd "$d/top" &&
      qemu-img create -q -f qcow2 -o cluster_size=4096 -b ../mid.qcow2 -F qcow2 top.qcow2 64M ) || return 1
    qio "$d/top/top.qcow2" \
        -c "write -P 0x21 $((700 * 1024)) 8192" \
        -c "write -P 0x22 $((20 * M + 4096)) 4096" \
        -c "write -z $((30 * M + 50000)) 4096" \
        -c "discard 0 4096" \
        -c "write -z -u $((5 * M + 65536)) 8192" \
        -c "write -P 0x23 $((13 * M)) 512" \
        -c "write -P 0x24 $((64 * M - 512)) 512"

    # No backing format extension: a qcow2 backing and a raw backing,
    # which the reader has to probe.
    d="$BATS_FILE_TMPDIR/nofmt"
    mkdir -p "$d"
    mkimg "$d/base.qcow2" "" 16M -c "write -P 0x31 0 1M" -c "write -P 0x32 $((8 * M)) 100000"
    qemu-img create -q -f raw "$d/base.raw" 8M
    qio "$d/base.raw" -f raw -c "write -P 0x33 $M 1M"
    ( cd "$d" &&
      qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top-q.qcow2 16M &&
      qemu-img create -q -f qcow2 -b base.raw -F raw top-r.qcow2 16M ) || return 1
    qio "$d/top-q.qcow2" -c "write -P 0x34 $((512 * 1024)) 1M"
    qio "$d/top-r.qcow2" -c "write -P 0x35 $((3 * M / 2)) 4096"
    strip_backing_format "$d/top-q.qcow2"
    strip_backing_format "$d/top-r.qcow2"

    # External data files, with relative names, plain and raw.
    d="$BATS_FILE_TMPDIR/data"
    mkdir -p "$d"
    ( cd "$d" &&
      qemu-img create -q -f qcow2 -o data_file=plain.data d-plain.qcow2 64M &&
      qemu-img create -q -f qcow2 -o data_file=raw.data,data_file_raw=on d-raw.qcow2 64M ) || return 1
    wl_std 65536 $((64 * M)) 3
    ( cd "$d" && qio d-plain.qcow2 "${WL[@]}" && qio d-raw.qcow2 "${WL[@]}" ) || return 1

    # A chain of 20 qcow2 images: deep/l01 (no backing) ... deep/l20.
    d="$BATS_FILE_TMPDIR/deep"
    mkdir -p "$d"
    mkimg "$d/l01.qcow2" "" 4M -c "write -P 0x41 0 4096"
    local i p n
    for i in $(seq 2 20); do
        p="$(printf 'l%02d.qcow2' $((i - 1)))"; n="$(printf 'l%02d.qcow2' "$i")"
        ( cd "$d" && qemu-img create -q -f qcow2 -b "$p" -F qcow2 "$n" 4M ) || return 1
        qio "$d/$n" -c "write -P $((0x40 + i)) $((i * 65536)) 4096"
    done

    # Loops: a <-> b, and an image backed by itself.
    d="$BATS_FILE_TMPDIR/loop"
    mkdir -p "$d"
    ( cd "$d" &&
      qemu-img create -q -f qcow2 a.qcow2 4M &&
      qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 b.qcow2 4M &&
      qemu-img rebase -u -b b.qcow2 -F qcow2 a.qcow2 &&
      qemu-img create -q -f qcow2 self.qcow2 4M &&
      qemu-img rebase -u -b self.qcow2 -F qcow2 self.qcow2 ) || return 1
}

setup_file ()
{
    build_chain
}

teardown ()
{
    stop_nbdkit
}

TOP="chain/top/top.qcow2"

@test "chain qcow2 -> qcow2 -> raw: the chain is what we built" {
    run -0 qemu-img info -U --backing-chain "$BATS_FILE_TMPDIR/$TOP"
    [[ "$output" == *"backing file: ../mid.qcow2"* ]]
    [[ "$output" == *"backing file: base/base.raw"* ]]
    [[ "$output" == *"file format: raw"* ]]
}

@test "chain qcow2 -> qcow2 -> raw, relative backing names, daemonized server: data, map, size" {
    serve_and_check "$BATS_FILE_TMPDIR/$TOP"
}

@test "chain: reads past the end of the shorter backing files are zeros" {
    start_nbdkit "$PLUGIN" file="$BATS_FILE_TMPDIR/$TOP"
    nbdsh -u "$uri" -c '
M = 1 << 20
def chk(off, n, b):
    got = h.pread(n, off)
    assert got == bytes([b]) * n, "at %d+%d: %r..." % (off, n, bytes(got[:16]))
chk(20 * M - 4096, 4096, 0x13)         # mid
chk(20 * M, 4096, 0x04)                # base, through mid and top
chk(20 * M + 4096, 4096, 0x22)         # top
chk(20 * M + 8192, 4096, 0x04)         # the last 4k of base.raw
chk(20 * M + 12288, 4096, 0)           # right after the end of base.raw
got = h.pread(8192, 20 * M + 8192)    # a read straddling it
assert got == b"\x04" * 4096 + bytes(4096), bytes(got[4090:4100])
chk(20 * M + 12288, 2 * M, 0)          # past base, mid unallocated
chk(21 * M, 9 * M, 0)
chk(30 * M, 50000, 0x14)               # mid data
chk(30 * M + 50000, 4096, 0)           # top zeroed part of it
chk(48 * M - 512, 512, 0x15)           # last sector of mid
chk(48 * M, 16 * M - 512, 0)           # past the end of mid
chk(64 * M - 512, 512, 0x24)
chk(0, 4096, 0)                        # top discard: v3 zero cluster hides base
chk(4096, 4096, 0x01)                  # base shows through
chk(12 * M, M, 0x16)                   # mid (qemu ignores discard on v2 + backing)
chk(14 * M - 4096, 4096, 0x03)         # base'
}

@test "chain: relative file= with a daemonized server" {
    cd "$BATS_FILE_TMPDIR/chain/top"
    start_nbdkit "$PLUGIN" file=top.qcow2
    assert_served "$BATS_FILE_TMPDIR/$TOP"
}

@test "chain: read-only server (-r)" {
    local img="$BATS_FILE_TMPDIR/$TOP" sums
    sums="$(md5sum "$BATS_FILE_TMPDIR"/chain/top/top.qcow2 "$BATS_FILE_TMPDIR"/chain/mid.qcow2)"
    start_nbdkit -r "$PLUGIN" file="$img"
    assert_served "$img"
    run -0 nbdinfo --is read-only "$uri"
    stop_nbdkit
    [ "$(md5sum "$BATS_FILE_TMPDIR"/chain/top/top.qcow2 "$BATS_FILE_TMPDIR"/chain/mid.qcow2)" = "$sums" ]
}

@test "magic key form: nbdkit PLUGIN IMG" {
    local img="$BATS_FILE_TMPDIR/$TOP"
    start_nbdkit "$PLUGIN" "$img"
    assert_served "$img"
}

@test "backing file without a format extension: qcow2 backing (probed)" {
    local img="$BATS_FILE_TMPDIR/nofmt/top-q.qcow2"
    run -0 qemu-img info -U "$img"
    [[ "$output" != *"backing file format"* ]]
    serve_and_check "$img"
}

@test "backing file without a format extension: raw backing (probed)" {
    local img="$BATS_FILE_TMPDIR/nofmt/top-r.qcow2"
    run -0 qemu-img info -U "$img"
    [[ "$output" != *"backing file format"* ]]
    serve_and_check "$img"
}

# qemu 7.2 opens a relative data file name relative to its own current
# directory, so its side of the comparison runs in the image directory;
# the daemonized plugin (cwd /) must resolve it against the image's.
@test "external data file (data_file=plain.data)" {
    local img="$BATS_FILE_TMPDIR/data/d-plain.qcow2"
    cd "$BATS_FILE_TMPDIR/data"
    run -0 qemu-img info -U "$img"
    [[ "$output" == *"data file: plain.data"* ]]
    [[ "$output" == *"data file raw: false"* ]]
    serve_and_check "$img"
}

@test "external data file, data_file_raw=on" {
    local img="$BATS_FILE_TMPDIR/data/d-raw.qcow2"
    cd "$BATS_FILE_TMPDIR/data"
    run -0 qemu-img info -U "$img"
    [[ "$output" == *"data file raw: true"* ]]
    serve_and_check "$img"
    # The raw data file is itself the guest disk.
    nbdcopy "$uri" "$BATS_TEST_TMPDIR/out.raw"
    cmp "$BATS_TEST_TMPDIR/out.raw" raw.data
}

@test "chain of 16 images is accepted" {
    serve_and_check "$BATS_FILE_TMPDIR/deep/l16.qcow2"
    nbdsh -u "$uri" -c '
for i in range(1, 17):
    want = bytes([0x40 + i]) * 4096
    off = 0 if i == 1 else i * 65536
    assert h.pread(4096, off) == want, i'
}

@test "chain deeper than 16 is refused with a message" {
    run ! nbdkit_t -U - "$PLUGIN" file="$BATS_FILE_TMPDIR/deep/l20.qcow2" \
        --run 'nbdinfo --size "$uri"'
    echo "$output"
    [ "$status" -ne 124 ]                    # not a timeout
    [[ "$output" =~ [Dd]eep|[Dd]epth|too\ many|too\ long ]]
}

@test "backing loop a -> b -> a is refused quickly with a clear message" {
    run ! nbdkit_t -U - "$PLUGIN" file="$BATS_FILE_TMPDIR/loop/a.qcow2" \
        --run 'nbdinfo --size "$uri"'
    echo "$output"
    [ "$status" -ne 124 ]                    # not a hang
    [[ "$output" =~ [Ll]oop|[Cc]ycl|[Cc]ircular|[Rr]ecurs ]]
}

@test "image backed by itself is refused quickly with a clear message" {
    run ! nbdkit_t -U - "$PLUGIN" file="$BATS_FILE_TMPDIR/loop/self.qcow2" \
        --run 'nbdinfo --size "$uri"'
    echo "$output"
    [ "$status" -ne 124 ]
    [[ "$output" =~ [Ll]oop|[Cc]ycl|[Cc]ircular|[Rr]ecurs|itself ]]
}
