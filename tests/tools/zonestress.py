#!/usr/bin/python3
"""Concurrent writes, zeroes, trims, reads and flushes from several
connections, checked against a model of the disk.

    zonestress.py URI MODEL_RAW --seed S [--conns C] [--depth D]
                  [--zone Z] [--ops N]

The disk is cut into zones of Z bytes (a multiple of the cluster size);
zone z belongs to connection z % C.  Each connection keeps up to D
requests in flight, never two on the same zone, so every zone sees a
well-defined order of operations while the server handles many zones,
and all its metadata (allocation, refcounts, L2 tables, copy-on-write
from a backing file, freeing), concurrently.  Reads are checked against
the model as they complete.  Content after a trim is unspecified in
NBD, so the trimmed range is read back and the model takes what the
server returns.  MODEL_RAW holds the guest content before the run (as
raw) and is updated in place, so the caller can compare it with the
image once the server has stopped.
"""
import sys
sys.path.insert(0, "/usr/lib/python3/dist-packages")
import argparse
import random
import threading
import nbd

p = argparse.ArgumentParser()
p.add_argument("uri")
p.add_argument("model")
p.add_argument("--seed", type=int, required=True)
p.add_argument("--conns", type=int, default=2)
p.add_argument("--depth", type=int, default=16)
p.add_argument("--zone", type=int, default=256 << 10)
p.add_argument("--ops", type=int, default=3000)
a = p.parse_args()

model = bytearray(open(a.model, "rb").read())
size = len(model)
nzones = size // a.zone
errors = []
lock = threading.Lock()         # guards model and errors


def fail(msg):
    with lock:
        errors.append(msg)


def pick_range(r, zone):
    """A random range inside the zone: sometimes tiny and unaligned,
    sometimes whole clusters, sometimes the whole zone."""
    base = zone * a.zone
    kind = r.random()
    if kind < 0.4:
        n = r.randrange(1, 8192)
    elif kind < 0.8:
        n = r.choice((4096, 65536, 2 * 65536))
    else:
        n = a.zone
    n = min(n, a.zone)
    off = base + r.randrange(0, a.zone - n + 1)
    if kind >= 0.4 and r.random() < 0.7:
        off = base + (off - base) // 4096 * 4096
        n = min(n, base + a.zone - off)
    return off, n


def worker(k):
    r = random.Random("zonestress/%d/%d" % (a.seed, k))
    h = nbd.NBD()
    h.connect_uri(a.uri)
    mine = [z for z in range(nzones) if z % a.conns == k]
    busy = {}                   # zone -> (cookie, op, off, n, buf)
    done = 0
    issued = 0
    while done < a.ops:
        while issued < a.ops and len(busy) < a.depth:
            free = [z for z in mine if z not in busy]
            if not free:
                break
            z = r.choice(free)
            off, n = pick_range(r, z)
            op = r.choices(("write", "zero", "trim", "read", "flush"),
                           (50, 12, 8, 25, 2))[0]
            buf = None
            if op == "write":
                data = bytes([r.randrange(1, 256)]) * n
                buf = nbd.Buffer.from_bytearray(bytearray(data))
                c = h.aio_pwrite(buf, off)
            elif op == "zero":
                flags = nbd.CMD_FLAG_NO_HOLE if r.random() < 0.5 else 0
                c = h.aio_zero(n, off, flags=flags)
            elif op == "trim":
                c = h.aio_trim(n, off)
            elif op == "read":
                buf = nbd.Buffer(n)
                c = h.aio_pread(buf, off)
            else:
                c = h.aio_flush()
            busy[z] = (c, op, off, n, buf)
            issued += 1
        h.poll(1)
        for z, (c, op, off, n, buf) in list(busy.items()):
            try:
                if not h.aio_command_completed(c):
                    continue
            except nbd.Error as e:
                fail("conn %d: %s at %d+%d failed: %s" % (k, op, off, n, e))
                del busy[z]
                done += 1
                continue
            del busy[z]
            done += 1
            with lock:
                if op == "write":
                    model[off:off + n] = buf.to_bytearray()
                elif op == "zero":
                    model[off:off + n] = bytes(n)
                elif op == "read":
                    got = buf.to_bytearray()
                    if got != model[off:off + n]:
                        errors.append("conn %d: read %d+%d differs from the "
                                      "model" % (k, off, n))
            if op == "trim":
                # The zone is still ours alone: nothing races this read.
                got = h.pread(n, off)
                with lock:
                    model[off:off + n] = got
    h.flush()
    h.shutdown()


threads = [threading.Thread(target=worker, args=(k,))
           for k in range(a.conns)]
for t in threads:
    t.start()
for t in threads:
    t.join()

# Everything once more, from a fresh connection.
h = nbd.NBD()
h.connect_uri(a.uri)
step = 4 << 20
for off in range(0, size, step):
    n = min(step, size - off)
    if h.pread(n, off) != model[off:off + n]:
        errors.append("final read %d+%d differs from the model" % (off, n))
h.shutdown()
with open(a.model, "r+b") as f:
    f.write(model)
for e in errors[:20]:
    print(e, file=sys.stderr)
sys.exit(1 if errors else 0)
