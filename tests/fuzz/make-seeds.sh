#!/usr/bin/env bash
# Builds the seed corpora for the qcow2core fuzz targets with qemu-img
# and qemu-io:
#   OUTDIR/read/    small whole images (fuzz-read)
#   OUTDIR/write/   the same images followed by an op list (fuzz-write)
#   OUTDIR/header/  the first cluster of each image, at most 4 KiB
#                   (fuzz-header)
# Usage: make-seeds.sh OUTDIR
# Seeds are kept small (mostly 512 B and 4 KiB clusters, 1-4 MiB virtual
# disks): each is at most about 300 KiB; the 2 MiB-cluster image only
# gives a header seed.
set -euo pipefail

out="${1:?usage: make-seeds.sh OUTDIR}"
export LC_ALL=C
ulimit -c 0 || true
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
rm -rf "$out"
mkdir -p "$out/read" "$out/write" "$out/header"

# img NAME CREATE-OPTS SIZE [QEMU-IO COMMANDS...]
img ()
{
    local name="$1" opts="$2" size="$3" f="$tmp/$1.qcow2"
    shift 3
    qemu-img create -q -f qcow2 -o "$opts" "$f" "$size"
    if [ $# -gt 0 ]; then
        local args=() c
        for c in "$@"; do args+=(-c "$c"); done
        qemu-io -f qcow2 "${args[@]}" "$f" >/dev/null
    fi
}

# Some data in every image: patterns, zeros, a discard, a partial cluster.
data=('write -P 0x11 0 64k' 'write -P 0x22 200k 5k' 'write -z 300k 16k'
      'write -P 0x33 1M 4k' 'discard 1M 4k' 'write -P 0x44 1536k 1000')

img v3-512 cluster_size=512 2M "${data[@]}"
img v3-512-many cluster_size=512 1M \
    'write -P 0x55 0 1k' 'write -P 0x66 100k 512' 'write -P 0x77 1023k 1k'
img v2-512 compat=0.10,cluster_size=512 2M "${data[@]}"
img v3-4k cluster_size=4k 4M "${data[@]}" 'write -P 0x88 3M 64k'
img v2-4k compat=0.10,cluster_size=4k 2M "${data[@]}"
img empty-4k cluster_size=4k 1M
img rc1-4k cluster_size=4k,refcount_bits=1 2M "${data[@]}"
img rc64-4k cluster_size=4k,refcount_bits=64 2M "${data[@]}"
img rc64-512 cluster_size=512,refcount_bits=64 1M "${data[@]:0:3}"
img extl2-16k cluster_size=16k,extended_l2=on 2M \
    'write -P 0x11 0 2k' 'write -P 0x22 20k 1k' 'write -z 40k 1k' \
    'write -P 0x33 64k 16k' 'discard 64k 512'
img zlib-4k cluster_size=4k,compression_type=zlib 2M \
    'write -c -P 0x12 0 8k' 'write -c -P 0x34 64k 4k' 'write -P 0x56 128k 4k'
img zlib-512 cluster_size=512 1M \
    'write -c -P 0x12 0 2k' 'write -P 0x56 4k 512'
img zstd-4k cluster_size=4k,compression_type=zstd 2M \
    'write -c -P 0x12 0 8k' 'write -c -P 0x34 64k 4k' 'write -P 0x56 128k 4k'
img snap-4k cluster_size=4k 2M 'write -P 0x21 0 16k' 'write -P 0x22 1M 8k'
qemu-img snapshot -c first "$tmp/snap-4k.qcow2"
qemu-io -f qcow2 -c 'write -P 0x23 4k 8k' -c 'discard 1M 4k' \
    "$tmp/snap-4k.qcow2" >/dev/null
qemu-img snapshot -c second "$tmp/snap-4k.qcow2"
img snap-v2-512 compat=0.10,cluster_size=512 1M 'write -P 0x31 0 4k'
qemu-img snapshot -c s1 "$tmp/snap-v2-512.qcow2"
qemu-io -f qcow2 -c 'write -P 0x32 1k 1k' "$tmp/snap-v2-512.qcow2" >/dev/null
# A backing file name (and format) in the header only: no_backing
# ignores it, and the file does not exist.
qemu-img create -q -f qcow2 -o cluster_size=4k -u -b base-does-not-exist.raw \
    -F raw "$tmp/backing-4k.qcow2" 2M
qemu-io -f qcow2 -c 'write -P 0x41 8k 8k' "$tmp/backing-4k.qcow2" \
    >/dev/null 2>&1 || true
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=512 -u \
    -b base.qcow2 -F qcow2 "$tmp/backing-v2-512.qcow2" 1M
img lazy-4k cluster_size=4k,lazy_refcounts=on 2M "${data[@]}"
# Dirty: lazy refcounts and a crash (qemu-io abort) leave the bit set.
img dirty-4k cluster_size=4k,lazy_refcounts=on 2M
(qemu-io -f qcow2 -c 'write -P 0x61 0 12k' -c 'write -P 0x62 1M 4k' \
    -c abort "$tmp/dirty-4k.qcow2" >/dev/null 2>&1 || true) 2>/dev/null
img v3-64k cluster_size=64k 2M 'write -z 0 64k'
# Tiny images (a few KiB, every structure within reach of a mutation).
tiny=('write -P 0x91 0 1k' 'write -c -P 0x92 4k 2k' 'write -z 8k 1k'
      'write -P 0x93 100k 512' 'discard 100k 512')
img tiny-v3 cluster_size=512 128k "${tiny[@]}"
img tiny-v2 compat=0.10,cluster_size=512 128k "${tiny[@]}"
img tiny-rc1 cluster_size=512,refcount_bits=1 128k "${tiny[@]:0:3}"
img tiny-rc64 cluster_size=512,refcount_bits=64 128k "${tiny[@]:0:3}"
img tiny-zstd cluster_size=512,compression_type=zstd 128k "${tiny[@]}"
img tiny-snap cluster_size=512 64k 'write -P 0x94 0 2k'
qemu-img snapshot -c s "$tmp/tiny-snap.qcow2"
qemu-io -f qcow2 -c 'write -P 0x95 512 1k' "$tmp/tiny-snap.qcow2" >/dev/null
img tiny-dirty cluster_size=512,lazy_refcounts=on 64k
(qemu-io -f qcow2 -c 'write -P 0x96 0 3k' -c abort \
    "$tmp/tiny-dirty.qcow2" >/dev/null 2>&1 || true) 2>/dev/null
img v3-2M cluster_size=2M 4M

for f in "$tmp"/*.qcow2; do
    name="$(basename "$f" .qcow2)"
    size="$(stat -c %s "$f")"
    cs="$(qemu-img info --output=json "$f" |
          sed -n 's/.*"cluster-size": \([0-9]*\).*/\1/p')"
    hs=$(( cs < 4096 ? cs : 4096 ))
    head -c "$hs" "$f" > "$out/header/$name"
    if [ "$size" -le $((320 << 10)) ]; then
        cp "$f" "$out/read/$name"
    fi
done

# The op list of the write target: bytes kind, offset unit (32 bits),
# length unit (16 bits; x16 bytes), all big-endian; then its length in
# 2 bytes.  Kinds (the byte mod 9): 0 write 1 zero 2 zero+trim 3 zero-fast
# 4 trim 5 flush 6 snapshot create 7 delete 8 apply; bit 7 asks for FUA
# (135 is a FUA write).
bytes ()
{
    local b
    for b in "$@"; do printf "\\$(printf %03o "$b")"; done
}
# op KIND OFFSET-FRACTION-PERCENT LENGTH-UNITS
op ()
{
    local off=$(( $2 * 42949672 )) len="$3"
    bytes "$1" $(( off >> 24 & 255 )) $(( off >> 16 & 255 )) \
        $(( off >> 8 & 255 )) $(( off & 255 )) $(( len >> 8 & 255 )) \
        $(( len & 255 ))
}
ops_a ()
{
    op 0 0 256; op 0 10 1; op 1 20 64; op 2 50 300; op 5 0 0; op 6 0 0
    op 3 60 32; op 4 0 512; op 135 90 4000; op 0 99 3; op 8 0 0; op 5 0 0
}
ops_b ()
{
    op 2 0 65535; op 0 1 100; op 6 0 0; op 4 1 256; op 7 0 0; op 0 0 16
}
n=0
for f in "$out/read"/*; do
    name="$(basename "$f")"
    n=$((n + 1))
    if [ $((n % 2)) = 0 ]; then ops=ops_a; else ops=ops_b; fi
    { cat "$f"; $ops; } > "$tmp/w"
    oplen=$(( $(stat -c %s "$tmp/w") - $(stat -c %s "$f") ))
    { cat "$tmp/w"; bytes $(( oplen >> 8 )) $(( oplen & 255 )); } \
        > "$out/write/$name"
done

echo "seeds: $(ls "$out/read" | wc -l) read, $(ls "$out/write" | wc -l)" \
     "write, $(ls "$out/header" | wc -l) header in $out"
