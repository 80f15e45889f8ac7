#!/usr/bin/python3
# abrupt.py URI SEED: queues 64 writes (64 KiB each, some allocating,
# some copy-on-write) and exits without waiting for the replies, as a
# client that crashes mid-stream does.
import os
import random
import sys

import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
rng = random.Random(int(sys.argv[2]))
size = h.get_size()
buf = nbd.Buffer.from_bytearray(bytearray([rng.randrange(1, 256)]) * 65536)
for _ in range(64):
    h.aio_pwrite(buf, rng.randrange(0, size // 65536) * 65536)
for _ in range(3):
    h.poll(0)
os._exit(0)
