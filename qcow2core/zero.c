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
  if (s->l2 && q2_decode_l2 (img, s->entry, s->bitmap, 0, gc, &d) < 0)
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

/* Does [gc+a, gc+b) already read as zeros by its L2 entry alone (zero
 * flags, or unallocated with nothing below)?  Then zeroing it needs no
 * write.  An unreadable entry says no: the write path reports it. */
static bool
already_zero (struct q2_image *img, uint64_t gc, uint64_t a, uint64_t b)
{
  uint64_t entry, bitmap, l2, scs = img->cluster_size / 32;
  bool below = backing_shows (img, gc + a);
  unsigned sc, first = 0, last = 0;

  if (q2_get_l2_entry (img, gc, false, &entry, &bitmap, &l2) < 0)
    return false;
  if (l2 == 0)
    return !below;
  if (img->extended_l2) {
    first = a / scs;
    last = (b - 1) / scs;
  }
  for (sc = first; sc <= last; sc++) {
    struct q2_l2_decoded d;
    if (q2_decode_l2 (img, entry, bitmap, sc, gc, &d) < 0)
      return false;
    if (d.type != Q2_ZERO && !(d.type == Q2_UNALLOC && !below))
      return false;
  }
  return true;
}

/* Writes zeros over [gc+a, gc+b) unless it already reads as zeros. */
static int
zero_edge (struct q2_image *img, uint64_t gc, uint64_t a, uint64_t b)
{
  if (a >= b || already_zero (img, gc, a, b))
    return 0;
  return write_zeros (img, gc + a, b - a);
}

/* Does the request cover [gc+a, gc+b) of its cluster as a whole?  The
 * last cluster may extend past the disk: it counts as whole. */
static bool
covers_cluster (const struct q2_image *img, uint64_t gc, uint64_t a,
                uint64_t b)
{
  return a == 0 && (b == img->cluster_size || gc + b >= img->virtual_size);
}

/* Extended L2: the whole subclusters [*sa_off, *sb_end) inside [a, b). */
static void
whole_subclusters (const struct q2_image *img, uint64_t gc, uint64_t a,
                   uint64_t b, uint64_t *sa_off, uint64_t *sb_end)
{
  uint64_t scs = img->cluster_size / 32;

  *sa_off = Q2_ROUND_UP (a, scs);
  *sb_end = gc + b >= img->virtual_size ? b : Q2_ROUND_DOWN (b, scs);
}

/* How an external data file is zeroed under a guest range: a raw one
 * must read zeros too.  A hole is fine unless the client said NO_HOLE;
 * FAST_ZERO must fail before any data changes, and the data file is
 * zeroed before the L2 entry, so failing here changes nothing. */
static unsigned
data_zero_flags (bool may_trim, bool fast)
{
  return (may_trim ? Q2_HOST_PUNCH_OK : 0) | (fast ? Q2_HOST_FAST : 0);
}

/* Makes one whole guest cluster read as zeros through metadata alone.
 * Returns 1 if that is impossible (v2 with a backing file showing). */
static int
zero_cluster (struct q2_image *img, uint64_t gc, bool may_trim, bool discard,
              bool fast)
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
    /* Data file clusters are not refcounted; zeroing keeps a raw data
     * file reading zeros too. */
    if ((r = q2_zero_host (img, img->data_fd, gc, img->cluster_size,
                           data_zero_flags (may_trim, fast))) < 0)
      return r;
    img->unsynced |= Q2_UNSYNCED_DATA;  /* before the zero flag lands */
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
zero_subclusters (struct q2_image *img, uint64_t gc, unsigned sa, unsigned sb,
                  bool may_trim, bool fast)
{
  struct entry_state s;
  uint64_t bitmap, scs = img->cluster_size / 32;
  unsigned i;
  int r;

  if ((r = read_state (img, gc, true, &s)) < 0)
    return r;
  if (s.compressed || (s.allocated && !s.owned))
    return 1;
  if (img->data_fd != img->fd) {
    /* As for whole clusters: a raw data file must read zeros too. */
    uint64_t off = gc + (uint64_t) sa * scs;
    uint64_t len = Q2_MIN ((uint64_t) (sb - sa + 1) * scs,
                           img->virtual_size - off);
    if ((r = q2_zero_host (img, img->data_fd, off, len,
                           data_zero_flags (may_trim, fast))) < 0)
      return r;
    img->unsynced |= Q2_UNSYNCED_DATA;
  }
  bitmap = s.bitmap;
  for (i = sa; i <= sb; i++)
    bitmap = (bitmap & ~(1ULL << i)) | (1ULL << (32 + i));
  return q2_set_l2_entry (img, s.l2, gc, s.entry, bitmap);
}

/* Would zeroing [offset, offset+len) need a data write?  (FAST_ZERO)
 * Mirrors zero_locked's choices without changing anything. */
static bool
needs_data_write (struct q2_image *img, uint64_t offset, uint64_t len)
{
  uint64_t cs = img->cluster_size, end = offset + len, gc;

  for (gc = Q2_ROUND_DOWN (offset, cs); gc < end; gc += cs) {
    uint64_t a = offset > gc ? offset - gc : 0, b = Q2_MIN (cs, end - gc);
    uint64_t sa_off, sb_end;
    struct entry_state s;

    if (covers_cluster (img, gc, a, b)) {
      if (img->hdr.version < 3 && backing_shows (img, gc))
        return true;
      continue;
    }
    if (already_zero (img, gc, a, b))
      continue;
    if (!img->extended_l2)
      return true;
    whole_subclusters (img, gc, a, b, &sa_off, &sb_end);
    if (sa_off >= sb_end ||
        (a < sa_off && !already_zero (img, gc, a, sa_off)) ||
        (sb_end < b && !already_zero (img, gc, sb_end, b)))
      return true;
    if (read_state (img, gc, false, &s) < 0 ||
        s.compressed || (s.allocated && !s.owned))
      return true;
  }
  return false;
}

/* Extended L2, part of one cluster: whole subclusters by their zero
 * bits, the partial ones at the edges by writing zeros. */
static int
zero_partial_extended (struct q2_image *img, uint64_t gc, uint64_t a,
                       uint64_t b, bool may_trim, bool fast)
{
  uint64_t scs = img->cluster_size / 32, sa_off, sb_end;
  int r;

  whole_subclusters (img, gc, a, b, &sa_off, &sb_end);
  if (sa_off >= sb_end)
    return zero_edge (img, gc, a, b);
  r = zero_subclusters (img, gc, sa_off / scs, (sb_end - 1) / scs,
                        may_trim, fast);
  if (r == 1)                   /* compressed or shared: one data write */
    return write_zeros (img, gc + a, b - a);
  if (r == 0)
    r = zero_edge (img, gc, a, sa_off);
  if (r == 0)
    r = zero_edge (img, gc, sb_end, b);
  return r;
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

    if (covers_cluster (img, gc, a, b)) {
      r = zero_cluster (img, gc, may_trim, false, fast);
      if (r == 1)
        r = write_zeros (img, gc, b);
    }
    else if (img->extended_l2)
      r = zero_partial_extended (img, gc, a, b, may_trim, fast);
    else
      r = zero_edge (img, gc, a, b);
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
    if ((r = zero_cluster (img, gc, true, true, false)) < 0)
      return r;
  return 0;
}

/* Zero (discard false) or trim one slice: takes the exclusive lock and
 * waits until no cluster is being written outside it. */
static int
zero_or_trim_slice (struct q2_image *img, uint64_t count, uint64_t offset,
                    bool discard, bool may_trim, bool fast, bool fua)
{
  int r;

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

/* A huge request goes in slices ending on cluster boundaries, so that
 * other connections are served in between: zeroing may have to write
 * (a v2 image over a backing file), which held every reader off for
 * seconds.  FAST_ZERO goes in one piece, as it must fail before
 * changing anything, and it never writes data. */
#define ZERO_SLICE (256ULL << 20)

static int
zero_or_trim (struct q2_image *img, uint64_t count, uint64_t offset,
              bool discard, bool may_trim, bool fast, bool fua)
{
  if (offset > img->virtual_size || count > img->virtual_size - offset)
    return q2_err (ENOSPC, "%s beyond the end of the disk",
                   discard ? "trim" : "zero");
  for (;;) {
    uint64_t n = fast ? count :
      Q2_MIN (count, Q2_ROUND_DOWN (offset + ZERO_SLICE, img->cluster_size)
              - offset);
    int r = zero_or_trim_slice (img, n, offset, discard, may_trim, fast,
                                fua && n == count);
    if (r < 0 || n == count)
      return r;
    offset += n;
    count -= n;
  }
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
