/* Crash safety under injected I/O errors.
 *
 * For each image kind (made with qemu-img and qemu-io), a deterministic
 * workload of writes, zeroes, trims and flushes runs through the public
 * API.  An unarmed run counts the file writes W and syncs S it does.
 * Then for every N in 1..W (and every sync in 1..S) the workload runs
 * again on a fresh copy of the image with the N-th write (sync) failing
 * with EIO (q2_fault_arm).  At the first failing call the "machine
 * crashes": the image is freed without flushing (q2_free_layer), and
 *   - qemu-img check must exit 0 (clean) or 3 (leaked clusters only);
 *   - every byte must read back (through a fresh read-only q2_open) as
 *     the last successful flush promised, or as a value some write,
 *     zero or trim after that flush (the failing one included) put
 *     there.  A successful FUA write is promised by itself.
 *
 * Then the same for transient errors: the N-th write or read fails
 * once and the workload goes on (the client retries later requests),
 * ending with a clean close.  The image must check clean or with leaks
 * only, must not be marked corrupt (an I/O error is not corruption),
 * must not keep persistent bitmaps QEMU would trust after the data
 * changed, and every byte must read as the model says, where a failed
 * request may or may not have taken effect.
 *
 * A failing case is reported with its N and what check said, and the
 * first broken image of each kind is kept for reproduction (the path is
 * printed).  Without qemu-img the test is skipped.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"
#include "unit.h"

#define MAX_OPS 48
#define MAX_FAILS_SHOWN 3

/* Snapshot create (and, on the image that has one, delete) is part of
 * the workload unless Q2_FAULTS_SNAPSHOTS=0.  A crash in the middle of
 * one leaves the image dirty (v3), and the next read-write open repairs
 * it before anything else, as QEMU's does: the check below does that
 * open first.  Q2_FAULTS_VERBOSE=1 reports every failing N, not the
 * first few. */
static bool with_snapshots, verbose;

static char tmpdir[256];
static char keepdir[256];

enum op_kind { OP_WRITE, OP_WRITE_FUA, OP_ZERO, OP_ZERO_TRIM, OP_ZERO_FAST,
               OP_TRIM, OP_FLUSH, OP_SNAP_CREATE, OP_SNAP_DELETE };

static const char *const op_names[] = {
  "write", "write+fua", "zero", "zero+may_trim", "zero+fast", "trim", "flush",
  "snapshot create", "snapshot delete"
};

struct op {
  enum op_kind kind;
  uint64_t offset, len;
  uint32_t seed;                /* data pattern of writes */
};

struct kind {
  const char *name;
  const char *create_opts;
  uint64_t size;
  const char *setup;            /* qemu-io -c commands, or NULL */
  const char *snapshot;         /* qemu-img snapshot -c NAME, or NULL */
  uint32_t align;               /* workload alignment unit */
  int nr_ops;                   /* at most MAX_OPS */
  uint32_t max_len;             /* of one op */
  bool snapshots_ok;            /* refcounts can reach 2; v3 */
  /* Made by qemu-img convert -c from text-like data instead of by
   * create and setup: compressed clusters straddle host clusters and
   * refcount blocks everywhere. */
  bool compressed_all;
  const char *bitmap;           /* qemu-img bitmap --add NAME, or NULL */
};

static const struct kind kinds[] = {
  { .name = "v3-64k", .create_opts = "cluster_size=64k", .size = 4u << 20,
    .setup = "-c 'write -P 0x5a 0 1M' -c 'write -c -P 0x33 2M 128k' "
    "-c 'write -z 3M 64k'",
    .align = 512, .nr_ops = 48, .max_len = 96u << 10, .snapshots_ok = true },
  /* v2 has no dirty bit to cover a snapshot operation: between the
   * refcount and the COPIED updates a crash leaves flags that qemu-img
   * check reports (as with QEMU itself), so no snapshots here. */
  { .name = "v2-64k", .create_opts = "compat=0.10,cluster_size=64k",
    .size = 4u << 20,
    .setup = "-c 'write -P 0x5a 0 1M' -c 'write -c -P 0x33 2M 64k'",
    .align = 512, .nr_ops = 48, .max_len = 96u << 10 },
  { .name = "v3-512", .create_opts = "cluster_size=512", .size = 1u << 20,
    .setup = "-c 'write -P 0x5a 0 256k' -c 'write -c -P 0x33 512k 4k'",
    .align = 512, .nr_ops = 24, .max_len = 4u << 10, .snapshots_ok = true },
  { .name = "extl2-64k", .create_opts = "cluster_size=64k,extended_l2=on",
    .size = 4u << 20,
    .setup = "-c 'write -P 0x5a 0 512k' -c 'write -P 0x44 1M 6k' "
    "-c 'write -z 1040k 4k'",
    .align = 512, .nr_ops = 40, .max_len = 96u << 10, .snapshots_ok = true },
  { .name = "snapshot-64k", .create_opts = "cluster_size=64k",
    .size = 4u << 20,
    .setup = "-c 'write -P 0x5a 0 1M' -c 'write -P 0x66 2M 256k'",
    .snapshot = "snap1",
    .align = 512, .nr_ops = 40, .max_len = 96u << 10, .snapshots_ok = true },
  { .name = "rc1-4k", .create_opts = "cluster_size=4k,refcount_bits=1",
    .size = 2u << 20, .setup = "-c 'write -P 0x5a 0 256k'",
    .align = 512, .nr_ops = 24, .max_len = 16u << 10 },
  /* Compressed clusters cross refcount-block boundaries (64 entries a
   * block), and the workload overwrites such clusters (find_straddlers).
   * The image has more refcount blocks than the refcount cache holds
   * (REFBLOCK_CACHE_SLOTS), so freeing them misses in it. */
  { .name = "compressed-512-rc64",
    .create_opts = "cluster_size=512,refcount_bits=64", .size = 3u << 20,
    .compressed_all = true,
    .align = 512, .nr_ops = 16, .max_len = 2u << 10 },
  /* Allocation into an empty image crosses into a new refcount
   * block's range every 32 KiB. */
  { .name = "empty-512-rc64", .create_opts = "cluster_size=512,refcount_bits=64",
    .size = 1u << 20, .align = 512, .nr_ops = 12, .max_len = 12u << 10 },
  { .name = "bitmap-64k", .create_opts = "cluster_size=64k",
    .size = 4u << 20, .setup = "-c 'write -P 0x5a 0 1M'", .bitmap = "b0",
    .align = 512, .nr_ops = 24, .max_len = 96u << 10, .snapshots_ok = true },
};

/* ---- helpers ---- */

static int
run_cmd (const char *cmd)
{
  int st = system (cmd);

  if (st == -1 || !WIFEXITED (st))
    return -1;
  return WEXITSTATUS (st);
}

static uint32_t
rnd (uint64_t *s)
{
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s >> 32;
}

static uint8_t
pattern (uint32_t seed, uint64_t pos)
{
  uint32_t x = seed * 2654435761u ^ (uint32_t) pos * 40503u;

  return (uint8_t) ((x >> 15) ^ (pos >> 9) ^ seed);
}

/* The value op puts at byte pos (which it covers). */
static uint8_t
op_value (const struct op *op, uint64_t pos)
{
  return op->kind == OP_WRITE || op->kind == OP_WRITE_FUA ?
    pattern (op->seed, pos) : 0;
}

static int
copy_file (const char *from, const char *to)
{
  char buf[65536];
  int in = open (from, O_RDONLY), out;
  ssize_t n;

  if (in == -1)
    return -1;
  out = open (to, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (out == -1) {
    close (in);
    return -1;
  }
  while ((n = read (in, buf, sizeof buf)) > 0)
    if (write (out, buf, n) != n) {
      n = -1;
      break;
    }
  close (in);
  close (out);
  return n == 0 ? 0 : -1;
}

#define MAX_TARGETS 64

/* Guest clusters whose compressed bytes cross from one refcount block's
 * range into the next: freeing one updates two refcount blocks. */
static int
find_straddlers (struct q2_image *img, uint64_t *targets)
{
  uint64_t per_block = img->cluster_size * 8 / img->refcount_bits;
  uint64_t off, span = per_block * img->cluster_size;
  int n = 0;

  for (off = 0; off < img->virtual_size && n < MAX_TARGETS;
       off += img->cluster_size) {
    struct q2_map m;
    if (q2_map (img, off, img->cluster_size, &m) < 0)
      break;
    if (m.type == Q2_COMPRESSED &&
        m.host_offset / span != (m.host_offset + m.csize - 1) / span)
      targets[n++] = off;
  }
  return n;
}

/* A deterministic workload: mostly writes, some zeroes and trims, a
 * flush every few ops and at the end.  Plain writes go to targets, if
 * there are any. */
static void
make_workload (const struct kind *k, uint64_t seed, const uint64_t *targets,
               int nr_targets, struct op *ops, int *n)
{
  uint64_t s = seed * 0x9e3779b97f4a7c15ULL + 1;
  int i = 0, since_flush = 0;

  while (i < k->nr_ops - 1) {
    struct op *op = &ops[i];
    uint32_t r = rnd (&s) % 100;
    uint64_t unit = k->align;

    /* Halfway, an internal snapshot is taken; later the image's own
     * snapshot (if any) is deleted.  Neither changes the guest view. */
    if (with_snapshots && k->snapshots_ok &&
        (i == k->nr_ops / 2 || (i == k->nr_ops * 3 / 4 && k->snapshot))) {
      op->kind = i == k->nr_ops / 2 ? OP_SNAP_CREATE : OP_SNAP_DELETE;
      op->offset = op->len = 0;
      i++;
      continue;
    }
    if (since_flush >= 4 + (int) (rnd (&s) % 6)) {
      op->kind = OP_FLUSH;
      op->offset = op->len = 0;
      since_flush = 0;
      i++;
      continue;
    }
    op->kind = r < 55 ? OP_WRITE : r < 62 ? OP_WRITE_FUA :
      r < 72 ? OP_ZERO : r < 80 ? OP_ZERO_TRIM : r < 86 ? OP_ZERO_FAST :
      OP_TRIM;
    op->seed = rnd (&s);
    /* One op in four is unaligned. */
    if (rnd (&s) % 4 == 0)
      unit = 1;
    op->len = Q2_ROUND_UP (1 + rnd (&s) % k->max_len, unit);
    /* Favour the first MiB, where the initial data is. */
    if (rnd (&s) % 2)
      op->offset = rnd (&s) % (1u << 20);
    else
      op->offset = rnd (&s) % k->size;
    op->offset = Q2_ROUND_DOWN (op->offset, unit);
    if (nr_targets > 0 && op->kind == OP_WRITE) {
      op->offset = targets[rnd (&s) % nr_targets];
      op->len = k->align;
    }
    if (op->len > k->size - op->offset)
      op->len = k->size - op->offset;
    since_flush++;
    i++;
  }
  ops[i].kind = OP_FLUSH;
  ops[i].offset = ops[i].len = 0;
  *n = i + 1;
}

/* ---- one run of the workload ---- */

struct run {
  /* Set up by the caller. */
  const struct kind *k;
  const struct op *ops;
  int nr_ops;
  const char *path;
  uint8_t *initial;             /* guest content before the workload */
  /* Results. */
  bool opened;
  int failed_op;                /* index of the failing call, or -1 */
  int failed_err;
  char failed_msg[256];
  uint8_t *promised;            /* at the last successful flush */
  int flushed_upto;             /* ops [flushed_upto, ...] are unflushed */
  uint64_t writes, syncs, reads;
  /* Transient mode: failed ops do not stop the workload. */
  bool transient;
  bool failed[MAX_OPS];
  uint8_t *current;             /* what the successful ops wrote */
  int8_t *last_ok;              /* the last successful op over each byte */
  bool closed_ok;
};

/* The successful op i changed [off, off+len) of the model. */
static void
model_set (struct run *rn, int i, const uint8_t *data, uint64_t off,
           uint64_t len)
{
  if (data)
    memcpy (rn->current + off, data, len);
  else
    memset (rn->current + off, 0, len);
  memset (rn->last_ok + off, i, len);
}

/* Runs the workload with faults armed at (write_n, sync_n, read_n).
 * Normally the first failure is a crash: the image is freed without
 * flushing.  In transient mode the workload goes on and closes.  With
 * check_live (the unarmed run), compares the live image with the model
 * at each flush. */
static void
run_workload (struct run *rn, uint64_t write_n, uint64_t sync_n,
              uint64_t read_n, bool check_live)
{
  struct q2_open_opts opts = { .readonly = true, .locking = false,
                               .no_backing = true };
  const struct kind *k = rn->k;
  struct q2_image *img;
  uint8_t *current = rn->current, *buf = malloc (k->size);
  uint64_t live_reads = 0;
  int i, r = 0;

  rn->opened = false;
  rn->failed_op = -1;
  rn->flushed_upto = 0;
  rn->closed_ok = false;
  memset (rn->failed, 0, sizeof rn->failed);
  memset (rn->last_ok, -1, k->size);
  memcpy (rn->promised, rn->initial, k->size);
  memcpy (current, rn->initial, k->size);

  if (q2_open (rn->path, &opts, &img) < 0 || q2_make_writable (img) < 0) {
    fprintf (stderr, "%s: cannot open: %s\n", k->name, q2_last_error ());
    free (buf);
    return;
  }
  rn->opened = true;
  q2_fault_arm (write_n, sync_n, read_n);

  for (i = 0; i < rn->nr_ops; i++) {
    const struct op *op = &rn->ops[i];
    uint64_t j;

    switch (op->kind) {
    case OP_WRITE:
    case OP_WRITE_FUA:
      for (j = 0; j < op->len; j++)
        buf[j] = pattern (op->seed, op->offset + j);
      r = q2_pwrite (img, buf, op->len, op->offset, op->kind == OP_WRITE_FUA);
      if (r == 0) {
        model_set (rn, i, buf, op->offset, op->len);
        if (op->kind == OP_WRITE_FUA)
          memcpy (rn->promised + op->offset, buf, op->len);
      }
      break;
    case OP_ZERO:
    case OP_ZERO_TRIM:
    case OP_ZERO_FAST:
      r = q2_zero (img, op->len, op->offset, op->kind != OP_ZERO,
                   op->kind == OP_ZERO_FAST, false);
      if (r == -ENOTSUP && op->kind == OP_ZERO_FAST)
        r = 0;                  /* refused before changing anything */
      else if (r == 0)
        model_set (rn, i, NULL, op->offset, op->len);
      break;
    case OP_TRIM:
      r = q2_trim (img, op->len, op->offset, false);
      /* Advisory: learn what the range reads as now (a transient read
       * error is retried: the trim itself is done). */
      if (r == 0 &&
          (q2_pread (img, buf, op->len, op->offset) == 0 ||
           (rn->transient && q2_pread (img, buf, op->len, op->offset) == 0)))
        model_set (rn, i, buf, op->offset, op->len);
      else if (r == 0)
        r = -EIO;
      break;
    case OP_SNAP_CREATE:
      r = q2_snapshot_create (img, "faults");
      break;
    case OP_SNAP_DELETE:
      r = q2_snapshot_delete (img, k->snapshot);
      break;
    case OP_FLUSH:
      r = q2_flush (img);
      if (r == 0) {
        memcpy (rn->promised, current, k->size);
        rn->flushed_upto = i + 1;
        if (check_live) {
          /* Reads the workload itself does not make are not counted. */
          uint64_t w, sy, before, after;
          q2_fault_counts (&w, &sy, &before);
          CHECK_EQ_INT (q2_pread (img, buf, k->size, 0), 0);
          CHECK (memcmp (buf, current, k->size) == 0);
          q2_fault_counts (&w, &sy, &after);
          live_reads += after - before;
        }
      }
      break;
    }
    if (r < 0) {
      if (rn->failed_op < 0) {
        rn->failed_op = i;
        rn->failed_err = r;
        snprintf (rn->failed_msg, sizeof rn->failed_msg, "%s",
                  q2_last_error ());
      }
      rn->failed[i] = true;
      if (!rn->transient)
        break;
    }
  }

  q2_fault_counts (&rn->writes, &rn->syncs, &rn->reads);
  rn->reads -= live_reads;
  q2_fault_arm (0, 0, 0);
  if (rn->failed_op >= 0 && !rn->transient)
    q2_free_layer (img);        /* the crash: nothing more is written */
  else
    rn->closed_ok = q2_close (img) == 0;
  free (buf);
}

/* ---- checking the image after the crash ---- */

static int fails_shown;

/* Copies the broken image to keepdir once per kind, and returns the
 * name for the report. */
static void
keep_image (const struct run *rn, const char *what, uint64_t n,
            bool *kept)
{
  char dst[512], *p;

  if (*kept)
    return;
  snprintf (dst, sizeof dst, "%s/faults-%s-%s%llu.qcow2", keepdir,
            rn->k->name, what, (unsigned long long) n);
  for (p = strrchr (dst, '/'); *p; p++)
    if (*p == ' ')
      *p = '-';
  if (copy_file (rn->path, dst) == 0) {
    fprintf (stderr, "  kept the image as %s\n", dst);
    *kept = true;
  }
}

/* May byte pos read as v?  After a crash: as the last flush promised,
 * or as an op since then (up to the failing one) put it.  After
 * transient errors: as the successful ops left it, or as a failed op
 * after the last successful one over it would have. */
static bool
byte_ok (const struct run *rn, uint64_t pos, uint8_t v)
{
  int j, from, upto;

  if (rn->transient) {
    if (v == rn->current[pos])
      return true;
    from = rn->last_ok[pos] + 1;
    upto = rn->nr_ops - 1;
  }
  else {
    if (v == rn->promised[pos])
      return true;
    from = rn->flushed_upto;
    upto = rn->failed_op >= 0 ? rn->failed_op : rn->nr_ops - 1;
  }
  for (j = from; j <= upto; j++) {
    const struct op *op = &rn->ops[j];
    if ((!rn->transient || rn->failed[j]) && op->len > 0 &&
        pos >= op->offset && pos < op->offset + op->len &&
        op_value (op, pos) == v)
      return true;
  }
  return false;
}

/* Transient errors must leave the image neither marked corrupt nor
 * with bitmaps QEMU would still trust after the data changed.  Returns
 * NULL if fine, or what is wrong. */
static const char *
header_problem (const struct run *rn, const struct q2_image *img)
{
  if (!rn->transient)
    return NULL;
  if (!rn->closed_ok)
    return "closing the image failed";
  if (img->hdr.incompatible_features & QCOW2_INCOMPAT_CORRUPT)
    return "the image is marked corrupt";
  if (rn->k->bitmap && img->hdr.has_bitmaps_ext &&
      (img->hdr.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
    return "the persistent bitmaps are still marked consistent";
  return NULL;
}

/* Returns true if the image after the crash (or the transient errors)
 * is acceptable. */
static bool
check_after_crash (struct run *rn, const char *what, uint64_t n, bool *kept)
{
  struct q2_open_opts opts = { .readonly = true, .locking = false,
                               .no_backing = true };
  const struct kind *k = rn->k;
  char cmd[1024];
  struct q2_image *img;
  uint8_t *got;
  uint64_t i, bad = 0, first_bad = 0;
  int rc;
  bool ok = true, show = verbose || fails_shown < MAX_FAILS_SHOWN;
  char failing[160] = "none (the workload completed)";

  if (rn->failed_op >= 0) {
    const struct op *op = &rn->ops[rn->failed_op];
    snprintf (failing, sizeof failing, "op %d %s offset %llu len %llu",
              rn->failed_op, op_names[op->kind],
              (unsigned long long) op->offset, (unsigned long long) op->len);
  }

  /* A dirty image is repaired by the next read-write open. */
  if (q2_open (rn->path, &opts, &img) == 0) {
    if (img->hdr.incompatible_features & QCOW2_INCOMPAT_DIRTY) {
      if (q2_make_writable (img) < 0 && show)
        fprintf (stderr, "%s: %s %llu: repairing the dirty image: %s\n",
                 k->name, what, (unsigned long long) n, q2_last_error ());
    }
    q2_close (img);
  }

  snprintf (cmd, sizeof cmd, "qemu-img check -q '%s' >/dev/null 2>&1",
            rn->path);
  rc = run_cmd (cmd);
  if (rc != 0 && rc != 3) {
    ok = false;
    if (show) {
      fprintf (stderr, "%s: %s %llu: qemu-img check exit %d after failing "
               "%s (%s):\n", k->name, what, (unsigned long long) n, rc,
               failing, rn->failed_msg);
      snprintf (cmd, sizeof cmd, "qemu-img check '%s' 2>&1 | "
                "grep -v '^Leaked cluster' | head -n 12 >&2", rn->path);
      run_cmd (cmd);
    }
  }

  got = malloc (k->size);
  if (q2_open (rn->path, &opts, &img) < 0) {
    ok = false;
    if (show)
      fprintf (stderr, "%s: %s %llu: cannot reopen after failing %s: %s\n",
               k->name, what, (unsigned long long) n, failing,
               q2_last_error ());
  }
  else {
    const char *problem = header_problem (rn, img);
    if (problem) {
      ok = false;
      if (show)
        fprintf (stderr, "%s: %s %llu: %s after failing %s (%s)\n",
                 k->name, what, (unsigned long long) n, problem, failing,
                 rn->failed_msg);
    }
    if (q2_pread (img, got, k->size, 0) < 0) {
      ok = false;
      if (show)
        fprintf (stderr, "%s: %s %llu: read after failing %s: %s\n",
                 k->name, what, (unsigned long long) n, failing,
                 q2_last_error ());
    }
    else
      for (i = 0; i < k->size; i++)
        if (!byte_ok (rn, i, got[i]) && bad++ == 0)
          first_bad = i;
    q2_close (img);
    if (bad) {
      ok = false;
      if (show)
        fprintf (stderr, "%s: %s %llu: %llu bytes read wrong "
                 "after failing %s (%s); the first at offset %llu reads "
                 "%#x, the model says %#x\n", k->name, what,
                 (unsigned long long) n, (unsigned long long) bad, failing,
                 rn->failed_msg, (unsigned long long) first_bad,
                 got[first_bad], rn->transient ? rn->current[first_bad] :
                 rn->promised[first_bad]);
    }
  }
  free (got);
  if (!ok) {
    if (show) {
      keep_image (rn, what, n, kept);
      fails_shown++;
    }
  }
  return ok;
}

/* ---- the test for one kind of image ---- */

/* A rebuild (qcow2-tool check -r all) puts every refcount block at the
 * end of the file: zero the refcount of the first data cluster and
 * repair. */
static bool
move_refcount_blocks (const char *path)
{
  struct q2_open_opts opts = { .readonly = true, .no_backing = true };
  struct q2_check_result res = { 0 };
  struct q2_image *img;
  struct q2_map m;
  uint64_t c, rb = 0, entry = 0, zero = 0;
  int fd;
  bool ok;

  if (q2_open (path, &opts, &img) < 0)
    return false;
  /* With 64-bit refcounts, block entry i of a cluster is 8 bytes. */
  ok = img->refcount_bits == 64 &&
    q2_map (img, 0, img->cluster_size, &m) == 0 && m.host_offset != 0;
  if (ok) {
    c = m.host_offset >> img->cluster_bits;
    rb = img->reftable[c / (img->cluster_size / 8)] & REFT_OFFSET_MASK;
    entry = rb + c % (img->cluster_size / 8) * 8;
  }
  q2_close (img);
  if (!ok || rb == 0)
    return false;
  fd = open (path, O_WRONLY);
  ok = fd >= 0 && pwrite (fd, &zero, 8, entry) == 8;
  if (fd >= 0)
    close (fd);
  if (!ok || q2_open (path, &opts, &img) < 0)
    return false;
  ok = q2_check (img, Q2_REPAIR_ALL, &res) == 0 && res.rebuilt &&
    res.corruptions == 0;
  return q2_close (img) == 0 && ok;
}

/* Compressed clusters of text-like data (zlib shrinks 512 bytes of it
 * to about 400), many of which cross from one refcount block's range
 * into the next.  QEMU starts a new range with its refcount block, so
 * its compressed clusters rarely do that on their own: first the ranges
 * are filled, the blocks moved to the end and the data discarded; then
 * the compressed data fills the free ranges without a gap. */
static bool
make_compressed_image (const struct kind *k, const char *path)
{
  static const char alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  char raw[320], cmd[1024];
  uint64_t s = 0x2545f4914f6cdd1dULL, i;
  uint8_t *data = malloc (k->size);
  FILE *f;
  bool ok;

  snprintf (raw, sizeof raw, "%s.raw", path);
  for (i = 0; i < k->size; i++)
    data[i] = alphabet[rnd (&s) % 64];
  f = fopen (raw, "w");
  ok = f && fwrite (data, 1, k->size, f) == k->size;
  if (f && fclose (f) != 0)
    ok = false;
  free (data);
  snprintf (cmd, sizeof cmd, "qemu-img create -q -f qcow2 -o %s '%s' %llu "
            "&& qemu-io -c 'write 0 %llu' '%s' >/dev/null", k->create_opts,
            path, (unsigned long long) k->size, (unsigned long long) k->size,
            path);
  ok = ok && run_cmd (cmd) == 0 && move_refcount_blocks (path);
  snprintf (cmd, sizeof cmd, "qemu-io -c 'discard 0 %llu' '%s' >/dev/null "
            "&& qemu-img convert -n -c -f raw -O qcow2 '%s' '%s'",
            (unsigned long long) k->size, path, raw, path);
  ok = ok && run_cmd (cmd) == 0;
  unlink (raw);
  return ok;
}

static bool
make_image (const struct kind *k, const char *path)
{
  char cmd[1024];

  if (k->compressed_all)
    return make_compressed_image (k, path);
  snprintf (cmd, sizeof cmd, "qemu-img create -q -f qcow2 -o %s '%s' %llu",
            k->create_opts, path, (unsigned long long) k->size);
  if (run_cmd (cmd) != 0)
    return false;
  if (k->setup) {
    snprintf (cmd, sizeof cmd, "qemu-io -f qcow2 %s '%s' >/dev/null",
              k->setup, path);
    if (run_cmd (cmd) != 0)
      return false;
  }
  if (k->snapshot) {
    snprintf (cmd, sizeof cmd, "qemu-img snapshot -c %s '%s'", k->snapshot,
              path);
    if (run_cmd (cmd) != 0)
      return false;
  }
  if (k->bitmap) {
    snprintf (cmd, sizeof cmd, "qemu-img bitmap --add '%s' %s", path,
              k->bitmap);
    if (run_cmd (cmd) != 0)
      return false;
  }
  return true;
}

/* Runs the workload once for each n in 1..count with the n-th call of
 * the kind what names failing; returns how many left a bad image. */
static unsigned long
sweep (struct run *rn, const char *base, const char *work, const char *what,
       uint64_t count, bool *kept)
{
  const char *call = strrchr (what, ' ') ? strrchr (what, ' ') + 1 : what;
  unsigned long fails = 0;
  uint64_t n;

  for (n = 1; n <= count; n++) {
    unit_context ("%s: %s %llu of %llu", rn->k->name, what,
                  (unsigned long long) n, (unsigned long long) count);
    CHECK_EQ_INT (copy_file (base, work), 0);
    run_workload (rn, strcmp (call, "write") == 0 ? n : 0,
                  strcmp (call, "sync") == 0 ? n : 0,
                  strcmp (call, "read") == 0 ? n : 0, false);
    /* A read the workload retries (after a trim) fails no request. */
    CHECK (rn->failed_op >= 0 || rn->transient);
    if (!check_after_crash (rn, what, n, kept))
      fails++;
  }
  return fails;
}

static void
test_kind (const struct kind *k, uint64_t seed)
{
  struct q2_open_opts opts = { .readonly = true, .no_backing = true };
  struct op ops[MAX_OPS];
  char base[300], work[300];
  struct q2_image *img;
  struct run rn;
  uint64_t writes, syncs, reads, targets[MAX_TARGETS];
  int nr_targets;
  unsigned long crash_writes, crash_syncs, transient_writes, transient_reads;
  bool kept = false;
  time_t t0 = time (NULL);

  fails_shown = 0;

  unit_context ("%s", k->name);
  snprintf (base, sizeof base, "%s/%s.qcow2", tmpdir, k->name);
  snprintf (work, sizeof work, "%s/%s-work.qcow2", tmpdir, k->name);
  if (!make_image (k, base)) {
    CHECK (!"qemu-img could not create the image");
    return;
  }

  memset (&rn, 0, sizeof rn);
  rn.k = k;
  rn.path = work;
  rn.initial = malloc (k->size);
  rn.promised = malloc (k->size);
  rn.current = malloc (k->size);
  rn.last_ok = malloc (k->size);

  /* The content before the workload, as the core reads it. */
  if (q2_open (base, &opts, &img) < 0) {
    fprintf (stderr, "%s: %s\n", k->name, q2_last_error ());
    CHECK (!"cannot open the new image");
    goto out;
  }
  CHECK_EQ_INT (q2_pread (img, rn.initial, k->size, 0), 0);
  nr_targets = k->compressed_all ? find_straddlers (img, targets) : 0;
  CHECK (nr_targets > 0 || !k->compressed_all);
  q2_close (img);
  make_workload (k, seed, targets, nr_targets, ops, &rn.nr_ops);
  rn.ops = ops;

  /* Unarmed: everything succeeds, and it counts the calls. */
  CHECK_EQ_INT (copy_file (base, work), 0);
  run_workload (&rn, 0, 0, 0, true);
  CHECK (rn.opened);
  CHECK_EQ_INT (rn.failed_op, -1);
  CHECK (check_after_crash (&rn, "unarmed", 0, &kept));
  writes = rn.writes;
  syncs = rn.syncs;
  reads = rn.reads;
  CHECK (writes > 0);
  CHECK (syncs > 0);

  crash_writes = sweep (&rn, base, work, "write", writes, &kept);
  crash_syncs = sweep (&rn, base, work, "sync", syncs, &kept);
  rn.transient = true;
  transient_writes = sweep (&rn, base, work, "transient write", writes,
                            &kept);
  transient_reads = sweep (&rn, base, work, "transient read", reads, &kept);
  rn.transient = false;
  unit_context ("%s", k->name);
  printf ("     %s: %d ops, %llu writes, %llu syncs, %llu reads; bad images "
          "after crashes at a write %lu, at a sync %lu; after a transient "
          "write error %lu, read error %lu (%ld s)\n", k->name, rn.nr_ops,
          (unsigned long long) writes, (unsigned long long) syncs,
          (unsigned long long) reads, crash_writes, crash_syncs,
          transient_writes, transient_reads, (long) (time (NULL) - t0));
  fflush (stdout);
  CHECK_EQ_U64 (crash_writes, 0);
  CHECK_EQ_U64 (crash_syncs, 0);
  CHECK_EQ_U64 (transient_writes, 0);
  CHECK_EQ_U64 (transient_reads, 0);
 out:
  unlink (work);
  unlink (base);
  free (rn.initial);
  free (rn.promised);
  free (rn.current);
  free (rn.last_ok);
}

#define KIND_TEST(fn, i)                              \
  static void fn (void) { test_kind (&kinds[i], i + 1); }
KIND_TEST (test_faults_v3_64k, 0)
KIND_TEST (test_faults_v2_64k, 1)
KIND_TEST (test_faults_v3_512, 2)
KIND_TEST (test_faults_extl2_64k, 3)
KIND_TEST (test_faults_snapshot_64k, 4)
KIND_TEST (test_faults_rc1_4k, 5)
KIND_TEST (test_faults_compressed_512_rc64, 6)
KIND_TEST (test_faults_bitmap_64k, 8)
KIND_TEST (test_faults_empty_512_rc64, 7)

/* After a failed fdatasync the kernel may have dropped the lost pages:
 * a later sync must not report them durable (QEMU fails every later
 * flush too).  In-place data writes still work. */
static void
test_sync_failure_is_sticky (void)
{
  struct q2_open_opts opts = { .readonly = false };
  struct q2_create_opts co;
  struct q2_image *img;
  char path[300];
  uint8_t buf[4096];
  int r;

  snprintf (path, sizeof path, "%s/sticky.qcow2", tmpdir);
  q2_create_opts_init (&co);
  CHECK_EQ_INT (q2_create (path, 1 << 20, &co), 0);
  CHECK_EQ_INT (q2_open (path, &opts, &img), 0);
  CHECK_EQ_INT (q2_make_writable (img), 0);
  memset (buf, 0x11, sizeof buf);
  CHECK_EQ_INT (q2_pwrite (img, buf, sizeof buf, 0, false), 0);
  q2_fault_arm (0, 1, 0);               /* the next sync fails */
  CHECK_EQ_INT (q2_flush (img), -EIO);
  q2_fault_arm (0, 0, 0);
  r = q2_flush (img);
  CHECK_EQ_INT (r, -EIO);
  CHECK (strstr (q2_last_error (), "earlier fdatasync") != NULL);
  CHECK_EQ_INT (q2_pwrite (img, buf, sizeof buf, 0, false), 0);
  CHECK_EQ_INT (q2_pwrite (img, buf, sizeof buf, 0, true), -EIO);
  q2_close (img);
  unlink (path);
}

int
main (void)
{
  const char *dir = "/dev/shm";
  struct stat st;

  if (run_cmd ("qemu-img --version >/dev/null 2>&1 && "
               "qemu-io --version >/dev/null 2>&1") != 0) {
    printf ("SKIP: qemu-img or qemu-io is missing\n");
    return unit_done ();
  }
  /* tmpfs: the workload syncs often. */
  if (stat (dir, &st) == -1 || !S_ISDIR (st.st_mode) ||
      access (dir, W_OK) == -1)
    dir = getenv ("TMPDIR") ? getenv ("TMPDIR") : "/tmp";
  snprintf (tmpdir, sizeof tmpdir, "%s/q2faults.XXXXXX", dir);
  if (mkdtemp (tmpdir) == NULL) {
    perror ("mkdtemp");
    return 1;
  }
  /* Broken images are kept where they survive the test. */
  snprintf (keepdir, sizeof keepdir, "%s",
            getenv ("TMPDIR") ? getenv ("TMPDIR") : "/tmp");

  with_snapshots = !getenv ("Q2_FAULTS_SNAPSHOTS") ||
    strcmp (getenv ("Q2_FAULTS_SNAPSHOTS"), "0") != 0;
  verbose = getenv ("Q2_FAULTS_VERBOSE") &&
    strcmp (getenv ("Q2_FAULTS_VERBOSE"), "1") == 0;

  RUN (test_faults_v3_64k);
  RUN (test_faults_v2_64k);
  RUN (test_faults_v3_512);
  RUN (test_faults_extl2_64k);
  RUN (test_faults_snapshot_64k);
  RUN (test_faults_rc1_4k);
  RUN (test_faults_compressed_512_rc64);
  RUN (test_faults_empty_512_rc64);
  RUN (test_faults_bitmap_64k);
  RUN (test_sync_failure_is_sticky);

  rmdir (tmpdir);
  return unit_done ();
}
