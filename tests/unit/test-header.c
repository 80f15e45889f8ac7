/* q2_header_parse: v2 and v3 headers built by hand in memory (big-endian
 * fields), their extensions, and every rejection with its errno and a
 * message naming the offending field. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "unit.h"

/* Every header field, in host order; hdr_build writes them big-endian. */
struct spec {
  uint32_t magic, version;
  uint64_t backing_file_offset;
  uint32_t backing_file_size, cluster_bits;
  uint64_t size;
  uint32_t crypt_method, l1_size;
  uint64_t l1_table_offset, refcount_table_offset;
  uint32_t refcount_table_clusters, nb_snapshots;
  uint64_t snapshots_offset;
  /* v3 only */
  uint64_t incompat, compat, autoclear;
  uint32_t refcount_order, header_length;
  uint8_t compression_type;

  uint64_t file_size;           /* passed to q2_header_parse */
};

/* A header buffer: one cluster (at most 2 MiB), and where the next
 * extension goes. */
struct hbuf {
  uint8_t *buf;
  size_t len;
  size_t ext_off;
};

static uint64_t
l1_needed (uint64_t size, uint32_t cluster_bits, bool extl2)
{
  uint64_t cs = 1ULL << cluster_bits;
  uint64_t per_l2 = cs / (extl2 ? 16 : 8);
  return (size + cs * per_l2 - 1) / (cs * per_l2);
}

/* A valid image layout for cluster_bits: header at 0, refcount table at
 * cluster 1, L1 table from cluster 3, 1 GiB virtual size. */
static struct spec
spec_default (int version, uint32_t cluster_bits)
{
  struct spec s;
  uint64_t cs = 1ULL << cluster_bits;
  uint64_t l1_bytes;

  memset (&s, 0, sizeof s);
  s.magic = QCOW2_MAGIC;
  s.version = version;
  s.cluster_bits = cluster_bits;
  s.size = 1ULL << 30;
  s.l1_size = l1_needed (s.size, cluster_bits, false);
  s.refcount_table_offset = cs;
  s.refcount_table_clusters = 1;
  s.l1_table_offset = 3 * cs;
  l1_bytes = Q2_ROUND_UP ((uint64_t) s.l1_size * 8, cs);
  s.file_size = 3 * cs + l1_bytes + 4 * cs;
  if (version >= 3) {
    s.refcount_order = 4;
    s.header_length = 112;
  }
  return s;
}

/* Writes the header fields into a fresh zeroed cluster-sized buffer. */
static void
hdr_build (struct hbuf *hb, const struct spec *s)
{
  uint32_t cb = s->cluster_bits;
  uint8_t *b;

  /* Out-of-range cluster_bits still get a buffer to put the header in. */
  if (cb < 9 || cb > 21)
    cb = 16;
  hb->len = (size_t) 1 << cb;
  hb->buf = calloc (1, hb->len);
  if (hb->buf == NULL)
    abort ();
  b = hb->buf;
  q2_put_be32 (b + 0, s->magic);
  q2_put_be32 (b + 4, s->version);
  q2_put_be64 (b + 8, s->backing_file_offset);
  q2_put_be32 (b + 16, s->backing_file_size);
  q2_put_be32 (b + 20, s->cluster_bits);
  q2_put_be64 (b + 24, s->size);
  q2_put_be32 (b + 32, s->crypt_method);
  q2_put_be32 (b + 36, s->l1_size);
  q2_put_be64 (b + 40, s->l1_table_offset);
  q2_put_be64 (b + 48, s->refcount_table_offset);
  q2_put_be32 (b + 56, s->refcount_table_clusters);
  q2_put_be32 (b + 60, s->nb_snapshots);
  q2_put_be64 (b + 64, s->snapshots_offset);
  if (s->version >= 3) {
    q2_put_be64 (b + 72, s->incompat);
    q2_put_be64 (b + 80, s->compat);
    q2_put_be64 (b + 88, s->autoclear);
    q2_put_be32 (b + 96, s->refcount_order);
    q2_put_be32 (b + 100, s->header_length);
    if (s->header_length > 104)
      b[104] = s->compression_type;
    hb->ext_off = s->header_length >= 104 && s->header_length < hb->len ?
      s->header_length : 104;
  }
  else
    hb->ext_off = 72;
}

/* Appends an extension (type, length, data, padding to 8 with 0xa5:
 * padding bytes are not guaranteed to be zero). */
static void
ext_add (struct hbuf *hb, uint32_t type, const void *data, uint32_t len)
{
  uint32_t padded = Q2_ROUND_UP (len, 8);

  if (hb->ext_off + 8 + padded > hb->len)
    abort ();
  q2_put_be32 (hb->buf + hb->ext_off, type);
  q2_put_be32 (hb->buf + hb->ext_off + 4, len);
  memcpy (hb->buf + hb->ext_off + 8, data, len);
  memset (hb->buf + hb->ext_off + 8 + len, 0xa5, padded - len);
  hb->ext_off += 8 + padded;
}

/* One 48-byte feature-name table entry. */
static void
feature_entry (uint8_t *e, uint8_t type, uint8_t bit, const char *name)
{
  memset (e, 0, 48);
  e[0] = type;
  e[1] = bit;
  memcpy (e + 2, name, Q2_MIN (strlen (name), 46));
}

static void
bitmaps_ext (uint8_t *d, uint32_t nb, uint32_t reserved, uint64_t dir_size,
             uint64_t dir_offset)
{
  q2_put_be32 (d, nb);
  q2_put_be32 (d + 4, reserved);
  q2_put_be64 (d + 8, dir_size);
  q2_put_be64 (d + 16, dir_offset);
}

static int
parse (struct hbuf *hb, const struct spec *s, struct q2_header *h)
{
  return q2_header_parse (hb->buf, hb->len, s->file_size, 0, h);
}

/* No allocation is left behind (whatever the other fields hold). */
static bool
header_pointers_cleared (const struct q2_header *h)
{
  return h->backing_file == NULL &&
    h->backing_format == NULL && h->data_file == NULL &&
    h->features == NULL && h->nb_features == 0 &&
    h->unknown_exts == NULL && h->nb_unknown_exts == 0 &&
    h->unknown_fields == NULL;
}

/* Fully cleared, as internal.h promises for every error. */
static bool
header_is_cleared (const struct q2_header *h)
{
  static const struct q2_header zero;
  return memcmp (h, &zero, sizeof zero) == 0;
}

/* Builds from s, parses, and expects failure -errnum with a message
 * that contains 'field'. */
static void
expect_reject_hb (struct hbuf *hb, const struct spec *s, int errnum,
                  const char *field, const char *what)
{
  struct q2_header h;
  int r;

  unit_context ("%s", what);
  memset (&h, 0x5a, sizeof h);
  r = parse (hb, s, &h);
  CHECK_EQ_INT (r, -errnum);
  CHECK_STR_CONTAINS (q2_last_error (), field);
  CHECK (header_pointers_cleared (&h));
  if (r == 0)
    q2_header_free (&h);
  free (hb->buf);
  unit_context (NULL);
}

static void
expect_reject (const struct spec *s, int errnum, const char *field,
               const char *what)
{
  struct hbuf hb;

  hdr_build (&hb, s);
  expect_reject_hb (&hb, s, errnum, field, what);
}

/* ---- valid headers ---- */

static void
test_v2_defaults (void)
{
  struct spec s = spec_default (2, 16);
  struct hbuf hb;
  struct q2_header h;

  hdr_build (&hb, &s);
  /* Junk after 72 would be v3 fields if misread; in v2 it is the
   * extension area, so put a real extension there. */
  ext_add (&hb, QCOW2_EXT_BACKING_FORMAT, "raw", 3);
  CHECK_EQ_INT (parse (&hb, &s, &h), 0);
  CHECK_EQ_U64 (h.version, 2);
  CHECK_EQ_U64 (h.refcount_order, 4);
  CHECK_EQ_U64 (h.header_length, 72);
  CHECK_EQ_U64 (h.incompatible_features, 0);
  CHECK_EQ_U64 (h.compatible_features, 0);
  CHECK_EQ_U64 (h.autoclear_features, 0);
  CHECK_EQ_U64 (h.compression_type, 0);
  CHECK_EQ_U64 (h.cluster_bits, 16);
  CHECK_EQ_U64 (h.size, 1ULL << 30);
  CHECK_EQ_U64 (h.l1_size, s.l1_size);
  CHECK_EQ_U64 (h.l1_table_offset, s.l1_table_offset);
  CHECK_EQ_U64 (h.refcount_table_offset, s.refcount_table_offset);
  CHECK_EQ_U64 (h.refcount_table_clusters, 1);
  CHECK (h.backing_file == NULL);
  CHECK (h.backing_format != NULL && strcmp (h.backing_format, "raw") == 0);
  CHECK (h.unknown_fields == NULL);
  CHECK_EQ_U64 (h.unknown_fields_len, 0);
  CHECK_EQ_U64 (h.nb_unknown_exts, 0);
  q2_header_free (&h);
  CHECK (header_is_cleared (&h));
  free (hb.buf);

  /* Plain v2 with nothing after the header. */
  hdr_build (&hb, &s);
  CHECK_EQ_INT (parse (&hb, &s, &h), 0);
  CHECK (h.backing_format == NULL);
  CHECK_EQ_U64 (h.header_length, 72);
  q2_header_free (&h);
  free (hb.buf);
}

static void
test_v3_zstd (void)
{
  struct spec s = spec_default (3, 16);
  struct hbuf hb;
  struct q2_header h;

  s.header_length = 112;
  s.compression_type = 1;
  s.incompat = QCOW2_INCOMPAT_COMPRESSION;
  s.compat = QCOW2_COMPAT_LAZY_REFCOUNTS | (1ULL << 40); /* unknown: ok */
  s.autoclear = 1ULL << 7;
  s.refcount_order = 5;
  hdr_build (&hb, &s);
  CHECK_EQ_INT (parse (&hb, &s, &h), 0);
  CHECK_EQ_U64 (h.version, 3);
  CHECK_EQ_U64 (h.header_length, 112);
  CHECK_EQ_U64 (h.compression_type, 1);
  CHECK_EQ_U64 (h.incompatible_features, QCOW2_INCOMPAT_COMPRESSION);
  CHECK_EQ_U64 (h.compatible_features, s.compat);
  CHECK_EQ_U64 (h.autoclear_features, s.autoclear);
  CHECK_EQ_U64 (h.refcount_order, 5);
  CHECK (h.unknown_fields == NULL);
  CHECK_EQ_U64 (h.nb_unknown_exts, 0);
  q2_header_free (&h);
  free (hb.buf);

  /* header_length 104: compression_type is absent and means zlib even
   * if byte 104 (now the extension area) is not zero. */
  s = spec_default (3, 16);
  s.header_length = 104;
  hdr_build (&hb, &s);
  ext_add (&hb, QCOW2_EXT_BACKING_FORMAT, "qcow2", 5);
  CHECK (hb.buf[104] != 0);
  CHECK_EQ_INT (parse (&hb, &s, &h), 0);
  CHECK_EQ_U64 (h.header_length, 104);
  CHECK_EQ_U64 (h.compression_type, 0);
  CHECK (h.backing_format && strcmp (h.backing_format, "qcow2") == 0);
  q2_header_free (&h);
  free (hb.buf);

  /* header_length 120: the unknown additional fields are kept, and the
   * extensions start after them. */
  s = spec_default (3, 16);
  s.header_length = 120;
  hdr_build (&hb, &s);
  memcpy (hb.buf + 112, "\x01\x02\x03\x04\x05\x06\x07\x08", 8);
  ext_add (&hb, QCOW2_EXT_BACKING_FORMAT, "raw", 3);
  CHECK_EQ_INT (parse (&hb, &s, &h), 0);
  CHECK_EQ_U64 (h.header_length, 120);
  CHECK_EQ_U64 (h.unknown_fields_len, 8);
  CHECK (h.unknown_fields &&
         memcmp (h.unknown_fields, "\x01\x02\x03\x04\x05\x06\x07\x08", 8) == 0);
  CHECK (h.backing_format && strcmp (h.backing_format, "raw") == 0);
  q2_header_free (&h);
  free (hb.buf);
}

static void
test_every_cluster_size (void)
{
  uint32_t cb;
  int v;

  for (v = 2; v <= 3; v++)
    for (cb = 9; cb <= 21; cb++) {
      struct spec s = spec_default (v, cb);
      struct hbuf hb;
      struct q2_header h;

      unit_context ("v%d cluster_bits %u", v, cb);
      hdr_build (&hb, &s);
      CHECK_EQ_INT (parse (&hb, &s, &h), 0);
      CHECK_EQ_U64 (h.cluster_bits, cb);
      CHECK_EQ_U64 (h.l1_size, s.l1_size);
      q2_header_free (&h);
      free (hb.buf);
    }
  unit_context (NULL);
}

static void
test_refcount_orders (void)
{
  uint32_t order;

  for (order = 0; order <= 6; order++) {
    struct spec s = spec_default (3, 16);
    struct hbuf hb;
    struct q2_header h;

    unit_context ("refcount_order %u", order);
    s.refcount_order = order;
    hdr_build (&hb, &s);
    CHECK_EQ_INT (parse (&hb, &s, &h), 0);
    CHECK_EQ_U64 (h.refcount_order, order);
    q2_header_free (&h);
    free (hb.buf);
  }
  unit_context (NULL);
}

static void
test_extensions (void)
{
  struct spec s = spec_default (3, 16);
  struct hbuf hb;
  struct q2_header h;
  uint8_t ft[3 * 48], bm[24];
  static const uint8_t unk[5] = { 'h', 'e', 'l', 'l', 'o' };
  static const uint8_t unk2[16] = { 0, 1, 2, 3, 4, 5, 6, 7,
                                    8, 9, 10, 11, 12, 13, 14, 15 };
  char longname[47];

  s.incompat = QCOW2_INCOMPAT_DATA_FILE;
  hdr_build (&hb, &s);
  ext_add (&hb, QCOW2_EXT_BACKING_FORMAT, "qcow2", 5);
  feature_entry (ft, 0, 0, "dirty bit");
  feature_entry (ft + 48, 1, 0, "lazy refcounts");
  /* A full 46-byte name without a NUL. */
  memset (longname, 'x', 46);
  longname[46] = '\0';
  feature_entry (ft + 96, 2, 1, longname);
  ext_add (&hb, QCOW2_EXT_FEATURE_TABLE, ft, sizeof ft);
  ext_add (&hb, 0x12345678, unk, sizeof unk);
  ext_add (&hb, QCOW2_EXT_DATA_FILE, "data.raw", 8);
  ext_add (&hb, 0xabcdef01, unk2, sizeof unk2);
  /* Stale bitmaps extension (autoclear bit clear): even bad values are
   * kept without complaint. */
  bitmaps_ext (bm, 0, 7, 3, 0x123);
  ext_add (&hb, QCOW2_EXT_BITMAPS, bm, sizeof bm);

  CHECK_EQ_INT (parse (&hb, &s, &h), 0);
  CHECK (h.backing_format && strcmp (h.backing_format, "qcow2") == 0);
  CHECK (h.data_file && strcmp (h.data_file, "data.raw") == 0);
  CHECK_EQ_U64 (h.nb_features, 3);
  CHECK (q2_header_feature_name (&h, 0, 0) &&
         strcmp (q2_header_feature_name (&h, 0, 0), "dirty bit") == 0);
  CHECK (q2_header_feature_name (&h, 1, 0) &&
         strcmp (q2_header_feature_name (&h, 1, 0), "lazy refcounts") == 0);
  CHECK (q2_header_feature_name (&h, 2, 1) &&
         strcmp (q2_header_feature_name (&h, 2, 1), longname) == 0);
  CHECK (q2_header_feature_name (&h, 0, 1) == NULL);
  CHECK (q2_header_feature_name (&h, 2, 0) == NULL);
  CHECK_EQ_U64 (h.nb_unknown_exts, 2);
  if (h.nb_unknown_exts == 2) {
    CHECK_EQ_U64 (h.unknown_exts[0].type, 0x12345678);
    CHECK_EQ_U64 (h.unknown_exts[0].len, 5);
    CHECK (memcmp (h.unknown_exts[0].data, unk, 5) == 0);
    CHECK_EQ_U64 (h.unknown_exts[1].type, 0xabcdef01);
    CHECK_EQ_U64 (h.unknown_exts[1].len, 16);
    CHECK (memcmp (h.unknown_exts[1].data, unk2, 16) == 0);
  }
  CHECK (h.has_bitmaps_ext);
  CHECK_EQ_U64 (h.nb_bitmaps, 0);
  CHECK_EQ_U64 (h.bitmap_dir_size, 3);
  CHECK_EQ_U64 (h.bitmap_dir_offset, 0x123);
  CHECK (!h.has_crypto_ext);
  q2_header_free (&h);
  CHECK (header_is_cleared (&h));
  free (hb.buf);

  /* Valid bitmaps extension with the autoclear bit. */
  s = spec_default (3, 16);
  s.autoclear = QCOW2_AUTOCLEAR_BITMAPS;
  hdr_build (&hb, &s);
  bitmaps_ext (bm, 2, 0, 1000, s.file_size - (1ULL << 16));
  ext_add (&hb, QCOW2_EXT_BITMAPS, bm, sizeof bm);
  CHECK_EQ_INT (parse (&hb, &s, &h), 0);
  CHECK (h.has_bitmaps_ext);
  CHECK_EQ_U64 (h.nb_bitmaps, 2);
  CHECK_EQ_U64 (h.bitmap_dir_size, 1000);
  CHECK_EQ_U64 (h.bitmap_dir_offset, s.file_size - (1ULL << 16));
  q2_header_free (&h);
  free (hb.buf);

  /* Bitmaps with the autoclear bit are checked. */
  s = spec_default (3, 16);
  s.autoclear = QCOW2_AUTOCLEAR_BITMAPS;
  hdr_build (&hb, &s);
  bitmaps_ext (bm, 0, 0, 1000, 1ULL << 16);
  ext_add (&hb, QCOW2_EXT_BITMAPS, bm, sizeof bm);
  expect_reject_hb (&hb, &s, EINVAL, "nb_bitmaps", "bitmaps nb 0");
  hdr_build (&hb, &s);
  bitmaps_ext (bm, 1, 1, 1000, 1ULL << 16);
  ext_add (&hb, QCOW2_EXT_BITMAPS, bm, sizeof bm);
  expect_reject_hb (&hb, &s, EINVAL, "reserved", "bitmaps reserved");
  hdr_build (&hb, &s);
  bitmaps_ext (bm, 1, 0, 1000, (1ULL << 16) + 512);
  ext_add (&hb, QCOW2_EXT_BITMAPS, bm, sizeof bm);
  expect_reject_hb (&hb, &s, EINVAL, "bitmap directory",
                    "bitmap directory unaligned");
  hdr_build (&hb, &s);
  bitmaps_ext (bm, 1, 0, 1000, s.file_size);
  ext_add (&hb, QCOW2_EXT_BITMAPS, bm, sizeof bm);
  expect_reject_hb (&hb, &s, EINVAL, "bitmap directory",
                    "bitmap directory past EOF");
  hdr_build (&hb, &s);
  bitmaps_ext (bm, 1, 0, 1000, 1ULL << 16);
  ext_add (&hb, QCOW2_EXT_BITMAPS, bm, 16);
  expect_reject_hb (&hb, &s, EINVAL, "bitmaps", "bitmaps length 16");

  /* Extension-specific limits. */
  s = spec_default (3, 16);
  hdr_build (&hb, &s);
  ext_add (&hb, QCOW2_EXT_BACKING_FORMAT, "0123456789abcdef", 16);
  expect_reject_hb (&hb, &s, EINVAL, "backing format", "backing fmt 16");
  hdr_build (&hb, &s);
  ext_add (&hb, QCOW2_EXT_BACKING_FORMAT, "0123456789abcde", 15);
  CHECK_EQ_INT (parse (&hb, &s, &h), 0);
  CHECK (h.backing_format &&
         strcmp (h.backing_format, "0123456789abcde") == 0);
  q2_header_free (&h);
  free (hb.buf);
  hdr_build (&hb, &s);
  ext_add (&hb, QCOW2_EXT_DATA_FILE, "a\0b", 3);
  expect_reject_hb (&hb, &s, EINVAL, "data file", "data file NUL");
  hdr_build (&hb, &s);
  ext_add (&hb, QCOW2_EXT_DATA_FILE, "", 0);
  expect_reject_hb (&hb, &s, EINVAL, "data file", "data file empty");
  hdr_build (&hb, &s);
  ext_add (&hb, QCOW2_EXT_CRYPTO, "0123456789abcdef0123", 20);
  expect_reject_hb (&hb, &s, EINVAL, "encryption", "crypto length 20");

  /* The data file bit needs the extension. */
  s = spec_default (3, 16);
  s.incompat = QCOW2_INCOMPAT_DATA_FILE;
  expect_reject (&s, EINVAL, "data file", "data file bit, no extension");

  /* LUKS needs the crypto extension; with it the header parses. */
  s = spec_default (3, 16);
  s.crypt_method = 2;
  expect_reject (&s, EINVAL, "crypt_method", "LUKS, no crypto extension");
  hdr_build (&hb, &s);
  {
    uint8_t c[16];
    q2_put_be64 (c, 1ULL << 16);
    q2_put_be64 (c + 8, 4096);
    ext_add (&hb, QCOW2_EXT_CRYPTO, c, 16);
  }
  CHECK_EQ_INT (parse (&hb, &s, &h), 0);
  CHECK (h.has_crypto_ext);
  CHECK_EQ_U64 (h.crypto_offset, 1ULL << 16);
  CHECK_EQ_U64 (h.crypto_length, 4096);
  q2_header_free (&h);
  free (hb.buf);

  /* An extension after the end marker is not parsed. */
  s = spec_default (3, 16);
  hdr_build (&hb, &s);
  ext_add (&hb, QCOW2_EXT_BACKING_FORMAT, "raw", 3);
  ext_add (&hb, QCOW2_EXT_END, "", 0);
  ext_add (&hb, 0x77777777, "ignored", 7);
  CHECK_EQ_INT (parse (&hb, &s, &h), 0);
  CHECK (h.backing_format && strcmp (h.backing_format, "raw") == 0);
  CHECK_EQ_U64 (h.nb_unknown_exts, 0);
  q2_header_free (&h);
  free (hb.buf);
}

static void
test_backing_file (void)
{
  struct spec s = spec_default (3, 16);
  struct hbuf hb;
  struct q2_header h;
  static const char name[] = "../images/base image.qcow2";

  s.backing_file_offset = 0x200;
  s.backing_file_size = strlen (name);
  hdr_build (&hb, &s);
  ext_add (&hb, QCOW2_EXT_BACKING_FORMAT, "qcow2", 5);
  memcpy (hb.buf + 0x200, name, strlen (name));
  /* Bytes after the name are not part of it. */
  memcpy (hb.buf + 0x200 + strlen (name), "JUNK", 4);
  CHECK_EQ_INT (parse (&hb, &s, &h), 0);
  CHECK (h.backing_file && strcmp (h.backing_file, name) == 0);
  CHECK_EQ_U64 (h.backing_file_size, strlen (name));
  CHECK (h.backing_format && strcmp (h.backing_format, "qcow2") == 0);
  q2_header_free (&h);
  free (hb.buf);

  /* v2 with a backing file: extensions stop at the name. */
  s = spec_default (2, 16);
  s.backing_file_offset = 72 + 16;
  s.backing_file_size = 4;
  hdr_build (&hb, &s);
  ext_add (&hb, QCOW2_EXT_BACKING_FORMAT, "raw", 3);
  memcpy (hb.buf + 88, "base", 4);
  CHECK_EQ_INT (parse (&hb, &s, &h), 0);
  CHECK (h.backing_file && strcmp (h.backing_file, "base") == 0);
  CHECK (h.backing_format && strcmp (h.backing_format, "raw") == 0);
  q2_header_free (&h);
  free (hb.buf);

  /* A name of the maximum length 1023, ending at the end of the cluster. */
  s = spec_default (3, 16);
  s.backing_file_size = 1023;
  s.backing_file_offset = (1 << 16) - 1023;
  hdr_build (&hb, &s);
  memset (hb.buf + s.backing_file_offset, 'n', 1023);
  CHECK_EQ_INT (parse (&hb, &s, &h), 0);
  CHECK (h.backing_file && strlen (h.backing_file) == 1023);
  q2_header_free (&h);
  free (hb.buf);

  /* Rejections. */
  s = spec_default (3, 16);
  s.backing_file_offset = 0x200;
  s.backing_file_size = 1024;
  hdr_build (&hb, &s);
  memset (hb.buf + 0x200, 'n', 1024);
  expect_reject_hb (&hb, &s, EINVAL, "backing_file_size", "backing 1024");

  s.backing_file_size = 0;
  expect_reject (&s, EINVAL, "backing_file_size", "backing size 0");

  s = spec_default (3, 16);
  s.backing_file_offset = (1 << 16) - 4;
  s.backing_file_size = 8;
  expect_reject (&s, EINVAL, "backing_file_size", "backing past cluster");

  s = spec_default (3, 16);
  s.backing_file_offset = (1 << 16) + 8;
  s.backing_file_size = 4;
  expect_reject (&s, EINVAL, "backing_file_offset", "backing offset > cs");

  s = spec_default (3, 16);
  s.backing_file_offset = 64;   /* inside the header */
  s.backing_file_size = 4;
  expect_reject (&s, EINVAL, "backing_file_offset", "backing in header");

  s = spec_default (3, 16);
  s.backing_file_offset = 0x200;
  s.backing_file_size = 5;
  hdr_build (&hb, &s);
  memcpy (hb.buf + 0x200, "ba\0se", 5);
  expect_reject_hb (&hb, &s, EINVAL, "backing file name", "backing NUL");
}

/* ---- rejections ---- */

static void
test_reject_basic (void)
{
  struct spec s;
  struct hbuf hb;
  struct q2_header h;

  s = spec_default (3, 16);
  s.magic = 0x514649fa;
  expect_reject (&s, EINVAL, "magic", "bad magic");

  s = spec_default (3, 16);
  s.version = 1;
  expect_reject (&s, ENOTSUP, "version", "version 1");
  s.version = 4;
  expect_reject (&s, ENOTSUP, "version", "version 4");

  s = spec_default (3, 16);
  s.cluster_bits = 8;
  expect_reject (&s, EINVAL, "cluster_bits", "cluster_bits 8");
  s.cluster_bits = 22;
  expect_reject (&s, EINVAL, "cluster_bits", "cluster_bits 22");
  s = spec_default (2, 16);
  s.cluster_bits = 8;
  expect_reject (&s, EINVAL, "cluster_bits", "v2 cluster_bits 8");

  s = spec_default (3, 16);
  s.header_length = 100;
  expect_reject (&s, EINVAL, "header_length", "header_length 100");
  s.header_length = 108;
  expect_reject (&s, EINVAL, "header_length", "header_length 108");
  s.header_length = 0;
  expect_reject (&s, EINVAL, "header_length", "header_length 0");
  /* Beyond the 512-byte cluster. */
  s = spec_default (3, 9);
  s.header_length = 520;
  expect_reject (&s, EINVAL, "header_length", "header_length > cluster");

  s = spec_default (3, 16);
  s.refcount_order = 7;
  expect_reject (&s, EINVAL, "refcount_order", "refcount_order 7");

  s = spec_default (3, 16);
  s.crypt_method = 3;
  expect_reject (&s, EINVAL, "crypt_method", "crypt_method 3");

  /* Short buffers. */
  s = spec_default (3, 16);
  hdr_build (&hb, &s);
  memset (&h, 0x5a, sizeof h);
  CHECK_EQ_INT (q2_header_parse (hb.buf, 71, s.file_size, 0, &h), -EINVAL);
  CHECK (header_is_cleared (&h));
  CHECK_EQ_INT (q2_header_parse (hb.buf, 100, s.file_size, 0, &h), -EINVAL);
  CHECK_STR_CONTAINS (q2_last_error (), "version 3");
  /* header_length 112 but only 104 bytes in the file. */
  CHECK_EQ_INT (q2_header_parse (hb.buf, 104, s.file_size, 0, &h), -EINVAL);
  CHECK_STR_CONTAINS (q2_last_error (), "header_length");
  /* A file that ends right after the header is fine. */
  CHECK_EQ_INT (q2_header_parse (hb.buf, 112, s.file_size, 0, &h), 0);
  q2_header_free (&h);
  free (hb.buf);
}

static void
test_reject_compression (void)
{
  struct spec s;

  /* compression_type 1 without bit 3 */
  s = spec_default (3, 16);
  s.compression_type = 1;
  expect_reject (&s, EINVAL, "compression_type", "ctype 1 no bit");
  /* bit 3 with compression_type 0 */
  s = spec_default (3, 16);
  s.incompat = QCOW2_INCOMPAT_COMPRESSION;
  expect_reject (&s, EINVAL, "compression_type", "bit, ctype 0");
  /* bit 3 and a header too short to have the field */
  s.header_length = 104;
  expect_reject (&s, EINVAL, "compression_type", "bit, header 104");
  /* unknown compression type */
  s = spec_default (3, 16);
  s.incompat = QCOW2_INCOMPAT_COMPRESSION;
  s.compression_type = 2;
  expect_reject (&s, ENOTSUP, "compression_type", "ctype 2");
}

static void
test_reject_incompatible (void)
{
  struct spec s;
  struct hbuf hb;
  uint8_t ft[2 * 48];

  s = spec_default (3, 16);
  s.incompat = 1ULL << 5;
  expect_reject (&s, ENOTSUP, "incompatible_features", "bit 5, no name");
  expect_reject (&s, ENOTSUP, "bit 5", "bit 5, no name (bit)");

  s.incompat = 1ULL << 63;
  expect_reject (&s, ENOTSUP, "bit 63", "bit 63, no name");

  /* Named in the feature table: the message uses the name. */
  s.incompat = (1ULL << 5) | (1ULL << 9);
  hdr_build (&hb, &s);
  feature_entry (ft, 0, 5, "shiny new feature");
  feature_entry (ft + 48, 1, 9, "compat bit 9, not this one");
  ext_add (&hb, QCOW2_EXT_FEATURE_TABLE, ft, sizeof ft);
  expect_reject_hb (&hb, &s, ENOTSUP, "shiny new feature", "named bit 5");
  hdr_build (&hb, &s);
  ext_add (&hb, QCOW2_EXT_FEATURE_TABLE, ft, sizeof ft);
  expect_reject_hb (&hb, &s, ENOTSUP, "bit 9", "unnamed bit 9");
  hdr_build (&hb, &s);
  ext_add (&hb, QCOW2_EXT_FEATURE_TABLE, ft, sizeof ft);
  expect_reject_hb (&hb, &s, ENOTSUP, "incompatible_features",
                    "named bit 5 field");

  /* Every unknown bit, each with a 46-character name: the message is
   * bounded and still names the first. */
  {
    uint8_t big[59 * 48];
    char nm[47];
    int b;

    s = spec_default (3, 16);
    s.incompat = ~QCOW2_INCOMPAT_KNOWN;
    hdr_build (&hb, &s);
    for (b = 5; b < 64; b++) {
      memset (nm, 'a' + b % 26, 46);
      nm[46] = '\0';
      nm[0] = '0' + b / 10;
      nm[1] = '0' + b % 10;
      feature_entry (big + (b - 5) * 48, 0, b, nm);
    }
    ext_add (&hb, QCOW2_EXT_FEATURE_TABLE, big, sizeof big);
    expect_reject_hb (&hb, &s, ENOTSUP, "'05ffffff", "all unknown bits named");
    CHECK (strlen (q2_last_error ()) < 1024);
  }

  /* All known bits together are accepted (with what they need). */
  s = spec_default (3, 16);
  s.incompat = QCOW2_INCOMPAT_KNOWN;
  s.compression_type = 1;
  s.size = 1ULL << 30;
  s.l1_size = l1_needed (s.size, 16, true);
  hdr_build (&hb, &s);
  ext_add (&hb, QCOW2_EXT_DATA_FILE, "d", 1);
  {
    struct q2_header h;
    CHECK_EQ_INT (parse (&hb, &s, &h), 0);
    CHECK_EQ_U64 (h.incompatible_features, QCOW2_INCOMPAT_KNOWN);
    q2_header_free (&h);
  }
  free (hb.buf);

  /* Extended L2 needs cluster_bits >= 14. */
  s = spec_default (3, 13);
  s.incompat = QCOW2_INCOMPAT_EXTL2;
  s.l1_size = l1_needed (s.size, 13, true);
  expect_reject (&s, EINVAL, "cluster_bits", "extl2 cluster_bits 13");
  s = spec_default (3, 14);
  s.incompat = QCOW2_INCOMPAT_EXTL2;
  s.l1_size = l1_needed (s.size, 14, true);
  hdr_build (&hb, &s);
  {
    struct q2_header h;
    unit_context ("extl2 cluster_bits 14");
    CHECK_EQ_INT (parse (&hb, &s, &h), 0);
    q2_header_free (&h);
    unit_context (NULL);
  }
  free (hb.buf);
  /* ... and an L1 table sized for 8-byte entries is too small. */
  s.l1_size = l1_needed (s.size, 14, true) - 1;
  expect_reject (&s, EINVAL, "l1_size", "extl2 l1_size");
}

static void
test_reject_tables (void)
{
  struct spec s;

  s = spec_default (3, 16);
  s.l1_size = l1_needed (s.size, 16, false) - 1;
  expect_reject (&s, EINVAL, "l1_size", "l1_size too small");
  s.size = (1ULL << 30) + 512;  /* one byte into the next L2 range */
  s.l1_size = 2;
  expect_reject (&s, EINVAL, "l1_size", "l1_size too small by a sector");
  s.l1_size = 3;
  {
    struct hbuf hb;
    struct q2_header h;
    hdr_build (&hb, &s);
    CHECK_EQ_INT (parse (&hb, &s, &h), 0);
    q2_header_free (&h);
    free (hb.buf);
  }

  s = spec_default (3, 16);
  s.size = 1ULL << 63;
  s.l1_size = UINT32_MAX;
  expect_reject (&s, EINVAL, "size", "size > INT64_MAX");

  s = spec_default (3, 16);
  s.l1_table_offset += 512;
  expect_reject (&s, EINVAL, "l1_table_offset", "l1 unaligned");
  s = spec_default (3, 16);
  s.l1_table_offset = s.file_size;
  expect_reject (&s, EINVAL, "l1_table_offset", "l1 at EOF");
  s = spec_default (3, 16);
  s.l1_table_offset = s.file_size - (1 << 16);
  s.l1_size = (1 << 16) / 8 + 1;    /* one entry past EOF */
  expect_reject (&s, EINVAL, "l1_table_offset", "l1 runs past EOF");
  s = spec_default (3, 16);
  s.l1_table_offset = 1ULL << 60;
  expect_reject (&s, EINVAL, "l1_table_offset", "l1 far past EOF");
  s = spec_default (3, 16);
  s.l1_size = (32u << 20) / 8 + 1;
  s.file_size = 1ULL << 40;
  expect_reject (&s, EINVAL, "L1", "l1 larger than 32 MiB");

  s = spec_default (3, 16);
  s.refcount_table_clusters = 0;
  expect_reject (&s, EINVAL, "refcount_table_clusters", "reftable 0");
  s.refcount_table_clusters = 0x10000;       /* 4 GiB */
  s.file_size = 1ULL << 40;
  expect_reject (&s, EINVAL, "refcount_table", "reftable huge");
  s.refcount_table_clusters = UINT32_MAX;
  expect_reject (&s, EINVAL, "refcount_table", "reftable 2^32-1");
  s = spec_default (3, 16);
  s.refcount_table_offset += 4096;
  expect_reject (&s, EINVAL, "refcount_table_offset", "reftable unaligned");
  s = spec_default (3, 16);
  s.refcount_table_offset = s.file_size;
  expect_reject (&s, EINVAL, "refcount_table_offset", "reftable past EOF");

  s = spec_default (3, 16);
  s.nb_snapshots = 65537;
  s.snapshots_offset = 2 << 16;
  s.file_size = 1ULL << 40;
  expect_reject (&s, EINVAL, "nb_snapshots", "nb_snapshots 65537");
  s = spec_default (3, 16);
  s.nb_snapshots = 1;
  s.snapshots_offset = (2 << 16) + 8;
  expect_reject (&s, EINVAL, "snapshots_offset", "snapshots unaligned");
  s.snapshots_offset = s.file_size;
  expect_reject (&s, EINVAL, "snapshots_offset", "snapshots past EOF");
  s.snapshots_offset = 2 << 16;
  {
    struct hbuf hb;
    struct q2_header h;
    hdr_build (&hb, &s);
    CHECK_EQ_INT (parse (&hb, &s, &h), 0);
    CHECK_EQ_U64 (h.nb_snapshots, 1);
    q2_header_free (&h);
    free (hb.buf);
  }
}

static void
test_reject_extension_area (void)
{
  struct spec s = spec_default (3, 16);
  struct hbuf hb;

  /* Length runs past the end of the cluster. */
  hdr_build (&hb, &s);
  q2_put_be32 (hb.buf + 112, QCOW2_EXT_BACKING_FORMAT);
  q2_put_be32 (hb.buf + 116, (1 << 16) - 112 - 8 + 1);
  expect_reject_hb (&hb, &s, EINVAL, "length", "ext past cluster");

  /* Length runs into the backing file name. */
  s.backing_file_offset = 0x200;
  s.backing_file_size = 4;
  hdr_build (&hb, &s);
  memcpy (hb.buf + 0x200, "base", 4);
  q2_put_be32 (hb.buf + 112, 0x11223344);
  q2_put_be32 (hb.buf + 116, 0x200 - 112 - 8 + 1);
  expect_reject_hb (&hb, &s, EINVAL, "length", "ext into backing name");
  /* ... while one that just fits is fine. */
  hdr_build (&hb, &s);
  memcpy (hb.buf + 0x200, "base", 4);
  q2_put_be32 (hb.buf + 112, 0x11223344);
  q2_put_be32 (hb.buf + 116, 0x200 - 112 - 8);
  {
    struct q2_header h;
    unit_context ("ext fits before backing name");
    CHECK_EQ_INT (parse (&hb, &s, &h), 0);
    CHECK_EQ_U64 (h.nb_unknown_exts, 1);
    CHECK (h.backing_file && strcmp (h.backing_file, "base") == 0);
    q2_header_free (&h);
    unit_context (NULL);
  }
  free (hb.buf);

  /* A huge length (would wrap 32-bit arithmetic). */
  s = spec_default (3, 16);
  hdr_build (&hb, &s);
  q2_put_be32 (hb.buf + 112, 0x11223344);
  q2_put_be32 (hb.buf + 116, UINT32_MAX);
  expect_reject_hb (&hb, &s, EINVAL, "length", "ext length 2^32-1");

  /* The header of the extension itself truncated by the backing name. */
  s.backing_file_offset = 116;
  s.backing_file_size = 4;
  hdr_build (&hb, &s);
  q2_put_be32 (hb.buf + 112, 0x11223344);
  memcpy (hb.buf + 116, "base", 4);
  expect_reject_hb (&hb, &s, EINVAL, "extension", "ext header truncated");
}

/* internal.h: "On error the header is cleared."  Checked for a
 * rejection from each stage of the parser. */
static void
test_reject_clears_header (void)
{
  static const struct {
    const char *what;
    int field;
    uint64_t value;
  } cases[] = {
    { "bad magic", 0, 0x12345678 },
    { "version 4", 1, 4 },
    { "cluster_bits 22", 2, 22 },
    { "header_length 108", 3, 108 },
    { "header_length 100", 3, 100 },
    { "refcount_order 7", 4, 7 },
    { "l1_size 1", 5, 1 },
    { "refcount_table_clusters 0", 6, 0 },
  };
  size_t i;

  for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    struct spec s = spec_default (3, 16);
    struct hbuf hb;
    struct q2_header h;

    switch (cases[i].field) {
    case 0: s.magic = cases[i].value; break;
    case 1: s.version = cases[i].value; break;
    case 2: s.cluster_bits = cases[i].value; break;
    case 3: s.header_length = cases[i].value; break;
    case 4: s.refcount_order = cases[i].value; break;
    case 5: s.l1_size = cases[i].value; break;
    case 6: s.refcount_table_clusters = cases[i].value; break;
    }
    unit_context ("%s", cases[i].what);
    hdr_build (&hb, &s);
    memset (&h, 0x5a, sizeof h);
    CHECK (parse (&hb, &s, &h) < 0);
    CHECK (header_pointers_cleared (&h));
    CHECK (header_is_cleared (&h));
    if (!header_is_cleared (&h))
      fprintf (stderr, "    (version %u, cluster_bits %u, header_length %u "
               "left behind)\n", h.version, h.cluster_bits, h.header_length);
    free (hb.buf);
  }
  unit_context (NULL);
}

int
main (void)
{
  RUN (test_v2_defaults);
  RUN (test_v3_zstd);
  RUN (test_every_cluster_size);
  RUN (test_refcount_orders);
  RUN (test_extensions);
  RUN (test_backing_file);
  RUN (test_reject_basic);
  RUN (test_reject_compression);
  RUN (test_reject_incompatible);
  RUN (test_reject_tables);
  RUN (test_reject_extension_area);
  RUN (test_reject_clears_header);
  return unit_done ();
}
