/* libFuzzer target: the input is a qcow2 image followed by a list of
 * write operations.  The last 2 bytes (big-endian) give the length L of
 * the op list, which is the L bytes before them; everything before that
 * is the image.  Each op is 7 bytes: kind, a 32-bit offset unit and a
 * 16-bit length unit, scaled to the virtual size (offset = unit * size
 * / 2^32, length = unit * 16 bytes, so at most 1 MiB).  Kinds (mod 9):
 * write, zero, zero+may_trim, zero+fast, trim, flush, snapshot create,
 * delete, apply (snapshots s0..s3 by the offset's low bits).  The
 * high bit of the kind byte asks for FUA.  The image is
 * opened read-only, made writable (which may fail: fine), the ops are
 * applied, and it is closed.  At most MAX_OPS ops and WORK_BUDGET bytes
 * per input.
 *
 * Oracle: if the core's own check (q2_check) finds the image consistent
 * before the ops, it must still find no corruption after them (leaks
 * are allowed); otherwise the target aborts. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "fuzz-common.h"
#include "qcow2.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

#define OP_LEN 7
#define MAX_OPS 32
#define MAX_LEN (1u << 20)
#define WORK_BUDGET (8u << 20)

enum { OP_WRITE, OP_ZERO, OP_ZERO_TRIM, OP_ZERO_FAST, OP_TRIM, OP_FLUSH,
       OP_SNAP_CREATE, OP_SNAP_DELETE, OP_SNAP_APPLY, OP_KINDS };
#define MAX_SNAP_CREATES 4

static uint8_t *wbuf;

/* Returns the corruptions q2_check finds, or -1 if it could not tell;
 * *clean is set when it found no leaks either. */
static int64_t
check_image (struct q2_image *img, bool *clean)
{
  struct q2_check_result res;

  memset (&res, 0, sizeof res);
  if (q2_check (img, Q2_REPAIR_NONE, &res) < 0 || res.check_errors)
    return -1;
  *clean = res.leaks == 0 && res.corruptions == 0;
  return res.corruptions;
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  struct q2_open_opts opts = {
    .readonly = true, .l2_cache_size = 0, .locking = false,
    .backing_override = NULL, .no_backing = true,
  };
  struct q2_image *img;
  const uint8_t *ops;
  uint64_t vsize, budget = WORK_BUDGET;
  size_t oplen, img_len, nops, i, creates = 0;
  char name[16];
  uint8_t *copy;
  bool consistent, clean;

  if (size < 2)
    return 0;
  if (wbuf == NULL) {
    if ((wbuf = malloc (MAX_LEN)) == NULL)
      abort ();
    for (i = 0; i < MAX_LEN; i++)
      wbuf[i] = (uint8_t) (i * 7 + (i >> 9));
  }
  oplen = q2_be16 (data + size - 2);
  if (oplen > size - 2)
    oplen = size - 2;
  img_len = size - 2 - oplen;
  ops = data + img_len;
  nops = Q2_MIN (oplen / OP_LEN, MAX_OPS);

  copy = fuzz_dup (data, img_len);
  fuzz_defuse_data_file (copy, img_len);
  fuzz_file_set (copy, img_len);
  free (copy);

  if (q2_open (fuzz_path, &opts, &img) < 0)
    return 0;
  consistent = check_image (img, &clean) == 0 && clean;
  if (q2_make_writable (img) < 0) {
    q2_close (img);
    return 0;
  }
  vsize = q2_virtual_size (img);

  for (i = 0; i < nops && vsize > 0 && budget > 0; i++) {
    const uint8_t *op = ops + i * OP_LEN;
    uint64_t offset = (q2_be32 (op + 1) * vsize) >> 32;
    uint64_t len = (uint64_t) q2_be16 (op + 5) * 16 + (op[6] & 15);

    len = Q2_MIN (Q2_MIN (len, MAX_LEN), vsize - offset);
    len = Q2_MIN (len, budget);
    if (len == 0)
      len = 1;
    if (offset + len > vsize)
      continue;
    budget -= len;
    switch (op[0] % OP_KINDS) {
    case OP_WRITE:
      q2_pwrite (img, wbuf + (op[0] >> 3), Q2_MIN (len, MAX_LEN - 32),
                 offset, op[0] & 0x80);
      break;
    case OP_ZERO:
      q2_zero (img, len, offset, false, false, op[0] & 0x80);
      break;
    case OP_ZERO_TRIM:
      q2_zero (img, len, offset, true, false, op[0] & 0x80);
      break;
    case OP_ZERO_FAST:
      q2_zero (img, len, offset, op[0] & 0x40, true, op[0] & 0x80);
      break;
    case OP_TRIM:
      q2_trim (img, len, offset, op[0] & 0x80);
      break;
    case OP_FLUSH:
      q2_flush (img);
      break;
    case OP_SNAP_CREATE:
    case OP_SNAP_DELETE:
    case OP_SNAP_APPLY:
      /* Internal snapshots named s0..s3 by the offset unit. */
      snprintf (name, sizeof name, "s%u", op[4] & 3);
      if (op[0] % OP_KINDS == OP_SNAP_CREATE) {
        if (creates++ < MAX_SNAP_CREATES)
          q2_snapshot_create (img, name);
      }
      else if (op[0] % OP_KINDS == OP_SNAP_DELETE)
        q2_snapshot_delete (img, name);
      else
        q2_snapshot_apply (img, name);
      break;
    }
  }

  q2_close (img);

  if (consistent && nops > 0) {
    int64_t after;
    if (q2_open (fuzz_path, &opts, &img) < 0) {
      fprintf (stderr, "fuzz-write: a consistent image no longer opens "
               "after the ops: %s\n", q2_last_error ());
      abort ();
    }
    after = check_image (img, &clean);
    if (after != 0) {
      fprintf (stderr, "fuzz-write: q2_check found the image consistent "
               "before the ops and %lld corruptions (-1: check failed: "
               "%s) after them\n", (long long) after, q2_last_error ());
      abort ();
    }
    q2_close (img);
  }
  return 0;
}
