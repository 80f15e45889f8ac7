/* Cluster allocation and deferred freeing.
 *
 * Allocation scans refcounts from a hint below which no cluster is free,
 * so freed clusters are reused before the file grows, without a full
 * scan per allocation.  Freeing is deferred: the decrement is applied
 * only after the L2/L1 changes that dropped the reference are durable
 * (see q2_flush_locked), so a crash can leak a cluster but never leave
 * a reference to a cluster with refcount 0. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

/* Past this many queued frees, flush early to bound memory; past this
 * many queued bytes (or a quarter of the file), to bound disk use: a
 * client that trims and rewrites without flushing would otherwise grow
 * the file without end, since freed clusters wait for the flush. */
#define MAX_PENDING_FREES (1u << 20)
#define MIN_PENDING_FREE_BYTES (64ULL << 20)

static uint32_t
per_block_log (const struct q2_image *img)
{
  return img->cluster_bits + 3 - img->hdr.refcount_order;
}

int
q2_alloc_clusters (struct q2_image *img, uint64_t n, uint64_t *offset,
                   bool *fresh)
{
  uint64_t cs = img->cluster_size;
  uint64_t max_cluster = (QCOW2_MAX_HOST_OFFSET + 1) / cs;
  uint64_t c, start, run, first_free, end;
  int r;

  /* Every refcount reads 0: allocating would hand out live clusters. */
  if (img->refcounts_lost)
    return q2_mark_corrupt (img, "the refcount table is missing or past "
                            "the end of the file: no cluster can be "
                            "allocated until the refcounts are rebuilt "
                            "(check -r all)");
 retry:
  run = 0;
  start = first_free = UINT64_MAX;
  /* Clusters in use are skipped a refcount word at a time: leaked ones
   * past the end of the file can be many (QEMU allocates after them,
   * and so do we), up to a bound. */
  for (c = img->free_hint; run < n; c++) {
    uint64_t f;
    if ((r = q2_refcount_skip_used (img, c, &f)) < 0)
      return r;
    if (f != c)
      run = 0;
    c = f;
    if (c + n > max_cluster)
      return q2_err (ENOSPC, "no free host cluster below the 64 PiB limit");
    if (first_free == UINT64_MAX)
      first_free = c;
    if (run++ == 0)
      start = c;
  }
  /* Every cluster needs a refcount block; creating one uses a cluster
   * of the run, so look again. */
  for (c = start; c < start + n; c++) {
    uint64_t rt = c >> per_block_log (img);
    if (rt >= img->reftable_entries || img->reftable[rt] == 0) {
      if ((r = q2_refcount_update (img, c, 1, NULL)) < 0)
        return r;
      /* That created the block (elsewhere) and counted c: undo c. */
      if ((r = q2_refcount_update (img, c, -1, NULL)) < 0)
        return r;
      goto retry;
    }
  }
  for (c = start; c < start + n; c++)
    if ((r = q2_refcount_update (img, c, 1, NULL)) < 0)
      return r;
  img->free_hint = first_free == start ? start + n : first_free;

  *offset = start * cs;
  end = (start + n) * cs;
  *fresh = *offset >= img->file_size;
  /* No ftruncate: whoever allocated the cluster writes at least one byte
   * of it (metadata whole, data from the guest write on), which puts its
   * start inside the file as qemu-img check expects; bytes never written
   * read as zeros.  file_size is the end of what is allocated. */
  if (end > img->file_size)
    img->file_size = end;
  return 0;
}

int
q2_push_range (struct q2_range **v, size_t *n, size_t *cap, uint64_t offset,
               uint64_t length)
{
  if (*n == *cap) {
    size_t c = *cap ? *cap * 2 : 64;
    struct q2_range *p = realloc (*v, c * sizeof *p);
    if (p == NULL)
      return q2_err (ENOMEM, "out of memory for a list of cluster ranges");
    *v = p;
    *cap = c;
  }
  (*v)[(*n)++] = (struct q2_range) { offset, length };
  return 0;
}

int
q2_free_later (struct q2_image *img, uint64_t offset, uint64_t length)
{
  int r;

  /* Once the image is corrupt, freeing could release live metadata (a
   * cluster the overlap check just refused, say): leak instead. */
  if (length == 0 || img->corrupt)
    return 0;
  if ((r = q2_push_range (&img->pending_free, &img->nb_pending_free,
                          &img->cap_pending_free, offset, length)) < 0)
    return r;
  img->pending_free_bytes += length;
  if (img->nb_pending_free >= MAX_PENDING_FREES ||
      img->pending_free_bytes > Q2_MAX (MIN_PENDING_FREE_BYTES,
                                        img->file_size / 4))
    return q2_flush_locked (img);
  return 0;
}

/* Gives clusters whose refcount reached zero back to the file system,
 * but never a range that still holds metadata: a refcount that wrongly
 * reached zero there must not destroy the tables. */
static void
punch (struct q2_image *img, uint64_t offset, uint64_t length)
{
  const char *hit;

  if (length == 0 ||
      q2_find_overlap (img, offset, length, Q2_OVERLAP_ALL, &hit) < 0 || hit)
    return;
  if (fallocate (img->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 offset, length) == -1) {
    /* Not every file system can punch holes; the space stays used. */
  }
}

int
q2_compare_ranges (const void *x, const void *y)
{
  const struct q2_range *a = x, *b = y;

  return a->offset < b->offset ? -1 : a->offset > b->offset;
}

int
q2_apply_pending_frees (struct q2_image *img)
{
  uint64_t cs = img->cluster_size, run = 0, run_len = 0;
  size_t i;
  int r = 0;

  if (img->corrupt) {
    img->nb_pending_free = 0;   /* leaked, see q2_free_later */
    return 0;
  }
  /* In file order, so that freed neighbours are punched as one range:
   * clusters smaller than a file system block free nothing alone. */
  qsort (img->pending_free, img->nb_pending_free, sizeof *img->pending_free,
         q2_compare_ranges);
  for (i = 0; i < img->nb_pending_free; i++) {
    struct q2_range *f = &img->pending_free[i];
    uint64_t end = f->offset + f->length;
    while (f->length > 0) {
      uint64_t c = f->offset / cs, rc;
      if ((r = q2_refcount_update (img, c, -1, &rc)) < 0)
        goto out;
      /* Lowered: shrink the entry, so that a failure further on in a
       * range that spans clusters (a compressed one) never lowers this
       * cluster a second time when the queue is retried. */
      f->offset = Q2_MIN ((c + 1) * cs, end);
      f->length = end - f->offset;
      if (rc == 0) {
        /* Stale cached metadata of a freed L2 table must not be reused. */
        q2_cache_discard (img->l2_cache, c * cs, cs);
        if (run + run_len != c * cs) {
          punch (img, run, run_len);
          run = c * cs;
          run_len = 0;
        }
        run_len += cs;
      }
    }
  }
 out:
  if (!img->corrupt)            /* an underflow above marks it */
    punch (img, run, run_len);
  /* Whatever was applied is gone from the queue. */
  if (r < 0) {
    memmove (img->pending_free, img->pending_free + i,
             (img->nb_pending_free - i) * sizeof *img->pending_free);
    img->nb_pending_free -= i;
    return r;
  }
  img->nb_pending_free = 0;
  img->pending_free_bytes = 0;
  return 0;
}

int
q2_l2_writeback (void *opaque, uint64_t offset, const uint8_t *data,
                 uint32_t len)
{
  struct q2_image *img = opaque;
  int r;

  /* Refcounts for every cluster this slice points at go first. */
  if ((r = q2_flush_refcounts (img)) < 0)
    return r;
  r = q2_check_overlap (img, offset, len, "L2 table",
                        Q2_OVERLAP_ALL & ~Q2_OVERLAP_L2);
  if (r == 0)
    r = q2_io_pwrite (img->fd, data, len, offset, "L2 table");
  if (r == 0)
    img->unsynced |= Q2_UNSYNCED_L2;
  return r;
}
