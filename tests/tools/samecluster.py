#!/usr/bin/python3
"""Two connections write different blocks of the same fresh cluster at the
same time, over many fresh clusters, with many requests in flight.

    samecluster.py URI CLUSTER_SIZE NCLUSTERS EXPECTED_RAW [--block B]
                   [--start OFF]

For cluster i (at START + i*CLUSTER_SIZE) connection 0 writes block
(i % nblk) and connection 1 writes block ((i + 1 + i // nblk) % nblk) of
the cluster (never the same block), each with its own byte pattern.  Both
writes of a batch of 32 clusters are issued before any is waited for, so
the server sees up to 64 concurrent writes, two per cluster.  Afterwards
both connections read everything back and check it; EXPECTED_RAW (a copy
of the image's guest content before the run, as raw) is updated in place
so the caller can compare it with the image after the server stops.
"""
import sys
sys.path.insert(0, "/usr/lib/python3/dist-packages")
import argparse
import nbd

p = argparse.ArgumentParser()
p.add_argument("uri")
p.add_argument("cluster", type=int)
p.add_argument("n", type=int)
p.add_argument("expected")
p.add_argument("--block", type=int, default=4096)
p.add_argument("--start", type=int, default=0)
a = p.parse_args()

cs, blk = a.cluster, a.block
nblk = cs // blk
h = [nbd.NBD(), nbd.NBD()]
for x in h:
    x.connect_uri(a.uri)
assert h[0].can_multi_conn()

exp = open(a.expected, "r+b")
writes = []                      # (offset, data)


def pat(i, who):
    return bytes([(i * 7 + who * 101) % 255 + 1]) * blk


BATCH = 32
for b0 in range(0, a.n, BATCH):
    cookies = []
    for i in range(b0, min(a.n, b0 + BATCH)):
        base = a.start + i * cs
        k0 = i % nblk
        k1 = (i + 1 + i // nblk) % nblk
        if k1 == k0:
            k1 = (k0 + 1) % nblk
        for who, k in ((0, k0), (1, k1)):
            off = base + k * blk
            d = pat(i, who)
            writes.append((off, d))
            buf = nbd.Buffer.from_bytearray(bytearray(d))
            cookies.append((h[who], buf, h[who].aio_pwrite(buf, off)))
    # drive both connections until everything of this batch is done
    pending = cookies
    while pending:
        for x in h:
            if x.aio_in_flight() > 0:
                x.poll(1)
        pending = [(x, buf, c) for x, buf, c in pending
                   if not x.aio_command_completed(c)]

for x in h:
    x.flush()

bad = 0
for off, d in writes:
    for who in (0, 1):
        got = h[who].pread(len(d), off)
        if got != d:
            bad += 1
            if bad <= 10:
                print("conn %d: block at %d: expected 0x%02x, got %r..."
                      % (who, off, d[0], bytes(got[:8])), file=sys.stderr)
    exp.seek(off)
    exp.write(d)
exp.close()
for x in h:
    x.shutdown()
if bad:
    print("%d bad reads" % bad, file=sys.stderr)
    sys.exit(1)
