#!/usr/bin/env bats
# qcow2-tool: create (every option, checked by QEMU), info, check and
# repair of damaged images, map and snapshots, each compared with
# qemu-img.

bats_require_minimum_version 1.5.0
load helpers

if [ "${SANITIZE:-}" = 1 ]; then
    TOOL="${QCOW2_TOOL:-$BATS_TEST_DIRNAME/../build-san/qcow2-tool}"
else
    TOOL="${QCOW2_TOOL:-$BATS_TEST_DIRNAME/../tools/qcow2-tool}"
fi
M=$((1024 * 1024))

setup ()
{
    cd "$BATS_TEST_TMPDIR"
}

teardown ()
{
    stop_nbdkit
    [ ! -s "$BATS_TEST_TMPDIR/loop" ] || losetup -d "$(cat "$BATS_TEST_TMPDIR/loop")"
}

# qjson FILE EXPR...: evaluates python expressions on the parsed JSON
# file (as j); prints each result.
qjson ()
{
    /usr/bin/python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))
for e in sys.argv[2:]:
    print(eval(e))' "$@"
}

# check_created IMG COMPAT CLUSTER RB EXTL2 CTYPE LAZY SIZE: QEMU agrees
# with every option, the image is clean, and reads and writes in QEMU.
check_created ()
{
    local img="$1" compat="$2" cs="$3" rb="$4" el2="$5" ct="$6" lazy="$7"
    local size="$8" want got

    qemu-img check -q "$img" ||
        { echo "qemu-img check failed on a new image ($img)"; return 1; }
    qemu-img info --output=json "$img" > info.json
    "$TOOL" info --json "$img" > tinfo.json
    if [ "$compat" = 1.1 ]; then
        [ "$el2" = on ] && el2=true || el2=false
        [ "$lazy" = on ] && lazy=true || lazy=false
        want="1.1 $cs $rb $el2 $ct $lazy $size"
        got="$(qjson info.json \
            "j['format-specific']['data']['compat']" "j['cluster-size']" \
            "j['format-specific']['data']['refcount-bits']" \
            "str(j['format-specific']['data']['extended-l2']).lower()" \
            "j['format-specific']['data']['compression-type']" \
            "str(j['format-specific']['data']['lazy-refcounts']).lower()" \
            "j['virtual-size']" | tr '\n' ' ')"
    else
        want="0.10 $cs $rb $size"
        got="$(qjson info.json \
            "j['format-specific']['data']['compat']" "j['cluster-size']" \
            "j['format-specific']['data']['refcount-bits']" \
            "j['virtual-size']" | tr '\n' ' ')"
    fi
    [ "$got" = "$want " ] ||
        { echo "qemu-img info: got '$got', want '$want '"; return 1; }
    # Our own info says the same as qemu-img info.
    qjson info.json "{k: v for k, v in j.items() if k != 'actual-size'}" > a
    qjson tinfo.json "{k: v for k, v in j.items() if k != 'actual-size'}" > b
    diff a b || { echo "info --json differs from qemu-img info"; return 1; }

    qemu-io -f qcow2 -c "write -P 0x33 0 1M" -c "read -P 0x33 0 1M" \
        -c "write -P 0x44 $((size - 4096)) 4096" \
        -c "read -P 0x44 $((size - 4096)) 4096" "$img" > qio.log ||
        { cat qio.log; return 1; }
    grep -q -i "fail\|error" qio.log && { cat qio.log; return 1; }
    qemu-img check -q "$img" ||
        { echo "qemu-img check failed after QEMU wrote ($img)"; return 1; }
    "$TOOL" check -q "$img" ||
        { echo "qcow2-tool check failed after QEMU wrote ($img)"; return 1; }
}

valid_combo ()
{
    local compat="$1" cs="$2" rb="$3" el2="$4" ct="$5" lazy="$6"
    if [ "$compat" = 0.10 ]; then
        [ "$rb" = 16 ] && [ "$el2" = off ] && [ "$ct" = zlib ] &&
            [ "$lazy" = off ] || return 1
    fi
    if [ "$el2" = on ] && [ "$cs" -lt 16384 ]; then
        return 1
    fi
    return 0
}

@test "tool: --help for the tool and each command; the man page" {
    run "$TOOL" --help
    [ "$status" -eq 0 ]
    [[ "$output" == *create* ]]
    for c in create info check map snapshot; do
        run "$TOOL" "$c" --help
        [ "$status" -eq 0 ]
        [[ "$output" == *"Usage: qcow2-tool $c"* ]]
    done
    run "$TOOL" nosuchcommand
    [ "$status" -eq 1 ]
    podchecker "$BATS_TEST_DIRNAME/../tools/qcow2-tool.pod"
}

@test "tool create: every option combination is clean and correct in QEMU" {
    local n=0 compat cs rb el2 ct lazy pa
    local prealloc=(off metadata falloc full)
    for compat in 0.10 1.1; do
    for cs in 512 65536 2097152; do
    for rb in 1 16 64; do
    for el2 in off on; do
    for ct in zlib zstd; do
    for lazy in off on; do
        valid_combo $compat $cs $rb $el2 $ct $lazy || continue
        # Sample the preallocation modes, rotating through them.
        pa="${prealloc[$((n % 4))]}"
        n=$((n + 1))
        rm -f img.qcow2
        "$TOOL" create -q -o "compat=$compat,cluster_size=$cs,refcount_bits=$rb,extended_l2=$el2,compression_type=$ct,lazy_refcounts=$lazy,preallocation=$pa" \
            img.qcow2 6M ||
            { echo "create failed: $compat $cs $rb $el2 $ct $lazy $pa"; return 1; }
        check_created img.qcow2 $compat $cs $rb $el2 $ct $lazy $((6 * M)) ||
            { echo "combination: $compat $cs $rb $el2 $ct $lazy $pa"; return 1; }
    done; done; done; done; done; done
    echo "$n combinations" >&3
    [ "$n" -ge 60 ]
}

@test "tool create: every preallocation mode with both compat levels" {
    local compat cs pa el2
    for compat in 0.10 1.1; do
    for cs in 512 65536 2097152; do
    for pa in off metadata falloc full; do
        for el2 in off on; do
            valid_combo $compat $cs 16 $el2 zlib off || continue
            rm -f img.qcow2
            "$TOOL" create -q -o "compat=$compat,cluster_size=$cs,preallocation=$pa,extended_l2=$el2" \
                img.qcow2 5M
            check_created img.qcow2 $compat $cs 16 $el2 zlib off $((5 * M)) ||
                { echo "combination: $compat $cs $pa el2=$el2"; return 1; }
            if [ "$pa" != off ]; then
                # Every data cluster is allocated: the file covers them.
                [ "$(stat -c %s img.qcow2)" -ge $((5 * M)) ]
            fi
        done
    done; done; done
}

@test "tool create: a fresh image is byte-identical to qemu-img's" {
    for o in compat=1.1 compat=0.10 cluster_size=512 \
             cluster_size=2M,refcount_bits=1 \
             refcount_bits=64,extended_l2=on,compression_type=zstd,lazy_refcounts=on \
             preallocation=metadata; do
        rm -f a.qcow2 b.qcow2
        "$TOOL" create -q -o "$o" a.qcow2 100M
        qemu-img create -q -f qcow2 -o "$o" b.qcow2 100M
        cmp a.qcow2 b.qcow2 || { echo "differs with -o $o"; return 1; }
    done
}

@test "tool create: sizes with suffixes, rounded up to 512" {
    "$TOOL" create -q a.qcow2 1000
    [ "$(qemu-img info --output=json a.qcow2 | qjson /dev/stdin "j['virtual-size']")" = 1024 ]
    "$TOOL" create -q b.qcow2 1.5G
    [ "$(qemu-img info --output=json b.qcow2 | qjson /dev/stdin "j['virtual-size']")" = $((1536 * M)) ]
    "$TOOL" create -q c.qcow2 2T
    qemu-img check -q c.qcow2
    "$TOOL" create -q d.qcow2 0
    qemu-img check -q d.qcow2
    run "$TOOL" create -q e.qcow2 12Q
    [ "$status" -eq 1 ]
    # Accepted and refused as qemu-img parses sizes.
    local sz q t
    for sz in 5KB 1.0000001 0x100 " 5" 1.5 1.5k 1.0001k 0x1k 1e3 5b 5K \
              5kk 0x10M 0.5 .5k 5. 5.k 1.5e3k 0x1.5k 1.9999999999k +5 0x \
              0.50048828125K 1.00048828125K 15.99999999999999999999E; do
        rm -f q.qcow2 t.qcow2
        q="$(qemu-img create -q -f qcow2 q.qcow2 "$sz" 2>/dev/null &&
             qemu-img info --output=json q.qcow2 | qjson /dev/stdin "j['virtual-size']")" || q=refused
        t="$("$TOOL" create -q t.qcow2 "$sz" 2>/dev/null &&
             qemu-img info --output=json t.qcow2 | qjson /dev/stdin "j['virtual-size']")" || t=refused
        [ "$q" = "$t" ] || { echo "size '$sz': qemu-img $q, ours $t"; return 1; }
    done
}

@test "tool create: invalid combinations are refused like qemu-img" {
    local o
    for o in compat=0.10,refcount_bits=8 compat=0.10,lazy_refcounts=on \
             compat=0.10,extended_l2=on compat=0.10,compression_type=zstd \
             cluster_size=8k,extended_l2=on cluster_size=1000 \
             cluster_size=4M cluster_size=256 refcount_bits=3 \
             refcount_bits=128 compat=0.11 preallocation=sparse \
             extended_l2=maybe nosuchoption=1; do
        run -1 "$TOOL" create -q -o "$o" bad.qcow2 1M
        run ! qemu-img create -q -f qcow2 -o "$o" bad2.qcow2 1M
    done
    qemu-img create -q -f qcow2 base.qcow2 1M
    run -1 "$TOOL" create -q -o preallocation=metadata -b base.qcow2 -F qcow2 bad.qcow2 1M
    [[ "$output" == *extended_l2* ]]
    run -1 "$TOOL" create -q -F qcow2 bad.qcow2 1M
    run -1 "$TOOL" create -q bad.qcow2
}

@test "tool create: backing file, format, relative names and the chain" {
    mkdir -p d/sub
    qemu-img create -q -f raw d/base.raw 3M
    qemu-io -f raw -c "write -P 0x61 0 1M" d/base.raw > /dev/null
    "$TOOL" create -q -b base.raw -F raw d/mid.qcow2
    "$TOOL" create -q -o cluster_size=4096 -b ../mid.qcow2 -F qcow2 d/sub/top.qcow2 4M
    qemu-img check -q d/mid.qcow2
    qemu-img check -q d/sub/top.qcow2

    qemu-img info --output=json d/mid.qcow2 > mid.json
    [ "$(qjson mid.json "j['backing-filename']" "j['backing-filename-format']" "j['virtual-size']" | tr '\n' ' ')" = "base.raw raw $((3 * M)) " ]
    qemu-img info --output=json d/sub/top.qcow2 > top.json
    [ "$(qjson top.json "j['backing-filename']" "j['backing-filename-format']" | tr '\n' ' ')" = "../mid.qcow2 qcow2 " ]

    # Reads through the chain; writes on top do not touch the base.
    qemu-io -c "write -P 0x62 512k 4k" d/sub/top.qcow2 > /dev/null
    run qemu-io -c "read -P 0x61 0 512k" -c "read -P 0x62 512k 4k" \
        -c "read -P 0x61 $((516 * 1024)) $((508 * 1024))" \
        -c "read -P 0 1M 2M" -c "read -P 0 3M 1M" d/sub/top.qcow2
    [ "$status" -eq 0 ]
    [[ "$output" != *fail* ]]
    run qemu-io -f raw -c "read -P 0x61 512k 4k" d/base.raw
    [[ "$output" != *fail* ]]

    # The whole chain in info.
    run "$TOOL" info --backing-chain d/sub/top.qcow2
    [ "$status" -eq 0 ]
    [[ "$output" == *"backing file: ../mid.qcow2 (actual path: d/sub/../mid.qcow2)"* ]]
    [[ "$output" == *"backing file format: qcow2"* ]]
    [[ "$output" == *"image: d/sub/../mid.qcow2"* ]]
    [[ "$output" == *"image: d/sub/../base.raw"* ]]
    diff <(qemu-img info --backing-chain d/sub/top.qcow2 | grep -v '^disk size') \
         <(echo "$output" | grep -v '^disk size')
    qemu-img info --output=json --backing-chain d/sub/top.qcow2 > q.json
    "$TOOL" info --json --backing-chain d/sub/top.qcow2 > t.json
    qjson q.json "[{k: v for k, v in l.items() if k != 'actual-size'} for l in j]" > a
    qjson t.json "[{k: v for k, v in l.items() if k != 'actual-size'} for l in j]" > b
    diff a b

    # A missing backing file is refused, unless -u.
    run -1 "$TOOL" create -q -b nosuch.qcow2 -F qcow2 bad.qcow2 1M
    [ ! -e bad.qcow2 ] || [ ! -s bad.qcow2 ]
    "$TOOL" create -q -u -b nosuch.qcow2 -F qcow2 unsafe.qcow2 1M
    [ "$(qemu-img info -U --output=json unsafe.qcow2 2>/dev/null | qjson /dev/stdin "j['backing-filename']")" = nosuch.qcow2 ] ||
        [ "$(qemu-img info --output=json --force-share unsafe.qcow2 2>/dev/null | qjson /dev/stdin "j['backing-filename']")" = nosuch.qcow2 ] ||
        xxd unsafe.qcow2 | grep -q nosuch

    # Without -F the probed format is recorded.
    "$TOOL" create -q -b d/mid.qcow2 probed.qcow2
    [ "$(qemu-img info --output=json probed.qcow2 | qjson /dev/stdin "j['backing-filename-format']")" = qcow2 ]

    # Extended L2 with preallocation keeps reading from the backing file.
    "$TOOL" create -q -o extended_l2=on,preallocation=metadata -b d/mid.qcow2 -F qcow2 pre.qcow2
    qemu-img check -q pre.qcow2
    run qemu-io -c "read -P 0x61 0 1M" -c "read -P 0 1M 2M" pre.qcow2
    [[ "$output" != *fail* ]]
}

# A chain with data, zeros, compressed clusters and subclusters.
build_map_images ()
{
    qemu-img create -q -f raw r.raw 2M
    qemu-io -f raw -c "write -P 1 0 64k" r.raw > /dev/null
    "$TOOL" create -q -b r.raw -F raw m.qcow2 4M
    "$TOOL" create -q -b m.qcow2 -F qcow2 t.qcow2 4M
    qemu-io -c "write -P 2 128k 64k" -c "write -z 256k 64k" \
        -c "write -c -P 3 384k 64k" m.qcow2 > /dev/null
    qemu-io -c "write -P 4 512k 64k" -c "write -z 640k 64k" \
        -c "write -P 5 700k 200k" t.qcow2 > /dev/null
    "$TOOL" create -q -o extended_l2=on,cluster_size=32k -b m.qcow2 -F qcow2 x.qcow2 4M
    qemu-io -c "write -P 6 1k 3k" -c "write -z 40k 2k" -c "write -P 7 100k 50k" \
        -c "write -z -u 1M 64k" x.qcow2 > /dev/null
    "$TOOL" create -q -o cluster_size=512 s.qcow2 1M
    qemu-io -c "write -P 8 0 3k" -c "write -P 9 8k 1k" -c "write -z 4k 1k" \
        -c "write -P 9 9k 2k" s.qcow2 > /dev/null
}

# map_json IMG CMD...: the map with only the compared keys.
norm_map ()
{
    /usr/bin/python3 -c '
import json, sys
for e in json.load(sys.stdin):
    print(e["start"], e["length"], e["depth"], e["present"], e["zero"],
          e["data"], e.get("offset"))'
}

@test "tool map: --json matches qemu-img map --output=json" {
    build_map_images
    local img
    for img in t.qcow2 m.qcow2 x.qcow2 s.qcow2; do
        qemu-img map --output=json "$img" | norm_map > q.txt
        "$TOOL" map --json "$img" | norm_map > t.txt
        diff q.txt t.txt || { echo "map of $img differs"; return 1; }
    done
}

@test "tool map: the human format matches qemu-img map" {
    build_map_images
    "$TOOL" create -q -o cluster_size=16k -b r.raw -F raw y.qcow2 4M
    qemu-io -c "write -P 4 512k 64k" -c "write -z 640k 64k" \
        -c "write -P 5 700k 200k" y.qcow2 > /dev/null
    local img
    for img in s.qcow2 y.qcow2; do
        qemu-img map "$img" > q.txt
        "$TOOL" map "$img" > t.txt
        diff q.txt t.txt || { echo "map of $img differs"; return 1; }
    done
    # Compressed clusters cannot be shown as offsets.
    run -1 "$TOOL" map t.qcow2
    [[ "$output" == *"compressed clusters"* ]]
}

@test "tool info: text and --json agree with qemu-img info" {
    build_map_images
    local img
    for img in t.qcow2 x.qcow2 s.qcow2; do
        qemu-img info --output=json "$img" > q.json
        "$TOOL" info --json "$img" > t.json
        qjson q.json "{k: v for k, v in j.items() if k != 'actual-size'}" > a
        qjson t.json "{k: v for k, v in j.items() if k != 'actual-size'}" > b
        diff a b || { echo "info of $img differs"; return 1; }
    done
    "$TOOL" create -q -o compat=0.10 v2.qcow2 1G
    qemu-img info --output=json v2.qcow2 > q.json
    "$TOOL" info --json v2.qcow2 > t.json
    qjson q.json "{k: v for k, v in j.items() if k != 'actual-size'}" > a
    qjson t.json "{k: v for k, v in j.items() if k != 'actual-size'}" > b
    diff a b
    run "$TOOL" info x.qcow2
    [ "$status" -eq 0 ]
    [[ "$output" == *"file format: qcow2"* ]]
    [[ "$output" == *"virtual size: 4 MiB (4194304 bytes)"* ]]
    [[ "$output" == *"cluster_size: 32768"* ]]
    [[ "$output" == *"extended l2: true"* ]]
    [[ "$output" == *"compat: 1.1"* ]]
}

# patch IMG OFFSET FORMAT VALUE: writes a big-endian value (a python
# expression) into the file.
patch ()
{
    /usr/bin/python3 -c '
import struct, sys
path, off, fmt, val = sys.argv[1], int(sys.argv[2], 0), sys.argv[3], eval(sys.argv[4])
with open(path, "r+b") as f:
    f.seek(off)
    f.write(struct.pack(">" + fmt, val))' "$@"
}

# read_be IMG OFFSET FORMAT
read_be ()
{
    /usr/bin/python3 -c '
import struct, sys
path, off, fmt = sys.argv[1], int(sys.argv[2], 0), sys.argv[3]
with open(path, "rb") as f:
    f.seek(off)
    print(struct.unpack(">" + fmt, f.read(struct.calcsize(fmt)))[0])' "$@"
}

# A 64k-cluster image: header 0, reftable 1, refblock 2 (16-bit
# entries at 0x20000), L1 3, L2 4, data 5 and 6, cluster 7 free.
make_damage_base ()
{
    "$TOOL" create -q "$1" 4M
    qemu-io -c "write -P 0x55 0 192k" -c "discard 128k 64k" "$1" > /dev/null
    qemu-img check -q "$1"
    [ "$(read_be "$1" $((0x20000 + 2 * 7)) H)" = 0 ]
}

# same_check_status IMG: our check exits like qemu-img check; sets
# $check_status.
same_check_status ()
{
    local q
    run qemu-img check "$1"
    q=$status
    run "$TOOL" check "$1"
    check_status=$status
    echo "qemu-img check: $q, qcow2-tool check: $check_status"
    [ "$q" -eq "$check_status" ]
}

@test "tool check: a clean image, text and --json" {
    make_damage_base a.qcow2
    run "$TOOL" check a.qcow2
    [ "$status" -eq 0 ]
    [[ "$output" == *"No errors were found on the image."* ]]
    [[ "$output" == *"Image end offset: 458752"* ]]
    "$TOOL" check --json a.qcow2 > t.json
    qemu-img check --output=json a.qcow2 > q.json
    [ "$(qjson t.json "j['check-errors']" "j.get('leaks')" "j.get('corruptions')" "j['image-end-offset']" "j['format']" "j['filename']" | tr '\n' ' ')" = "0 None None 458752 qcow2 a.qcow2 " ]
    # The same keys as qemu-img (counters only when not zero).
    [ "$(qjson q.json "sorted(j)")" = "$(qjson t.json "sorted(j)")" ]
    [ "$(qjson q.json "j['image-end-offset']" "j['total-clusters']" "j.get('allocated-clusters')")" = "$(qjson t.json "j['image-end-offset']" "j['total-clusters']" "j.get('allocated-clusters')")" ]
}

@test "tool check and info: compressed clusters count as fragmented; data-file-raw shown, in qemu-img's order" {
    qemu-img create -q -f raw r.raw 4M
    qemu-io -f raw -c 'write -P 0x11 0 1M' -c 'write -P 0x22 2M 1M' r.raw >/dev/null
    qemu-img convert -c -O qcow2 r.raw c.qcow2
    "$TOOL" check --json c.qcow2 > t.json
    qemu-img check --output=json c.qcow2 > q.json
    local keys="j.get('allocated-clusters') j.get('fragmented-clusters') j.get('compressed-clusters')"
    [ "$(qjson q.json $keys)" = "$(qjson t.json $keys)" ] ||
        { cat q.json t.json; return 1; }
    [ "$(qjson t.json "j['fragmented-clusters']")" -gt 0 ]
    local raw
    for raw in on off; do
        rm -f d.qcow2 d.raw
        qemu-img create -q -f qcow2 -o data_file=d.raw,data_file_raw=$raw d.qcow2 1M
        qemu-img info --output=json d.qcow2 > q.json
        "$TOOL" info --json d.qcow2 > t.json
        qjson q.json "{k: v for k, v in j.items() if k != 'actual-size'}" > a
        qjson t.json "{k: v for k, v in j.items() if k != 'actual-size'}" > b
        diff a b || return 1
        # The text too, line by line.
        diff <(qemu-img info d.qcow2 | grep -v '^disk size') \
             <("$TOOL" info d.qcow2 | grep -v '^disk size')
    done
}

@test "tool check: a leaked cluster, then -r leaks" {
    make_damage_base a.qcow2
    # The free cluster 7 gets refcount 1.
    patch a.qcow2 $((0x20000 + 2 * 7)) H 1
    run -3 qemu-img check a.qcow2
    run -3 "$TOOL" check a.qcow2
    [[ "$output" == *"Leaked cluster 7 refcount=1 reference=0"* ]]
    [[ "$output" == *"1 leaked clusters were found on the image."* ]]
    [[ "$output" == *"This means waste of disk space, but no harm to data."* ]]
    "$TOOL" check --json a.qcow2 > t.json || true
    [ "$(qjson t.json "j['leaks']" "j.get('corruptions')")" = "$(printf '1\nNone')" ]
    run -0 "$TOOL" check -r leaks a.qcow2
    [[ "$output" == *"Repairing cluster 7 refcount=1 reference=0"* ]]
    [[ "$output" == *"The following inconsistencies were found and repaired:"* ]]
    [[ "$output" == *"No errors were found on the image."* ]]
    qemu-img check a.qcow2
    [ "$(read_be a.qcow2 $((0x20000 + 2 * 7)) H)" = 0 ]

    # An L2 table with one reference too many is a leak and a COPIED
    # error (a corruption) for both tools; fixing the leak fixes both.
    patch a.qcow2 $((0x20000 + 2 * 4)) H 2
    same_check_status a.qcow2
    [ "$check_status" = 2 ]
    cp a.qcow2 b.qcow2
    run -0 "$TOOL" check -r leaks a.qcow2
    qemu-img check a.qcow2
    run -0 "$TOOL" check -r all b.qcow2
    qemu-img check b.qcow2
}

@test "tool check: a data cluster leaked with refcount_bits=1 and 64" {
    local rb
    for rb in 1 64; do
        rm -f a.qcow2
        "$TOOL" create -q -o refcount_bits=$rb a.qcow2 4M
        qemu-io -c "write -P 0x55 0 64k" -c "write -P 0x55 1M 64k" \
            -c "discard 1M 64k" a.qcow2 > /dev/null
        # A refcount for the first free cluster past the data.
        if [ $rb = 1 ]; then
            patch a.qcow2 $((0x20000)) B 0xff
        else
            patch a.qcow2 $((0x20000 + 8 * 6)) Q 1
        fi
        same_check_status a.qcow2
        [ "$check_status" = 3 ]
        "$TOOL" check -r leaks a.qcow2
        qemu-img check a.qcow2
    done
}

@test "tool check: a used cluster with refcount 0 is a corruption; -r all" {
    make_damage_base a.qcow2
    # The data cluster 5: refcount 1 -> 0.
    patch a.qcow2 $((0x20000 + 2 * 5)) H 0
    run -2 qemu-img check a.qcow2
    run -2 "$TOOL" check a.qcow2
    [[ "$output" == *"ERROR cluster 5 refcount=0 reference=1"* ]]
    [[ "$output" == *"ERROR OFLAG_COPIED data cluster"* ]]
    [[ "$output" == *"errors were found on the image."* ]]
    # -r leaks cannot fix it: like qemu-img, it gives up (exit 1).
    cp a.qcow2 q.qcow2
    run -1 qemu-img check -r leaks q.qcow2
    run -1 "$TOOL" check -r leaks a.qcow2
    [[ "$output" == *"ERROR need to rebuild refcount structures"* ]]
    [[ "$output" == *"Check failed: Input/output error"* ]]
    [[ "$output" != *"errors were found"* ]]
    run -0 "$TOOL" check -r all a.qcow2
    [[ "$output" == *"Rebuilding refcount structure"* ]]
    [[ "$output" == *"No errors were found on the image."* ]]
    qemu-img check a.qcow2
    run qemu-io -c "read -P 0x55 0 128k" a.qcow2
    [[ "$output" != *fail* ]]
}

@test "tool check: -r all rebuilds a v2 image's refcounts and leaves its header extensions alone" {
    # v2 has no feature bits: the header ends at 72, where the backing
    # format extension starts.  The rebuild used to clear a dirty bit
    # there, wiping the extension's type and length.
    qemu-img create -q -f raw base.raw 4M
    qemu-img create -q -f qcow2 -o compat=0.10 -b base.raw -F raw a.qcow2 4M
    qemu-io -c "write -P 0x55 0 128k" a.qcow2 > /dev/null
    local ext rt
    ext="$(od -An -tx1 -j 72 -N 16 a.qcow2)"
    rt="$(read_be a.qcow2 48 Q)"
    # The first data cluster's refcount (16-bit, block at cluster 2) -> 0.
    patch a.qcow2 $((0x20000 + 2 * 5)) H 0
    run -2 qemu-img check a.qcow2
    run -0 "$TOOL" check -r all a.qcow2
    [[ "$output" == *"Rebuilding refcount structure"* ]]
    [ "$(read_be a.qcow2 48 Q)" != "$rt" ]
    [ "$(od -An -tx1 -j 72 -N 16 a.qcow2)" = "$ext" ]
    qemu-img check a.qcow2
    run -0 qemu-img info --output=json a.qcow2
    [[ "$output" == *'"backing-filename-format": "raw"'* ]]
    run qemu-io -c "read -P 0x55 0 128k" a.qcow2
    [[ "$output" != *fail* ]]
}

@test "tool check: COPIED cleared on an owned cluster; -r all" {
    make_damage_base a.qcow2
    # L2 entry 0 (at cluster 4) loses COPIED.
    local e
    e="$(read_be a.qcow2 $((0x40000)) Q)"
    patch a.qcow2 $((0x40000)) Q "$e & ~(1 << 63)"
    run -2 qemu-img check a.qcow2
    run -2 "$TOOL" check a.qcow2
    [[ "$output" == *"ERROR OFLAG_COPIED data cluster: l2_entry=50000 refcount=1"* ]]
    run -0 "$TOOL" check -r all a.qcow2
    qemu-img check a.qcow2
    [ "$(read_be a.qcow2 $((0x40000)) Q)" = "$e" ]

    # The same on the L1 entry.
    e="$(read_be a.qcow2 $((0x30000)) Q)"
    patch a.qcow2 $((0x30000)) Q "$e & ~(1 << 63)"
    run -2 qemu-img check a.qcow2
    run -2 "$TOOL" check a.qcow2
    [[ "$output" == *"ERROR OFLAG_COPIED L2 cluster: l1_index=0"* ]]
    run -0 "$TOOL" check -r all a.qcow2
    qemu-img check a.qcow2
}

@test "tool check: leak and corruption together; the corrupt bit is cleared" {
    make_damage_base a.qcow2
    cp a.qcow2 b.qcow2
    patch a.qcow2 $((0x20000 + 2 * 6)) H 3
    patch a.qcow2 $((0x20000 + 2 * 1)) H 0
    # Mark it corrupt, as QEMU does when it finds metadata damage.
    patch a.qcow2 72 Q 2
    same_check_status a.qcow2
    run -2 "$TOOL" check a.qcow2
    run -0 "$TOOL" check -r all a.qcow2
    [[ "$output" == *"leaked clusters"* ]]
    qemu-img check a.qcow2
    [ "$(qemu-img info --output=json a.qcow2 | qjson /dev/stdin "j['format-specific']['data']['corrupt']")" = False ]
    qemu-io -c "write -P 0x66 0 64k" -c "read -P 0x66 0 64k" a.qcow2 | grep -v fail
}

@test "tool check: invalid L2 entries and offsets past the end of the file" {
    make_damage_base a.qcow2
    cp a.qcow2 b.qcow2
    # An L2 entry pointing past the end of the file.
    patch a.qcow2 $((0x40008)) Q "(1 << 63) | 0x10000000"
    run -2 "$TOOL" check a.qcow2
    [[ "$output" == *"past the end"* ]]
    run qemu-img check a.qcow2
    [ "$status" -ne 0 ]
    # Reserved bits in an L2 entry.
    patch b.qcow2 $((0x40008)) Q "(1 << 63) | 0x60000 | 0x2"
    run -2 "$TOOL" check b.qcow2
    [[ "$output" == *"reserved bits"* ]]
}

@test "tool check: a dirty image with lazy refcounts, then -r all" {
    "$TOOL" create -q -o lazy_refcounts=on a.qcow2 4M
    # QEMU dies without updating the refcounts.
    qemu-io -c "write -P 0x77 0 256k" -c abort a.qcow2 > /dev/null 2>&1 || true
    [ "$(qemu-img info -U --output=json a.qcow2 | qjson /dev/stdin "j['dirty-flag']")" = True ]
    same_check_status a.qcow2
    run -0 "$TOOL" check -r all a.qcow2
    qemu-img check a.qcow2
    [ "$(qemu-img info --output=json a.qcow2 | qjson /dev/stdin "j['dirty-flag']")" = False ]
    run qemu-io -c "read -P 0x77 0 256k" a.qcow2
    [[ "$output" != *fail* ]]
}

@test "tool check: an image QEMU wrote a lot to is clean in both tools" {
    "$TOOL" create -q -o cluster_size=4096,refcount_bits=4 a.qcow2 64M
    qemu-io -c "write -P 1 0 8M" -c "write -c -P 2 8M 64k" -c "write -z 1M 1M" \
        -c "discard 2M 1M" -c "write -P 3 40M 10M" a.qcow2 > /dev/null
    qemu-img check a.qcow2
    "$TOOL" check a.qcow2
    "$TOOL" check --json a.qcow2 > t.json
    qemu-img check --output=json a.qcow2 > q.json
    [ "$(qjson q.json "j['image-end-offset']" "j.get('allocated-clusters')" "j.get('compressed-clusters', 0)")" = \
      "$(qjson t.json "j['image-end-offset']" "j.get('allocated-clusters')" "j.get('compressed-clusters', 0)")" ]
}

@test "tool check: not a qcow2 image" {
    qemu-img create -q -f raw r.raw 1M
    run -1 "$TOOL" check r.raw
}

# ---- snapshots ----

@test "tool snapshot: -l lists what qemu-img created" {
    "$TOOL" create -q a.qcow2 4M
    qemu-io -c "write -P 1 0 64k" a.qcow2 > /dev/null
    qemu-img snapshot -c first a.qcow2
    qemu-img snapshot -c second a.qcow2
    run -0 "$TOOL" snapshot -l a.qcow2
    [[ "$output" == *"Snapshot list:"* ]]
    [[ "$output" == *"first"* ]]
    [[ "$output" == *"second"* ]]
    # The same lines as qemu-img (dates in the same time zone).
    diff <(qemu-img snapshot -l a.qcow2) <("$TOOL" snapshot -l a.qcow2)
    qemu-img info --output=json a.qcow2 > q.json
    "$TOOL" info --json a.qcow2 > t.json
    [ "$(qjson q.json "j['snapshots']")" = "$(qjson t.json "j['snapshots']")" ]
    run -0 "$TOOL" check a.qcow2
}

@test "tool snapshot: -c, -a and -d, checked by qemu-img" {
    "$TOOL" create -q a.qcow2 4M
    qemu-io -c "write -P 1 0 64k" a.qcow2 > /dev/null
    run -0 "$TOOL" snapshot -c snap1 a.qcow2
    qemu-img check a.qcow2
    run -0 qemu-img snapshot -l a.qcow2
    [[ "$output" == *snap1* ]]

    qemu-io -c "write -P 2 0 64k" -c "write -P 2 1M 64k" a.qcow2 > /dev/null
    run -0 "$TOOL" snapshot -a snap1 a.qcow2
    qemu-img check a.qcow2
    run qemu-io -c "read -P 1 0 64k" -c "read -P 0 1M 64k" a.qcow2
    [[ "$output" != *fail* ]]

    run -0 "$TOOL" snapshot -c snap2 a.qcow2
    run -0 "$TOOL" snapshot -d snap1 a.qcow2
    qemu-img check a.qcow2
    run -0 qemu-img snapshot -l a.qcow2
    [[ "$output" != *snap1* ]]
    [[ "$output" == *snap2* ]]
    run -1 "$TOOL" snapshot -a nosuch a.qcow2
    run -1 "$TOOL" snapshot -d nosuch a.qcow2
    run -1 "$TOOL" snapshot -l -c x a.qcow2
}

@test "tool map: a preallocation=metadata image maps like qemu-img (holes read as zero)" {
    for o in compat=1.1 compat=0.10 extended_l2=on; do
        rm -f p.qcow2
        qemu-img create -q -f qcow2 -o preallocation=metadata,$o p.qcow2 5M
        qemu-io -c 'write -P 9 1M 64k' p.qcow2 >/dev/null
        qemu-img map --output=json p.qcow2 | norm_map > q.txt
        "$TOOL" map --json p.qcow2 | norm_map > t.txt
        diff q.txt t.txt || { echo "json map of p.qcow2 ($o) differs" >&3; return 1; }
        qemu-img map p.qcow2 > q.txt
        "$TOOL" map p.qcow2 > t.txt
        diff q.txt t.txt || { echo "map of p.qcow2 ($o) differs" >&3; return 1; }
    done
}

@test "tool: -U inspects an image the plugin is writing; the lock message names -U" {
    qemu-img create -q -f qcow2 u.qcow2 1M
    start_nbdkit "$PLUGIN" file="$PWD/u.qcow2"
    nbdsh -u "$uri" -c 'h.pwrite(b"x" * 512, 0)'
    run -1 "$TOOL" info u.qcow2
    [[ "$output" == *"lock"*"(-U opens it anyway)"* ]]
    [[ "$output" != *"locking=off"* ]]
    run -0 "$TOOL" info -U u.qcow2
    [[ "$output" == *"virtual size: 1 MiB"* ]]
    run -0 "$TOOL" map -U --json u.qcow2
    run -0 "$TOOL" check -U u.qcow2
    run -1 "$TOOL" check -U -r leaks u.qcow2
    [[ "$output" == *"cannot be combined with -r"* ]]
    stop_nbdkit
}

@test "tool create: a size past INT64_MAX is out of range, not missing" {
    run -1 "$TOOL" create z.qcow2 18446744073709551615
    [[ "$output" == *"Must be between 0 and 9223372036854775807"* ]]
    [ ! -e z.qcow2 ]
}

# isdirty IMG: prints the dirty bit (incompatible feature bit 0) of IMG.
isdirty ()
{
    /usr/bin/python3 -c '
import struct, sys
with open(sys.argv[1], "rb") as f:
    f.seek(72)
    print(struct.unpack(">Q", f.read(8))[0] & 1)' "$1"
}

@test "tool snapshot: a snapshot refcounts cannot hold is refused before the image changes" {
    # 1-bit refcounts: no cluster can be shared at all
    qemu-img create -q -f qcow2 -o refcount_bits=1 a.qcow2 4M
    qemu-io -c "write -P 1 0 128k" a.qcow2 > /dev/null
    cp a.qcow2 before.qcow2
    run -1 "$TOOL" snapshot -c s1 a.qcow2
    [[ "$output" == *"refcounts can hold"* ]]
    cmp a.qcow2 before.qcow2
    # 2-bit refcounts: the third snapshot overflows a cluster the first
    # two share, after a fresh cluster that would not overflow
    qemu-img create -q -f qcow2 -o refcount_bits=2 b.qcow2 4M
    qemu-io -c "write -P 1 1M 64k" b.qcow2 > /dev/null
    "$TOOL" snapshot -c s1 b.qcow2
    "$TOOL" snapshot -c s2 b.qcow2
    qemu-io -c "write -P 2 0 64k" b.qcow2 > /dev/null
    cp b.qcow2 before.qcow2
    run -1 "$TOOL" snapshot -c s3 b.qcow2
    [[ "$output" == *"refcounts can hold"* ]]
    cmp b.qcow2 before.qcow2
    [ "$(isdirty b.qcow2)" = 0 ]
    run -0 qemu-img check b.qcow2
}

@test "tool snapshot: names and IDs as qemu-img treats them; icount; bitmaps kept" {
    qemu-img create -q -f qcow2 a.qcow2 4M
    qemu-io -c "write -P 1 0 64k" a.qcow2 > /dev/null
    "$TOOL" snapshot -c first a.qcow2          # ID 1
    "$TOOL" snapshot -c 1 a.qcow2              # ID 2, named like ID 1
    "$TOOL" snapshot -c first a.qcow2          # ID 3, a repeated name
    "$TOOL" snapshot -c "" a.qcow2             # ID 4, no name
    run -0 qemu-img snapshot -l a.qcow2
    [ "$(grep -c ' first ' <<<"$output")" -eq 2 ]
    # qemu-img records icount 0, and so do we
    qemu-img info --output=json a.qcow2 | /usr/bin/python3 -c '
import json, sys
sn = json.load(sys.stdin)["snapshots"]
assert [s["id"] for s in sn] == ["1", "2", "3", "4"], sn
assert all(s.get("icount") == 0 for s in sn), sn'
    # -d looks the name up first, as qemu-img: "1" is ID 2
    cp a.qcow2 q.qcow2
    "$TOOL" snapshot -d 1 a.qcow2
    qemu-img snapshot -d 1 q.qcow2
    [ "$(qemu-img snapshot -l a.qcow2 | awk 'NR>2{print $1}')" = \
      "$(qemu-img snapshot -l q.qcow2 | awk 'NR>2{print $1}')" ]
    [ "$(qemu-img snapshot -l a.qcow2 | awk 'NR>2{print $1}' | tr '\n' ' ')" = "1 3 4 " ]
    # -d falls back to an ID; -a looks the ID up first
    "$TOOL" snapshot -d 4 a.qcow2
    run -0 "$TOOL" snapshot -a 1 a.qcow2
    run -0 qemu-img check a.qcow2

    # persistent bitmaps survive create and delete; apply is refused
    qemu-img bitmap --add a.qcow2 b0
    "$TOOL" snapshot -c withmap a.qcow2
    "$TOOL" snapshot -d 3 a.qcow2
    run -1 "$TOOL" snapshot -a withmap a.qcow2
    [[ "$output" == *bitmaps* ]]
    run -0 qemu-img info --output=json a.qcow2
    [[ "$output" == *'"name": "b0"'* ]]
    run -0 qemu-img check a.qcow2
}

# damage_base_data_intact IMG: what make_damage_base wrote reads back.
damage_base_data_intact ()
{
    run qemu-io -r -c "read -P 0x55 0 128k" "$1"
    [[ "$output" != *fail* ]]
}

# repair_all_keeps_data IMG: -r all leaves a clean image, data intact.
repair_all_keeps_data ()
{
    run -0 "$TOOL" check -r all "$1"
    qemu-img check "$1"
    damage_base_data_intact "$1"
}

@test "tool check: a refcount block that shares a data cluster; -r leaks keeps away, -r all rebuilds" {
    make_damage_base a.qcow2
    # refcount table entry 0 -> the data cluster 5
    patch a.qcow2 $((0x10000)) Q $((0x50000))
    run -2 qemu-img check a.qcow2
    run -2 "$TOOL" check a.qcow2
    [[ "$output" == *"ERROR refcount block 0 refcount=2"* ]]
    cp a.qcow2 q.qcow2
    run -1 qemu-img check -r leaks q.qcow2
    run -1 "$TOOL" check -r leaks a.qcow2
    damage_base_data_intact a.qcow2
    repair_all_keeps_data a.qcow2
}

@test "tool check: refcount table entries past the file or with reserved bits; -r all rebuilds" {
    make_damage_base a.qcow2
    patch a.qcow2 $((0x10000 + 8)) Q $((0x7770000))    # entry 1 past EOF
    same_check_status a.qcow2
    [[ "$output" == *"refcount block 1 is outside the image"* ]]
    repair_all_keeps_data a.qcow2

    make_damage_base b.qcow2
    patch b.qcow2 $((0x10000 + 8)) Q 1                  # entry 1: a reserved bit
    same_check_status b.qcow2
    [[ "$output" == *"refcount table entry 1 has reserved bits set"* ]]
    repair_all_keeps_data b.qcow2
}

@test "tool check: invalid entries in a snapshot's tables; compressed entries with a subcluster bitmap" {
    make_damage_base a.qcow2
    "$TOOL" snapshot -c s1 a.qcow2
    qemu-io -c "write -P 0x66 0 64k" a.qcow2 > /dev/null    # active gets its own L2
    # the snapshot's L2 table is still cluster 4: entry 1 gets reserved bits
    local e
    e="$(read_be a.qcow2 $((0x40000 + 8)) Q)"
    patch a.qcow2 $((0x40000 + 8)) Q "$e | 0x1fe"
    same_check_status a.qcow2
    [ "$check_status" -eq 2 ]
    [[ "$output" == *"snapshot 1: L2 table at 0x40000, index 1"* ]]

    qemu-img create -q -f qcow2 -o extended_l2=on c.qcow2 4M
    qemu-io -c "write -c -P 0x55 0 64k" c.qcow2 > /dev/null
    local l2
    l2="$(read_be c.qcow2 $(( $(read_be c.qcow2 40 Q) )) Q)"
    patch c.qcow2 $(( (l2 & ((1 << 56) - 1)) + 8 )) Q 1
    same_check_status c.qcow2
    [ "$check_status" -eq 2 ]
    [[ "$output" == *"non-zero subcluster bitmap"* ]]
    # reads of it fail, as in QEMU
    run nbdkit -U - "$PLUGIN" file="$PWD/c.qcow2" --run 'qemu-io -r -f raw "$uri" -c "read 0 64k"'
    [[ "$output" == *"Input/output error"* ]]
}

@test "tool check: -r all turns an unaligned zero cluster into a plain one; -r leaks fixes COPIED alone" {
    qemu-img create -q -f qcow2 a.qcow2 4M
    qemu-io -c "write -P 0x55 0 64k" -c "write -z 64k 64k" a.qcow2 > /dev/null
    local l2
    l2="$(( $(read_be a.qcow2 $(( $(read_be a.qcow2 40 Q) )) Q) & ((1 << 56) - 1) ))"
    patch a.qcow2 $((l2 + 8)) Q $((0x50201))
    same_check_status a.qcow2
    run -0 "$TOOL" check -r all a.qcow2
    qemu-img check a.qcow2
    [ "$(read_be a.qcow2 $((l2 + 8)) Q)" = 1 ]
    run qemu-io -r -c "read -P 0x55 0 64k" -c "read -P 0 64k 64k" a.qcow2
    [[ "$output" != *fail* ]]

    # Extended L2 (iotest 271): an unaligned offset with no allocated
    # subcluster loses the offset; its zero bits stay, the backing file
    # shows through the rest.
    qemu-img create -q -f raw base.raw 128k
    qemu-io -f raw -c "write -P 0xff 0 128k" base.raw > /dev/null
    qemu-img create -q -f qcow2 -o extended_l2=on -F raw -b base.raw e.qcow2
    qemu-io -c "write -P 1 4k 2k" -c "write -z 4k 2k" e.qcow2 > /dev/null
    l2="$(( $(read_be e.qcow2 $(( $(read_be e.qcow2 40 Q) )) Q) & ((1 << 56) - 1) ))"
    patch e.qcow2 $l2 Q "$(read_be e.qcow2 $l2 Q) + 512"
    same_check_status e.qcow2
    [ "$check_status" -eq 2 ]
    run -0 "$TOOL" check -r all e.qcow2
    qemu-img check e.qcow2
    [ "$(read_be e.qcow2 $l2 Q)" = 0 ]
    nbdkit -U - -r "$PLUGIN" file="$PWD/e.qcow2" --run 'nbdsh -u "$uri" -c "
assert h.pread(4096, 0) == b\"\\xff\" * 4096
assert h.pread(2048, 4096) == bytes(2048)
assert h.pread(124928, 6144) == b\"\\xff\" * 124928"'

    make_damage_base b.qcow2
    local e
    e="$(read_be b.qcow2 $((0x40000)) Q)"
    patch b.qcow2 $((0x40000)) Q "$e & ~(1 << 63)"
    cp b.qcow2 q.qcow2
    run -0 qemu-img check -r leaks q.qcow2              # QEMU fixes it too
    run -0 "$TOOL" check -r leaks b.qcow2
    qemu-img check b.qcow2
    [ "$(read_be b.qcow2 $((0x40000)) Q)" = "$e" ]
}

@test "tool map: the human format names an external data file as qemu-img does" {
    qemu-img create -q -f qcow2 -o data_file=d.raw df.qcow2 4M
    qemu-io -c "write -P 5 0 64k" -c "write -P 6 1M 64k" df.qcow2 > /dev/null
    run -0 "$TOOL" map df.qcow2
    [ "$output" = "$(qemu-img map df.qcow2)" ]
    [[ "$output" == *" d.raw"* ]]
}

@test "tool check: flag bits in an empty L1 entry; a snapshot with an invalid L1 table is reported, and -r all discards it" {
    qemu-img create -q -f qcow2 a.qcow2 1G              # L1 of 2 entries
    patch a.qcow2 $(( $(read_be a.qcow2 40 Q) + 8 )) Q $((0x20))   # entry 1: a reserved bit, no table
    same_check_status a.qcow2
    [ "$check_status" -eq 2 ]
    [[ "$output" == *"L1 entry 1 (0x20)"* ]]

    make_damage_base b.qcow2
    "$TOOL" snapshot -c s1 b.qcow2
    "$TOOL" snapshot -c s2 b.qcow2
    # snapshot 1's L1 table offset becomes unaligned
    local tab
    tab="$(read_be b.qcow2 64 Q)"
    patch b.qcow2 "$tab" Q "$(read_be b.qcow2 "$tab" Q) + 8"
    same_check_status b.qcow2
    [ "$check_status" -eq 2 ]
    [[ "$output" == *"snapshot 1: L1 table at"* ]]
    # the plugin serves the active image read-only, and refuses the broken
    # snapshot; a refused snapshot -d changes nothing either
    cp b.qcow2 before.qcow2
    run nbdkit -U - "$PLUGIN" file="$PWD/b.qcow2" --run 'nbdinfo --list "$uri"'
    [[ "$output" == *s2* ]]
    run nbdkit -U - "$PLUGIN" file="$PWD/b.qcow2" \
        --run 'nbdsh -u "$uri" -c "assert h.is_read_only()" -c "assert h.pread(4, 0) == b\"\\x55\" * 4"'
    [ "$status" -eq 0 ]
    run -1 "$TOOL" snapshot -d s1 b.qcow2
    [[ "$output" == *"invalid L1 table"* ]]
    cmp b.qcow2 before.qcow2
    run -0 "$TOOL" check -r all b.qcow2
    [[ "$output" == *"Discarded snapshots"* ]]
    qemu-img check b.qcow2
    run -0 qemu-img snapshot -l b.qcow2
    [[ "$output" != *" s1 "* ]]
    [[ "$output" == *" s2 "* ]]
    damage_base_data_intact b.qcow2

    # an L1 offset at the end of the file stays broken while the repair
    # grows the file over it
    make_damage_base c.qcow2
    "$TOOL" snapshot -c s1 c.qcow2
    tab="$(read_be c.qcow2 64 Q)"
    patch c.qcow2 "$tab" Q "$(stat -c %s c.qcow2)"
    same_check_status c.qcow2
    run -0 "$TOOL" check -r all c.qcow2
    qemu-img check c.qcow2
    run -0 qemu-img snapshot -l c.qcow2
    [[ "$output" != *" s1 "* ]]
    damage_base_data_intact c.qcow2
}

@test "tool create: external data files, raw or not, are byte-identical to qemu-img's and served by the plugin" {
    local o sz
    for o in data_file=d.raw data_file=d.raw,data_file_raw=on \
             data_file=d.raw,preallocation=metadata \
             data_file=d.raw,preallocation=full,cluster_size=4k \
             data_file=d.raw,extended_l2=on,data_file_raw=on \
             data_file=d.raw,extended_l2=on,preallocation=falloc,cluster_size=2M \
             data_file=d.raw,refcount_bits=1,lazy_refcounts=on; do
    for sz in 100000 8M; do
        rm -f a.qcow2 b.qcow2 d.raw da.raw db.raw
        "$TOOL" create -q -o "$o" a.qcow2 $sz
        mv d.raw da.raw
        qemu-img create -q -f qcow2 -o "$o" b.qcow2 $sz
        mv d.raw db.raw
        cmp a.qcow2 b.qcow2 || { echo "image differs with -o $o, $sz"; return 1; }
        cmp da.raw db.raw || { echo "data file differs with -o $o, $sz"; return 1; }
    done; done

    # The plugin writes through an image the tool made; QEMU reads the
    # same, and a raw data file holds the guest disk at the same offsets.
    for o in data_file=d.raw data_file=d.raw,data_file_raw=on; do
        rm -f a.qcow2 d.raw
        "$TOOL" create -q -o "$o" a.qcow2 4M
        head -c 4M /dev/urandom > ref.raw
        nbdkit -U - "$PLUGIN" file="$PWD/a.qcow2" \
            --run 'nbdcopy ref.raw "$uri"'
        qemu-img check -q a.qcow2
        qemu-img compare -f qcow2 -F raw a.qcow2 ref.raw
        if [ "$o" = data_file=d.raw,data_file_raw=on ]; then
            cmp d.raw ref.raw
        fi
    done
}

@test "tool create: data file errors as qemu-img gives them; an existing data file is truncated" {
    qemu-img create -q -f qcow2 base.qcow2 1M
    run -1 "$TOOL" create -q -o data_file_raw=on x.qcow2 1M
    [[ "$output" == *"data-file-raw requires data-file"* ]]
    run -1 "$TOOL" create -q -o compat=0.10,data_file=d.raw x.qcow2 1M
    [[ "$output" == *"compatibility level 1.1"* ]]
    run -1 "$TOOL" create -q -o data_file=d.raw,data_file_raw=on -b base.qcow2 -F qcow2 x.qcow2 1M
    [[ "$output" == *"Backing file and data-file-raw"* ]]
    run -1 "$TOOL" create -q -o data_file=nodir/d.raw x.qcow2 1M
    [[ "$output" == *"nodir/d.raw"*"No such file"* ]]
    [ ! -e x.qcow2 ]
    # The data file the image itself: refused before anything is written.
    cp base.qcow2 keep.qcow2
    run -1 "$TOOL" create -q -o data_file=keep.qcow2 keep.qcow2 1M
    [[ "$output" == *"the image itself"* ]]
    cmp base.qcow2 keep.qcow2

    printf 'old data' > d.raw
    truncate -s 8M d.raw
    "$TOOL" create -q -o data_file=d.raw a.qcow2 1M
    [ "$(stat -c %s d.raw)" = $((1 * M)) ]
    [ "$(head -c 8 d.raw | tr -d '\0')" = "" ]

    # Relative to the image's directory, wherever the tool runs.
    mkdir sub
    "$TOOL" create -q -o data_file=s.raw sub/s.qcow2 1M
    [ -f sub/s.raw ] && [ ! -e s.raw ]
    (cd sub && qemu-img check -q s.qcow2)
}

@test "tool create: the Formatting line names the options given as qemu-img does" {
    local o
    for o in compat=1.1 compat=0.10 preallocation=off nocow=on,compat=1.1 \
             data_file=d.raw,data_file_raw=off,lazy_refcounts=on \
             data_file=d.raw,data_file_raw=on \
             refcount_bits=64,extended_l2=on,cluster_size=128k; do
        # data_file_raw=on cannot have a backing file.
        local b=(-b base.qcow2 -u -F qcow2) ours
        [ "$o" != data_file=d.raw,data_file_raw=on ] || b=()
        rm -f a.qcow2 d.raw
        run -0 "$TOOL" create -o "$o" "${b[@]}" a.qcow2 1M
        ours="$output"
        run -0 qemu-img create -f qcow2 -o "$o" "${b[@]}" a.qcow2 1M
        [ "$ours" = "$output" ] ||
            { echo "ours: $ours"; echo "qemu: $output"; return 1; }
        [[ "$o" != *nocow* ]] || [[ "$ours" == *" nocow=on" ]]
    done
}

@test "tool info: text and JSON are qemu-img's, byte for byte: v2, encryption, bitmaps in use, snapshots, chains, data files" {
    local S="--object secret,id=s0,data=abc" f
    qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 10M
    qemu-img snapshot -c snap1 v2.qcow2
    qemu_img_create -q -f qcow2 $S -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 l.qcow2 10M
    qemu-img create -q -f qcow2 $S -o encrypt.format=aes,encrypt.key-secret=s0,compat=0.10 aes.qcow2 10M 2>/dev/null
    qemu-img create -q -f qcow2 -o extended_l2=on,compression_type=zstd,refcount_bits=1,lazy_refcounts=on e.qcow2 10M
    qemu-img create -q -f raw r.raw 10M
    qemu-img create -q -f qcow2 -b r.raw -F raw -o data_file=d.raw rb.qcow2
    qemu-img create -q -f qcow2 -b rb.qcow2 -F qcow2 top.qcow2
    qemu-img snapshot -c "a name, with \"quotes\"" top.qcow2
    # Bitmaps: enabled, disabled, and in use (the flag a QEMU that died
    # with the image open leaves, set by hand on the first entry).
    qemu-img create -q -f qcow2 bm.qcow2 10M
    qemu-img bitmap --add bm.qcow2 b1
    qemu-img bitmap --add -g 1M bm.qcow2 "b 2,\"x"
    qemu-img bitmap --add bm.qcow2 b3 --disable
    cp bm.qcow2 iu.qcow2
    /usr/bin/python3 -c '
import struct, sys
d = bytearray(open(sys.argv[1], "rb").read())
i = d.index(struct.pack(">I", 0x23852875))          # bitmaps extension
off = struct.unpack(">Q", d[i + 24:i + 32])[0]      # directory offset
struct.pack_into(">I", d, off + 12, struct.unpack(">I", d[off + 12:off + 16])[0] | 1)
open(sys.argv[1], "wb").write(d)' iu.qcow2
    qemu-img info -U iu.qcow2 | grep -q in-use
    # The dirty bit (lazy refcounts, QEMU killed after a write).
    qemu-img create -q -f qcow2 -o lazy_refcounts=on d.qcow2 10M
    qemu-io -c 'write 0 64k' -c abort d.qcow2 > /dev/null 2>&1 || true
    qemu-img info d.qcow2 | grep -q "cleanly shut down: no"
    # A snapshot whose icount has the top bit set: QEMU's is signed.
    qemu-img create -q -f qcow2 ic.qcow2 1M
    qemu-img snapshot -c s1 ic.qcow2
    /usr/bin/python3 -c '
import struct, sys
d = bytearray(open(sys.argv[1], "rb").read())
t = struct.unpack(">Q", d[64:72])[0]                 # snapshot table
assert struct.unpack(">I", d[t + 36:t + 40])[0] >= 24
struct.pack_into(">Q", d, t + 40 + 16, (1 << 63) + 5)   # icount
open(sys.argv[1], "wb").write(d)' ic.qcow2
    for f in v2 l aes e rb top bm iu d ic; do
        diff <(qemu-img info -U $f.qcow2) <("$TOOL" info -U $f.qcow2) ||
            { echo "text of $f"; return 1; }
        diff <(qemu-img info -U --output=json $f.qcow2) \
             <("$TOOL" info -U --json $f.qcow2) || { echo "json of $f"; return 1; }
        diff <(qemu-img info -U --backing-chain $f.qcow2) \
             <("$TOOL" info -U --backing-chain $f.qcow2) ||
            { echo "chain text of $f"; return 1; }
        diff <(qemu-img info -U --backing-chain --output=json $f.qcow2) \
             <("$TOOL" info -U --backing-chain --json $f.qcow2) ||
            { echo "chain json of $f"; return 1; }
    done
}

@test "tool create: an image in use is refused and kept; a failed create leaves no image" {
    qemu-img create -q -f qcow2 live.qcow2 4M
    qemu-io -c "write -P 7 0 1M" live.qcow2 > /dev/null
    cp live.qcow2 before.qcow2
    start_nbdkit "$PLUGIN" file="$PWD/live.qcow2"
    run -1 "$TOOL" create -q live.qcow2 1M
    [[ "$output" == *'live.qcow2: failed to get the "write" lock'* ]] || { echo "$output"; return 1; }
    # A data file in use is refused too, before the image is touched.
    run -1 "$TOOL" create -q -o data_file=live.qcow2 other.qcow2 1M
    [[ "$output" == *"data_file: "*"live.qcow2: failed to get"* ]] || { echo "$output"; return 1; }
    [ ! -e other.qcow2 ]
    stop_nbdkit
    cmp live.qcow2 before.qcow2

    # The file size limit hit while preallocating: like qemu-img, no
    # half-written image is left behind.
    run -1 bash -c "trap '' XFSZ; ulimit -f 2048; '$TOOL' create -q -o preallocation=full big.qcow2 10M"
    [[ "$output" == *"File too large"* ]] || { echo "$output"; return 1; }
    [ ! -e big.qcow2 ]
    run -1 bash -c "trap '' XFSZ; ulimit -f 2048; '$TOOL' create -q -o data_file=big.raw,preallocation=full big.qcow2 10M"
    [ ! -e big.qcow2 ] && [ ! -e big.raw ]
}

@test "tool info: a missing backing file is shown, not an error, without --backing-chain" {
    qemu-img create -q -f qcow2 b.qcow2 1M
    qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 t.qcow2
    rm b.qcow2
    run -0 "$TOOL" info t.qcow2
    [ "$output" = "$(qemu-img info t.qcow2)" ]
    run -0 "$TOOL" info --json t.qcow2
    [ "$output" = "$(qemu-img info --output=json t.qcow2)" ]
    run -1 "$TOOL" info --backing-chain t.qcow2
    [[ "$output" == *"b.qcow2"*"No such file"* ]]
}

@test "tool map: an encrypted image's clusters have no offset (ciphertext), as in qemu-img map" {
    local S="--object secret,id=s,data=pw"
    local IO="driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=s"
    qemu_img_create -q -f qcow2 $S -o encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10 e.qcow2 4M
    qemu-io $S --image-opts "$IO" -c "write -P 1 0 64k" -c "write -z 1M 64k" > /dev/null
    run -0 "$TOOL" map --json e.qcow2
    [ "$output" = "$(qemu-img map $S --output=json --image-opts "$IO")" ]
    [[ "$output" != *offset* ]]
    run -1 "$TOOL" map e.qcow2
    [[ "$output" == *"File contains external, encrypted or compressed clusters."* ]]
    run -1 qemu-img map $S --image-opts "$IO"
}

@test "tool check: the image end offset counts leaked clusters, fragmentation is counted per L2 table, as qemu-img does" {
    qemu-img create -q -f qcow2 l.qcow2 4M
    qemu-io -c "write -P 1 0 64k" l.qcow2 > /dev/null
    local sz
    sz="$(stat -c %s l.qcow2)"
    truncate -s $((sz + 65536)) l.qcow2
    patch l.qcow2 $((0x20000 + 2 * (sz / 65536))) H 1     # a leaked last cluster
    cp l.qcow2 q.qcow2
    run -3 "$TOOL" check l.qcow2
    [[ "$output" == *"Image end offset: $((sz + 65536))"* ]] || { echo "$output"; return 1; }
    [ "$output" = "$(qemu-img check q.qcow2 2>&1)" ]
    run -0 "$TOOL" check -r leaks l.qcow2
    [ "$output" = "$(qemu-img check -r leaks q.qcow2 2>&1 | sed 's/q.qcow2/l.qcow2/g')" ]
    [[ "$output" == *"Image end offset: $sz"* ]]

    # One cluster in each of two L2 tables: not fragmented.
    qemu-img create -q -f qcow2 -o cluster_size=512 f.qcow2 1M
    qemu-io -c "write 0 512" -c "write 32k 512" f.qcow2 > /dev/null
    run -0 "$TOOL" check f.qcow2
    [ "$output" = "$(qemu-img check f.qcow2)" ]
    [[ "$output" == *"0.00% fragmented"* ]]
}

@test "tool check: a refcount table past the end of the file, or none at all (iotest 108), is reported and -r all rebuilds it, as qemu-img does; the plugin refuses the image" {
    local kind
    for kind in past-eof missing; do
        rm -f x.qcow2 q.qcow2
        qemu-img create -q -f qcow2 x.qcow2 4M
        qemu-io -c "write -P 1 0 64k" x.qcow2 > /dev/null
        if [ $kind = past-eof ]; then
            patch x.qcow2 48 Q $((256 << 20))              # refcount_table_offset
        else
            patch x.qcow2 48 Q 0; patch x.qcow2 56 I 0     # ... and _clusters
        fi
        cp x.qcow2 q.qcow2
        run -1 nbdkit -U - "$PLUGIN" file="$PWD/x.qcow2" --run true
        if [ $kind = past-eof ]; then
            [[ "$output" == *"refcount_table_offset (refcount table) 0x10000000"*"past the end of the file"* ]] ||
                { echo "$output"; return 1; }
        else
            [[ "$output" == *"refcount_table_clusters is 0"* ]] || { echo "$output"; return 1; }
        fi
        same_check_status x.qcow2
        [ "$check_status" -eq 2 ]
        [[ "$output" == *"ERROR cluster 0 refcount=0 reference=1"* ]]
        # -r leaks cannot repair lost refcounts: it gives up as qemu-img does.
        run -1 "$TOOL" check -r leaks x.qcow2
        [[ "$output" == *"need to rebuild refcount structures"* ]]
        run -0 "$TOOL" check -r all x.qcow2
        [[ "$output" == *"Rebuilding refcount structure"* ]]
        qemu-img check x.qcow2
        run -0 qemu-io -c "read -P 1 0 64k" x.qcow2
        [[ "$output" != *"verification failed"* ]]
        qemu-img check -q -r all q.qcow2
        qemu-img compare x.qcow2 q.qcow2
    done
    # One that runs past 2^64 (iotest 080) cannot even be checked; the
    # message says why, without a made-up file size.
    qemu-img create -q -f qcow2 x.qcow2 4M
    patch x.qcow2 48 Q 0xffffffffffff0000; patch x.qcow2 56 I 127
    run -1 "$TOOL" check x.qcow2
    [[ "$output" == *"0xffffffffffff0000 (8323072 bytes) runs past the largest 64-bit offset"* ]] ||
        { echo "$output"; return 1; }
}

@test "tool check: -r all does not count what it could not repair (an invalid subcluster bitmap) as fixed" {
    qemu-img create -q -f qcow2 -o extended_l2=on e.qcow2 4M
    qemu-io -c "write -P 1 0 4k" e.qcow2 > /dev/null
    local l2
    l2="$(( $(read_be e.qcow2 "$(read_be e.qcow2 40 Q)" Q) & 0x00fffffffffffe00 ))"
    patch e.qcow2 $((l2 + 8)) Q "$(read_be e.qcow2 $((l2 + 8)) Q) | (1 << 32)"
    run -2 "$TOOL" check -r all --json e.qcow2
    [ "$(qjson <(echo "$output" | sed -n '/^{/,$p') "j.get('corruptions-fixed', 0)" "j['corruptions']")" = "0
1" ] || { echo "$output"; return 1; }
    run -2 qemu-img check -r all e.qcow2
}

@test "tool check -r leaks: a refcount block outside the image is reported once, as qemu-img does" {
    make_damage_base a.qcow2
    patch a.qcow2 $((0x10000 + 8)) Q $((0x7770000))    # entry 1 past EOF
    cp a.qcow2 q.qcow2
    run -2 qemu-img check -r leaks q.qcow2
    run -2 "$TOOL" check -r leaks a.qcow2
    [ "$(echo "$output" | grep -c "refcount block 1 is outside")" -eq 1 ] ||
        { echo "$output"; return 1; }
}

@test "tool create: a FIFO is refused and kept, a dangling symlink's target is created, a block device takes a raw data file" {
    mkfifo fifo
    run -1 "$TOOL" create -q fifo 1M
    [[ "$output" == *"not a regular file or a block device"* ]]
    [ -p fifo ]
    run -1 "$TOOL" create -q -o data_file=fifo img.qcow2 1M
    [ -p fifo ] && [ ! -e img.qcow2 ]

    ln -s target.qcow2 link.qcow2
    "$TOOL" create -q link.qcow2 1M
    [ -L link.qcow2 ] && [ -f target.qcow2 ]
    qemu-img check -q target.qcow2

    truncate -s 8M dev.img
    loop=$(losetup -f --show "$BATS_TEST_TMPDIR/dev.img" 2>/dev/null) ||
        skip "no loop devices here"
    echo "$loop" > "$BATS_TEST_TMPDIR/loop"
    run -1 "$TOOL" create -q -o data_file="$loop",data_file_raw=on small.qcow2 16M
    [[ "$output" == *"the device has 8388608 bytes"* ]] || { echo "$output"; return 1; }
    [ -b "$loop" ] && [ ! -e small.qcow2 ]
    "$TOOL" create -q -o data_file="$loop",data_file_raw=on t.qcow2 8M
    qemu-img create -q -f qcow2 -o data_file="$loop",data_file_raw=on q.qcow2 8M
    cmp t.qcow2 q.qcow2
    head -c 1M /dev/urandom > ref.raw
    nbdkit -U - "$PLUGIN" file="$PWD/t.qcow2" --run 'nbdcopy ref.raw "$uri"'
    cmp -n 1048576 "$loop" ref.raw
    qemu-img check -q t.qcow2
}
