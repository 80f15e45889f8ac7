#!/usr/bin/python3
"""Benchmark harness for nbdkit-qcow2 (run by `make bench [QUICK=1]`).

For every workload the SAME image is served, one server at a time, by

  ours      nbdkit -f -U SOCK <plugin> file=IMG
  qemu-nbd  qemu-nbd -f qcow2 --cache=writeback --aio=threads -e 8
                     --discard=unmap -t -k SOCK IMG
  file-raw  nbdkit -f -U SOCK file file=RAW   (a raw file with the same
            guest-visible data: the ceiling)

and driven by fio's nbd engine over the unix socket.  A fresh server is
started for every run; the three servers alternate (the order rotates with
every repetition) and each workload is repeated --reps times (default 3).
Medians are reported.

Server CPU is read from /proc/PID/stat (utime+stime, whole process) by a
sampler thread; the CPU spent inside fio's measurement window (the last
`runtime` seconds before fio's report timestamp, i.e. after the ramp) is
divided by the I/Os fio completed in that window.

See docs/BENCHMARKS.md for the description of every workload.
"""

import argparse
import ctypes
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BENCH_PASSWORD = "bench-secret"  # for the LUKS workload only
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
SERVERS = ["ours", "qemu", "raw"]
SERVER_LABEL = {"ours": "ours", "qemu": "qemu-nbd", "raw": "file-raw"}

_libc = ctypes.CDLL(None, use_errno=True)


def _pdeathsig():
    # Servers die with the harness even if it is killed with SIGKILL.
    _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    os.setpgrp()


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(cmd, **kw):
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def proc_ticks(pid):
    """utime+stime of the whole process (all threads), in clock ticks."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15
    return int(fields[11]) + int(fields[12])


def sys_busy_ticks():
    """(busy, total) jiffies summed over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return total - idle, total


class CpuSampler(threading.Thread):
    """Samples a process's CPU ticks every `interval` s with wall timestamps."""

    def __init__(self, pid, interval=0.05):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples = []
        self._halt = threading.Event()

    def sample(self):
        t = proc_ticks(self.pid)
        if t is not None:
            self.samples.append((time.time(), t))

    def run(self):
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()
        self.sample()

    def at(self, ts):
        """CPU ticks at wall time ts (linear interpolation)."""
        s = self.samples
        if not s:
            return 0.0
        if ts <= s[0][0]:
            return float(s[0][1])
        for (t0, v0), (t1, v1) in zip(s, s[1:]):
            if t0 <= ts <= t1:
                if t1 == t0:
                    return float(v1)
                return v0 + (v1 - v0) * (ts - t0) / (t1 - t0)
        return float(s[-1][1])

    def seconds(self, t0, t1):
        return (self.at(t1) - self.at(t0)) / CLK_TCK


# --------------------------------------------------------------------------
# servers

class Server:
    def __init__(self, kind, image, sock, logpath, plugin, extra=None,
                 qemu_image_opts=None, qemu_objects=None):
        self.kind = kind
        self.sock = sock
        if kind == "ours":
            cmd = ["nbdkit", "-f", "--exit-with-parent", "-U", sock, plugin,
                   "file=" + image] + list(extra or [])
        elif kind == "raw":
            cmd = ["nbdkit", "-f", "--exit-with-parent", "-U", sock, "file",
                   "file=" + image]
        elif kind == "qemu":
            cmd = ["qemu-nbd", "--cache=writeback", "--aio=threads", "-e", "8",
                   "--discard=unmap", "-t", "-k", sock]
            cmd += list(qemu_objects or [])
            if qemu_image_opts:
                cmd += ["--image-opts",
                        "driver=qcow2,file.driver=file,file.filename=%s,%s"
                        % (image, qemu_image_opts)]
            else:
                cmd += ["-f", "qcow2", image]
        else:
            raise ValueError(kind)
        self.cmd = cmd
        self.logpath = logpath
        self.proc = None

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.logf = open(self.logpath, "ab")
        self.logf.write(("\n$ %s\n" % " ".join(self.cmd)).encode())
        self.logf.flush()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                     stdout=self.logf, stderr=self.logf,
                                     preexec_fn=_pdeathsig)
        ACTIVE.add(self)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited at start (rc %s), see %s"
                                   % (self.kind, self.proc.returncode,
                                      self.logpath))
            if os.path.exists(self.sock):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(self.sock)
                    s.close()
                    return self
                except OSError:
                    s.close()
            time.sleep(0.02)
        raise RuntimeError("%s did not start listening" % self.kind)

    @property
    def pid(self):
        return self.proc.pid

    @property
    def uri(self):
        return "nbd+unix:///?socket=" + self.sock

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        ACTIVE.discard(self)
        self.logf.close()
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        return self.proc.returncode


ACTIVE = set()


def stop_all():
    for s in list(ACTIVE):
        try:
            s.stop()
        except Exception:
            pass


# --------------------------------------------------------------------------
# images

class Images:
    """Builds images lazily in the temp dir; shared ones are cached."""

    def __init__(self, tmp, cfg, fresh_dir=None):
        self.tmp = tmp
        self.fresh = fresh_dir or tmp
        self.cfg = cfg
        self.cache = {}
        self.counter = 0

    def path(self, name):
        return os.path.join(self.tmp, name)

    def _once(self, key, fn):
        if key not in self.cache:
            t = time.time()
            self.cache[key] = fn()
            log("  [prep] %s (%.1f s)" % (key, time.time() - t))
        return self.cache[key]

    def drop(self, *keys):
        for k in keys:
            v = self.cache.pop(k, None)
            if v is None:
                continue
            for p in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(p, str) and p.startswith(self.tmp + "/") \
                        and os.path.exists(p):
                    os.unlink(p)

    def fresh_name(self, stem):
        # Per-run images live in self.fresh (a tmpfs if possible): on this
        # ext4 mounted with "discard", unlinking a freshly written image
        # with 65536 extents takes minutes.
        self.counter += 1
        return os.path.join(self.fresh, "%s-%d" % (stem, self.counter))

    # random, incompressible data: head -c from /dev/urandom
    def alloc_raw(self):
        def mk():
            p = self.path("alloc.raw")
            run("head -c %d /dev/urandom > %s" % (self.cfg.size, p),
                shell=True)
            return p
        return self._once("alloc.raw", mk)

    def alloc_qcow2(self):
        def mk():
            p = self.path("alloc.qcow2")
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                 "-o", "cluster_size=65536", self.alloc_raw(), p])
            return p
        return self._once("alloc.qcow2", mk)

    def luks_qcow2(self):
        """The allocated image's data in a LUKS-encrypted qcow2 (QEMU's
        default cipher, aes-256-xts), password BENCH_PASSWORD."""
        def mk():
            p = self.path("luks.qcow2")
            for _ in range(3):   # qemu-img can fail timing PBKDF2 here
                r = subprocess.run(
                    ["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                     "--object", "secret,id=s0,data=" + BENCH_PASSWORD,
                     "-o", "cluster_size=65536,encrypt.format=luks,"
                     "encrypt.key-secret=s0,encrypt.iter-time=10",
                     self.alloc_raw(), p])
                if r.returncode == 0:
                    return p
            raise RuntimeError("qemu-img could not create the LUKS image")
        return self._once("luks.qcow2", mk)

    def copy_of(self, key, src):
        def mk():
            p = self.path(key)
            run(["cp", "--sparse=always", src, p])
            return p
        return self._once(key, mk)

    def compressible_raw(self):
        def mk():
            p = self.path("text.raw")
            rnd = random.Random(42)
            vocab = ["".join(rnd.choice("abcdefghijklmnopqrstuvwxyz")
                             for _ in range(rnd.randint(2, 10)))
                     for _ in range(4096)]
            words = rnd.choices(vocab, k=3 * MiB)
            pool = (" ".join(words)).encode()[:16 * MiB]
            assert len(pool) == 16 * MiB
            with open(p, "wb") as f:
                left = self.cfg.comp_size
                while left:
                    r = rnd.randrange(0, 16 * MiB, 4096)
                    chunk = (pool[r:] + pool[:r])[:min(left, 16 * MiB)]
                    f.write(chunk)
                    left -= len(chunk)
            return p
        return self._once("text.raw", mk)

    def compressed(self, ctype):
        def mk():
            p = self.path("text-%s.qcow2" % ctype)
            run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2",
                 "-o", "cluster_size=65536,compression_type=" + ctype,
                 self.compressible_raw(), p])
            return p
        return self._once("text-%s.qcow2" % ctype, mk)

    def sparse_pair(self, name, vsize, chunk, stride):
        """Sparse raw of vsize with `chunk` random bytes every `stride`
        bytes, and its qcow2 conversion (64 KiB clusters)."""
        def mk():
            raw = self.path(name + ".raw")
            q = self.path(name + ".qcow2")
            with open(raw, "wb") as f:
                f.truncate(vsize)
                off = 0
                buf = os.urandom(chunk)
                n = 0
                while off + chunk <= vsize:
                    # cheap variation of the buffer per chunk
                    f.seek(off)
                    f.write(n.to_bytes(8, "little") + buf[8:])
                    off += stride
                    n += 1
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                 "-o", "cluster_size=65536", raw, q])
            return (raw, q)
        return self._once(name, mk)

    def alloc_iolog(self, vsize):
        """fio v2 iolog: one 4k write into every 64k cluster of a vsize
        disk, at a random 4k slot of the cluster, clusters in random
        order.  Replayed as fast as iodepth allows."""
        def mk():
            p = self.path("alloc-%d.iolog" % vsize)
            rnd = random.Random(7)
            idx = list(range(vsize // (64 * KiB)))
            rnd.shuffle(idx)
            with open(p, "w") as f:
                f.write("fio version 2 iolog\nnbd add\nnbd open\n")
                for i in idx:
                    f.write("nbd write %d 4096\n"
                            % (i * 64 * KiB + rnd.randrange(16) * 4 * KiB))
                # no "close": fio would drop the connection with requests
                # in flight
            return p
        return self._once("alloc-%d.iolog" % vsize, mk)

    def empty_qcow2(self, vsize, opts="cluster_size=65536", backing=None):
        p = self.fresh_name("empty.qcow2")
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
        if backing:
            cmd += ["-b", backing, "-F", "qcow2"]
        cmd += [p, str(vsize)]
        run(cmd)
        return p

    def empty_raw(self, vsize):
        p = self.fresh_name("empty.raw")
        with open(p, "wb") as f:
            f.truncate(vsize)
        return p


# --------------------------------------------------------------------------
# workloads

def make_workloads(cfg, im):
    """Each workload: name, what, metric, fio params, and image(kind, rep)
    returning (path, cleanup_paths).  Listed reads first, writes later."""
    W = []
    S = cfg.size

    def shared(kind, qcow, raw):
        return (raw() if kind == "raw" else qcow()), []

    def wcopy(kind):
        # one writable copy per server, reused across repetitions
        # (overwriting allocated clusters does not change the layout)
        if kind == "raw":
            return im.copy_of("w-raw.raw", im.alloc_raw()), []
        return im.copy_of("w-%s.qcow2" % kind, im.alloc_qcow2()), []

    def empty(kind):
        if kind == "raw":
            p = im.empty_raw(S)
        else:
            p = im.empty_qcow2(S)
        return p, [p]

    def overlay(opts):
        def f(kind):
            if kind == "raw":   # ceiling: overwrite of a raw file
                return im.copy_of("w-raw.raw", im.alloc_raw()), []
            p = im.empty_qcow2(S, opts, backing=im.alloc_qcow2())
            return p, [p]
        return f

    def comp(ctype):
        def f(kind):
            if kind == "raw":
                return im.compressible_raw(), []
            return im.compressed(ctype), []
        return f

    big_stride = cfg.tib_stride

    def tib(kind):
        raw, q = im.sparse_pair("tib", TiB, 64 * KiB, big_stride)
        return (raw if kind == "raw" else q), []

    alloc = lambda k: shared(k, im.alloc_qcow2, im.alloc_raw)  # noqa: E731

    W.append(dict(name="randread-4k-qd1", cls="allocated", metric="iops",
                  what="4k random read, QD1, fully allocated image",
                  fio=dict(rw="randread", bs="4k", iodepth=1), image=alloc))
    W.append(dict(name="randread-4k-qd16", cls="allocated", metric="iops",
                  what="4k random read, QD16, fully allocated image",
                  fio=dict(rw="randread", bs="4k", iodepth=16), image=alloc))
    W.append(dict(name="randread-4k-2conn", cls="allocated", metric="iops",
                  what="4k random read, 2 connections (numjobs=2) x QD8",
                  fio=dict(rw="randread", bs="4k", iodepth=8, numjobs=2),
                  image=alloc))
    W.append(dict(name="seqread-1m", cls="allocated", metric="mibs",
                  what="1M sequential read, QD8, fully allocated image",
                  fio=dict(rw="read", bs="1M", iodepth=8), image=alloc))
    W.append(dict(name="seqread-1m-luks", cls="encrypted", metric="mibs",
                  what="1M sequential read, QD8, LUKS (aes-256-xts) image "
                       "of the same data; compare with seqread-1m for the "
                       "cost of decryption",
                  fio=dict(rw="read", bs="1M", iodepth=8),
                  image=lambda k: shared(k, im.luks_qcow2, im.alloc_raw),
                  ours_extra=["password=" + BENCH_PASSWORD],
                  qemu_objects=["--object",
                                "secret,id=s0,data=" + BENCH_PASSWORD],
                  qemu_image_opts="encrypt.key-secret=s0",
                  drop_after=["luks.qcow2"]))
    W.append(dict(name="seqread-1m-zlib", cls="compressed", metric="mibs",
                  what="1M sequential read, QD8, zlib-compressed image "
                       "(%d MiB of text-like data)" % (cfg.comp_size // MiB),
                  fio=dict(rw="read", bs="1M", iodepth=8), image=comp("zlib"),
                  drop_after=["text-zlib.qcow2"]))
    W.append(dict(name="seqread-1m-zstd", cls="compressed", metric="mibs",
                  what="1M sequential read, QD8, zstd-compressed image "
                       "(%d MiB of text-like data)" % (cfg.comp_size // MiB),
                  fio=dict(rw="read", bs="1M", iodepth=8), image=comp("zstd"),
                  drop_after=["text-zstd.qcow2", "text.raw"]))
    W.append(dict(name="randread-4k-1T-cold", cls="sparse", metric="iops",
                  what="4k random read QD16 over 1 TiB sparse image, "
                       "fresh server, no ramp (cold L2 cache)",
                  fio=dict(rw="randread", bs="4k", iodepth=16), ramp=0,
                  image=tib))
    W.append(dict(name="randread-4k-1T-l2c1M", cls="sparse", metric="iops",
                  what="as above with l2-cache-size=1M "
                       "(ours and qemu-nbd)",
                  fio=dict(rw="randread", bs="4k", iodepth=16), image=tib,
                  ours_extra=["l2-cache-size=1M"],
                  qemu_image_opts="l2-cache-size=1M",
                  drop_after=["tib"]))
    W.append(dict(name="randwrite-4k-alloc", cls="allocated", metric="iops",
                  what="4k random write QD16 over allocated clusters",
                  fio=dict(rw="randwrite", bs="4k", iodepth=16), image=wcopy,
                  check=True))
    W.append(dict(name="seqwrite-1m", cls="allocated", metric="mibs",
                  what="1M sequential write QD8 over allocated clusters",
                  fio=dict(rw="write", bs="1M", iodepth=8), image=wcopy,
                  check=True,
                  drop_after=["w-ours.qcow2", "w-qemu.qcow2"]))
    iolog = lambda: im.alloc_iolog(S)  # noqa: E731
    W.append(dict(name="randwrite-4k-empty", cls="allocating", metric="iops",
                  what="4k random write QD16 into a fresh empty image: one "
                       "write into each 64k cluster, random order (every "
                       "write allocates)",
                  fio=dict(rw="randwrite", bs="4k", iodepth=16), image=empty,
                  iolog=iolog, ramp=0, check=True))
    W.append(dict(name="randwrite-4k-backing", cls="backing", metric="iops",
                  what="same, into a fresh overlay over a fully populated "
                       "qcow2 backing file (64k clusters: COW of 60k)",
                  fio=dict(rw="randwrite", bs="4k", iodepth=16),
                  image=overlay("cluster_size=65536"), iolog=iolog, ramp=0,
                  check=True))
    W.append(dict(name="randwrite-4k-backing-el2", cls="backing",
                  metric="iops",
                  what="same, overlay with extended_l2=on (2k subclusters, "
                       "no COW)",
                  fio=dict(rw="randwrite", bs="4k", iodepth=16),
                  image=overlay("cluster_size=65536,extended_l2=on"),
                  iolog=iolog, ramp=0, check=True,
                  drop_after=["w-raw.raw"]))
    return W


QUICK_SET = ["randread-4k-qd16", "seqread-1m", "seqread-1m-luks",
             "randwrite-4k-alloc", "randwrite-4k-empty",
             "randwrite-4k-backing", "seqread-1m-zstd",
             "randread-4k-1T-l2c1M"]


def qemu_img_check(path):
    r = subprocess.run(["qemu-img", "check", "--output=json", path],
                       capture_output=True, text=True)
    try:
        d = json.loads(r.stdout)
    except ValueError:
        return {"rc": r.returncode, "error": (r.stderr or r.stdout)[-500:]}
    keys = ("check-errors", "corruptions", "leaks")
    return {"rc": r.returncode, **{k: d.get(k, 0) for k in keys}}


def run_fio(cfg, wl, srv, outjson, perf=None):
    f = wl["fio"]
    ramp = wl.get("ramp", cfg.ramp)
    cmd = ["fio", "--name=" + wl["name"], "--ioengine=nbd",
           "--uri=" + srv.uri, "--iodepth=%d" % f["iodepth"],
           "--numjobs=%d" % f.get("numjobs", 1), "--group_reporting",
           "--output-format=json", "--output=" + outjson]
    if "iolog" in wl:
        # replay a fixed list of writes (not time based); --runtime is
        # only a safety limit
        cmd += ["--read_iolog=" + wl["iolog"](), "--runtime=300"]
    else:
        cmd += ["--rw=" + f["rw"], "--bs=" + f["bs"], "--time_based",
                "--runtime=%d" % cfg.runtime, "--norandommap",
                "--randrepeat=0"]
        if ramp:
            cmd.append("--ramp_time=%d" % ramp)
    sampler = CpuSampler(srv.pid)
    sampler.sample()
    sampler.start()
    b0 = sys_busy_ticks()
    t0 = time.time()
    perf_proc = None
    if perf:
        perf_proc = subprocess.Popen(
            ["perf", "record", "-q", "-g", "-F", "999", "-p", str(srv.pid),
             "-o", perf], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate()
    t1 = time.time()
    b1 = sys_busy_ticks()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if perf_proc:
        perf_proc.send_signal(signal.SIGINT)
        perf_proc.wait()
    sampler.stop()
    if p.returncode != 0:
        raise RuntimeError("fio failed (%d): %s %s" % (p.returncode,
                                                       out[-800:], err[-800:]))
    with open(outjson) as fh:
        d = json.load(fh)
    j = d["jobs"][0]
    ios = 0
    bw = 0
    for dirn in ("read", "write"):
        ios += j[dirn]["total_ios"]
        bw += j[dirn]["bw_bytes"]
    iops = sum(j[dirn]["iops"] for dirn in ("read", "write"))
    # fio's measurement window (after the ramp): the last `runtime` ms
    # before the report (read/write "runtime" is the longest job's)
    window = max(j[dirn]["runtime"] for dirn in ("read", "write")) / 1000.0
    t_end = min(d["timestamp_ms"] / 1000.0, t1)
    t_start = t_end - window
    cpu_window = sampler.seconds(t_start, t_end)
    cpu_total = sampler.seconds(t0, t1)
    fio_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    busy = (b1[0] - b0[0]) / CLK_TCK
    wall = t1 - t0
    foreign = max(0.0, busy - cpu_total - fio_cpu)
    return {
        "iops": iops, "mibs": bw / MiB, "ios": ios,
        "cpu_us_per_io": (cpu_window * 1e6 / ios) if ios else None,
        "server_cpu_s": cpu_window, "window_s": window,
        "server_cpu_pct": 100 * cpu_window / window if window else None,
        "other_cpu_pct": 100 * foreign / wall / NCPU,
        "lat_mean_us": (j["read"]["clat_ns"]["mean"] if j["read"]["total_ios"]
                        else j["write"]["clat_ns"]["mean"]) / 1000.0,
    }


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def bench_fio(cfg, wl, im, tmp, results):
    log("== %s: %s" % (wl["name"], wl["what"]))
    la = loadavg()
    runs = {k: [] for k in SERVERS}
    checks = []
    for rep in range(cfg.reps):
        order = SERVERS[rep % 3:] + SERVERS[:rep % 3]
        for kind in order:
            img, cleanup = wl["image"](kind)
            sock = os.path.join(tmp, "%s.sock" % kind)
            srv = Server(kind, img, sock, os.path.join(tmp, "server.log"),
                         cfg.plugin,
                         extra=wl.get("ours_extra") if kind == "ours" else None,
                         qemu_image_opts=wl.get("qemu_image_opts"),
                         qemu_objects=wl.get("qemu_objects")
                         if kind == "qemu" else None)
            perf = None
            if cfg.perf and kind == "ours" and rep == 0 and \
                    wl["name"] in cfg.perf:
                perf = os.path.join(cfg.perf_dir, "perf-%s.data" % wl["name"])
            try:
                srv.start()
                r = run_fio(cfg, wl, srv,
                            os.path.join(tmp, "fio.json"), perf=perf)
            finally:
                rc = srv.stop()
            r["server_rc"] = rc
            if wl.get("check") and kind == "ours" and \
                    (rep == 0 or cfg.check_all):
                c = qemu_img_check(img)
                r["qemu_img_check"] = c
                checks.append(c)
                if c.get("rc") not in (0, None) or c.get("corruptions") or \
                        c.get("check-errors"):
                    log("   !! qemu-img check of our image: %s" % c)
            if perf:
                summarize_perf(perf)
            for p in cleanup:
                if os.path.exists(p):
                    os.unlink(p)
            runs[kind].append(r)
            log("   rep %d %-8s %10.1f %s  cpu %6.1f us/io  other-cpu %4.0f%%"
                % (rep, SERVER_LABEL[kind], r[wl["metric"]],
                   "IOPS " if wl["metric"] == "iops" else "MiB/s",
                   r["cpu_us_per_io"] or 0, r["other_cpu_pct"]))
    res = {"name": wl["name"], "what": wl["what"], "class": wl["cls"],
           "metric": wl["metric"], "fio": wl["fio"],
           "ramp": wl.get("ramp", cfg.ramp), "loadavg_before": la,
           "runs": runs, "median": {}, "cpu_us_per_io": {}}
    for k in SERVERS:
        res["median"][k] = median(r[wl["metric"]] for r in runs[k])
        res["cpu_us_per_io"][k] = median(r["cpu_us_per_io"] for r in runs[k])
    res["other_cpu_pct_max"] = max(r["other_cpu_pct"] for k in SERVERS
                                   for r in runs[k])
    m = res["median"]
    res["ratio_vs_qemu"] = m["ours"] / m["qemu"] if m["qemu"] else None
    res["ratio_vs_raw"] = m["ours"] / m["raw"] if m["raw"] else None
    if checks:
        res["checks"] = checks
    results.append(res)
    im.drop(*wl.get("drop_after", []))


def summarize_perf(path):
    r = subprocess.run(["perf", "report", "-i", path, "--stdio",
                        "--no-children", "--sort", "dso,symbol",
                        "-g", "none", "--percent-limit", "1"],
                       capture_output=True, text=True)
    txt = "\n".join(l for l in r.stdout.splitlines()
                    if l.strip() and not l.startswith("#"))
    with open(path + ".txt", "w") as f:
        f.write(r.stdout)
    log("   perf (ours, top symbols, full report in %s.txt):\n%s"
        % (path, "\n".join("     " + l for l in txt.splitlines()[:25])))


def bench_nbdcopy(cfg, im, tmp, results):
    vsize, data = cfg.copy_vsize, cfg.copy_data
    chunk = 1 * MiB
    stride = vsize // (data // chunk)
    name = "nbdcopy-%dG-sparse" % (vsize // GiB)
    what = ("nbdcopy of a sparse %d GiB image with %d MiB of data "
            "(1 MiB every %d MiB) to null:" % (vsize // GiB, data // MiB,
                                             stride // MiB))
    log("== %s: %s" % (name, what))
    raw, q = im.sparse_pair("copy", vsize, chunk, stride)
    la = loadavg()
    runs = {k: [] for k in SERVERS}
    for rep in range(cfg.reps):
        order = SERVERS[rep % 3:] + SERVERS[:rep % 3]
        for kind in order:
            img = raw if kind == "raw" else q
            srv = Server(kind, img, os.path.join(tmp, kind + ".sock"),
                         os.path.join(tmp, "server.log"), cfg.plugin)
            try:
                srv.start()
                c0 = proc_ticks(srv.pid)
                t0 = time.time()
                run(["nbdcopy", srv.uri, "null:"])
                t1 = time.time()
                c1 = proc_ticks(srv.pid)
            finally:
                srv.stop()
            r = {"seconds": t1 - t0, "server_cpu_ms": (c1 - c0) * 1000.0 /
                 CLK_TCK}
            runs[kind].append(r)
            log("   rep %d %-8s %8.3f s  server cpu %7.1f ms"
                % (rep, SERVER_LABEL[kind], r["seconds"],
                   r["server_cpu_ms"]))
    res = {"name": name, "what": what, "class": "sparse", "metric": "seconds",
           "loadavg_before": la, "runs": runs, "median": {},
           "server_cpu_ms": {}}
    for k in SERVERS:
        res["median"][k] = median(r["seconds"] for r in runs[k])
        res["server_cpu_ms"][k] = median(r["server_cpu_ms"] for r in runs[k])
    m = res["median"]
    # speed ratio: > 1 means ours is faster
    res["ratio_vs_qemu"] = m["qemu"] / m["ours"]
    res["ratio_vs_raw"] = m["raw"] / m["ours"]
    results.append(res)
    im.drop("copy")


def bench_open(cfg, im, tmp, results):
    """Time to first byte: nbdinfo --size with the server started by
    nbdinfo (socket activation), so server start + open + handshake."""
    for vsize, label in ((1 * GiB, "1G"), (1 * TiB, "1T")):
        name = "open-empty-%s" % label
        what = "nbdinfo --size (server start + open) on an empty %s image" \
            % label
        log("== %s: %s" % (name, what))
        q = im.empty_qcow2(vsize)
        raw = im.empty_raw(vsize)
        cmds = {
            "ours": ["nbdkit", cfg.plugin, "file=" + q],
            "qemu": ["qemu-nbd", "-f", "qcow2", "--cache=writeback",
                     "--aio=threads", "-e", "8", "--discard=unmap", q],
            "raw": ["nbdkit", "file", "file=" + raw],
        }
        runs = {k: [] for k in SERVERS}
        for rep in range(cfg.open_reps):
            order = SERVERS[rep % 3:] + SERVERS[:rep % 3]
            for kind in order:
                t0 = time.time()
                r = run(["nbdinfo", "--size", "--", "["] + cmds[kind] + ["]"],
                        capture_output=True, text=True)
                dt = time.time() - t0
                assert int(r.stdout) == vsize, r.stdout
                runs[kind].append({"seconds": dt})
        res = {"name": name, "what": what, "class": "open",
               "metric": "seconds", "runs": runs, "median": {},
               "loadavg_before": loadavg()}
        for k in SERVERS:
            res["median"][k] = median(r["seconds"] for r in runs[k])
        m = res["median"]
        res["ratio_vs_qemu"] = m["qemu"] / m["ours"]
        res["ratio_vs_raw"] = m["raw"] / m["ours"]
        log("   median ms: ours %.1f  qemu-nbd %.1f  file-raw %.1f"
            % tuple(1000 * m[k] for k in SERVERS))
        results.append(res)
        os.unlink(q)
        os.unlink(raw)


# --------------------------------------------------------------------------
# reporting

def fmt_val(res, k):
    v = res["median"][k]
    if v is None:
        return "-"
    if res["metric"] == "iops":
        return "%.0f" % v
    if res["metric"] == "mibs":
        return "%.0f" % v
    if res["class"] == "open":
        return "%.1f ms" % (v * 1000)
    return "%.2f s" % v


def fmt_cpu(res, k):
    if "cpu_us_per_io" in res:
        v = res["cpu_us_per_io"][k]
        return "-" if v is None else "%.1f" % v
    if "server_cpu_ms" in res:
        v = res["server_cpu_ms"][k]
        return "-" if v is None else "%.0fms" % v
    return "-"


def table(results):
    unit = {"iops": "IOPS", "mibs": "MiB/s", "seconds": "time"}
    hdr = ["workload", "unit", "ours", "qemu-nbd", "file-raw", "ours/qemu",
           "ours/raw", "cpu ours", "cpu qemu", "cpu raw", "other%"]
    rows = []
    for r in results:
        rows.append([r["name"], unit[r["metric"]],
                     fmt_val(r, "ours"), fmt_val(r, "qemu"), fmt_val(r, "raw"),
                     "%.2f" % r["ratio_vs_qemu"] if r.get("ratio_vs_qemu")
                     else "-",
                     "%.2f" % r["ratio_vs_raw"] if r.get("ratio_vs_raw")
                     else "-",
                     fmt_cpu(r, "ours"), fmt_cpu(r, "qemu"),
                     fmt_cpu(r, "raw"),
                     "%.0f" % r["other_cpu_pct_max"]
                     if "other_cpu_pct_max" in r else "-"])
    w = [max(len(str(x[i])) for x in rows + [hdr]) for i in range(len(hdr))]
    lines = ["| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(hdr))
             + " |",
             "|" + "|".join(("-" * (w[i] + 1)) + (":" if i > 1 else "-")
                            for i in range(len(hdr))) + "|"]
    for x in rows:
        lines.append("| " + " | ".join(
            (str(v).ljust(w[i]) if i < 2 else str(v).rjust(w[i]))
            for i, v in enumerate(x)) + " |")
    return "\n".join(lines)


def machine_info():
    def first(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True
                                  ).stdout.splitlines()[0].strip()
        except Exception:
            return "?"
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    git = first(["git", "-C", REPO, "describe", "--always", "--dirty"])
    return {"nproc": NCPU, "cpu": model, "kernel": platform.release(),
            "mem_gib": round(mem / GiB, 1),
            "nbdkit": first(["nbdkit", "--version"]),
            "qemu-nbd": first(["qemu-nbd", "--version"]),
            "fio": first(["fio", "--version"]),
            "nbdcopy": first(["nbdcopy", "--version"]),
            "git": git}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="1 GiB images, 2 s runs, a subset of workloads")
    ap.add_argument("--plugin", default=os.path.join(
        REPO, "plugin", "nbdkit-qcow2-plugin.so"))
    ap.add_argument("--output", help="JSON results (default "
                    "bench/results.json, bench/results-quick.json)")
    ap.add_argument("--reps", type=int, help="repetitions (default 3)")
    ap.add_argument("--runtime", type=int, help="fio runtime in s")
    ap.add_argument("--only", action="append", default=[],
                    help="run only workloads whose name contains this "
                    "(repeatable; 'nbdcopy' and 'open' select those)")
    ap.add_argument("--tmpdir", help="parent of the temp dir "
                    "(default /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--fresh-dir", help="where the images created for a "
                    "single run go (default: /dev/shm if it has room)")
    ap.add_argument("--check-all", action="store_true",
                    help="qemu-img check our image after every write run "
                    "(default: after the first repetition)")
    ap.add_argument("--perf", action="append", default=[],
                    help="perf record the ours server during the first "
                    "repetition of this workload (repeatable)")
    ap.add_argument("--list", action="store_true")
    cfg = ap.parse_args()

    cfg.plugin = os.path.abspath(cfg.plugin)
    if cfg.quick:
        cfg.size = 1 * GiB
        cfg.runtime = cfg.runtime or 2
        cfg.tib_stride = 256 * MiB      # 4096 clusters = 256 MiB of data
        cfg.copy_vsize, cfg.copy_data = 16 * GiB, 256 * MiB
        cfg.open_reps = 3
        cfg.comp_size = 512 * MiB
    else:
        cfg.size = 4 * GiB
        cfg.runtime = cfg.runtime or 6
        cfg.tib_stride = 64 * MiB       # 16384 clusters = 1 GiB of data
        cfg.copy_vsize, cfg.copy_data = 64 * GiB, 1 * GiB
        cfg.open_reps = 5
        cfg.comp_size = 2 * GiB
    cfg.ramp = 1
    cfg.reps = cfg.reps or 3
    cfg.output = cfg.output or os.path.join(
        HERE, "results-quick.json" if cfg.quick else "results.json")

    tmpparent = cfg.tmpdir or os.environ.get("BENCH_TMPDIR") or "/var/tmp"
    im_dummy = Images("/nonexistent", cfg)
    wls = make_workloads(cfg, im_dummy)
    if cfg.quick and not cfg.only:
        wls = [w for w in wls if w["name"] in QUICK_SET]
    extra = ["nbdcopy", "open"]
    if cfg.only:
        wls = [w for w in wls if any(o in w["name"] for o in cfg.only)]
        extra = [e for e in extra if any(o in e for o in cfg.only)]
    if cfg.list:
        for w in wls:
            print("%-26s %s" % (w["name"], w["what"]))
        print("\n".join(extra))
        return 0

    for tool in ("nbdkit", "qemu-nbd", "qemu-img", "fio", "nbdcopy",
                 "nbdinfo"):
        if not shutil.which(tool):
            log("bench: %s not found (make deps)" % tool)
            return 1
    if not os.path.exists(cfg.plugin):
        log("bench: plugin %s not found (make)" % cfg.plugin)
        return 1

    st = os.statvfs(tmpparent)
    free = st.f_bavail * st.f_frsize
    need = (8 if cfg.quick else 40) * GiB
    log("bench: %s mode, %d reps, runtime %d s + ramp %d s, %.0f GiB free "
        "in %s" % ("QUICK" if cfg.quick else "FULL", cfg.reps, cfg.runtime,
                   cfg.ramp, free / GiB, tmpparent))
    if free < need:
        log("bench: need about %.0f GiB free in %s (set BENCH_TMPDIR)"
            % (need / GiB, tmpparent))
        return 1
    la = loadavg()
    if la[0] > 0.5 * NCPU:
        log("bench: WARNING: load average is %.2f on %d CPUs; other work is "
            "running and the numbers will be noisy" % (la[0], NCPU))

    tmp = tempfile.mkdtemp(prefix="qcow2-bench.", dir=tmpparent)
    cfg.perf_dir = tmp if not cfg.keep else tmp
    if cfg.perf:
        cfg.perf_dir = os.path.join(HERE, "perf")
        os.makedirs(cfg.perf_dir, exist_ok=True)
    # Benchmark a snapshot of the plugin: others may rebuild build/ while
    # this runs.
    snap = os.path.join(tmp, "nbdkit-qcow2-plugin.so")
    shutil.copy2(os.path.realpath(cfg.plugin), snap)
    with open(snap, "rb") as f:
        plugin_sha = hashlib.sha256(f.read()).hexdigest()[:16]
    cfg.plugin_orig, cfg.plugin = cfg.plugin, snap
    fresh = None
    shm = cfg.fresh_dir or "/dev/shm"
    try:
        stf = os.statvfs(shm)
        mem_avail = 0
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    mem_avail = int(line.split()[1]) * 1024
        if min(stf.f_bavail * stf.f_frsize, mem_avail) > 2 * cfg.size + 4 * GiB:
            fresh = tempfile.mkdtemp(prefix="qcow2-bench.", dir=shm)
    except OSError:
        pass
    log("bench: per-run fresh images in %s" % (fresh or tmp))
    cfg.fresh = fresh or tmp
    im = Images(tmp, cfg, fresh)
    wls = make_workloads(cfg, im)
    if cfg.quick and not cfg.only:
        wls = [w for w in wls if w["name"] in QUICK_SET]
    if cfg.only:
        wls = [w for w in wls if any(o in w["name"] for o in cfg.only)]

    def on_signal(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, on_signal)

    results = []
    t_start = time.time()
    info = machine_info()

    def save(final=False):
        doc = {"mode": "quick" if cfg.quick else "full",
               "complete": final,
               "config": {"image_size": cfg.size, "runtime_s": cfg.runtime,
                          "ramp_s": cfg.ramp, "reps": cfg.reps,
                          "plugin": cfg.plugin_orig,
                          "fresh_image_dir": cfg.fresh},
               "machine": info, "results": results,
               "table": table(results) if results else ""}
        with open(cfg.output, "w") as f:
            json.dump(doc, f, indent=1)
        return doc
    cfg.save = save
    info["loadavg_start"] = la
    info["plugin"] = cfg.plugin_orig
    info["plugin_sha256"] = plugin_sha
    rc = 0
    try:
        for w in wls:
            bench_fio(cfg, w, im, tmp, results)
            save()
        if "nbdcopy" in extra:
            bench_nbdcopy(cfg, im, tmp, results)
            save()
        if "open" in extra:
            bench_open(cfg, im, tmp, results)
    except KeyboardInterrupt:
        log("bench: interrupted")
        rc = 130
    except Exception as e:
        log("bench: FAILED: %s" % e)
        try:
            with open(os.path.join(tmp, "server.log")) as f:
                log("bench: server log (tail):\n" + "".join(f.readlines()[-15:]))
        except OSError:
            pass
        rc = 1
    finally:
        stop_all()
        if fresh:
            shutil.rmtree(fresh, ignore_errors=True)
        if cfg.keep:
            log("bench: temp dir kept: %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    info["loadavg_end"] = loadavg()
    info["elapsed_s"] = round(time.time() - t_start, 1)
    doc = save(final=(rc == 0))
    if results:
        print()
        print("%s run, %s images, %d reps, %d s runs (+%d s ramp), "
              "medians; %s, load %s -> %s, %.0f s"
              % (doc["mode"], "1 GiB" if cfg.quick else "4 GiB", cfg.reps,
                 cfg.runtime, cfg.ramp, info["git"],
                 "/".join("%.1f" % x for x in la),
                 "/".join("%.1f" % x for x in info["loadavg_end"]),
                 info["elapsed_s"]))
        print("ratios > 1: ours faster. cpu = server CPU us per I/O "
              "(nbdcopy: server CPU ms total); other% = max CPU used by "
              "other processes during a run (noise)")
        print(doc["table"])
        print("JSON: %s" % cfg.output)
    return rc


if __name__ == "__main__":
    sys.exit(main())
