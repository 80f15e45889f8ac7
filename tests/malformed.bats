#!/usr/bin/env bats
# Malformed qcow2 images: the plugin must never crash or hang.  For each
# image it must either refuse to start, with an error message naming the
# problem, or serve the image and fail with EIO only the reads that touch
# the broken part, while every intact region reads back correctly.
#
# The corpus is made once per file by tests/malformed/make-corpus.py (see
# its docstring for the layout of the base images the offsets below refer
# to, and its comments for what QEMU 7.2 says about each image).
#
# Every nbdkit runs in captive mode under `timeout 20`; exit status 124
# means a hang, >= 128 a crash.

bats_require_minimum_version 1.5.0
load helpers

setup_file ()
{
    export CORPUS="$BATS_FILE_TMPDIR/corpus"
    /usr/bin/python3 "$BATS_TEST_DIRNAME/malformed/make-corpus.py" "$CORPUS" \
        >&3 2>&3 || {
        echo "# make-corpus.py failed" >&3
        return 1
    }

    # The client side of the "serves with EIO" checks, run by nbdsh (h is
    # the connected handle).  Parameters come from the environment:
    #   Q2_REF    raw file with the expected guest contents
    #   Q2_BAD    comma-separated START:LENGTH byte ranges expected to fail
    #             with EIO (empty: everything must read correctly)
    #   Q2_CHUNK  read size (default 64 KiB, the cluster size of most bases)
    # It reads the whole disk chunk by chunk (so chunks after a broken one
    # are read too) and queries block status per chunk.
    export Q2_CHECK="$BATS_FILE_TMPDIR/check.py"
    cat > "$Q2_CHECK" <<'EOF'
import errno, os, sys

ref = open(os.environ["Q2_REF"], "rb").read()
chunk = int(os.environ.get("Q2_CHUNK", "65536"))
bad = []
for r in filter(None, os.environ.get("Q2_BAD", "").split(",")):
    s, n = (int(x, 0) for x in r.split(":"))
    bad.append((s, s + n))

def is_bad(off, n):
    return any(off < e and s < off + n for s, e in bad)

def describe(data):
    if not any(data):
        return "all zero bytes"
    return "bytes starting " + bytes(data[:8]).hex(" ")

def err(e):
    return "%s (errno %s = %s)" % (e.string.strip(), e.errnum,
                                   errno.errorcode.get(e.errnum, "?"))

problems, eio, bs_eio = [], [], []
size = h.get_size()
if size != len(ref):
    problems.append("export size is %d, expected %d" % (size, len(ref)))
size = min(size, len(ref))
dead = False
for off in range(0, size, chunk):
    n = min(chunk, size - off)
    want_eio = is_bad(off, n)
    try:
        data = h.pread(n, off)
    except nbd.Error as e:
        if want_eio and e.errnum == errno.EIO:
            eio.append(off)
        else:
            problems.append("pread [%#x, +%#x): %s; expected %s" % (
                off, n, err(e), "EIO" if want_eio else "the data"))
        if h.aio_is_dead() or h.aio_is_closed():
            problems.append("the connection died at offset %#x" % off)
            dead = True
            break
        continue
    if want_eio:
        problems.append("pread [%#x, +%#x) of the broken region succeeded "
                        "(expected EIO) and returned %s" % (off, n,
                                                            describe(data)))
    elif data != ref[off:off + n]:
        i = next(i for i in range(n) if data[i] != ref[off + i])
        problems.append("pread [%#x, +%#x) returned wrong data: first "
                        "difference at %#x: got %#04x, expected %#04x "
                        "(got %s)" % (off, n, off + i, data[i], ref[off + i],
                                      describe(data)))

# Block status must not fail (except with EIO on the broken part) and must
# not kill the server.
if not dead and h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        try:
            h.block_status(n, off, lambda *a: 0)
        except nbd.Error as e:
            if is_bad(off, n) and e.errnum == errno.EIO:
                bs_eio.append(off)
            else:
                problems.append("block_status [%#x, +%#x): %s" % (off, n,
                                                                   err(e)))
            if h.aio_is_dead() or h.aio_is_closed():
                problems.append("the connection died at offset %#x" % off)
                break

print("read %d bytes in chunks of %#x; pread EIO at [%s]; block_status EIO "
      "at [%s]" % (size, chunk, ", ".join("%#x" % o for o in eio),
                   ", ".join("%#x" % o for o in bs_eio)))
if problems:
    print("PROBLEMS:\n  " + "\n  ".join(problems))
    sys.exit(1)
EOF
}

setup ()
{
    [ -e "$PLUGIN" ] || skip "plugin not built: $PLUGIN"
}

# ---------------------------------------------------------------------------
# Running nbdkit.

# run_nbdkit RUNCMD NBDKIT-ARGS...: captive nbdkit under timeout 20 with
# --run RUNCMD; sets $status, $output (stdout), $stderr and $started (yes
# if nbdkit got as far as starting RUNCMD).  Under SANITIZE=1 the helpers'
# nbdkit wrapper function is used inside the timeout.  Output goes to files
# and whatever is left in timeout's process group afterwards (say, the
# other half of nbdkit after a crash) is killed, so nothing can keep the
# test waiting.
run_nbdkit ()
{
    local runcmd="$1"; shift
    local out="$BATS_TEST_TMPDIR/nbdkit.out" err="$BATS_TEST_TMPDIR/nbdkit.err"
    local cmd=(nbdkit)
    if declare -F nbdkit >/dev/null; then
        cmd=(bash -c "$(declare -f nbdkit); nbdkit \"\$@\"" nbdkit)
    fi
    export Q2_MARK="$BATS_TEST_TMPDIR/started"
    rm -f "$Q2_MARK"
    # timeout puts itself in a new process group: pgid = its pid.
    Q2_ASAN_LIB="${Q2_ASAN_LIB:-}" timeout -k 5 20 \
        "${cmd[@]}" -U - "$@" --run "touch \"\$Q2_MARK\"; $runcmd" \
        </dev/null >"$out" 2>"$err" 3>&- &
    local pid=$!
    status=0
    wait "$pid" || status=$?
    kill -KILL -- "-$pid" 2>/dev/null || true
    output="$(cat "$out")"
    stderr="$(cat "$err")"
    started=no
    [ ! -e "$Q2_MARK" ] || started=yes
}

# What was expected vs what happened, for the failure report.
diag ()
{
    {
        echo "case:     $BATS_TEST_DESCRIPTION"
        echo "image:    $img"
        echo "expected: $expected"
        echo "got:      exit status $status; nbdkit" \
             "$([ "$started" = yes ] && echo "started serving" ||
                echo "did not start serving")"
        echo "FAILED:   $*"
        echo "--- stdout (client) ---"
        printf '%s\n' "$output"
        echo "--- stderr (nbdkit and client) ---"
        printf '%s\n' "$stderr" | head -n 40
    } >&2
    return 1
}

# msg_matches REGEX: does nbdkit's stderr match REGEX (extended,
# case-insensitive) once file names are taken out?  The corpus files are
# named after their defect (l1-size-huge.qcow2, backing-loop-self.qcow2...)
# and the messages quote them, so the paths must not count as a match.
msg_matches ()
{
    sed -E "s#[^[:space:]'\"]*\.qcow2##g; s#/[^[:space:]'\":]*##g" \
        <<<"$stderr" | grep -Eiq -- "$1"
}

# No hang, no crash, no sanitizer report.
check_sane ()
{
    [ "$status" -ne 124 ] && [ "$status" -ne 137 ] ||
        diag "nbdkit hung (killed by timeout 20)" || return 1
    [ "$status" -lt 128 ] ||
        diag "nbdkit crashed (exit status $status = signal $((status - 128)))" ||
        return 1
    ! grep -Eq 'AddressSanitizer|LeakSanitizer|runtime error:' <<<"$stderr" ||
        diag "sanitizer report on stderr" || return 1
}

# expect_refused IMG REGEX [NBDKIT-ARGS...]: nbdkit must exit non-zero
# before serving, with a message matching REGEX (extended, case-insensitive).
expect_refused ()
{
    img="$CORPUS/$1"; local re="$2"; shift 2
    expected="nbdkit refuses to start (exit status != 0) with an error"
    expected+=" matching /$re/i on stderr"
    run_nbdkit 'nbdcopy "$uri" null:' "$@" "$PLUGIN" file="$img"
    check_sane || return 1
    [ "$started" = no ] ||
        diag "nbdkit started serving the image instead of refusing" || return 1
    [ "$status" -ne 0 ] || diag "nbdkit exited with status 0" || return 1
    msg_matches "$re" ||
        diag "the error message (file names removed) does not match" \
             "/$re/i" || return 1
}

# expect_refused_rw IMG REGEX: like expect_refused, but for a read-write
# open (on a copy of the image).  Refusing in .open, once the plugin knows
# the open is read-write, also counts: then the client cannot connect, and
# the message must still be on stderr.
expect_refused_rw ()
{
    img="$BATS_TEST_TMPDIR/$1"; local re="$2"
    cp "$CORPUS/$1" "$img"
    expected="nbdkit (read-write) refuses the image, at startup or when the"
    expected+=" client connects, with an error matching /$re/i on stderr"
    run_nbdkit 'nbdsh -u "$uri" -c "print(\"connected\")"' "$PLUGIN" file="$img"
    check_sane || return 1
    [ "$status" -ne 0 ] ||
        diag "nbdkit served the image read-write without error" || return 1
    ! grep -qx connected <<<"$output" ||
        diag "a client connected; expected a refusal" || return 1
    msg_matches "$re" ||
        diag "the error message (file names removed) does not match" \
             "/$re/i" || return 1
}

# run_eio_check IMG REF BAD [NBDKIT-ARGS...]: serve IMG and run the client
# checks of check.py against REF with the broken ranges BAD.
run_eio_check ()
{
    img="$CORPUS/$1"; export Q2_REF="$CORPUS/$2" Q2_BAD="$3"; shift 3
    if [ -n "$Q2_BAD" ]; then
        expected="nbdkit serves the image; reads overlapping $Q2_BAD fail"
        expected+=" with EIO; all other data matches $(basename "$Q2_REF")"
    else
        expected="nbdkit serves the image and all data matches"
        expected+=" $(basename "$Q2_REF")"
    fi
    run_nbdkit "nbdsh --base-allocation -u \"\$uri\" -c \"exec(open('\$Q2_CHECK').read())\"" \
        "$@" "$PLUGIN" file="$img"
}

assert_eio_ok ()
{
    check_sane || return 1
    [ "$started" = yes ] ||
        diag "nbdkit refused to serve the image" || return 1
    [ "$status" -eq 0 ] ||
        diag "the client checks failed (see PROBLEMS / the traceback)" ||
        return 1
}

# expect_eio IMG REF BAD [NBDKIT-ARGS...]: nbdkit serves IMG; reads of the
# ranges in BAD (START:LEN,...) fail with EIO, the rest matches REF.
expect_eio ()
{
    run_eio_check "$@"
    assert_eio_ok
}

expect_serves ()
{
    local i="$1" r="$2"; shift 2
    expect_eio "$i" "$r" "" "$@"
}

# expect_refused_or_eio IMG REGEX REF BAD: either outcome of the contract
# (read-only open).
expect_refused_or_eio ()
{
    local re="$2"
    run_eio_check "$1" "$3" "$4" -r
    if [ "$started" = yes ]; then
        assert_eio_ok
        return
    fi
    expected="either a refusal at startup with an error matching /$re/i,"
    expected+=" or serving with EIO only on [${4:-nothing}]"
    check_sane || return 1
    [ "$status" -ne 0 ] || diag "nbdkit exited with status 0" || return 1
    msg_matches "$re" ||
        diag "nbdkit refused, but the error message (file names removed)" \
             "does not match /$re/i" ||
        return 1
}

# Keywords (the plugin names qcow2 spec header fields in its messages).
KW_CLUSTER='cluster.?bits|cluster.?size'
KW_L1='l1'
KW_REFCOUNT='refcount'
KW_HDRLEN='header.?length'
KW_EXT='extension'
KW_BACKING='backing'
KW_COMPRESSION='compression'
KW_LOOP='loop|cycl|itself|recurs|too deep|depth'

# ---------------------------------------------------------------------------
# Sanity: the valid bases are served correctly (validates the harness).

@test "base v3 (data, compressed, zero clusters) serves correctly" {
    expect_serves base-v3.qcow2 base-v3.raw -r
}
@test "base v3 4k clusters serves correctly" {
    expect_serves base-v3-4k.qcow2 base-v3-4k.raw -r
}
@test "base v2 serves correctly" {
    expect_serves base-v2.qcow2 base-v2.raw -r
}
@test "base with internal snapshot serves the active layer" {
    expect_serves base-snap.qcow2 base-snap.raw -r
}
@test "base extended_l2 serves correctly" {
    expect_serves base-extl2.qcow2 base-extl2.raw -r
}
@test "base overlay with backing file serves correctly" {
    expect_serves base-overlay.qcow2 base-overlay.raw -r
}

# ---------------------------------------------------------------------------
# Header fields: refusal expected.

@test "bad magic: refused (magic)" {
    expect_refused magic-bad.qcow2 'magic' -r
}
@test "version 1: refused (version)" {
    expect_refused version-1.qcow2 'version' -r
}
@test "version 4: refused (version)" {
    expect_refused version-4.qcow2 'version' -r
}
@test "cluster_bits 8: refused (cluster_bits)" {
    expect_refused cluster-bits-8.qcow2 "$KW_CLUSTER" -r
}
@test "cluster_bits 22: refused (cluster_bits)" {
    expect_refused cluster-bits-22.qcow2 "$KW_CLUSTER" -r
}
@test "cluster_bits 30: refused (cluster_bits)" {
    expect_refused cluster-bits-30.qcow2 "$KW_CLUSTER" -r
}
@test "cluster_bits 255: refused (cluster_bits)" {
    expect_refused cluster-bits-255.qcow2 "$KW_CLUSTER" -r
}
@test "l1_size 0x7fffffff: refused (l1)" {
    expect_refused l1-size-huge.qcow2 "$KW_L1" -r
}
@test "l1_size 0x20000001 (32-bit byte-count wrap): refused (l1)" {
    expect_refused l1-size-wrap.qcow2 "$KW_L1" -r
}
@test "l1_size too small for the virtual size: refused (l1)" {
    expect_refused l1-size-too-small.qcow2 "$KW_L1" -r
}
@test "l1_size 0 with a non-zero size: refused (l1)" {
    expect_refused l1-size-zero.qcow2 "$KW_L1" -r
}
@test "l1_table_offset unaligned: refused (l1)" {
    expect_refused l1-offset-unaligned.qcow2 "$KW_L1" -r
}
@test "l1_table_offset past EOF: refused (l1)" {
    expect_refused l1-offset-past-eof.qcow2 "$KW_L1" -r
}
@test "refcount_table_offset unaligned: refused (refcount)" {
    expect_refused_rw refcount-offset-unaligned.qcow2 "$KW_REFCOUNT"
}
@test "refcount_table_offset past EOF: refused (refcount)" {
    expect_refused_rw refcount-offset-past-eof.qcow2 "$KW_REFCOUNT"
}
@test "refcount_table_clusters 0xffffffff: refused (refcount)" {
    expect_refused_rw refcount-clusters-huge.qcow2 "$KW_REFCOUNT"
}
@test "refcount_table_clusters 0x10001 (32-bit byte-count wrap): refused (refcount)" {
    expect_refused_rw refcount-clusters-wrap.qcow2 "$KW_REFCOUNT"
}
@test "refcount_table_clusters 0: refused (refcount)" {
    expect_refused_rw refcount-clusters-zero.qcow2 "$KW_REFCOUNT"
}
@test "header_length 96 (< 104): refused (header_length)" {
    expect_refused header-length-short.qcow2 "$KW_HDRLEN" -r
}
@test "header_length 108 (not a multiple of 8): refused (header_length)" {
    expect_refused header-length-unaligned.qcow2 "$KW_HDRLEN" -r
}
@test "header_length larger than the cluster: refused (header_length)" {
    expect_refused header-length-past-cluster.qcow2 "$KW_HDRLEN" -r
}
@test "header extension length 0xffffff00: refused (extension)" {
    expect_refused ext-length-huge.qcow2 "$KW_EXT" -r
}
@test "header extension running past cluster 0: refused (extension)" {
    expect_refused ext-past-cluster.qcow2 "$KW_EXT" -r
}
@test "backing_file_offset past cluster 0: refused (backing)" {
    expect_refused backing-offset-past-cluster.qcow2 "$KW_BACKING" -r
}
@test "backing file name running past cluster 0: refused (backing)" {
    expect_refused backing-name-past-cluster.qcow2 "$KW_BACKING" -r
}
@test "backing_file_size 1024 (> 1023): refused (backing)" {
    expect_refused backing-size-1024.qcow2 "$KW_BACKING" -r
}
@test "compression_type 1 without incompatible bit 3: refused (compression)" {
    expect_refused compression-type-without-bit.qcow2 "$KW_COMPRESSION" -r
}
@test "incompatible bit 3 with compression_type 0: refused (compression)" {
    expect_refused compression-bit-with-zlib.qcow2 "$KW_COMPRESSION" -r
}
@test "compression_type 2: refused (compression)" {
    expect_refused compression-type-2.qcow2 "$KW_COMPRESSION" -r
}
@test "unknown incompatible bit 10 named in the feature table: refused with the name" {
    expect_refused incompat-bit10-named.qcow2 'nbdkit-test-frobnicator' -r
}
@test "unknown incompatible bit 10 without a name: refused (incompatible feature)" {
    expect_refused incompat-bit10-unnamed.qcow2 'incompatib|feature' -r
}
@test "crypt_method 1 (AES) without a key: refused (encrypt)" {
    expect_refused encrypted-aes.qcow2 'encrypt' -r
}
@test "crypt_method 2 (LUKS) without its header extension: refused (crypt)" {
    expect_refused encrypted-luks-no-header.qcow2 'crypt|luks' -r
}

# ---------------------------------------------------------------------------
# Backing chains.

@test "backing file is the image itself: refused (loop)" {
    expect_refused backing-loop-self.qcow2 "$KW_LOOP" -r
}
@test "two images backing each other: refused (loop)" {
    expect_refused backing-loop-pair.qcow2 "$KW_LOOP" -r
}
# Note: under SANITIZE=1 (ASan runtime preloaded into nbdkit), nbdkit 1.32
# on Debian 12 hangs in exit() after any error whose text comes from
# strerror/dlerror (p11-kit's destructor deadlocks in freelocale), e.g.
# `LD_PRELOAD=$(gcc -print-file-name=libasan.so) nbdkit -U - file /nonexistent`.
# This case hits it ("No such file or directory"): a timeout here under
# SANITIZE=1 is that environment problem, not the plugin.
@test "backing file does not exist: refused (backing)" {
    expect_refused backing-missing.qcow2 "$KW_BACKING" -r
}

# ---------------------------------------------------------------------------
# L1 entries (base-v3-4k: L1[1] covers guest 2M..4M).  Refusing at startup
# (message naming the L1/L2 table) or serving with EIO on 2M..4M are both
# acceptable.

@test "L1 entry unaligned: refused (l1/l2) or EIO on its 2 MiB only" {
    expect_refused_or_eio l1-entry-unaligned.qcow2 'l1|l2' base-v3-4k.raw \
        0x200000:0x200000
}
@test "L1 entry past EOF: refused (l1/l2) or EIO on its 2 MiB only" {
    expect_refused_or_eio l1-entry-past-eof.qcow2 'l1|l2' base-v3-4k.raw \
        0x200000:0x200000
}
@test "L1 entry with reserved bit 56: refused (l1/l2) or EIO on its 2 MiB only" {
    expect_refused_or_eio l1-entry-reserved-bits.qcow2 'l1|l2' base-v3-4k.raw \
        0x200000:0x200000
}

# ---------------------------------------------------------------------------
# L2 entries and compressed clusters (base-v3): serve, EIO on one cluster.

@test "L2 entry pointing at the L1 table's cluster: EIO on guest cluster 1 only" {
    expect_eio l2-entry-at-l1-table.qcow2 base-v3.raw 0x10000:0x10000 -r
}
@test "L2 entry pointing at the refcount table's cluster: EIO on guest cluster 1 only" {
    expect_eio l2-entry-at-refcount-table.qcow2 base-v3.raw 0x10000:0x10000 -r
}
@test "L2 entry past EOF: EIO on guest cluster 1 only" {
    expect_eio l2-entry-past-eof.qcow2 base-v3.raw 0x10000:0x10000 -r
}
@test "L2 entry unaligned: EIO on guest cluster 1 only" {
    expect_eio l2-entry-unaligned.qcow2 base-v3.raw 0x10000:0x10000 -r
}
@test "L2 entry with reserved bit 56: EIO on guest cluster 1 only" {
    expect_eio l2-entry-reserved-bits.qcow2 base-v3.raw 0x10000:0x10000 -r
}
@test "compressed cluster data past EOF: EIO on guest cluster 2 only" {
    expect_eio compressed-past-eof.qcow2 base-v3.raw 0x20000:0x10000 -r
}
@test "compressed cluster data is garbage: EIO on guest cluster 2 only" {
    expect_eio compressed-garbage.qcow2 base-v3.raw 0x20000:0x10000 -r
}
@test "extended L2 bitmap with alloc and zero bits both set: EIO on guest cluster 1 only" {
    expect_eio extl2-alloc-and-zero.qcow2 base-extl2.raw 0x10000:0x10000 -r
}
@test "extended L2 entries with bit 0 set are valid: served, written, still clean" {
    local tool="$BATS_TEST_DIRNAME/../tools/qcow2-tool"
    [ "${SANITIZE:-}" != 1 ] || tool="$BATS_TEST_DIRNAME/../build-san/qcow2-tool"
    img="$BATS_TEST_TMPDIR/t.qcow2"
    cp "$CORPUS/extl2-bit0.qcow2" "$img"
    qemu-img check "$img"
    start_nbdkit "$PLUGIN" file="$img"
    qemu-img compare -f raw -F raw "$uri" "$CORPUS/base-extl2.raw"
    nbdsh -u "$uri" -c '
h.pwrite(b"\x44" * 1024, 512)          # allocated cluster 0, in place
h.pwrite(b"\x45" * 1024, 0x30000)      # empty cluster 3, allocates'
    stop_nbdkit
    qemu-img check "$img"
    ! qemu-img info "$img" | grep -q 'corrupt: true'
    "$tool" check "$img"
    run qemu-io -f qcow2 -c 'read -P 0x71 0 512' -c 'read -P 0x44 512 1k' \
        -c 'read -P 0x71 1536 64000' -c 'read -P 0x45 0x30000 1k' \
        -c 'read -P 0 0x30400 63k' "$img"
    [ "$status" -eq 0 ] && ! grep -qiE 'fail|error' <<<"$output" ||
        { echo "$output" >&3; false; }
}

# ---------------------------------------------------------------------------
# Snapshot table: it does not hold guest data of the active layer, so
# refusing (message naming the snapshot table) or serving the active layer
# correctly are both acceptable.

@test "snapshot table past EOF: refused (snapshot) or served correctly" {
    expect_refused_or_eio snapshot-table-past-eof.qcow2 'snapshot' \
        base-snap.raw ""
}
@test "nb_snapshots 0xffffffff: refused (snapshot) or served correctly" {
    expect_refused_or_eio snapshot-count-huge.qcow2 'snapshot' \
        base-snap.raw ""
}

# ---------------------------------------------------------------------------
# Dirty and corrupt bits.

@test "dirty bit: read-only serve works and data is correct" {
    expect_serves dirty-bit.qcow2 base-v3.raw -r
}
@test "corrupt bit: read-only serve works and data is correct" {
    expect_serves corrupt-bit.qcow2 base-v3.raw -r
}
@test "corrupt bit: a read-write open is refused or the export is read-only" {
    img="$BATS_TEST_TMPDIR/corrupt-bit.qcow2"
    cp "$CORPUS/corrupt-bit.qcow2" "$img"
    expected="refusal mentioning 'corrupt', or a read-only export / failing"
    expected+=" writes; never a successful write"
    run_nbdkit 'nbdsh -u "$uri" -c "
import errno
if h.is_read_only():
    print(\"read-only\")
else:
    h.set_strict_mode(0)
    try:
        h.pwrite(b\"x\" * 512, 0)
        print(\"WRITE SUCCEEDED\")
    except nbd.Error as e:
        print(\"write failed:\", e.string)
"' "$PLUGIN" file="$img"
    check_sane || return 1
    if [ "$started" = no ] || ! grep -q 'read-only\|write failed\|WRITE' \
            <<<"$output"; then
        msg_matches 'corrupt' ||
            diag "refused without mentioning 'corrupt'" || return 1
    else
        ! grep -q 'WRITE SUCCEEDED' <<<"$output" ||
            diag "a write to an image with the corrupt bit succeeded" ||
            return 1
    fi
}
