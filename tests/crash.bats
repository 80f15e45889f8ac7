#!/usr/bin/env bats
# Crash consistency: nbdkit is killed with SIGKILL while a client writes.
# Afterwards qemu-img check must find no corruption (leaked clusters are
# acceptable: rc 3), and every 512 B sector must hold what the last
# completed flush promised or a value written after that flush.
#
# Reproduce round R of a test by hand: the failure output names the image
# options, the seed and the sleep; the writer is
#   tests/tools/crashwriter.py write URI journal --seed SEED --size 67108864
# and the checker
#   tests/tools/crashwriter.py check journal image.raw initial.raw

bats_require_minimum_version 1.5.0
load helpers

CW="$BATS_TEST_DIRNAME/tools/crashwriter.py"
SIZE=$((64 << 20))

teardown () { stop_nbdkit; }

# crash_round OPTS SEED [BACKING]
crash_round ()
{
    local opts="$1" seed="$2" d="$BATS_TEST_TMPDIR/r$2"
    mkdir -p "$d"
    local img="$d/img.qcow2" journal="$d/journal" out rc=0 wpid pid
    qemu-img create -q -f qcow2 -o "$opts" "$img" $SIZE
    # uniform 512 B sectors everywhere (the checker wants uniform sectors)
    qemu-io -f qcow2 -c 'write -P 0x5a 0 4M' -c 'write -P 0x6b 8M 3M' \
        -c 'write -P 0x7c 20M 1M' -c 'write -z 21M 1M' "$img" >/dev/null
    qemu-img convert -O raw "$img" "$d/initial.raw"

    RANDOM=$seed
    local ms=$(( 200 + RANDOM % 1300 ))
    local sleep_s; sleep_s="$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))"

    start_nbdkit "$PLUGIN" file="$img"
    pid="$(cat "$pidfile")"
    /usr/bin/python3 "$CW" write "$uri" "$journal" --seed "$seed" \
        --size $SIZE --flush-every 20 2>"$d/writer.log" &
    wpid=$!
    sleep "$sleep_s"
    kill -9 "$pid"
    wait "$wpid" || { echo "writer failed:" >&3; cat "$d/writer.log" >&3; return 1; }
    rm -f "$sock" "$pidfile"
    local info="round: opts=$opts seed=$seed sleep=$sleep_s; $(cat "$d/writer.log")"
    if grep -qE 'ERROR: AddressSanitizer|runtime error:' "$nbdkit_log"; then
        echo "$info" >&3; cat "$nbdkit_log" >&3; return 1
    fi

    out="$(qemu-img check "$img" 2>&1)" || rc=$?
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ]; then
        echo "$info" >&3
        echo "qemu-img check rc=$rc (corruption):" >&3
        echo "$out" | grep -v '^Leaked cluster' | head -40 >&3
        return 1
    fi
    if [ "$rc" -eq 3 ]; then
        echo "# $opts seed=$seed: leaks only: $(grep -o '[0-9]* leaked clusters' <<<"$out")" >&3
    fi
    qemu-img convert -O raw "$img" "$d/after.raw" || {
        echo "$info" >&3; echo "qemu-img convert failed after the crash" >&3; return 1; }
    out="$(/usr/bin/python3 "$CW" check "$journal" "$d/after.raw" "$d/initial.raw")" || {
        echo "$info" >&3; echo "$out" >&3; return 1; }
    rm -rf "$d"
}

crash_rounds ()
{
    local opts="$1" seed; shift
    for seed in "$@"; do
        crash_round "$opts" "$seed" || return 1
    done
}

@test "crash: v2 (compat=0.10), 5 rounds" {
    crash_rounds compat=0.10 1001 1002 1003 1004 1005
}

@test "crash: v3, 6 rounds" {
    crash_rounds compat=1.1 2001 2002 2003 2004 2005 2006
}

@test "crash: 512 B clusters, 5 rounds" {
    crash_rounds cluster_size=512 3001 3002 3003 3004 3005
}

@test "crash: extended_l2=on, 5 rounds" {
    crash_rounds extended_l2=on 4001 4002 4003 4004 4005
}

@test "clients that die with writes in flight leave a consistent image" {
    # nbdkit 1.32 itself may abort when a reply goes to a socket another
    # thread has closed ("raw_send_socket: Assertion `sock >= 0'"), with
    # its own file plugin too; either way the image must stay consistent.
    local base="$BATS_TEST_TMPDIR/b.qcow2" img="$BATS_TEST_TMPDIR/t.qcow2"
    local i ok=0 ab="$BATS_TEST_DIRNAME/tools/abrupt.py"
    qemu-img create -q -f qcow2 "$base" 64M
    qemu-io -f qcow2 -c 'write -P 0x11 0 64M' "$base" >/dev/null
    qemu-img create -q -f qcow2 -b "$base" -F qcow2 "$img"
    for i in $(seq 1 30); do
        # Restart nbdkit when it has died (a zombie counts as dead: the
        # daemon may not be reaped here).
        [ -s "${pidfile:-}" ] &&
            [[ "$(ps -o stat= -p "$(cat "$pidfile")")" =~ ^[^Z] ]] ||
            start_nbdkit "$PLUGIN" file="$img"
        /usr/bin/python3 "$ab" "$uri" "$i" 2>/dev/null & a=$!
        /usr/bin/python3 "$ab" "$uri" $((i + 100)) 2>/dev/null && ok=$((ok + 1))
        wait $a && ok=$((ok + 1))
    done
    stop_nbdkit || true
    echo "# $ok of 60 clients connected" >&3
    # Clients connect unless nbdkit died under the other one of the pair.
    [ "$ok" -ge 40 ] || { echo "only $ok of 60 clients connected" >&3; false; }
    run qemu-img check "$img"
    [ "$status" -eq 0 ] || [ "$status" -eq 3 ] || { echo "$output" >&3; false; }
    [[ ! "$output" =~ ERROR ]]
    # The backing file holds 0x11 and the writers never write zeros: a
    # zero byte would be a cluster linked before its data was written.
    qemu-img convert -O raw "$img" "$BATS_TEST_TMPDIR/t.raw"
    /usr/bin/python3 - "$BATS_TEST_TMPDIR/t.raw" <<'PY'
import sys
with open(sys.argv[1], "rb") as f:
    off = 0
    while True:
        b = f.read(65536)
        if not b:
            break
        assert b.find(0) < 0, "zeros at %#x" % (off + b.find(0))
        off += len(b)
PY
}

# Power failure, not just SIGKILL: between two fdatasyncs the disk may
# keep any subset of the writes.  tests/tools/writelog.c logs the
# plugin's writes and syncs, and write-order.py then checks that every
# pointer written (L1 -> L2 table, refcount table -> block, L2 -> data)
# only pointed at clusters whose first write was already synced.
# Each sequence gets metadata written back by cache eviction (a tiny L2
# cache, or the refcount scan of the first block-status request) before
# the flush that writes the pointer.
# write_order_run IMG KIND SEQ [PLUGIN ARGS...]: KIND (l1, reftable) is
# the pointer the sequence must make the plugin write at least once.
write_order_run ()
{
    local img="$1" kind="$2" seq="$3"; shift 3
    local log="$BATS_TEST_TMPDIR/write.log" preload
    gcc -O2 -shared -fPIC -o "$BATS_TEST_TMPDIR/writelog.so" \
        "$BATS_TEST_DIRNAME/tools/writelog.c" -ldl -lpthread
    cp "$img" "$BATS_TEST_TMPDIR/orig.qcow2"
    : > "$log"
    preload="$BATS_TEST_TMPDIR/writelog.so"
    [ "${SANITIZE:-}" != 1 ] || preload="$Q2_ASAN_LIB $preload"
    printf '%s\n' "$seq" > "$BATS_TEST_TMPDIR/seq.py"
    CRASHLOG="$log" CRASHFILES="$img" LD_PRELOAD="$preload" \
        ASAN_OPTIONS="detect_leaks=0" command nbdkit -U - "$PLUGIN" \
        file="$img" "$@" \
        --run "/usr/bin/python3 $BATS_TEST_TMPDIR/seq.py \"\$uri\""
    run /usr/bin/python3 "$BATS_TEST_DIRNAME/tools/write-order.py" "$log" \
        "$BATS_TEST_TMPDIR/orig.qcow2"
    echo "$output"
    [ "$status" = 0 ]
    # The pointer in question was written and checked (a check of
    # nothing would pass too).
    [[ "$output" =~ CHECKED:.*\ ?$kind=([0-9]+) ]]
    [ "${BASH_REMATCH[1]}" -ge 1 ]
}

@test "power failure: a new refcount block is synced before the refcount table points at it" {
    cd "$BATS_TEST_TMPDIR"
    # 512 B clusters, 64-bit refcounts: one refcount block per 32 KiB of
    # file, more than the 64 cached slices.
    qemu-img create -q -f raw base.raw 3M
    qemu-io -f raw -c "write -P 0x5a 0 3M" base.raw >/dev/null
    qemu-img convert -O qcow2 -o cluster_size=512,refcount_bits=64 base.raw img.qcow2
    qemu-img resize -q img.qcow2 8M
    write_order_run "$PWD/img.qcow2" reftable '
import nbd, sys
h = nbd.NBD(); h.add_meta_context("base:allocation"); h.connect_uri(sys.argv[1])
h.pwrite(b"\x42" * 65536, 4 << 20)      # new refcount blocks at the end
h.block_status(65536, 0, lambda *a: 0)  # the refcount scan evicts them
h.flush()
h.shutdown()'
}

@test "power failure: a new L2 table is synced before the L1 table points at it" {
    cd "$BATS_TEST_TMPDIR"
    qemu-img create -q -f raw base.raw 8M
    qemu-io -f raw -c "write -P 0x5a 0 8M" base.raw >/dev/null
    qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 \
        -b "$PWD/base.raw" -F raw img.qcow2 8M
    qemu-io -f qcow2 -c "write -P 0x33 0 3M" img.qcow2 >/dev/null
    write_order_run "$PWD/img.qcow2" l1 '
import nbd, sys
h = nbd.NBD(); h.add_meta_context("base:allocation"); h.connect_uri(sys.argv[1])
span = 32768                            # one L2 table, 512 B clusters
h.zero(4096, 100 * span)                # a new L2 table of zero entries
h.block_status(65536, 0, lambda *a: 0)  # evicts the refcount slice
for i in range(3):                      # evict the new table (2 slices)
    h.pread(512, i * span)
h.flush()
h.shutdown()' l2-cache-size=1024

    # The same through copy-on-write of L2 tables shared with a snapshot.
    rm -f img.qcow2 base.raw
    qemu-img create -q -f raw base.raw 1M
    qemu-io -f raw -c "write -P 0x5a 0 1M" base.raw >/dev/null
    qemu-img convert -O qcow2 -o cluster_size=512 base.raw img.qcow2
    qemu-img snapshot -c s1 img.qcow2
    write_order_run "$PWD/img.qcow2" l1 '
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
span = 32768
h.zero(512, 512)
h.zero(512, 4 * span + 512)
for i in range(3):
    h.pread(512, 8 * span + i * span)
h.flush()
h.shutdown()' l2-cache-size=1024
}

@test "power failure: a snapshot apply that grows the L1 table switches its size and offset in one write" {
    cd "$BATS_TEST_TMPDIR"
    local tool="$BATS_TEST_DIRNAME/../tools/qcow2-tool"
    [ "${SANITIZE:-}" != 1 ] || tool="$BATS_TEST_DIRNAME/../build-san/qcow2-tool"
    qemu-img create -q -f qcow2 g.qcow2 4G
    qemu-io -c 'write -P 0x11 3G 64k' g.qcow2 >/dev/null
    qemu-img snapshot -c s1 g.qcow2
    # The active image shrinks to 16 MiB with a one-entry L1 table, so
    # applying s1 (8 entries) needs a new, bigger L1 table.
    /usr/bin/python3 -c '
import struct, sys
f = open(sys.argv[1], "r+b")
f.seek(24); f.write(struct.pack(">Q", 16 << 20))
f.seek(36); f.write(struct.pack(">I", 1))' g.qcow2
    gcc -O2 -shared -fPIC -o writelog.so \
        "$BATS_TEST_DIRNAME/tools/writelog.c" -ldl -lpthread
    : > write.log
    CRASHLOG="$PWD/write.log" CRASHFILES="$PWD/g.qcow2" \
        LD_PRELOAD="${Q2_ASAN_LIB:+$Q2_ASAN_LIB }$PWD/writelog.so" \
        ASAN_OPTIONS=detect_leaks=0 "$tool" snapshot -a s1 g.qcow2
    # Every header write touching l1_size (36) or l1_table_offset (40)
    # covers both.
    run -0 /usr/bin/python3 - write.log <<'PY'
import struct, sys
d = open(sys.argv[1], "rb").read()
rec, pos, seen = struct.Struct("<IIIIQQQ"), 0, 0
while pos < len(d):
    _, t, _, _, off, n, _ = rec.unpack_from(d, pos)
    pos += rec.size + (n if t == 1 else 0)
    if t == 1 and off < 48 and off + n > 36:
        seen += 1
        assert off <= 36 and off + n >= 48, "header write %d+%d" % (off, n)
assert seen, "no L1 header write logged"
PY
    run -0 qemu-io -r -c 'read -P 0x11 3G 64k' g.qcow2
    [[ "$output" != *"verification failed"* ]]
}
