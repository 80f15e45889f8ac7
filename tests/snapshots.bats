#!/usr/bin/env bats
# Internal snapshots served as read-only exports.

bats_require_minimum_version 1.5.0
load helpers

setup ()
{
    img="$BATS_TEST_TMPDIR/s.qcow2"
    qemu-img create -q -f qcow2 "$img" 64M
    qemu-io -f qcow2 -c 'write -P 1 0 4M' -c 'write -c -P 7 8M 64k' \
        "$img" >/dev/null
    qemu-img snapshot -c first "$img"
    qemu-io -f qcow2 -c 'write -P 2 1M 2M' -c 'write -z 8M 64k' "$img" >/dev/null
    qemu-img snapshot -c second "$img"
    qemu-io -f qcow2 -c 'write -P 3 0 512k' "$img" >/dev/null
    for s in first second; do
        qemu-img convert -U -O raw -l "snapshot.name=$s" "$img" \
            "$BATS_TEST_TMPDIR/$s.raw"
    done
    qemu-img convert -U -O raw "$img" "$BATS_TEST_TMPDIR/active.raw"
}

teardown () { stop_nbdkit; }

sock_uri () { echo "nbd+unix:///$1?socket=$sock"; }

@test "snapshots: nbdinfo --list shows the active image and every snapshot" {
    start_nbdkit "$PLUGIN" "$img"
    run -0 nbdinfo --list "$uri"
    [[ "$output" =~ 'export="first"' ]]
    [[ "$output" =~ 'export="second"' ]]
    [[ "$output" =~ 'snapshot ID 1' ]]
    [[ "$output" =~ 'snapshot ID 2' ]]
}

@test "snapshots: a snapshot's view is closed with its last connection (listing 40 snapshots keeps none open)" {
    for i in $(seq 3 40); do qemu-img snapshot -c "s$i" "$img"; done
    start_nbdkit "$PLUGIN" "$img"
    local pid fds
    pid="$(cat "$pidfile")"
    fds="$(ls /proc/"$pid"/fd | wc -l)"
    # fds_settle: nbdkit closes a connection just after the client goes.
    fds_settle () {
        for _ in $(seq 1 100); do
            [ "$(ls /proc/"$pid"/fd | wc -l)" -le $((fds + 1)) ] && return 0
            sleep 0.05
        done
        ls -l /proc/"$pid"/fd >&3; return 1
    }
    run -0 nbdinfo --list "$uri"
    [ "$(grep -c '^export=' <<< "$output")" = 41 ]
    # Each listed export was opened for its details and closed again.
    fds_settle
    # Two connections share a view; it stays usable until the last closes.
    PATH=/usr/bin:$PATH nbdsh -c "
a = nbd.NBD(); a.connect_uri('$(sock_uri first)')
b = nbd.NBD(); b.connect_uri('$(sock_uri first)')
assert a.pread(4096, 0) == b'\x01' * 4096
a.shutdown(); del a
assert b.pread(4096, 0) == b'\x01' * 4096
b.shutdown()
"
    fds_settle
    run -0 nbdcopy "$(sock_uri s40)" "$BATS_TEST_TMPDIR/s40.raw"
    cmp "$BATS_TEST_TMPDIR/s40.raw" "$BATS_TEST_TMPDIR/active.raw"
}

@test "snapshots: exports by name and by ID read as QEMU reads the snapshot" {
    start_nbdkit "$PLUGIN" "$img"
    for e in first:first 1:first second:second 2:second; do
        name="${e%%:*}" snap="${e##*:}"
        rm -f "$BATS_TEST_TMPDIR/out.raw"
        nbdcopy "$(sock_uri "$name")" "$BATS_TEST_TMPDIR/out.raw"
        cmp "$BATS_TEST_TMPDIR/out.raw" "$BATS_TEST_TMPDIR/$snap.raw"
        run -2 nbdinfo --can write "$(sock_uri "$name")"
    done
    nbdcopy "$uri" "$BATS_TEST_TMPDIR/act.raw"
    cmp "$BATS_TEST_TMPDIR/act.raw" "$BATS_TEST_TMPDIR/active.raw"
}

@test "snapshots: snapshot=NAME and snapshot=ID serve it as the default export" {
    for s in first 2; do
        snap=first; [ "$s" = 2 ] && snap=second
        nbdkit -U - "$PLUGIN" "$img" snapshot="$s" \
            --run 'nbdcopy "$uri" '"$BATS_TEST_TMPDIR/o-$s.raw"
        cmp "$BATS_TEST_TMPDIR/o-$s.raw" "$BATS_TEST_TMPDIR/$snap.raw"
    done
    run ! nbdkit -U - "$PLUGIN" "$img" snapshot=nosuch --run true
    [[ "$output" =~ "nosuch" ]]
}

@test "snapshots: an unknown export name is refused" {
    start_nbdkit "$PLUGIN" "$img"
    run ! nbdinfo "$(sock_uri nosuch)"
    run ! nbdinfo "$(sock_uri '../first')"
    grep -q "is neither the active image" "$nbdkit_log"
}

@test "snapshots: writes to the active export never change a served snapshot" {
    start_nbdkit "$PLUGIN" "$img"
    # Keep a snapshot connection open while the active image is rewritten.
    run -0 nbdsh -c "
import nbd
a = nbd.NBD(); a.connect_uri('$uri')
s = nbd.NBD(); s.connect_uri('$(sock_uri first)')
before = s.pread(1 << 20, 0)
a.pwrite(b'\x55' * (4 << 20), 0)
a.zero(4 << 20, 8 << 20)
a.trim(1 << 20, 2 << 20)
a.flush()
assert s.pread(1 << 20, 0) == before
assert a.pread(4, 0) == b'\x55' * 4
"
    stop_nbdkit
    nbdkit -U - "$PLUGIN" "$img" snapshot=first -r \
        --run 'nbdcopy "$uri" '"$BATS_TEST_TMPDIR/after.raw"
    cmp "$BATS_TEST_TMPDIR/after.raw" "$BATS_TEST_TMPDIR/first.raw"
    run -0 qemu-img check "$img"
    qemu-img convert -O raw -l snapshot.name=second "$img" "$BATS_TEST_TMPDIR/s2.raw"
    cmp "$BATS_TEST_TMPDIR/s2.raw" "$BATS_TEST_TMPDIR/second.raw"
}

@test "snapshots: an advertised name reaches its snapshot even when it is another's ID" {
    qemu-io -f qcow2 -c 'write -P 0x33 0 64k' "$img" >/dev/null
    qemu-img snapshot -c 1 "$img"                 # ID 3, name "1"
    qemu-img convert -O raw -l snapshot.name=1 "$img" "$BATS_TEST_TMPDIR/n1.raw"
    start_nbdkit "$PLUGIN" "$img"
    run -0 nbdinfo --list "$uri"
    [[ "$output" =~ 'export="1"' ]]
    nbdcopy "$(sock_uri 1)" "$BATS_TEST_TMPDIR/e1.raw"
    cmp "$BATS_TEST_TMPDIR/e1.raw" "$BATS_TEST_TMPDIR/n1.raw"
    # IDs still reach snapshots whose names differ from every ID.
    nbdcopy "$(sock_uri 2)" "$BATS_TEST_TMPDIR/e2.raw"
    cmp "$BATS_TEST_TMPDIR/e2.raw" "$BATS_TEST_TMPDIR/second.raw"
}

@test "snapshots: with snapshot=, the list says what \"\" is and the active image is not exported" {
    start_nbdkit "$PLUGIN" "$img" snapshot=first
    run -0 nbdinfo --list "$uri"
    [[ "$output" =~ 'snapshot first (snapshot=, read-only)' ]]
    [[ ! "$output" =~ 'active image' ]]
    run -2 nbdinfo --can write "$uri"
    run ! nbdinfo "$(sock_uri active)"
    grep -q 'the active image is not exported' "$nbdkit_log"
    nbdcopy "$(sock_uri second)" "$BATS_TEST_TMPDIR/o2.raw"
    cmp "$BATS_TEST_TMPDIR/o2.raw" "$BATS_TEST_TMPDIR/second.raw"
}

@test "snapshots: repeated names are listed by ID, and every listed name is unique and reaches its snapshot" {
    # IDs 3 and 4 named "a", ID 5 named "4": the second "a" would be
    # listed as "4", which is ID 5's name, so it is not listed.
    for v in 3 4 5; do
        qemu-io -f qcow2 -c "write -P 0x$v$v 0 64k" "$img" >/dev/null
        name=a; [ $v = 5 ] && name=4
        qemu-img snapshot -c $name "$img"
        qemu-img convert -O raw -l snapshot.id=$v "$img" "$BATS_TEST_TMPDIR/id$v.raw"
    done
    start_nbdkit "$PLUGIN" "$img"
    nbdinfo --list --json "$uri" > "$BATS_TEST_TMPDIR/list.json"
    /usr/bin/python3 - "$BATS_TEST_TMPDIR/list.json" <<'PY'
import json, sys
names = [e["export-name"] for e in json.load(open(sys.argv[1]))["exports"]]
assert len(names) == len(set(names)), names
assert sorted(names) == sorted(["", "first", "second", "3", "4"]), names
PY
    for e in 3:3 4:5 first:first second:second; do
        name="${e%%:*}" want="${e##*:}"
        [ -e "$BATS_TEST_TMPDIR/$want.raw" ] || want="id$want"
        rm -f "$BATS_TEST_TMPDIR/o.raw"
        nbdcopy "$(sock_uri "$name")" "$BATS_TEST_TMPDIR/o.raw"
        cmp "$BATS_TEST_TMPDIR/o.raw" "$BATS_TEST_TMPDIR/$want.raw" ||
            { echo "export $name is not snapshot $want" >&3; false; }
    done
}
