/* Metadata bookkeeping for writers: header field updates, the corrupt
 * bit, overlap checks before writes, and the ordered flush. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

int
q2_sync (struct q2_image *img)
{
  int r = q2_io_sync (img->fd, "image");

  if (r == 0 && img->data_fd != img->fd)
    r = q2_io_sync (img->data_fd, "external data file");
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
  if (!img->corrupt && !img->readonly && img->hdr.version >= 3) {
    uint8_t b[8];
    img->hdr.incompatible_features |= QCOW2_INCOMPAT_CORRUPT;
    q2_put_be64 (b, img->hdr.incompatible_features);
    /* Best effort: the request fails with EIO either way. */
    q2_write_header_field (img, 72, b, 8);
  }
  img->corrupt = true;
  return q2_err (EIO, "%s; the image is now marked corrupt and further "
                 "writes are refused", msg);
}

int
q2_set_dirty (struct q2_image *img, bool dirty)
{
  uint8_t b[8];
  uint64_t f = img->hdr.incompatible_features;

  if (img->hdr.version < 3)
    return 0;                   /* v2 has no dirty bit */
  f = dirty ? f | QCOW2_INCOMPAT_DIRTY : f & ~QCOW2_INCOMPAT_DIRTY;
  if (f == img->hdr.incompatible_features)
    return 0;
  q2_put_be64 (b, f);
  img->hdr.incompatible_features = f;
  return q2_write_header_field (img, 72, b, 8);
}

static bool
overlaps (uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
  return alen && blen && a < b + blen && b < a + alen;
}

static int
cmp_u64 (const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;

  return x < y ? -1 : x > y;
}

int
q2_meta_index_refresh (struct q2_image *img)
{
  uint64_t *v, i;
  size_t n = 0;

  if (!img->meta_stale && img->meta_index)
    return 0;
  v = malloc ((img->l1_size + img->reftable_used + 1) * sizeof *v);
  if (v == NULL)
    return q2_err (ENOMEM, "out of memory for the metadata index");
  for (i = 0; i < img->l1_size; i++)
    if (img->l1[i] & L1E_OFFSET_MASK)
      v[n++] = img->l1[i] & L1E_OFFSET_MASK;
  for (i = 0; i < img->reftable_used; i++)
    if (img->reftable[i] & REFT_OFFSET_MASK)
      v[n++] = img->reftable[i] & REFT_OFFSET_MASK;
  qsort (v, n, sizeof *v, cmp_u64);
  free (img->meta_index);
  img->meta_index = v;
  img->meta_count = n;
  img->meta_stale = false;
  return 0;
}

/* Is any indexed metadata cluster inside [off, off+len)? */
static bool
index_hit (const struct q2_image *img, uint64_t off, uint64_t len)
{
  uint64_t first = Q2_ROUND_DOWN (off, img->cluster_size);
  size_t lo = 0, hi = img->meta_count;

  /* First entry >= first. */
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (img->meta_index[mid] < first)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo < img->meta_count && img->meta_index[lo] < off + len;
}

int
q2_check_overlap (struct q2_image *img, uint64_t off, uint64_t len,
                  const char *what, unsigned kinds)
{
  uint64_t cs = img->cluster_size, i;
  const char *hit = NULL;

  if ((kinds & Q2_OVERLAP_FIXED) &&
      q2_overlaps_fixed_metadata (img, off, len))
    hit = "the header, L1 table or refcount table";
  /* Data writes use the index; metadata writes (which must skip their
   * own kind) scan. */
  if (!hit && (kinds & (Q2_OVERLAP_L2 | Q2_OVERLAP_REFBLOCKS)) ==
      (Q2_OVERLAP_L2 | Q2_OVERLAP_REFBLOCKS) && !img->meta_stale &&
      img->meta_index) {
    if (index_hit (img, off, len))
      hit = "an L2 table or refcount block";
  }
  else {
    if (!hit && (kinds & Q2_OVERLAP_L2))
      for (i = 0; i < img->l1_size; i++)
        if (overlaps (off, len, img->l1[i] & L1E_OFFSET_MASK,
                      (img->l1[i] & L1E_OFFSET_MASK) ? cs : 0)) {
          hit = "an L2 table";
          break;
        }
    if (!hit && (kinds & Q2_OVERLAP_REFBLOCKS))
      for (i = 0; i < img->reftable_used; i++)
        if (overlaps (off, len, img->reftable[i] & REFT_OFFSET_MASK,
                      (img->reftable[i] & REFT_OFFSET_MASK) ? cs : 0)) {
          hit = "a refcount block";
          break;
        }
  }
  if (!hit && (kinds & Q2_OVERLAP_SNAPSHOTS) && img->hdr.nb_snapshots &&
      overlaps (off, len, img->hdr.snapshots_offset, cs))
    hit = "the snapshot table";
  if (hit)
    return q2_mark_corrupt (img, "preventing invalid write of %s at host "
                            "offset %#llx (%llu bytes): it overlaps %s",
                            what, (unsigned long long) off,
                            (unsigned long long) len, hit);
  return 0;
}

static int
free_range (void *opaque, uint64_t off, uint64_t len, const char *what)
{
  return q2_free_later (opaque, off, len);
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

int
q2_prepare_write (struct q2_image *img)
{
  uint64_t keep = QCOW2_AUTOCLEAR_DATA_FILE_RAW;

  if (img->readonly)
    return q2_err (EROFS, "the image is open read-only");
  if (img->corrupt)
    return q2_err (EIO, "the image is marked corrupt; writes are refused "
                   "until it is repaired");
  if (img->header_touched)
    return 0;
  /* We do not keep persistent bitmaps up to date: clearing the
   * autoclear bits tells QEMU so. */
  if (img->hdr.version >= 3 && (img->hdr.autoclear_features & ~keep)) {
    bool bitmaps = img->hdr.has_bitmaps_ext &&
      (img->hdr.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS);
    uint8_t b[8];
    int r;
    /* The bitmaps' clusters are released too, or they would show up as
     * leaks once QEMU stops trusting the bitmaps. */
    if (bitmaps && (r = q2_bitmap_clusters (img, free_range, img)) < 0)
      return r;
    img->hdr.autoclear_features &= keep;
    q2_put_be64 (b, img->hdr.autoclear_features);
    if ((r = q2_write_header_field (img, 88, b, 8)) < 0)
      return r;
    if (bitmaps) {
      if ((r = drop_bitmaps_extension (img)) < 0)
        return r;
      img->hdr.has_bitmaps_ext = false;
    }
  }
  img->header_touched = true;
  return 0;
}

static int
write_l1 (struct q2_image *img)
{
  uint64_t bytes = (uint64_t) img->l1_size * 8, i;
  uint8_t *buf = malloc (bytes ? bytes : 1);
  int r;

  if (buf == NULL)
    return q2_err (ENOMEM, "out of memory writing the L1 table");
  for (i = 0; i < img->l1_size; i++)
    q2_put_be64 (buf + i * 8, img->l1[i]);
  r = q2_io_pwrite (img->fd, buf, bytes, img->hdr.l1_table_offset,
                    "L1 table");
  free (buf);
  return r;
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
  if (q2_cache_has_dirty (img->l2_cache)) {
    if ((r = q2_cache_flush (img->l2_cache)) < 0)
      return r;
    if (img->l1_dirty && (r = q2_sync (img)) < 0)
      return r;
  }
  if (img->l1_dirty) {
    if ((r = write_l1 (img)) < 0)
      return r;
    img->l1_dirty = false;
  }
  if (img->nb_pending_free) {
    if ((r = q2_sync (img)) < 0)
      return r;
    if ((r = q2_apply_pending_frees (img)) < 0)
      return r;
    if ((r = q2_flush_refcounts (img)) < 0)
      return r;
  }
  /* Data written in place, and whatever the steps above wrote. */
  return q2_sync (img);
}
