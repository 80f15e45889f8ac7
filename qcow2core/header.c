/* The qcow2 header (v2 and v3) and its extensions: parsed into host
 * order and checked field by field against the file size and QEMU's
 * limits, so that later code can trust every offset and size. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define V2_HEADER_LEN 72
#define V3_HEADER_LEN 104
#define FEATURE_ENTRY_LEN 48
#define SNAPSHOT_HEADER_LEN 40
#define MAX_SNAPSHOT_TABLE (64u << 20)
#define MAX_BITMAPS 65535
#define MAX_BITMAP_DIR (64u << 20)

void
q2_header_free (struct q2_header *h)
{
  uint32_t i;

  free (h->unknown_fields);
  free (h->backing_file);
  free (h->backing_format);
  free (h->data_file);
  free (h->features);
  for (i = 0; i < h->nb_unknown_exts; i++)
    free (h->unknown_exts[i].data);
  free (h->unknown_exts);
  memset (h, 0, sizeof *h);
}

const char *
q2_header_feature_name (const struct q2_header *h, uint8_t type, uint8_t bit)
{
  uint32_t i;

  for (i = 0; i < h->nb_features; i++)
    if (h->features[i].type == type && h->features[i].bit == bit)
      return h->features[i].name;
  return NULL;
}

/* A table of 'entries' items of 'entry_size' bytes at 'offset' must be
 * cluster-aligned and lie inside the file. */
static int
check_table (const char *size_field, const char *offset_field,
             uint64_t offset, uint64_t entries,
             uint64_t entry_size, uint64_t max_bytes, uint64_t cluster_size,
             uint64_t file_size)
{
  if (entries > max_bytes / entry_size)
    return q2_err (EINVAL, "%s: %llu entries is too large (at most %llu "
                   "bytes)", size_field, (unsigned long long) entries,
                   (unsigned long long) max_bytes);
  if (!Q2_IS_ALIGNED (offset, cluster_size))
    return q2_err (EINVAL, "%s %#llx is not aligned to the cluster size",
                   offset_field, (unsigned long long) offset);
  if (entries == 0 ||
      (offset < file_size && entries * entry_size <= file_size - offset))
    return 0;
  /* UINT64_MAX: a table that may lie past the end (check reports it). */
  if (file_size == UINT64_MAX)
    return q2_err (EINVAL, "%s %#llx (%llu bytes) runs past the largest "
                   "64-bit offset", offset_field, (unsigned long long) offset,
                   (unsigned long long) (entries * entry_size));
  return q2_err (EINVAL, "%s %#llx (%llu bytes) is past the end of the file "
                 "(%llu bytes)", offset_field, (unsigned long long) offset,
                 (unsigned long long) (entries * entry_size),
                 (unsigned long long) file_size);
}

char *
q2_dup_string (const uint8_t *p, size_t len)
{
  char *s = malloc (len + 1);

  if (s) {
    memcpy (s, p, len);
    s[len] = '\0';
  }
  return s;
}

/* Names each header extension type for error messages. */
static const char *
ext_name (uint32_t type)
{
  switch (type) {
  case QCOW2_EXT_BACKING_FORMAT: return "backing format";
  case QCOW2_EXT_FEATURE_TABLE: return "feature name table";
  case QCOW2_EXT_BITMAPS: return "bitmaps";
  case QCOW2_EXT_CRYPTO: return "full disk encryption";
  case QCOW2_EXT_DATA_FILE: return "external data file";
  default: return "unknown";
  }
}

static int
parse_one_extension (struct q2_header *h, uint32_t type, uint32_t len,
                     const uint8_t *data, uint64_t file_size,
                     uint64_t cluster_size)
{
  uint32_t i;

  switch (type) {
  case QCOW2_EXT_BACKING_FORMAT:
    if (len > 15)
      return q2_err (EINVAL, "backing format header extension: length %u "
                     "is too long", len);
    free (h->backing_format);
    if ((h->backing_format = q2_dup_string (data, len)) == NULL)
      return q2_err (ENOMEM, "out of memory");
    return 0;

  case QCOW2_EXT_DATA_FILE:
    if (len == 0 || len > 4095)
      return q2_err (EINVAL, "external data file header extension: length "
                     "%u is invalid", len);
    free (h->data_file);
    if ((h->data_file = q2_dup_string (data, len)) == NULL)
      return q2_err (ENOMEM, "out of memory");
    if (strlen (h->data_file) != len)
      return q2_err (EINVAL, "external data file name contains a NUL byte");
    return 0;

  case QCOW2_EXT_FEATURE_TABLE:
    free (h->features);
    h->nb_features = len / FEATURE_ENTRY_LEN;
    h->features = calloc (h->nb_features ? h->nb_features : 1,
                          sizeof *h->features);
    if (h->features == NULL)
      return q2_err (ENOMEM, "out of memory");
    for (i = 0; i < h->nb_features; i++) {
      const uint8_t *e = data + i * FEATURE_ENTRY_LEN;
      h->features[i].type = e[0];
      h->features[i].bit = e[1];
      memcpy (h->features[i].name, e + 2, 46);
      h->features[i].name[46] = '\0';
    }
    return 0;

  case QCOW2_EXT_CRYPTO:
    if (len != 16)
      return q2_err (EINVAL, "full disk encryption header extension: "
                     "length %u is not 16", len);
    h->has_crypto_ext = true;
    h->crypto_offset = q2_be64 (data);
    h->crypto_length = q2_be64 (data + 8);
    if (!Q2_IS_ALIGNED (h->crypto_offset, cluster_size) ||
        h->crypto_offset >= file_size ||
        h->crypto_length > file_size - h->crypto_offset)
      return q2_err (EINVAL, "full disk encryption header at offset %#llx "
                     "(length %llu) is unaligned or past the end of the file",
                     (unsigned long long) h->crypto_offset,
                     (unsigned long long) h->crypto_length);
    return 0;

  case QCOW2_EXT_BITMAPS:
    if (len != 24)
      return q2_err (EINVAL, "bitmaps header extension: length %u is not 24",
                     len);
    h->has_bitmaps_ext = true;
    h->nb_bitmaps = q2_be32 (data);
    h->bitmap_dir_size = q2_be64 (data + 8);
    h->bitmap_dir_offset = q2_be64 (data + 16);
    /* Bitmaps only matter when the autoclear bit says they are valid;
     * QEMU ignores a stale extension the same way. */
    if (!(h->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
      return 0;
    if (h->nb_bitmaps == 0 || h->nb_bitmaps > MAX_BITMAPS)
      return q2_err (EINVAL, "bitmaps header extension: nb_bitmaps %u is "
                     "out of range (1..%u)", h->nb_bitmaps, MAX_BITMAPS);
    if (q2_be32 (data + 4) != 0)
      return q2_err (EINVAL, "bitmaps header extension: reserved field "
                     "is not zero");
    return check_table ("bitmap directory size", "bitmap directory offset",
                        h->bitmap_dir_offset,
                        h->bitmap_dir_size, 1, MAX_BITMAP_DIR, cluster_size,
                        file_size);

  default: {
    struct q2_unknown_ext *n;
    n = realloc (h->unknown_exts,
                 (h->nb_unknown_exts + 1) * sizeof *h->unknown_exts);
    if (n == NULL)
      return q2_err (ENOMEM, "out of memory");
    h->unknown_exts = n;
    n = &h->unknown_exts[h->nb_unknown_exts];
    n->type = type;
    n->len = len;
    n->data = malloc (len ? len : 1);
    if (n->data == NULL)
      return q2_err (ENOMEM, "out of memory");
    memcpy (n->data, data, len);
    h->nb_unknown_exts++;
    return 0;
  }
  }
}

/* Extensions run from the end of the header to the backing file name
 * (or the end of the first cluster). */
static int
parse_extensions (struct q2_header *h, const uint8_t *buf, uint64_t start,
                  uint64_t end, uint64_t file_size, uint64_t cluster_size)
{
  uint64_t off = start;

  while (off < end) {
    uint32_t type, len;
    int r;

    if (end - off < 8)
      return q2_err (EINVAL, "header extension at offset %#llx is truncated",
                     (unsigned long long) off);
    type = q2_be32 (buf + off);
    len = q2_be32 (buf + off + 4);
    off += 8;
    if (type == QCOW2_EXT_END)
      return 0;
    if (len > end - off)
      return q2_err (EINVAL, "%s header extension (type %#x) length %u "
                     "runs past the end of the header area",
                     ext_name (type), type, len);
    r = parse_one_extension (h, type, len, buf + off, file_size,
                             cluster_size);
    if (r < 0)
      return r;
    off += Q2_ROUND_UP ((uint64_t) len, 8);
  }
  return 0;
}

/* Refuses unknown incompatible bits, naming them from the table. */
static int
check_incompatible (const struct q2_header *h)
{
  uint64_t unknown = h->incompatible_features & ~QCOW2_INCOMPAT_KNOWN;
  char msg[512] = "";
  size_t used = 0;
  int bit;

  if (!unknown)
    return 0;
  for (bit = 0; bit < 64 && used < sizeof msg; bit++) {
    const char *name = q2_header_feature_name (h, 0, bit);
    if (!(unknown & (1ULL << bit)))
      continue;
    if (name)
      used += snprintf (msg + used, sizeof msg - used, "%s'%s' (bit %d)",
                        used ? ", " : "", name, bit);
    else
      used += snprintf (msg + used, sizeof msg - used, "%sbit %d",
                        used ? ", " : "", bit);
  }
  return q2_err (ENOTSUP, "unsupported incompatible feature(s) in "
                 "incompatible_features %#llx: %s",
                 (unsigned long long) h->incompatible_features, msg);
}

static int parse_header (const uint8_t *buf, size_t len, uint64_t file_size,
                         unsigned flags, struct q2_header *h);

bool
q2_reftable_unusable (const struct q2_header *h, uint64_t cluster_size,
                      uint64_t file_size)
{
  uint64_t bytes = (uint64_t) h->refcount_table_clusters * cluster_size;

  return bytes == 0 || h->refcount_table_offset >= file_size ||
    bytes > file_size - h->refcount_table_offset;
}

int
q2_header_parse (const uint8_t *buf, size_t len, uint64_t file_size,
                 unsigned flags, struct q2_header *h)
{
  int r = parse_header (buf, len, file_size, flags, h);

  if (r < 0)
    q2_header_free (h);         /* leaves it cleared */
  return r;
}

static int
parse_header (const uint8_t *buf, size_t len, uint64_t file_size,
              unsigned flags, struct q2_header *h)
{
  uint64_t cluster_size, ext_end, l2_entries, l1_needed;
  uint32_t hdr_len;
  int r;

  memset (h, 0, sizeof *h);
  if (len < V2_HEADER_LEN)
    return q2_err (EINVAL, "file is too short for a qcow2 header "
                   "(%zu bytes)", len);
  if (q2_be32 (buf) != QCOW2_MAGIC)
    return q2_err (EINVAL, "bad magic %#x, not a qcow2 image",
                   q2_be32 (buf));
  h->version = q2_be32 (buf + 4);
  if (h->version != 2 && h->version != 3)
    return q2_err (ENOTSUP, "unsupported qcow2 version %u (only 2 and 3)",
                   h->version);
  h->backing_file_offset = q2_be64 (buf + 8);
  h->backing_file_size = q2_be32 (buf + 16);
  h->cluster_bits = q2_be32 (buf + 20);
  h->size = q2_be64 (buf + 24);
  h->crypt_method = q2_be32 (buf + 32);
  h->l1_size = q2_be32 (buf + 36);
  h->l1_table_offset = q2_be64 (buf + 40);
  h->refcount_table_offset = q2_be64 (buf + 48);
  h->refcount_table_clusters = q2_be32 (buf + 56);
  h->nb_snapshots = q2_be32 (buf + 60);
  h->snapshots_offset = q2_be64 (buf + 64);

  if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
      h->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
    return q2_err (EINVAL, "cluster_bits %u is out of range (%d..%d)",
                   h->cluster_bits, QCOW2_MIN_CLUSTER_BITS,
                   QCOW2_MAX_CLUSTER_BITS);
  cluster_size = 1ULL << h->cluster_bits;

  if (h->version == 2) {
    h->refcount_order = 4;
    h->header_length = V2_HEADER_LEN;
  }
  else {
    if (len < V3_HEADER_LEN)
      return q2_err (EINVAL, "file is too short for a version 3 header");
    h->incompatible_features = q2_be64 (buf + 72);
    h->compatible_features = q2_be64 (buf + 80);
    h->autoclear_features = q2_be64 (buf + 88);
    h->refcount_order = q2_be32 (buf + 96);
    h->header_length = q2_be32 (buf + 100);
    if (h->header_length < V3_HEADER_LEN)
      return q2_err (EINVAL, "header_length %u is too small (at least %d)",
                     h->header_length, V3_HEADER_LEN);
    if (h->header_length % 8)
      return q2_err (EINVAL, "header_length %u is not a multiple of 8",
                     h->header_length);
    if (h->header_length > cluster_size)
      return q2_err (EINVAL, "header_length %u exceeds the cluster size %llu",
                     h->header_length, (unsigned long long) cluster_size);
    if (h->header_length > len)
      return q2_err (EINVAL, "header_length %u runs past the end of the file",
                     h->header_length);
    if (h->header_length > 104)
      h->compression_type = buf[104];
    if (h->header_length > 112) {
      h->unknown_fields_len = h->header_length - 112;
      h->unknown_fields = malloc (h->unknown_fields_len);
      if (h->unknown_fields == NULL)
        return q2_err (ENOMEM, "out of memory");
      memcpy (h->unknown_fields, buf + 112, h->unknown_fields_len);
    }
  }
  hdr_len = h->header_length;

  if (h->refcount_order > 6) {
    r = q2_err (EINVAL, "refcount_order %u is too large (at most 6, "
                "64-bit refcounts)", h->refcount_order);
    goto fail;
  }
  if (h->crypt_method > 2) {
    r = q2_err (EINVAL, "crypt_method %u is unknown", h->crypt_method);
    goto fail;
  }

  /* The backing file name must lie inside the first cluster. */
  if (h->backing_file_offset) {
    if (h->backing_file_offset > cluster_size ||
        h->backing_file_offset < hdr_len) {
      r = q2_err (EINVAL, "backing_file_offset %#llx is outside the header "
                  "cluster", (unsigned long long) h->backing_file_offset);
      goto fail;
    }
    if (h->backing_file_size == 0 ||
        h->backing_file_size > QCOW2_MAX_BACKING_NAME ||
        h->backing_file_size > cluster_size - h->backing_file_offset) {
      r = q2_err (EINVAL, "backing_file_size %u is invalid (1..%d, inside "
                  "the header cluster)", h->backing_file_size,
                  QCOW2_MAX_BACKING_NAME);
      goto fail;
    }
    if (h->backing_file_offset + h->backing_file_size > len) {
      r = q2_err (EINVAL, "backing file name runs past the end of the file");
      goto fail;
    }
    h->backing_file = q2_dup_string (buf + h->backing_file_offset,
                                  h->backing_file_size);
    if (h->backing_file == NULL) {
      r = q2_err (ENOMEM, "out of memory");
      goto fail;
    }
    if (strlen (h->backing_file) != h->backing_file_size) {
      r = q2_err (EINVAL, "backing file name contains a NUL byte");
      goto fail;
    }
  }

  ext_end = h->backing_file_offset ? h->backing_file_offset : cluster_size;
  if (ext_end > len)
    ext_end = len;
  r = parse_extensions (h, buf, hdr_len, ext_end, file_size, cluster_size);
  if (r < 0)
    goto fail;

  if ((r = check_incompatible (h)) < 0)
    goto fail;
  if ((h->compression_type != 0) !=
      !!(h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION)) {
    r = q2_err (EINVAL, "compression_type %u and incompatible feature bit 3 "
                "(compression type) disagree", h->compression_type);
    goto fail;
  }
  if (h->compression_type > 1) {
    r = q2_err (ENOTSUP, "compression_type %u is unknown (0 zlib, 1 zstd)",
                h->compression_type);
    goto fail;
  }
  if ((h->incompatible_features & QCOW2_INCOMPAT_EXTL2) &&
      h->cluster_bits < 14) {
    r = q2_err (EINVAL, "extended L2 entries need cluster_bits >= 14, "
                "not %u", h->cluster_bits);
    goto fail;
  }
  if ((h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) &&
      h->data_file == NULL) {
    r = q2_err (EINVAL, "the external data file bit is set but the header "
                "has no data file name extension");
    goto fail;
  }
  if (!(h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) &&
      (h->autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW)) {
    r = q2_err (EINVAL, "autoclear bit 1 (raw external data file) is set "
                "but the image has no external data file");
    goto fail;
  }
  if (h->crypt_method != 2 && h->has_crypto_ext) {
    r = q2_err (EINVAL, "the header has a full disk encryption extension "
                "but crypt_method is %u (only LUKS images have one)",
                h->crypt_method);
    goto fail;
  }
  if (h->crypt_method == 2 && !h->has_crypto_ext) {
    r = q2_err (EINVAL, "crypt_method is LUKS but the header has no full "
                "disk encryption extension");
    goto fail;
  }

  /* Mapping tables. */
  if (h->size > INT64_MAX) {
    r = q2_err (EINVAL, "size %llu is too large",
                (unsigned long long) h->size);
    goto fail;
  }
  l2_entries = cluster_size /
    ((h->incompatible_features & QCOW2_INCOMPAT_EXTL2) ? 16 : 8);
  l1_needed = (h->size + cluster_size * l2_entries - 1) /
    (cluster_size * l2_entries);
  if (h->l1_size < l1_needed) {
    r = q2_err (EINVAL, "l1_size %u is too small for the virtual size %llu "
                "(at least %llu L1 entries are needed)", h->l1_size,
                (unsigned long long) h->size, (unsigned long long) l1_needed);
    goto fail;
  }
  r = check_table ("l1_size (L1 table)", "l1_table_offset (L1 table)",
                   h->l1_table_offset,
                   h->l1_size, 8, QCOW2_MAX_L1_BYTES, cluster_size,
                   file_size);
  if (r < 0)
    goto fail;
  if (h->refcount_table_clusters == 0 &&
      !(flags & Q2_HDR_REFTABLE_UNUSABLE)) {
    r = q2_err (EINVAL, "refcount_table_clusters is 0: the image has no "
                "refcount table");
    goto fail;
  }
  if (h->refcount_table_clusters != 0) {
    r = check_table ("refcount_table_clusters (refcount table)",
                     "refcount_table_offset (refcount table)",
                     h->refcount_table_offset,
                     (uint64_t) h->refcount_table_clusters * cluster_size / 8,
                     8, QCOW2_MAX_REFTABLE_BYTES, cluster_size,
                     flags & Q2_HDR_REFTABLE_UNUSABLE ? UINT64_MAX
                     : file_size);
    if (r < 0)
      goto fail;
  }
  if (h->nb_snapshots > QCOW2_MAX_SNAPSHOTS) {
    r = q2_err (EINVAL, "nb_snapshots %u is too large (at most %d)",
                h->nb_snapshots, QCOW2_MAX_SNAPSHOTS);
    goto fail;
  }
  r = check_table ("nb_snapshots (snapshot table)",
                   "snapshots_offset (snapshot table)", h->snapshots_offset,
                   h->nb_snapshots, SNAPSHOT_HEADER_LEN, MAX_SNAPSHOT_TABLE,
                   cluster_size, file_size);
  if (r < 0)
    goto fail;
  return 0;

 fail:
  return r;
}
