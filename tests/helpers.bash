# Shared helpers for the bats tests.  Load with `load helpers`.

# nbdsh needs the system python3 with the nbd module, not pyenv's.
export PATH="/usr/bin:$PATH"
export LC_ALL=C

PLUGIN="${PLUGIN:-$BATS_TEST_DIRNAME/../plugin/nbdkit-qcow2-plugin.so}"
# Under ASan+UBSan (make check-sanitize) the runtime must be preloaded
# into nbdkit; leak detection is off because the clients that --run starts
# inherit the preload.
if [ "${SANITIZE:-}" = 1 ]; then
    Q2_ASAN_LIB="$(gcc -print-file-name=libasan.so)"
    # tests/san-shim.c: without it nbdkit hangs in exit() after errors.
    if [ -f "$BATS_TEST_DIRNAME/../build-san/san-shim.so" ]; then
        Q2_ASAN_LIB="$Q2_ASAN_LIB $BATS_TEST_DIRNAME/../build-san/san-shim.so"
    fi
    nbdkit ()
    {
        LD_PRELOAD="$Q2_ASAN_LIB" \
        ASAN_OPTIONS="detect_leaks=0:exitcode=99" \
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=98" \
            command nbdkit "$@"
    }
fi

# timeout_nbdkit SECONDS ARGS...: nbdkit under timeout(1), which runs the
# binary and so would bypass the sanitizer wrapper above.
timeout_nbdkit ()
{
    local t="$1"; shift
    if [ "${SANITIZE:-}" = 1 ]; then
        timeout "$t" env LD_PRELOAD="$Q2_ASAN_LIB" \
            ASAN_OPTIONS="detect_leaks=0:exitcode=99" \
            UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=98" \
            nbdkit "$@"
    else
        timeout "$t" nbdkit "$@"
    fi
}

# start_nbdkit ARGS...: daemonized nbdkit (background mode, so it chdirs
# to /) on a unix socket; sets $sock $pidfile $uri $nbdkit_log.  With
# Q2_QUIET=1, without -v: debug logging slows requests down enough that
# fewer of them overlap.
start_nbdkit ()
{
    local verbose=-v
    [ "${Q2_QUIET:-}" != 1 ] || verbose=
    sock="$(mktemp -u /tmp/q2test-sock.XXXXXX)"
    pidfile="$BATS_TEST_TMPDIR/nbdkit.pid"
    nbdkit_log="$BATS_TEST_TMPDIR/nbdkit.log"
    uri="nbd+unix:///?socket=$sock"
    rm -f "$pidfile"
    nbdkit $verbose --log=stderr -D nbdkit.backend.datapath=0 -U "$sock" \
        -P "$pidfile" "$@" 2>"$nbdkit_log" 3>&- ||
        { cat "$nbdkit_log" >&3; return 1; }
    for _ in $(seq 1 200); do
        [ -s "$pidfile" ] && [ -S "$sock" ] && return 0
        sleep 0.05
    done
    echo "nbdkit did not start" >&3; cat "$nbdkit_log" >&3; return 1
}

stop_nbdkit ()
{
    [ -s "${pidfile:-}" ] || return 0
    local pid; pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    if kill -0 "$pid" 2>/dev/null; then
        kill -9 "$pid"; echo "nbdkit did not stop" >&3; return 1
    fi
    rm -f "$sock" "$pidfile"
    # Sanitizer reports from the daemon end up in its log.
    if grep -qE 'ERROR: AddressSanitizer|runtime error:' "$nbdkit_log"; then
        cat "$nbdkit_log" >&3; return 1
    fi
}

# qemu_nbd_map IMG: the reference map from qemu-nbd, without image locks
# (on the image and on its external data file, which we lock too).
qemu_nbd_map ()
{
    local opts="driver=qcow2,file.filename=$1,file.locking=off" df
    df="$(qemu-img info -U --output=json "$1" | /usr/bin/python3 -c '
import json, os, sys
j = json.load(sys.stdin)
d = j.get("format-specific", {}).get("data", {}).get("data-file")
if d:
    print(os.path.join(os.path.dirname(sys.argv[1]), d))' "$1")"
    [ -z "$df" ] ||
        opts="$opts,data-file.driver=file,data-file.filename=$df,data-file.locking=off"
    nbdinfo --map -- [ qemu-nbd -r --image-opts "$opts" ]
}

# qemu_img_create ARGS...: qemu-img create, retried: creating a LUKS
# image sometimes fails with "Unable to get accurate CPU usage".
qemu_img_create ()
{
    local i
    for i in 1 2 3; do
        qemu-img create "$@" && return 0
        sleep 0.2
    done
    return 1
}
