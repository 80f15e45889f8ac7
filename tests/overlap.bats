#!/usr/bin/env bats
# Metadata protection.  When refcounts lie (a metadata cluster counted as
# free), an allocation can be handed a cluster that still holds tables.
# The write must then be refused with EIO and the corrupt bit set, as
# QEMU does, and nothing that already holds metadata or a snapshot may
# be overwritten, freed or punched.  Also: header fields QEMU refuses.

bats_require_minimum_version 1.5.0
load helpers

if [ "${SANITIZE:-}" = 1 ]; then
    TOOL="$BATS_TEST_DIRNAME/../build-san/qcow2-tool"
else
    TOOL="${QCOW2_TOOL:-$BATS_TEST_DIRNAME/../tools/qcow2-tool}"
fi

setup () { cd "$BATS_TEST_TMPDIR"; }
teardown () { stop_nbdkit; }

# hdr IMG FIELD: prints a header field of the image (python expression
# over the unpacked header h and the file bytes d).
py_img ()
{
    /usr/bin/python3 - "$@" <<'EOF'
import struct, sys
fn, what = sys.argv[1], sys.argv[2]
d = bytearray(open(fn, "rb").read())
q = lambda o: struct.unpack(">Q", d[o:o + 8])[0]
cb = struct.unpack(">I", d[20:24])[0]
cs = 1 << cb
rt = q(48)
def set_refcount(off, v):
    c = off >> cb
    per = cs * 8 // (1 << struct.unpack(">I", d[96:100])[0])
    rb = q(rt + 8 * (c // per))
    assert rb, "no refcount block"
    struct.pack_into(">H", d, rb + 2 * (c % per), v)   # 16-bit refcounts
if what == "l1":
    print(q(40))
elif what == "l2":
    print(q(q(40)) & 0x00fffffffffffe00)
elif what == "reftable":
    print(rt)
elif what == "refblock":
    print(q(rt))
elif what == "snaptable":
    print(q(64))
elif what == "snapl1":
    print(q(q(64)))
elif what.startswith("rc0="):
    set_refcount(int(what[4:]), 0)
    open(fn, "wb").write(d)
else:
    raise SystemExit("unknown " + what)
EOF
}

# write_reads_back_leaks_only IMG [QEMU-IO-ARGS...]: a 4k write at 1M
# through the plugin works and reads back in QEMU (with what the extra
# qemu-io arguments verify too); qemu-img check finds leaks at most.
write_reads_back_leaks_only ()
{
    local img="$1"; shift
    run -0 nbdkit -U - "$PLUGIN" file="$img" \
        --run 'qemu-io -f raw "$uri" -c "write -P 0x22 1M 4k" -c flush'
    [[ "$output" = *"wrote 4096/4096"* ]] || { echo "$output"; return 1; }
    run -0 qemu-io -r -U "$@" -c 'read -P 0x22 1M 4k' "$img"
    [[ "$output" != *"verification failed"* ]] || { echo "$output"; return 1; }
    run qemu-img check "$img"
    [ "$status" = 0 ] || [ "$status" = 3 ] || { echo "$output"; return 1; }
    [[ "$output" != *ERROR* ]]
}

is_corrupt ()
{
    qemu-img info -U --output=json "$1" |
        /usr/bin/python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["format-specific"]["data"].get("corrupt") else 1)'
}

@test "refcount 0 on a metadata cluster: the write is refused, marked corrupt, nothing overwritten or punched" {
    for what in header l1 l2 reftable refblock; do
        img="$BATS_TEST_TMPDIR/$what.qcow2"
        qemu-img create -q -f qcow2 "$img" 16M
        qemu-io -c 'write -P 0x11 0 128k' "$img" >/dev/null
        if [ $what = header ]; then off=0; else off="$(py_img "$img" $what)"; fi
        py_img "$img" "rc0=$off"
        cp "$img" before.qcow2

        run nbdkit -U - "$PLUGIN" file="$img" \
            --run 'qemu-io -f raw "$uri" -c "write -P 0xab 1M 4k"'
        [[ "$output" = *"write failed: Input/output error"* ]] ||
            { echo "$what: $output"; return 1; }
        [[ "$output" = *"marked corrupt"* ]] || { echo "$what: $output"; return 1; }
        is_corrupt "$img" || { echo "$what: corrupt bit not set"; return 1; }
        # The cluster the write was refused is still what it was (the
        # header but for the corrupt bit; a refcount block but for its
        # own refcount, which the refused allocation set).
        case $what in
            header|refblock) ;;
            *) cmp -i $off:$off -n 65536 before.qcow2 "$img" ||
                   { echo "$what: cluster at $off changed"; return 1; } ;;
        esac
        # The allocation leaked the cluster, which gave it back its count.
        run qemu-img check "$img"
        [[ "$output" != *ERROR* ]] || { echo "$what: $output"; return 1; }
        # The header differs only in the corrupt bit (byte 79).
        [ "$(cmp -l before.qcow2 "$img" | awk '$1 <= 65536' | wc -l)" -le 1 ] ||
            { echo "$what: more than the corrupt bit changed"; cmp -l before.qcow2 "$img" | head; return 1; }
        run -0 qemu-io -r -U -c 'read -P 0x11 0 128k' "$img"
        [[ "$output" != *"Pattern verification failed"* ]] ||
            { echo "$what: guest data lost"; return 1; }
    done
}

@test "refcount 0 on a snapshot's L1 table or the snapshot table's 2nd cluster: refused, snapshots intact" {
    # A snapshot's L1 table.
    img="$BATS_TEST_TMPDIR/s.qcow2"
    qemu-img create -q -f qcow2 "$img" 16M
    qemu-io -c 'write -P 0x11 0 128k' "$img" >/dev/null
    qemu-img snapshot -c s1 "$img"
    qemu-io -c 'write -P 0x22 0 64k' "$img" >/dev/null
    l1="$(py_img "$img" snapl1)"
    py_img "$img" "rc0=$l1"
    cp "$img" before.qcow2
    run nbdkit -U - "$PLUGIN" file="$img" \
        --run 'qemu-io -f raw "$uri" -c "write -P 0xab 4M 64k"'
    [[ "$output" = *"snapshot's L1 table"* ]] || { echo "$output"; return 1; }
    is_corrupt "$img"
    cmp -i "$l1:$l1" -n 65536 before.qcow2 "$img"
    qemu-img convert -U -l snapshot.name=s1 -O raw "$img" s1.raw
    run -0 qemu-io -f raw -c 'read -P 0x11 0 128k' -c 'read -P 0 128k 1M' s1.raw
    [[ "$output" != *"verification failed"* ]] || { echo "$output"; return 1; }

    # 512 B clusters: the snapshot table spans several clusters.
    img="$BATS_TEST_TMPDIR/t.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=512 "$img" 4M
    qemu-io -c 'write -P 0x11 0 4k' "$img" >/dev/null
    for i in $(seq 1 12); do
        qemu-img snapshot -c "snapshot-with-a-long-name-$i" "$img"
    done
    py_img "$img" "rc0=$(( $(py_img "$img" snaptable) + 512 ))"
    for i in $(seq 0 15); do
        echo "write -P 0xab $((2 * 1024 * 1024 + i * 4096)) 512"
    done > cmds
    run nbdkit -U - "$PLUGIN" file="$img" --run "qemu-io -f raw \"\$uri\" < cmds"
    [[ "$output" = *"overlaps the snapshot table"* ]] || { echo "$output"; return 1; }
    is_corrupt "$img"
    run -0 qemu-img snapshot -U -l "$img"
    [ "$(grep -c snapshot-with-a-long-name <<<"$output")" = 12 ]
}

@test "qcow2-tool snapshot -c onto clusters that hold metadata: refused, header intact" {
    for what in header reftable; do
        img="$BATS_TEST_TMPDIR/$what.qcow2"
        qemu-img create -q -f qcow2 "$img" 16M
        qemu-io -c 'write -P 0x11 0 128k' "$img" >/dev/null
        if [ $what = header ]; then off=0; else off="$(py_img "$img" $what)"; fi
        py_img "$img" "rc0=$off"
        run -1 "$TOOL" snapshot -c snap1 "$img"
        [[ "$output" = *"preventing invalid write of snapshot L1 table"* ]] ||
            { echo "$what: $output"; return 1; }
        run -0 qemu-img info -U "$img"
        [[ "$output" = *"file format: qcow2"* ]]
        [[ "$output" = *"corrupt: true"* ]]
        run -0 qemu-img snapshot -U -l "$img"
        [[ "$output" != *snap1* ]]
        run -0 qemu-io -r -U -c 'read -P 0x11 0 128k' "$img"
        [[ "$output" != *"verification failed"* ]] || { echo "$output"; return 1; }
    done
}

@test "a snapshot count one past the table: refused at open, no read past the buffer" {
    img="$BATS_TEST_TMPDIR/s.qcow2"
    qemu-img create -q -f qcow2 "$img" 16M
    qemu-img snapshot -c s1 "$img"
    qemu-img snapshot -c s2 "$img"
    # qemu-img leaves the last entry unpadded at the end of the file.
    /usr/bin/python3 -c '
import struct, sys
f = open(sys.argv[1], "r+b"); f.seek(60); n = struct.unpack(">I", f.read(4))[0]
f.seek(60); f.write(struct.pack(">I", n + 1))' "$img"
    run -1 timeout_nbdkit 20 -U - "$PLUGIN" file="$img" --run true
    [[ "$output" = *"snapshot 2: entry runs past the end of the snapshot table"* ]]
    [[ "$output" != *AddressSanitizer* ]]
    run -1 "$TOOL" info "$img"
    [[ "$output" = *"snapshot 2: entry runs past the end"* ]]
    [[ "$output" != *AddressSanitizer* ]]
}

@test "an external data file that is the image itself: served read-only, header intact" {
    img="$BATS_TEST_TMPDIR/self.qcow2"
    qemu-img create -q -f qcow2 -o data_file="$BATS_TEST_TMPDIR/data.raw" \
        "$img" 16M
    # Point the data file name at the image (same length: self.qcow2 and
    # data.raw differ, so rewrite the extension with a same-length link).
    ln -s self.qcow2 "$BATS_TEST_TMPDIR/dat2.raw"
    /usr/bin/python3 -c '
import sys
d = bytearray(open(sys.argv[1], "rb").read())
i = d.index(sys.argv[2].encode())
d[i:i + len(sys.argv[3])] = sys.argv[3].encode()
open(sys.argv[1], "wb").write(d)' "$img" "$BATS_TEST_TMPDIR/data.raw" \
        "$BATS_TEST_TMPDIR/dat2.raw"
    cp "$img" before.qcow2
    run nbdkit -U - "$PLUGIN" file="$img" \
        --run 'nbdinfo --json "$uri"; qemu-io -f raw "$uri" -c "write -P 0xab 0 4k"'
    [[ "$output" = *'"is_read_only": true'* ]] || { echo "$output"; return 1; }
    cmp before.qcow2 "$img"
    run -0 nbdkit -v -U - "$PLUGIN" file="$img" --run 'nbdinfo "$uri"'
    [[ "$output" = *"is the image itself"* ]] || { echo "$output"; return 1; }
}

@test "a bitmap directory pointing at an L2 table: writes work, nothing live is freed" {
    img="$BATS_TEST_TMPDIR/b.qcow2"
    qemu-img create -q -f qcow2 "$img" 16M
    qemu-io -c 'write -P 0x11 0 64k' "$img" >/dev/null
    qemu-img bitmap --add "$img" b0
    l2="$(py_img "$img" l2)"
    /usr/bin/python3 -c '
import struct, sys
d = bytearray(open(sys.argv[1], "rb").read())
i = d.index(struct.pack(">I", 0x23852875))          # bitmaps extension
struct.pack_into(">Q", d, i + 8 + 16, int(sys.argv[2]))   # directory offset
open(sys.argv[1], "wb").write(d)' "$img" "$l2"
    # The bitmaps' clusters are leaked, never freed: no errors.
    write_reads_back_leaks_only "$img" -c 'read -P 0x11 0 64k'
}

@test "a bitmap directory entry that overruns the directory: check reports it, a write drops the bitmaps, no crash" {
    img="$BATS_TEST_TMPDIR/b.qcow2"
    qemu-img create -q -f qcow2 "$img" 16M
    qemu-img bitmap --add "$img" b0
    qemu-img bitmap --add "$img" b1
    # Entry 0 claims 2 GiB of extra data: the walk must not step past
    # the directory to entry 1.
    /usr/bin/python3 -c '
import struct, sys
d = bytearray(open(sys.argv[1], "rb").read())
i = d.index(struct.pack(">I", 0x23852875))          # bitmaps extension
off = struct.unpack(">Q", d[i + 24:i + 32])[0]      # directory offset
struct.pack_into(">I", d, off + 20, 0x7ffffff0)     # extra_data_size
open(sys.argv[1], "wb").write(d)' "$img"
    run -2 "$TOOL" check "$img"
    [[ "$output" = *"bitmap directory entry 0 "*"overruns the directory"* ]] ||
        { echo "$output"; return 1; }
    run -1 "$TOOL" info "$img"
    [[ "$output" = *"overruns the directory"* ]] || { echo "$output"; return 1; }
    # The bitmaps were dropped: QEMU opens the image again; their
    # clusters are leaked, never freed.
    write_reads_back_leaks_only "$img"
}

@test "header fields QEMU refuses: a LUKS extension without LUKS, raw data file without a data file" {
    img="$BATS_TEST_TMPDIR/l.qcow2"
    qemu_img_create -q -f qcow2 --object secret,id=s,data=pw \
        -o encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10 \
        "$img" 16M
    /usr/bin/python3 -c '
import struct, sys
f = open(sys.argv[1], "r+b"); f.seek(32); f.write(struct.pack(">I", 0))' "$img"
    run -1 timeout_nbdkit 20 -U - "$PLUGIN" file="$img" --run true
    [[ "$output" = *"full disk encryption extension but crypt_method is 0"* ]]

    img="$BATS_TEST_TMPDIR/r.qcow2"
    qemu-img create -q -f qcow2 "$img" 16M
    /usr/bin/python3 -c '
import struct, sys
f = open(sys.argv[1], "r+b"); f.seek(88); f.write(struct.pack(">Q", 2))' "$img"
    run -1 timeout_nbdkit 20 -U - "$PLUGIN" file="$img" --run true
    [[ "$output" = *"autoclear bit 1 (raw external data file)"* ]]
}
