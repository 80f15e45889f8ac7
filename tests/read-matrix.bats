#!/usr/bin/env bats
# Read path over a matrix of qcow2 images built by qemu: every image is
# served by the plugin and compared with qemu (data, allocation map, size).

bats_require_minimum_version 1.5.0
load helpers
load read-helpers

M=$((1024 * 1024))

build_matrix ()
{
    local d="$BATS_FILE_TMPDIR" s=$((64 * M)) c v name compat

    # compat x cluster size, with the standard workload.
    for v in 2 3; do
        for c in 512 4096 65536 2097152; do
            [ $v = 2 ] && compat=0.10 || compat=1.1
            wl_std $c $s $v
            mkimg "$d/v$v-$c.qcow2" "compat=$compat,cluster_size=$c" $s "${WL[@]}"
        done
    done

    # refcount widths (16 is the default, covered above).
    wl_std 4096 $s 3
    mkimg "$d/rc1.qcow2" "refcount_bits=1,cluster_size=4096" $s "${WL[@]}"
    wl_std 65536 $s 3
    mkimg "$d/rc64.qcow2" "refcount_bits=64" $s "${WL[@]}"

    # extended L2 with subcluster writes.
    for c in 65536 2097152; do
        wl_std $c $s 3; wl_subcluster $c 24
        mkimg "$d/xl2-$c.qcow2" "extended_l2=on,cluster_size=$c" $s "${WL[@]}"
    done

    # single compressed clusters among normal ones (qemu-io write -c),
    # plus a partial overwrite of a compressed cluster.
    for name in zlib zstd; do
        for c in 512 65536 2097152; do
            local b=40; [ $c = 2097152 ] && b=22    # clear of wl_std's writes
            wl_std $c $s 3
            WL+=(-c "write -c -P 0x91 $((b * c)) $c"
                 -c "write -c -P 0x92 $(((b + 1) * c)) $((2 * c))"
                 -c "write -c -P 0x93 $(((b + 4) * c)) $c"
                 -c "write -c -P 0x95 $(((b + 5) * c)) $c"
                 -c "write -P 0x94 $(((b + 1) * c + 100)) 200"
                 -c "write -z -u $(((b + 2) * c)) $c"
                 -c "discard $(((b + 4) * c)) $c")
            mkimg "$d/$name-w-$c.qcow2" "compression_type=$name,cluster_size=$c" $s "${WL[@]}"
        done
    done

    # whole images converted with -c, mixed compressibility, then a few
    # writes over the compressed clusters.
    mkraw "$d/src.raw" $s
    for name in zlib zstd; do
        for c in 512 65536 2097152; do
            qemu-img convert -c -f raw -O qcow2 \
                -o "compression_type=$name,cluster_size=$c" "$d/src.raw" "$d/$name-conv-$c.qcow2"
            qio "$d/$name-conv-$c.qcow2" \
                -c "write -P 0xa1 $((c + 100)) 300" \
                -c "write -z $((3 * c)) $c" \
                -c "discard $((4 * c)) $c" \
                -c "write -P 0xa2 $((s - 100)) 100"
        done
    done
    qemu-img convert -c -f raw -O qcow2 -o compat=0.10 "$d/src.raw" "$d/v2-conv.qcow2"

    # preallocation.
    for name in metadata falloc full; do
        wl_std 65536 $s 3
        mkimg "$d/pre-$name.qcow2" "preallocation=$name" $s "${WL[@]}"
    done

    # odd virtual sizes, data up to the last byte.
    local odd=$((100 * M + 4608))
    wl_std 65536 $odd 3
    mkimg "$d/odd-64k.qcow2" "" $odd "${WL[@]}" -c "write -P 0x77 $((odd - 70000)) 70000"
    wl_std 2097152 $odd 2
    mkimg "$d/odd-2M-v2.qcow2" "compat=0.10,cluster_size=2M" $odd "${WL[@]}" \
        -c "write -P 0x77 $((odd - 70000)) 70000"

    # lazy refcounts, clean and dirty (qemu-io abort leaves the dirty bit
    # set and the refcounts stale).
    wl_std 65536 $s 3
    mkimg "$d/lazy.qcow2" "lazy_refcounts=on" $s "${WL[@]}"
    mkimg "$d/lazy-dirty.qcow2" "lazy_refcounts=on" $s
    (ulimit -c 0; qemu-io -f qcow2 "${WL[@]}" -c abort "$d/lazy-dirty.qcow2") >/dev/null 2>&1 || true
    python3 -c 'import sys; f = open(sys.argv[1], "rb"); f.seek(72)
assert int.from_bytes(f.read(8), "big") & 1, "lazy-dirty.qcow2 is not dirty"' "$d/lazy-dirty.qcow2"

    # sparse 64 GiB with scattered writes.
    mkimg "$d/sparse64g.qcow2" "" 64G \
        -c "write -P 0xb1 0 65536" \
        -c "write -P 0xb2 $((1024 * M + 12345)) 10000" \
        -c "write -P 0xb3 $((17 * 1024 * M - 512)) 1024" \
        -c "write -z $((40 * 1024 * M)) $((1024 * M))" \
        -c "write -P 0xb4 $((40 * 1024 * M + 4096)) 4096" \
        -c "write -P 0xb5 $((64 * 1024 * M - 4096)) 4096"

    # many L2 tables: 4k clusters (an L2 table maps 2 MiB), 512 MiB,
    # a 4k write every ~1 MiB => 256 L2 tables.
    local i args=()
    for i in $(seq 0 511); do
        args+=(-c "write -P $((i % 251 + 1)) $((i * M + (i * 4096) % M)) 4096")
    done
    mkimg "$d/many-l2.qcow2" "cluster_size=4096" 512M "${args[@]}"
}

setup_file ()
{
    build_matrix
}

teardown ()
{
    stop_nbdkit
}

# ---- the matrix: compat x cluster size --------------------------------

@test "v2 (compat 0.10), 512-byte clusters" { check_captive "$BATS_FILE_TMPDIR/v2-512.qcow2"; }
@test "v2 (compat 0.10), 4k clusters"       { check_captive "$BATS_FILE_TMPDIR/v2-4096.qcow2"; }
@test "v2 (compat 0.10), 64k clusters"      { check_captive "$BATS_FILE_TMPDIR/v2-65536.qcow2"; }
@test "v2 (compat 0.10), 2M clusters"       { check_captive "$BATS_FILE_TMPDIR/v2-2097152.qcow2"; }
@test "v3 (compat 1.1), 512-byte clusters"  { check_captive "$BATS_FILE_TMPDIR/v3-512.qcow2"; }
@test "v3 (compat 1.1), 4k clusters"        { check_captive "$BATS_FILE_TMPDIR/v3-4096.qcow2"; }
@test "v3 (compat 1.1), 64k clusters"       { check_captive "$BATS_FILE_TMPDIR/v3-65536.qcow2"; }
@test "v3 (compat 1.1), 2M clusters"        { check_captive "$BATS_FILE_TMPDIR/v3-2097152.qcow2"; }

@test "refcount_bits=1" { check_captive "$BATS_FILE_TMPDIR/rc1.qcow2"; }
@test "refcount_bits=64" { check_captive "$BATS_FILE_TMPDIR/rc64.qcow2"; }

@test "extended_l2, 64k clusters (2k subclusters)" { check_captive "$BATS_FILE_TMPDIR/xl2-65536.qcow2"; }
@test "extended_l2, 2M clusters (64k subclusters)" { check_captive "$BATS_FILE_TMPDIR/xl2-2097152.qcow2"; }

# ---- compression -------------------------------------------------------

@test "zlib: compressed clusters written by qemu-io, 64k clusters" { check_captive "$BATS_FILE_TMPDIR/zlib-w-65536.qcow2"; }
@test "zstd: compressed clusters written by qemu-io, 64k clusters" { check_captive "$BATS_FILE_TMPDIR/zstd-w-65536.qcow2"; }
@test "zlib: compressed clusters written by qemu-io, 512-byte clusters" { check_captive "$BATS_FILE_TMPDIR/zlib-w-512.qcow2"; }
@test "zstd: compressed clusters written by qemu-io, 512-byte clusters" { check_captive "$BATS_FILE_TMPDIR/zstd-w-512.qcow2"; }
@test "zlib: compressed clusters written by qemu-io, 2M clusters" { check_captive "$BATS_FILE_TMPDIR/zlib-w-2097152.qcow2"; }
@test "zstd: compressed clusters written by qemu-io, 2M clusters" { check_captive "$BATS_FILE_TMPDIR/zstd-w-2097152.qcow2"; }

@test "zlib: qemu-img convert -c, 64k clusters" { check_captive "$BATS_FILE_TMPDIR/zlib-conv-65536.qcow2"; }
@test "zstd: qemu-img convert -c, 64k clusters" { check_captive "$BATS_FILE_TMPDIR/zstd-conv-65536.qcow2"; }
@test "zlib: qemu-img convert -c, 512-byte clusters" { check_captive "$BATS_FILE_TMPDIR/zlib-conv-512.qcow2"; }
@test "zstd: qemu-img convert -c, 512-byte clusters" { check_captive "$BATS_FILE_TMPDIR/zstd-conv-512.qcow2"; }
@test "zlib: qemu-img convert -c, 2M clusters" { check_captive "$BATS_FILE_TMPDIR/zlib-conv-2097152.qcow2"; }
@test "zstd: qemu-img convert -c, 2M clusters" { check_captive "$BATS_FILE_TMPDIR/zstd-conv-2097152.qcow2"; }
@test "v2 (compat 0.10): qemu-img convert -c" { check_captive "$BATS_FILE_TMPDIR/v2-conv.qcow2"; }

@test "compressed images really are compressed" {
    # Guards the images above against qemu silently writing plain clusters.
    local f
    for f in zlib-conv-65536 zstd-conv-512 zstd-conv-2097152 v2-conv zlib-w-512 zstd-w-2097152; do
        run -0 qemu-img check -U "$BATS_FILE_TMPDIR/$f.qcow2"
        [[ "$output" =~ [1-9][0-9.]*%\ compressed\ clusters ]] || { echo "$f: $output"; false; }
    done
    run -0 qemu-img info -U "$BATS_FILE_TMPDIR/zstd-conv-65536.qcow2"
    [[ "$output" == *"compression type: zstd"* ]]
}

# ---- preallocation, odd sizes, lazy refcounts --------------------------

@test "preallocation=metadata" { check_captive "$BATS_FILE_TMPDIR/pre-metadata.qcow2"; }
@test "preallocation=falloc"   { check_captive "$BATS_FILE_TMPDIR/pre-falloc.qcow2"; }
@test "preallocation=full"     { check_captive "$BATS_FILE_TMPDIR/pre-full.qcow2"; }

@test "odd virtual size (100M+4608), 64k clusters, data to the last byte" {
    local img="$BATS_FILE_TMPDIR/odd-64k.qcow2"
    serve_and_check "$img"
    nbdsh -u "$uri" -c '
sz = h.get_size()
assert sz == 100 * 1024 * 1024 + 4608, sz
assert h.pread(1, sz - 1) == b"\x77", h.pread(1, sz - 1)
assert h.pread(4608, sz - 4608) == b"\x77" * 4608'
}

@test "odd virtual size (100M+4608), 2M clusters, v2" { check_captive "$BATS_FILE_TMPDIR/odd-2M-v2.qcow2"; }

@test "lazy_refcounts=on" { check_captive "$BATS_FILE_TMPDIR/lazy.qcow2"; }
@test "lazy_refcounts=on, left dirty by a crash, read-only (-r)" {
    # Stale refcounts do not matter to a reader.
    check_captive "$BATS_FILE_TMPDIR/lazy-dirty.qcow2" -r
}

# ---- sparse 64 GiB ------------------------------------------------------

@test "sparse 64 GiB image: size, map, scattered reads, fast" {
    local img="$BATS_FILE_TMPDIR/sparse64g.qcow2"
    start_nbdkit "$PLUGIN" file="$img"
    assert_size "$img"
    SECONDS=0
    assert_map "$img"
    nbdsh -u "$uri" -c '
G = 1 << 30
M = 1 << 20
def chk(off, n, b):
    got = h.pread(n, off)
    assert got == bytes([b]) * n, "at %d: %r..." % (off, bytes(got[:16]))
chk(0, 65536, 0xb1)
chk(65536, M, 0)
chk(G + 12345 - 100, 100, 0)
chk(G + 12345, 10000, 0xb2)
chk(G + 22345, 100, 0)
chk(17 * G - 512, 1024, 0xb3)
chk(17 * G - 4096, 3584, 0)
chk(30 * G, 4 * M, 0)
chk(40 * G, 4096, 0)
chk(40 * G + 4096, 4096, 0xb4)
chk(40 * G + 8192, M, 0)
chk(64 * G - 4096, 4096, 0xb5)
chk(64 * G - 8192, 4096, 0)'
    # With block status the whole-disk compare only reads the data.
    run -0 timeout 60 qemu-img compare -U -f raw -F qcow2 "$uri" "$img"
    [ "$SECONDS" -le 30 ] || { echo "map + reads + compare took ${SECONDS}s"; false; }
}

# ---- server modes -------------------------------------------------------

@test "read-only server (-r): data and map match, export is read-only, image untouched" {
    local img="$BATS_FILE_TMPDIR/zstd-w-65536.qcow2" sum
    sum="$(md5sum <"$img")"
    start_nbdkit -r "$PLUGIN" file="$img"
    assert_served "$img"
    run -0 nbdinfo --is read-only "$uri"
    stop_nbdkit
    [ "$(md5sum <"$img")" = "$sum" ]
}

@test "--help mentions file= and l2-cache-size=" {
    run -0 nbdkit "$PLUGIN" --help
    [[ "$output" == *"file="* ]] || { echo "$output"; false; }
    [[ "$output" == *"l2-cache-size="* ]] || { echo "$output"; false; }
}

@test "--dump-plugin reports qcow2_zstd=yes" {
    run -0 nbdkit "$PLUGIN" --dump-plugin
    grep -qx 'qcow2_zstd=yes' <<<"$output" || { echo "$output"; false; }
}

@test "unknown parameter is refused" {
    run ! nbdkit_t -U - "$PLUGIN" file="$BATS_FILE_TMPDIR/v3-65536.qcow2" nosuch=1 --run 'nbdinfo --size "$uri"'
    [ "$status" -ne 124 ]
    [[ "$output" == *nosuch* ]] || { echo "$output"; false; }
}

@test "missing or nonexistent file is refused" {
    run ! nbdkit_t -U - "$PLUGIN" --run 'nbdinfo --size "$uri"'
    [ "$status" -ne 124 ]
    run ! nbdkit_t -U - "$PLUGIN" file="$BATS_FILE_TMPDIR/nonexistent.qcow2" --run 'nbdinfo --size "$uri"'
    [ "$status" -ne 124 ]
    [[ "$output" == *nonexistent.qcow2* ]] || { echo "$output"; false; }
}

# ---- L2 cache -----------------------------------------------------------

check_small_cache ()
{
    local img="$BATS_FILE_TMPDIR/many-l2.qcow2" ref="$BATS_FILE_TMPDIR/many-l2.raw"
    [ -s "$ref" ] || qemu-img convert -U -f qcow2 -O raw "$img" "$ref"
    serve_and_check "$img" l2-cache-size="$1"
    # Reads in a scattered order, so that the LRU keeps evicting.
    export REF="$ref"
    nbdsh -u "$uri" -c '
import os, random
ref = open(os.environ["REF"], "rb")
M = 1 << 20
offs = [i * M + (i * 4096) % M for i in range(512)] + [i * M // 3 for i in range(1536)]
random.Random(7).shuffle(offs)
for o in offs:
    for n in (4096, 5000):
        ref.seek(o); want = ref.read(n)
        got = h.pread(len(want), o)
        assert got == want, "mismatch at %d" % o'
}

@test "l2-cache-size=64K: multi-L2-table image reads identically" { check_small_cache 64K; }
@test "l2-cache-size=1: multi-L2-table image reads identically"   { check_small_cache 1; }

# ---- concurrency, block size, rotational --------------------------------

@test "multi-conn: advertised, and parallel multi-connection copies are correct" {
    local img="$BATS_FILE_TMPDIR/zstd-conv-65536.qcow2" t="$BATS_TEST_TMPDIR"
    start_nbdkit "$PLUGIN" file="$img"
    run -0 nbdinfo --can multi-conn "$uri"
    qemu-img convert -U -f qcow2 -O raw "$img" "$t/ref.raw"
    nbdcopy -C 2 --request-size=65536 "$uri" "$t/out1.raw" & local p1=$!
    nbdcopy -C 2 -T 2 "$uri" "$t/out2.raw" & local p2=$!
    wait $p1 || { echo "nbdcopy 1 failed"; nbdkit_diag; false; }
    wait $p2 || { echo "nbdcopy 2 failed"; nbdkit_diag; false; }
    cmp "$t/ref.raw" "$t/out1.raw"
    cmp "$t/ref.raw" "$t/out2.raw"
}

check_block_size ()
{
    start_nbdkit "$PLUGIN" file="$BATS_FILE_TMPDIR/$1"
    export WANT="$2"
    nbdsh -u "$uri" -c '
import os
mn, pref = h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED)
mx = h.get_block_size(nbd.SIZE_MAXIMUM)
print("min", mn, "preferred", pref, "max", mx)
assert mn == 1, mn
assert pref == int(os.environ["WANT"]), pref
assert mx == 0 or mx >= pref, mx
# nbdkit 1.32 refuses data requests over 64 MiB: the advertised maximum
# must be one it accepts, and a request of exactly that size must work.
assert 0 < mx <= 64 << 20, mx
n = min(mx, h.get_size())
assert len(h.pread(n, 0)) == n'
}

@test "block size: minimum 1, preferred = cluster size (64k)" { check_block_size v3-65536.qcow2 65536; }
@test "block size: preferred = cluster size (512)"            { check_block_size v3-512.qcow2 512; }
@test "block size: preferred = cluster size (4k)"             { check_block_size v2-4096.qcow2 4096; }
@test "block size: preferred = cluster size (2M)"             { check_block_size v3-2097152.qcow2 2097152; }

@test "not rotational" {
    start_nbdkit "$PLUGIN" file="$BATS_FILE_TMPDIR/v3-65536.qcow2"
    nbdsh -u "$uri" -c 'assert not h.is_rotational()'
}
