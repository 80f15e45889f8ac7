/* Refcounts: the refcount table in memory, refcount blocks through the
 * cache, entries of 1 to 64 bits; updates, new refcount blocks and the
 * growth of the refcount table.  Writers hold io_lock exclusively. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static uint32_t
per_block_log (const struct q2_image *img)
{
  return img->cluster_bits + 3 - img->hdr.refcount_order;
}

uint64_t
q2_refblock_entry (const uint8_t *block, uint32_t order, uint64_t i)
{
  switch (order) {
  case 0: case 1: case 2: {
    /* Sub-byte entries are packed starting at the least significant bit. */
    unsigned bits = 1u << order;
    unsigned per_byte = 8 / bits;
    unsigned shift = (i % per_byte) * bits;
    return (block[i / per_byte] >> shift) & ((1u << bits) - 1);
  }
  case 3: return block[i];
  case 4: return q2_be16 (block + i * 2);
  case 5: return q2_be32 (block + i * 4);
  default: return q2_be64 (block + i * 8);
  }
}

static void
set_refblock_entry (uint8_t *block, uint32_t order, uint64_t i, uint64_t v)
{
  switch (order) {
  case 0: case 1: case 2: {
    unsigned bits = 1u << order;
    unsigned per_byte = 8 / bits;
    unsigned shift = (i % per_byte) * bits;
    uint8_t mask = ((1u << bits) - 1) << shift;
    block[i / per_byte] = (block[i / per_byte] & ~mask) | (v << shift);
    break;
  }
  case 3: block[i] = v; break;
  case 4: q2_put_be16 (block + i * 2, v); break;
  case 5: q2_put_be32 (block + i * 4, v); break;
  default: q2_put_be64 (block + i * 8, v); break;
  }
}

/* Finds the cache slice holding the refcount of cluster_index; *slice is
 * NULL when no refcount block covers it (refcount 0).  A writer that
 * meets a bad refcount table entry marks the image corrupt, as for any
 * metadata corruption found while writing. */
static int
locate (struct q2_image *img, uint64_t cluster_index, bool writing,
        uint8_t **slice, uint64_t *index_in_slice, uint64_t *slice_offset)
{
  uint32_t order = img->hdr.refcount_order;
  uint64_t rt_index = cluster_index >> per_block_log (img);
  uint64_t rb_index = cluster_index & ((1ULL << per_block_log (img)) - 1);
  uint64_t rb_off, byte, slice_size, first;
  int r;

  *slice = NULL;
  if (rt_index >= img->reftable_entries)
    return 0;
  rb_off = img->reftable[rt_index] & REFT_OFFSET_MASK;
  if (rb_off == 0)
    return 0;
  if (!Q2_IS_ALIGNED (rb_off, img->cluster_size) ||
      rb_off >= img->file_size ||
      q2_overlaps_fixed_metadata (img, rb_off, img->cluster_size)) {
    q2_err (EIO, "refcount table entry %llu: refcount block offset %#llx "
            "is unaligned, past the end of the file or overlaps the "
            "header, L1 or refcount table", (unsigned long long) rt_index,
            (unsigned long long) rb_off);
    return writing ? q2_mark_corrupt (img, "%s", q2_last_error ()) : -EIO;
  }
  slice_size = q2_cache_slice_size (img->rb_cache);
  byte = (rb_index << order) / 8;
  first = Q2_ROUND_DOWN (byte, slice_size);
  r = q2_cache_get (img->rb_cache, img->fd, rb_off + first,
                    "refcount block", slice);
  if (r < 0)
    return r;
  *slice_offset = rb_off + first;
  *index_in_slice = rb_index - ((first * 8) >> order);
  return 0;
}

static int
refcount_lookup (struct q2_image *img, uint64_t cluster_index, bool writing,
                 uint64_t *refcount)
{
  uint8_t *slice;
  uint64_t i, off;
  int r = locate (img, cluster_index, writing, &slice, &i, &off);

  *refcount = 0;
  if (r < 0)
    return r;
  if (slice)
    *refcount = q2_refblock_entry (slice, img->hdr.refcount_order, i);
  return 0;
}

/* Caller holds img->lock (readers) or io_lock exclusively (writers). */
int
q2_refcount_get (struct q2_image *img, uint64_t cluster_index,
                 uint64_t *refcount)
{
  return refcount_lookup (img, cluster_index, false, refcount);
}

int
q2_refcount_get_writing (struct q2_image *img, uint64_t cluster_index,
                         uint64_t *refcount)
{
  return refcount_lookup (img, cluster_index, true, refcount);
}

/* How many of the n entries from entry i of a refcount block slice are
 * not 0.  Whole 64-bit words at a time where possible: a word holds no
 * zero entry unless the usual has-a-zero-lane test says so (byte order
 * does not matter, only which bits form a lane). */
static uint64_t
used_run (const uint8_t *slice, uint32_t order, uint64_t i, uint64_t n)
{
  unsigned bits = 1u << order;
  uint64_t per_word = 64 >> order;
  uint64_t low = bits == 64 ? 1 : UINT64_MAX / ((1ULL << bits) - 1);
  uint64_t high = low << (bits - 1);
  uint64_t k = 0;

  for (; k < n && (i + k) % per_word; k++)
    if (q2_refblock_entry (slice, order, i + k) == 0)
      return k;
  for (; n - k >= per_word; k += per_word) {
    uint64_t x;
    memcpy (&x, slice + ((i + k) << order) / 8, 8);
    if ((x - low) & ~x & high)
      break;
  }
  for (; k < n; k++)
    if (q2_refblock_entry (slice, order, i + k) == 0)
      return k;
  return n;
}

int
q2_refcount_next_free (struct q2_image *img, uint64_t c, uint64_t limit,
                       uint64_t *found)
{
  uint64_t per_slice = ((uint64_t) q2_cache_slice_size (img->rb_cache) * 8) >>
    img->hdr.refcount_order;

  while (c < limit) {
    uint8_t *slice;
    uint64_t i, off, n, used;
    int r = locate (img, c, true, &slice, &i, &off);
    if (r < 0)
      return r;
    if (slice == NULL)
      break;
    n = Q2_MIN (per_slice - i, limit - c);
    used = used_run (slice, img->hdr.refcount_order, i, n);
    c += used;
    if (used < n)
      break;
  }
  *found = Q2_MIN (c, limit);
  return 0;
}

int
q2_refcount_skip_used (struct q2_image *img, uint64_t c, uint64_t *found)
{
  uint64_t eof = (img->file_size + img->cluster_size - 1) >> img->cluster_bits;
  uint64_t limit = Q2_MAX (c, eof) +
    (MAX_LEAKED_PAST_EOF_BITS >> img->hdr.refcount_order);
  int r = q2_refcount_next_free (img, c, limit, found);

  if (r == 0 && *found == limit)
    return q2_mark_corrupt (img, "more than %llu clusters past the end of "
                            "the file (from cluster %llu) have a refcount",
                            (unsigned long long) (limit - Q2_MAX (c, eof)),
                            (unsigned long long) Q2_MAX (c, eof));
  return r;
}

uint64_t
q2_max_refcount (const struct q2_image *img)
{
  return img->refcount_bits == 64 ? UINT64_MAX :
    (1ULL << img->refcount_bits) - 1;
}

static int write_zero_cluster (struct q2_image *img, uint64_t offset);
static int grow_reftable (struct q2_image *img, uint64_t need_rt,
                          uint64_t avoid);

/* Puts a new, zeroed refcount block for table index rt_index at a free
 * cluster of the range it describes (so it describes itself), avoiding
 * cluster 'avoid'. */
static int
create_refblock (struct q2_image *img, uint64_t rt_index, uint64_t avoid)
{
  uint64_t first = rt_index << per_block_log (img);
  uint64_t last = first + (1ULL << per_block_log (img)) - 1;
  uint64_t loc = Q2_MAX (first, img->free_hint);
  uint64_t used = img->reftable_used;
  uint8_t *slice;
  uint64_t i, off;
  int r;

  if (rt_index >= img->reftable_entries) {
    if ((r = grow_reftable (img, rt_index, avoid)) < 0)
      return r;
    if (img->reftable[rt_index] != 0)
      return 0;                 /* the growth created it */
  }
  if (loc > last)
    loc = first;
  if (loc == avoid)
    loc = loc < last ? loc + 1 : loc - 1;
  r = q2_check_overlap (img, loc << img->cluster_bits, img->cluster_size,
                        "new refcount block", Q2_OVERLAP_ALL);
  if (r < 0)
    return r;
  if ((r = write_zero_cluster (img, loc << img->cluster_bits)) < 0)
    return r;
  img->unsynced |= Q2_UNSYNCED_REFS;
  q2_cache_discard (img->rb_cache, loc << img->cluster_bits,
                    img->cluster_size);
  img->reftable[rt_index] = loc << img->cluster_bits;
  q2_meta_index_update (img, 0, loc << img->cluster_bits, true);
  img->reftable_dirty = true;
  img->reftable_used = Q2_MAX (img->reftable_used, rt_index + 1);
  /* The block counts itself.  If it cannot be read back, unlink it: a
   * block that does not count itself would hand its own cluster out. */
  if ((r = locate (img, loc, true, &slice, &i, &off)) < 0) {
    img->reftable[rt_index] = 0;
    q2_meta_index_update (img, loc << img->cluster_bits, 0, true);
    img->reftable_used = used;
    return r;
  }
  set_refblock_entry (slice, img->hdr.refcount_order, i, 1);
  q2_cache_mark_dirty (img->rb_cache, off);
  return 0;
}

int
q2_refcount_update (struct q2_image *img, uint64_t cluster_index,
                    int64_t delta, uint64_t *refcount)
{
  uint8_t *slice;
  uint64_t i, off, old, v;
  int r;

  if ((r = locate (img, cluster_index, true, &slice, &i, &off)) < 0)
    return r;
  if (slice == NULL) {
    if (delta < 0)
      return q2_mark_corrupt (img, "refcount of cluster %llu would drop "
                              "below zero (no refcount block)",
                              (unsigned long long) cluster_index);
    r = create_refblock (img, cluster_index >> per_block_log (img),
                         cluster_index);
    if (r < 0)
      return r;
    if ((r = locate (img, cluster_index, true, &slice, &i, &off)) < 0)
      return r;
    if (slice == NULL)
      return q2_err (EIO, "refcount block for cluster %llu was not created",
                     (unsigned long long) cluster_index);
  }
  old = q2_refblock_entry (slice, img->hdr.refcount_order, i);
  if (delta > 0 && old > q2_max_refcount (img) - (uint64_t) delta)
    return q2_err (EIO, "refcount of cluster %llu would overflow %u-bit "
                   "refcounts", (unsigned long long) cluster_index,
                   img->refcount_bits);
  if (delta < 0 && old < (uint64_t) -delta)
    return q2_mark_corrupt (img, "refcount of cluster %llu would drop below "
                            "zero (it is %llu)",
                            (unsigned long long) cluster_index,
                            (unsigned long long) old);
  v = old + delta;
  set_refblock_entry (slice, img->hdr.refcount_order, i, v);
  q2_cache_mark_dirty (img->rb_cache, off);
  if (v == 0 && cluster_index < img->free_hint)
    img->free_hint = cluster_index;
  if (refcount)
    *refcount = v;
  return 0;
}

static int
write_zero_cluster (struct q2_image *img, uint64_t offset)
{
  const uint8_t *z = q2_zero_buffer (img);
  int r;

  if (z == NULL)
    return q2_err (ENOMEM, "out of memory");
  r = q2_io_pwrite (img->fd, z, img->cluster_size, offset, "new metadata");
  if (r == 0 && offset + img->cluster_size > img->file_size)
    img->file_size = offset + img->cluster_size;
  return r;
}

int
q2_write_reftable (struct q2_image *img, const uint64_t *table,
                   uint64_t entries, uint64_t offset)
{
  uint64_t bytes = Q2_ROUND_UP (entries * 8, img->cluster_size);
  uint8_t *buf = calloc (1, bytes);
  uint64_t i;
  int r;

  if (buf == NULL)
    return q2_err (ENOMEM, "out of memory for the refcount table");
  for (i = 0; i < entries; i++)
    q2_put_be64 (buf + i * 8, table[i]);
  r = q2_io_pwrite (img->fd, buf, bytes, offset, "refcount table");
  free (buf);
  return r;
}

int
q2_install_reftable (struct q2_image *img, uint64_t *table, uint64_t entries,
                     uint64_t start, uint64_t table_clusters,
                     const uint8_t *blocks, uint64_t nb_blocks)
{
  uint64_t cs = img->cluster_size, rt;
  uint8_t hdr[12];
  int r;

  /* Blocks and table reach the disk before the header points there. */
  if (nb_blocks &&
      (r = q2_io_pwrite (img->fd, blocks, nb_blocks * cs,
                         (start + table_clusters) * cs,
                         "new refcount blocks")) < 0)
    return r;
  if ((r = q2_cache_flush (img->rb_cache)) < 0 ||
      (r = q2_write_reftable (img, table, entries, start * cs)) < 0 ||
      (r = q2_sync (img)) < 0)
    return r;
  q2_put_be64 (hdr, start * cs);
  q2_put_be32 (hdr + 8, table_clusters);
  if ((r = q2_write_header_field (img, 48, hdr, 12)) < 0)
    return r;

  free (img->reftable);
  img->reftable = table;
  img->reftable_entries = entries;
  img->reftable_dirty = false;
  img->reftable_used = 0;
  for (rt = 0; rt < entries; rt++)
    if (table[rt])
      img->reftable_used = rt + 1;
  img->hdr.refcount_table_offset = start * cs;
  img->hdr.refcount_table_clusters = table_clusters;
  img->meta_stale = true;
  return 0;
}

/* Moves the refcount table to a bigger area at the end of the file,
 * clear of cluster 'avoid' (the one whose refcount is being changed).
 * The new table and the refcount blocks that describe it are written
 * and synced before the header points at them, and the old table is
 * freed only after that: a crash leaks at worst. */
static int
grow_reftable (struct q2_image *img, uint64_t need_rt, uint64_t avoid)
{
  uint32_t pbl = per_block_log (img);
  uint64_t cs = img->cluster_size;
  uint64_t start, entries, table_clusters, k, end, rt, j, c;
  uint64_t old_off = img->hdr.refcount_table_offset;
  uint64_t old_clusters = img->hdr.refcount_table_clusters;
  uint64_t *table = NULL;
  uint8_t *blocks = NULL;
  int r;

  if ((r = q2_flush_refcounts (img)) < 0)
    return r;
  start = (img->file_size + cs - 1) / cs;
 place:
  entries = Q2_MAX (need_rt + 1, img->reftable_entries * 3 / 2);
  for (;;) {
    entries = Q2_ROUND_UP (entries, cs / 8);
    if (entries * 8 > QCOW2_MAX_REFTABLE_BYTES)
      return q2_err (ENOSPC, "the refcount table would exceed %u bytes",
                     QCOW2_MAX_REFTABLE_BYTES);
    table_clusters = entries * 8 / cs;
    /* New blocks go after the table; count those the region needs. */
    for (k = 0;;) {
      uint64_t missing = 0;
      end = start + table_clusters + k;
      for (rt = start >> pbl; rt <= (end - 1) >> pbl; rt++)
        missing += rt >= img->reftable_entries || img->reftable[rt] == 0;
      if (missing == k)
        break;
      k = missing;
    }
    if (((end - 1) >> pbl) < entries)
      break;
    entries = ((end - 1) >> pbl) + 1;
  }
  /* The region must not count a cluster twice: not the one being
   * updated (the caller counts it), nor leaked ones past the end of the
   * file that a crash left (1-bit refcounts would overflow). */
  for (c = start; c < end; c++) {
    uint64_t rc = c == avoid;
    rt = c >> pbl;
    if (rc == 0 && rt < img->reftable_entries && img->reftable[rt] != 0 &&
        (r = q2_refcount_get_writing (img, c, &rc)) < 0)
      return r;
    if (rc == 0)
      continue;
    if ((r = q2_refcount_skip_used (img, c + 1, &start)) < 0)
      return r;
    goto place;
  }

  table = calloc (entries, sizeof *table);
  blocks = calloc (k ? k : 1, cs);
  if (table == NULL || blocks == NULL) {
    r = q2_err (ENOMEM, "out of memory growing the refcount table");
    goto out;
  }
  memcpy (table, img->reftable, img->reftable_entries * sizeof *table);
  for (j = 0, rt = start >> pbl; rt <= (end - 1) >> pbl; rt++)
    if (rt >= img->reftable_entries || img->reftable[rt] == 0)
      table[rt] = (start + table_clusters + j++) * cs;

  /* Every cluster of the region gets refcount 1. */
  for (c = start; c < end; c++) {
    rt = c >> pbl;
    if (rt < img->reftable_entries && img->reftable[rt] != 0) {
      if ((r = q2_refcount_update (img, c, 1, NULL)) < 0)
        goto out;
    }
    else {
      uint64_t blk = table[rt] / cs - (start + table_clusters);
      set_refblock_entry (blocks + blk * cs, img->hdr.refcount_order,
                          c & ((1ULL << pbl) - 1), 1);
    }
  }
  if ((r = q2_install_reftable (img, table, entries, start, table_clusters,
                                blocks, k)) < 0)
    goto out;
  table = NULL;
  if (end * cs > img->file_size)
    img->file_size = end * cs;
  r = q2_free_later (img, old_off, old_clusters * cs);

 out:
  free (table);
  free (blocks);
  return r;
}

int
q2_flush_refcounts (struct q2_image *img)
{
  int r;

  if (q2_cache_has_dirty (img->rb_cache) &&
      (r = q2_cache_flush (img->rb_cache)) < 0)
    return r;
  if (img->reftable_dirty) {
    /* New blocks must be on disk before the table points at them, also
     * those that eviction wrote back earlier. */
    if ((img->unsynced & Q2_UNSYNCED_REFS) &&
        (r = q2_sync_ordered (img)) < 0)
      return r;
    r = q2_write_reftable (img, img->reftable, img->reftable_entries,
                           img->hdr.refcount_table_offset);
    if (r < 0)
      return r;
    img->reftable_dirty = false;
    img->unsynced |= Q2_UNSYNCED_REFS;
  }
  /* Refcounts, and the data of newly linked clusters (which may have
   * been written after their refcounts were flushed), reach the disk
   * before any L2 entry that needs them. */
  if (!(img->unsynced & (Q2_UNSYNCED_REFS | Q2_UNSYNCED_DATA)))
    return 0;
  return q2_sync_ordered (img);
}

int
q2_rb_writeback (void *opaque, uint64_t offset, const uint8_t *data,
                 uint32_t len)
{
  struct q2_image *img = opaque;
  int r = q2_check_overlap (img, offset, len, "refcount block",
                            Q2_OVERLAP_ALL & ~Q2_OVERLAP_REFBLOCKS);

  if (r == 0)
    r = q2_io_pwrite (img->fd, data, len, offset, "refcount block");
  if (r == 0)
    img->unsynced |= Q2_UNSYNCED_REFS;
  return r;
}

int
q2_refcount_of (void *img, uint64_t cluster, uint64_t *refcount)
{
  return q2_refcount_get (img, cluster, refcount);
}
