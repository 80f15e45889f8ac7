/* Guest-to-host mapping: L1 lookup, L2 slices through the cache, and
 * the decoding of standard, compressed and extended (subcluster) L2
 * entries.  Runs of guest bytes with the same kind of mapping are
 * returned together so that callers do one I/O per run. */
#include <errno.h>
#include <string.h>

#include "internal.h"

/* Reserved bits of a standard L2 entry (1-8 and 56-61). */
#define L2E_STD_RESERVED 0x3f000000000001feULL
#define L2_BITMAP_ALLOC 0x00000000ffffffffULL

int
q2_decode_l2 (const struct q2_image *img, uint64_t entry, uint64_t bitmap,
              unsigned sc, uint64_t gc, struct q2_l2_decoded *d)
{
  uint64_t host;
  bool allocated;

  memset (d, 0, sizeof *d);
  if (entry & QCOW_OFLAG_COMPRESSED) {
    uint64_t nb_sectors;
    if (entry & QCOW_OFLAG_COPIED)
      return q2_err (EIO, "compressed L2 entry %#llx has the COPIED flag set",
                     (unsigned long long) entry);
    if (img->data_fd != img->fd)
      return q2_err (EIO, "compressed L2 entry %#llx in an image with an "
                     "external data file", (unsigned long long) entry);
    if (img->extended_l2 && bitmap != 0)
      return q2_err (EIO, "compressed L2 entry %#llx has a non-zero "
                     "subcluster bitmap %#llx", (unsigned long long) entry,
                     (unsigned long long) bitmap);
    d->type = Q2_COMPRESSED;
    d->host_offset = entry & img->coffset_mask;
    nb_sectors = ((entry >> img->csize_shift) & img->csize_mask) + 1;
    d->csize = nb_sectors * 512 - (d->host_offset & 511);
    if (d->host_offset > QCOW2_MAX_HOST_OFFSET)
      return q2_err (EIO, "compressed L2 entry %#llx: offset is too large",
                     (unsigned long long) entry);
    return 0;
  }

  /* With extended L2 bit 0 has no meaning; QEMU ignores it (iotest
   * 271 reads and writes such entries), so it is not refused here. */
  if (entry & L2E_STD_RESERVED)
    return q2_err (EIO, "L2 entry %#llx has reserved bits set",
                   (unsigned long long) entry);
  host = entry & L2E_OFFSET_MASK;
  if (!Q2_IS_ALIGNED (host, img->cluster_size))
    return q2_err (EIO, "L2 entry %#llx: host offset is not aligned to "
                   "the cluster size", (unsigned long long) entry);
  /* With an external data file offset 0 is valid; COPIED disambiguates,
   * except under the zero flag, which makes offset 0 a plain zero
   * cluster whatever COPIED says (as QEMU reads it). */
  allocated = host != 0 ||
    (img->data_fd != img->fd && (entry & QCOW_OFLAG_COPIED) &&
     (img->extended_l2 || !(entry & QCOW_OFLAG_ZERO)));
  /* A data file holds each guest cluster at its own offset; another
   * offset would read or zero some other cluster's data (QEMU: EIO). */
  if (allocated && img->data_fd != img->fd && host != gc)
    return q2_err (EIO, "L2 entry %#llx maps guest cluster %#llx to "
                   "external data file offset %#llx; it must be the same "
                   "offset", (unsigned long long) entry,
                   (unsigned long long) gc, (unsigned long long) host);
  d->host_offset = host;
  d->copied = allocated && (entry & QCOW_OFLAG_COPIED);

  if (!img->extended_l2) {
    if (entry & QCOW_OFLAG_ZERO)
      d->type = Q2_ZERO;
    else
      d->type = allocated ? Q2_NORMAL : Q2_UNALLOC;
    return 0;
  }

  if (allocated) {
    if ((bitmap >> 32) & bitmap)
      return q2_err (EIO, "L2 subcluster bitmap %#llx marks subclusters both "
                     "allocated and zero", (unsigned long long) bitmap);
    if (bitmap & (1ULL << (32 + sc)))
      d->type = Q2_ZERO;
    else if (bitmap & (1ULL << sc))
      d->type = Q2_NORMAL;
    else
      d->type = Q2_UNALLOC;
  }
  else {
    if (bitmap & L2_BITMAP_ALLOC)
      return q2_err (EIO, "L2 subcluster bitmap %#llx marks subclusters "
                     "allocated in an unallocated cluster",
                     (unsigned long long) bitmap);
    d->type = (bitmap & (1ULL << (32 + sc))) ? Q2_ZERO : Q2_UNALLOC;
  }
  return 0;
}

bool
q2_unaligned_without_data (const struct q2_image *img, uint64_t entry,
                            uint64_t bitmap)
{
  uint64_t host = entry & L2E_OFFSET_MASK;

  if ((entry & QCOW_OFLAG_COMPRESSED) || host == 0 ||
      Q2_IS_ALIGNED (host, img->cluster_size))
    return false;
  return img->extended_l2 ? (bitmap & L2_BITMAP_ALLOC) == 0 :
    (entry & QCOW_OFLAG_ZERO) != 0;
}

/* Does [off, off+len) overlap the header cluster, the L1 table or the
 * refcount table?  Data there would mean the L2 entry is corrupt. */
bool
q2_overlaps_fixed_metadata (const struct q2_image *img, uint64_t off,
                         uint64_t len)
{
  const struct q2_header *h = &img->hdr;
  uint64_t l1_len = (uint64_t) h->l1_size * 8;
  uint64_t rt_len = (uint64_t) h->refcount_table_clusters * img->cluster_size;

  if (off < img->cluster_size)
    return true;
  if (l1_len && off < h->l1_table_offset + l1_len &&
      h->l1_table_offset < off + len)
    return true;
  if (off < h->refcount_table_offset + rt_len &&
      h->refcount_table_offset < off + len)
    return true;
  return false;
}

int
q2_l1_entry_l2 (const struct q2_image *img, uint64_t l1_index,
                 uint64_t *l2_offset)
{
  return q2_check_l1_entry (img, l1_index, img->l1[l1_index], l2_offset);
}

int
q2_check_l1_entry (const struct q2_image *img, uint64_t l1_index,
                   uint64_t l1e, uint64_t *l2_offset)
{
  uint64_t l2_off = l1e & L1E_OFFSET_MASK;

  *l2_offset = l2_off;
  if (l2_off == 0)
    return 0;
  if (l1e & L1E_RESERVED_MASK)
    return q2_err (EIO, "L1 entry %llu (%#llx) has reserved bits set",
                   (unsigned long long) l1_index, (unsigned long long) l1e);
  if (!Q2_IS_ALIGNED (l2_off, img->cluster_size))
    return q2_err (EIO, "L1 entry %llu: L2 table offset %#llx is not aligned "
                   "to the cluster size", (unsigned long long) l1_index,
                   (unsigned long long) l2_off);
  if (l2_off >= img->file_size ||
      img->cluster_size > img->file_size - l2_off)
    return q2_err (EIO, "L1 entry %llu: L2 table offset %#llx is past the "
                   "end of the file", (unsigned long long) l1_index,
                   (unsigned long long) l2_off);
  if (q2_overlaps_fixed_metadata (img, l2_off, img->cluster_size))
    return q2_err (EIO, "L1 entry %llu: L2 table offset %#llx overlaps the "
                   "header, L1 table or refcount table",
                   (unsigned long long) l1_index,
                   (unsigned long long) l2_off);
  return 0;
}

/* Finds the L2 slice covering guest offset.  *slice is NULL when the L1
 * entry is empty. */
static int
get_l2_slice (struct q2_image *img, uint64_t offset, uint8_t **slice,
              uint64_t *slice_guest_start, uint32_t *entries_in_slice)
{
  uint64_t l1_index = offset >> (img->cluster_bits + img->l2_bits);
  uint64_t l2_off, l2_index, slice_size, byte_in_table;
  uint32_t per_slice;
  int r;

  slice_size = q2_cache_slice_size (img->l2_cache);
  per_slice = slice_size / img->l2_entry_size;
  *entries_in_slice = per_slice;
  *slice = NULL;
  l2_off = 0;
  if (l1_index < img->l1_size &&
      (r = q2_l1_entry_l2 (img, l1_index, &l2_off)) < 0)
    return r;
  if (l2_off == 0) {
    /* The whole L2 range is unallocated. */
    *slice_guest_start = l1_index << (img->cluster_bits + img->l2_bits);
    *entries_in_slice = 1U << img->l2_bits;
    return 0;
  }

  l2_index = (offset >> img->cluster_bits) & ((1ULL << img->l2_bits) - 1);
  byte_in_table = Q2_ROUND_DOWN (l2_index * img->l2_entry_size, slice_size);
  r = q2_cache_get (img->l2_cache, img->fd, l2_off + byte_in_table,
                    "L2 table", slice);
  if (r < 0)
    return q2_err_prefix (r, "L1 entry %llu", (unsigned long long) l1_index);
  *slice_guest_start =
    (Q2_ROUND_DOWN (offset >> img->cluster_bits, per_slice)) <<
    img->cluster_bits;
  return 0;
}

/* Checks a data cluster's host range before anyone reads or writes it. */
static int
check_data_cluster (const struct q2_image *img, uint64_t guest_cluster,
                    uint64_t host)
{
  if (img->data_fd != img->fd)
    return 0;                   /* external data file: no metadata there */
  if (host >= img->file_size)
    return q2_err (EIO, "L2 entry for guest offset %#llx points at host "
                   "offset %#llx, past the end of the file",
                   (unsigned long long) guest_cluster,
                   (unsigned long long) host);
  if (q2_overlaps_fixed_metadata (img, host, img->cluster_size))
    return q2_err (EIO, "L2 entry for guest offset %#llx points at host "
                   "offset %#llx, which overlaps image metadata",
                   (unsigned long long) guest_cluster,
                   (unsigned long long) host);
  return 0;
}

static int
map_locked (struct q2_image *img, uint64_t offset, uint64_t max_len,
            struct q2_map *m)
{
  uint8_t *slice;
  uint64_t slice_start = 0, pos, end, unit;
  uint32_t per_slice, unit_bits;
  bool first = true;
  int r;

  r = get_l2_slice (img, offset, &slice, &slice_start, &per_slice);
  if (r < 0)
    return r;
  end = offset + max_len;
  if (slice == NULL) {
    uint64_t range_end = slice_start + ((uint64_t) per_slice << img->cluster_bits);
    m->type = Q2_UNALLOC;
    m->host_offset = 0;
    m->length = Q2_MIN (end, range_end) - offset;
    return 0;
  }
  end = Q2_MIN (end, slice_start + ((uint64_t) per_slice << img->cluster_bits));
  unit_bits = img->extended_l2 ? img->subcluster_bits : img->cluster_bits;
  unit = 1ULL << unit_bits;

  for (pos = offset; pos < end; ) {
    uint64_t ci = (pos - slice_start) >> img->cluster_bits;
    const uint8_t *e = slice + ci * img->l2_entry_size;
    uint64_t entry = q2_be64 (e);
    uint64_t bitmap = img->extended_l2 ? q2_be64 (e + 8) : 0;
    unsigned sc = (pos >> unit_bits) & (img->extended_l2 ? 31 : 0);
    uint64_t unit_end = Q2_MIN (end, Q2_ROUND_DOWN (pos, unit) + unit);
    uint64_t in_cluster = pos & (img->cluster_size - 1);
    struct q2_l2_decoded d;

    r = q2_decode_l2 (img, entry, bitmap, sc,
                      Q2_ROUND_DOWN (pos, img->cluster_size), &d);
    if (r < 0) {
      if (!first)
        break;                  /* report the good run first */
      return q2_err_prefix (r, "L2 index %llu for guest offset %#llx",
                            (unsigned long long) ((pos >> img->cluster_bits) &
                                                  ((1ULL << img->l2_bits) - 1)),
                            (unsigned long long) pos);
    }
    if (d.type == Q2_NORMAL) {
      r = check_data_cluster (img, pos - in_cluster, d.host_offset);
      if (r < 0) {
        if (!first)
          break;
        return r;
      }
    }
    if (first) {
      m->type = d.type;
      m->copied = d.copied;
      /* With an external data file, guest cluster 0 lives at host
       * offset 0: a normal cluster is allocated whatever its offset. */
      m->host_offset = d.type == Q2_COMPRESSED ? d.host_offset :
        d.type == Q2_NORMAL || d.host_offset ? d.host_offset + in_cluster : 0;
      m->csize = d.csize;
      m->length = unit_end - pos;
      first = false;
      if (d.type == Q2_COMPRESSED) {
        /* One compressed cluster at a time. */
        m->length = Q2_MIN (end, pos - in_cluster + img->cluster_size) - pos;
        break;
      }
    }
    else {
      if (d.type != m->type || d.type == Q2_COMPRESSED ||
          d.copied != m->copied)
        break;
      if (d.type == Q2_NORMAL &&
          d.host_offset + in_cluster != m->host_offset + m->length)
        break;
      m->length += unit_end - pos;
    }
    pos = unit_end;
  }
  return 0;
}

int
q2_map (struct q2_image *img, uint64_t offset, uint64_t max_len,
        struct q2_map *m)
{
  int r;

  pthread_mutex_lock (&img->lock);
  r = map_locked (img, offset, max_len, m);
  pthread_mutex_unlock (&img->lock);
  return r;
}
