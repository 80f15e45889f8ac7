#!/bin/bash
# Sequential read of a LUKS image through the plugin compared with an
# unencrypted copy of the same data: nbdcopy to null:, best of N runs.
# Prints both throughputs and the ratio (encrypted / plain; the goal is
# >= 0.5).
#
#   bench/encrypted-read.sh [SIZE_MIB (256)] [RUNS (3)]
set -euo pipefail
export PATH="/usr/bin:$PATH" LC_ALL=C

here="$(cd "$(dirname "$0")/.." && pwd)"
plugin="${PLUGIN:-$here/plugin/nbdkit-qcow2-plugin.so}"
size_mib="${1:-256}"
runs="${2:-3}"
pw="bench-password"
sec="secret,id=sec0,data=$pw"
tmp="$(mktemp -d /tmp/q2-encbench.XXXXXX)"
trap 'rm -rf "$tmp"' EXIT

head -c "${size_mib}M" /dev/urandom >"$tmp/data.raw"
qemu-img convert -O qcow2 "$tmp/data.raw" "$tmp/plain.qcow2"
for i in 1 2 3; do
    # PBKDF2 timing sometimes fails ("Unable to get accurate CPU usage").
    qemu-img convert --object "$sec" -O qcow2 \
        -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 \
        "$tmp/data.raw" "$tmp/luks.qcow2" && break
    [ "$i" = 3 ] && exit 1
done
rm -f "$tmp/data.raw"

# best_time IMG [password=...]: fastest of $runs full sequential reads.
best_time ()
{
    local img="$1" best="" t s e; shift
    for _ in $(seq 1 "$runs"); do
        s="$(date +%s.%N)"
        nbdkit -U - "$plugin" file="$img" "$@" --readonly \
            --run 'nbdcopy "$uri" null:'
        e="$(date +%s.%N)"
        t="$(echo "$e - $s" | bc -l)"
        if [ -z "$best" ] || [ "$(echo "$t < $best" | bc -l)" = 1 ]; then
            best="$t"
        fi
    done
    echo "$best"
}

# Warm the page cache so both runs read from memory.
cat "$tmp/plain.qcow2" "$tmp/luks.qcow2" >/dev/null
tp="$(best_time "$tmp/plain.qcow2")"
te="$(best_time "$tmp/luks.qcow2" password="$pw")"
printf 'plain:     %8.1f MiB/s (%.3f s)\n' \
    "$(echo "$size_mib / $tp" | bc -l)" "$tp"
printf 'luks:      %8.1f MiB/s (%.3f s, %s)\n' \
    "$(echo "$size_mib / $te" | bc -l)" "$te" "aes-256 xts-plain64"
printf 'ratio:     %8.2f (encrypted / plain throughput; goal >= 0.5)\n' \
    "$(echo "$tp / $te" | bc -l)"
