/* Opening an image and its backing chain: format detection, header
 * validation, feature checks, L1 and refcount table loading, caches,
 * the external data file and the backing file with loop detection. */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "crypto.h"
#include "internal.h"

#define DEFAULT_L2_CACHE_MAX (32ULL << 20)
#define REFBLOCK_CACHE_SLOTS 64
#define MIN_L2_SLOTS 16
#define MAX_L2_SLOTS (64u << 20)   /* 256 GiB of 4 KiB slices */

/* Metadata is cached in slices no larger than this. */
static uint32_t
slice_size_for (uint64_t cluster_size)
{
  return Q2_MIN (cluster_size, 4096);
}

char *
q2_resolve_name (const char *dir, const char *name)
{
  char *p;

  if (name[0] == '/')
    return strdup (name);
  p = malloc (strlen (dir) + strlen (name) + 2);
  if (p)
    sprintf (p, "%s/%s", dir, name);
  return p;
}

/* Opens a file of a layer, read-only: q2_switch_to_rw reopens it. */
static int
open_file (const char *path, const char *what, int *fd, uint64_t *size)
{
  struct stat st;
  off_t end;
  int fl;

  /* O_NONBLOCK: a FIFO named by an untrusted image must not block us
   * before the file type check below refuses it. */
  *fd = open (path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (*fd == -1) {
    int e = errno;
    return q2_err (e, "%s: %s: %s", what, path, strerror (e));
  }
  if (fstat (*fd, &st) == -1 || (!S_ISREG (st.st_mode) &&
                                 !S_ISBLK (st.st_mode))) {
    close (*fd);
    *fd = -1;
    return q2_err (EINVAL, "%s: %s: not a regular file or block device",
                   what, path);
  }
  if ((fl = fcntl (*fd, F_GETFL)) != -1)
    fcntl (*fd, F_SETFL, fl & ~O_NONBLOCK);
  end = lseek (*fd, 0, SEEK_END);
  if (end == -1) {
    int e = errno;
    close (*fd);
    *fd = -1;
    return q2_err (e, "%s: %s: cannot find the size: %s", what, path,
                   strerror (e));
  }
  *size = end;
  return 0;
}

static mode_t
file_mode (int fd)
{
  struct stat st;

  return fstat (fd, &st) == 0 ? st.st_mode : 0;
}

int
q2_read_table (struct q2_image *img, uint64_t offset, uint64_t entries,
               const char *what, uint64_t **out)
{
  uint64_t *t = malloc (entries ? entries * 8 : 8);
  uint64_t i;
  int r;

  if (t == NULL)
    return q2_err (ENOMEM, "%s: out of memory", what);
  r = q2_io_pread (img->fd, t, entries * 8, offset, false, what);
  if (r < 0) {
    free (t);
    return r;
  }
  for (i = 0; i < entries; i++)
    t[i] = q2_be64 (&t[i]);
  *out = t;
  return 0;
}

/* How many L2 cache slices: enough for the whole image by default, at
 * most 32 MiB; or what the user asked for. */
static uint32_t
l2_cache_slots (const struct q2_image *img, uint64_t l2_cache_size,
                uint32_t slice)
{
  uint64_t bytes = l2_cache_size;
  uint64_t clusters = (img->virtual_size + img->cluster_size - 1) >>
    img->cluster_bits;
  uint64_t tables = (clusters + (1ULL << img->l2_bits) - 1) >> img->l2_bits;
  /* Every L2 table of the disk, slice by slice: more is never used. */
  uint64_t all = tables * (img->cluster_size / slice);

  if (bytes == 0) {
    bytes = Q2_MIN (clusters * img->l2_entry_size + slice,
                    DEFAULT_L2_CACHE_MAX);
    return Q2_MAX (bytes / slice, MIN_L2_SLOTS);
  }
  bytes = Q2_MIN (bytes / slice, all);
  /* The slot array is reserved up front (address space only). */
  if (bytes > MAX_L2_SLOTS)
    bytes = MAX_L2_SLOTS;
  return Q2_MAX (bytes, 2);
}

#define MAX_LUKS_AREA (64u << 20)

/* Unlocks an encrypted image; data is never served without the key. */
static int
setup_encryption (struct q2_image *img, const char *password, bool no_key)
{
  const struct q2_header *h = &img->hdr;
  uint8_t *area;
  int r;

  if (h->crypt_method == 0 || (no_key && !password))
    return 0;
  if (password == NULL)
    return q2_err (ENOKEY, "the image is encrypted (%s): a password is "
                   "needed", h->crypt_method == 1 ? "legacy AES" :
                   "LUKS");
  if (h->crypt_method == 1) {
    img->crypt_guest_sectors = true;
    return q2_crypto_open_aes (password, &img->crypto);
  }
  if (h->crypto_length == 0 || h->crypto_length > MAX_LUKS_AREA)
    return q2_err (EINVAL, "full disk encryption header length %llu is "
                   "invalid", (unsigned long long) h->crypto_length);
  area = malloc (h->crypto_length);
  if (area == NULL)
    return q2_err (ENOMEM, "out of memory for the LUKS header");
  r = q2_io_pread (img->fd, area, h->crypto_length, h->crypto_offset, false,
                   "LUKS header");
  if (r == 0)
    r = q2_crypto_open_luks (area, h->crypto_length, password, &img->crypto);
  explicit_bzero (area, h->crypto_length);
  free (area);
  return r;
}

void
q2_set_geometry (struct q2_image *img)
{
  const struct q2_header *h = &img->hdr;

  img->cluster_bits = h->cluster_bits;
  img->cluster_size = 1ULL << h->cluster_bits;
  img->extended_l2 = !!(h->incompatible_features & QCOW2_INCOMPAT_EXTL2);
  img->l2_entry_size = img->extended_l2 ? 16 : 8;
  img->l2_bits = h->cluster_bits - (img->extended_l2 ? 4 : 3);
  img->subcluster_bits = h->cluster_bits - 5;
  img->csize_shift = 62 - (h->cluster_bits - 8);
  img->csize_mask = (1ULL << (h->cluster_bits - 8)) - 1;
  img->coffset_mask = (1ULL << img->csize_shift) - 1;
  img->refcount_bits = 1u << h->refcount_order;
}

static int
setup_qcow2 (struct q2_image *img, const uint8_t *buf, size_t len,
             const struct q2_open_opts *opts)
{
  struct q2_header *h = &img->hdr;
  uint32_t slice;
  int r;

  r = q2_header_parse (buf, len, img->file_size,
                       opts->for_check ? Q2_HDR_REFTABLE_UNUSABLE : 0, h);
  if (r < 0)
    return r;
  if ((r = setup_encryption (img, opts->password, opts->no_key)) < 0)
    return r;

  q2_set_geometry (img);
  /* QEMU works in 512-byte sectors and ignores a partial last sector. */
  img->virtual_size = Q2_ROUND_DOWN (h->size, 512);
  img->prealloc_state = -1;

  img->l1_size = h->l1_size;
  r = q2_read_table (img, h->l1_table_offset, h->l1_size, "L1 table", &img->l1);
  if (r < 0)
    return r;
  if ((r = q2_snapshots_load (img)) < 0)
    return r;
  img->reftable_entries =
    (uint64_t) h->refcount_table_clusters * img->cluster_size / 8;
  if (q2_reftable_unusable (h, img->cluster_size, img->file_size)) {
    /* Only with for_check; the size was bounded by the header check. */
    img->reftable = calloc (img->reftable_entries ? img->reftable_entries
                            : 1, sizeof *img->reftable);
    if (img->reftable == NULL)
      return q2_err (ENOMEM, "out of memory for the refcount table");
    img->refcounts_lost = true;
  }
  else if ((r = q2_read_table (img, h->refcount_table_offset,
                               img->reftable_entries, "refcount table",
                               &img->reftable)) < 0)
    return r;

  slice = slice_size_for (img->cluster_size);
  img->l2_cache = q2_cache_new (slice, l2_cache_slots (img,
                                                       opts->l2_cache_size,
                                                       slice), NULL, NULL);
  img->rb_cache = q2_cache_new (slice, REFBLOCK_CACHE_SLOTS, NULL, NULL);
  if (img->l2_cache == NULL || img->rb_cache == NULL)
    return q2_err (ENOMEM, "out of memory for the metadata caches");

  if (h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
    img->data_path = q2_resolve_name (img->dir, h->data_file);
    if (img->data_path == NULL)
      return q2_err (ENOMEM, "out of memory");
    r = open_file (img->data_path, "external data file", &img->data_fd,
                   &img->data_file_size);
    if (r < 0)
      return r;
    /* QEMU locks the data file as it locks the image. */
    if (img->locking &&
        (r = q2_lock_image (img->data_fd, img->data_path, false)) < 0)
      return r;
  }
  return 0;
}

/* Reads enough of the start of the file for the header: the first
 * cluster, once cluster_bits is known. */
static int
read_header_cluster (struct q2_image *img, uint8_t **buf, size_t *len)
{
  uint8_t probe[104];
  size_t n = Q2_MIN (img->file_size, sizeof probe);
  uint32_t bits;
  int r;

  *buf = NULL;
  r = q2_io_pread (img->fd, probe, n, 0, false, "qcow2 header");
  if (r < 0)
    return r;
  bits = n >= 24 ? q2_be32 (probe + 20) : 0;
  if (bits < QCOW2_MIN_CLUSTER_BITS || bits > QCOW2_MAX_CLUSTER_BITS)
    bits = QCOW2_MIN_CLUSTER_BITS;  /* the parser reports it */
  *len = Q2_MIN (img->file_size, 1ULL << bits);
  if (*len < n)
    *len = n;
  *buf = malloc (*len);
  if (*buf == NULL)
    return q2_err (ENOMEM, "out of memory");
  return q2_io_pread (img->fd, *buf, *len, 0, false, "qcow2 header");
}

static bool
has_qcow2_magic (struct q2_image *img)
{
  uint8_t m[4];

  return img->file_size >= 4 &&
    q2_io_pread (img->fd, m, 4, 0, false, "magic") == 0 &&
    q2_be32 (m) == QCOW2_MAGIC;
}

/* A backing name from an image must name a plain file: no protocol
 * prefixes ("nbd:", "http://"), no "json:" descriptions. */
static int
check_backing_name (const char *name)
{
  const char *colon = strchr (name, ':');
  const char *slash = strchr (name, '/');

  if (colon && (slash == NULL || colon < slash))
    return q2_err (EPERM, "backing file name '%s' is a protocol or json: "
                   "name; only plain files are allowed (backing= can "
                   "override it)", name);
  return 0;
}

static int
open_backing (struct q2_image *img, const struct q2_open_opts *opts,
              const char *const *chain)
{
  const struct q2_header *h = &img->hdr;
  const char *format = h->backing_format;
  const char *name = h->backing_file;
  char *path;
  int r;

  if (img->depth == 0 && opts->no_backing)
    return 0;
  if (img->depth == 0 && opts->backing_override) {
    name = opts->backing_override;
    format = NULL;              /* probe the replacement */
  }
  else if (name == NULL)
    return 0;
  else if ((r = check_backing_name (name)) < 0)
    return r;
  if (img->depth >= Q2_MAX_CHAIN_DEPTH)
    return q2_err (ELOOP, "backing chain is deeper than %d files",
                   Q2_MAX_CHAIN_DEPTH);
  path = q2_resolve_name (img->dir, name);
  if (path == NULL)
    return q2_err (ENOMEM, "out of memory");
  r = q2_open_layer (path, format, opts, img->depth + 1, chain,
                     &img->backing);
  free (path);
  if (r < 0)
    return q2_err_prefix (r, "backing file '%s'", name);
  return 0;
}

int
q2_open_layer (const char *path, const char *format,
               const struct q2_open_opts *opts, int depth,
               const char *const *chain, struct q2_image **out)
{
  struct q2_image *img;
  const char *sub_chain[Q2_MAX_CHAIN_DEPTH + 2];
  char *real, *tmp;
  uint8_t *buf = NULL;
  size_t len;
  int i, r;

  *out = NULL;
  img = calloc (1, sizeof *img);
  if (img == NULL)
    return q2_err (ENOMEM, "out of memory");
  img->fd = img->data_fd = -1;
  /* Every layer opens read-only; q2_make_writable makes the top one
   * writable (q2_open does that when asked). */
  img->readonly = true;
  img->depth = depth;
  img->locking = opts->locking;
  pthread_mutex_init (&img->lock, NULL);
  pthread_mutex_init (&img->inflight_lock, NULL);
  pthread_mutex_init (&img->fill_lock, NULL);
  pthread_cond_init (&img->inflight_cond, NULL);
  {
    /* Readers never hold the lock for long, but a steady stream of them
     * must not starve a metadata writer. */
    pthread_rwlockattr_t a;
    pthread_rwlockattr_init (&a);
    pthread_rwlockattr_setkind_np (&a,
                                   PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init (&img->io_lock, &a);
    pthread_rwlockattr_destroy (&a);
  }

  real = realpath (path, NULL);
  if (real == NULL) {
    int e = errno;
    pthread_mutex_destroy (&img->lock);
    pthread_mutex_destroy (&img->inflight_lock);
    pthread_mutex_destroy (&img->fill_lock);
    pthread_cond_destroy (&img->inflight_cond);
    pthread_rwlock_destroy (&img->io_lock);
    free (img);
    return q2_err (e, "%s: %s", path, strerror (e));
  }
  img->path = real;
  for (i = 0; i < depth; i++)
    if (strcmp (chain[i], real) == 0) {
      r = q2_err (ELOOP, "backing file loop: %s is its own backing file",
                  real);
      goto fail;
    }
  tmp = strdup (real);
  img->dir = tmp ? strdup (dirname (tmp)) : NULL;
  free (tmp);
  if (img->dir == NULL) {
    r = q2_err (ENOMEM, "out of memory");
    goto fail;
  }

  r = open_file (real, depth ? "backing file" : "image", &img->fd,
                 &img->file_size);
  if (r < 0)
    goto fail;
  if (depth > 0 && !S_ISREG (file_mode (img->fd))) {
    r = q2_err (EPERM, "%s is not a regular file; backing files must be",
                real);
    goto fail;
  }
  if (img->locking && (r = q2_lock_image (img->fd, real, false)) < 0)
    goto fail;
  img->data_fd = img->fd;
  img->data_file_size = img->file_size;

  if (format && strcmp (format, "raw") != 0 && strcmp (format, "qcow2") != 0) {
    r = q2_err (ENOTSUP, "%s: backing format '%s' is not supported "
                "(only qcow2 and raw)", real, format);
    goto fail;
  }
  if ((format && strcmp (format, "raw") == 0) ||
      (format == NULL && !has_qcow2_magic (img))) {
    img->fmt = Q2_FMT_RAW;
    /* QEMU sees a raw file in whole sectors, the last one zero-padded. */
    img->virtual_size = Q2_ROUND_UP (img->file_size, 512);
    *out = img;
    return 0;
  }

  img->fmt = Q2_FMT_QCOW2;
  r = read_header_cluster (img, &buf, &len);
  if (r == 0)
    r = setup_qcow2 (img, buf, len, opts);
  free (buf);
  if (r < 0)
    goto fail_named;

  for (i = 0; i < depth; i++)
    sub_chain[i] = chain[i];
  sub_chain[depth] = img->path;
  r = open_backing (img, opts, sub_chain);
  if (r < 0)
    goto fail_named;
  *out = img;
  return 0;

 fail_named:
  r = q2_err_prefix (r, "%s", img->path);
 fail:
  q2_free_layer (img);
  return r;
}

void
q2_free_layer (struct q2_image *img)
{
  if (img == NULL)
    return;
  q2_free_layer (img->backing);
  if (img->data_fd >= 0 && img->data_fd != img->fd)
    close (img->data_fd);
  if (img->fd >= 0)
    close (img->fd);
  q2_cache_free (img->l2_cache);
  q2_cache_free (img->rb_cache);
  free (img->l1);
  free (img->reftable);
  q2_snapshots_free (img);
  q2_header_free (&img->hdr);
  free (img->data_path);
  free (img->path);
  free (img->dir);
  free (img->pending_free);
  free (img->zero_buf);
  free (img->meta_index);
  free (img->inflight);
  pthread_mutex_destroy (&img->inflight_lock);
  pthread_mutex_destroy (&img->fill_lock);
  pthread_cond_destroy (&img->inflight_cond);
  q2_crypto_free (img->crypto);
  pthread_mutex_destroy (&img->lock);
  pthread_rwlock_destroy (&img->io_lock);
  free (img);
}

int
q2_open (const char *path, const struct q2_open_opts *opts,
         struct q2_image **out)
{
  /* The top of the chain must be qcow2; only backing files may be raw.
   * Every layer opens read-only; a writable image then goes through
   * q2_make_writable, which refuses a corrupt image, repairs a dirty one
   * and arms the caches' write-back. */
  int r = q2_open_layer (path, "qcow2", opts, 0, NULL, out);

  if (r < 0 || opts->readonly)
    return r;
  if ((r = q2_make_writable (*out)) < 0) {
    q2_close (*out);            /* read-only: nothing to write back */
    *out = NULL;
  }
  return r;
}

/* Reopens a file read-write in place: dup2 keeps the descriptor number
 * that concurrent readers use. */
static int
reopen_rw (int fd, const char *path, const char *what)
{
  int nfd = open (path, O_RDWR | O_CLOEXEC);

  if (nfd == -1) {
    int e = errno;
    return q2_err (e, "%s: cannot open %s read-write: %s", what, path,
                   strerror (e));
  }
  if (dup2 (nfd, fd) == -1) {
    int e = errno;
    close (nfd);
    return q2_err (e, "%s: dup2: %s", what, strerror (e));
  }
  close (nfd);
  return 0;
}

int
q2_switch_to_rw (struct q2_image *img)
{
  bool data_file = img->data_fd != img->fd;
  uint64_t i;
  int r;

  if (!img->readonly)
    return 0;
  if (img->locking) {
    q2_unlock_image (img->fd);
    if (data_file)
      q2_unlock_image (img->data_fd);
  }
  /* The new file description has no locks yet.  On any failure, go back
   * to the shared locks of a reader: still serving the image read-only,
   * we must keep QEMU from writing it under us. */
  if ((r = reopen_rw (img->fd, img->path, "image")) < 0 ||
      (img->locking && (r = q2_lock_image (img->fd, img->path, true)) < 0) ||
      (data_file &&
       ((r = reopen_rw (img->data_fd, img->data_path,
                        "external data file")) < 0 ||
        (img->locking &&
         (r = q2_lock_image (img->data_fd, img->data_path, true)) < 0)))) {
    if (img->locking) {
      q2_lock_image (img->fd, img->path, false);
      if (data_file)
        q2_lock_image (img->data_fd, img->data_path, false);
    }
    return r;
  }
  img->reftable_used = 0;
  for (i = 0; i < img->reftable_entries; i++)
    if (img->reftable[i])
      img->reftable_used = i + 1;
  img->free_hint = 0;
  img->meta_stale = true;
  q2_cache_set_writeback (img->l2_cache, q2_l2_writeback, img);
  q2_cache_set_writeback (img->rb_cache, q2_rb_writeback, img);
  img->readonly = false;
  return 0;
}

bool
q2_same_file (int a, int b)
{
  struct stat sa, sb;

  return fstat (a, &sa) == 0 && fstat (b, &sb) == 0 &&
    sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino &&
    sa.st_rdev == sb.st_rdev;
}

/* Guest writes go to the data file unchecked (it holds no metadata), so
 * it must be neither the image nor a file the image reads from. */
static int
check_data_file_target (const struct q2_image *img)
{
  const struct q2_image *b;

  if (img->data_fd == img->fd)
    return 0;
  for (b = img; b; b = b->backing)
    if (q2_same_file (img->data_fd, b->fd) ||
        (b != img && q2_same_file (img->data_fd, b->data_fd)))
      return q2_err (EROFS, "%s: the external data file %s is %s itself; "
                     "the image is served read-only", img->path,
                     img->data_path, b == img ? "the image" :
                     "a backing file");
  return 0;
}

static int
make_writable_locked (struct q2_image *img)
{
  const struct q2_header *h = &img->hdr;
  int r;

  if (!img->readonly)
    return 0;
  if (h->crypt_method && img->crypto == NULL)
    return q2_err (EPERM, "%s: the image is encrypted and was opened "
                   "without its password", img->path);
  if (h->incompatible_features & QCOW2_INCOMPAT_CORRUPT)
    return q2_err (EROFS, "%s: the image is marked corrupt (incompatible "
                   "bit 1); it can only be served read-only until it is "
                   "repaired (qemu-img check -r all)", img->path);
  if ((r = q2_check_snapshots_usable (img)) < 0)
    return q2_err_prefix (r, "%s", img->path);
  if ((r = check_data_file_target (img)) < 0)
    return r;
  if ((r = q2_switch_to_rw (img)) < 0)
    return r;
  /* Refcounts of a dirty image may be stale: rebuild them from the
   * L1/L2 walk before anything trusts them, as QEMU does. */
  if (h->incompatible_features & QCOW2_INCOMPAT_DIRTY) {
    r = q2_rebuild_refcounts (img);
    if (r < 0) {
      img->readonly = true;
      return q2_err_prefix (r, "%s: could not repair the dirty image",
                            img->path);
    }
  }
  return 0;
}

int
q2_make_writable (struct q2_image *img)
{
  int r;

  if (img->fmt != Q2_FMT_QCOW2)
    return q2_err (EROFS, "only qcow2 images are writable");
  pthread_rwlock_wrlock (&img->io_lock);
  r = make_writable_locked (img);
  pthread_rwlock_unlock (&img->io_lock);
  return r;
}

int
q2_close (struct q2_image *img)
{
  int r = 0;

  if (img && img->fmt == Q2_FMT_QCOW2 && !img->readonly) {
    pthread_rwlock_wrlock (&img->io_lock);
    r = q2_flush_locked (img);
    pthread_rwlock_unlock (&img->io_lock);
  }
  q2_free_layer (img);
  return r;
}

uint64_t
q2_virtual_size (const struct q2_image *img)
{
  return img->virtual_size;
}

uint32_t
q2_cluster_size (const struct q2_image *img)
{
  return img->fmt == Q2_FMT_QCOW2 ? img->cluster_size : 512;
}

bool
q2_is_readonly (const struct q2_image *img)
{
  return img->readonly;
}

const char *
q2_encryption (const struct q2_image *img)
{
  return img->crypto ? q2_crypto_describe (img->crypto) : NULL;
}

const char *
q2_format_name (const struct q2_image *img)
{
  return img->fmt == Q2_FMT_QCOW2 ? "qcow2" : "raw";
}
