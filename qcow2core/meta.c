/* Metadata bookkeeping for writers: header field updates, the corrupt
 * bit, overlap checks before writes, and the ordered flush. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

int
q2_sync (struct q2_image *img)
{
  int e = __atomic_load_n (&img->sync_error, __ATOMIC_ACQUIRE), r;

  /* After a failed fdatasync the kernel may have dropped the dirty
   * pages and marked them clean: a later fdatasync would succeed
   * without them.  So, as QEMU does, every later sync fails too. */
  if (e)
    return q2_err (EIO, "an earlier fdatasync of the image failed: writes "
                   "since the last good flush may be lost; flushes keep "
                   "failing until the image is reopened (and checked)");
  r = q2_io_sync (img->fd, "image");
  if (r == 0 && img->data_fd != img->fd)
    r = q2_io_sync (img->data_fd, "external data file");
  if (r < 0)
    __atomic_store_n (&img->sync_error, -r, __ATOMIC_RELEASE);
  return r;
}

int
q2_sync_ordered (struct q2_image *img)
{
  int r = q2_sync (img);

  if (r == 0)
    img->unsynced = 0;
  return r;
}

/* Header fields are patched in place, which keeps unknown fields and
 * extensions exactly as they were. */
int
q2_write_header_field (struct q2_image *img, uint64_t offset,
                       const void *data, size_t len)
{
  int r = q2_io_pwrite (img->fd, data, len, offset, "qcow2 header");

  return r < 0 ? r : q2_sync (img);
}

int
q2_mark_corrupt (struct q2_image *img, const char *fmt, ...)
{
  char msg[768];
  va_list ap;

  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  /* In-place writes find corruption under the shared io_lock, so several
   * threads may get here at once: the first one marks the header.  Best
   * effort: the request fails with EIO either way. */
  if (!__atomic_exchange_n (&img->corrupt, true, __ATOMIC_ACQ_REL) &&
      !img->readonly && img->hdr.version >= 3)
    q2_write_incompatible (img, img->hdr.incompatible_features |
                           QCOW2_INCOMPAT_CORRUPT);
  return q2_err (EIO, "%s; the image is now marked corrupt and further "
                 "writes are refused", msg);
}

/* Memory follows the disk only once the write succeeded, so that a
 * retry after a failed write writes the bits again. */
int
q2_write_incompatible (struct q2_image *img, uint64_t features)
{
  uint8_t b[8];
  int r;

  if (features == img->hdr.incompatible_features)
    return 0;
  q2_put_be64 (b, features);
  r = q2_write_header_field (img, 72, b, 8);
  if (r == 0)
    img->hdr.incompatible_features = features;
  return r;
}

int
q2_set_dirty (struct q2_image *img, bool dirty)
{
  uint64_t f = img->hdr.incompatible_features;

  if (img->hdr.version < 3)
    return 0;                   /* v2 has no dirty bit */
  f = dirty ? f | QCOW2_INCOMPAT_DIRTY : f & ~QCOW2_INCOMPAT_DIRTY;
  return q2_write_incompatible (img, f);
}

static bool
overlaps (uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
  return alen && blen && a < b + blen && b < a + alen;
}

/* The overlap index: a hash set of the clusters holding active L2
 * tables and refcount blocks, keyed by offset with bit 0 set for
 * refcount blocks (offset 0, the header, is never a table, so 0 marks
 * an empty slot and 1 a deleted one). */
#define INDEX_REFBLOCK 1ULL
#define INDEX_EMPTY 0
#define INDEX_DELETED 1

static size_t
index_slot (uint64_t key, size_t mask)
{
  return (size_t) ((key * 0x9e3779b97f4a7c15ULL) >> 17) & mask;
}

static void
index_put (uint64_t *t, size_t mask, uint64_t key)
{
  size_t i = index_slot (key, mask);

  while (t[i] != INDEX_EMPTY && t[i] != INDEX_DELETED && t[i] != key)
    i = (i + 1) & mask;
  t[i] = key;
}

static bool
index_has (const struct q2_image *img, uint64_t key)
{
  size_t mask = img->meta_count - 1, i = index_slot (key, mask), n;

  for (n = 0; n <= mask && img->meta_index[i] != INDEX_EMPTY; n++) {
    if (img->meta_index[i] == key)
      return true;
    i = (i + 1) & mask;
  }
  return false;
}

int
q2_meta_index_refresh (struct q2_image *img)
{
  uint64_t *t, i, n = 16;
  size_t size = 64;

  if (!img->meta_stale && img->meta_index)
    return 0;
  /* At most half full, with room to grow by incremental updates.  Sized
   * by the tables that exist, not by the L1 size: 128 GiB with 512-byte
   * clusters has a 4M-entry L1 and perhaps a handful of L2 tables. */
  for (i = 0; i < img->l1_size; i++)
    n += (img->l1[i] & L1E_OFFSET_MASK) != 0;
  for (i = 0; i < img->reftable_used; i++)
    n += (img->reftable[i] & REFT_OFFSET_MASK) != 0;
  while (size < 4 * n)
    size *= 2;
  t = calloc (size, sizeof *t);
  if (t == NULL)
    return q2_err (ENOMEM, "out of memory for the metadata index");
  for (i = 0; i < img->l1_size; i++)
    if (img->l1[i] & L1E_OFFSET_MASK)
      index_put (t, size - 1, img->l1[i] & L1E_OFFSET_MASK);
  for (i = 0; i < img->reftable_used; i++)
    if (img->reftable[i] & REFT_OFFSET_MASK)
      index_put (t, size - 1,
                 (img->reftable[i] & REFT_OFFSET_MASK) | INDEX_REFBLOCK);
  free (img->meta_index);
  img->meta_index = t;
  img->meta_count = size;       /* the table size */
  img->meta_used = 0;
  img->meta_stale = false;
  return 0;
}

void
q2_meta_index_update (struct q2_image *img, uint64_t old_off,
                      uint64_t new_off, bool refblock)
{
  uint64_t flag = refblock ? INDEX_REFBLOCK : 0;

  if (img->meta_stale || img->meta_index == NULL)
    return;                     /* rebuilt before the next use */
  /* Updates leave deleted slots behind: rebuild when they pile up. */
  if (++img->meta_used >= img->meta_count / 4) {
    img->meta_stale = true;
    return;
  }
  if (old_off) {
    size_t mask = img->meta_count - 1, i = index_slot (old_off | flag, mask);
    while (img->meta_index[i] != INDEX_EMPTY) {
      if (img->meta_index[i] == (old_off | flag)) {
        img->meta_index[i] = INDEX_DELETED;
        break;
      }
      i = (i + 1) & mask;
    }
  }
  if (new_off)
    index_put (img->meta_index, img->meta_count - 1, new_off | flag);
}

/* Does an indexed table of the given kinds lie in [off, off+len)? */
static const char *
index_hit (const struct q2_image *img, uint64_t off, uint64_t len,
           unsigned kinds)
{
  uint64_t c;

  for (c = Q2_ROUND_DOWN (off, img->cluster_size); c < off + len;
       c += img->cluster_size) {
    if ((kinds & Q2_OVERLAP_REFBLOCKS) && index_has (img, c | INDEX_REFBLOCK))
      return "a refcount block";
    if ((kinds & Q2_OVERLAP_L2) && index_has (img, c))
      return "an L2 table";
  }
  return NULL;
}

static const char *
snapshot_hit (const struct q2_image *img, uint64_t off, uint64_t len)
{
  size_t lo = 0, hi = img->nb_snap_l1;
  uint32_t i;

  if (img->nb_snapshots &&
      overlaps (off, len, img->hdr.snapshots_offset,
                Q2_ROUND_UP (img->snapshot_table_len, img->cluster_size)))
    return "the snapshot table";
  if (!img->snap_l1_ok) {
    /* No memory for the sorted ranges: scan the list. */
    for (i = 0; i < img->nb_snapshots; i++) {
      struct q2_range x = q2_snapshot_l1_range (img, &img->snapshots[i]);
      if (!img->snapshots[i].broken &&
          overlaps (off, len, x.offset, x.length))
        return "a snapshot's L1 table";
    }
    return NULL;
  }
  /* The first range that ends after off. */
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (img->snap_l1[mid].offset + img->snap_l1[mid].length <= off)
      lo = mid + 1;
    else
      hi = mid;
  }
  if (lo < img->nb_snap_l1 &&
      overlaps (off, len, img->snap_l1[lo].offset, img->snap_l1[lo].length))
    return "a snapshot's L1 table";
  return NULL;
}

int
q2_find_overlap (struct q2_image *img, uint64_t off, uint64_t len,
                 unsigned kinds, const char **hit)
{
  int r;

  *hit = NULL;
  if ((kinds & Q2_OVERLAP_FIXED) &&
      q2_overlaps_fixed_metadata (img, off, len))
    *hit = "the header, L1 table or refcount table";
  /* The index only goes stale under the exclusive lock, and the
   * shared-lock write path never calls this while it is stale. */
  if (!*hit && (kinds & (Q2_OVERLAP_L2 | Q2_OVERLAP_REFBLOCKS))) {
    if ((r = q2_meta_index_refresh (img)) < 0)
      return r;
    *hit = index_hit (img, off, len, kinds);
  }
  if (!*hit && (kinds & Q2_OVERLAP_SNAPSHOTS))
    *hit = snapshot_hit (img, off, len);
  return 0;
}

int
q2_check_overlap (struct q2_image *img, uint64_t off, uint64_t len,
                  const char *what, unsigned kinds)
{
  const char *hit;
  int r = q2_find_overlap (img, off, len, kinds, &hit);

  if (r < 0)
    return r;
  if (hit)
    return q2_mark_corrupt (img, "preventing invalid write of %s at host "
                            "offset %#llx (%llu bytes): it overlaps %s",
                            what, (unsigned long long) off,
                            (unsigned long long) len, hit);
  return 0;
}

struct range_list {
  struct q2_range *r;
  size_t n, cap;
};

static int
collect_range (void *opaque, uint64_t off, uint64_t len, const char *what)
{
  struct range_list *l = opaque;

  return q2_push_range (&l->r, &l->n, &l->cap, off, len);
}

/* Are the bitmaps' clusters safe to free: aligned, inside the file,
 * counted, no metadata and each named once?  A bogus directory could
 * point anywhere, and freeing would release live clusters. */
static bool
bitmap_ranges_valid (struct q2_image *img, struct range_list *l)
{
  uint64_t cs = img->cluster_size, c, rc;
  const char *hit;
  size_t i;

  qsort (l->r, l->n, sizeof *l->r, q2_compare_ranges);
  for (i = 0; i < l->n; i++) {
    const struct q2_range *x = &l->r[i];
    if (x->length == 0 || !Q2_IS_ALIGNED (x->offset, cs) ||
        x->offset >= img->file_size ||
        x->length > img->file_size - x->offset ||
        (i > 0 && l->r[i - 1].offset + l->r[i - 1].length > x->offset) ||
        q2_find_overlap (img, x->offset, x->length, Q2_OVERLAP_ALL, &hit) < 0 ||
        hit)
      return false;
    for (c = x->offset / cs; c <= (x->offset + x->length - 1) / cs; c++)
      if (q2_refcount_get (img, c, &rc) < 0 || rc == 0)
        return false;
  }
  return true;
}

/* The persistent bitmaps' clusters, to be freed; none (leaked) when
 * the directory does not describe them sanely. */
static int
collect_bitmap_clusters (struct q2_image *img, struct range_list *l)
{
  int r = q2_bitmap_clusters (img, collect_range, l);

  if (r == -ENOMEM)
    return r;
  if (r < 0 || !bitmap_ranges_valid (img, l))
    l->n = 0;
  return 0;
}

/* Rewrites the header extension area without the bitmaps extension. */
static int
drop_bitmaps_extension (struct q2_image *img)
{
  uint64_t start = img->hdr.header_length;
  uint64_t end = img->hdr.backing_file_offset ? img->hdr.backing_file_offset :
    img->cluster_size;
  uint8_t *old, *buf;
  uint64_t pos = start, out = 0;
  int r;

  old = malloc (end - start + 8);
  buf = calloc (1, end - start + 8);
  if (old == NULL || buf == NULL) {
    free (old);
    free (buf);
    return q2_err (ENOMEM, "out of memory");
  }
  r = q2_io_pread (img->fd, old, end - start, start, false, "header");
  while (r == 0 && end - pos >= 8) {
    uint32_t type = q2_be32 (old + pos - start);
    uint64_t len = 8 + Q2_ROUND_UP ((uint64_t) q2_be32 (old + pos - start + 4),
                                    8);
    if (type == QCOW2_EXT_END || len > end - pos)
      break;
    if (type != QCOW2_EXT_BITMAPS) {
      memcpy (buf + out, old + pos - start, len);
      out += len;
    }
    pos += len;
  }
  /* The end marker is the zero bytes after the kept entries. */
  if (r == 0)
    r = q2_write_header_field (img, start, buf, end - start);
  free (old);
  free (buf);
  return r;
}

/* Clears the autoclear bits we do not keep up to date.  Persistent
 * bitmaps stay valid across changes that leave the guest's data alone
 * (snapshot create and delete), so those keep them. */
static int
prepare (struct q2_image *img, bool data_changes)
{
  uint64_t keep = QCOW2_AUTOCLEAR_DATA_FILE_RAW;
  struct range_list l = { NULL, 0, 0 };
  bool bitmaps;
  uint8_t b[8];
  size_t i;
  int r;

  if (img->readonly)
    return q2_err (EROFS, "the image is open read-only");
  if (img->corrupt)
    return q2_err (EIO, "the image is marked corrupt; writes are refused "
                   "until it is repaired");
  if (img->header_touched)
    return 0;
  /* Once per image, not on every write: the table only changes under
   * the snapshot operations, which come back here. */
  if ((r = q2_check_snapshots_usable (img)) < 0)
    return r;
  bitmaps = img->hdr.has_bitmaps_ext &&
    (img->hdr.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS);
  if (!data_changes && bitmaps)
    keep |= QCOW2_AUTOCLEAR_BITMAPS;
  if (img->hdr.version >= 3 && (img->hdr.autoclear_features & ~keep)) {
    /* The bitmaps' clusters are released too, or they would show up as
     * leaks once QEMU stops trusting the bitmaps. */
    if (data_changes && bitmaps &&
        (r = collect_bitmap_clusters (img, &l)) < 0)
      goto out;
    /* Memory follows the disk only once the write succeeded: a retry
     * after a failure must clear the bits again. */
    q2_put_be64 (b, img->hdr.autoclear_features & keep);
    if ((r = q2_write_header_field (img, 88, b, 8)) < 0)
      goto out;
    img->hdr.autoclear_features &= keep;
    if (data_changes && bitmaps) {
      if ((r = drop_bitmaps_extension (img)) < 0)
        goto out;
      img->hdr.has_bitmaps_ext = false;
    }
    /* Only now that nothing points at them; a failure only leaks. */
    for (i = 0; i < l.n; i++)
      if (q2_free_later (img, l.r[i].offset, l.r[i].length) < 0)
        break;
    free (l.r);
  }
  /* Kept bitmaps must still be dropped by a later data write. */
  if (data_changes || !bitmaps)
    img->header_touched = true;
  return 0;

 out:
  free (l.r);
  return r;
}

int
q2_prepare_write (struct q2_image *img)
{
  return prepare (img, true);
}

int
q2_prepare_meta_write (struct q2_image *img)
{
  return prepare (img, false);
}

void
q2_l1_mark_dirty (struct q2_image *img, uint64_t lo, uint64_t hi)
{
  if (img->l1_dirty_lo >= img->l1_dirty_hi) {
    img->l1_dirty_lo = lo;
    img->l1_dirty_hi = hi;
  }
  else {
    img->l1_dirty_lo = Q2_MIN (img->l1_dirty_lo, lo);
    img->l1_dirty_hi = Q2_MAX (img->l1_dirty_hi, hi);
  }
}

/* Writes the 512-byte sectors of the L1 table that hold changed
 * entries: a new L2 table in a huge image must not rewrite megabytes. */
static int
write_l1 (struct q2_image *img)
{
  uint64_t lo = Q2_ROUND_DOWN (img->l1_dirty_lo, 64);
  uint64_t hi = Q2_MIN (Q2_ROUND_UP (img->l1_dirty_hi, 64), img->l1_size);
  uint64_t bytes = (hi - lo) * 8, i;
  uint8_t *buf;
  int r;

  if (lo >= hi)
    return 0;
  if ((buf = malloc (bytes)) == NULL)
    return q2_err (ENOMEM, "out of memory writing the L1 table");
  for (i = lo; i < hi; i++)
    q2_put_be64 (buf + (i - lo) * 8, img->l1[i]);
  r = q2_io_pwrite (img->fd, buf, bytes, img->hdr.l1_table_offset + lo * 8,
                    "L1 table");
  free (buf);
  return r;
}

/* A new cluster at the end of the file that was only partly written
 * (nothing to copy into the rest) leaves the file ending inside it.
 * QEMU reads the missing bytes as zeros, but its own images always end
 * on a cluster boundary: give ours the same shape at each flush. */
static int
extend_to_last_cluster (struct q2_image *img)
{
  struct stat st;
  int e;

  if (img->data_fd != img->fd)
    return 0;                   /* data clusters are not in this file */
  if (fstat (img->fd, &st) == -1) {
    e = errno;
    return q2_err (e, "fstat: %s", strerror (e));
  }
  if (!S_ISREG (st.st_mode))
    return 0;                   /* a block device has its size */
  if ((uint64_t) st.st_size < img->file_size &&
      ftruncate (img->fd, img->file_size) == -1) {
    e = errno;
    return q2_err (e, "extending the image file to %llu bytes: %s",
                   (unsigned long long) img->file_size, strerror (e));
  }
  return 0;
}

/* The safe order: refcount increases, then L2 tables, then the L1 table
 * that points at new L2 tables, each synced before the next; only then
 * are the refcounts of dropped references decreased. */
int
q2_flush_locked (struct q2_image *img)
{
  int r;

  if (img->readonly)
    return 0;
  if ((r = q2_flush_refcounts (img)) < 0)
    return r;
  if (q2_cache_has_dirty (img->l2_cache) &&
      (r = q2_cache_flush (img->l2_cache)) < 0)
    return r;
  if (img->l1_dirty_lo < img->l1_dirty_hi) {
    /* New L2 tables, whether still cached a moment ago or written back
     * (or created) earlier, and their refcounts come first. */
    if (img->unsynced && (r = q2_sync_ordered (img)) < 0)
      return r;
    if ((r = write_l1 (img)) < 0)
      return r;
    img->l1_dirty_lo = img->l1_dirty_hi = 0;
  }
  if (img->nb_pending_free) {
    if ((r = q2_sync_ordered (img)) < 0)
      return r;
    if ((r = q2_apply_pending_frees (img)) < 0)
      return r;
    if ((r = q2_flush_refcounts (img)) < 0)
      return r;
  }
  if ((r = extend_to_last_cluster (img)) < 0)
    return r;
  /* Data written in place, and whatever the steps above wrote. */
  return q2_sync_ordered (img);
}
