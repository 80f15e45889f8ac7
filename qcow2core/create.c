/* Creating a new qcow2 image the way 'qemu-img create' lays it out:
 * the header in cluster 0, then the refcount table, the refcount
 * blocks, the L1 table and, with preallocation, every L2 table and data
 * cluster.  Every cluster written is counted exactly once. */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define V2_HEADER_LEN 72
#define V3_HEADER_LEN 112
#define FEATURE_ENTRY_LEN 48
/* QEMU writes the feature name table only for clusters above 4 KiB. */
#define FEATURE_TABLE_MIN_CLUSTER 8192
#define ZERO_CHUNK (1u << 20)

struct layout {
  uint64_t cs;
  uint32_t cluster_bits;
  uint32_t l2_entry_size;
  uint64_t l1_size;              /* entries */
  uint64_t reftable_clusters, refblocks, l1_clusters;
  uint64_t l2_tables, data_clusters;
  uint64_t reftable_off, refblock_off, l1_off, l2_off, data_off;
  uint64_t total_clusters;       /* every cluster with refcount 1 */
};

void
q2_create_opts_init (struct q2_create_opts *o)
{
  memset (o, 0, sizeof *o);
  o->version = 3;
  o->cluster_size = 65536;
  o->refcount_bits = 16;
  o->preallocation = Q2_PREALLOC_OFF;
}

static bool
is_pow2 (uint64_t v)
{
  return v && (v & (v - 1)) == 0;
}

static uint32_t
log2_of (uint64_t v)
{
  uint32_t b = 0;

  while ((1ULL << b) < v)
    b++;
  return b;
}

/* The same refusals, with the same words, as qemu-img. */
static int
validate_opts (const struct q2_create_opts *o)
{
  if (o->version != 2 && o->version != 3)
    return q2_err (EINVAL, "compat: version %d is not supported (use 0.10 "
                   "or 1.1)", o->version);
  if (!is_pow2 (o->cluster_size) || o->cluster_size < 512 ||
      o->cluster_size > (2u << 20))
    return q2_err (EINVAL, "cluster_size: Cluster size must be a power of "
                   "two between 512 and 2048k");
  if (!is_pow2 (o->refcount_bits) || o->refcount_bits > 64)
    return q2_err (EINVAL, "refcount_bits: Refcount width must be a power of "
                   "two and may not exceed 64 bits");
  if (o->compression_type > 1)
    return q2_err (EINVAL, "compression_type: unknown compression type %u",
                   o->compression_type);
  if (o->version == 2) {
    if (o->refcount_bits != 16)
      return q2_err (EINVAL, "refcount_bits: Different refcount widths than "
                     "16 bits require compatibility level 1.1 or above "
                     "(use compat=1.1 or greater)");
    if (o->lazy_refcounts)
      return q2_err (EINVAL, "lazy_refcounts: Lazy refcounts only supported "
                     "with compatibility level 1.1 and above (use "
                     "compat=1.1 or greater)");
    if (o->extended_l2)
      return q2_err (EINVAL, "extended_l2: Extended L2 entries are only "
                     "supported with compatibility level 1.1 and above "
                     "(use compat=1.1 or greater)");
    if (o->compression_type != 0)
      return q2_err (EINVAL, "compression_type: Non-zlib compression type "
                     "is only supported with compatibility level 1.1 and "
                     "above (use compat=1.1 or greater)");
  }
  if (o->extended_l2 && o->cluster_size < 16384)
    return q2_err (EINVAL, "extended_l2: Extended L2 entries are only "
                   "supported with cluster sizes of at least 16384 bytes");
  if (o->compression_type == 1 && !q2_have_zstd ())
    return q2_err (ENOTSUP, "compression_type: zstd support is not compiled "
                   "in");
  if (o->backing_format && o->backing_file == NULL)
    return q2_err (EINVAL, "Backing format cannot be used without backing "
                   "file");
  if (o->backing_file && o->preallocation != Q2_PREALLOC_OFF &&
      !o->extended_l2)
    return q2_err (EINVAL, "Backing file and preallocation can only be used "
                   "at the same time if extended_l2 is on");
  if (o->backing_file && strlen (o->backing_file) > QCOW2_MAX_BACKING_NAME)
    return q2_err (EINVAL, "backing_file: the name is longer than %d bytes",
                   QCOW2_MAX_BACKING_NAME);
  if (o->backing_format && strlen (o->backing_format) > 15)
    return q2_err (EINVAL, "backing_fmt: '%s' is too long",
                   o->backing_format);
  return 0;
}

/* Opens the backing file as it will be found from the new image (a
 * relative name is relative to the new image's directory), to check it
 * and to learn its size and format. */
static int
probe_backing (const char *path, const struct q2_create_opts *o,
               uint64_t *size, const char **format)
{
  struct q2_open_opts opts = { .readonly = true };
  struct q2_image *b;
  char *tmp, *full;
  const char *dir;
  int r;

  tmp = strdup (path);
  if (tmp == NULL)
    return q2_err (ENOMEM, "out of memory");
  dir = dirname (tmp);
  if (o->backing_file[0] == '/')
    full = strdup (o->backing_file);
  else if (asprintf (&full, "%s/%s", dir, o->backing_file) == -1)
    full = NULL;
  free (tmp);
  if (full == NULL)
    return q2_err (ENOMEM, "out of memory");
  r = q2_open_layer (full, o->backing_format, &opts, 0, NULL, &b);
  free (full);
  if (r < 0)
    return q2_err_prefix (r, "Could not open backing image '%s'",
                          o->backing_file);
  *size = b->virtual_size;
  *format = b->fmt == Q2_FMT_RAW ? "raw" : "qcow2";
  q2_free_layer (b);
  return 0;
}

static uint64_t
div_up (uint64_t a, uint64_t b)
{
  return (a + b - 1) / b;
}

/* Sizes every structure; the refcount blocks must cover themselves and
 * the refcount table, so iterate to a fixed point. */
static int
compute_layout (uint64_t size, const struct q2_create_opts *o,
                struct layout *l)
{
  uint64_t per_l2, per_refblock, prev;
  bool prealloc = o->preallocation != Q2_PREALLOC_OFF;

  memset (l, 0, sizeof *l);
  l->cs = o->cluster_size;
  l->cluster_bits = log2_of (o->cluster_size);
  l->l2_entry_size = o->extended_l2 ? 16 : 8;
  per_l2 = l->cs / l->l2_entry_size;
  l->l1_size = div_up (size, l->cs * per_l2);
  if (l->l1_size > QCOW2_MAX_L1_BYTES / 8)
    return q2_err (EFBIG, "size: %llu bytes needs an L1 table of %llu "
                   "entries, more than the %u QEMU allows",
                   (unsigned long long) size,
                   (unsigned long long) l->l1_size,
                   QCOW2_MAX_L1_BYTES / 8);
  l->l1_clusters = div_up (l->l1_size * 8, l->cs);
  if (prealloc) {
    l->l2_tables = l->l1_size;
    l->data_clusters = div_up (size, l->cs);
  }
  per_refblock = l->cs * 8 / o->refcount_bits;
  l->refblocks = 1;
  l->reftable_clusters = 1;
  do {
    prev = l->refblocks + l->reftable_clusters;
    l->total_clusters = 1 + l->reftable_clusters + l->refblocks +
      l->l1_clusters + l->l2_tables + l->data_clusters;
    l->refblocks = div_up (l->total_clusters, per_refblock);
    l->reftable_clusters = div_up (l->refblocks * 8, l->cs);
  } while (l->refblocks + l->reftable_clusters != prev);
  l->total_clusters = 1 + l->reftable_clusters + l->refblocks +
    l->l1_clusters + l->l2_tables + l->data_clusters;

  if (l->reftable_clusters * l->cs > QCOW2_MAX_REFTABLE_BYTES)
    return q2_err (EFBIG, "size: the refcount table for %llu clusters would "
                   "exceed %u bytes", (unsigned long long) l->total_clusters,
                   QCOW2_MAX_REFTABLE_BYTES);
  if (l->total_clusters > (QCOW2_MAX_HOST_OFFSET + 1) / l->cs)
    return q2_err (EFBIG, "size: the image would need host offsets past "
                   "64 PiB");

  l->reftable_off = l->cs;
  l->refblock_off = l->reftable_off + l->reftable_clusters * l->cs;
  l->l1_off = l->refblock_off + l->refblocks * l->cs;
  l->l2_off = l->l1_off + l->l1_clusters * l->cs;
  l->data_off = l->l2_off + l->l2_tables * l->cs;
  return 0;
}

/* Appends a header extension at *pos; fails if it does not fit in end. */
static int
add_extension (uint8_t *buf, size_t *pos, size_t end, uint32_t type,
               const void *data, uint32_t len)
{
  size_t need = 8 + Q2_ROUND_UP ((uint64_t) len, 8);

  if (*pos + need > end)
    return q2_err (ENOSPC, "header extension %#x does not fit in the first "
                   "cluster", type);
  q2_put_be32 (buf + *pos, type);
  q2_put_be32 (buf + *pos + 4, len);
  if (len)
    memcpy (buf + *pos + 8, data, len);
  *pos += need;
  return 0;
}

static const struct {
  uint8_t type, bit;
  const char *name;
} feature_names[] = {
  { 0, 0, "dirty bit" },
  { 0, 1, "corrupt bit" },
  { 0, 2, "external data file" },
  { 0, 3, "compression type" },
  { 0, 4, "extended L2 entries" },
  { 1, 0, "lazy refcounts" },
  { 2, 0, "bitmaps" },
  { 2, 1, "raw external data" },
};
#define NB_FEATURE_NAMES (sizeof feature_names / sizeof feature_names[0])

static int
build_header (uint8_t *buf, uint64_t size, const struct q2_create_opts *o,
              const char *backing_format, const struct layout *l)
{
  size_t pos, cs = l->cs;
  uint64_t incompat = 0;
  int r;

  q2_put_be32 (buf, QCOW2_MAGIC);
  q2_put_be32 (buf + 4, o->version);
  q2_put_be32 (buf + 20, l->cluster_bits);
  q2_put_be64 (buf + 24, size);
  q2_put_be32 (buf + 36, l->l1_size);
  q2_put_be64 (buf + 40, l->l1_size ? l->l1_off : 0);
  q2_put_be64 (buf + 48, l->reftable_off);
  q2_put_be32 (buf + 56, l->reftable_clusters);
  if (o->version == 2)
    pos = V2_HEADER_LEN;
  else {
    if (o->extended_l2)
      incompat |= QCOW2_INCOMPAT_EXTL2;
    if (o->compression_type)
      incompat |= QCOW2_INCOMPAT_COMPRESSION;
    q2_put_be64 (buf + 72, incompat);
    q2_put_be64 (buf + 80, o->lazy_refcounts ? QCOW2_COMPAT_LAZY_REFCOUNTS
                 : 0);
    q2_put_be32 (buf + 96, log2_of (o->refcount_bits));
    q2_put_be32 (buf + 100, V3_HEADER_LEN);
    buf[104] = o->compression_type;
    pos = V3_HEADER_LEN;
  }

  if (backing_format &&
      (r = add_extension (buf, &pos, cs, QCOW2_EXT_BACKING_FORMAT,
                          backing_format, strlen (backing_format))) < 0)
    return r;
  if (o->version >= 3 && cs >= FEATURE_TABLE_MIN_CLUSTER) {
    uint8_t table[NB_FEATURE_NAMES * FEATURE_ENTRY_LEN];
    size_t i;
    memset (table, 0, sizeof table);
    for (i = 0; i < NB_FEATURE_NAMES; i++) {
      uint8_t *e = table + i * FEATURE_ENTRY_LEN;
      e[0] = feature_names[i].type;
      e[1] = feature_names[i].bit;
      memcpy (e + 2, feature_names[i].name, strlen (feature_names[i].name));
    }
    if ((r = add_extension (buf, &pos, cs, QCOW2_EXT_FEATURE_TABLE, table,
                            sizeof table)) < 0)
      return r;
  }
  if ((r = add_extension (buf, &pos, cs, QCOW2_EXT_END, NULL, 0)) < 0)
    return r;

  if (o->backing_file) {
    size_t len = strlen (o->backing_file);
    if (pos + len > cs)
      return q2_err (ENOSPC, "backing_file: the name (%zu bytes) does not "
                     "fit in the first cluster after the header "
                     "extensions", len);
    memcpy (buf + pos, o->backing_file, len);
    q2_put_be64 (buf + 8, pos);
    q2_put_be32 (buf + 16, len);
  }
  return 0;
}

static void
set_refcount_one (uint8_t *block, uint32_t bits, uint64_t i)
{
  switch (bits) {
  case 1: case 2: case 4:
    block[i * bits / 8] |= 1u << ((i % (8 / bits)) * bits);
    break;
  case 8: block[i] = 1; break;
  case 16: q2_put_be16 (block + i * 2, 1); break;
  case 32: q2_put_be32 (block + i * 4, 1); break;
  default: q2_put_be64 (block + i * 8, 1); break;
  }
}

static int
write_refcounts (int fd, const struct layout *l, uint32_t bits, uint8_t *buf)
{
  uint64_t per_block = l->cs * 8 / bits, b, i;
  int r;

  for (b = 0; b < l->reftable_clusters * l->cs / 8; b++) {
    uint64_t i_in = b % (l->cs / 8);
    if (i_in == 0)
      memset (buf, 0, l->cs);
    if (b < l->refblocks)
      q2_put_be64 (buf + i_in * 8, l->refblock_off + b * l->cs);
    if (i_in == l->cs / 8 - 1 &&
        (r = q2_io_pwrite (fd, buf, l->cs,
                           l->reftable_off + (b / (l->cs / 8)) * l->cs,
                           "refcount table")) < 0)
      return r;
  }
  for (b = 0; b < l->refblocks; b++) {
    memset (buf, 0, l->cs);
    for (i = 0; i < per_block && b * per_block + i < l->total_clusters; i++)
      set_refcount_one (buf, bits, i);
    if ((r = q2_io_pwrite (fd, buf, l->cs, l->refblock_off + b * l->cs,
                           "refcount block")) < 0)
      return r;
  }
  return 0;
}

/* The L1 table, and with preallocation every L2 table, pointing at
 * consecutive data clusters, all with refcount 1 (COPIED). */
static int
write_tables (int fd, const struct layout *l, uint64_t size, uint8_t *buf)
{
  uint64_t per_l2 = l->cs / l->l2_entry_size;
  uint64_t data_clusters = div_up (size, l->cs);
  uint64_t i, j, bytes = l->l1_size * 8;
  uint8_t *l1;
  int r;

  if (l->l1_size == 0)
    return 0;
  l1 = calloc (1, bytes);
  if (l1 == NULL)
    return q2_err (ENOMEM, "out of memory for the L1 table");
  for (i = 0; i < l->l2_tables; i++)
    q2_put_be64 (l1 + i * 8, QCOW_OFLAG_COPIED | (l->l2_off + i * l->cs));
  r = q2_io_pwrite (fd, l1, bytes, l->l1_off, "L1 table");
  free (l1);
  if (r < 0)
    return r;

  for (i = 0; i < l->l2_tables; i++) {
    memset (buf, 0, l->cs);
    for (j = 0; j < per_l2 && i * per_l2 + j < data_clusters; j++) {
      uint64_t host = l->data_off + (i * per_l2 + j) * l->cs;
      /* Extended L2: allocated, every subcluster still unallocated
       * (reads from the backing file or as zeros), as QEMU does. */
      q2_put_be64 (buf + j * l->l2_entry_size, QCOW_OFLAG_COPIED | host);
    }
    if ((r = q2_io_pwrite (fd, buf, l->cs, l->l2_off + i * l->cs,
                           "L2 table")) < 0)
      return r;
  }
  return 0;
}

static int
preallocate_data (int fd, const struct layout *l, enum q2_prealloc mode)
{
  uint64_t start = l->data_off, len = l->data_clusters * l->cs, done;
  uint8_t *zeros;
  int r;

  if (ftruncate (fd, start + len) == -1) {
    int e = errno;
    return q2_err (e, "extending the image to %llu bytes: %s",
                   (unsigned long long) (start + len), strerror (e));
  }
  if (mode == Q2_PREALLOC_FALLOC && len) {
    r = posix_fallocate (fd, start, len);
    if (r != 0)
      return q2_err (r, "preallocation=falloc: posix_fallocate of %llu "
                     "bytes at %#llx: %s", (unsigned long long) len,
                     (unsigned long long) start, strerror (r));
  }
  if (mode == Q2_PREALLOC_FULL) {
    zeros = calloc (1, ZERO_CHUNK);
    if (zeros == NULL)
      return q2_err (ENOMEM, "out of memory");
    for (done = 0; done < len; done += ZERO_CHUNK) {
      r = q2_io_pwrite (fd, zeros, Q2_MIN (ZERO_CHUNK, len - done),
                        start + done, "preallocated data");
      if (r < 0) {
        free (zeros);
        return r;
      }
    }
    free (zeros);
  }
  return 0;
}

int
q2_create (const char *path, uint64_t size, const struct q2_create_opts *o)
{
  const char *backing_format = o->backing_format;
  struct layout l;
  uint8_t *buf = NULL;
  uint64_t backing_size = UINT64_MAX, end;
  int fd, r;

  if ((r = validate_opts (o)) < 0)
    return q2_err_prefix (r, "%s", path);
  if (o->backing_file && !o->unsafe) {
    const char *detected = NULL;
    if ((r = probe_backing (path, o, &backing_size, &detected)) < 0)
      return q2_err_prefix (r, "%s", path);
    if (backing_format == NULL)
      backing_format = detected;
  }
  if (size == UINT64_MAX) {
    if (backing_size == UINT64_MAX)
      return q2_err (EINVAL, "%s: size: an image size is required (it can "
                     "only be taken from a backing file that is checked)",
                     path);
    size = backing_size;
  }
  if (size > UINT64_MAX - 511)
    return q2_err (EFBIG, "%s: size %llu is too large", path,
                   (unsigned long long) size);
  size = Q2_ROUND_UP (size, 512);
  if ((r = compute_layout (size, o, &l)) < 0)
    return q2_err_prefix (r, "%s", path);

  buf = calloc (1, l.cs);
  if (buf == NULL)
    return q2_err (ENOMEM, "out of memory");
  if ((r = build_header (buf, size, o, backing_format, &l)) < 0) {
    free (buf);
    return q2_err_prefix (r, "%s", path);
  }

  fd = open (path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd == -1) {
    int e = errno;
    free (buf);
    return q2_err (e, "%s: %s", path, strerror (e));
  }
  r = q2_io_pwrite (fd, buf, l.cs, 0, "qcow2 header");
  if (r == 0)
    r = write_refcounts (fd, &l, o->refcount_bits, buf);
  if (r == 0)
    r = write_tables (fd, &l, size, buf);
  if (r == 0 && o->preallocation != Q2_PREALLOC_OFF)
    r = preallocate_data (fd, &l, o->preallocation);
  else if (r == 0) {
    /* Like QEMU: the file ends with the L1 table (or the refcount
     * blocks for an empty image). */
    end = l.l1_size ? l.l1_off + l.l1_size * 8 : l.l1_off;
    if (ftruncate (fd, end) == -1) {
      int e = errno;
      r = q2_err (e, "truncating to %llu bytes: %s",
                  (unsigned long long) end, strerror (e));
    }
  }
  if (r == 0 && fsync (fd) == -1) {
    int e = errno;
    r = q2_err (e, "fsync: %s", strerror (e));
  }
  if (close (fd) == -1 && r == 0) {
    int e = errno;
    r = q2_err (e, "close: %s", strerror (e));
  }
  free (buf);
  if (r < 0)
    return q2_err_prefix (r, "%s", path);
  return 0;
}
