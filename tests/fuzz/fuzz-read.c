/* libFuzzer target: the input is a whole qcow2 image.  It is opened
 * read-only without its backing file and read through the public API:
 * q2_pread over the start of the disk and at offsets derived from the
 * input, q2_extents over the whole disk, q2_cache, the snapshot list,
 * q2_map_range and a read-only q2_check.  Work per input is bounded:
 * at most READ_BUDGET bytes read, MAX_EXTENTS extents walked.
 *
 * Oracles besides the sanitizers: extents are consecutive, non-empty,
 * with known flags, at least one on success; and what extents report as
 * zero reads as zeros (up to ZERO_CHECK_BYTES per walk). */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "fuzz-common.h"
#include "qcow2.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

#define CHUNK (256u << 10)
#define HEAD_BYTES (4u << 20)
#define READ_BUDGET (16u << 20)
#define MAX_EXTENTS 4096
#define CACHE_BYTES (64u << 20)

#define MAX_ZERO_CHECKS 64
#define ZERO_CHECK_BYTES (1u << 20)

static uint8_t *buf;

struct extent_count {
  uint64_t n, next;
  bool bad;
  /* Extents reported as reading zeros, to verify with q2_pread. */
  struct q2_range zero[MAX_ZERO_CHECKS];
  unsigned nr_zero;
};

static int
count_extent (void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
  struct extent_count *c = opaque;

  /* Extents must be consecutive (the first may start before). */
  if (c->n > 0 && offset != c->next)
    c->bad = true;
  if (length == 0 || (flags & ~(uint32_t) (Q2_EXTENT_HOLE | Q2_EXTENT_ZERO)))
    c->bad = true;
  c->next = offset + length;
  if ((flags & Q2_EXTENT_ZERO) && c->nr_zero < MAX_ZERO_CHECKS) {
    c->zero[c->nr_zero].offset = offset;
    c->zero[c->nr_zero].length = length;
    c->nr_zero++;
  }
  return ++c->n >= MAX_EXTENTS ? 1 : 0;
}

static void
read_range (struct q2_image *img, uint64_t offset, uint64_t count,
            uint64_t *budget)
{
  uint64_t vsize = q2_virtual_size (img);

  if (offset >= vsize)
    return;
  count = Q2_MIN (count, vsize - offset);
  while (count > 0 && *budget > 0) {
    uint64_t n = Q2_MIN (Q2_MIN (count, CHUNK), *budget);
    if (q2_pread (img, buf, n, offset) < 0)
      return;                   /* corruption found: stop this range */
    *budget -= n;
    offset += n;
    count -= n;
  }
}

/* Oracle: what extents call zero must read as zeros. */
static void
check_zero_extents (struct q2_image *img, const struct extent_count *c,
                    uint64_t *budget)
{
  static uint8_t zeros[CHUNK];
  uint64_t j, left = ZERO_CHECK_BYTES;
  unsigned i;

  for (i = 0; i < c->nr_zero; i++) {
    uint64_t off = c->zero[i].offset;
    uint64_t len = Q2_MIN (Q2_MIN (c->zero[i].length, CHUNK), left);
    if (len == 0 || len > *budget)
      return;
    *budget -= len;
    left -= len;
    if (q2_pread (img, buf, len, off) < 0 || memcmp (buf, zeros, len) == 0)
      continue;
    for (j = 0; j < len; j++)
      if (buf[j] != 0) {
        fprintf (stderr, "fuzz-read: extents report offset %llu (length "
                 "%llu) as zero but byte %llu reads %#x\n",
                 (unsigned long long) off,
                 (unsigned long long) c->zero[i].length,
                 (unsigned long long) (off + j), buf[j]);
        abort ();
      }
  }
}

static void
walk_extents (struct q2_image *img, bool req_one, uint64_t *budget)
{
  struct extent_count c;
  uint64_t vsize = q2_virtual_size (img);
  int r;

  memset (&c, 0, sizeof c);
  if (vsize == 0)
    return;
  r = q2_extents (img, 0, vsize, req_one, count_extent, &c);
  if (r >= 0 && c.n == 0) {
    fprintf (stderr, "fuzz-read: q2_extents succeeded with no extent\n");
    abort ();
  }
  if (c.bad) {
    fprintf (stderr, "fuzz-read: q2_extents reported an empty, "
             "non-consecutive or unknown-flag extent\n");
    abort ();
  }
  check_zero_extents (img, &c, budget);
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  struct q2_open_opts opts = {
    .readonly = true, .l2_cache_size = 0, .locking = false,
    .backing_override = NULL, .no_backing = true,
  };
  struct q2_image *img;
  struct q2_check_result res;
  struct q2_map_info mi;
  uint64_t vsize, budget = READ_BUDGET, h, tail = 0;
  uint8_t *copy;
  int i, n;

  if (buf == NULL && (buf = malloc (CHUNK)) == NULL)
    abort ();
  copy = fuzz_dup (data, size);
  fuzz_defuse_data_file (copy, size);
  fuzz_file_set (copy, size);
  free (copy);

  if (q2_open (fuzz_path, &opts, &img) < 0)
    return 0;
  vsize = q2_virtual_size (img);

  read_range (img, 0, HEAD_BYTES, &budget);

  /* A few offsets from the input: its last 8 bytes and a hash. */
  if (size >= 8)
    tail = q2_be64 (data + size - 8);
  h = fuzz_hash (data, size);
  if (vsize > 0) {
    read_range (img, tail % vsize, 1 << 20, &budget);
    for (i = 0; i < 4; i++) {
      h = h * 6364136223846793005ULL + 1442695040888963407ULL;
      read_range (img, (h >> 8) % vsize, 1u << (9 + i * 3), &budget);
    }
    /* The last sector, and an unaligned read across a cluster end. */
    read_range (img, vsize - Q2_MIN (vsize, 512), 512, &budget);
    read_range (img, q2_cluster_size (img) - 1, 3, &budget);
  }

  walk_extents (img, false, &budget);
  walk_extents (img, true, &budget);
  if (vsize > 0)
    q2_cache (img, 0, Q2_MIN (vsize, CACHE_BYTES));

  if (vsize > 0 && q2_map_range (img, tail % vsize, 1 << 20, &mi) == 0 &&
      mi.length == 0) {
    fprintf (stderr, "fuzz-read: q2_map_range returned length 0\n");
    abort ();
  }

  n = q2_snapshot_count (img);
  for (i = 0; i < n && i < 64; i++) {
    struct q2_snapshot_info si;
    if (q2_snapshot_get (img, i, &si) == 0 && si.name)
      q2_snapshot_find (img, si.name);
  }

  memset (&res, 0, sizeof res);
  q2_check (img, Q2_REPAIR_NONE, &res);

  q2_close (img);
  return 0;
}
