#!/usr/bin/env bats
# Image locking and the backing-file policy.

bats_require_minimum_version 1.5.0
load helpers

setup ()
{
    cd "$BATS_TEST_TMPDIR"
    qemu-img create -q -f qcow2 base.qcow2 16M
    qemu-io -f qcow2 -c 'write -P 0x11 0 1M' base.qcow2 >/dev/null
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
    qemu-io -f qcow2 -c 'write -P 0x22 4M 1M' top.qcow2 >/dev/null
}

teardown ()
{
    stop_nbdkit
    ! mountpoint -q "$BATS_TEST_TMPDIR/ro" || umount "$BATS_TEST_TMPDIR/ro"
}

@test "locking: QEMU cannot open an image we are writing" {
    start_nbdkit "$PLUGIN" top.qcow2
    nbdsh -u "$uri" -c 'h.pwrite(b"x" * 512, 0)'
    run ! qemu-io -f qcow2 -c 'read 0 512' top.qcow2
    [[ "$output" =~ "lock" ]]
    # Nor write the backing file we read from.
    run ! qemu-io -f qcow2 -c 'write 0 512' base.qcow2
    [[ "$output" =~ "lock" ]]
    # Shared access (qemu-img -U) still works.
    run -0 qemu-img info -U top.qcow2
}

@test "locking: a connection that cannot make the image writable leaves QEMU's locks held" {
    # The same file through a read-only bind mount: the plugin opens it,
    # the upgrade to read-write fails (EROFS), the export is read-only.
    mkdir ro
    { mount --bind "$BATS_TEST_TMPDIR" ro &&
          mount -o remount,bind,ro ro; } 2>/dev/null ||
        skip "cannot make a read-only bind mount here"
    start_nbdkit "$PLUGIN" file="$BATS_TEST_TMPDIR/ro/top.qcow2"
    run -2 nbdinfo --can write "$uri"
    # QEMU must still be kept from writing what we serve.
    run ! qemu-io -f qcow2 -c 'write -P 7 0 512' top.qcow2
    [[ "$output" =~ "lock" ]]
    nbdsh -u "$uri" -c 'assert h.pread(512, 4 << 20) == b"\x22" * 512'
}

@test "locking: we refuse an image QEMU is writing; locking=off overrides" {
    qemu-io -f qcow2 -c 'sleep 20000' top.qcow2 &
    qpid=$!
    for _ in $(seq 1 100); do
        qemu-img info top.qcow2 >/dev/null 2>&1 || break; sleep 0.05
    done
    run ! timeout_nbdkit 20 -U - "$PLUGIN" top.qcow2 --run 'nbdinfo --size "$uri"'
    [[ "$output" =~ "lock" ]]
    [[ "$output" =~ "locking=off" ]]
    run -0 timeout_nbdkit 20 -U - -r "$PLUGIN" top.qcow2 locking=off \
        --run 'nbdinfo --size "$uri"'
    [[ "$output" =~ 16777216 ]]
    kill "$qpid"; wait "$qpid" || true
}

@test "backing=none serves the image without its backing file" {
    nbdkit -U - -r "$PLUGIN" top.qcow2 backing=none --run '
      nbdsh -u "$uri" -c "assert h.pread(512, 0) == bytearray(512)" \
                      -c "assert h.pread(512, 4 << 20) == b\"\x22\" * 512"'
}

@test "backing=PATH replaces the backing file" {
    qemu-img create -q -f raw other.raw 16M
    qemu-io -f raw -c 'write -P 0x33 0 1M' other.raw >/dev/null
    nbdkit -U - -r "$PLUGIN" top.qcow2 backing=other.raw --run '
      nbdsh -u "$uri" -c "assert h.pread(512, 0) == b\"\x33\" * 512"'
}

@test "backing names that are not plain files are refused" {
    mkfifo fifo
    qemu-img create -q -f qcow2 -u -b fifo -F raw f.qcow2 1M
    run ! timeout_nbdkit 10 -U - "$PLUGIN" f.qcow2 --run true
    [ "$status" -ne 124 ]
    [[ "$output" =~ "not a regular file" ]]
    mkdir dir
    qemu-img create -q -f qcow2 -u -b dir -F raw d.qcow2 1M
    run ! timeout_nbdkit 10 -U - "$PLUGIN" d.qcow2 --run true
    [[ "$output" =~ "regular file" || "$output" =~ "directory" ]]
    qemu-img create -q -f qcow2 -u -b 'nbd://localhost/x' -F raw n.qcow2 1M
    run ! timeout_nbdkit 10 -U - "$PLUGIN" n.qcow2 --run true
    [[ "$output" =~ "protocol" ]]
    qemu-img create -q -f qcow2 -u -b 'json:{"file.filename":"base.qcow2"}' -F qcow2 j.qcow2 1M
    run ! timeout_nbdkit 10 -U - "$PLUGIN" j.qcow2 --run true
    [[ "$output" =~ "json:" ]]
}

@test "backing=none also lifts the policy for an image whose name is refused" {
    mkfifo fifo2
    qemu-img create -q -f qcow2 -u -b fifo2 -F raw g.qcow2 1M
    run -0 timeout_nbdkit 10 -U - -r "$PLUGIN" g.qcow2 backing=none \
        --run 'nbdinfo --size "$uri"'
}
