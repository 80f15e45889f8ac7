#!/usr/bin/python3
"""Deterministic random write workloads for the qcow2 plugin.

    randops.py gen   --seed S --size N --cluster C --ops K [--no-trim]
                     [--max-len BYTES]                   -> op list (text)
    randops.py qemu-io  (same options)                   -> qemu-io script
    randops.py apply URI (same options) [--fua-rate R]   -> apply via libnbd

The op list is a pure function of (seed, size, cluster, ops, no-trim,
max-len), so the NBD run (through the plugin) and the qemu-io run (qemu's
own qcow2 driver on a copy of the same starting image) see exactly the
same requests.  Ops:

    write OFF LEN BYTE   pwrite of LEN copies of BYTE     | write -P BYTE OFF LEN
    zero  OFF LEN        zero, no MAY_TRIM (NBD NO_HOLE)  | write -z OFF LEN
    zerot OFF LEN        zero with MAY_TRIM               | write -z -u OFF LEN
    trim  OFF LEN        trim                             | discard OFF LEN
    flush                flush                            | flush

Every write uses a single byte value for the whole op (so both sides are
byte-exact), derived from the op index and never 0.
"""

import argparse
import random
import sys


def gen_ops(seed, size, cluster, nops, no_trim=False, max_len=4 << 20):
    rng = random.Random("randops/%d/%d/%d" % (seed, size, cluster))
    ops = []
    max_len = min(max_len, size)

    def rand_len():
        # log-uniform from 1 B to max_len
        bits = rng.randint(0, max_len.bit_length() - 1)
        lo = 1 << bits
        return min(max_len, rng.randint(lo, 2 * lo - 1))

    def place(kind):
        """Pick (off, len) with a given alignment kind."""
        if kind == "aligned":
            ncl = max(1, rand_len() // cluster)
            ncl = min(ncl, size // cluster)
            off = rng.randrange(0, size // cluster - ncl + 1) * cluster
            return off, ncl * cluster
        if kind == "sector":
            n = max(1, rand_len() // 512)
            n = min(n, size // 512)
            off = rng.randrange(0, size // 512 - n + 1) * 512
            return off, n * 512
        if kind == "end":
            ln = rand_len()
            return size - ln, ln
        # byte granular
        ln = rand_len()
        off = rng.randrange(0, size - ln + 1)
        return off, ln

    hot = []

    def place_op():
        """Mostly fresh places, but often near an earlier op, so that ops
        overlap, land in half-written clusters and straddle edges."""
        kind = rng.choice(kinds)
        off, ln = place(kind)
        if hot and kind != "end" and rng.random() < 0.4:
            base = rng.choice(hot)
            delta = rng.randint(-2 * cluster, 2 * cluster)
            if kind == "aligned":
                delta -= delta % cluster
            elif kind == "sector":
                delta -= delta % 512
            off = max(0, min(size - ln, base + delta))
            if kind == "aligned":
                off -= off % cluster
            elif kind == "sector":
                off -= off % 512
        hot.append(off)
        return off, ln

    kinds = ["aligned"] * 4 + ["sector"] * 3 + ["bytes"] * 4 + ["end"]
    for i in range(nops):
        r = rng.random()
        if r < 0.55:
            off, ln = place_op()
            byte = (i * 97 + seed * 13) % 255 + 1
            ops.append(("write", off, ln, byte))
        elif r < 0.68:
            off, ln = place_op()
            ops.append(("zero", off, ln))
        elif r < 0.80:
            off, ln = place_op()
            ops.append(("zerot", off, ln))
        elif r < 0.92:
            off, ln = place_op()
            ops.append(("trim" if not no_trim else "zero", off, ln))
        else:
            ops.append(("flush",))
    return ops


def fmt_op(op):
    return " ".join(str(x) for x in op)


def qemu_io_cmd(op):
    k = op[0]
    if k == "write":
        return "write -P 0x%02x %d %d" % (op[3], op[1], op[2])
    if k == "zero":
        return "write -z %d %d" % (op[1], op[2])
    if k == "zerot":
        return "write -z -u %d %d" % (op[1], op[2])
    if k == "trim":
        return "discard %d %d" % (op[1], op[2])
    if k == "flush":
        return "flush"
    raise ValueError(k)


def apply_nbd(uri, ops, seed, fua_rate=0.1, verbose=False):
    sys.path.insert(0, "/usr/lib/python3/dist-packages")
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    rng = random.Random("fua/%d" % seed)
    for i, op in enumerate(ops):
        k = op[0]
        fua = nbd.CMD_FLAG_FUA if rng.random() < fua_rate else 0
        if verbose:
            print("%d: %s%s" % (i, fmt_op(op), " fua" if fua else ""),
                  file=sys.stderr)
        try:
            if k == "write":
                h.pwrite(bytes([op[3]]) * op[2], op[1], fua)
            elif k == "zero":
                h.zero(op[2], op[1], nbd.CMD_FLAG_NO_HOLE | fua)
            elif k == "zerot":
                h.zero(op[2], op[1], fua)
            elif k == "trim":
                h.trim(op[2], op[1], fua)
            elif k == "flush":
                h.flush()
        except nbd.Error as e:
            print("randops: op %d (%s) failed: %s (errno %s)"
                  % (i, fmt_op(op), e.string, e.errnum), file=sys.stderr)
            return 1
    h.flush()
    h.shutdown()
    return 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["gen", "qemu-io", "apply"])
    p.add_argument("uri", nargs="?")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--cluster", type=int, required=True)
    p.add_argument("--ops", type=int, required=True)
    p.add_argument("--max-len", type=int, default=4 << 20)
    p.add_argument("--no-trim", action="store_true")
    p.add_argument("--fua-rate", type=float, default=0.1)
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args()
    ops = gen_ops(a.seed, a.size, a.cluster, a.ops, a.no_trim, a.max_len)
    if a.mode == "gen":
        for i, op in enumerate(ops):
            print("%d %s" % (i, fmt_op(op)))
    elif a.mode == "qemu-io":
        for op in ops:
            print(qemu_io_cmd(op))
        print("flush")
    else:
        if not a.uri:
            p.error("apply needs a URI")
        sys.exit(apply_nbd(a.uri, ops, a.seed, a.fua_rate, a.verbose))


if __name__ == "__main__":
    main()
