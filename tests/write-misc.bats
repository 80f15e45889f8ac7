#!/usr/bin/env bats
# Write path: space reclamation, multi-conn, fast zero, zero/trim
# allocation, durability of writes, refusal on corrupt images, read-only
# serving, and concurrency.

bats_require_minimum_version 1.5.0
load helpers

TOOLS="$BATS_TEST_DIRNAME/tools"

teardown ()
{
    stop_nbdkit
    [ ! -s "$BATS_TEST_TMPDIR/loop" ] || losetup -d "$(cat "$BATS_TEST_TMPDIR/loop")"
}

# qcheck IMG: qemu-img check must be clean (rc 0: no errors, no leaks).
qcheck ()
{
    local out rc=0
    out="$(qemu-img check "$1" 2>&1)" || rc=$?
    if [ "$rc" -ne 0 ] || ! grep -q 'No errors were found' <<<"$out"; then
        echo "qemu-img check $1: rc=$rc" >&3
        echo "$out" | head -40 >&3
        return 1
    fi
}

# qio IMG QEMU-IO ARGS...: fail loudly if any command fails or a pattern
# does not verify (qemu-io's exit status only reflects the last command).
qio ()
{
    local img="$1" out; shift
    out="$(qemu-io -f qcow2 "$@" "$img" 2>&1)" &&
        ! grep -qiE 'failed|error|invalid' <<<"$out" ||
        { echo "qemu-io on $img:" >&3; echo "$out" >&3; return 1; }
}

# mapsum IMG START END: prints "DATA ALLOC" = bytes in [START,END) that
# qemu-img map reports as data, and bytes that have a host offset.
mapsum ()
{
    qemu-img map --output=json "$1" | /usr/bin/python3 -c '
import json, sys
s, e = int(sys.argv[1]), int(sys.argv[2])
data = alloc = 0
for m in json.load(sys.stdin):
    a, b = max(s, m["start"]), min(e, m["start"] + m["length"])
    if a >= b:
        continue
    if m["data"]:
        data += b - a
    if "offset" in m:
        alloc += b - a
print(data, alloc)' "$2" "$3"
}

@test "(a) discard returns space: fill 64M, trim 3/4" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    local rnd="$BATS_TEST_TMPDIR/rnd.raw"
    qemu-img create -q -f qcow2 "$img" 64M
    head -c 64M /dev/urandom >"$rnd"
    start_nbdkit "$PLUGIN" file="$img"
    nbdcopy --flush "$rnd" "$uri"
    sync "$img"
    local du_full; du_full="$(du -k "$img" | cut -f1)"
    run -0 qemu-img compare -U -f raw -F raw "$rnd" "$uri"
    nbdsh -u "$uri" -c 'h.trim(48 << 20, 0)' -c 'h.flush()'
    stop_nbdkit
    sync "$img"
    local du_trim; du_trim="$(du -k "$img" | cut -f1)"
    echo "# du -k: full=$du_full after trim=$du_trim" >&3
    qcheck "$img"
    read -r data alloc < <(mapsum "$img" 0 $((64 << 20)))
    echo "# map: data=$data allocated=$alloc" >&3
    [ "$data" -eq $((16 << 20)) ]
    [ "$alloc" -eq $((16 << 20)) ]
    [ "$du_full" -ge $((64 * 1024)) ]
    # the host file must shrink: at most ~1/4 of the data plus metadata
    [ "$du_trim" -le $((16 * 1024 + 4096)) ]
    # trimmed clusters of a v3 image read as zeros, the rest is intact
    local exp="$BATS_TEST_TMPDIR/exp.raw"
    truncate -s 48M "$exp"
    tail -c 16M "$rnd" >>"$exp"
    run -0 qemu-img compare -f raw -F qcow2 "$exp" "$img"
}

@test "(b) multi-conn: a flushed write on one connection is seen by the others" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 "$img" 64M
    start_nbdkit "$PLUGIN" file="$img"
    run -0 nbdinfo --can multi-conn "$uri"
    nbdsh -c - <<EOF
h = [nbd.NBD() for _ in range(3)]
for x in h:
    x.connect_uri("$uri")
assert all(x.can_multi_conn() for x in h)
for i, (off, n) in enumerate([(0, 4), (65536 - 3, 10), (5 << 20, 200000),
                               ((64 << 20) - 1, 1)]):
    buf = bytes([0x40 + i]) * n
    assert h[0].pread(n, off) == bytes(n) and h[2].pread(n, off) == bytes(n)
    h[1].pwrite(buf, off)
    h[1].flush()
    assert h[0].pread(n, off) == buf, "h0 at %d" % off
    assert h[2].pread(n, off) == buf, "h2 at %d" % off
# and the other way round, overwriting
h[2].pwrite(b"next", 0); h[2].flush()
assert h[0].pread(4, 0) == b"next" and h[1].pread(4, 0) == b"next"
h[0].zero(4, 0); h[0].flush()
assert h[1].pread(4, 0) == bytes(4) and h[2].pread(4, 0) == bytes(4)
for x in h:
    x.shutdown()
EOF
    stop_nbdkit
    qcheck "$img"
}

@test "(c) FAST_ZERO: whole clusters on v3 succeed" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 "$img" 64M
    qio "$img" -c 'write -P 0x11 0 8M'
    start_nbdkit "$PLUGIN" file="$img"
    run -0 nbdinfo --can fast-zero "$uri"
    nbdsh -u "$uri" -c '
h.zero(2 << 20, 1 << 20, nbd.CMD_FLAG_FAST_ZERO)                      # allocated
h.zero(1 << 20, 32 << 20, nbd.CMD_FLAG_FAST_ZERO)                     # unallocated
h.zero(65536, 4 << 20, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE) # no trim
assert h.pread(2 << 20, 1 << 20) == bytes(2 << 20)
assert h.pread(65536, 4 << 20) == bytes(65536)
assert h.pread(4, (1 << 20) - 4) == b"\x11" * 4
assert h.pread(4, 3 << 20) == b"\x11" * 4'
    stop_nbdkit
    qcheck "$img"
    qio "$img" -c 'read -P 0x11 0 1M' -c 'read -P 0 1M 2M' -c 'read -P 0x11 3M 1M' \
        -c 'read -P 0 4M 64k' -c 'read -P 0x11 4160k 3008k' -c 'read -P 0 32M 1M'
}

@test "(c) FAST_ZERO: v2 over a backing file with data fails with ENOTSUP, data unchanged" {
    local base="$BATS_TEST_TMPDIR/base.qcow2"
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 "$base" 64M
    qio "$base" -c 'write -P 0x22 0 8M'
    qemu-img create -q -f qcow2 -o compat=0.10 -b "$base" -F qcow2 "$img"
    qio "$img" -c 'write -P 0x33 1M 64k'
    start_nbdkit "$PLUGIN" file="$img"
    nbdsh -u "$uri" -c '
import errno
for off, n in [(0, 1 << 20), (1 << 20, 65536), (2 << 20, 2 << 20)]:
    try:
        h.zero(n, off, nbd.CMD_FLAG_FAST_ZERO)
        raise SystemExit("fast zero at %d succeeded on v2 over backing data" % off)
    except nbd.Error as e:
        assert e.errnum in (errno.ENOTSUP, errno.EOPNOTSUPP), (e.errnum, e.string)
assert h.pread(1 << 20, 0) == b"\x22" * (1 << 20)
assert h.pread(65536, 1 << 20) == b"\x33" * 65536
# the connection is still fine, and a slow zero works
h.zero(65536, 2 << 20)
assert h.pread(65536, 2 << 20) == bytes(65536)'
    stop_nbdkit
    qcheck "$img"
    qio "$img" -c 'read -P 0x22 0 1M' -c 'read -P 0x33 1M 64k' \
        -c 'read -P 0x22 1088k 960k' -c 'read -P 0 2M 64k' -c 'read -P 0x22 2112k 6080k'
}

@test "(c) FAST_ZERO: a raw data file on a file system without ZERO_RANGE needs NO_HOLE | FAST_ZERO to fail with ENOTSUP, data unchanged; without NO_HOLE it punches" {
    # tmpfs has no FALLOC_FL_ZERO_RANGE: zeroing the raw data file there
    # means writing zeros, which FAST_ZERO must refuse before any change.
    local dir data
    dir="$(mktemp -d /dev/shm/q2fz.XXXXXX)" || skip "no /dev/shm"
    data="$dir/t.data"
    img="$BATS_TEST_TMPDIR/t.qcow2"
    truncate -s 1M "$dir/probe"
    if fallocate -z -o 0 -l 65536 "$dir/probe" 2>/dev/null; then
        rm -rf "$dir"; skip "/dev/shm supports ZERO_RANGE here"
    fi
    for el2 in off on; do
        rm -f "$img" "$data"
        qemu-img create -q -f qcow2 -o extended_l2=$el2,data_file="$data",data_file_raw=on "$img" 4M
        qio "$img" -c 'write -P 0x44 0 4M'
        start_nbdkit "$PLUGIN" file="$img"
        nbdsh -u "$uri" -c '
import errno
for off, n in [(0, 1 << 20), (65536, 65536), (2 << 20, 2 << 20)]:
    try:
        h.zero(n, off, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
        raise SystemExit("fast zero without holes at %d succeeded" % off)
    except nbd.Error as e:
        assert e.errnum in (errno.ENOTSUP, errno.EOPNOTSUPP), (e.errnum, e.string)
assert h.pread(4 << 20, 0) == b"\x44" * (4 << 20)
h.zero(1 << 20, 1 << 20, nbd.CMD_FLAG_FAST_ZERO)    # a hole is fast
h.zero(1 << 20, 2 << 20, nbd.CMD_FLAG_NO_HOLE)      # writes zeros
assert h.pread(1 << 20, 0) == b"\x44" * (1 << 20)
assert h.pread(2 << 20, 1 << 20) == bytes(2 << 20)
assert h.pread(1 << 20, 3 << 20) == b"\x44" * (1 << 20)'
        stop_nbdkit
        qcheck "$img"
        # The raw data file itself reads the same as the guest.
        cmp -n 1048576 "$data" <(head -c 1M /dev/zero | tr '\0' '\104')
        cmp -i 1048576 -n 2097152 "$data" /dev/zero
        qio "$img" -c 'read -P 0x44 0 1M' -c 'read -P 0 1M 2M' -c 'read -P 0x44 3M 1M'
    done
    rm -rf "$dir"
}

@test "(d) v3: zero without MAY_TRIM keeps clusters allocated, with MAY_TRIM frees them" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 "$img" 64M
    qio "$img" -c 'write -P 0x11 0 4M'
    start_nbdkit "$PLUGIN" file="$img"
    nbdsh -u "$uri" -c '
h.zero(1 << 20, 0, nbd.CMD_FLAG_NO_HOLE)
h.zero(1 << 20, 2 << 20)
h.flush()'
    stop_nbdkit
    qcheck "$img"
    qio "$img" -c 'read -P 0 0 1M' -c 'read -P 0x11 1M 1M' -c 'read -P 0 2M 1M' \
        -c 'read -P 0x11 3M 1M'
    local data alloc
    read -r data alloc < <(mapsum "$img" 0 $((1 << 20)))
    echo "# NO_HOLE range: data=$data allocated=$alloc" >&3
    [ "$alloc" -eq $((1 << 20)) ]           # still allocated
    read -r data alloc < <(mapsum "$img" $((2 << 20)) $((3 << 20)))
    echo "# MAY_TRIM range: data=$data allocated=$alloc" >&3
    [ "$data" -eq 0 ] && [ "$alloc" -eq 0 ]  # freed
    # and the freed clusters are reused: 1 MiB more data must not grow the file
    local end1 end2
    end1="$(qemu-img check --output=json "$img" | sed -n 's/.*"image-end-offset": \([0-9]*\).*/\1/p')"
    start_nbdkit "$PLUGIN" file="$img"
    nbdsh -u "$uri" -c 'h.pwrite(b"\x44" * (1 << 20), 40 << 20)'
    stop_nbdkit
    end2="$(qemu-img check --output=json "$img" | sed -n 's/.*"image-end-offset": \([0-9]*\).*/\1/p')"
    echo "# image end before=$end1 after=$end2" >&3
    [ "$end2" -le "$end1" ]
    qcheck "$img"
}

@test "(d) v2 (no backing): zero with and without MAY_TRIM: zeros, no leaks" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 -o compat=0.10 "$img" 64M
    qio "$img" -c 'write -P 0x11 0 4M'
    start_nbdkit "$PLUGIN" file="$img"
    nbdsh -u "$uri" -c '
h.zero(1 << 20, 0, nbd.CMD_FLAG_NO_HOLE)
h.zero(1 << 20, 2 << 20)
h.flush()'
    stop_nbdkit
    qio "$img" -c 'read -P 0 0 1M' -c 'read -P 0x11 1M 1M' -c 'read -P 0 2M 1M' \
        -c 'read -P 0x11 3M 1M'
    qcheck "$img"
}

@test "(e) writes land: qemu-io verifies them after the server stops" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 "$img" 64M
    qio "$img" -c 'write -P 0x99 8M 1M'
    start_nbdkit "$PLUGIN" file="$img"
    nbdsh -u "$uri" -c '
for pat, off, n in [(0xa1, 0, 65536), (0xa2, 65536 + 100, 1000),
                    (0xa3, 3 * 65536 - 7, 14), (0xa4, (8 << 20) + 4096, 8192),
                    (0xa5, (16 << 20) - 1, 3 << 20), (0xa6, (64 << 20) - 513, 513)]:
    h.pwrite(bytes([pat]) * n, off, nbd.CMD_FLAG_FUA if pat & 1 else 0)'
    stop_nbdkit
    qcheck "$img"
    qio "$img" -c 'read -P 0xa1 0 64k' -c 'read -P 0 64k 100' \
        -c 'read -P 0xa2 65636 1000' -c 'read -P 0 66636 129965' \
        -c 'read -P 0xa3 196601 14' -c 'read -P 0 196615 1000' \
        -c 'read -P 0x99 8M 4096' -c 'read -P 0xa4 8196k 8k' -c 'read -P 0x99 8204k 1008k' \
        -c 'read -P 0 16383k 1023' -c 'read -P 0xa5 16777215 3145728' \
        -c 'read -P 0 19922943 1' -c 'read -P 0xa6 67108351 513'
}

@test "(f) an image with the corrupt bit set is served read-only, with or without -r" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 "$img" 64M
    qio "$img" -c 'write -P 0x33 0 1M'
    # incompatible_features (offset 72, 8 bytes BE): bit 1 = corrupt
    printf '\x02' | dd of="$img" bs=1 seek=79 conv=notrunc status=none
    qemu-img info "$img" | grep -q 'corrupt: true'
    local sum; sum="$(sha256sum <"$img")"

    # Without -r the export is read-only (as the man page says), the
    # data readable, and a write refused; the image never changes.
    start_nbdkit "$PLUGIN" file="$img"
    run -2 nbdinfo --can write "$uri"
    nbdsh -u "$uri" -c 'assert h.pread(1 << 20, 0) == b"\x33" * (1 << 20)'
    run nbdsh -u "$uri" -c 'h.set_strict_mode(0)' -c '
try:
    h.pwrite(b"x" * 512, 0)
    print("WRITE SUCCEEDED")
except nbd.Error as e:
    print("write refused:", e.errnum, e.string)'
    [[ "$output" =~ "write refused" ]] || { echo "$output" >&3; false; }
    stop_nbdkit
    [ "$(sha256sum <"$img")" = "$sum" ]

    start_nbdkit "$PLUGIN" -r file="$img"
    run -2 nbdinfo --can write "$uri"
    run -0 qemu-img compare -U -f raw -F qcow2 "$uri" "$img"
    nbdsh -u "$uri" -c 'assert h.pread(1 << 20, 0) == b"\x33" * (1 << 20)'
    stop_nbdkit
    [ "$(sha256sum <"$img")" = "$sum" ]
}

@test "(g) read-only: nbdkit -r refuses writes and leaves the file untouched" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 -o lazy_refcounts=on "$img" 64M
    qio "$img" -c 'write -P 0x44 0 3M' -c 'write -z 4M 1M'
    touch -d '2001-02-03 04:05:06' "$img"
    local sum st
    sum="$(sha256sum <"$img")"; st="$(stat -c '%Y %s' "$img")"
    start_nbdkit "$PLUGIN" -r file="$img"
    run -2 nbdinfo --can write "$uri"
    nbdcopy "$uri" null:
    nbdsh -u "$uri" -c 'h.set_strict_mode(0)' -c '
import errno
assert h.is_read_only()
assert h.pread(4, 0) == b"\x44" * 4
for f in (lambda: h.pwrite(b"x", 0), lambda: h.zero(512, 0),
          lambda: h.trim(65536, 0)):
    try:
        f(); raise SystemExit("a write op succeeded on a read-only export")
    except nbd.Error as e:
        assert e.errnum in (errno.EPERM, errno.EROFS), (e.errnum, e.string)
h.flush()'
    stop_nbdkit
    [ "$(sha256sum <"$img")" = "$sum" ]
    [ "$(stat -c '%Y %s' "$img")" = "$st" ]
    qio "$img" -c 'read -P 0x44 0 3M'
}

@test "(h) concurrency: fio randwrite, 2 connections, verify" {
    command -v fio >/dev/null || skip "no fio"
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 "$img" 64M
    qio "$img" -c 'write -P 0x55 0 8M' -c 'write -P 0x66 40M 8M'
    start_nbdkit "$PLUGIN" file="$img"
    run fio --name=w --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k \
        --iodepth=16 --numjobs=2 --offset_increment=32M --size=32M \
        --verify=crc32c --do_verify=1 --verify_state_save=0 --group_reporting
    [ "$status" -eq 0 ] || { echo "$output" >&3; false; }
    [[ ! "$output" =~ "verify: bad" ]]
    # a second round with mixed block sizes and periodic flushes
    run fio --name=m --ioengine=nbd --uri="$uri" --rw=randwrite \
        --bsrange=512-128k --bs_unaligned=1 --iodepth=8 --numjobs=2 \
        --offset_increment=32M --size=16M --fsync=16 \
        --verify=crc32c --do_verify=1 --verify_state_save=0 --group_reporting
    [ "$status" -eq 0 ] || { echo "$output" >&3; false; }
    stop_nbdkit
    qcheck "$img"
}

# samecluster OPTS [BACKING-OPTS]: two connections, same fresh cluster
samecluster ()
{
    local opts="$1" cs="$2" n="$3" backing="${4:-}"
    img="$BATS_TEST_TMPDIR/t.qcow2"
    local exp="$BATS_TEST_TMPDIR/exp.raw"
    if [ -n "$backing" ]; then
        local base="$BATS_TEST_TMPDIR/base.qcow2"
        qemu-img create -q -f qcow2 "$base" 64M
        qio "$base" -c 'write -P 0x77 0 60M'
        qemu-img create -q -f qcow2 -o "$opts" -b "$base" -F qcow2 "$img"
    else
        qemu-img create -q -f qcow2 -o "$opts" "$img" 64M
    fi
    qemu-img convert -O raw "$img" "$exp"
    start_nbdkit "$PLUGIN" file="$img"
    /usr/bin/python3 "$TOOLS/samecluster.py" "$uri" "$cs" "$n" "$exp"
    stop_nbdkit
    qcheck "$img"
    run -0 qemu-img compare -f raw -F qcow2 "$exp" "$img"
}

@test "(i) same fresh cluster from two connections: v3, 64k clusters" {
    samecluster compat=1.1 65536 1000
}

@test "(i) same fresh cluster from two connections: v2" {
    samecluster compat=0.10 65536 1000
}

@test "(i) same fresh cluster from two connections: extended_l2" {
    samecluster extended_l2=on 65536 1000
}

@test "(i) same fresh cluster from two connections: overlay over a backing file (COW)" {
    samecluster compat=1.1 65536 900 backing
}

@test "(i) same fresh cluster from two connections: extended_l2 overlay (subcluster COW)" {
    samecluster extended_l2=on 65536 900 backing
}

@test "(i) same fresh cluster from two connections: 2M clusters" {
    samecluster cluster_size=2M $((2 << 20)) 30
}

# zonestress OPTS ZONE [backing]: two connections, 16 requests in flight
# each, writes/zeroes/trims/reads/flushes on zones of their own, checked
# against a model as they go and by qemu-img compare afterwards.
zonestress ()
{
    local opts="$1" zone="$2" backing="${3:-}"
    img="$BATS_TEST_TMPDIR/t.qcow2"
    local exp="$BATS_TEST_TMPDIR/exp.raw"
    if [ -n "$backing" ]; then
        local base="$BATS_TEST_TMPDIR/base.qcow2"
        qemu-img create -q -f qcow2 -o cluster_size=4096 "$base" 64M
        qio "$base" -c 'write -P 0x71 0 40M' -c 'write -c -P 0x72 40M 4M' \
            -c 'write -z 44M 4M' -c 'write -P 0x73 50M 6M'
        qemu-img create -q -f qcow2 -o "$opts" -b "$base" -F qcow2 "$img"
    else
        qemu-img create -q -f qcow2 -o "$opts" "$img" 64M
        qio "$img" -c 'write -P 0x74 0 16M' -c 'write -P 0x75 32M 8M'
    fi
    qemu-img convert -O raw "$img" "$exp"
    start_nbdkit "$PLUGIN" file="$img"
    run /usr/bin/python3 "$TOOLS/zonestress.py" "$uri" "$exp" --seed 7 \
        --conns 2 --depth 16 --zone "$zone" --ops 1500
    [ "$status" -eq 0 ] || { echo "$output" >&3; false; }
    stop_nbdkit
    qcheck "$img"
    run -0 qemu-img compare -f raw -F qcow2 "$exp" "$img"
}

@test "(j) zone stress: overlay over a backing file (copy-on-write)" {
    zonestress compat=1.1 $((256 << 10)) backing
}

@test "(j) zone stress: extended_l2 overlay over a backing file" {
    zonestress extended_l2=on $((256 << 10)) backing
}

@test "(j) zone stress: v2, 4k clusters, refcount blocks fill up" {
    zonestress compat=0.10,cluster_size=4096 $((256 << 10))
}

@test "(j) zone stress: 2M clusters" {
    zonestress cluster_size=2M $((4 << 20))
}

@test "(k) leaked refcounts past the end of the file (a crash mid-allocation) are skipped, not corruption" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 "$img" 64M
    qio "$img" -c 'write -P 0x31 0 1M'
    # Give the two clusters after the end of the file a refcount, as a
    # crash after a refcount update and before the cluster's write does.
    /usr/bin/python3 - "$img" <<'PY'
import os, struct, sys
f = open(sys.argv[1], "r+b")
h = f.read(104)
cbits = struct.unpack(">I", h[20:24])[0]
rt_off = struct.unpack(">Q", h[48:56])[0]
assert struct.unpack(">I", h[96:100])[0] == 4      # 16-bit refcounts
cs = 1 << cbits
f.seek(rt_off)
rb_off = struct.unpack(">Q", f.read(8))[0]
n = (os.fstat(f.fileno()).st_size + cs - 1) // cs
for c in (n, n + 1):
    f.seek(rb_off + 2 * c)
    f.write(struct.pack(">H", 1))
PY
    # QEMU does not count refcounts past the end of the file at all.
    run -0 qemu-img check "$img"
    start_nbdkit "$PLUGIN" file="$img"
    PATH=/usr/bin:$PATH nbdsh -u "$uri" -c '
h.pwrite(b"\x32" * 65536, 8 << 20)
h.pwrite(b"\x33" * 4096, 20 << 20)
h.flush()'
    stop_nbdkit
    # Once the file grows over them they are ordinary leaks (rc 3).
    run qemu-img check "$img"
    [ "$status" -eq 0 ] || [ "$status" -eq 3 ] || { echo "$output" >&3; false; }
    [[ ! "$output" =~ ERROR ]] || { echo "$output" >&3; false; }
    qio "$img" -c 'read -P 0x31 0 1M' -c 'read -P 0x32 8M 64k' \
        -c 'read -P 0x33 20M 4k' -c "read -P 0 $(( (20 << 20) + 4096 )) 60k"
    # Not marked corrupt: a second write session works too.
    start_nbdkit "$PLUGIN" file="$img"
    PATH=/usr/bin:$PATH nbdsh -u "$uri" -c 'h.pwrite(b"\x34" * 512, 30 << 20)'
    stop_nbdkit
}

@test "(l) external data file: writes inside guest cluster 0 land at their own offsets" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 -o data_file="$BATS_TEST_TMPDIR/t.data" \
        "$img" 16M
    start_nbdkit "$PLUGIN" file="$img"
    PATH=/usr/bin:$PATH nbdsh -u "$uri" -c '
h.pwrite(b"\x41" * 100, 0x6000)
h.pwrite(b"\x42" * 100, 0x7000)
h.pwrite(b"\x43" * 100, 0x10)
assert h.pread(100, 0x6000) == b"\x41" * 100
assert h.pread(16, 0) == bytes(16)
h.flush()'
    stop_nbdkit
    qio "$img" -c 'read -P 0x41 0x6000 100' -c 'read -P 0x42 0x7000 100' \
        -c 'read -P 0x43 0x10 100' -c 'read -P 0 0 16' -c 'read -P 0 0x6064 0x9c'
    qcheck "$img"
}

@test "(l) external data file shorter than the disk at open: block status reports data written past its old end as data (nbdcopy keeps it)" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    local data="$BATS_TEST_TMPDIR/t.data"
    qemu-img create -q -f qcow2 -o data_file="$data" "$img" 4M
    truncate -s 0 "$data"
    # A sparse metadata file: block status then asks the data file for
    # its holes, as QEMU does for a metadata-preallocated image.
    cp --sparse=always "$img" "$img.s" && mv "$img.s" "$img"
    start_nbdkit "$PLUGIN" file="$img"
    PATH=/usr/bin:$PATH nbdsh -u "$uri" -c 'h.pwrite(b"\x5a" * 65536, 1 << 20)'
    run -0 nbdinfo --map --json "$uri"
    echo "$output" | /usr/bin/python3 -c '
import json, sys
for e in json.load(sys.stdin):
    if e["offset"] <= (1 << 20) < e["offset"] + e["length"]:
        assert e["type"] == 0, e
        break
else:
    raise SystemExit("no extent at 1 MiB")'
    nbdcopy "$uri" "$BATS_TEST_TMPDIR/copy.raw"
    stop_nbdkit
    cmp -i 1048576:0 -n 65536 "$BATS_TEST_TMPDIR/copy.raw" <(head -c 65536 /dev/zero | tr '\0' '\132')
    qcheck "$img"
}

@test "(l) a raw external data file: a trim gives its space back and it reads zeros there" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    local data="$BATS_TEST_TMPDIR/t.data" before after
    qemu-img create -q -f qcow2 -o data_file="$data",data_file_raw=on "$img" 16M
    qemu-io -f raw -c 'write -P 0x33 0 16M' "$data" > /dev/null
    sync "$data"
    before=$(du -k "$data" | cut -f1)
    start_nbdkit "$PLUGIN" file="$img"
    PATH=/usr/bin:$PATH nbdsh -u "$uri" -c 'h.trim(8 << 20, 4 << 20); h.flush()
assert h.pread(8 << 20, 4 << 20) == bytes(8 << 20)'
    stop_nbdkit
    sync "$data"
    after=$(du -k "$data" | cut -f1)
    echo "# data file: $before KiB before the trim, $after KiB after" >&3
    [ "$after" -le $((before - 7 * 1024)) ]
    cmp -i $((4 << 20)) -n $((8 << 20)) "$data" /dev/zero
    qcheck "$img"
    qio "$img" -c 'read -P 0x33 0 4M' -c 'read -P 0 4M 8M' -c 'read -P 0x33 12M 4M'
}

@test "(l) external data file: an L2 entry mapping a guest cluster to another cluster's offset is corruption (EIO), not a way to zero someone else's data" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    local data="$BATS_TEST_TMPDIR/t.data"
    qemu-img create -q -f qcow2 -o data_file="$data" "$img" 1M
    qio "$img" -c 'write -P 0xaa 0 64k' -c 'write -P 0xbb 64k 64k' -c 'write -P 0xcc 128k 64k'
    # Swap the L2 entries of guest clusters 0 and 1 (QEMU: EIO, corrupt).
    /usr/bin/python3 - "$img" <<'EOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(40); l1 = struct.unpack(">Q", f.read(8))[0]
    f.seek(l1); l2 = struct.unpack(">Q", f.read(8))[0] & ((1 << 56) - 512)
    f.seek(l2); a, b = struct.unpack(">QQ", f.read(16))
    f.seek(l2); f.write(struct.pack(">QQ", b, a))
EOF
    start_nbdkit "$PLUGIN" file="$img"
    PATH=/usr/bin:$PATH nbdsh -u "$uri" -c '
import errno
for op in (lambda: h.pread(4, 0), lambda: h.pread(4, 65536),
           lambda: h.zero(65536, 0), lambda: h.pwrite(b"x" * 512, 512)):
    try:
        op()
        raise SystemExit("an operation on a swapped cluster succeeded")
    except nbd.Error as e:
        assert e.errnum == errno.EIO, e.string
assert h.pread(65536, 131072) == b"\xcc" * 65536'
    stop_nbdkit
    # The data file is untouched; the write marked the image corrupt.
    cmp <(head -c 65536 "$data") <(head -c 65536 /dev/zero | tr '\0' '\252')
    cmp <(tail -c +65537 "$data" | head -c 65536) <(head -c 65536 /dev/zero | tr '\0' '\273')
    qemu-img info "$img" | grep -q 'corrupt: true'
}

@test "(l) external data file: the zero flag with offset 0 is a plain zero cluster whatever COPIED says, as QEMU reads it" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 -o data_file="$BATS_TEST_TMPDIR/t.data" "$img" 1M
    qio "$img" -c 'write -P 0xaa 0 64k' -c 'write -P 0xbb 64k 64k'
    # Guest cluster 1's entry becomes COPIED | ZERO with offset 0.
    /usr/bin/python3 - "$img" <<'EOF2'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(40); l1 = struct.unpack(">Q", f.read(8))[0]
    f.seek(l1); l2 = struct.unpack(">Q", f.read(8))[0] & ((1 << 56) - 512)
    f.seek(l2 + 8); f.write(struct.pack(">Q", (1 << 63) | 1))
EOF2
    qcheck "$img"
    start_nbdkit "$PLUGIN" file="$img"
    PATH=/usr/bin:$PATH nbdsh -u "$uri" -c '
assert h.pread(65536, 65536) == bytes(65536)
h.pwrite(b"\xcc" * 4096, 65536 + 4096)
h.trim(65536, 0)
h.zero(4096, 65536)'
    stop_nbdkit
    ! qemu-img info "$img" | grep -q 'corrupt: true'
    qcheck "$img"
    qio "$img" -c 'read -P 0 0 68k' -c 'read -P 0xcc 68k 4k' -c 'read -P 0 72k 56k'
}
@test "(m) memory: idle threads keep no cluster-sized buffers (2M clusters, 16 copy-on-writes in flight)" {
    [ "${SANITIZE:-}" != 1 ] || skip "RSS is meaningless under ASan"
    base="$BATS_TEST_TMPDIR/base.qcow2"
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=2M "$base" 256M
    qio "$base" -c 'write -P 0x11 0 256M'
    qemu-img create -q -f qcow2 -o cluster_size=2M -b "$base" -F qcow2 "$img"
    Q2_QUIET=1 start_nbdkit "$PLUGIN" file="$img"
    # Every write allocates a 2 MiB cluster and copies the rest of it up;
    # with 16 in flight, 16 server threads each need two cluster buffers.
    fio --name=cow --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k \
        --iodepth=16 --size=256M --io_size=8M --output=/dev/null
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$(cat "$pidfile")/status")
    stop_nbdkit
    # Kept per thread, that was about 60 MiB; lent per request, under 25.
    [ "$rss" -lt 40960 ] || { echo "nbdkit RSS ${rss} kB" >&3; false; }
    qcheck "$img"
}

# set_l2_entry1 IMG EXPR: sets the L2 entry of guest cluster 1 to the
# python expression EXPR of e (the old entry) and end (the file size).
set_l2_entry1 ()
{
    /usr/bin/python3 - "$1" "$2" <<'PY'
import os, struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(40); l1 = struct.unpack(">Q", f.read(8))[0]
    f.seek(l1); l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    f.seek(l2 + 8); e = struct.unpack(">Q", f.read(8))[0]
    end = os.fstat(f.fileno()).st_size
    f.seek(l2 + 8); f.write(struct.pack(">Q", eval(sys.argv[2])))
PY
}

@test "(n) a write that meets a bad L2 entry marks the image corrupt, also in an owned L2 table" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    for prior in no yes; do
        qemu-img create -q -f qcow2 "$img" 4M
        qio "$img" -c 'write -P 1 0 256k'
        # Reserved bit 57 in the L2 entry of guest cluster 1.
        set_l2_entry1 "$img" 'e | (1 << 57)'
        start_nbdkit "$PLUGIN" file="$img"
        run nbdsh -u "$uri" -c "
if '$prior' == 'yes':
    h.pwrite(b'a' * 4096, 0)        # the L2 table is owned and cached
try:
    h.pwrite(b'b' * 4096, 65536)
    print('WRITE SUCCEEDED')
except nbd.Error as e:
    print('refused', e.errnum)
try:
    h.pwrite(b'c' * 4096, 2 << 20)
    print('LATER WRITE SUCCEEDED')
except nbd.Error as e:
    print('later refused', e.errnum)
"
        stop_nbdkit
        [[ "$output" =~ "refused 5" && "$output" =~ "later refused" ]] ||
            { echo "prior=$prior: $output" >&3; false; }
        qemu-img info "$img" | grep -q 'corrupt: true' ||
            { echo "prior=$prior: not marked corrupt" >&3; false; }
    done
}

# try_refused IMG PREP OP: serves IMG, runs the python statements PREP,
# then OP; prints "refused ERRNO" if OP fails, else "SUCCEEDED".
try_refused ()
{
    start_nbdkit "$PLUGIN" file="$1"
    run nbdsh -u "$uri" -c "
$2
try:
    $3
    print('SUCCEEDED')
except nbd.Error as e:
    print('refused', e.errnum)
"
    stop_nbdkit
}

@test "(o) an L2 entry past the end of the file, met by a write, marks the image corrupt" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 "$img" 4M
    qio "$img" -c 'write -P 1 0 256k'
    set_l2_entry1 "$img" '(1 << 63) | (end + (64 << 20))'
    cp "$img" "$BATS_TEST_TMPDIR/z.qcow2"
    try_refused "$img" "h.pwrite(b'a' * 4096, 0)" "h.pwrite(b'b' * 4096, 65536)"
    [[ "$output" =~ "refused 5" ]] || { echo "$output" >&3; false; }
    qemu-img info "$img" | grep -q 'corrupt: true'
    # Nothing was written past the end of the file.
    [ "$(stat -c %s "$img")" -lt $((64 << 20)) ]
    # Zeroing that cluster (keeping its host offset) is refused the same way.
    img="$BATS_TEST_TMPDIR/z.qcow2"
    try_refused "$img" "" "h.zero(65536, 65536)"
    [[ "$output" =~ "refused 5" ]] || { echo "zero: $output" >&3; false; }
    qemu-img info "$img" | grep -q 'corrupt: true'
}

@test "(p) l2-cache-size larger than the disk's L2 tables is capped, and a big one costs memory only as it fills" {
    [ "${SANITIZE:-}" != 1 ] || skip "RSS is meaningless under ASan"
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 "$img" 10M
    for size in 0 20G 100T; do
        Q2_QUIET=1 start_nbdkit "$PLUGIN" file="$img" l2-cache-size=$size
        nbdsh -u "$uri" -c 'h.pwrite(b"x" * 512, 0)'
        rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$(cat "$pidfile")/status")
        stop_nbdkit
        [ "$rss" -lt 65536 ] || { echo "l2-cache-size=$size: RSS $rss kB" >&3; false; }
    done
    # A disk whose L2 tables do fill a big cache (100 GiB in 512-byte
    # clusters: 1.6 GiB of L2): the cache's bookkeeping grows with use.
    # Set up in full at open, 4G of 512-byte slices cost 130 MiB.
    rm -f "$img"
    qemu-img create -q -f qcow2 -o cluster_size=512 "$img" 100G
    Q2_QUIET=1 start_nbdkit "$PLUGIN" file="$img" l2-cache-size=4G
    nbdsh -u "$uri" -c 'h.pwrite(b"x" * 512, 0); h.pwrite(b"y" * 512, 99 << 30); h.flush()'
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$(cat "$pidfile")/status")
    stop_nbdkit
    [ "$rss" -lt 65536 ] || { echo "100G, l2-cache-size=4G: RSS $rss kB" >&3; false; }
    qcheck "$img"
    # A limit far beyond any memory (1 EiB disk, 4T of cache): slots are
    # capped, so the image still opens (it failed "out of memory").
    rm -f "$img"
    qemu-img create -q -f qcow2 -o cluster_size=2M "$img" 1E
    Q2_QUIET=1 start_nbdkit "$PLUGIN" file="$img" l2-cache-size=4T
    nbdsh -u "$uri" -c 'h.pwrite(b"x" * 512, 1 << 50); assert h.pread(1, 1 << 50) == b"x"'
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$(cat "$pidfile")/status")
    stop_nbdkit
    [ "$rss" -lt 65536 ] || { echo "1E, l2-cache-size=4T: RSS $rss kB" >&3; false; }
    qcheck "$img"
}

@test "(q) a partly written new cluster at the end of the file: the file ends on a cluster boundary, as QEMU's do" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    for cs in 512 65536 2M; do
        rm -f "$img"
        qemu-img create -q -f qcow2 -o cluster_size=$cs "$img" 16M
        start_nbdkit "$PLUGIN" file="$img"
        nbdsh -u "$uri" -c 'h.pwrite(b"x" * 100, (1 << 20) + 7)' -c 'h.flush()'
        # After a flush, while still being served, and after close.
        end=$(qemu-img check -U --output=json "$img" |
              /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["image-end-offset"])')
        [ "$(stat -c %s "$img")" -eq "$end" ] ||
            { echo "cluster_size=$cs: file $(stat -c %s "$img"), end $end" >&3; false; }
        stop_nbdkit
        [ "$(stat -c %s "$img")" -eq "$end" ]
        qcheck "$img"
        qio "$img" -c 'read -P 0 1M 7' -c 'read -P 0x78 1048583 100' \
            -c 'read -P 0 1048683 100'
    done
}

@test "(r) an image on a block device: writes, flushes and close work" {
    truncate -s 64M "$BATS_TEST_TMPDIR/dev.img"
    loop=$(losetup -f --show "$BATS_TEST_TMPDIR/dev.img" 2>/dev/null) ||
        skip "no loop devices here"
    echo "$loop" > "$BATS_TEST_TMPDIR/loop"
    qemu-img create -q -f qcow2 "$loop" 32M
    start_nbdkit "$PLUGIN" file="$loop"
    nbdsh -u "$uri" -c 'h.pwrite(b"\x5a" * 70000, 12345)' -c 'h.flush()' \
        -c 'h.pwrite(b"\x5b" * 512, 1 << 20, nbd.CMD_FLAG_FUA)'
    stop_nbdkit
    grep -q 'error' "$nbdkit_log" && { cat "$nbdkit_log" >&3; false; }
    qcheck "$loop"
    qio "$loop" -c 'read -P 0x5a 12345 70000' -c 'read -P 0x5b 1M 512'
}

@test "(s) trim gives space back with clusters smaller than a file system block (512 B)" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=512 "$img" 16M
    start_nbdkit "$PLUGIN" file="$img"
    nbdsh -u "$uri" -c 'h.pwrite(b"\x42" * (8 << 20), 0)' -c 'h.flush()'
    sync "$img"
    local du_full; du_full="$(du -k "$img" | cut -f1)"
    # in random order: freed neighbours must still be punched together
    nbdsh -u "$uri" -c '
import random
r = random.Random(7)
chunks = list(range(0, 8 << 20, 64 << 10))
r.shuffle(chunks)
for c in chunks:
    h.trim(64 << 10, c)
h.flush()'
    stop_nbdkit
    sync "$img"
    local du_trim; du_trim="$(du -k "$img" | cut -f1)"
    echo "# du -k: full=$du_full after trim=$du_trim" >&3
    qcheck "$img"
    [ "$du_full" -ge $((8 * 1024)) ]
    # the metadata of 16 MiB of 512 B clusters is about 1.2 MiB
    [ "$du_trim" -le 2048 ]
    qio "$img" -c 'read -P 0 0 16M'
}

@test "(t) extended_l2 with a raw data file: zeroing subclusters zeroes the data file too" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    local data="$BATS_TEST_TMPDIR/data.raw" guest="$BATS_TEST_TMPDIR/guest.raw"
    qemu-img create -q -f qcow2 -o cluster_size=65536,extended_l2=on,data_file="$data",data_file_raw=on "$img" 1M
    qio "$img" -c 'write -P 0x55 0 1M'
    start_nbdkit "$PLUGIN" file="$img"
    # whole subclusters (2 KiB) and a whole cluster, with and without trim
    nbdsh -u "$uri" -c 'h.zero(2048, 0)' -c 'h.zero(6144, 67584)' \
        -c 'h.zero(65536, 196608, nbd.CMD_FLAG_NO_HOLE)' -c 'h.zero(10240, 1038336)' -c 'h.flush()'
    stop_nbdkit
    qcheck "$img"
    qemu-img convert -O raw "$img" "$guest"
    # the raw data file reads exactly as the guest disk
    cmp "$guest" "$data"
    qio "$img" -c 'read -P 0 0 2k' -c 'read -P 0x55 2k 64k' -c 'read -P 0 66k 6k' \
        -c 'read -P 0x55 72k 120k' -c 'read -P 0 192k 64k' -c 'read -P 0x55 256k 758k' \
        -c 'read -P 0 1014k 10k'
}

@test "(u) an unaligned zero over a range that already reads as zeros allocates nothing, and FAST_ZERO succeeds" {
    local opts
    for opts in compat=1.1 compat=0.10 extended_l2=on cluster_size=2M; do
        img="$BATS_TEST_TMPDIR/t.qcow2"
        rm -f "$img"
        qemu-img create -q -f qcow2 -o "$opts" "$img" 8M
        qio "$img" -c 'write -P 0x11 4M 64k' -c 'write -z 6M 64k'
        read -r before _ < <(mapsum "$img" 0 $((8 << 20)))
        start_nbdkit "$PLUGIN" file="$img"
        nbdsh -u "$uri" -c '
h.zero(1000, 100, nbd.CMD_FLAG_FAST_ZERO)          # unallocated
h.zero(100000, 70000, nbd.CMD_FLAG_FAST_ZERO)      # unallocated, two clusters
h.zero(1000, (6 << 20) + 4000)                      # zero-flagged (v3)
h.zero(300, (4 << 20) + 100)                        # allocated: written
assert h.pread(4096, 4 << 20) == b"\x11" * 100 + bytes(300) + b"\x11" * 3696
try:
    h.zero(100, (4 << 20) + 8192, nbd.CMD_FLAG_FAST_ZERO)
    assert False, "FAST_ZERO inside an allocated cluster succeeded"
except nbd.Error as e:
    assert e.errno == "ENOTSUP", e.errno
h.flush()'
        stop_nbdkit
        qcheck "$img"
        read -r after _ < <(mapsum "$img" 0 $((8 << 20)))
        echo "# $opts: data before=$before after=$after" >&3
        [ "$after" -eq "$before" ]
        qio "$img" -c 'read -P 0 0 4M' -c 'read -P 0x11 4M 100' -c 'read -P 0 4194404 300' \
            -c 'read -P 0x11 4194704 65136' -c 'read -P 0 4259840 3968k'
    done
}

@test "(v) a flush after a new L2 table writes the L1 sectors that changed, not the whole L1 table" {
    # 1 PiB with 64k clusters: a 16 MiB L1 table.  Each write lands in a
    # new 512 MiB region (a new L2 table) and is flushed.
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 "$img" 1P
    start_nbdkit "$PLUGIN" file="$img"
    local pid before after
    pid="$(cat "$pidfile")"
    before="$(awk '/^wchar/ { print $2 }' /proc/"$pid"/io)"
    nbdsh -u "$uri" -c '
for i in range(20):
    h.pwrite(b"\x5a" * 4096, i * (3 << 40) // 20 + (i << 29))
    h.flush()'
    after="$(awk '/^wchar/ { print $2 }' /proc/"$pid"/io)"
    stop_nbdkit
    echo "# bytes written by nbdkit: $((after - before))" >&3
    # 20 flushes of the whole table would be 320 MiB.
    [ $((after - before)) -lt $((8 << 20)) ]
    qcheck "$img"
    qio "$img" -c "read -P 0x5a $(( 3 * (3 << 40) / 20 + (3 << 29) )) 4k" \
        -c "read -P 0x5a 0 4k" -c "read -P 0 4k 60k"
}

@test "(w) freeing clusters with a large l2-cache-size looks up the freed slices instead of scanning the cache" {
    # 8192 freed clusters; a scan of a 1G cache for each took 6 s.
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 "$img" 2P
    qio "$img" -c 'write -P 0x42 0 512M'
    start_nbdkit "$PLUGIN" file="$img" l2-cache-size=1G
    local t0 t1
    t0="$(date +%s%N)"
    nbdsh -u "$uri" -c 'h.trim(512 << 20, 0); h.flush()'
    t1="$(date +%s%N)"
    stop_nbdkit
    echo "# trim of 512 MiB: $(( (t1 - t0) / 1000000 )) ms" >&3
    [ $(( (t1 - t0) / 1000000 )) -lt 3000 ]
    qcheck "$img"
    qio "$img" -c 'read -P 0 0 512M'
}

@test "(x) the overlap index is sized by the tables that exist, not by the L1 table's size" {
    [ "${SANITIZE:-}" != 1 ] || skip "address space is meaningless under ASan"
    # 128 GiB with 512-byte clusters: a 4M-entry L1.  An index sized
    # from it took 256 MiB at the first write.
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=512 "$img" 128G
    qio "$img" -c 'write -P 0x11 0 64k' -c 'write -P 0x22 100G 64k'
    # One connection (a second one may start its worker threads before
    # the first one's have gone: 8 MiB of stack each), and one malloc
    # arena (a worker's first malloc would reserve 64 MiB of its own).
    export MALLOC_ARENA_MAX=1
    Q2_QUIET=1 start_nbdkit "$PLUGIN" file="$img"
    local grew
    grew="$(nbdsh -u "$uri" -c "
import re
def vm():
    with open('/proc/$(cat "$pidfile")/status') as f:
        return int(re.search(r'VmSize:\s+(\d+)', f.read()).group(1))
assert h.pread(512, 100 << 30) == b'\x22' * 512
before = vm()
h.pwrite(b'\x33' * 512, 50 << 30)
h.flush()
print(vm() - before)")"
    stop_nbdkit
    echo "# address space grew by $(( grew / 1024 )) MiB at the first write" >&3
    [ "$grew" -lt $((64 * 1024)) ]
    qcheck "$img"
    qio "$img" -c 'read -P 0x33 50G 512' -c 'read -P 0x11 0 64k'
}

@test "(y) block status over a badly fragmented range stops at 128K extents, and the client carries on from there" {
    # 1 GiB, extended L2, every cluster with alternating data and zero
    # subclusters: 512K extents of 2 KiB.  nbdkit keeps at most 1M per
    # reply and drops the rest, so walking further only costs time.
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 -o extended_l2=on "$img" 1G
    qio "$img" -c 'write -P 7 0 64k' -c 'write -P 7 256M 64k' \
        -c 'write -P 7 512M 64k' -c 'write -P 7 768M 64k'
    /usr/bin/python3 - "$img" <<'PY'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(40); l1off = struct.unpack(">Q", f.read(8))[0]
    f.seek(l1off); l1 = struct.unpack(">4Q", f.read(32))
    f.seek(l1[0] & 0x00fffffffffffe00)
    host = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    # Every entry shares one host cluster: read-only use only.
    ent = struct.pack(">QQ", host | (1 << 63), (0xaaaaaaaa << 32) | 0x55555555)
    for e in l1:
        f.seek(e & 0x00fffffffffffe00); f.write(ent * 4096)
PY
    start_nbdkit "$PLUGIN" -r file="$img"
    PATH=/usr/bin:$PATH nbdsh --base-allocation -u "$uri" -c '
got = []
def cb(meta, off, ents, err):
    got.append(ents)
    return 0
h.block_status(1 << 30, 0, cb)
e = got[-1]
n = len(e) // 2
assert 1 <= n <= 128 * 1024, n
assert all(e[i] == 2048 for i in range(0, len(e), 2)), "extent lengths"
assert [e[i] for i in range(1, 8, 2)] == [0, 3, 0, 3], e[:8]
end = sum(e[0::2])
assert end < (1 << 30), end
h.block_status(4096, end, cb)
assert got[-1][0] == 2048 and got[-1][1] == (0 if (end // 2048) % 2 == 0 else 3), got[-1][:4]'
}

@test "(z) refcount_bits=1: the refcount table grows around the cluster being counted and around leaked clusters past the end of the file" {
    # 512-byte clusters: the one-cluster refcount table covers 128 MiB of
    # file.  QEMU fills the file to 8 clusters short of that; our next
    # writes must grow the table.  Growth used to place it over the
    # cluster being allocated, or over leaked refcounts past the end of
    # the file (what a crash with allocations in flight leaves), and
    # count them twice: 1-bit refcounts overflowed and every allocating
    # write failed with EIO.
    local base="$BATS_TEST_TMPDIR/base.qcow2" leaks
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=1 "$base" 256M
    qio "$base" -c 'write -P 1 0 124M' -c 'write -P 2 124M 1980k'
    for leaks in 0 8; do
        cp "$base" "$img"
        /usr/bin/python3 - "$img" "$leaks" <<'PY'
import os, struct, sys
p, n = sys.argv[1], int(sys.argv[2])
first = os.path.getsize(p) // 512
with open(p, "r+b") as f:
    f.seek(48); rto = struct.unpack(">Q", f.read(8))[0]
    for c in range(first, first + n):     # refcount 1, no data
        f.seek(rto + (c // 4096) * 8)
        blk = struct.unpack(">Q", f.read(8))[0] & ~0x1ff
        f.seek(blk + (c % 4096) // 8); b = f.read(1)[0]
        f.seek(blk + (c % 4096) // 8); f.write(bytes([b | (1 << (c % 8))]))
PY
        start_nbdkit "$PLUGIN" file="$img"
        PATH=/usr/bin:$PATH nbdsh -u "$uri" -c '
h.pwrite(b"\x07" * 4096, 200 << 20)
h.pwrite(b"\x08" * 4096, 210 << 20)
h.flush()'
        stop_nbdkit
        run qemu-img check "$img"
        [[ "$output" == *"$leaks leaked clusters were found"* || ( $leaks = 0 && "$output" == *"No errors were found"* ) ]] ||
            { echo "$output" | head >&3; false; }
        [[ "$output" != *ERROR* ]]
        qio "$img" -c 'read -P 7 200M 4k' -c 'read -P 8 210M 4k' -c 'read -P 2 124M 1980k' \
            -c 'read -P 1 123M 1M'
    done
}

@test "(za) trimming and rewriting without a flush keeps disk use bounded: freed clusters are released early" {
    # Frees wait for a flush (an L2 entry must be gone from the disk
    # before its cluster is reused); without one, 300 trim+rewrite
    # rounds of the same 1 MiB grew the file to 300 MiB.
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 "$img" 64M
    start_nbdkit "$PLUGIN" file="$img"
    PATH=/usr/bin:$PATH nbdsh -u "$uri" -c '
import os
for i in range(300):
    h.trim(1 << 20, 0)
    h.pwrite(bytes([i % 256]) * (1 << 20), 0)
st = os.stat("'"$img"'")
print("# before flush: file %d MiB, allocated %d MiB" % (st.st_size >> 20, st.st_blocks >> 11))
assert st.st_size < (160 << 20), st.st_size
assert h.pread(1 << 20, 0) == bytes([299 % 256]) * (1 << 20)
h.flush()' >&3
    stop_nbdkit
    qcheck "$img"
    qio "$img" -c "read -P $((299 % 256)) 0 1M"
}

@test "(zb) a huge zero that has to write (v2 over a backing file) lets other connections in between slices" {
    # v2 has no zero flag: over a backing file the zeros are written.  The
    # request used to hold the image lock exclusively from start to end,
    # so a read on another connection waited for all of it.
    local base="$BATS_TEST_TMPDIR/base.qcow2"
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 -o compat=0.10 "$base" 4G
    qemu-img create -q -f qcow2 -o compat=0.10 -b "$base" -F qcow2 "$img"
    Q2_QUIET=1 start_nbdkit "$PLUGIN" file="$img"
    PATH=/usr/bin:$PATH nbdsh -u "$uri" -c '
h2 = nbd.NBD()
h2.connect_uri(h.get_uri())
c = h.aio_zero(2 << 30, 0, flags=nbd.CMD_FLAG_NO_HOLE)
n = 0
while not h.aio_command_completed(c):
    h2.pread(4096, 3 << 30)
    n += 1
    h.poll(0)
print("# reads on another connection during the zero:", n)
assert n >= 3, n
assert h.pread(4096, 1 << 30) == bytes(4096)
h2.shutdown()' >&3
    stop_nbdkit
    qcheck "$img"
}

# poke_be64 FILE OFFSET VALUE: writes VALUE big-endian at OFFSET.
poke_be64 ()
{
    /usr/bin/python3 -c '
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2])); f.write(struct.pack(">Q", int(sys.argv[3], 0)))
' "$@"
}

@test "(zc) a bad refcount table entry or L1 entry met by a write, zero or trim marks the image corrupt (iotest 060)" {
    img="$BATS_TEST_TMPDIR/t.qcow2"
    # Default layout: header, L1 table at 192K, refcount table at 64K.
    for c in reftable-unaligned reftable-zero-offset trim-unaligned-refblock \
             zero-l1-self trim-l1-self; do
        qemu-img create -q -f qcow2 "$img" 1G
        op="h.pwrite(b'a' * 65536, 0)"
        case $c in
        reftable-unaligned)      poke_be64 "$img" 65536 0x22a00 ;;
        reftable-zero-offset)    poke_be64 "$img" 48 0 ;;
        trim-unaligned-refblock)
            qio "$img" -c 'write 0 128k'
            poke_be64 "$img" 65536 0x2a00
            # The free waits for the flush; the flush meets the entry.
            op="h.trim(65536, 0); h.flush()" ;;
        zero-l1-self|trim-l1-self)
            qio "$img" -c 'write 600M 64k'
            poke_be64 "$img" 196608 0x8000000000030000
            if [ $c = zero-l1-self ]; then op="h.zero(65536, 65536)"
            else op="h.trim(65536, 65536)"; fi ;;
        esac
        try_refused "$img" "" "$op"
        [[ "$output" =~ "refused 5" ]] || { echo "$c: $output" >&3; false; }
        qemu-img info "$img" | grep -q 'corrupt: true' ||
            { echo "$c: not marked corrupt" >&3; false; }
    done
}

# corrupt_bit IMG: prints 1 if the corrupt bit is set, else 0.
corrupt_bit ()
{
    echo $(( $(od -An -tu1 -j79 -N1 "$1") >> 1 & 1 ))
}

@test "(zd) masses of refcounts past the end of the file (iotest 220): allocation goes after them, as in QEMU, and the image stays clean; a damaged table claiming far more is refused at once" {
    # 64K clusters, 1-bit refcounts, refcount block 0 all ones: every
    # cluster of the first 32 GiB is "in use", nearly all past the end.
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=64k,refcount_bits=1 "$img" 1G
    rt=$(od -An -tu8 --endian=big -j48 -N8 "$img" | tr -d ' ')
    rb=$(od -An -tu8 --endian=big -j"$rt" -N8 "$img" | tr -d ' ')
    qemu-io -f raw -c "write -q -P 0xff $rb 64k" "$img"
    qemu-img check "$img" >/dev/null
    run -0 nbdkit -U - "$PLUGIN" file="$img" \
        --run 'qemu-io -f raw -c "write -P 5 0 64k" -c flush "$uri"'
    [[ "$output" = *"wrote 65536/65536"* ]] || { echo "$output"; return 1; }
    [ "$(corrupt_bit "$img")" = 0 ]
    run -0 qemu-img map --output=json "$img"
    [[ "$output" = *'"offset": 34359'* ]] || { echo "$output"; return 1; }
    run -0 qemu-io -r -c 'read -P 5 0 64k' "$img"
    [[ "$output" != *"verification failed"* ]] || { echo "$output"; return 1; }

    # But a table whose 8192 entries all name one block of 64-bit
    # refcounts full of ones claims 64M clusters: damaged, refused at
    # once, not scanned for minutes.
    qemu-img create -q -f qcow2 -o cluster_size=64k,refcount_bits=64 "$img" 1G
    /usr/bin/python3 -c '
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(262144); f.write(b"\xff" * 65536)
    f.seek(65536); f.write(struct.pack(">Q", 262144) * 8192)' "$img"
    run timeout_nbdkit 20 -U - "$PLUGIN" file="$img" \
        --run 'qemu-io -f raw -c "write -P 5 0 64k" "$uri"'
    [[ "$output" = *"clusters past the end of the file"*"Input/output error"* ]] ||
        { echo "$output"; return 1; }
    [ "$(corrupt_bit "$img")" = 1 ]

    # iotest 220 itself (512 TiB claimed by 16 refcount blocks of 2 MiB
    # clusters) where the file system takes a 513 TiB sparse file.
    big=/dev/shm/qcow2-zd.$$
    truncate --size=513T "$big" 2>/dev/null || skip "no file system here takes a 513 TiB sparse file"
    rm -f "$big"
    qemu-img create -q -f qcow2 -o cluster_size=2M,refcount_bits=1 "$big" 513T
    truncate --size=38m "$big"
    qemu-io -f raw -c "write -q -P 0xff 4m 2m" "$big"
    for i in $(seq 1 15); do
        offs=$((0x600000 + i * 0x200000))
        poke_be64 "$big" $((0x200000 + i * 8)) $offs
        qemu-io -f raw -c "write -q -P 0xff $offs 2m" "$big"
    done
    run -0 timeout_nbdkit 60 -U - "$PLUGIN" file="$big" \
        --run 'qemu-io -f raw -c "write -P 5 0 2m" -c flush "$uri"'
    [[ "$output" = *"wrote 2097152/2097152"* ]] || { rm -f "$big"; echo "$output"; return 1; }
    [ "$(corrupt_bit "$big")" = 0 ] || { rm -f "$big"; return 1; }
    run -0 qemu-io -r -c 'read -P 5 0 2m' "$big"
    rm -f "$big"
    [[ "$output" != *"verification failed"* ]] || { echo "$output"; return 1; }
}
