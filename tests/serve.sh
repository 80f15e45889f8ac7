#!/bin/sh
# Serve a qcow2 image with the plugin, in the foreground, until Ctrl-C.
# This is what `make serve` runs.  Settings come from the environment:
#
#   FILE    image to serve; when empty, ./demo.qcow2 is created (64M, with
#           some data in it) or reused if it already exists
#   SOCKET  serve on this unix domain socket instead of TCP
#   PORT    TCP port (default 10809); ignored when SOCKET is set
#   IPADDR  TCP address to listen on (default localhost; 0.0.0.0 or ::
#           makes the image readable from other machines)
#   PLUGIN  path of nbdkit-qcow2-plugin.so (default: the one in plugin/)
#
# The exit status is nbdkit's.
set -e

die ()
{
    echo "serve.sh: $*" >&2
    exit 1
}

have ()
{
    command -v "$1" >/dev/null 2>&1
}

here="$(cd "$(dirname "$0")" && pwd)"
PLUGIN="${PLUGIN:-$here/../plugin/nbdkit-qcow2-plugin.so}"
FILE="${FILE:-}"
SOCKET="${SOCKET:-}"

have nbdkit || die "nbdkit is not installed (run 'make deps')"
[ -f "$PLUGIN" ] || die "plugin $PLUGIN does not exist (run 'make' first)"

# The demo image: a few MiB of data, a compressed cluster, a zeroed range
# and data at the very end, so nbdinfo --map has something to show.
make_demo ()
{
    have qemu-img && have qemu-io ||
        die "qemu-img and qemu-io are needed for the demo image (run 'make deps')"
    echo "serve.sh: creating the demo image $PWD/$1"
    rm -f "$1.tmp"
    qemu-img create -q -f qcow2 "$1.tmp" 64M
    qemu-io -f qcow2 \
        -c 'write -P 0x5a 0 2M' \
        -c 'write -c -P 0xc3 8M 1M' \
        -c 'write -z 16M 4M' \
        -c 'write -P 0xa5 32M 512k' \
        -c 'write -P 0xff 63M 1M' \
        "$1.tmp" >/dev/null ||
        { rm -f "$1.tmp"; die "qemu-io could not write to the demo image"; }
    mv "$1.tmp" "$1"
}

if [ -z "$FILE" ]; then
    FILE=demo.qcow2
    if [ -e "$FILE" ]; then
        echo "serve.sh: reusing the existing demo image $PWD/$FILE"
    else
        make_demo "$FILE"
    fi
fi

[ -e "$FILE" ] || die "FILE=$FILE: no such file"
[ -f "$FILE" ] || [ -b "$FILE" ] ||
    die "FILE=$FILE: not a regular file or block device"
[ -r "$FILE" ] || die "FILE=$FILE: permission denied"
abs_file="$(cd "$(dirname "$FILE")" && pwd)/$(basename "$FILE")"

if [ -n "$SOCKET" ]; then
    case "$SOCKET" in
        /*) ;;
        *) SOCKET="$PWD/$SOCKET" ;;
    esac
    uri="nbd+unix:///?socket=$SOCKET"
    # nbdkit leaves its socket behind when it exits; remove a stale one,
    # but never the socket of a server that is still running.
    if [ -S "$SOCKET" ]; then
        have nbdinfo ||
            die "$SOCKET already exists; remove it if no server uses it"
        if nbdinfo --can connect "$uri" 2>/dev/null; then
            die "a server is already listening on $SOCKET"
        fi
        rm -f "$SOCKET"
    elif [ -e "$SOCKET" ]; then
        die "$SOCKET exists and is not a socket"
    fi
    set -- -U "$SOCKET"
    shown_uri="'$uri'"          # quoted: ? is a shell wildcard
else
    PORT="${PORT:-10809}"
    case "$PORT" in
        ''|*[!0-9]*) die "PORT=$PORT is not a port number" ;;
    esac
    addr="${IPADDR:-localhost}"
    case "$addr" in
        0.0.0.0|::) host=localhost ;;
        *:*) host="[$addr]" ;;
        *) host="$addr" ;;
    esac
    uri="nbd://$host:$PORT"
    set -- -i "$addr" -p "$PORT"
    shown_uri="$uri"
fi

cat <<EOF
Serving $abs_file
  with $PLUGIN
URI: $uri

Try, from another terminal:
  nbdinfo $shown_uri
  nbdinfo --map $shown_uri
  qemu-img info $shown_uri

Press Ctrl-C to stop the server.
EOF

exec nbdkit -f "$@" "$PLUGIN" file="$FILE"
