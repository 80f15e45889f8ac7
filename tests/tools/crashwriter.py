#!/usr/bin/python3
"""Crash-consistency workload and checker.

  crashwriter.py write URI JOURNAL --seed S --size N [--flush-every K]
      Writes until the connection dies (the server is killed with -9
      meanwhile).  Ops are 512-aligned writes of 512 B..256 KiB (each op
      one byte value, never 0), zeroes (value 0, with and without MAY_TRIM)
      and FUA writes, issued in batches of 1..8 non-overlapping requests in
      flight.  Every op is appended to JOURNAL *before* it is sent:
          W OFF LEN VAL          a write/zero of LEN bytes of VAL
      After a batch completes, FUA writes are recorded as durable:
          C OFF LEN VAL
      and every K ops a flush is sent; when it returns the line
          F SEQ
      is appended and the journal fsync'd.  (With the journal, the model
      state at every completed flush is known exactly: the last value
      written to each sector before the F line.)

  crashwriter.py check JOURNAL IMAGE_RAW INITIAL_RAW
      Replays the journal.  Every 512 B sector of the image (converted to
      raw after the crash) must hold uniformly one value, and that value
      must be either what the last completed flush (or a later completed
      FUA write) promised, or a value written to that sector after it.
"""
import os
import random
import sys

SECTOR = 512


def do_write(a):
    sys.path.insert(0, "/usr/lib/python3/dist-packages")
    import nbd
    rng = random.Random(a.seed)
    h = nbd.NBD()
    h.connect_uri(a.uri)
    fd = os.open(a.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def log(s):
        os.write(fd, (s + "\n").encode())

    size = a.size
    nsec = size // SECTOR
    # a hot area (a quarter of the disk) gets most ops, so clusters are
    # rewritten, partially overwritten and zeroed over and over
    hot = max(64, nsec // 4)
    nops = 0
    flushes = 0
    try:
        while True:
            k = rng.randint(1, 8)
            taken = []
            batch = []
            for _ in range(k):
                ln = rng.choice([1, 1, 2, 3, 7, 8, 16, 64, 128, 512])
                ln = min(ln, 512)
                if rng.random() < 0.7:
                    s = rng.randrange(0, hot - ln + 1)
                else:
                    s = rng.randrange(0, nsec - ln + 1)
                if any(s < e and t < s + ln for t, e in taken):
                    continue
                taken.append((s, s + ln))
                off, length = s * SECTOR, ln * SECTOR
                r = rng.random()
                if r < 0.12:
                    kind, val = "zero", 0
                elif r < 0.2:
                    kind, val = "zerot", 0
                else:
                    kind = "fua" if r > 0.92 else "write"
                    val = (nops * 31 + a.seed) % 255 + 1
                log("W %d %d %d" % (off, length, val))
                if kind == "zero":
                    c = h.aio_zero(length, off, flags=nbd.CMD_FLAG_NO_HOLE)
                    buf = None
                elif kind == "zerot":
                    c = h.aio_zero(length, off)
                    buf = None
                else:
                    buf = nbd.Buffer.from_bytearray(bytearray([val]) * length)
                    c = h.aio_pwrite(buf, off,
                                     flags=nbd.CMD_FLAG_FUA if kind == "fua"
                                     else 0)
                batch.append((c, buf, kind, off, length, val))
                nops += 1
            for c, buf, kind, off, length, val in batch:
                while not h.aio_command_completed(c):
                    h.poll(-1)
            for c, buf, kind, off, length, val in batch:
                if kind == "fua":
                    log("C %d %d %d" % (off, length, val))
            if nops // a.flush_every != (nops - len(batch)) // a.flush_every:
                h.flush()
                flushes += 1
                log("F %d" % flushes)
                os.fsync(fd)
    except nbd.Error as e:
        print("crashwriter: stopped after %d ops, %d flushes: %s"
              % (nops, flushes, e.string), file=sys.stderr)
    os.fsync(fd)
    os.close(fd)


def do_check(a):
    init = open(a.initial, "rb").read()
    img = open(a.image, "rb").read()
    if len(img) != len(init):
        print("size differs: %d vs %d" % (len(img), len(init)))
        return 1
    nsec = len(init) // SECTOR

    def uniform(buf, i):
        s = buf[i * SECTOR:(i + 1) * SECTOR]
        return s[0] if s == bytes([s[0]]) * SECTOR else None

    committed = {}          # sector -> value promised (missing: initial)
    last = {}               # sector -> last value written (for next flush)
    pending = {}            # sector -> set of values written since flush
    nflush = 0
    for line in open(a.journal):
        f = line.split()
        if not f:
            continue
        if f[0] == "W":
            off, ln, val = int(f[1]), int(f[2]), int(f[3])
            for i in range(off // SECTOR, (off + ln) // SECTOR):
                last[i] = val
                pending.setdefault(i, set()).add(val)
        elif f[0] == "C":
            off, ln, val = int(f[1]), int(f[2]), int(f[3])
            for i in range(off // SECTOR, (off + ln) // SECTOR):
                # durable now; anything written before it is overwritten,
                # anything after it is still pending (not possible here:
                # C is logged once the batch is done, before the next one)
                committed[i] = val
                pending.pop(i, None)
        elif f[0] == "F":
            for i in pending:
                committed[i] = last[i]
            pending = {}
            nflush += 1
        # a truncated last line (the writer died mid-write) is ignored

    bad = 0
    for i in range(nsec):
        got = uniform(img, i)
        if i in committed:
            want = committed[i]
        else:
            want = uniform(init, i)
            if want is None:
                # non-uniform initial sector: must be untouched, unless
                # written after the last flush
                if img[i * SECTOR:(i + 1) * SECTOR] == \
                        init[i * SECTOR:(i + 1) * SECTOR]:
                    continue
        allowed = {want} | pending.get(i, set())
        if got not in allowed:
            bad += 1
            if bad <= 20:
                print("sector %d (offset %d): got %s, allowed %s "
                      "(promised by flush: %s)"
                      % (i, i * SECTOR,
                         "non-uniform data" if got is None else got,
                         sorted(x for x in allowed if x is not None),
                         want))
    print("checked %d sectors, %d flushes replayed, %d sectors pending, "
          "%d bad" % (nsec, nflush, len(pending), bad))
    return 1 if bad else 0


def main():
    import argparse
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("write")
    w.add_argument("uri")
    w.add_argument("journal")
    w.add_argument("--seed", type=int, required=True)
    w.add_argument("--size", type=int, required=True)
    w.add_argument("--flush-every", type=int, default=20)
    c = sub.add_parser("check")
    c.add_argument("journal")
    c.add_argument("image")
    c.add_argument("initial")
    a = p.parse_args()
    if a.mode == "write":
        do_write(a)
        return 0
    return do_check(a)


if __name__ == "__main__":
    sys.exit(main())
