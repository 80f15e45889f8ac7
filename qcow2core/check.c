/* Walking every reference in an image, and rebuilding the refcount
 * structures from that walk.  Used to repair dirty images (lazy
 * refcounts after a crash) before writing, and by the image tool. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

struct walk {
  struct q2_image *img;
  uint32_t *refs;
  uint64_t nb;
};

static int
inc (struct walk *w, uint64_t off, uint64_t len, const char *what)
{
  uint64_t c, first, last;

  if (len == 0)
    return 0;
  first = off >> w->img->cluster_bits;
  last = (off + len - 1) >> w->img->cluster_bits;
  if (off + len < off || last >= w->nb)
    return q2_err (EIO, "%s at host offset %#llx (%llu bytes) is past the "
                   "end of the file", what, (unsigned long long) off,
                   (unsigned long long) len);
  for (c = first; c <= last; c++)
    if (w->refs[c] != UINT32_MAX)
      w->refs[c]++;
  return 0;
}

static int
walk_l2 (struct walk *w, uint64_t l2_off, uint8_t *buf)
{
  struct q2_image *img = w->img;
  uint64_t i, n = 1ULL << img->l2_bits;
  bool data_file = img->data_fd != img->fd;
  int r;

  r = q2_io_pread (img->fd, buf, img->cluster_size, l2_off, false,
                   "L2 table");
  if (r < 0)
    return r;
  for (i = 0; i < n; i++) {
    uint64_t e = q2_be64 (buf + i * img->l2_entry_size);
    if (e & QCOW_OFLAG_COMPRESSED) {
      uint64_t off = e & img->coffset_mask;
      uint64_t nb = ((e >> img->csize_shift) & img->csize_mask) + 1;
      r = inc (w, off, nb * 512 - (off & 511), "compressed cluster");
    }
    else {
      uint64_t host = e & L2E_OFFSET_MASK;
      uint64_t bitmap = img->extended_l2 ?
        q2_be64 (buf + i * img->l2_entry_size + 8) : 0;
      if (host && !data_file && !q2_unaligned_without_data (img, e, bitmap)) {
        if (!Q2_IS_ALIGNED (host, img->cluster_size))
          return q2_err (EIO, "L2 table at %#llx, entry %llu: unaligned "
                         "data cluster offset %#llx",
                         (unsigned long long) l2_off, (unsigned long long) i,
                         (unsigned long long) host);
        r = inc (w, host, img->cluster_size, "data cluster");
      }
    }
    if (r < 0)
      return q2_err_prefix (r, "L2 table at %#llx, entry %llu",
                            (unsigned long long) l2_off,
                            (unsigned long long) i);
  }
  return 0;
}

static int
walk_l1 (struct walk *w, const uint64_t *l1, uint32_t l1_size, uint8_t *buf)
{
  uint32_t i;
  int r;

  for (i = 0; i < l1_size; i++) {
    uint64_t l2 = l1[i] & L1E_OFFSET_MASK;
    if (l2 == 0)
      continue;
    if (!Q2_IS_ALIGNED (l2, w->img->cluster_size))
      return q2_err (EIO, "L1 entry %u: unaligned L2 table offset %#llx", i,
                     (unsigned long long) l2);
    if ((r = inc (w, l2, w->img->cluster_size, "L2 table")) < 0 ||
        (r = walk_l2 (w, l2, buf)) < 0)
      return r;
  }
  return 0;
}

static int
walk_snapshots (struct walk *w, uint8_t *buf)
{
  struct q2_image *img = w->img;
  uint32_t i;
  int r;

  if (img->nb_snapshots == 0)
    return 0;
  r = inc (w, img->hdr.snapshots_offset, img->snapshot_table_len,
           "snapshot table");
  for (i = 0; r == 0 && i < img->nb_snapshots; i++) {
    const struct q2_snapshot *s = &img->snapshots[i];
    uint64_t *l1 = NULL;
    /* An invalid L1 table references nothing (check reports it). */
    if (s->broken)
      continue;
    r = inc (w, s->l1_offset, (uint64_t) s->l1_size * 8, "snapshot L1 table");
    if (r == 0)
      r = q2_snapshot_read_l1 (img, s, &l1);
    if (r == 0)
      r = walk_l1 (w, l1, s->l1_size, buf);
    free (l1);
    if (r < 0)
      return q2_err_prefix (r, "snapshot '%s'", s->name);
  }
  return r;
}

static int
inc_range (void *opaque, uint64_t off, uint64_t len, const char *what)
{
  return inc (opaque, off, len, what);
}

int
q2_counted_clusters (const struct q2_image *img, uint64_t *nb)
{
  *nb = (img->file_size + img->cluster_size - 1) >> img->cluster_bits;
  if (*nb > MAX_COUNTED_CLUSTERS)
    return q2_err (EFBIG, "the file has %llu clusters, too many to count "
                   "references in memory (at most %u)",
                   (unsigned long long) *nb, MAX_COUNTED_CLUSTERS);
  return 0;
}

int
q2_count_references (struct q2_image *img, uint32_t **refs, uint64_t *nb)
{
  struct walk w = { .img = img };
  uint8_t *buf;
  int r;

  /* 4 bytes per cluster of the file: at most 1 GiB of counters. */
  if ((r = q2_counted_clusters (img, &w.nb)) < 0)
    return r;
  w.refs = calloc (w.nb ? w.nb : 1, sizeof *w.refs);
  buf = malloc (img->cluster_size);
  if (w.refs == NULL || buf == NULL) {
    free (w.refs);
    free (buf);
    return q2_err (ENOMEM, "out of memory counting references");
  }
  r = inc (&w, 0, img->cluster_size, "header");
  if (r == 0)
    r = inc (&w, img->hdr.l1_table_offset, (uint64_t) img->l1_size * 8,
             "L1 table");
  if (r == 0)
    r = walk_l1 (&w, img->l1, img->l1_size, buf);
  if (r == 0)
    r = walk_snapshots (&w, buf);
  if (r == 0 && img->hdr.has_crypto_ext)
    r = inc (&w, img->hdr.crypto_offset, img->hdr.crypto_length,
             "encryption header");
  if (r == 0)
    r = q2_bitmap_clusters (img, inc_range, &w);
  free (buf);
  if (r < 0) {
    free (w.refs);
    return r;
  }
  *refs = w.refs;
  *nb = w.nb;
  return 0;
}

static void
put_refcount (uint8_t *blocks, uint32_t order, uint64_t i, uint64_t v)
{
  /* Entries of a run of consecutive blocks are one packed array. */
  switch (order) {
  case 0: case 1: case 2: {
    unsigned bits = 1u << order, per_byte = 8 / bits;
    unsigned shift = (i % per_byte) * bits;
    blocks[i / per_byte] |= v << shift;
    break;
  }
  case 3: blocks[i] = v; break;
  case 4: q2_put_be16 (blocks + i * 2, v); break;
  case 5: q2_put_be32 (blocks + i * 4, v); break;
  default: q2_put_be64 (blocks + i * 8, v); break;
  }
}

int
q2_fix_copied_flags (struct q2_image *img, q2_refcount_fn refcount,
                     void *opaque)
{
  bool data_file = img->data_fd != img->fd;
  uint64_t i, j, n = 1ULL << img->l2_bits;
  int r;

  for (i = 0; i < img->l1_size; i++) {
    uint64_t l2 = img->l1[i] & L1E_OFFSET_MASK;
    uint64_t want, rc;
    if (l2 == 0)
      continue;
    if ((r = refcount (opaque, l2 >> img->cluster_bits, &rc)) < 0)
      return r;
    want = rc == 1 ? QCOW_OFLAG_COPIED : 0;
    if ((img->l1[i] & QCOW_OFLAG_COPIED) != want) {
      img->l1[i] = (img->l1[i] & ~QCOW_OFLAG_COPIED) | want;
      q2_l1_mark_dirty (img, i, i + 1);
    }
    /* Entries of shared tables are fixed too: QEMU checks every entry
     * reachable from the active L1. */
    for (j = 0; j < n; j++) {
      uint64_t g = ((i << img->l2_bits) + j) << img->cluster_bits;
      uint64_t so, e, host;
      uint8_t *p;
      if ((r = q2_l2_entry_ref (img, l2, g, &p, &so)) < 0)
        return r;
      e = q2_be64 (p);
      host = e & L2E_OFFSET_MASK;
      if ((e & QCOW_OFLAG_COMPRESSED) || (host == 0 && !data_file))
        continue;
      if (data_file)
        want = (host || (e & QCOW_OFLAG_COPIED)) ? QCOW_OFLAG_COPIED : 0;
      else {
        if ((r = refcount (opaque, host >> img->cluster_bits, &rc)) < 0)
          return r;
        want = rc == 1 ? QCOW_OFLAG_COPIED : 0;
      }
      if ((e & QCOW_OFLAG_COPIED) != want) {
        /* Refetch: the refcount lookup may have used the cache. */
        if ((r = q2_l2_entry_ref (img, l2, g, &p, &so)) < 0)
          return r;
        q2_put_be64 (p, (e & ~QCOW_OFLAG_COPIED) | want);
        q2_cache_mark_dirty (img->l2_cache, so);
      }
    }
  }
  return 0;
}

struct refs_array {
  const uint32_t *refs;
  uint64_t nb;
};

static int
refcount_from_array (void *opaque, uint64_t cluster, uint64_t *rc)
{
  const struct refs_array *a = opaque;

  *rc = cluster < a->nb ? a->refs[cluster] : 0;
  return 0;
}

int
q2_rebuild_refcounts (struct q2_image *img)
{
  uint32_t order = img->hdr.refcount_order;
  uint32_t pbl = img->cluster_bits + 3 - order;
  uint64_t cs = img->cluster_size, max;
  uint64_t nb, start, entries, table_clusters, k, end, c, i;
  uint64_t *table = NULL;
  uint32_t *refs = NULL;
  uint8_t *blocks = NULL;
  struct refs_array arr;
  int r;

  if ((r = q2_cache_flush (img->l2_cache)) < 0)
    return r;
  if ((r = q2_count_references (img, &refs, &nb)) < 0)
    return r;
  max = q2_max_refcount (img);

  /* New table and blocks go after everything: blocks for every range up
   * to the end of the new structures. */
  start = nb;
  for (k = 1;;) {
    entries = Q2_ROUND_UP (k, cs / 8);
    table_clusters = entries * 8 / cs;
    end = start + table_clusters + k;
    if (((end - 1) >> pbl) + 1 <= k)
      break;
    k = ((end - 1) >> pbl) + 1;
  }
  if (entries * 8 > QCOW2_MAX_REFTABLE_BYTES) {
    r = q2_err (ENOSPC, "rebuilt refcount table would be too large");
    goto out;
  }
  table = calloc (entries, sizeof *table);
  blocks = calloc (k, cs);
  if (table == NULL || blocks == NULL) {
    r = q2_err (ENOMEM, "out of memory rebuilding refcounts");
    goto out;
  }
  for (c = 0; c < end; c++) {
    uint64_t v = c < nb ? refs[c] : c >= start;
    if (v > max) {
      r = q2_err (EIO, "cluster %llu has %llu references, more than %u-bit "
                  "refcounts can hold", (unsigned long long) c,
                  (unsigned long long) v, img->refcount_bits);
      goto out;
    }
    if (v)
      put_refcount (blocks, order, c, v);
  }
  for (i = 0; i < k; i++)
    table[i] = (start + table_clusters + i) * cs;

  /* The old structures are no longer referenced: never flush them. */
  q2_cache_discard (img->rb_cache, 0, UINT64_MAX);
  if ((r = q2_install_reftable (img, table, entries, start, table_clusters,
                                blocks, k)) < 0)
    goto out;
  table = NULL;
  img->file_size = Q2_MAX (img->file_size, end * cs);
  img->free_hint = 0;
  img->refcounts_lost = false;

  /* COPIED flags follow the new refcounts; then the image is clean. */
  arr.refs = refs;
  arr.nb = nb;
  if ((r = q2_fix_copied_flags (img, refcount_from_array, &arr)) < 0 ||
      (r = q2_flush_locked (img)) < 0)
    goto out;
  r = q2_set_dirty (img, false);

 out:
  free (refs);
  free (table);
  free (blocks);
  return r;
}
