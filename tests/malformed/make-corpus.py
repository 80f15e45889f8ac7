#!/usr/bin/python3
"""Build a corpus of malformed qcow2 images for tests/malformed.bats.

Usage:  /usr/bin/python3 make-corpus.py OUTDIR [--qemu-report]

First a few valid base images are made with qemu-img / qemu-io (files named
base-*.qcow2, each with a raw reference base-*.raw of its guest contents).
Then every malformed case CASE.qcow2 is written by copying a base image and
patching bytes (struct.pack, big-endian).  The layout of the bases is fixed
and tests/malformed.bats relies on it:

base-v3     v3, 64 KiB clusters, 4 MiB.  Guest clusters: 0 = 0xa1, 1 = 0xa2,
            2 = compressed (zlib) 0xc3, 3 = zero flag (unmapped), 4 = 0xa5,
            the rest unallocated.  Host: reftable 0x10000, refblock 0x20000,
            L1 0x30000, L2 0x40000 (checked below, not assumed).
base-v3-4k  v3, 4 KiB clusters, 8 MiB, so one L2 table covers 2 MiB and the
            L1 has 4 entries.  0xb1 at 0, 0xb2 at 2M, 0xb3 at 4M, 0xb4 at 6M
            (64 KiB each).  Used for the L1-entry cases (L1[1] = 2M..4M).
base-v2     compat=0.10 (version 2), 64 KiB clusters, 4 MiB: 0xe1 at 0,
            0xe2 at 64k.
base-snap   v3 with one internal snapshot (qemu-img snapshot -c snap1):
            0x51 at 0 before the snapshot, 0x52 at 0 after it.
base-extl2  v3, extended_l2=on, 64 KiB clusters (2 KiB subclusters), 4 MiB:
            0x71 cluster 0, 0x72 cluster 1, 0x73 on subcluster 1 of cluster 2.
base-backing + base-overlay
            base-backing: 0x81 on 0..128k.  base-overlay (backing file
            "base-backing.qcow2", format qcow2): 0x82 on 64k..128k.

With --qemu-report, print what `qemu-img info` and `qemu-img check` say about
each case (the comments in CASES summarise that output for QEMU 7.2).
"""

import os
import shutil
import struct
import subprocess
import sys

MAGIC = 0x514649FB
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857

# Header field offsets (section 1.2 of qcow2-format.md).
H_MAGIC, H_VERSION, H_BACKING_OFF, H_BACKING_SIZE = 0, 4, 8, 16
H_CLUSTER_BITS, H_SIZE, H_CRYPT, H_L1_SIZE, H_L1_OFF = 20, 24, 32, 36, 40
H_RT_OFF, H_RT_CLUSTERS, H_NB_SNAP, H_SNAP_OFF = 48, 56, 60, 64
H_INCOMPAT, H_COMPAT, H_AUTOCLEAR, H_REFCOUNT_ORDER = 72, 80, 88, 96
H_HEADER_LENGTH, H_COMPRESSION_TYPE = 100, 104

# A distinctive name for the unknown incompatible bit 10; the bats test
# expects the plugin's error message to contain it.
BIT10_NAME = b"nbdkit-test-frobnicator"


def run(*args):
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
    if r.returncode != 0:
        sys.exit("make-corpus: %s failed:\n%s" % (" ".join(args), r.stdout))
    return r.stdout


class Qcow2:
    """Just enough of a qcow2 reader to find the bytes to patch."""

    def __init__(self, path):
        with open(path, "rb") as f:
            self.b = bytearray(f.read())

    def save(self, path):
        with open(path, "wb") as f:
            f.write(self.b)

    def u8(self, off):
        return self.b[off]

    def u32(self, off):
        return struct.unpack_from(">I", self.b, off)[0]

    def u64(self, off):
        return struct.unpack_from(">Q", self.b, off)[0]

    def put8(self, off, v):
        struct.pack_into(">B", self.b, off, v)

    def put16(self, off, v):
        struct.pack_into(">H", self.b, off, v)

    def put32(self, off, v):
        struct.pack_into(">I", self.b, off, v)

    def put64(self, off, v):
        struct.pack_into(">Q", self.b, off, v)

    @property
    def cluster_bits(self):
        return self.u32(H_CLUSTER_BITS)

    @property
    def cluster_size(self):
        return 1 << self.cluster_bits

    @property
    def version(self):
        return self.u32(H_VERSION)

    @property
    def header_length(self):
        return self.u32(H_HEADER_LENGTH) if self.version >= 3 else 72

    @property
    def incompat(self):
        return self.u64(H_INCOMPAT) if self.version >= 3 else 0

    @property
    def extended_l2(self):
        return bool(self.incompat & (1 << 4))

    @property
    def l1_offset(self):
        return self.u64(H_L1_OFF)

    def file_size(self):
        return len(self.b)

    def beyond_eof(self, extra_clusters=64):
        """A cluster-aligned offset well past the end of the file."""
        cs = self.cluster_size
        return (len(self.b) + cs - 1) // cs * cs + extra_clusters * cs

    def l1_entry_addr(self, idx):
        assert idx < self.u32(H_L1_SIZE)
        return self.l1_offset + 8 * idx

    def l2_entry_addr(self, guest_off):
        esz = 16 if self.extended_l2 else 8
        c = guest_off // self.cluster_size
        l1i, l2i = divmod(c, self.cluster_size // esz)
        l2 = self.u64(self.l1_entry_addr(l1i)) & L1E_OFFSET_MASK
        assert l2, "guest offset %#x has no L2 table" % guest_off
        return l2 + esz * l2i

    def compressed_desc(self, guest_off):
        e = self.u64(self.l2_entry_addr(guest_off))
        assert e & COMPRESSED, "guest offset %#x not compressed" % guest_off
        x = 62 - (self.cluster_bits - 8)
        coff = e & ((1 << x) - 1)
        nb = (e >> x) & ((1 << (self.cluster_bits - 8)) - 1)
        return coff, nb, (nb + 1) * 512 - (coff & 511)

    def extensions(self):
        """[(type, data)] up to (not including) the end marker."""
        off, out = self.header_length, []
        while off + 8 <= self.cluster_size:
            t, n = struct.unpack_from(">II", self.b, off)
            if t == EXT_END:
                break
            out.append((t, bytes(self.b[off + 8:off + 8 + n])))
            off += 8 + (n + 7) // 8 * 8
        return out

    def set_extensions(self, exts):
        """Rewrite the whole extension area (it must still fit)."""
        start = self.header_length
        area = b""
        for t, data in exts:
            area += struct.pack(">II", t, len(data)) + data
            area += b"\0" * (-len(data) % 8)
        area += struct.pack(">II", EXT_END, 0)
        limit = self.u64(H_BACKING_OFF) or self.cluster_size
        old_end = start
        for t, data in self.extensions():
            old_end += 8 + (len(data) + 7) // 8 * 8
        old_end += 8
        assert start + len(area) <= limit, "extensions do not fit"
        self.b[start:max(old_end, start + len(area))] = b"\0" * max(
            old_end - start, len(area))
        self.b[start:start + len(area)] = area

    def set_backing_name(self, name):
        off = self.u64(H_BACKING_OFF)
        assert off and off + len(name) <= self.cluster_size
        self.b[off:off + max(len(name), self.u32(H_BACKING_SIZE))] = \
            b"\0" * max(len(name), self.u32(H_BACKING_SIZE))
        self.b[off:off + len(name)] = name
        self.put32(H_BACKING_SIZE, len(name))


# ---------------------------------------------------------------------------
# Base images.

def qemu_img_create(path, size, opts, backing=None):
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    run(*args, path, size)


def qemu_io(path, *cmds):
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    run(*args, path)


def to_raw(out, name):
    # Run from OUTDIR so relative backing names resolve as in the image.
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                    name + ".qcow2", name + ".raw"], cwd=out, check=True)


def make_bases(out):
    p = lambda n: os.path.join(out, n + ".qcow2")

    qemu_img_create(p("base-v3"), "4M", "compat=1.1,cluster_size=65536")
    qemu_io(p("base-v3"),
            "write -P 0xa1 0 64k", "write -P 0xa2 64k 64k",
            "write -c -P 0xc3 128k 64k",
            "write -P 0xd4 192k 64k", "write -z -u 192k 64k",
            "write -P 0xa5 256k 64k")
    q = Qcow2(p("base-v3"))
    assert q.u64(H_RT_OFF) == 0x10000 and q.l1_offset == 0x30000
    assert q.u64(q.l1_entry_addr(0)) & L1E_OFFSET_MASK == 0x40000
    assert q.u64(q.l2_entry_addr(0x10000)) & COPIED
    assert q.u64(q.l2_entry_addr(0x20000)) & COMPRESSED
    assert q.u64(q.l2_entry_addr(0x30000)) == 1       # ZERO_PLAIN
    assert q.u32(H_HEADER_LENGTH) == 112

    qemu_img_create(p("base-v3-4k"), "8M", "compat=1.1,cluster_size=4096")
    qemu_io(p("base-v3-4k"),
            "write -P 0xb1 0 64k", "write -P 0xb2 2M 64k",
            "write -P 0xb3 4M 64k", "write -P 0xb4 6M 64k")
    q = Qcow2(p("base-v3-4k"))
    assert q.u32(H_L1_SIZE) == 4
    assert all(q.u64(q.l1_entry_addr(i)) for i in range(4))

    qemu_img_create(p("base-v2"), "4M", "compat=0.10,cluster_size=65536")
    qemu_io(p("base-v2"), "write -P 0xe1 0 64k", "write -P 0xe2 64k 64k")
    assert Qcow2(p("base-v2")).version == 2

    qemu_img_create(p("base-snap"), "4M", "compat=1.1,cluster_size=65536")
    qemu_io(p("base-snap"), "write -P 0x51 0 64k")
    run("qemu-img", "snapshot", "-c", "snap1", p("base-snap"))
    qemu_io(p("base-snap"), "write -P 0x52 0 64k")
    assert Qcow2(p("base-snap")).u32(H_NB_SNAP) == 1

    qemu_img_create(p("base-extl2"), "4M",
                    "compat=1.1,cluster_size=65536,extended_l2=on")
    qemu_io(p("base-extl2"), "write -P 0x71 0 64k", "write -P 0x72 64k 64k",
            "write -P 0x73 130k 2k")
    q = Qcow2(p("base-extl2"))
    assert q.extended_l2
    assert q.u64(q.l2_entry_addr(0x10000) + 8) == 0xFFFFFFFF

    qemu_img_create(p("base-backing"), "4M", "compat=1.1,cluster_size=65536")
    qemu_io(p("base-backing"), "write -P 0x81 0 128k")
    # Relative backing name: resolved against the overlay's directory.
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                    "-o", "compat=1.1,cluster_size=65536",
                    "-b", "base-backing.qcow2", "-F", "qcow2",
                    "base-overlay.qcow2", "4M"], cwd=out, check=True)
    qemu_io(p("base-overlay"), "write -P 0x82 64k 64k")
    q = Qcow2(p("base-overlay"))
    assert q.u64(H_BACKING_OFF) and \
        (EXT_BACKING_FORMAT, b"qcow2") in q.extensions()

    for n in ("base-v3", "base-v3-4k", "base-v2", "base-snap", "base-extl2",
              "base-backing", "base-overlay"):
        to_raw(out, n)


# ---------------------------------------------------------------------------
# Cases: name -> (base, function patching a Qcow2).  The comments record
# what QEMU 7.2 says about each image (`qemu-img info -U` / `check -U`,
# from --qemu-report); where nothing else is said, both fail with that
# message.

CASES = {}


def case(name, base):
    def reg(fn):
        CASES[name] = (base, fn)
        return fn
    return reg


# --- header: magic, version, cluster_bits --------------------------------

@case("magic-bad", "base-v3")
def _(q):
    # qemu-img info -f qcow2: "Image is not in qcow2 format"
    q.b[0:4] = b"QFI\x00"


@case("version-1", "base-v3")
def _(q):
    # qemu: "Unsupported qcow2 version 1"
    q.put32(H_VERSION, 1)


@case("version-4", "base-v3")
def _(q):
    # qemu: "Unsupported qcow2 version 4"
    q.put32(H_VERSION, 4)


for _bits in (8, 22, 30, 255):
    # qemu: "Unsupported cluster size: 2^8" (same for 22, 30, 255)
    case("cluster-bits-%d" % _bits, "base-v3")(
        lambda q, v=_bits: q.put32(H_CLUSTER_BITS, v))


# --- L1 table --------------------------------------------------------------

@case("l1-size-huge", "base-v3")
def _(q):
    # qemu: "Active L1 table too large"
    q.put32(H_L1_SIZE, 0x7FFFFFFF)


@case("l1-size-wrap", "base-v3")
def _(q):
    # 0x20000001 entries = 4 GiB + 8 bytes: wraps to 8 in 32-bit arithmetic.
    # qemu: "Active L1 table too large"
    q.put32(H_L1_SIZE, 0x20000001)


@case("l1-size-too-small", "base-v3")
def _(q):
    # size 1 GiB needs 2 L1 entries at 64 KiB clusters; l1_size stays 1.
    # qemu: "L1 table is too small"
    assert q.u32(H_L1_SIZE) == 1
    q.put64(H_SIZE, 1 << 30)


@case("l1-size-zero", "base-v3")
def _(q):
    # qemu: "L1 table is too small"
    q.put32(H_L1_SIZE, 0)


@case("l1-offset-unaligned", "base-v3")
def _(q):
    # qemu: "Invalid L1 table offset"
    q.put64(H_L1_OFF, q.l1_offset + 0x200)


@case("l1-offset-past-eof", "base-v3")
def _(q):
    # qemu: info opens it (the L1 reads as zeros past EOF, so the disk reads
    # as zeros); check rc=2 "ERROR: counting reference for region exceeding
    # the end of the file by one cluster or more".
    q.put64(H_L1_OFF, q.beyond_eof())


# --- refcount table ----------------------------------------------------------

@case("refcount-offset-unaligned", "base-v3")
def _(q):
    # qemu: "Invalid reference count table offset"
    q.put64(H_RT_OFF, q.u64(H_RT_OFF) + 0x200)


@case("refcount-offset-past-eof", "base-v3")
def _(q):
    # qemu: info opens it; check rc=2 "ERROR: counting reference for region
    # exceeding the end of the file ...", "ERROR cluster 0 refcount=0
    # reference=1".
    q.put64(H_RT_OFF, q.beyond_eof())


@case("refcount-clusters-huge", "base-v3")
def _(q):
    # qemu: "Reference count table too large"
    q.put32(H_RT_CLUSTERS, 0xFFFFFFFF)


@case("refcount-clusters-wrap", "base-v3")
def _(q):
    # 0x10001 clusters << 16 = 0x1_0001_0000 bytes: one cluster if truncated
    # to 32 bits.  qemu: "Reference count table too large"
    q.put32(H_RT_CLUSTERS, 0x10001)


@case("refcount-clusters-zero", "base-v3")
def _(q):
    # qemu: "Image does not contain a reference count table"
    q.put32(H_RT_CLUSTERS, 0)


# --- header_length -----------------------------------------------------------

@case("header-length-short", "base-v3")
def _(q):
    # qemu: "qcow2 header too short"
    q.put32(H_HEADER_LENGTH, 96)


@case("header-length-unaligned", "base-v3")
def _(q):
    # qemu 7.2 does not check the alignment itself; it then fails parsing
    # the extensions at 108: "Header extension too large"
    q.put32(H_HEADER_LENGTH, 108)


@case("header-length-past-cluster", "base-v3")
def _(q):
    # qemu: "qcow2 header exceeds cluster size"
    q.put32(H_HEADER_LENGTH, q.cluster_size + 8)


# --- header extensions -------------------------------------------------------

@case("ext-length-huge", "base-v3")
def _(q):
    # First extension (the feature name table) claims 0xffffff00 bytes.
    # qemu: "Header extension too large"
    off = q.header_length
    assert q.u32(off) == EXT_FEATURE_TABLE
    q.put32(off + 4, 0xFFFFFF00)


@case("ext-past-cluster", "base-v3")
def _(q):
    # Extension data runs 0x68 bytes past the end of cluster 0.
    # qemu: "Header extension too large"
    off = q.header_length
    q.put32(off + 4, q.cluster_size - off - 8 + 0x68)


# --- backing file name ------------------------------------------------------

@case("backing-offset-past-cluster", "base-overlay")
def _(q):
    # qemu: "Invalid backing file offset"
    q.put64(H_BACKING_OFF, q.cluster_size + 8)


@case("backing-name-past-cluster", "base-overlay")
def _(q):
    # Name starts 16 bytes before the end of cluster 0, 64 bytes long.
    # qemu: "Backing file name too long"
    q.put64(H_BACKING_OFF, q.cluster_size - 16)
    q.put32(H_BACKING_SIZE, 64)


@case("backing-size-1024", "base-overlay")
def _(q):
    # Offset unchanged (inside cluster 0), size 1024 > 1023.
    # qemu: "Backing file name too long"
    q.put32(H_BACKING_SIZE, 1024)


@case("backing-loop-self", "base-overlay")
def _(q):
    # Backing file is the image itself.  qemu-img info (no backing walk)
    # succeeds; check recurses: "Could not open backing file: Could not
    # open backing file: ... 'backing-loop-self.qcow2': Too many open files".
    q.set_backing_name(b"backing-loop-self.qcow2")


@case("backing-loop-pair", "base-overlay")
def _(q):
    # backing-loop-pair -> backing-loop-pair-b -> backing-loop-pair.
    # (The -b file is written by make_extra_files.)  qemu-img info
    # succeeds; qemu-img check opens the chain over and over, growing to
    # several GiB, until it fails ("Could not open backing file: Could not
    # open backing file: ..." under the 2 GiB limit of --qemu-report).
    q.set_backing_name(b"backing-loop-pair-b.qcow2")


@case("backing-missing", "base-overlay")
def _(q):
    # qemu: "Could not open backing file: Could not open
    # 'nonexistent-backing.qcow2': No such file or directory"
    q.set_backing_name(b"nonexistent-backing.qcow2")


# --- compression type -------------------------------------------------------

@case("compression-type-without-bit", "base-v3")
def _(q):
    # qemu: "Compression type incompatible feature bit must be set"
    q.put8(H_COMPRESSION_TYPE, 1)


@case("compression-bit-with-zlib", "base-v3")
def _(q):
    # qemu: "Compression type incompatible feature bit must not be set"
    q.put64(H_INCOMPAT, q.incompat | (1 << 3))


@case("compression-type-2", "base-v3")
def _(q):
    # qemu: "qcow2: unknown compression type: 2"
    q.put64(H_INCOMPAT, q.incompat | (1 << 3))
    q.put8(H_COMPRESSION_TYPE, 2)


# --- unknown incompatible feature ----------------------------------------

@case("incompat-bit10-named", "base-v3")
def _(q):
    # qemu: "Unsupported IMGFMT feature(s): nbdkit-test-frobnicator"
    exts = []
    for t, data in q.extensions():
        if t == EXT_FEATURE_TABLE:
            data += struct.pack(">BB46s", 0, 10, BIT10_NAME)
        exts.append((t, data))
    q.set_extensions(exts)
    q.put64(H_INCOMPAT, q.incompat | (1 << 10))


@case("incompat-bit10-unnamed", "base-v3")
def _(q):
    # qemu: "Unsupported IMGFMT feature(s): Unknown incompatible feature: 400"
    q.put64(H_INCOMPAT, q.incompat | (1 << 10))


# --- encryption ---------------------------------------------------------------

@case("encrypted-aes", "base-v3")
def _(q):
    # qemu-img info works; check (which opens for reading): "Parameter
    # 'encrypt.key-secret' is required for cipher"
    q.put32(H_CRYPT, 1)


@case("encrypted-luks-no-header", "base-v3")
def _(q):
    # crypt_method=2 without the full-disk-encryption header extension.
    # qemu-img check: "Missing CRYPTO header for crypt method 2";
    # qemu-img info -U crashes with SIGSEGV on it (QEMU 7.2.22).
    q.put32(H_CRYPT, 2)


# --- L1 entries (base-v3-4k: L1[1] covers guest 2M..4M) ---------------------

@case("l1-entry-unaligned", "base-v3-4k")
def _(q):
    # qemu check: "ERROR l2_offset=15200: Table is not cluster aligned; L1
    # entry corrupted"; reads of 2M..4M fail with EIO.
    a = q.l1_entry_addr(1)
    q.put64(a, q.u64(a) + 0x200)


@case("l1-entry-past-eof", "base-v3-4k")
def _(q):
    # qemu reads zeros past EOF, so 2M..4M reads as zeros (no read error);
    # check: "ERROR: counting reference for region exceeding the end of the
    # file by one cluster or more".
    a = q.l1_entry_addr(1)
    q.put64(a, COPIED | q.beyond_eof())


@case("l1-entry-reserved-bits", "base-v3-4k")
def _(q):
    # Bit 56 set (reserved).  qemu masks it off for reads (L1E_OFFSET_MASK)
    # and reads the data; check: "ERROR found L1 entry with reserved bits
    # set: 8100000000015000".
    a = q.l1_entry_addr(1)
    q.put64(a, q.u64(a) | (1 << 56))


# --- L2 entries (base-v3: guest cluster 1 = 64k..128k) ----------------------

@case("l2-entry-at-l1-table", "base-v3")
def _(q):
    # Data of guest cluster 1 "is" the L1 table's cluster.  qemu reads it
    # as data (no overlap check on reads); check: "ERROR cluster 3
    # refcount=1 reference=2".
    q.put64(q.l2_entry_addr(0x10000), COPIED | q.l1_offset)


@case("l2-entry-at-refcount-table", "base-v3")
def _(q):
    # Same with the refcount table's cluster.  check: "ERROR cluster 1
    # refcount=1 reference=2".
    q.put64(q.l2_entry_addr(0x10000), COPIED | q.u64(H_RT_OFF))


@case("l2-entry-past-eof", "base-v3")
def _(q):
    # qemu reads zeros past EOF; check: "ERROR: counting reference for
    # region exceeding the end of the file by one cluster or more".
    q.put64(q.l2_entry_addr(0x10000), COPIED | q.beyond_eof())


@case("l2-entry-unaligned", "base-v3")
def _(q):
    # qemu check: "ERROR offset=60200: Data cluster is not properly
    # aligned; L2 entry corrupted."  Reads of cluster 1 fail with EIO.
    a = q.l2_entry_addr(0x10000)
    q.put64(a, q.u64(a) + 0x200)


@case("l2-entry-reserved-bits", "base-v3")
def _(q):
    # Bit 56 set (reserved, bits 56-61).  qemu masks it off when reading;
    # check: "ERROR found l2 entry with reserved bits set: 8100000000060000".
    a = q.l2_entry_addr(0x10000)
    q.put64(a, q.u64(a) | (1 << 56))


@case("compressed-past-eof", "base-v3")
def _(q):
    # Guest cluster 2: compressed descriptor whose data lies 4 MiB past EOF.
    # check: "ERROR: counting reference for region exceeding the end of
    # the file ..."; qemu reads zeros there -> inflate fails -> EIO.
    a = q.l2_entry_addr(0x20000)
    coff, nb, _ = q.compressed_desc(0x20000)
    x = 62 - (q.cluster_bits - 8)
    q.put64(a, COMPRESSED | (nb << x) | (q.beyond_eof() + (coff & 511)))


@case("compressed-garbage", "base-v3")
def _(q):
    # The deflate stream is overwritten with 0xff (BTYPE=11, invalid).
    # qemu: EIO reading cluster 2; check does not look at the data
    # ("No errors were found on the image.").
    coff, nb, csize = q.compressed_desc(0x20000)
    end = min(coff + csize, len(q.b))
    q.b[coff:end] = b"\xff" * (end - coff)


@case("extl2-alloc-and-zero", "base-extl2")
def _(q):
    # Guest cluster 1: subcluster 5 both allocated (bit 5) and zero (bit 37).
    # qemu check: "ERROR offset=60000: Allocated cluster has corrupted
    # subcluster allocation bitmap"; reads of cluster 1 fail with EIO.
    a = q.l2_entry_addr(0x10000) + 8
    q.put64(a, q.u64(a) | (1 << (32 + 5)))


@case("extl2-bit0", "base-extl2")
def _(q):
    # Bit 0 (the zero flag of standard L2) set in an allocated entry
    # (cluster 0) and an empty one (cluster 3).  With extended L2 it means
    # nothing: qemu reads and writes normally, check finds no errors
    # (iotest 271: "We actually don't consider this a corrupted image").
    for g in (0, 0x30000):
        a = q.l2_entry_addr(g)
        q.put64(a, q.u64(a) | 1)

@case("snapshot-table-past-eof", "base-snap")
def _(q):
    # qemu: info opens it; check: "ERROR snapshot table entry 0 is
    # incomplete".
    q.put64(H_SNAP_OFF, q.beyond_eof())


@case("snapshot-count-huge", "base-snap")
def _(q):
    # qemu: "Snapshot table too large"
    q.put32(H_NB_SNAP, 0xFFFFFFFF)


# --- dirty / corrupt bits -----------------------------------------------------

@case("dirty-bit", "base-v3")
def _(q):
    # qemu: read-only opens fine ("No errors were found on the image.");
    # a rw open repairs the refcounts and clears the bit.
    q.put64(H_INCOMPAT, q.incompat | 1)


@case("corrupt-bit", "base-v3")
def _(q):
    # qemu: read-only opens fine (check: "No errors were found on the
    # image."); rw open: "Image is corrupt; cannot be opened read/write".
    q.put64(H_INCOMPAT, q.incompat | 2)


def make_extra_files(out):
    # The second half of the two-image backing loop.
    q = Qcow2(os.path.join(out, "base-overlay.qcow2"))
    q.set_backing_name(b"backing-loop-pair.qcow2")
    q.save(os.path.join(out, "backing-loop-pair-b.qcow2"))


def make_cases(out):
    for name, (base, fn) in CASES.items():
        q = Qcow2(os.path.join(out, base + ".qcow2"))
        before = bytes(q.b)
        fn(q)
        assert bytes(q.b) != before, name + ": patch changed nothing"
        q.save(os.path.join(out, name + ".qcow2"))
    make_extra_files(out)


def qemu_report(out):
    for name in CASES:
        img = name + ".qcow2"
        # The backing loops make qemu-img recurse: bound time and memory.
        lim = ["timeout", "10", "prlimit", "--as=%d" % (2 << 30)]
        info = subprocess.run(lim + ["qemu-img", "info", "-U", "-f", "qcow2",
                                     img], cwd=out, capture_output=True,
                              text=True)
        chk = subprocess.run(lim + ["qemu-img", "check", "-U", "-f", "qcow2",
                                    img], cwd=out, capture_output=True,
                             text=True)
        short = lambda s: s if len(s) < 200 else s[:200] + "..."
        first = lambda r: [short(x) for x in
                           (r.stderr.strip() or r.stdout.strip()).splitlines()]
        i, c = first(info), first(chk)
        def verdict(r, lines):
            if r.returncode < 0:
                return "killed by signal %d" % -r.returncode
            return lines[-1] if r.returncode and lines else "ok"
        print("%-30s info  rc=%d %s" % (name, info.returncode,
                                        verdict(info, i)))
        print("%-30s check rc=%d %s" % ("", chk.returncode,
                                        " | ".join(c[:2]) if c else ""))


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    make_bases(out)
    make_cases(out)
    if "--qemu-report" in sys.argv[2:]:
        qemu_report(out)


if __name__ == "__main__":
    main()
