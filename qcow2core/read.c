/* The read side of an image: pread through the chain, allocation status
 * (extents) as QEMU's block status reports it, and cache hints. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "crypto.h"
#include "internal.h"

/* Unallocated ranges read from the backing file, and as zeros past its
 * end or without one.  Touches nothing of img but its backing pointer. */
int
q2_read_below (struct q2_image *img, uint8_t *buf, uint64_t count,
            uint64_t offset)
{
  struct q2_image *b = img->backing;
  uint64_t n = 0;
  int r;

  if (b && offset < b->virtual_size) {
    n = Q2_MIN (count, b->virtual_size - offset);
    r = q2_layer_pread (b, buf, n, offset);
    if (r < 0)
      return r;
  }
  memset (buf + n, 0, count - n);
  return 0;
}

static int
read_compressed (struct q2_image *img, const struct q2_map *m, uint8_t *buf,
                 uint64_t count, uint64_t offset)
{
  uint64_t in_cluster = offset & (img->cluster_size - 1);
  uint8_t *cbuf, *cluster;
  int r;

  /* In an encrypted image too the stream is stored in the clear: QEMU
   * writes compressed clusters (qemu-io write -c) without encrypting. */
  if (m->host_offset >= img->file_size)
    return q2_err (EIO, "compressed cluster for guest offset %#llx starts at "
                   "host offset %#llx, past the end of the file",
                   (unsigned long long) (offset - in_cluster),
                   (unsigned long long) m->host_offset);
  cbuf = q2_scratch (Q2_SCRATCH_COMPRESSED, m->csize);
  cluster = q2_scratch (Q2_SCRATCH_CLUSTER, img->cluster_size);
  if (cbuf == NULL || cluster == NULL)
    return q2_err (ENOMEM, "out of memory for a compressed cluster");
  /* The descriptor rounds the length up to a sector, which may run past
   * the end of the file: that part reads as zeros. */
  r = q2_io_pread (img->fd, cbuf, m->csize, m->host_offset, true,
                   "compressed cluster");
  if (r < 0)
    return r;
  r = q2_decompress (img->hdr.compression_type, cbuf, m->csize, cluster,
                     img->cluster_size);
  if (r < 0)
    return q2_err_prefix (r, "guest offset %#llx (host offset %#llx)",
                          (unsigned long long) (offset - in_cluster),
                          (unsigned long long) m->host_offset);
  memcpy (buf, cluster + in_cluster, count);
  return 0;
}

/* Reads and decrypts whole sectors around [host, host+count). */
static int
read_encrypted_chunk (struct q2_image *img, uint64_t host, uint8_t *buf,
                      uint64_t count, uint64_t offset)
{
  uint64_t skew = host & 511;
  uint64_t len = Q2_ROUND_UP (skew + count, 512);
  uint64_t sector = (img->crypt_guest_sectors ? offset - skew :
                     host - skew) / 512;
  uint8_t *b = buf;
  int r;

  if (skew || len != count) {
    if ((b = q2_scratch (Q2_SCRATCH_CRYPT, len)) == NULL)
      return q2_err (ENOMEM, "out of memory for decryption");
  }
  r = q2_io_pread (img->data_fd, b, len, host - skew, true, "data cluster");
  if (r == 0)
    r = q2_crypto_decrypt (img->crypto, sector, b, len);
  if (r == 0 && b != buf)
    memcpy (buf, b + skew, count);
  return r;
}

/* Sector-aligned ranges decrypt in place; others go through a bounce
 * buffer a cluster at a time, so that its size stays bounded. */
static int
read_encrypted (struct q2_image *img, uint64_t host, uint8_t *buf,
                uint64_t count, uint64_t offset)
{
  if ((host & 511) == 0 && (count & 511) == 0)
    return read_encrypted_chunk (img, host, buf, count, offset);
  while (count > 0) {
    uint64_t n = Q2_MIN (count, img->cluster_size - (host & 511));
    int r = read_encrypted_chunk (img, host, buf, n, offset);
    if (r < 0)
      return r;
    host += n;
    buf += n;
    offset += n;
    count -= n;
  }
  return 0;
}

static int
read_normal (struct q2_image *img, const struct q2_map *m, uint8_t *buf,
             uint64_t count, uint64_t offset)
{
  if (img->crypto)
    return read_encrypted (img, m->host_offset, buf, count, offset);
  if (img->hdr.crypt_method)
    return q2_err (EPERM, "the image is encrypted and was opened without "
                   "its password; its data cannot be read");
  /* The last cluster may be shorter in the file than a full cluster;
   * QEMU reads the missing part as zeros, and so do we. */
  return q2_io_pread (img->data_fd, buf, count, m->host_offset, true,
                      img->data_fd == img->fd ? "data cluster" :
                      "external data file");
}

int
q2_layer_pread (struct q2_image *img, uint8_t *buf, uint64_t count,
                uint64_t offset)
{
  if (img->fmt == Q2_FMT_RAW)
    return q2_io_pread (img->fd, buf, count, offset, true, "raw image");

  while (count > 0) {
    struct q2_map m;
    int r = q2_map (img, offset, count, &m);
    if (r < 0)
      return r;
    switch (m.type) {
    case Q2_UNALLOC: r = q2_read_below (img, buf, m.length, offset); break;
    case Q2_ZERO: memset (buf, 0, m.length); break;
    case Q2_NORMAL: r = read_normal (img, &m, buf, m.length, offset); break;
    case Q2_COMPRESSED:
      r = read_compressed (img, &m, buf, m.length, offset);
      break;
    }
    if (r < 0)
      return r;
    buf += m.length;
    offset += m.length;
    count -= m.length;
  }
  return 0;
}

int
q2_pread (struct q2_image *img, void *buf, uint64_t count, uint64_t offset)
{
  int r;

  if (offset > img->virtual_size || count > img->virtual_size - offset)
    return q2_err (EINVAL, "read of %llu bytes at offset %llu is beyond the "
                   "end of the disk", (unsigned long long) count,
                   (unsigned long long) offset);
  /* Shared: reads run concurrently, but never with a metadata change. */
  pthread_rwlock_rdlock (&img->io_lock);
  r = q2_layer_pread (img, buf, count, offset);
  pthread_rwlock_unlock (&img->io_lock);
  q2_scratch_trim ();
  return r;
}

/* ---- allocation status ---- */

void
q2_host_status (int fd, uint64_t file_size, uint64_t off, uint64_t len,
                bool *is_data, uint64_t *run)
{
  off_t d, h;

  if (off >= file_size) {
    *is_data = false;
    *run = len;
    return;
  }
  len = Q2_MIN (len, file_size - off);
  d = lseek (fd, off, SEEK_DATA);
  if (d == -1) {
    /* ENXIO: only a hole up to the end; anything else: assume data. */
    *is_data = errno != ENXIO;
    *run = len;
    return;
  }
  if ((uint64_t) d > off) {
    *is_data = false;
    *run = Q2_MIN (len, (uint64_t) d - off);
    return;
  }
  h = lseek (fd, off, SEEK_HOLE);
  *is_data = true;
  *run = (h == -1 || (uint64_t) h <= off) ? len :
    Q2_MIN (len, (uint64_t) h - off);
}

/* QEMU looks into the host file for data clusters only when it thinks
 * the image was preallocated with metadata: when more clusters have a
 * refcount than the file has allocated blocks. */
static int
detect_prealloc (struct q2_image *img)
{
  struct stat st;
  uint64_t real_clusters, threshold, end_cluster, i, count = 0;
  int r;

  if (fstat (img->fd, &st) == -1) {
    int e = errno;
    return q2_err (e, "fstat: %s", strerror (e));
  }
  real_clusters = (uint64_t) st.st_blocks * 512 / img->cluster_size;
  threshold = Q2_MAX (real_clusters * 10 / 9, real_clusters + 2);
  end_cluster = (img->file_size + img->cluster_size - 1) >> img->cluster_bits;
  for (i = 0; i < end_cluster && count < threshold; i++) {
    uint64_t rc;
    if ((r = q2_refcount_get (img, i, &rc)) < 0)
      return r;
    count += rc != 0;
  }
  __atomic_store_n (&img->prealloc_state, count >= threshold,
                    __ATOMIC_RELEASE);
  return 0;
}

int
q2_prealloc_state (struct q2_image *img)
{
  int r = __atomic_load_n (&img->prealloc_state, __ATOMIC_ACQUIRE);

  /* Decided once; only the first extents call takes the lock. */
  if (r >= 0)
    return r;
  pthread_mutex_lock (&img->lock);
  r = 0;
  if (img->prealloc_state < 0)
    r = detect_prealloc (img);
  if (r == 0)
    r = img->prealloc_state;
  pthread_mutex_unlock (&img->lock);
  return r;
}

/* The status of the first run of bytes at offset (< virtual size). */
static int
layer_status (struct q2_image *img, uint64_t offset, uint64_t len,
              uint64_t *run, uint32_t *flags)
{
  struct q2_map m;
  bool data;
  int r;

  if (img->fmt == Q2_FMT_RAW) {
    q2_host_status (img->fd, img->file_size, offset, len, &data, run);
    *flags = data ? 0 : Q2_EXTENT_HOLE | Q2_EXTENT_ZERO;
    return 0;
  }

  r = q2_map (img, offset, len, &m);
  if (r < 0)
    return r;
  *run = m.length;
  switch (m.type) {
  case Q2_COMPRESSED:
    *flags = 0;
    return 0;
  case Q2_ZERO:
    *flags = Q2_EXTENT_HOLE | Q2_EXTENT_ZERO;
    return 0;
  case Q2_NORMAL:
    *flags = 0;
    if (img->crypto)
      return 0;                 /* QEMU does not look at the host file */
    if ((r = q2_prealloc_state (img)) < 0)
      return r;
    if (r) {
      /* Writes grow a data file without updating a size kept for it:
       * its holes and end are asked of the file itself. */
      q2_host_status (img->data_fd, img->data_fd == img->fd ?
                      img->file_size : UINT64_MAX, m.host_offset,
                      m.length, &data, run);
      *flags = data ? 0 : Q2_EXTENT_ZERO;
    }
    return 0;
  case Q2_UNALLOC:
    if (img->backing == NULL || offset >= img->backing->virtual_size) {
      *flags = Q2_EXTENT_HOLE | Q2_EXTENT_ZERO;
      return 0;
    }
    return layer_status (img->backing, offset,
                         Q2_MIN (m.length,
                                 img->backing->virtual_size - offset),
                         run, flags);
  }
  return 0;
}

static int
extents_locked (struct q2_image *img, uint64_t offset, uint64_t count,
                bool req_one, q2_extent_fn fn, void *opaque)
{
  uint64_t end = offset + Q2_MIN (count, img->virtual_size - offset);

  while (offset < end) {
    uint64_t run;
    uint32_t flags;
    int r = layer_status (img, offset, end - offset, &run, &flags);
    if (r < 0)
      return r;
    if ((r = fn (opaque, offset, run, flags)) != 0)
      return r;
    offset += run;
    if (req_one)
      break;
  }
  return 0;
}

int
q2_extents (struct q2_image *img, uint64_t offset, uint64_t count,
            bool req_one, q2_extent_fn fn, void *opaque)
{
  int r;

  if (offset >= img->virtual_size)
    return q2_err (EINVAL, "extents: offset %llu is beyond the end of the "
                   "disk", (unsigned long long) offset);
  pthread_rwlock_rdlock (&img->io_lock);
  r = extents_locked (img, offset, count, req_one, fn, opaque);
  pthread_rwlock_unlock (&img->io_lock);
  return r;
}

/* ---- cache hints ---- */

static int
layer_cache (struct q2_image *img, uint64_t offset, uint64_t count)
{
  if (img->fmt == Q2_FMT_RAW) {
    posix_fadvise (img->fd, offset, count, POSIX_FADV_WILLNEED);
    return 0;
  }
  while (count > 0) {
    struct q2_map m;
    int r = q2_map (img, offset, count, &m);
    if (r < 0)
      return r;
    if (m.type == Q2_NORMAL)
      posix_fadvise (img->data_fd, m.host_offset, m.length,
                     POSIX_FADV_WILLNEED);
    else if (m.type == Q2_COMPRESSED)
      posix_fadvise (img->fd, m.host_offset, m.csize, POSIX_FADV_WILLNEED);
    else if (m.type == Q2_UNALLOC && img->backing &&
             offset < img->backing->virtual_size) {
      r = layer_cache (img->backing, offset,
                       Q2_MIN (m.length, img->backing->virtual_size - offset));
      if (r < 0)
        return r;
    }
    offset += m.length;
    count -= m.length;
  }
  return 0;
}

int
q2_cache (struct q2_image *img, uint64_t offset, uint64_t count)
{
  int r;

  if (offset > img->virtual_size || count > img->virtual_size - offset)
    return q2_err (EINVAL, "cache request beyond the end of the disk");
  pthread_rwlock_rdlock (&img->io_lock);
  r = layer_cache (img, offset, count);
  pthread_rwlock_unlock (&img->io_lock);
  return r;
}
