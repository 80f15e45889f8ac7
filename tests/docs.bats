#!/usr/bin/env bats
# Documentation and `make serve`: the man page is valid POD and covers
# every parameter and debug flag, the README opens with the two commands
# a new user needs, and tests/serve.sh really serves an image.

bats_require_minimum_version 1.5.0
load helpers

POD="$BATS_TEST_DIRNAME/../plugin/nbdkit-qcow2-plugin.pod"
README="$BATS_TEST_DIRNAME/../README.md"
SERVE="$BATS_TEST_DIRNAME/serve.sh"

setup_file ()
{
    # serve.sh runs nbdkit from PATH, so under ASan+UBSan it needs a
    # wrapper that preloads the runtime, as helpers.bash does for tests.
    if [ "${SANITIZE:-}" = 1 ]; then
        local asan; asan="$(gcc -print-file-name=libasan.so)"
        mkdir -p "$BATS_FILE_TMPDIR/bin"
        cat >"$BATS_FILE_TMPDIR/bin/nbdkit" <<EOF
#!/bin/sh
LD_PRELOAD="$asan" ASAN_OPTIONS="detect_leaks=0:exitcode=99" \\
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=98" \\
exec /usr/bin/nbdkit "\$@"
EOF
        chmod +x "$BATS_FILE_TMPDIR/bin/nbdkit"
    fi
}

setup ()
{
    # Unix socket paths are limited to 108 bytes: keep it short.
    sock="$(mktemp -u /tmp/q2serve-sock.XXXXXX)"
    serve_pid=
}

teardown ()
{
    stop_serve || true
    rm -f "$sock"
}

# start_serve DIR [VAR=VALUE...]: run tests/serve.sh in DIR with the given
# environment, in the background, under timeout(1) as a safety net.
# timeout puts itself and everything it starts into a new process group,
# whose id is $serve_pid.  Output goes to $serve_log.
start_serve ()
{
    local dir="$1"; shift
    serve_log="$BATS_TEST_TMPDIR/serve.log"
    (
        cd "$dir"
        exec env PATH="$BATS_FILE_TMPDIR/bin:$PATH" PLUGIN="$PLUGIN" \
             FILE= PORT= SOCKET= IPADDR= "$@" \
             timeout 120 sh "$SERVE"
    ) >"$serve_log" 2>&1 3>&- &
    serve_pid=$!
}

# alive PID: the process exists and is not a zombie.
alive ()
{
    local st; st="$(ps -o stat= -p "$1" 2>/dev/null)"
    [ -n "$st" ] && [[ "$st" != Z* ]]
}

# wait_for URI: wait (at most 30 s) until the server accepts connections.
wait_for ()
{
    local _
    for _ in $(seq 1 300); do
        if ! alive "$serve_pid"; then
            echo "serve.sh exited early:" >&3; cat "$serve_log" >&3
            return 1
        fi
        nbdinfo --can connect "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "serve.sh did not start serving $1:" >&3; cat "$serve_log" >&3
    return 1
}

# stop_serve: SIGTERM the whole process group, SIGKILL it after 10 s,
# reap it, and fail if anything of it is left.
stop_serve ()
{
    [ -n "${serve_pid:-}" ] || return 0
    local pgid="$serve_pid" watchdog
    serve_pid=
    kill -TERM -- "-$pgid" 2>/dev/null || true
    ( sleep 10; kill -KILL -- "-$pgid" 2>/dev/null ) 3>&- >/dev/null 2>&1 &
    watchdog=$!
    wait "$pgid" 2>/dev/null || true
    kill "$watchdog" 2>/dev/null || true
    wait "$watchdog" 2>/dev/null || true
    if pgrep -g "$pgid" >/dev/null; then
        echo "processes left behind in group $pgid:" >&3
        pgrep -a -g "$pgid" >&3
        kill -KILL -- "-$pgid" 2>/dev/null || true
        return 1
    fi
    if grep -qE 'ERROR: AddressSanitizer|runtime error:' "$serve_log"; then
        cat "$serve_log" >&3; return 1
    fi
}

virtual_size ()
{
    qemu-img info -U --output=json "$1" |
        sed -n 's/^ *"virtual-size": \([0-9]*\),*$/\1/p'
}

@test "docs: podchecker accepts the man page without warnings" {
    run -0 podchecker "$POD"
    [[ "$output" =~ "pod syntax OK" ]]
    [[ ! "$output" =~ WARNING|ERROR ]]
}

@test "docs: pod2man renders the man page" {
    run -0 pod2man --section=1 --center=nbdkit --release=nbdkit-qcow2 \
        "$POD"
    [[ "$output" =~ nbdkit-qcow2-plugin ]]
    for s in NAME SYNOPSIS DESCRIPTION PARAMETERS NOTES LIMITATIONS \
             "DEBUG FLAG" FILES VERSION "SEE ALSO" AUTHORS COPYRIGHT; do
        grep -qx "=head1 $s" "$POD" || { echo "no section $s"; return 1; }
    done
}

@test "docs: the man page documents every parameter in --help" {
    run -0 nbdkit "$PLUGIN" --help
    # The plugin's own part of the help starts at "plugin: qcow2".
    keys="$(sed -n '/^plugin: qcow2/,$p' <<<"$output" |
            grep -oE '(^|[[:space:][])[A-Za-z][A-Za-z0-9._-]*=' |
            sed -E 's/^[[:space:][]+//; s/=$//' | sort -u)"
    echo "parameters in --help: $keys"
    grep -qx file <<<"$keys"
    grep -qx l2-cache-size <<<"$keys"
    for k in $keys; do
        grep -qF "B<$k=>" "$POD" || { echo "B<$k=> not in the pod"; return 1; }
    done
    grep -qF 'C<file=> is a magic config key and may be omitted' "$POD"
}

@test "docs: the man page documents every debug flag" {
    run -0 nm -D --defined-only "$PLUGIN"
    flags="$(grep -oE 'qcow2_debug_[A-Za-z0-9_]+' <<<"$output" |
             sed 's/^qcow2_debug_//' | sort -u)"
    [ -n "$flags" ]
    for f in $flags; do
        grep -qF "B<-D qcow2.$f=1>" "$POD" ||
            { echo "-D qcow2.$f not in the pod"; return 1; }
    done
}

@test "docs: README opens with make serve and make check" {
    # The first fenced block, which must come before the first section.
    block="$(awk '/^```/ { if (inb) exit; inb = 1; next } inb' "$README")"
    echo "first block: $block"
    grep -qE '^make serve FILE=disk\.qcow2( |$)' <<<"$block"
    grep -qE '^make check( |$)' <<<"$block"
    # Exactly two commands, nothing else to type.
    [ "$(grep -cE '^[^#[:space:]]' <<<"$block")" -eq 2 ]
    first_fence="$(grep -n -m1 '^```' "$README" | cut -d: -f1)"
    first_section="$(grep -n -m1 '^## ' "$README" | cut -d: -f1)"
    [ "$first_fence" -lt "$first_section" ]
}

@test "serve.sh: serves FILE on a unix socket" {
    img="$BATS_TEST_TMPDIR/small.qcow2"
    qemu-img create -q -f qcow2 "$img" 5M
    qemu-io -f qcow2 -c 'write -P 0x42 0 64k' "$img" >/dev/null
    expected="$(virtual_size "$img")"
    [ "$expected" = 5242880 ]

    start_serve "$BATS_TEST_TMPDIR" FILE="$img" SOCKET="$sock"
    uri="nbd+unix:///?socket=$sock"
    wait_for "$uri"
    run -0 nbdinfo --size "$uri"
    [ "$output" = "$expected" ]
    grep -qF "URI: $uri" "$serve_log"
    grep -qF "nbdinfo '$uri'" "$serve_log"
    stop_serve
}

@test "serve.sh: a relative FILE and a stale socket" {
    mkdir "$BATS_TEST_TMPDIR/d"
    qemu-img create -q -f qcow2 "$BATS_TEST_TMPDIR/d/rel.qcow2" 3M
    # A socket file nobody listens on, as a killed nbdkit leaves behind.
    /usr/bin/python3 -c 'import socket, sys
socket.socket(socket.AF_UNIX).bind(sys.argv[1])' "$sock"
    [ -S "$sock" ]

    start_serve "$BATS_TEST_TMPDIR/d" FILE=rel.qcow2 SOCKET="$sock"
    wait_for "nbd+unix:///?socket=$sock"
    run -0 nbdinfo --size "nbd+unix:///?socket=$sock"
    [ "$output" = 3145728 ]
    stop_serve
}

@test "serve.sh: without FILE it creates and serves demo.qcow2" {
    dir="$BATS_TEST_TMPDIR/demo"
    mkdir "$dir"
    start_serve "$dir" SOCKET="$sock"
    uri="nbd+unix:///?socket=$sock"
    wait_for "$uri"
    [ -f "$dir/demo.qcow2" ]
    run -0 qemu-img info -U --output=json "$dir/demo.qcow2"
    [[ "$output" =~ '"format": "qcow2"' ]]
    [ "$(virtual_size "$dir/demo.qcow2")" = 67108864 ]
    run -0 nbdinfo --size "$uri"
    [ "$output" = 67108864 ]
    # It is not an empty image.
    run -0 nbdinfo --map "$uri"
    [[ "$output" =~ " data" ]]
    stop_serve
    [ ! -e "$dir/demo.qcow2.tmp" ]
}

@test "serve.sh: serves on TCP with PORT" {
    port=$((20000 + RANDOM % 30000))
    ! nbdinfo --can connect "nbd://localhost:$port" 2>/dev/null ||
        skip "port $port is in use"
    img="$BATS_TEST_TMPDIR/tcp.qcow2"
    qemu-img create -q -f qcow2 "$img" 2M

    start_serve "$BATS_TEST_TMPDIR" FILE="$img" PORT="$port"
    wait_for "nbd://localhost:$port"
    run -0 nbdinfo --size "nbd://localhost:$port"
    [ "$output" = 2097152 ]
    grep -qF "URI: nbd://localhost:$port" "$serve_log"
    grep -qF "qemu-img info nbd://localhost:$port" "$serve_log"
    stop_serve
}

@test "serve.sh: a missing FILE is reported clearly" {
    run -1 env PLUGIN="$PLUGIN" FILE="$BATS_TEST_TMPDIR/nosuch.qcow2" \
        SOCKET="$sock" sh "$SERVE"
    [[ "$output" =~ "nosuch.qcow2: no such file" ]]
    [ ! -e "$sock" ]
}
