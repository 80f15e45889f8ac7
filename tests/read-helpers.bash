# Helpers for read-matrix.bats and read-chain.bats.
# Load after helpers.bash:  load helpers; load read-helpers
#
# The oracle is always qemu: qemu-img compare (data), qemu-nbd through
# nbdinfo --map (allocation map) and qemu-img info (virtual size).

# mkimg IMG OPTS SIZE [QEMU-IO ARGS...]: create a qcow2 image with
# `qemu-img create -o OPTS` and apply the qemu-io commands to it.
mkimg ()
{
    local img="$1" opts="$2" size="$3"; shift 3
    qemu-img create -q -f qcow2 ${opts:+-o "$opts"} "$img" "$size" ||
        { echo "mkimg: qemu-img create $opts $img $size failed" >&2; return 1; }
    [ $# -eq 0 ] || qio "$img" "$@"
}

# qio IMG [-f FMT] QEMU-IO ARGS...: run qemu-io, failing loudly if any
# command fails (qemu-io's exit status only reflects the last command).
qio ()
{
    local img="$1" fmt=qcow2 out; shift
    if [ "$1" = -f ]; then fmt="$2"; shift 2; fi
    out="$(qemu-io -f "$fmt" "$@" "$img" 2>&1)" &&
        ! grep -qiE 'failed|error|invalid' <<<"$out" ||
        { echo "qemu-io on $img failed:" >&2; echo "$out" >&2; return 1; }
}

# The standard mixed workload, scaled to the cluster size.
# wl_std CLUSTER SIZE COMPAT: sets the array WL to qemu-io -c arguments.
wl_std ()
{
    local c="$1" s="$2" v="$3"
    WL=(
        -c "write -P 0x11 0 $((3 * c + c / 2))"          # whole + partial cluster
        -c "write -P 0x22 $((5 * c + 512)) 1024"         # inside a fresh cluster
        -c "write -P 0x33 $((8 * c)) $((5 * c))"
        -c "write -z $((9 * c)) $c"                      # zero an allocated cluster
        -c "write -z $((10 * c + 512)) 512"              # zero part of one
        -c "discard $((11 * c)) $c"                      # discard an allocated one
        -c "write -z $((16 * c)) $((2 * c))"             # zero over unallocated
        -c "write -P 0x44 $((20 * c + 333)) 7777"        # unaligned, byte-granular
        -c "write -P 0x45 $((s / 2 - 1000)) 3000"        # somewhere in the middle
        -c "write -P 0x55 $((s - 4096)) 4096"            # the very end
        -c "write -P 0x56 $((s - 1)) 1"                  # the very last byte
    )
    if [ "$v" = 3 ]; then
        WL+=(
            -c "write -P 0x66 $((13 * c)) $((3 * c))"
            -c "write -z -u $((14 * c)) $c"              # v3: unmapped zero cluster
            -c "write -z -u $((15 * c + 512)) 1024"      # v3: partial, stays data
        )
    fi
}

# wl_subcluster CLUSTER BASE: extra writes for extended L2 images, in
# clusters BASE..BASE+3 (32 subclusters per cluster).
wl_subcluster ()
{
    local c="$1" b=$(( $2 * $1 )) sc=$(( $1 / 32 ))
    WL+=(
        -c "write -P 0x81 $((b + sc)) $((sc / 2))"                 # half a subcluster
        -c "write -P 0x82 $((b + c + 3 * sc + 100)) $((5 * sc))"   # unaligned, spans 6
        -c "write -P 0x83 $((b + 2 * c)) $c"
        -c "write -z $((b + 2 * c + 4 * sc)) $((2 * sc))"          # zero subclusters in data
        -c "write -z -u $((b + 2 * c + 10 * sc)) $sc"
        -c "discard $((b + 2 * c + 20 * sc)) $((2 * sc))"
        -c "write -z $((b + 3 * c + sc)) $((3 * sc))"              # zero subclusters, no data
        -c "write -P 0x84 $((b + 3 * c + 2 * sc + 100)) 100"       # write into a zero subcluster
        -c "write -P 0x85 $((b + 3 * c + 31 * sc)) $sc"            # last subcluster only
    )
}

# mkraw OUT SIZE: a raw file with mixed content in its first 16 MiB
# (random, half random, patterned, text-like, holes) and random bytes
# at the end; deterministic.
mkraw ()
{
    python3 - "$1" "$2" <<'EOF'
import random, sys
out, size = sys.argv[1], int(sys.argv[2])
r = random.Random(42)
with open(out, "wb") as f:
    f.truncate(size)
    for i in range(min(size, 16 << 20) // 65536):
        k, off = i % 6, i * 65536
        if k == 0:
            continue
        f.seek(off)
        if k == 1:
            f.write(r.randbytes(65536))
        elif k == 2:
            f.write(r.randbytes(32768))
        elif k == 3:
            f.write(bytes([i & 0xff]) * 65536)
        elif k == 4:
            f.write(b"".join(b"line %d of the text %d\n" % (j, r.randrange(1000))
                             for j in range(2600))[:65536])
        else:
            f.seek(off + 1234)
            f.write(r.randbytes(5000))
    f.seek(size - 5000)
    f.write(r.randbytes(5000))
EOF
}

# strip_backing_format IMG: remove the backing format header extension,
# which qemu-img 7.2 refuses to leave out.
strip_backing_format ()
{
    python3 - "$1" <<'EOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    h = f.read(65536)
    assert h[:4] == b"QFI\xfb"
    ver = struct.unpack(">I", h[4:8])[0]
    start = 72 if ver == 2 else struct.unpack(">I", h[100:104])[0]
    off, exts = start, []
    while True:
        t, l = struct.unpack(">II", h[off:off + 8])
        if t == 0:
            break
        exts.append((t, h[off + 8:off + 8 + l]))
        off += 8 + ((l + 7) & ~7)
    end = off + 8
    keep = [(t, d) for t, d in exts if t != 0xE2792ACA]
    assert len(keep) < len(exts), "no backing format extension"
    new = b"".join(struct.pack(">II", t, len(d)) + d + b"\0" * (-len(d) % 8)
                   for t, d in keep) + b"\0" * 8
    f.seek(start)
    f.write(new + b"\0" * (end - start - len(new)))
EOF
}

virtual_size ()
{
    qemu-img info -U --output=json "$1" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["virtual-size"])'
}

nbdkit_diag ()
{
    echo "--- nbdkit log (${nbdkit_log:-?}, last 40 lines, worker thread noise removed) ---"
    grep -vE 'worker thread|debug: (client sent NBD_CMD_DISC|starting|exiting)' \
        "${nbdkit_log:-/dev/null}" 2>/dev/null | tail -n 40 || true
}

# assert_size IMG: nbdinfo --size over $uri equals qemu's virtual size.
assert_size ()
{
    local want got
    want="$(virtual_size "$1")" || return 1
    got="$(nbdinfo --size "$uri")" || { echo "nbdinfo --size failed"; nbdkit_diag; return 1; }
    [ "$got" = "$want" ] ||
        { echo "size: served $got, qemu says $want"; nbdkit_diag; return 1; }
}

# assert_data IMG: qemu-img compare of $uri against IMG.
assert_data ()
{
    local out
    out="$(qemu-img compare -U -f raw -F qcow2 "$uri" "$1" 2>&1)" ||
        { echo "qemu-img compare $uri $1 (rc $?):"; echo "$out"; nbdkit_diag; return 1; }
    [[ "$out" == *"Images are identical."* ]] ||
        { echo "unexpected compare output: $out"; return 1; }
}

# assert_map IMG: nbdinfo --map over $uri equals qemu-nbd's, exactly.
assert_map ()
{
    local want got
    want="$(qemu_nbd_map "$1")" || { echo "qemu-nbd map of $1 failed"; return 1; }
    got="$(nbdinfo --map "$uri")" || { echo "nbdinfo --map failed"; nbdkit_diag; return 1; }
    [ "$want" = "$got" ] || {
        echo "map differs from qemu-nbd's (- qemu-nbd, + plugin) for $1:"
        diff -u <(echo "$want") <(echo "$got") | head -n 60
        nbdkit_diag
        return 1
    }
}

# assert_served IMG: size, data and map all match qemu.
assert_served ()
{
    assert_size "$1" && assert_data "$1" && assert_map "$1"
}

# serve_and_check IMG [EXTRA PLUGIN ARGS...]: start the plugin on IMG
# (file=IMG) and run assert_served.  The server is left running for
# teardown (stop_nbdkit).
serve_and_check ()
{
    local img="$1"; shift
    start_nbdkit "$PLUGIN" file="$img" "$@" || return 1
    assert_served "$img"
}

# check_captive IMG [-r] [EXTRA PLUGIN ARGS...]: like serve_and_check, but
# with a captive nbdkit (-U - --run), which exits at once: a daemonized
# nbdkit 1.32 takes ~1.5 s to stop, too slow for dozens of images.
check_captive ()
{
    local img="$1" rc=0 opts=(); shift
    [ "${1:-}" != -r ] || { opts=(-r); shift; }
    # The --run command is run by /bin/sh, which does not pass exported
    # bash functions on: the bash child sources the helpers again.  The
    # clients must not inherit the SANITIZE=1 ASan preload (qemu-img
    # hangs under it).
    export Q2_HELPERS="$BATS_TEST_DIRNAME/helpers.bash"
    export Q2_READ_HELPERS="$BATS_TEST_DIRNAME/read-helpers.bash"
    export CHECK_IMG="$img"
    export nbdkit_log="$BATS_TEST_TMPDIR/nbdkit.log"
    nbdkit -U - -v --log=stderr -D nbdkit.backend.datapath=0 "${opts[@]}" "$PLUGIN" file="$img" "$@" \
        --run 'export uri; unset LD_PRELOAD; bash -c ". \"\$Q2_HELPERS\"; . \"\$Q2_READ_HELPERS\"; assert_served \"\$CHECK_IMG\""' \
        2>"$nbdkit_log" 3>&- || rc=$?
    if grep -qE 'ERROR: AddressSanitizer|runtime error:' "$nbdkit_log"; then
        cat "$nbdkit_log"; return 1
    fi
    [ $rc -eq 0 ] || {
        echo "captive nbdkit or checks failed (rc $rc); nbdkit errors:"
        grep -iE 'error|warning' "$nbdkit_log" | tail -n 20
        return 1
    }
}

# nbdkit_t ARGS...: foreground nbdkit under `timeout 10`, honouring the
# SANITIZE=1 preload of helpers.bash (timeout cannot run a shell function).
nbdkit_t ()
{
    if [ "${SANITIZE:-}" = 1 ]; then
        timeout 10 env LD_PRELOAD="$Q2_ASAN_LIB" \
            ASAN_OPTIONS="detect_leaks=0:exitcode=99" \
            UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=98" \
            nbdkit "$@"
    else
        timeout 10 nbdkit "$@"
    fi
}
