/* The metadata slice cache: LRU eviction order, write-back of dirty
 * slices on eviction and flush, discard without write-back, against a
 * temporary file.
 *
 * Whether a get was a hit or a miss is seen through the file: after the
 * slices are cached the file is rewritten with a new generation number,
 * so a hit returns the old generation and a miss (re-read) the new. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "unit.h"

#define SLICE 4096u
#define NSLICES 256u

static int fd = -1;
static char path[] = "/tmp/q2-test-cache-XXXXXX";

struct wb_log {
  unsigned calls;
  uint64_t offsets[64];
  uint8_t first_bytes[64];      /* byte 16 of each written slice */
  uint32_t lens[64];
  int fail_with;                /* return this (< 0) instead of writing */
  bool write_to_file;
};

static int
writeback (void *opaque, uint64_t offset, const uint8_t *data, uint32_t len)
{
  struct wb_log *log = opaque;

  if (log->fail_with)
    return log->fail_with;
  if (log->calls < 64) {
    log->offsets[log->calls] = offset;
    log->first_bytes[log->calls] = data[16];
    log->lens[log->calls] = len;
  }
  log->calls++;
  if (log->write_to_file && pwrite (fd, data, len, offset) != (ssize_t) len)
    return q2_err (EIO, "test writeback failed");
  return 0;
}

static bool
wrote (const struct wb_log *log, uint64_t offset)
{
  unsigned i;
  for (i = 0; i < log->calls && i < 64; i++)
    if (log->offsets[i] == offset)
      return true;
  return false;
}

/* Slice k of the file holds: u64 generation, u64 k, then k's byte. */
static void
write_slice (unsigned k, uint64_t gen)
{
  uint8_t buf[SLICE];

  memset (buf, 0x40 + k, sizeof buf);
  memcpy (buf, &gen, 8);
  memcpy (buf + 8, &(uint64_t) { k }, 8);
  if (pwrite (fd, buf, sizeof buf, (uint64_t) k * SLICE) != SLICE)
    abort ();
}

static void
write_all (uint64_t gen)
{
  unsigned k;
  for (k = 0; k < NSLICES; k++)
    write_slice (k, gen);
}

static uint64_t
gen_of (const uint8_t *p)
{
  uint64_t g;
  memcpy (&g, p, 8);
  return g;
}

#define OFF(k) ((uint64_t) (k) * SLICE)

/* Gets slice k and returns its generation, or UINT64_MAX on error. */
static uint64_t
get (struct q2_cache *c, unsigned k, uint8_t **pp)
{
  uint8_t *p = NULL;
  uint64_t idx;

  if (q2_cache_get (c, fd, OFF (k), "test slice", &p) < 0 || p == NULL)
    return UINT64_MAX;
  memcpy (&idx, p + 8, 8);
  CHECK_EQ_U64 (idx, k);
  if (pp)
    *pp = p;
  return gen_of (p);
}

static void
test_lru_order (void)
{
  struct wb_log log = { 0 };
  struct q2_cache *c = q2_cache_new (SLICE, 2, writeback, &log);
  enum { A = 0, B = 1, C = 2 };

  CHECK (c != NULL);
  if (!c)
    return;
  CHECK_EQ_U64 (q2_cache_slice_size (c), SLICE);
  write_all (1);
  CHECK_EQ_U64 (get (c, A, NULL), 1);
  CHECK_EQ_U64 (get (c, B, NULL), 1);
  CHECK_EQ_U64 (get (c, A, NULL), 1);
  CHECK_EQ_U64 (get (c, C, NULL), 1);   /* evicts B, the least recent */
  write_all (2);
  CHECK_EQ_U64 (get (c, A, NULL), 1);   /* hit */
  CHECK_EQ_U64 (get (c, C, NULL), 1);   /* hit */
  CHECK_EQ_U64 (get (c, B, NULL), 2);   /* re-read; evicts A */
  CHECK_EQ_U64 (get (c, C, NULL), 1);   /* still a hit */
  write_all (3);
  CHECK_EQ_U64 (get (c, A, NULL), 3);   /* A was evicted by B */
  CHECK (!q2_cache_has_dirty (c));
  CHECK_EQ_U64 (log.calls, 0);          /* nothing dirty, no write-back */
  q2_cache_free (c);
}

/* Random accesses and discards against a model LRU of the same
 * capacity.  Capacities past 32 make the hash grow while in use. */
static void
lru_model (unsigned cap)
{
  struct q2_cache *c = q2_cache_new (SLICE, cap, writeback, &(struct wb_log) { 0 });
  unsigned model[NSLICES], n = 0, step, mismatches = 0;
  uint64_t gen = 100, rs = 12345 + cap;

  CHECK (c != NULL);
  if (!c)
    return;
  unit_context ("capacity %u", cap);
  write_all (gen);
  for (step = 0; step < 20000; step++) {
    unsigned k, i, pos = cap;
    bool model_hit;
    uint64_t g;

    rs = rs * 6364136223846793005ULL + 1442695040888963407ULL;
    /* Skewed towards a hot set a bit bigger than the cache. */
    k = (rs >> 33) % ((rs >> 20) % 2 ? Q2_MIN (cap + cap / 2 + 2, NSLICES)
                      : NSLICES);
    for (i = 0; i < n; i++)
      if (model[i] == k)
        pos = i;
    if ((rs >> 40) % 16 == 0) {
      /* Discard: gone from the cache, its slot reused before any other. */
      if (pos < cap) {
        memmove (model + pos, model + pos + 1, (n - pos - 1) * sizeof model[0]);
        n--;
      }
      q2_cache_discard (c, OFF (k), SLICE);
      continue;
    }
    model_hit = pos < cap;
    if (!model_hit)
      pos = n < cap ? n++ : cap - 1;   /* new, or evict the last */
    memmove (model + 1, model, pos * sizeof model[0]);
    model[0] = k;

    write_slice (k, ++gen);
    g = get (c, k, NULL);
    if ((g == gen) == model_hit) {
      if (mismatches++ < 5)
        fprintf (stderr, "step %u slice %u: model %s, cache %s\n", step, k,
                 model_hit ? "hit" : "miss", g == gen ? "miss" : "hit");
    }
  }
  CHECK_EQ_U64 (mismatches, 0);
  unit_context (NULL);
  q2_cache_free (c);
}

static void
test_lru_model (void)
{
  static const unsigned caps[] = { 2, 8, 33, 64, 100, 200 };
  unsigned i;

  for (i = 0; i < sizeof caps / sizeof caps[0]; i++)
    lru_model (caps[i]);
}

static void
test_dirty_eviction (void)
{
  struct wb_log log = { .write_to_file = true };
  struct q2_cache *c = q2_cache_new (SLICE, 2, writeback, &log);
  uint8_t *p;

  CHECK (c != NULL);
  if (!c)
    return;
  write_all (10);
  CHECK_EQ_U64 (get (c, 5, &p), 10);
  p[16] = 0xaa;                      /* change the data... */
  memset (p + 100, 0x77, 50);
  q2_cache_mark_dirty (c, OFF (5));     /* ... and mark it */
  CHECK (q2_cache_has_dirty (c));
  CHECK_EQ_U64 (get (c, 6, NULL), 10);
  CHECK_EQ_U64 (log.calls, 0);
  CHECK_EQ_U64 (get (c, 7, NULL), 10);  /* evicts 5: written back */
  CHECK_EQ_U64 (log.calls, 1);
  CHECK_EQ_U64 (log.offsets[0], OFF (5));
  CHECK_EQ_U64 (log.lens[0], SLICE);
  CHECK (!q2_cache_has_dirty (c));
  CHECK_EQ_U64 (get (c, 8, NULL), 10);  /* evicts 6, clean: not written */
  CHECK_EQ_U64 (log.calls, 1);

  /* The written-back data comes back on a re-read. */
  CHECK_EQ_U64 (get (c, 5, &p), 10);
  CHECK_EQ_U64 (p[16], 0xaa);
  CHECK_EQ_U64 (p[120], 0x77);
  CHECK_EQ_U64 (p[200], 0x45);

  /* mark_dirty of something not cached does nothing. */
  q2_cache_mark_dirty (c, OFF (40));
  CHECK (!q2_cache_has_dirty (c));

  /* A new slice from get_empty is zeroed and dirty. */
  log.calls = 0;
  CHECK_EQ_INT (q2_cache_get_empty (c, OFF (50), &p), 0);
  {
    unsigned i, nz = 0;
    for (i = 0; i < SLICE; i++)
      nz += p[i] != 0;
    CHECK_EQ_U64 (nz, 0);
  }
  CHECK (q2_cache_has_dirty (c));
  p[16] = 0x99;
  CHECK_EQ_U64 (get (c, 1, NULL), 10);
  CHECK_EQ_U64 (get (c, 2, NULL), 10);  /* evicts 50 */
  CHECK_EQ_U64 (log.calls, 1);
  CHECK_EQ_U64 (log.offsets[0], OFF (50));
  CHECK_EQ_U64 (log.first_bytes[0], 0x99);

  /* get_empty over a cached slice clears it and makes it dirty. */
  log.calls = 0;
  CHECK_EQ_INT (q2_cache_get_empty (c, OFF (2), &p), 0);
  CHECK_EQ_U64 (gen_of (p), 0);
  CHECK (q2_cache_has_dirty (c));
  CHECK_EQ_INT (q2_cache_flush (c), 0);
  CHECK_EQ_U64 (log.calls, 1);
  CHECK_EQ_U64 (log.offsets[0], OFF (2));
  q2_cache_free (c);
  write_all (10);
}

static void
test_flush (void)
{
  struct wb_log log = { 0 };
  struct q2_cache *c = q2_cache_new (SLICE, 4, writeback, &log);
  uint8_t *p;

  CHECK (c != NULL);
  if (!c)
    return;
  write_all (20);
  CHECK_EQ_U64 (get (c, 1, &p), 20);
  p[16] = 0x11;
  q2_cache_mark_dirty (c, OFF (1));
  CHECK_EQ_U64 (get (c, 2, NULL), 20);   /* clean */
  CHECK_EQ_U64 (get (c, 3, &p), 20);
  p[16] = 0x33;
  q2_cache_mark_dirty (c, OFF (3));
  CHECK_EQ_INT (q2_cache_flush (c), 0);
  CHECK_EQ_U64 (log.calls, 2);
  CHECK (wrote (&log, OFF (1)));
  CHECK (wrote (&log, OFF (3)));
  CHECK (!wrote (&log, OFF (2)));
  CHECK (!q2_cache_has_dirty (c));
  /* Flushed slices stay cached and clean: no second write. */
  CHECK_EQ_INT (q2_cache_flush (c), 0);
  CHECK_EQ_U64 (log.calls, 2);
  CHECK_EQ_U64 (get (c, 1, &p), 20);
  CHECK_EQ_U64 (p[16], 0x11);
  /* ... nor when they are evicted. */
  CHECK_EQ_U64 (get (c, 10, NULL), 20);
  CHECK_EQ_U64 (get (c, 11, NULL), 20);
  CHECK_EQ_U64 (get (c, 12, NULL), 20);
  CHECK_EQ_U64 (get (c, 13, NULL), 20);
  CHECK_EQ_U64 (log.calls, 2);

  /* A failing write-back keeps the slice dirty, and the error comes
   * back from flush and from the get that needed the slot. */
  CHECK_EQ_U64 (get (c, 4, &p), 20);
  q2_cache_mark_dirty (c, OFF (4));
  log.fail_with = -ENOSPC;
  CHECK_EQ_INT (q2_cache_flush (c), -ENOSPC);
  CHECK (q2_cache_has_dirty (c));
  CHECK_EQ_U64 (get (c, 14, NULL), 20);
  CHECK_EQ_U64 (get (c, 15, NULL), 20);
  CHECK_EQ_U64 (get (c, 16, NULL), 20);     /* 4 is now the LRU slot */
  CHECK_EQ_INT (q2_cache_get (c, fd, OFF (17), "test", &p), -ENOSPC);
  CHECK (q2_cache_has_dirty (c));
  log.fail_with = 0;
  log.calls = 0;
  CHECK_EQ_INT (q2_cache_flush (c), 0);
  CHECK_EQ_U64 (log.calls, 1);
  CHECK_EQ_U64 (log.offsets[0], OFF (4));
  CHECK (!q2_cache_has_dirty (c));
  q2_cache_free (c);
}

static void
test_discard (void)
{
  struct wb_log log = { 0 };
  struct q2_cache *c = q2_cache_new (SLICE, 4, writeback, &log);
  uint8_t *p;

  CHECK (c != NULL);
  if (!c)
    return;
  write_all (30);
  CHECK_EQ_U64 (get (c, 1, &p), 30);
  p[16] = 0x11;
  q2_cache_mark_dirty (c, OFF (1));
  CHECK_EQ_U64 (get (c, 2, &p), 30);
  p[16] = 0x22;
  q2_cache_mark_dirty (c, OFF (2));
  CHECK_EQ_U64 (get (c, 3, NULL), 30);

  /* Drop slice 1: never written, and re-read from the file. */
  q2_cache_discard (c, OFF (1), SLICE);
  CHECK_EQ_U64 (log.calls, 0);
  CHECK (q2_cache_has_dirty (c));           /* 2 still is */
  CHECK_EQ_INT (q2_cache_flush (c), 0);
  CHECK_EQ_U64 (log.calls, 1);
  CHECK_EQ_U64 (log.offsets[0], OFF (2));
  write_all (31);
  CHECK_EQ_U64 (get (c, 1, &p), 31);        /* re-read */
  CHECK_EQ_U64 (p[16], 0x41);
  CHECK_EQ_U64 (get (c, 3, NULL), 30);      /* untouched: still cached */

  /* A range covering several slices, some dirty; ones outside stay. */
  log.calls = 0;
  CHECK_EQ_U64 (get (c, 2, &p), 30);
  q2_cache_mark_dirty (c, OFF (2));
  CHECK_EQ_U64 (get (c, 3, &p), 30);
  q2_cache_mark_dirty (c, OFF (3));
  CHECK_EQ_U64 (get (c, 4, &p), 31);
  q2_cache_mark_dirty (c, OFF (4));
  q2_cache_discard (c, OFF (2), 2 * SLICE);  /* 2 and 3 */
  CHECK_EQ_INT (q2_cache_flush (c), 0);
  CHECK_EQ_U64 (log.calls, 1);
  CHECK_EQ_U64 (log.offsets[0], OFF (4));
  write_all (32);
  CHECK_EQ_U64 (get (c, 2, NULL), 32);
  CHECK_EQ_U64 (get (c, 3, NULL), 32);
  CHECK_EQ_U64 (get (c, 4, NULL), 31);
  /* Discarding what is not cached is harmless. */
  q2_cache_discard (c, OFF (40), 10 * SLICE);
  CHECK_EQ_U64 (get (c, 4, NULL), 31);

  /* Discard, then fill the cache: evicted dirty slices are still
   * written back, discarded ones never. */
  log.calls = 0;
  CHECK_EQ_U64 (get (c, 20, NULL), 32);
  q2_cache_mark_dirty (c, OFF (20));
  CHECK_EQ_U64 (get (c, 21, NULL), 32);
  q2_cache_mark_dirty (c, OFF (21));
  q2_cache_discard (c, OFF (21), SLICE);
  {
    unsigned k;
    for (k = 30; k < 40; k++)
      CHECK_EQ_U64 (get (c, k, NULL), 32);
  }
  CHECK_EQ_U64 (log.calls, 1);
  CHECK_EQ_U64 (log.offsets[0], OFF (20));
  CHECK (!q2_cache_has_dirty (c));
  q2_cache_free (c);
}

static void
test_read_error (void)
{
  struct wb_log log = { 0 };
  struct q2_cache *c = q2_cache_new (SLICE, 2, writeback, &log);
  uint8_t *p;

  CHECK (c != NULL);
  if (!c)
    return;
  write_all (40);
  /* Past the end of the file: a short read is an error. */
  CHECK_EQ_INT (q2_cache_get (c, fd, OFF (NSLICES), "test slice", &p), -EIO);
  CHECK_EQ_INT (q2_cache_get (c, fd, OFF (NSLICES + 100), "test slice", &p),
                -EIO);
  /* The cache still works, and the failed offset is not cached. */
  CHECK_EQ_U64 (get (c, 0, NULL), 40);
  CHECK_EQ_U64 (get (c, 1, NULL), 40);
  CHECK_EQ_U64 (get (c, 0, NULL), 40);
  if (ftruncate (fd, (NSLICES + 1) * SLICE) == 0)
    CHECK_EQ_INT (q2_cache_get (c, fd, OFF (NSLICES), "test slice", &p), 0);
  if (ftruncate (fd, NSLICES * SLICE) != 0)
    abort ();
  q2_cache_free (c);
  q2_cache_free (NULL);
}

/* open.c creates its caches without a write-back function and sets it
 * later; fewer than 2 slots are rounded up to 2. */
static void
test_set_writeback (void)
{
  struct wb_log log = { 0 };
  struct q2_cache *c = q2_cache_new (SLICE, 1, NULL, NULL);
  uint8_t *p;

  CHECK (c != NULL);
  if (!c)
    return;
  write_all (50);
  CHECK_EQ_U64 (get (c, 0, NULL), 50);
  CHECK_EQ_U64 (get (c, 1, NULL), 50);
  write_all (51);
  CHECK_EQ_U64 (get (c, 0, NULL), 50);      /* two slots after all */
  q2_cache_set_writeback (c, writeback, &log);
  CHECK_EQ_U64 (get (c, 1, &p), 50);
  p[16] = 0x5e;
  q2_cache_mark_dirty (c, OFF (1));
  CHECK_EQ_U64 (get (c, 0, NULL), 50);
  CHECK_EQ_U64 (get (c, 2, NULL), 51);      /* evicts 1 */
  CHECK_EQ_U64 (log.calls, 1);
  CHECK_EQ_U64 (log.offsets[0], OFF (1));
  CHECK_EQ_U64 (log.first_bytes[0], 0x5e);
  q2_cache_free (c);
}

int
main (void)
{
  fd = mkstemp (path);
  if (fd < 0) {
    perror ("mkstemp");
    return 1;
  }
  unlink (path);
  RUN (test_lru_order);
  RUN (test_lru_model);
  RUN (test_dirty_eviction);
  RUN (test_flush);
  RUN (test_discard);
  RUN (test_read_error);
  RUN (test_set_writeback);
  close (fd);
  return unit_done ();
}
