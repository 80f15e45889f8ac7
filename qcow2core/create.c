/* Creating a new qcow2 image the way 'qemu-img create' lays it out:
 * the header in cluster 0, then the refcount table, the refcount
 * blocks, the L1 table, for LUKS encryption the LUKS area and, with
 * preallocation, every L2 table and data cluster.  Every cluster
 * written is counted exactly once. */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <linux/fs.h>
#include <nettle/pbkdf2.h>

#include "crypto.h"
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
  uint64_t luks_clusters;        /* the LUKS area, 0 if none */
  uint64_t reftable_off, refblock_off, l1_off, luks_off, l2_off, data_off;
  uint64_t guest_base;           /* host offset of guest cluster 0 */
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
  if (o->data_file_raw && o->data_file == NULL)
    return q2_err (EINVAL, "data-file-raw requires data-file");
  if (o->data_file && o->version == 2)
    return q2_err (EINVAL, "External data files are only supported with "
                   "compatibility level 1.1 and above (use version=v3 or "
                   "greater)");
  if (o->data_file_raw && o->backing_file)
    return q2_err (EINVAL, "Backing file and data-file-raw cannot be used "
                   "at the same time");
  if (o->data_file && o->data_file[0] == '\0')
    return q2_err (EINVAL, "data_file: the name is empty");
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
/* A file name stored in the new image at path, as it will be found
 * from the image: relative to the image's directory. */
static char *
near_image (const char *path, const char *name)
{
  char *tmp = strdup (path), *full;

  if (tmp == NULL)
    return NULL;
  full = q2_resolve_name (dirname (tmp), name);
  free (tmp);
  return full;
}

static int
probe_backing (const char *path, const struct q2_create_opts *o,
               uint64_t *size, const char **format)
{
  /* Size and format only: an encrypted backing file needs no key. */
  struct q2_open_opts opts = { .readonly = true, .no_key = true };
  struct q2_image *b;
  char *full;
  int r;

  full = near_image (path, o->backing_file);
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
                size_t luks_len, struct layout *l)
{
  uint64_t per_l2, per_refblock, prev;
  bool prealloc = o->preallocation != Q2_PREALLOC_OFF;

  memset (l, 0, sizeof *l);
  l->cs = o->cluster_size;
  l->luks_clusters = div_up (luks_len, o->cluster_size);
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
    /* Data in an external file needs no clusters of the image. */
    l->data_clusters = o->data_file ? 0 : div_up (size, l->cs);
  }
  per_refblock = l->cs * 8 / o->refcount_bits;
  l->refblocks = 1;
  l->reftable_clusters = 1;
  do {
    prev = l->refblocks + l->reftable_clusters;
    l->total_clusters = 1 + l->reftable_clusters + l->refblocks +
      l->l1_clusters + l->luks_clusters + l->l2_tables + l->data_clusters;
    l->refblocks = div_up (l->total_clusters, per_refblock);
    l->reftable_clusters = div_up (l->refblocks * 8, l->cs);
  } while (l->refblocks + l->reftable_clusters != prev);
  l->total_clusters = 1 + l->reftable_clusters + l->refblocks +
    l->l1_clusters + l->luks_clusters + l->l2_tables + l->data_clusters;

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
  l->luks_off = l->l1_off + l->l1_clusters * l->cs;
  l->l2_off = l->luks_off + l->luks_clusters * l->cs;
  l->data_off = l->l2_off + l->l2_tables * l->cs;
  l->guest_base = o->data_file ? 0 : l->data_off;
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
              const char *backing_format, const struct layout *l,
              uint64_t luks_len)
{
  size_t pos, cs = l->cs;
  uint64_t incompat = 0;
  int r;

  q2_put_be32 (buf, QCOW2_MAGIC);
  q2_put_be32 (buf + 4, o->version);
  q2_put_be32 (buf + 20, l->cluster_bits);
  q2_put_be64 (buf + 24, size);
  q2_put_be32 (buf + 32, o->encrypt_format);
  q2_put_be32 (buf + 36, l->l1_size);
  q2_put_be64 (buf + 40, l->l1_size ? l->l1_off : 0);
  q2_put_be64 (buf + 48, l->reftable_off);
  q2_put_be32 (buf + 56, l->reftable_clusters);
  if (o->data_file)
    incompat |= QCOW2_INCOMPAT_DATA_FILE;
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
    q2_put_be64 (buf + 88, o->data_file_raw ? QCOW2_AUTOCLEAR_DATA_FILE_RAW
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
  if (o->data_file &&
      (r = add_extension (buf, &pos, cs, QCOW2_EXT_DATA_FILE, o->data_file,
                          strlen (o->data_file))) < 0)
    return r;
  if (o->encrypt_format == Q2_ENCRYPT_LUKS) {
    uint8_t fde[16];
    q2_put_be64 (fde, l->luks_off);
    q2_put_be64 (fde + 8, luks_len);
    if ((r = add_extension (buf, &pos, cs, QCOW2_EXT_CRYPTO, fde,
                            sizeof fde)) < 0)
      return r;
  }
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
      uint64_t host = l->guest_base + (i * per_l2 + j) * l->cs;
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

static bool
is_block_device (int fd)
{
  struct stat st;

  return fstat (fd, &st) == 0 && S_ISBLK (st.st_mode);
}

/* Sizes a regular file; a block device (as qemu-img's host_device) keeps
 * its size, which must be enough. */
static int
truncate_file (int fd, uint64_t size, const char *what)
{
  if (is_block_device (fd)) {
    off_t end = lseek (fd, 0, SEEK_END);
    if (end == -1) {
      int e = errno;
      return q2_err (e, "%s: cannot get the device size: %s", what,
                     strerror (e));
    }
    if ((uint64_t) end < size)
      return q2_err (ENOSPC, "%s: the device has %llu bytes, %llu are "
                     "needed", what, (unsigned long long) end,
                     (unsigned long long) size);
    return 0;
  }
  if (ftruncate (fd, size) == -1) {
    int e = errno;
    return q2_err (e, "truncating %s to %llu bytes: %s", what,
                   (unsigned long long) size, strerror (e));
  }
  return 0;
}

/* Sizes the file to end with the data clusters [start, start+len) and
 * preallocates them.  With encryption, preallocation=full writes
 * encrypted zeros: the clusters are allocated, so they must decrypt to
 * zeros. */
static int
preallocate_data (int fd, uint64_t start, uint64_t len, const char *what,
                  enum q2_prealloc mode, const struct q2_crypto *crypto)
{
  uint64_t done;
  uint8_t *zeros;
  int r;

  if ((r = truncate_file (fd, start + len, what)) < 0)
    return r;
  /* A device's blocks exist already. */
  if (mode == Q2_PREALLOC_FALLOC && len && !is_block_device (fd)) {
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
      size_t n = Q2_MIN (ZERO_CHUNK, len - done);
      if (crypto) {
        /* LUKS IVs count host sectors, legacy AES guest sectors; the
         * data clusters are in guest order from start. */
        uint64_t sector = (q2_crypto_method (crypto) == 1 ? done
                           : start + done) / Q2_CRYPTO_SECTOR_SIZE;
        memset (zeros, 0, n);
        r = q2_crypto_encrypt (crypto, sector, zeros, n);
        if (r < 0) {
          free (zeros);
          return r;
        }
      }
      r = q2_io_pwrite (fd, zeros, n, start + done, what);
      if (r < 0) {
        free (zeros);
        return r;
      }
    }
    free (zeros);
  }
  return 0;
}

/* ---- encryption ---- */

#define DEFAULT_ITER_TIME_MS 2000
/* QEMU's floor for key slot iterations. */
#define MIN_SLOT_ITERS 1000

static const char *const luks_hashes[] = { "md5", "sha1", "sha224", "sha256",
                                           "sha384", "sha512", "ripemd160" };

static bool
is_one_of (const char *v, const char *const *list, size_t n)
{
  size_t i;

  for (i = 0; i < n; i++)
    if (strcmp (v, list[i]) == 0)
      return true;
  return false;
}

/* The refusals of qemu-img for the encrypt.* options, plus what the
 * engine cannot do (QEMU's other ciphers, hashes and modes). */
static int
validate_encrypt (const struct q2_create_opts *o)
{
  static const char *const algs[] = {
    "aes-128", "aes-192", "aes-256", "serpent-128", "serpent-192",
    "serpent-256", "twofish-128", "twofish-192", "twofish-256", "cast5-128"
  };
  static const char *const modes[] = { "xts", "cbc", "ecb", "ctr" };
  static const char *const ivgens[] = { "plain64", "plain", "essiv" };
  bool luks_params = o->cipher_alg || o->cipher_mode || o->ivgen_alg ||
    o->ivgen_hash_alg || o->hash_alg || o->iter_time_ms || o->iterations;

  if (o->encrypt_format == Q2_ENCRYPT_NONE) {
    if (luks_params || o->password)
      return q2_err (EINVAL, "Parameter 'encrypt.format' is missing");
    return 0;
  }
  if (o->encrypt_format != Q2_ENCRYPT_AES &&
      o->encrypt_format != Q2_ENCRYPT_LUKS)
    return q2_err (EINVAL, "Parameter 'format' does not accept value %d",
                   o->encrypt_format);
  if (o->password == NULL)
    return q2_err (EINVAL, "Parameter 'encrypt.key-secret' is required for "
                   "cipher");
  if (o->encrypt_format == Q2_ENCRYPT_AES) {
    if (o->cipher_alg)
      return q2_err (EINVAL, "Parameter 'encrypt.cipher-alg' is unexpected");
    if (o->cipher_mode)
      return q2_err (EINVAL, "Parameter 'encrypt.cipher-mode' is "
                     "unexpected");
    if (o->ivgen_alg)
      return q2_err (EINVAL, "Parameter 'encrypt.ivgen-alg' is unexpected");
    if (o->ivgen_hash_alg)
      return q2_err (EINVAL, "Parameter 'encrypt.ivgen-hash-alg' is "
                     "unexpected");
    if (o->hash_alg)
      return q2_err (EINVAL, "Parameter 'encrypt.hash-alg' is unexpected");
    if (o->iter_time_ms || o->iterations)
      return q2_err (EINVAL, "Parameter 'encrypt.iter-time' is unexpected");
  }
  else {
    if (o->cipher_alg && !is_one_of (o->cipher_alg, algs, 10))
      return q2_err (ENOTSUP, "encrypt.cipher-alg: '%s' is not supported "
                     "(aes-, serpent-, twofish-128/192/256 or cast5-128)",
                     o->cipher_alg);
    if (o->cipher_mode && !is_one_of (o->cipher_mode, modes, 4))
      return q2_err (ENOTSUP, "encrypt.cipher-mode: '%s' is not supported "
                     "(xts, cbc, ecb or ctr)", o->cipher_mode);
    /* QEMU's refusals: XTS needs 16-byte blocks, ESSIV a cipher of the
     * family keyed by the digest. */
    if (o->cipher_alg && strcmp (o->cipher_alg, "cast5-128") == 0 &&
        (o->cipher_mode == NULL || strcmp (o->cipher_mode, "xts") == 0))
      return q2_err (ENOTSUP, "Unsupported cipher mode xts");
    if (o->cipher_alg && strcmp (o->cipher_alg, "cast5-128") == 0 &&
        o->ivgen_alg && strcmp (o->ivgen_alg, "essiv") == 0)
      return q2_err (ENOTSUP, "Cipher cast5-128 not supported with essiv");
    if (o->ivgen_alg && !is_one_of (o->ivgen_alg, ivgens, 3))
      return q2_err (ENOTSUP, "encrypt.ivgen-alg: '%s' is not supported "
                     "(plain64, plain or essiv)", o->ivgen_alg);
    if (o->hash_alg && !is_one_of (o->hash_alg, luks_hashes, 7))
      return q2_err (ENOTSUP, "encrypt.hash-alg: '%s' is not supported "
                     "(md5, sha1, sha224, sha256, sha384, sha512 or "
                     "ripemd160)", o->hash_alg);
    if (o->ivgen_hash_alg && !is_one_of (o->ivgen_hash_alg, luks_hashes, 7))
      return q2_err (ENOTSUP, "encrypt.ivgen-hash-alg: '%s' is not "
                     "supported", o->ivgen_hash_alg);
    /* ESSIV keys the cipher with the digest: only md5 (16 bytes) and
     * sha256 (32) fit. */
    if (o->ivgen_alg && strcmp (o->ivgen_alg, "essiv") == 0 &&
        o->ivgen_hash_alg && strcmp (o->ivgen_hash_alg, "sha256") != 0 &&
        strcmp (o->ivgen_hash_alg, "md5") != 0)
      return q2_err (ENOTSUP, "No AES cipher with key size %d available",
                     strcmp (o->ivgen_hash_alg, "sha224") == 0 ? 28 :
                     strcmp (o->ivgen_hash_alg, "sha384") == 0 ? 48 :
                     strcmp (o->ivgen_hash_alg, "sha512") == 0 ? 64 : 20);
    if (o->cipher_alg && strstr (o->cipher_alg, "-192") &&
        o->cipher_mode && strcmp (o->cipher_mode, "xts") != 0)
      return q2_err (ENOTSUP, "encrypt.cipher-alg: %s with %s is not "
                     "supported (its key material is not a whole number "
                     "of sectors; QEMU 7.2 aborts on it)", o->cipher_alg,
                     o->cipher_mode);
  }
  /* Preallocated clusters are data: QEMU leaves them as plain zeros,
   * which decrypt to garbage.  Only 'full' can write encrypted zeros. */
  if (o->preallocation == Q2_PREALLOC_METADATA ||
      o->preallocation == Q2_PREALLOC_FALLOC)
    return q2_err (ENOTSUP, "preallocation=%s cannot be used with "
                   "encryption (the preallocated clusters would read as "
                   "garbage); use preallocation=full or off",
                   o->preallocation == Q2_PREALLOC_METADATA ? "metadata"
                   : "falloc");
  return 0;
}

static double
now_seconds (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void
run_pbkdf2 (const char *hash, unsigned iters)
{
  static const uint8_t salt[32];
  uint8_t out[32];

  if (strcmp (hash, "sha1") == 0)
    pbkdf2_hmac_sha1 (8, (const uint8_t *) "password", iters, sizeof salt,
                      salt, sizeof out, out);
  else if (strcmp (hash, "sha384") == 0)
    pbkdf2_hmac_sha384 (8, (const uint8_t *) "password", iters, sizeof salt,
                        salt, sizeof out, out);
  else if (strcmp (hash, "sha512") == 0)
    pbkdf2_hmac_sha512 (8, (const uint8_t *) "password", iters, sizeof salt,
                        salt, sizeof out, out);
  else
    pbkdf2_hmac_sha256 (8, (const uint8_t *) "password", iters, sizeof salt,
                        salt, sizeof out, out);
}

/* PBKDF2 iterations that take about ms milliseconds here, as QEMU's
 * encrypt.iter-time does; at least MIN_SLOT_ITERS. */
static uint32_t
iterations_for_time (const char *hash, uint32_t ms)
{
  unsigned iters = 1000;
  double t0, dt, want;

  for (;;) {
    t0 = now_seconds ();
    run_pbkdf2 (hash, iters);
    dt = now_seconds () - t0;
    if (dt >= 0.05 || iters >= (1u << 28))
      break;
    iters *= 4;
  }
  if (dt <= 0)
    dt = 1e-6;
  want = (double) iters / dt * ms / 1000.0;
  if (want > UINT32_MAX)
    want = UINT32_MAX;
  return want < MIN_SLOT_ITERS ? MIN_SLOT_ITERS : (uint32_t) want;
}

/* Builds the LUKS area, or the legacy AES context (only needed to write
 * encrypted zeros). */
static int
setup_encrypt (const struct q2_create_opts *o, uint8_t **luks,
               size_t *luks_len, struct q2_crypto **crypto)
{
  const char *ivgen = o->ivgen_alg;
  uint32_t iters = o->iterations;

  if (o->encrypt_format == Q2_ENCRYPT_NONE)
    return 0;
  if (o->encrypt_format == Q2_ENCRYPT_AES)
    return q2_crypto_open_aes (o->password, crypto);
  if (iters == 0)
    iters = iterations_for_time (o->hash_alg ? o->hash_alg : "sha256",
                                 o->iter_time_ms ? o->iter_time_ms
                                 : DEFAULT_ITER_TIME_MS);
  /* The ESSIV hash is always sha256 here; with plain IVs QEMU would
   * append ':HASH' to the mode, which means nothing, so it is left out. */
  if (ivgen && strcmp (ivgen, "essiv") == 0)
    ivgen = "essiv:sha256";
  return q2_crypto_create_luks (o->cipher_alg, o->cipher_mode, ivgen,
                                o->hash_alg, o->password, iters, luks,
                                luks_len, crypto);
}

/* ---- reading the encryption parameters for display ---- */


static int
copy_field (char *dst, size_t dst_len, const uint8_t *src, size_t len,
            const char *what)
{
  size_t n = strnlen ((const char *) src, len);

  if (n == len || n >= dst_len)
    return q2_err (EINVAL, "LUKS header: %s is not terminated", what);
  memcpy (dst, src, n);
  dst[n] = '\0';
  return 0;
}

int
q2_encrypt_info_get (const struct q2_image *img, struct q2_encrypt_info *info)
{
  const struct q2_header *h = &img->hdr;
  uint8_t p[Q2_LUKS_PHDR_SIZE];
  char name[LH_FIELD_LEN + 1], mode[LH_FIELD_LEN + 1], *dash, *colon;
  uint32_t key_bytes;
  int i, r;

  memset (info, 0, sizeof *info);
  if (img->fmt != Q2_FMT_QCOW2 || h->crypt_method == 0)
    return 0;
  info->format = h->crypt_method;
  if (h->crypt_method != Q2_ENCRYPT_LUKS)
    return 0;
  info->area_offset = h->crypto_offset;
  info->area_length = h->crypto_length;
  if (h->crypto_length < Q2_LUKS_PHDR_SIZE)
    return q2_err (EINVAL, "the LUKS header is only %llu bytes long",
                   (unsigned long long) h->crypto_length);
  r = q2_io_pread (img->fd, p, sizeof p, h->crypto_offset, false,
                   "LUKS header");
  if (r < 0)
    return r;
  if (memcmp (p, LUKS_MAGIC, 6) != 0)
    return q2_err (EINVAL, "Volume is not in LUKS format (bad magic)");
  if (q2_be16 (p + 6) != 1)
    return q2_err (ENOTSUP, "LUKS version %u is not supported",
                   q2_be16 (p + 6));
  if ((r = copy_field (name, sizeof name, p + LH_CIPHER_NAME, LH_FIELD_LEN,
                       "cipher_name")) < 0 ||
      (r = copy_field (mode, sizeof mode, p + LH_CIPHER_MODE, LH_FIELD_LEN,
                       "cipher_mode")) < 0 ||
      (r = copy_field (info->hash_alg, sizeof info->hash_alg,
                       p + LH_HASH_SPEC, LH_FIELD_LEN, "hash_spec")) < 0 ||
      (r = copy_field (info->uuid, sizeof info->uuid, p + LH_UUID,
                       LH_UUID_LEN, "uuid")) < 0)
    return r;
  key_bytes = q2_be32 (p + LH_KEY_BYTES);
  /* "aes" + cipher_mode "xts-plain64" + key_bytes 64 = aes-256, xts,
   * plain64 (QEMU's names). */
  dash = strchr (mode, '-');
  if (dash)
    *dash = '\0';
  snprintf (info->cipher_mode, sizeof info->cipher_mode, "%s", mode);
  if (dash) {
    colon = strchr (dash + 1, ':');
    if (colon) {
      *colon = '\0';
      snprintf (info->ivgen_hash_alg, sizeof info->ivgen_hash_alg, "%s",
                colon + 1);
    }
    snprintf (info->ivgen_alg, sizeof info->ivgen_alg, "%s", dash + 1);
  }
  if (strcmp (info->cipher_mode, "xts") == 0)
    key_bytes /= 2;
  snprintf (info->cipher_alg, sizeof info->cipher_alg, "%s-%u", name,
            key_bytes * 8);
  info->payload_offset = (uint64_t) q2_be32 (p + LH_PAYLOAD_OFFSET) * 512;
  info->master_key_iters = q2_be32 (p + LH_MK_DIGEST_ITER);
  for (i = 0; i < Q2_LUKS_NUM_SLOTS; i++) {
    const uint8_t *s = p + LH_SLOTS + i * LS_SIZE;
    info->slots[i].active = q2_be32 (s) == LUKS_SLOT_ENABLED;
    info->slots[i].iters = q2_be32 (s + 4);
    info->slots[i].key_offset = (uint64_t) q2_be32 (s + 40) * 512;
    info->slots[i].stripes = q2_be32 (s + 44);
  }
  return 0;
}

/* The files a new image is made of. */
struct new_files {
  int fd, dfd;                  /* the image, the external data file */
  char *dpath;                  /* the data file's path, or NULL */
  /* Made by us: removed if creation fails (so is a regular file that
   * existed, once truncated; never a device). */
  bool created, dcreated;
};

/* Opens (creating, not yet truncating) a file of the new image: a
 * regular file or a block device. */
static int
open_new_file (const char *path, bool nocow, int *fd, bool *created)
{
  struct stat st;
  int attr;

  /* Read access too: the lock bytes are read locks. */
  *fd = open (path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  *created = *fd >= 0;
  if (*fd == -1 && errno == EEXIST) {
    *fd = open (path, O_RDWR | O_CLOEXEC | O_NONBLOCK);
    /* A dangling symbolic link: create its target. */
    if (*fd == -1 && errno == ENOENT)
      *fd = open (path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  }
  if (*fd == -1) {
    int e = errno;
    return q2_err (e, "Could not create '%s': %s", path, strerror (e));
  }
  if (fstat (*fd, &st) == -1 || (!S_ISREG (st.st_mode) &&
                                 !S_ISBLK (st.st_mode))) {
    close (*fd);
    *fd = -1;
    return q2_err (EINVAL, "'%s' is not a regular file or a block device",
                   path);
  }
  /* As QEMU: on btrfs, no copy-on-write of the file's extents; a file
   * system without the flag just keeps it unset. */
  if (nocow && ioctl (*fd, FS_IOC_GETFLAGS, &attr) == 0) {
    attr |= FS_NOCOW_FL;
    ioctl (*fd, FS_IOC_SETFLAGS, &attr);
  }
  return 0;
}

/* Closes the files after a failure, removing what we made. */
static void
close_new_files (struct new_files *nf, const char *path)
{
  if (nf->fd >= 0)
    close (nf->fd);
  if (nf->dfd >= 0)
    close (nf->dfd);
  nf->fd = nf->dfd = -1;
  if (nf->created)
    unlink (path);
  if (nf->dcreated)
    unlink (nf->dpath);
}

/* Opens the image file and the external data file, refusing a data
 * file that is the image itself, and takes QEMU's write locks on them
 * before either is truncated, as qemu-img create does: an image another
 * process is using must not be destroyed. */
static int
open_new_files (const char *path, const struct q2_create_opts *o,
                struct new_files *nf)
{
  int r;

  *nf = (struct new_files) { .fd = -1, .dfd = -1 };
  if (o->data_file) {
    if ((nf->dpath = near_image (path, o->data_file)) == NULL)
      return q2_err (ENOMEM, "out of memory");
    if ((r = open_new_file (nf->dpath, o->nocow, &nf->dfd,
                            &nf->dcreated)) < 0)
      return q2_err_prefix (r, "data_file");
  }
  r = open_new_file (path, o->nocow, &nf->fd, &nf->created);
  if (r == 0 && nf->dfd >= 0 && q2_same_file (nf->fd, nf->dfd))
    r = q2_err (EINVAL, "data_file: %s is the image itself", nf->dpath);
  if (r == 0 && nf->dfd >= 0 &&
      (r = q2_lock_image (nf->dfd, nf->dpath, true)) < 0)
    r = q2_err_prefix (r, "data_file");
  /* Errors about the image are prefixed with its name later. */
  if (r == 0)
    r = q2_lock_image (nf->fd, "", true);
  if (r == 0) {
    nf->created = !is_block_device (nf->fd);
    nf->dcreated = nf->dfd >= 0 && !is_block_device (nf->dfd);
    r = truncate_file (nf->fd, 0, "the image");
  }
  if (r == 0 && nf->dfd >= 0)
    r = truncate_file (nf->dfd, 0, "the data file");
  if (r < 0)
    close_new_files (nf, path);
  return r;
}

/* How much of the data a preallocated image covers, as QEMU does it:
 * whole clusters, but whole subclusters when only the metadata of an
 * image with subclusters (or an external data file) is allocated. */
static uint64_t
preallocated_bytes (uint64_t size, const struct q2_create_opts *o,
                    const struct layout *l, bool external)
{
  if (o->extended_l2 &&
      (external || o->preallocation == Q2_PREALLOC_METADATA))
    return Q2_ROUND_UP (size, l->cs / 32);
  return div_up (size, l->cs) * l->cs;
}

/* Sizes the external data file: the virtual size, or the preallocated
 * data. */
static int
size_data_file (int dfd, uint64_t size, const struct q2_create_opts *o,
                const struct layout *l, const struct q2_crypto *crypto)
{
  if (o->preallocation == Q2_PREALLOC_OFF)
    return truncate_file (dfd, size, "the data file");
  return preallocate_data (dfd, 0, preallocated_bytes (size, o, l, true),
                           "the data file", o->preallocation, crypto);
}

static int
sync_and_close (int fd, const char *what, int r)
{
  if (r == 0 && fsync (fd) == -1) {
    int e = errno;
    r = q2_err (e, "fsync of %s: %s", what, strerror (e));
  }
  if (close (fd) == -1 && r == 0) {
    int e = errno;
    r = q2_err (e, "close of %s: %s", what, strerror (e));
  }
  return r;
}

int
q2_create (const char *path, uint64_t size, const struct q2_create_opts *opts)
{
  struct q2_create_opts eff = *opts;
  const struct q2_create_opts *o = &eff;
  const char *backing_format = o->backing_format;
  struct layout l;
  uint8_t *buf = NULL, *luks = NULL;
  size_t luks_len = 0;
  struct q2_crypto *crypto = NULL;
  uint64_t backing_size = UINT64_MAX, end;
  struct new_files nf = { .fd = -1, .dfd = -1 };
  int fd, r;

  if ((r = validate_opts (o)) < 0 || (r = validate_encrypt (o)) < 0)
    return q2_err_prefix (r, "%s", path);
  /* A raw data file maps every guest cluster to the same offset there,
   * so the L2 tables must exist from the start (as in QEMU). */
  if (eff.data_file_raw && eff.preallocation == Q2_PREALLOC_OFF)
    eff.preallocation = Q2_PREALLOC_METADATA;
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
  if ((r = setup_encrypt (o, &luks, &luks_len, &crypto)) < 0)
    return q2_err_prefix (r, "%s", path);
  if ((r = compute_layout (size, o, luks_len, &l)) < 0)
    goto fail_crypto;

  buf = calloc (1, l.cs);
  if (buf == NULL) {
    r = q2_err (ENOMEM, "out of memory");
    goto fail_crypto;
  }
  if ((r = build_header (buf, size, o, backing_format, &l, luks_len)) < 0)
    goto fail_crypto;

  if ((r = open_new_files (path, o, &nf)) < 0)
    goto fail_crypto;
  fd = nf.fd;
  r = q2_io_pwrite (fd, buf, l.cs, 0, "qcow2 header");
  if (r == 0)
    r = write_refcounts (fd, &l, o->refcount_bits, buf);
  if (r == 0)
    r = write_tables (fd, &l, size, buf);
  if (r == 0 && luks)
    r = q2_io_pwrite (fd, luks, luks_len, l.luks_off, "LUKS header");
  if (r == 0 && o->preallocation != Q2_PREALLOC_OFF)
    r = preallocate_data (fd, l.data_off, l.data_clusters == 0 ? 0
                          : preallocated_bytes (size, o, &l, false),
                          "the image", o->preallocation, crypto);
  else if (r == 0) {
    /* Like QEMU: the file ends with the L1 table (or the refcount
     * blocks for an empty image), or with the whole clusters of the
     * LUKS area. */
    end = l.l1_size ? l.l1_off + l.l1_size * 8 : l.l1_off;
    if (l.luks_clusters)
      end = l.luks_off + l.luks_clusters * l.cs;
    r = truncate_file (fd, end, "the image");
  }
  if (nf.dfd >= 0) {
    if (r == 0)
      r = size_data_file (nf.dfd, size, o, &l, crypto);
    r = sync_and_close (nf.dfd, "the data file", r);
  }
  r = sync_and_close (fd, "the image", r);
  /* As qemu-img: no half-made image that looks valid is left. */
  if (r < 0) {
    if (nf.created)
      unlink (path);
    if (nf.dcreated)
      unlink (nf.dpath);
  }
 fail_crypto:
  free (nf.dpath);
  free (buf);
  if (luks) {
    explicit_bzero (luks, luks_len);
    free (luks);
  }
  q2_crypto_free (crypto);
  if (r < 0)
    return q2_err_prefix (r, "%s", path);
  return 0;
}
