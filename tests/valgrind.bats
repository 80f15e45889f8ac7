#!/usr/bin/env bats
# A read/write session under valgrind: no memory errors and no leaks in
# the plugin or the core.

bats_require_minimum_version 1.5.0
load helpers

setup ()
{
    command -v valgrind >/dev/null || skip "valgrind is not installed"
    [ "${SANITIZE:-}" = 1 ] && skip "not under ASan"
    img="$BATS_TEST_TMPDIR/vg.qcow2"
    qemu-img create -q -f qcow2 "$img" 64M
    qemu-io -f qcow2 -c 'write -c -P 3 1M 64k' -c 'write -P 4 8M 1M' \
        "$img" >/dev/null
    qemu-img snapshot -c snap "$img"
}

@test "valgrind: read/write session, snapshot export, map" {
    run -0 timeout 600 valgrind -q --leak-check=full \
        --show-leak-kinds=definite,indirect --errors-for-leak-kinds=definite,indirect \
        --error-exitcode=99 \
        nbdkit -f -U - "$PLUGIN" "$img" --run '
          qemu-io -f raw -c "write -P 1 0 1M" -c "write -P 2 1000000 3000" \
            -c "write -z 2M 1M" -c "discard 3M 64k" -c "read -P 3 1M 4k" \
            -c "write -P 5 1M 512" -c "flush" "$uri" >/dev/null &&
          nbdinfo --map "$uri" >/dev/null &&
          nbdcopy "nbd+unix:///snap?socket=$unixsocket" null:'
    echo "$output"
    [[ ! "$output" =~ "==" ]]
    run -0 qemu-img check "$img"
    run -0 qemu-io -f qcow2 -c 'read -P 1 0 512' -c 'read -P 5 1M 512' \
        -c 'read -P 3 1049088 4096' "$img"
}
