/* The write path: in-place writes to clusters we own, and allocating
 * writes with copy-on-write of the untouched part of each cluster (or
 * subcluster) from whatever the guest currently sees there. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "crypto.h"
#include "internal.h"

#define L2_BITMAP_ALL_ZERO 0xffffffff00000000ULL

static bool
has_data_file (const struct q2_image *img)
{
  return img->data_fd != img->fd;
}

int
q2_l2_table_for_write (struct q2_image *img, uint64_t guest_offset,
                       uint64_t *l2_offset)
{
  uint64_t l1_index = guest_offset >> (img->cluster_bits + img->l2_bits);
  uint64_t old, t;
  bool fresh;
  int r;

  if (l1_index >= img->l1_size)
    return q2_err (EIO, "guest offset %#llx is beyond the L1 table",
                   (unsigned long long) guest_offset);
  if ((r = q2_l1_entry_l2 (img, l1_index, &old)) < 0)
    return q2_mark_corrupt (img, "%s", q2_last_error ());
  if (old && (img->l1[l1_index] & QCOW_OFLAG_COPIED)) {
    *l2_offset = old;
    return 0;
  }

  /* A new table, or a private copy of one shared with a snapshot. */
  if ((r = q2_alloc_clusters (img, 1, &t, &fresh)) < 0)
    return r;
  r = q2_check_overlap (img, t, img->cluster_size, "new L2 table",
                        Q2_OVERLAP_ALL);
  if (r < 0)
    return r;
  {
    uint8_t *buf = q2_scratch (Q2_SCRATCH_L2COPY, img->cluster_size);
    if (buf == NULL)
      return q2_err (ENOMEM, "out of memory");
    if (old) {
      /* Dirty slices of the old table are newer than the disk. */
      if ((r = q2_cache_flush (img->l2_cache)) < 0)
        return r;
      r = q2_io_pread (img->fd, buf, img->cluster_size, old, false,
                       "L2 table");
      if (r < 0)
        return r;
    }
    else
      memset (buf, 0, img->cluster_size);
    r = q2_io_pwrite (img->fd, buf, img->cluster_size, t, "new L2 table");
    if (r < 0)
      return r;
    img->unsynced |= Q2_UNSYNCED_L2;
  }
  q2_cache_discard (img->l2_cache, t, img->cluster_size);
  /* The L1 entry reaches the disk at flush, after the table is synced. */
  img->l1[l1_index] = t | QCOW_OFLAG_COPIED;
  q2_meta_index_update (img, old, t, false);
  q2_l1_mark_dirty (img, l1_index, l1_index + 1);
  if (old && (r = q2_free_later (img, old, img->cluster_size)) < 0)
    return r;
  *l2_offset = t;
  return 0;
}

int
q2_l2_entry_ref (struct q2_image *img, uint64_t l2_offset,
                 uint64_t guest_offset, uint8_t **entry, uint64_t *slice_off)
{
  uint64_t idx = (guest_offset >> img->cluster_bits) &
    ((1ULL << img->l2_bits) - 1);
  uint64_t byte = idx * img->l2_entry_size;
  uint64_t ss = q2_cache_slice_size (img->l2_cache);
  uint8_t *slice;
  int r;

  *slice_off = l2_offset + Q2_ROUND_DOWN (byte, ss);
  r = q2_cache_get (img->l2_cache, img->fd, *slice_off, "L2 table", &slice);
  if (r < 0)
    return r;
  *entry = slice + (byte & (ss - 1));
  return 0;
}

int
q2_get_l2_entry (struct q2_image *img, uint64_t guest_offset, bool for_write,
                 uint64_t *entry, uint64_t *bitmap, uint64_t *l2_offset)
{
  uint64_t l1_index = guest_offset >> (img->cluster_bits + img->l2_bits);
  uint64_t so;
  uint8_t *e;
  int r;

  *entry = *bitmap = 0;
  /* Only writes (zero and trim included) come here: a bad L1 entry
   * is corruption found while writing. */
  if (for_write)
    r = q2_l2_table_for_write (img, guest_offset, l2_offset);
  else if ((r = q2_l1_entry_l2 (img, l1_index, l2_offset)) < 0)
    return q2_mark_corrupt (img, "%s", q2_last_error ());
  if (r < 0 || *l2_offset == 0)
    return r;
  if ((r = q2_l2_entry_ref (img, *l2_offset, guest_offset, &e, &so)) < 0)
    return r;
  *entry = q2_be64 (e);
  if (img->extended_l2)
    *bitmap = q2_be64 (e + 8);
  return 0;
}

int
q2_set_l2_entry (struct q2_image *img, uint64_t l2_offset,
                 uint64_t guest_offset, uint64_t entry, uint64_t bitmap)
{
  uint64_t so;
  uint8_t *e;
  int r = q2_l2_entry_ref (img, l2_offset, guest_offset, &e, &so);

  if (r < 0)
    return r;
  q2_put_be64 (e, entry);
  if (img->extended_l2)
    q2_put_be64 (e + 8, bitmap);
  q2_cache_mark_dirty (img->l2_cache, so);
  return 0;
}

const uint8_t *
q2_zero_buffer (struct q2_image *img)
{
  if (img->zero_buf == NULL)
    img->zero_buf = calloc (1, img->cluster_size);
  return img->zero_buf;
}

int
q2_check_entry_in_file (struct q2_image *img, uint64_t gc, uint64_t host)
{
  if (has_data_file (img) || host < img->file_size)
    return 0;
  return q2_mark_corrupt (img, "L2 entry for guest offset %#llx points at "
                          "host offset %#llx, past the end of the file",
                          (unsigned long long) gc, (unsigned long long) host);
}

/* Queues the release of the host data an L2 entry referenced. */
int
q2_release_entry (struct q2_image *img, uint64_t entry)
{
  struct q2_l2_decoded d;
  int r;

  if (has_data_file (img))
    return 0;                   /* data clusters are not refcounted */
  /* No data file here, so the guest offset is not needed. */
  if ((r = q2_decode_l2 (img, entry, 0, 0, 0, &d)) < 0)
    return 0;                   /* bitmap errors do not matter here */
  if (d.type == Q2_COMPRESSED)
    return q2_free_later (img, d.host_offset, d.csize);
  if (d.host_offset)
    return q2_free_later (img, d.host_offset, img->cluster_size);
  return 0;
}

/* Where the copy-on-write part [off, off+len) of a guest cluster comes
 * from: nothing (it reads as zeros), the layer below alone (unallocated
 * in this image, so reading needs none of this image's metadata), or
 * this image's current view. */
enum cow_source { COW_NONE, COW_ZERO, COW_BELOW, COW_LAYER };

static int
cow_source (struct q2_image *img, uint64_t off, uint64_t len,
            enum cow_source *src)
{
  bool zero = true, below = true;

  *src = COW_NONE;
  if (len == 0)
    return 0;
  while (len > 0) {
    struct q2_map m;
    int r = q2_map (img, off, len, &m);
    if (r < 0)
      return r;
    if (m.type != Q2_UNALLOC)
      below = false;
    if (m.type == Q2_NORMAL || m.type == Q2_COMPRESSED ||
        (m.type == Q2_UNALLOC && img->backing &&
         off < img->backing->virtual_size))
      zero = false;
    off += m.length;
    len -= m.length;
  }
  *src = zero ? COW_ZERO : below ? COW_BELOW : COW_LAYER;
  return 0;
}

/* Zeroes a host range without writing a buffer when the file system
 * can: a hole where Q2_HOST_PUNCH_OK allows one (it gives the space
 * back, as a trim should), else ZERO_RANGE.  With Q2_HOST_FAST it
 * fails with ENOTSUP rather than write zeros. */
int
q2_zero_host (struct q2_image *img, int fd, uint64_t offset, uint64_t len,
              unsigned flags)
{
  static const uint8_t zeros[65536];

  if (len == 0)
    return 0;
  if ((flags & Q2_HOST_PUNCH_OK) &&
      fallocate (fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 offset, len) == 0)
    return 0;
  if (fallocate (fd, FALLOC_FL_ZERO_RANGE, offset, len) == 0)
    return 0;
  if (flags & Q2_HOST_FAST)
    return q2_err (ENOTSUP, "the file system cannot zero %#llx+%llu "
                   "without writing", (unsigned long long) offset,
                   (unsigned long long) len);
  while (len > 0) {
    uint64_t n = Q2_MIN (len, sizeof zeros);
    int r = q2_io_pwrite (fd, zeros, n, offset, "zeroing");
    if (r < 0)
      return r;
    offset += n;
    len -= n;
  }
  return 0;
}

/* Fills buf with the copy-on-write part [off, off+len) of the guest,
 * or, when it reads as zeros, zeroes the host range instead (nothing at
 * all when the host cluster is fresh). */
static int
prepare_cow (struct q2_image *img, enum cow_source src, uint64_t guest_off,
             uint64_t len, uint8_t *buf, uint64_t host_off, bool fresh)
{
  switch (src) {
  case COW_NONE: return 0;
  case COW_ZERO:
    return fresh ? 0 : q2_zero_host (img, img->data_fd, host_off, len, 0);
  case COW_BELOW: return q2_read_below (img, buf, len, guest_off);
  case COW_LAYER: return q2_layer_pread (img, buf, len, guest_off);
  }
  return q2_err (EINVAL, "copy-on-write source %d", (int) src);
}

/* Encrypted images: the plaintext of [ra, rb) is assembled in buf (the
 * edges from the current guest view; zeros must be encrypted too, so no
 * zero-range shortcut), encrypted for its new place and written. */
static int
write_encrypted (struct q2_image *img, const uint8_t *data, uint64_t gc,
                 uint64_t host, uint64_t ra, uint64_t a, uint64_t b,
                 uint64_t rb, uint8_t *buf)
{
  uint64_t sector;
  int r;

  if (a > ra && (r = q2_layer_pread (img, buf + ra, a - ra, gc + ra)) < 0)
    return r;
  memcpy (buf + a, data, b - a);
  if (rb > b && (r = q2_layer_pread (img, buf + b, rb - b, gc + b)) < 0)
    return r;
  sector = (img->crypt_guest_sectors ? gc + ra : host + ra) / 512;
  if ((r = q2_crypto_encrypt (img->crypto, sector, buf + ra, rb - ra)) < 0)
    return r;
  r = q2_io_pwrite (img->data_fd, buf + ra, rb - ra, host + ra,
                    "guest data");
  if (r == 0 && host + rb > img->file_size)
    img->file_size = host + rb;
  return r;
}

/* One guest cluster's write, planned under the exclusive lock, filled
 * (copy-on-write and data) and then linked into the L2 table. */
struct cluster_write {
  uint64_t gc, a, b;            /* guest cluster, bytes [a, b) of it */
  uint64_t l2, host, ra, rb;    /* host bytes [ra, rb) get written */
  uint64_t old_entry, new_bitmap;
  bool new_cluster, fresh, release_old;
  enum cow_source head, tail;   /* of [ra, a) and [b, rb) */
};

/* Does every copied edge come from the layer below (which cowsplice.c
 * can splice), and is there one? */
static bool
cow_spliceable (const struct cluster_write *w)
{
  return (w->head == COW_BELOW || w->tail == COW_BELOW) &&
    (w->head == COW_BELOW || w->head == COW_NONE) &&
    (w->tail == COW_BELOW || w->tail == COW_NONE);
}

/* Decides where [a, b) of guest cluster gc goes and allocates a new host
 * cluster if needed.  Caller holds io_lock exclusively. */
static int
plan_write (struct q2_image *img, uint64_t gc, uint64_t a, uint64_t b,
            struct cluster_write *w)
{
  uint64_t cs = img->cluster_size, entry, bitmap;
  bool owned, allocated, compressed;
  struct q2_l2_decoded d;
  int r;

  memset (w, 0, sizeof *w);
  w->gc = gc;
  w->a = a;
  w->b = b;
  r = q2_get_l2_entry (img, gc, true, &entry, &bitmap, &w->l2);
  if (r < 0)
    return r;
  w->old_entry = entry;
  /* Invalid entries found while writing mean corruption. */
  if (q2_decode_l2 (img, entry, bitmap, 0, gc, &d) < 0)
    return q2_mark_corrupt (img, "L2 entry for guest offset %#llx: %s",
                            (unsigned long long) gc, q2_last_error ());
  compressed = d.type == Q2_COMPRESSED;
  allocated = !compressed && (d.host_offset != 0 || d.copied);
  owned = allocated && d.copied;
  w->host = d.host_offset;
  if (allocated && (r = q2_check_entry_in_file (img, gc, w->host)) < 0)
    return r;

  if (has_data_file (img)) {
    w->host = gc;               /* guest offset == data file offset */
    owned = true;
  }
  w->new_cluster = !owned;
  w->release_old = w->new_cluster && (compressed || allocated);
  if (w->new_cluster &&
      (r = q2_alloc_clusters (img, 1, &w->host, &w->fresh)) < 0)
    return r;

  /* Which bytes of the host cluster this write must fill. */
  if (!img->extended_l2) {
    bool zero_flag = !compressed && (entry & QCOW_OFLAG_ZERO);
    if (w->new_cluster || zero_flag || !allocated)
      w->ra = 0, w->rb = cs;
    else
      w->ra = a, w->rb = b;
  }
  else {
    uint64_t scs = cs / 32;
    unsigned sa = a / scs, sb = (b - 1) / scs, i;
    if (w->release_old) {
      /* Replacing a shared or compressed cluster: copy all of it. */
      w->ra = 0, w->rb = cs;
      w->new_bitmap = 0xffffffffULL;
    }
    else {
      bool in_place_a = owned && (bitmap & (1ULL << sa));
      bool in_place_b = owned && (bitmap & (1ULL << sb));
      if (!owned)
        bitmap = entry & L2E_OFFSET_MASK ? bitmap : bitmap & L2_BITMAP_ALL_ZERO;
      w->ra = in_place_a ? a : sa * scs;
      w->rb = in_place_b ? b : (sb + 1) * scs;
      w->new_bitmap = bitmap;
      for (i = sa; i <= sb; i++)
        w->new_bitmap = (w->new_bitmap | (1ULL << i)) & ~(1ULL << (32 + i));
    }
  }
  if (img->crypto) {
    /* Whole sectors are encrypted; read-modify-write the edges. */
    w->ra = Q2_ROUND_DOWN (w->ra, 512);
    w->rb = Q2_MIN (Q2_ROUND_UP (w->rb, 512), cs);
  }
  else if ((r = cow_source (img, gc + w->ra, a - w->ra, &w->head)) < 0 ||
           (r = cow_source (img, gc + b, w->rb - b, &w->tail)) < 0)
    goto fail;
  r = q2_check_overlap (img, w->host + w->ra, w->rb - w->ra, "guest data",
                        has_data_file (img) ? 0 : Q2_OVERLAP_ALL);
  if (r == 0)
    return 0;
 fail:
  if (w->new_cluster)
    q2_free_later (img, w->host, cs);   /* if that fails, only a leak */
  return r;
}

/* Writes the data and the copy-on-write edges to the host.  Needs only
 * the shared lock when the cluster is new (nobody else can see it). */
static int
fill_write (struct q2_image *img, const uint8_t *data,
            const struct cluster_write *w)
{
  uint64_t a = w->a, b = w->b, ra = w->ra, rb = w->rb, host = w->host;
  uint8_t *head, *tail;
  bool head_buf, tail_buf;
  struct iovec iov[3];
  int n = 0, r;

  if (!img->crypto && cow_spliceable (w) &&
      (r = q2_cow_splice (img, data, w->gc, ra, a, b, rb, host)) != 0)
    return r < 0 ? r : 0;
  head = q2_scratch (Q2_SCRATCH_WRITE, img->cluster_size);
  tail = q2_scratch (Q2_SCRATCH_COW_TAIL, img->cluster_size);
  if (head == NULL || tail == NULL)
    return q2_err (ENOMEM, "out of memory for copy-on-write");
  if (img->crypto)
    return write_encrypted (img, data, w->gc, host, ra, a, b, rb, head);
  r = prepare_cow (img, w->head, w->gc + ra, a - ra, head, host + ra,
                   w->fresh);
  if (r == 0)
    r = prepare_cow (img, w->tail, w->gc + b, rb - b, tail, host + b,
                     w->fresh);
  if (r < 0)
    return r;
  head_buf = w->head == COW_BELOW || w->head == COW_LAYER;
  tail_buf = w->tail == COW_BELOW || w->tail == COW_LAYER;
  /* Head, data and tail in one write where they are contiguous. */
  if (head_buf)
    iov[n++] = (struct iovec) { head, a - ra };
  iov[n++] = (struct iovec) { (void *) data, b - a };
  if (tail_buf)
    iov[n++] = (struct iovec) { tail, rb - b };
  pthread_mutex_lock (&img->fill_lock);
  r = q2_io_pwritev (img->data_fd, iov, n, host + (head_buf ? ra : a),
                     "guest data");
  pthread_mutex_unlock (&img->fill_lock);
  return r;
}

/* Points the L2 entry at the written cluster.  Exclusive lock. */
static int
link_write (struct q2_image *img, const struct cluster_write *w)
{
  int r;

  /* An owned cluster may end past the old end of the file. */
  if (!has_data_file (img) && w->host + w->rb > img->file_size)
    img->file_size = w->host + w->rb;
  /* The entry must not reach the disk before the data it now exposes
   * (copy-on-write included): see q2_flush_refcounts. */
  img->unsynced |= Q2_UNSYNCED_DATA;
  r = q2_set_l2_entry (img, w->l2, w->gc, w->host | QCOW_OFLAG_COPIED,
                       w->new_bitmap);
  if (r == 0 && w->release_old)
    r = q2_release_entry (img, w->old_entry);
  return r;
}

/* Writes [a, b) of one guest cluster entirely under the exclusive
 * lock (caller holds it and has called q2_prepare_write). */
static int
write_cluster (struct q2_image *img, const uint8_t *data, uint64_t gc,
               uint64_t a, uint64_t b)
{
  struct cluster_write w;
  int r = plan_write (img, gc, a, b, &w);

  if (r == 0)
    r = fill_write (img, data, &w);
  if (r == 0)
    r = link_write (img, &w);
  return r;
}

/* ---- clusters being written outside the exclusive lock ---- */

static bool
inflight_has (const struct q2_image *img, uint64_t gc)
{
  size_t i;

  for (i = 0; i < img->nb_inflight; i++)
    if (img->inflight[i] == gc)
      return true;
  return false;
}

static int
inflight_add (struct q2_image *img, uint64_t gc)
{
  pthread_mutex_lock (&img->inflight_lock);
  if (img->nb_inflight == img->cap_inflight) {
    size_t cap = img->cap_inflight ? img->cap_inflight * 2 : 16;
    uint64_t *p = realloc (img->inflight, cap * sizeof *p);
    if (p == NULL) {
      pthread_mutex_unlock (&img->inflight_lock);
      return q2_err (ENOMEM, "out of memory");
    }
    img->inflight = p;
    img->cap_inflight = cap;
  }
  img->inflight[img->nb_inflight++] = gc;
  pthread_mutex_unlock (&img->inflight_lock);
  return 0;
}

static void
inflight_remove (struct q2_image *img, uint64_t gc)
{
  size_t i;

  pthread_mutex_lock (&img->inflight_lock);
  for (i = 0; i < img->nb_inflight; i++)
    if (img->inflight[i] == gc) {
      img->inflight[i] = img->inflight[--img->nb_inflight];
      break;
    }
  pthread_cond_broadcast (&img->inflight_cond);
  pthread_mutex_unlock (&img->inflight_lock);
}

/* Waits until gc (or, with all, every cluster) is no longer in flight.
 * Called without io_lock. */
static void
inflight_wait (struct q2_image *img, uint64_t gc, bool all)
{
  pthread_mutex_lock (&img->inflight_lock);
  while (all ? img->nb_inflight > 0 : inflight_has (img, gc))
    pthread_cond_wait (&img->inflight_cond, &img->inflight_lock);
  pthread_mutex_unlock (&img->inflight_lock);
}

void
q2_wait_no_inflight_locked (struct q2_image *img)
{
  /* Holding io_lock exclusively while waiting would block the writers
   * that must finish: drop it around the wait. */
  while (img->nb_inflight > 0) {
    pthread_rwlock_unlock (&img->io_lock);
    inflight_wait (img, 0, true);
    pthread_rwlock_wrlock (&img->io_lock);
  }
}

/* Does filling this new cluster read data (from a backing file, a
 * compressed or shared cluster)?  Only then is it worth leaving the
 * exclusive lock for. */
static bool
cow_reads_data (const struct cluster_write *w)
{
  return w->head == COW_BELOW || w->head == COW_LAYER ||
    w->tail == COW_BELOW || w->tail == COW_LAYER;
}

/* Writes one guest cluster.  A new cluster whose copy-on-write reads
 * data is filled outside the exclusive lock, so that several such
 * writes (copy-on-write from a backing file, say) run in parallel: with
 * no lock at all when the data comes only from the layer below (which is
 * read-only), else under the shared lock.  The cluster is marked in
 * flight meanwhile: other writes, zeroes and trims of it, and snapshot
 * operations, wait.  The new host cluster is allocated but not yet
 * linked, so nothing else can see or free it.
 *
 * With may_defer, a write that turns out to go in place into a cluster
 * we own is not done here: *deferred is set and the caller writes it
 * under the shared lock, so that in-place writes never do I/O under the
 * exclusive lock (which would keep it busy and starve allocating
 * writes). */
static int
write_cluster_parallel (struct q2_image *img, const uint8_t *data,
                        uint64_t gc, uint64_t a, uint64_t b, bool may_defer,
                        bool *deferred)
{
  struct cluster_write w;
  bool shared;
  int r, r2;

  for (;;) {
    pthread_rwlock_wrlock (&img->io_lock);
    if (!inflight_has (img, gc))
      break;
    pthread_rwlock_unlock (&img->io_lock);
    inflight_wait (img, gc, false);
  }
  r = q2_prepare_write (img);
  if (r == 0)
    r = plan_write (img, gc, a, b, &w);
  *deferred = false;
  if (r < 0) {
    pthread_rwlock_unlock (&img->io_lock);
    return r;
  }
  if (may_defer && !w.new_cluster && !img->crypto && w.ra == a &&
      w.rb == b && w.head == COW_NONE && w.tail == COW_NONE) {
    *deferred = true;
    pthread_rwlock_unlock (&img->io_lock);
    return 0;
  }
  if (!w.new_cluster || img->crypto || !cow_reads_data (&w)) {
    /* Nothing to gain outside the lock: finish here. */
    r = fill_write (img, data, &w);
    if (r < 0 && w.new_cluster)
      q2_free_later (img, w.host, img->cluster_size);
    if (r == 0)
      r = link_write (img, &w);
    if (r == 0)
      r = q2_meta_index_refresh (img);
    pthread_rwlock_unlock (&img->io_lock);
    return r;
  }
  /* Once the lock is dropped, a flush or a cache eviction may write the
   * new cluster's refcount before the fill writes the cluster: a crash
   * then leaves a leaked cluster, possibly past the end of the file
   * (see q2_alloc_clusters). */
  if ((r = inflight_add (img, gc)) < 0) {
    q2_free_later (img, w.host, img->cluster_size);
    pthread_rwlock_unlock (&img->io_lock);
    return r;
  }
  pthread_rwlock_unlock (&img->io_lock);

  shared = w.head == COW_LAYER || w.tail == COW_LAYER;
  if (shared)
    pthread_rwlock_rdlock (&img->io_lock);
  r = fill_write (img, data, &w);
  if (shared)
    pthread_rwlock_unlock (&img->io_lock);

  pthread_rwlock_wrlock (&img->io_lock);
  if (r == 0)
    r = link_write (img, &w);
  else if ((r2 = q2_free_later (img, w.host, img->cluster_size)) < 0)
    r = r2;                     /* the unused cluster is only leaked */
  if (r == 0)
    r = q2_meta_index_refresh (img);
  inflight_remove (img, gc);
  pthread_rwlock_unlock (&img->io_lock);
  return r;
}

int
q2_write_locked (struct q2_image *img, const uint8_t *buf, uint64_t count,
                 uint64_t offset)
{
  uint64_t cs = img->cluster_size;

  while (count > 0) {
    uint64_t gc = Q2_ROUND_DOWN (offset, cs);
    uint64_t a = offset - gc;
    uint64_t n = Q2_MIN (count, cs - a);
    int r = write_cluster (img, buf, gc, a, a + n);
    if (r < 0)
      return r;
    buf += n;
    offset += n;
    count -= n;
  }
  return 0;
}

/* Writes what can be written in place (clusters we own, data already
 * allocated) under the shared lock; returns how many leading bytes were
 * written. */
static int
write_in_place (struct q2_image *img, const uint8_t *buf, uint64_t count,
                uint64_t offset, uint64_t *done)
{
  *done = 0;
  /* Encrypted sectors need read-modify-write, and a stale overlap
   * index a rebuild: both take the exclusive path. */
  if (img->readonly || __atomic_load_n (&img->corrupt, __ATOMIC_ACQUIRE) ||
      !img->header_touched || img->crypto || img->meta_stale)
    return 0;
  while (count > 0) {
    struct q2_map m;
    int r = q2_map (img, offset, count, &m);
    /* On bad metadata, the exclusive path fails too, and marks the
     * image corrupt as every write that meets it must. */
    if (r < 0 || m.type != Q2_NORMAL || !m.copied)
      return 0;
    r = q2_check_overlap (img, m.host_offset, m.length, "guest data",
                          has_data_file (img) ? 0 : Q2_OVERLAP_ALL);
    if (r < 0)
      return r;
    r = q2_io_pwrite (img->data_fd, buf, m.length, m.host_offset,
                      "guest data");
    if (r < 0)
      return r;
    buf += m.length;
    offset += m.length;
    count -= m.length;
    *done += m.length;
  }
  return 0;
}

static int
check_range (const struct q2_image *img, uint64_t count, uint64_t offset,
             const char *op)
{
  if (offset > img->virtual_size || count > img->virtual_size - offset)
    return q2_err (ENOSPC, "%s of %llu bytes at offset %llu is beyond the "
                   "end of the disk", op, (unsigned long long) count,
                   (unsigned long long) offset);
  return 0;
}

int
q2_flush (struct q2_image *img)
{
  int r;

  pthread_rwlock_wrlock (&img->io_lock);
  r = q2_flush_locked (img);
  pthread_rwlock_unlock (&img->io_lock);
  return r;
}

int
q2_pwrite (struct q2_image *img, const void *buf, uint64_t count,
           uint64_t offset, bool fua)
{
  uint64_t done;
  int r;

  if ((r = check_range (img, count, offset, "write")) < 0)
    return r;
  /* A busy lock means metadata writers are queued (the lock prefers
   * them): then do the whole write on the exclusive path, which handles
   * in-place clusters too, rather than queue twice. */
  done = 0;
  if (pthread_rwlock_tryrdlock (&img->io_lock) == 0) {
    r = write_in_place (img, buf, count, offset, &done);
    pthread_rwlock_unlock (&img->io_lock);
    if (r < 0)
      return r;
  }
  if (done < count) {
    const uint8_t *p = (const uint8_t *) buf + done;
    uint64_t cs = img->cluster_size;
    count -= done;
    offset += done;
    bool may_defer = true, deferred;
    while (r == 0 && count > 0) {
      uint64_t gc = Q2_ROUND_DOWN (offset, cs);
      uint64_t n = Q2_MIN (count, cs - (offset - gc));
      r = write_cluster_parallel (img, p, gc, offset - gc, offset - gc + n,
                                  may_defer, &deferred);
      if (r == 0 && deferred) {
        /* In place after all.  If the cluster changed meanwhile, the
         * rest goes through the exclusive path, this time to the end. */
        pthread_rwlock_rdlock (&img->io_lock);
        r = write_in_place (img, p, n, offset, &done);
        pthread_rwlock_unlock (&img->io_lock);
        if (r == 0 && done < n) {
          n = done;
          may_defer = false;
        }
      }
      else
        may_defer = true;
      p += n;
      offset += n;
      count -= n;
    }
    q2_scratch_trim ();
    if (r < 0)
      return r;
  }
  return fua ? q2_flush (img) : 0;
}
