#!/usr/bin/python3
"""Static ordering check of a writelog.c log against a base qcow2 image
(tests/crash.bats).

write-order.py LOG BASE_IMAGE

Replays the log on two images in memory: 'cur' (every write) and 'dur'
(writes up to the last completed fdatasync).  Reports a write that makes
on-disk metadata point at something whose earlier writes are not yet
durable, or whose refcount is 0 on durable storage:
  L1 entry -> L2 table, reftable entry -> refcount block,
  L2 entry -> data cluster,
and a refcount drop to 0 of a cluster still referenced by durable L1/L2.
Single-file images only (no external data file)."""
import mmap, struct, sys

HDR = struct.Struct("<IIIIQQQ")
log, basep = sys.argv[1], sys.argv[2]
cur = bytearray(open(basep, "rb").read())
dur = bytearray(cur)
pending = []                     # writes since the last sync: (off, data)

def be64(b, o): return struct.unpack_from(">Q", b, o)[0]
def be32(b, o): return struct.unpack_from(">I", b, o)[0]

cbits = be32(cur, 20); cs = 1 << cbits
l1_size = be32(cur, 36); l1_off = be64(cur, 40)
incompat = be64(cur, 72) if be32(cur, 4) >= 3 else 0
ext = bool(incompat & 16)
rorder = be32(cur, 96) if be32(cur, 4) >= 3 else 4
esz = 16 if ext else 8
l2_entries = cs // esz
MASK = 0x00fffffffffffe00


def rt_info(img):
    return be64(img, 48), be32(img, 56)


def get(img, off, n):
    if off >= len(img):
        return bytes(n)
    b = bytes(img[off:off + n])
    return b + bytes(n - len(b))


def put(img, off, data):
    if off + len(data) > len(img):
        img.extend(bytes(off + len(data) - len(img)))
    img[off:off + len(data)] = data


def refcount(img, cluster):
    rto, rtc = rt_info(img)
    per = cs * 8 >> rorder
    i = cluster // per
    if i >= rtc * cs // 8:
        return 0
    b = be64(get(img, rto + i * 8, 8), 0) & ~0x1ff
    if b == 0:
        return 0
    j = cluster % per
    bits = 1 << rorder
    if bits >= 8:
        return int.from_bytes(get(img, b + j * bits // 8, bits // 8), "big")
    byte = get(img, b + j * bits // 8, 1)[0]
    return (byte >> ((j % (8 // bits)) * bits)) & ((1 << bits) - 1)


def l1_targets(img):
    t = get(img, l1_off, l1_size * 8)
    return [be64(t, i * 8) & MASK for i in range(l1_size)]


def referenced(img):
    """Host clusters referenced by the active L1/L2 (not snapshots)."""
    refs = set()
    for l2 in l1_targets(img):
        if not l2:
            continue
        refs.add(l2 >> cbits)
        t = get(img, l2, cs)
        for k in range(l2_entries):
            e = be64(t, k * esz)
            if e & (1 << 62):
                continue
            if e & MASK:
                refs.add((e & MASK) >> cbits)
    return refs


def changed_pointers(off, data, old, start, end, mask):
    """(index, new target) of each 8-byte entry of the table [start, end)
    that the write [off, off+len(data)) covers whole and points elsewhere."""
    for eo in range(max(off, start), min(off + len(data), end), 8):
        if (eo - start) % 8 or eo + 8 > off + len(data):
            continue
        ne = be64(data, eo - off) & mask
        if ne and ne != be64(old, eo - off) & mask:
            yield (eo - start) // 8, ne


fh = open(log, "rb")
mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
last_write = {}                  # cluster -> index of last write
last_sync = -1
pos = i = 0
viol = 0
ref_cache = None


def report(msg):
    global viol
    viol += 1
    if viol <= 30:
        print(f"VIOLATION at record {i}: {msg}")


first_write = {}
checked = {"l1": 0, "reftable": 0, "l2": 0}   # pointer changes examined


def unsynced(cluster):
    # the first write since the cluster was (re)allocated must be durable;
    # later partial updates leave valid older states behind
    fw = first_write.get(cluster, -1)
    return fw > last_sync


def check_pointer(kind, desc, target, needs_refcount=True):
    # what a pointer written now points at must already be durable, and
    # (but for refcount blocks) counted by a durable refcount
    checked[kind] += 1
    c = target >> cbits
    if unsynced(c):
        report(f"{desc} {target:#x} whose first write (record {first_write[c]}) is not synced")
    if needs_refcount and refcount(dur, c) == 0:
        report(f"{desc} {target:#x} with durable refcount 0")


while pos < len(mm):
    magic, typ, f, _, off, ln, extra = HDR.unpack_from(mm, pos)
    d = pos + HDR.size
    pos = d + (ln if typ == 1 else 0)
    if typ == 2:
        for o, data in pending:
            put(dur, o, data)
        pending = []
        last_sync = i
        ref_cache = None
    elif typ == 1:
        data = mm[d:d + ln]
        old = get(cur, off, ln)
        l2set = set(t for t in l1_targets(cur) if t)
        # L1 table write
        for k, ne in changed_pointers(off, data, old, l1_off,
                                      l1_off + l1_size * 8, MASK):
            check_pointer("l1", f"L1[{k}] -> L2 table", ne)
        # refcount table write
        rto, rtc = rt_info(cur)
        for k, ne in changed_pointers(off, data, old, rto, rto + rtc * cs,
                                      ~0x1ff):
            check_pointer("reftable", f"reftable[{k}] -> block", ne,
                          needs_refcount=False)
        # L2 slice write (cluster is a current L2 table)
        c0 = off >> cbits
        if (c0 << cbits) in l2set and ln <= cs:
            for eo in range(off // esz * esz, off + ln, esz):
                if eo < off or eo + 8 > off + ln:
                    continue
                ne = be64(data, eo - off)
                oe = be64(old, eo - off)
                if ne & (1 << 62):
                    continue
                nh = ne & MASK
                if nh and nh != (oe & MASK):
                    check_pointer("l2", f"L2 entry at {eo:#x} -> data", nh)
        # refcount drops to 0 while durable metadata still references it
        rto, rtc = rt_info(cur)
        blocks = set(be64(get(cur, rto + k * 8, 8), 0) & ~0x1ff for k in range(rtc * cs // 8))
        if (c0 << cbits) in blocks and rorder >= 3:
            per = cs * 8 >> rorder
            bits = 1 << rorder
            bidx = [k for k in range(rtc * cs // 8) if be64(get(cur, rto + k * 8, 8), 0) & ~0x1ff == c0 << cbits][0]
            for bo in range(off, off + ln, bits // 8):
                j = (bo - (c0 << cbits)) * 8 // bits
                nv = int.from_bytes(data[bo - off:bo - off + bits // 8], "big")
                ov = int.from_bytes(old[bo - off:bo - off + bits // 8], "big")
                if ov and not nv:
                    cl = bidx * per + j
                    if ref_cache is None:
                        ref_cache = referenced(dur)
                    if cl in ref_cache:
                        report(f"refcount of cluster {cl} ({cl << cbits:#x}) -> 0 while durable L1/L2 references it")
        put(cur, off, data)
        pending.append((off, bytes(data)))
        for c in range(off >> cbits, (off + ln - 1 >> cbits) + 1):
            last_write[c] = i
            first_write.setdefault(c, i)
    elif typ in (4, 5):
        # punch / zero range: a write of zeros
        z = bytes(ln)
        put(cur, off, z)
        pending.append((off, z))
        for c in range(off >> cbits, (off + ln - 1 >> cbits) + 1):
            last_write[c] = i
    i += 1
print(f"ORDER: {i} records, {viol} violations")
print("CHECKED: " + " ".join(f"{k}={v}" for k, v in checked.items()))
sys.exit(1 if viol else 0)
