/* Write-zeroes and discard.  Whole clusters (and, with extended L2,
 * whole subclusters) change only metadata; unaligned edges are written
 * with zeros, or left alone by discard. */
#include <errno.h>
#include <string.h>

#include "internal.h"

#define L2_BITMAP_ALL_ZERO 0xffffffff00000000ULL

/* Does anything show through from the backing file in this range? */
static bool
backing_shows (const struct q2_image *img, uint64_t offset)
{
  return img->backing && offset < img->backing->virtual_size;
}

static int
write_zeros (struct q2_image *img, uint64_t offset, uint64_t len)
{
  const uint8_t *z = q2_zero_buffer (img);

  if (z == NULL)
    return q2_err (ENOMEM, "out of memory");
  while (len > 0) {
    uint64_t n = Q2_MIN (len, img->cluster_size -
                         (offset & (img->cluster_size - 1)));
    int r;
    if ((r = q2_write_locked (img, z, n, offset)) < 0)
      return r;
    offset += n;
    len -= n;
  }
  return 0;
}

/* Classifies the current L2 entry of guest cluster gc. */
struct entry_state {
  uint64_t entry, bitmap, l2;
  bool compressed, allocated, owned;
  uint64_t host;
};

static int
read_state (struct q2_image *img, uint64_t gc, bool for_write,
            struct entry_state *s)
{
  struct q2_l2_decoded d;
  int r = q2_get_l2_entry (img, gc, for_write, &s->entry, &s->bitmap, &s->l2);

  if (r < 0)
    return r;
  if (s->l2 && q2_decode_l2 (img, s->entry, s->bitmap, 0, &d) < 0)
    return q2_mark_corrupt (img, "L2 entry for guest offset %#llx: %s",
                            (unsigned long long) gc, q2_last_error ());
  if (s->l2 == 0)
    memset (&d, 0, sizeof d);
  s->compressed = d.type == Q2_COMPRESSED;
  s->allocated = !s->compressed && (d.host_offset != 0 || d.copied);
  s->owned = s->allocated && d.copied;
  s->host = d.host_offset;
  /* Such a host offset must be neither kept nor freed. */
  if (for_write && s->allocated)
    return q2_check_entry_in_file (img, gc, s->host);
  return 0;
}

/* Makes one whole guest cluster read as zeros through metadata alone.
 * Returns 1 if that is impossible (v2 with a backing file showing). */
static int
zero_cluster (struct q2_image *img, uint64_t gc, bool may_trim, bool discard)
{
  struct entry_state s;
  uint64_t entry = 0, bitmap = 0;
  bool keep_host, v3 = img->hdr.version >= 3;
  bool data_file = img->data_fd != img->fd;
  int r;

  if (!v3 && backing_shows (img, gc))
    return discard ? 0 : 1;

  /* Nothing to do where the guest already sees zeros and no table. */
  if ((r = read_state (img, gc, false, &s)) < 0)
    return r;
  if (s.l2 == 0 && !backing_shows (img, gc))
    return 0;
  if ((r = read_state (img, gc, true, &s)) < 0)
    return r;

  if (data_file) {
    /* Data file clusters are not refcounted; punching keeps a raw data
     * file reading zeros too. */
    if ((r = q2_zero_host (img, img->data_fd, gc, img->cluster_size)) < 0)
      return r;
    keep_host = s.allocated;
  }
  else
    /* v2 has no zero flag: the cluster can only be deallocated. */
    keep_host = v3 && s.owned && !may_trim && !discard;

  /* A discard over something that already reads as zeros with nothing
   * below keeps its entry. */
  if (discard && !backing_shows (img, gc) && !s.allocated && !s.compressed)
    return 0;
  if (img->extended_l2) {
    entry = keep_host ? s.host | QCOW_OFLAG_COPIED : 0;
    bitmap = L2_BITMAP_ALL_ZERO;
  }
  else if (v3)
    entry = (keep_host ? s.host | QCOW_OFLAG_COPIED : 0) | QCOW_OFLAG_ZERO;
  else
    entry = 0;                  /* v2: unallocated reads as zeros here */

  if ((r = q2_set_l2_entry (img, s.l2, gc, entry, bitmap)) < 0)
    return r;
  if (!keep_host && (s.allocated || s.compressed) && !data_file)
    return q2_release_entry (img, s.entry);
  return 0;
}

/* Extended L2: zero whole subclusters [sa, sb] of an owned or
 * unallocated cluster by setting their zero bits.  Returns 1 when the
 * cluster is compressed or shared and needs a data write instead. */
static int
zero_subclusters (struct q2_image *img, uint64_t gc, unsigned sa, unsigned sb)
{
  struct entry_state s;
  uint64_t bitmap;
  unsigned i;
  int r;

  if ((r = read_state (img, gc, true, &s)) < 0)
    return r;
  if (s.compressed || (s.allocated && !s.owned))
    return 1;
  bitmap = s.bitmap;
  for (i = sa; i <= sb; i++)
    bitmap = (bitmap & ~(1ULL << i)) | (1ULL << (32 + i));
  return q2_set_l2_entry (img, s.l2, gc, s.entry, bitmap);
}

/* Would zeroing [offset, offset+len) need a data write?  (FAST_ZERO) */
static bool
needs_data_write (struct q2_image *img, uint64_t offset, uint64_t len)
{
  uint64_t cs = img->cluster_size;
  uint64_t unit = img->extended_l2 ? cs / 32 : cs;
  uint64_t end = offset + len, pos;

  if (!Q2_IS_ALIGNED (offset, unit) ||
      (!Q2_IS_ALIGNED (end, unit) && end != img->virtual_size))
    return true;
  if (img->hdr.version < 3)
    for (pos = Q2_ROUND_DOWN (offset, cs); pos < end; pos += cs)
      if (backing_shows (img, pos))
        return true;
  if (img->extended_l2)
    for (pos = Q2_ROUND_DOWN (offset, cs); pos < end; pos += cs) {
      struct entry_state s;
      if (pos >= offset && pos + cs <= end)
        continue;               /* whole clusters are metadata-only */
      if (read_state (img, pos, false, &s) < 0 ||
          s.compressed || (s.allocated && !s.owned))
        return true;
    }
  return false;
}

static int
zero_locked (struct q2_image *img, uint64_t offset, uint64_t len,
             bool may_trim, bool fast)
{
  uint64_t cs = img->cluster_size, end = offset + len;
  int r;

  if (fast && needs_data_write (img, offset, len))
    return q2_err (ENOTSUP, "zeroing this range would need data writes");
  while (offset < end) {
    uint64_t gc = Q2_ROUND_DOWN (offset, cs);
    uint64_t a = offset - gc;
    uint64_t b = Q2_MIN (cs, end - gc);
    /* The last cluster may extend past the disk: it counts as whole. */
    bool whole = a == 0 && (b == cs || gc + b >= img->virtual_size);

    if (whole) {
      r = zero_cluster (img, gc, may_trim, false);
      if (r == 1)
        r = write_zeros (img, gc, b);
    }
    else if (img->extended_l2) {
      uint64_t scs = cs / 32;
      uint64_t sa_off = Q2_ROUND_UP (a, scs);
      uint64_t sb_end = gc + b >= img->virtual_size ? b : Q2_ROUND_DOWN (b, scs);
      r = 0;
      if (sa_off < sb_end) {
        r = zero_subclusters (img, gc, sa_off / scs, (sb_end - 1) / scs);
        if (r == 1) {
          r = write_zeros (img, offset, b - a);
          sa_off = sb_end = b;  /* all written */
        }
        else if (r == 0) {
          if (a < sa_off)
            r = write_zeros (img, offset, sa_off - a);
          if (r == 0 && sb_end < b)
            r = write_zeros (img, gc + sb_end, b - sb_end);
        }
      }
      else
        r = write_zeros (img, offset, b - a);
    }
    else
      r = write_zeros (img, offset, b - a);
    if (r < 0)
      return r;
    offset = gc + b;
  }
  return 0;
}

static int
trim_locked (struct q2_image *img, uint64_t offset, uint64_t len)
{
  uint64_t cs = img->cluster_size, end = offset + len, gc;
  int r;

  /* Only whole clusters; the last one counts as whole at the disk end. */
  gc = Q2_ROUND_UP (offset, cs);
  if (end < img->virtual_size)
    end = Q2_ROUND_DOWN (end, cs);
  for (; gc < end; gc += cs)
    if ((r = zero_cluster (img, gc, true, true)) < 0)
      return r;
  return 0;
}

/* Zero (discard false) or trim under the exclusive lock, once no
 * cluster is being written outside it. */
static int
zero_or_trim (struct q2_image *img, uint64_t count, uint64_t offset,
              bool discard, bool may_trim, bool fast, bool fua)
{
  int r;

  if (offset > img->virtual_size || count > img->virtual_size - offset)
    return q2_err (ENOSPC, "%s beyond the end of the disk",
                   discard ? "trim" : "zero");
  pthread_rwlock_wrlock (&img->io_lock);
  q2_wait_no_inflight_locked (img);
  r = q2_prepare_write (img);
  if (r == 0)
    r = discard ? trim_locked (img, offset, count) :
      zero_locked (img, offset, count, may_trim, fast);
  if (r == 0)
    r = q2_meta_index_refresh (img);
  if (r == 0 && fua)
    r = q2_flush_locked (img);
  pthread_rwlock_unlock (&img->io_lock);
  q2_scratch_trim ();
  return r;
}

int
q2_zero (struct q2_image *img, uint64_t count, uint64_t offset,
         bool may_trim, bool fast, bool fua)
{
  return zero_or_trim (img, count, offset, false, may_trim, fast, fua);
}

int
q2_trim (struct q2_image *img, uint64_t count, uint64_t offset, bool fua)
{
  return zero_or_trim (img, count, offset, true, true, false, fua);
}
