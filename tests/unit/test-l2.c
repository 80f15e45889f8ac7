/* q2_decode_l2 on a hand-made struct q2_image: standard entries,
 * compressed descriptors for every cluster size, extended L2 subcluster
 * bitmaps and external data files. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "internal.h"
#include "unit.h"

#define DATA_FILE QCOW2_INCOMPAT_DATA_FILE
#define EXTL2 QCOW2_INCOMPAT_EXTL2

/* The geometry fields exactly as open.c's setup_qcow2 computes them. */
static void
img_setup (struct q2_image *img, uint32_t cluster_bits, uint64_t incompat)
{
  struct q2_header *h = &img->hdr;

  memset (img, 0, sizeof *img);
  img->fmt = Q2_FMT_QCOW2;
  h->version = 3;
  h->cluster_bits = cluster_bits;
  h->refcount_order = 4;
  h->header_length = 112;
  h->incompatible_features = incompat;
  q2_set_geometry (img);
  /* No files; a data_fd unlike fd is what says "external data file". */
  img->fd = -1;
  img->data_fd = incompat & DATA_FILE ? -2 : -1;
}

/* Decodes and returns the result; d is filled with a sentinel first so
 * that stale values are caught.  The entry is taken as guest cluster
 * guest_of(entry)'s: the one a data file requires. */
static uint64_t guest_delta;

static int
decode (const struct q2_image *img, uint64_t entry, uint64_t bitmap,
        unsigned sc, struct q2_l2_decoded *d)
{
  memset (d, 0xa5, sizeof *d);
  return q2_decode_l2 (img, entry, bitmap, sc,
                       (entry & L2E_OFFSET_MASK & ~511ULL) + guest_delta, d);
}

static void
expect (const struct q2_image *img, uint64_t entry, uint64_t bitmap,
        unsigned sc, enum q2_type type, uint64_t host)
{
  struct q2_l2_decoded d;

  CHECK_EQ_INT (decode (img, entry, bitmap, sc, &d), 0);
  CHECK_EQ_INT (d.type, type);
  CHECK_EQ_U64 (d.host_offset, host);
  if (type != Q2_COMPRESSED)
    CHECK_EQ_U64 (d.csize, 0);
}

static void
expect_eio (const struct q2_image *img, uint64_t entry, uint64_t bitmap,
            unsigned sc, const char *msg)
{
  struct q2_l2_decoded d;

  CHECK_EQ_INT (decode (img, entry, bitmap, sc, &d), -EIO);
  CHECK_STR_CONTAINS (q2_last_error (), msg);
}

/* The COPIED flag as decoded (refcount 1: writable in place). */
static void
expect_copied (const struct q2_image *img, uint64_t entry, uint64_t bitmap,
               unsigned sc, bool copied)
{
  struct q2_l2_decoded d;

  CHECK_EQ_INT (decode (img, entry, bitmap, sc, &d), 0);
  CHECK_EQ_INT (d.copied, copied);
}

/* ---- standard entries ---- */

static void
test_standard (void)
{
  struct q2_image img;
  int bit;

  img_setup (&img, 16, 0);

  unit_context ("unallocated");
  expect (&img, 0, 0, 0, Q2_UNALLOC, 0);
  /* COPIED with offset 0 is still unallocated without a data file. */
  expect (&img, QCOW_OFLAG_COPIED, 0, 0, Q2_UNALLOC, 0);

  unit_context ("normal");
  expect (&img, QCOW_OFLAG_COPIED | 0x50000, 0, 0, Q2_NORMAL, 0x50000);
  /* refcount > 1: no COPIED, still normal */
  expect (&img, 0x50000, 0, 0, Q2_NORMAL, 0x50000);
  /* The highest cluster-aligned offset the mask allows. */
  expect (&img, QCOW_OFLAG_COPIED | (L2E_OFFSET_MASK & ~0xffffULL), 0, 0,
          Q2_NORMAL, L2E_OFFSET_MASK & ~0xffffULL);

  unit_context ("zero");
  expect (&img, QCOW_OFLAG_ZERO, 0, 0, Q2_ZERO, 0);
  expect (&img, QCOW_OFLAG_ZERO | QCOW_OFLAG_COPIED, 0, 0, Q2_ZERO, 0);
  expect (&img, QCOW_OFLAG_ZERO | QCOW_OFLAG_COPIED | 0x70000, 0, 0,
          Q2_ZERO, 0x70000);
  expect (&img, QCOW_OFLAG_ZERO | 0x70000, 0, 0, Q2_ZERO, 0x70000);

  unit_context ("copied");
  expect_copied (&img, QCOW_OFLAG_COPIED | 0x50000, 0, 0, true);
  expect_copied (&img, 0x50000, 0, 0, false);
  expect_copied (&img, QCOW_OFLAG_COPIED, 0, 0, false);
  expect_copied (&img, 0, 0, 0, false);
  expect_copied (&img, QCOW_OFLAG_ZERO | QCOW_OFLAG_COPIED | 0x70000, 0, 0,
                 true);
  expect_copied (&img, QCOW_OFLAG_ZERO | 0x70000, 0, 0, false);
  expect_copied (&img, QCOW_OFLAG_ZERO | QCOW_OFLAG_COPIED, 0, 0, false);
  expect_copied (&img, QCOW_OFLAG_COMPRESSED | 0x12345, 0, 0, false);

  unit_context ("unaligned");
  expect_eio (&img, QCOW_OFLAG_COPIED | 0x50200, 0, 0, "aligned");
  expect_eio (&img, 0x58000, 0, 0, "aligned");
  expect_eio (&img, QCOW_OFLAG_ZERO | 0x50200, 0, 0, "aligned");

  /* Reserved bits 1-8 and 56-61, alone and on a valid entry. */
  for (bit = 1; bit <= 61; bit++) {
    if (bit > 8 && bit < 56)
      continue;
    unit_context ("reserved bit %d", bit);
    expect_eio (&img, 1ULL << bit, 0, 0, "reserved");
    expect_eio (&img, QCOW_OFLAG_COPIED | 0x50000 | (1ULL << bit), 0, 0,
                "reserved");
    expect_eio (&img, QCOW_OFLAG_ZERO | (1ULL << bit), 0, 0, "reserved");
  }
  /* Offset bits 9-55 are not reserved (only alignment matters). */
  for (bit = 16; bit <= 55; bit++) {
    unit_context ("offset bit %d", bit);
    expect (&img, 1ULL << bit, 0, 0, Q2_NORMAL, 1ULL << bit);
  }
  unit_context (NULL);
}

/* Alignment and the offset field for every cluster size. */
static void
test_standard_every_cluster_size (void)
{
  uint32_t cb;

  for (cb = 9; cb <= 21; cb++) {
    struct q2_image img;
    uint64_t cs = 1ULL << cb;
    uint64_t top = L2E_OFFSET_MASK & ~(cs - 1);

    unit_context ("cluster_bits %u", cb);
    img_setup (&img, cb, 0);
    expect (&img, 0, 0, 0, Q2_UNALLOC, 0);
    expect (&img, QCOW_OFLAG_COPIED | (7 * cs), 0, 0, Q2_NORMAL, 7 * cs);
    expect (&img, QCOW_OFLAG_COPIED | top, 0, 0, Q2_NORMAL, top);
    expect (&img, QCOW_OFLAG_ZERO | (3 * cs), 0, 0, Q2_ZERO, 3 * cs);
    if (cb > 9) {
      expect_eio (&img, QCOW_OFLAG_COPIED | (7 * cs + 512), 0, 0, "aligned");
      expect_eio (&img, QCOW_OFLAG_COPIED | (7 * cs + cs / 2), 0, 0,
                  "aligned");
    }
  }
  unit_context (NULL);
}

/* ---- compressed descriptors ---- */

static void
check_compressed (const struct q2_image *img, uint64_t off, uint64_t nb)
{
  uint64_t entry = QCOW_OFLAG_COMPRESSED | (nb << img->csize_shift) | off;
  struct q2_l2_decoded d;

  unit_context ("cluster_bits %u offset %#llx nb_csectors %llu",
                img->cluster_bits, (unsigned long long) off,
                (unsigned long long) nb);
  CHECK_EQ_INT (decode (img, entry, 0, 0, &d), 0);
  CHECK_EQ_INT (d.type, Q2_COMPRESSED);
  CHECK_EQ_U64 (d.host_offset, off);
  CHECK_EQ_U64 (d.csize, (nb + 1) * 512 - (off & 511));
  /* The whole compressed range must stay below 2^56 + 2 clusters. */
  CHECK (d.csize >= 1 && d.csize <= 2 * img->cluster_size);
}

static void
test_compressed_every_cluster_size (void)
{
  uint32_t cb;

  for (cb = 9; cb <= 21; cb++) {
    struct q2_image img;
    uint64_t max_off, nbs[4];
    static const uint64_t offs[] = {
      0, 1, 511, 512, 0x12345, 0x12345 + 2, 0x12345 + 0x1bc, 0x1000000,
      0xabcdef123ULL, 0x123456789abULL,
    };
    size_t i, j;

    img_setup (&img, cb, 0);
    CHECK_EQ_U64 (img.csize_shift, 62 - (cb - 8));
    CHECK_EQ_U64 (img.csize_mask + 1, img.cluster_size / 256);
    max_off = Q2_MIN (img.coffset_mask, QCOW2_MAX_HOST_OFFSET);
    nbs[0] = 0;
    nbs[1] = 1;
    nbs[2] = img.csize_mask / 2;
    nbs[3] = img.csize_mask;
    for (i = 0; i < sizeof offs / sizeof offs[0]; i++)
      for (j = 0; j < 4; j++)
        check_compressed (&img, offs[i], nbs[j]);
    /* The largest offset: every offset bit that is allowed set. */
    for (j = 0; j < 4; j++) {
      check_compressed (&img, max_off, nbs[j]);
      check_compressed (&img, max_off - 0x200, nbs[j]);
    }

    /* All of bits 0-61 set: offset and count fields must not bleed
     * into each other. */
    if (img.coffset_mask <= QCOW2_MAX_HOST_OFFSET) {
      struct q2_l2_decoded d;
      unit_context ("cluster_bits %u all ones", cb);
      CHECK_EQ_INT (decode (&img, QCOW_OFLAG_COMPRESSED |
                            ((1ULL << 62) - 1), 0, 0, &d), 0);
      CHECK_EQ_INT (d.type, Q2_COMPRESSED);
      CHECK_EQ_U64 (d.host_offset, img.coffset_mask);
      CHECK_EQ_U64 (d.csize, (img.csize_mask + 1) * 512 - 511);
    }
    else {
      /* Offset bits above 55 must be zero (cluster_bits < 14). */
      uint64_t bit;
      for (bit = 56; bit < img.csize_shift; bit++) {
        unit_context ("cluster_bits %u offset bit %llu", cb,
                      (unsigned long long) bit);
        expect_eio (&img, QCOW_OFLAG_COMPRESSED | (1ULL << bit) | 0x12345,
                    0, 0, "offset");
      }
    }

    unit_context ("cluster_bits %u compressed+COPIED", cb);
    expect_eio (&img, QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_COPIED | 0x12345,
                0, 0, "COPIED");

    /* No compressed clusters with an external data file. */
    img_setup (&img, cb, DATA_FILE);
    unit_context ("cluster_bits %u compressed+data file", cb);
    expect_eio (&img, QCOW_OFLAG_COMPRESSED | 0x12345, 0, 0, "data file");
  }
  unit_context (NULL);
}

/* A few fully worked descriptors from the format notes' table. */
static void
test_compressed_worked (void)
{
  struct q2_image img;
  struct q2_l2_decoded d;

  /* 64 KiB clusters: offset bits 0-53, count bits 54-61. */
  img_setup (&img, 16, 0);
  CHECK_EQ_U64 (img.csize_shift, 54);
  CHECK_EQ_U64 (img.csize_mask, 255);
  CHECK_EQ_INT (decode (&img, 0x4000000000000000ULL | (3ULL << 54) | 0x10123,
                        0, 0, &d), 0);
  CHECK_EQ_U64 (d.host_offset, 0x10123);
  CHECK_EQ_U64 (d.csize, 4 * 512 - 0x123);

  /* 2 MiB clusters: 0-48 / 49-61. */
  img_setup (&img, 21, 0);
  CHECK_EQ_U64 (img.csize_shift, 49);
  CHECK_EQ_U64 (img.csize_mask, 8191);
  CHECK_EQ_INT (decode (&img, 0x4000000000000000ULL | (8191ULL << 49) |
                        0x1ffffffffffffULL, 0, 0, &d), 0);
  CHECK_EQ_U64 (d.host_offset, 0x1ffffffffffffULL);
  CHECK_EQ_U64 (d.csize, 8192 * 512 - 511);

  /* 512-byte clusters: 0-60 / 61, so a single count bit. */
  img_setup (&img, 9, 0);
  CHECK_EQ_U64 (img.csize_shift, 61);
  CHECK_EQ_U64 (img.csize_mask, 1);
  CHECK_EQ_INT (decode (&img, 0x6000000000000000ULL | 0xfffffffffffe01ULL,
                        0, 0, &d), 0);
  CHECK_EQ_U64 (d.host_offset, 0xfffffffffffe01ULL);
  CHECK_EQ_U64 (d.csize, 1024 - 1);
}

/* ---- extended L2 ---- */

#define ALLOC(sc) (1ULL << (sc))
#define ZERO(sc) (1ULL << (32 + (sc)))

static void
test_extended (void)
{
  uint32_t cb;

  for (cb = 14; cb <= 21; cb++) {
    struct q2_image img;
    uint64_t cs = 1ULL << cb;
    uint64_t host = 9 * cs;
    uint64_t bitmap = 0;
    unsigned sc, k;

    img_setup (&img, cb, EXTL2);
    CHECK (img.extended_l2);

    /* Mixed bitmap: sc % 3 == 0 allocated, 1 zero, 2 unallocated. */
    for (sc = 0; sc < 32; sc++) {
      if (sc % 3 == 0)
        bitmap |= ALLOC (sc);
      else if (sc % 3 == 1)
        bitmap |= ZERO (sc);
    }
    for (sc = 0; sc < 32; sc++) {
      unit_context ("cluster_bits %u allocated, sc %u", cb, sc);
      expect (&img, QCOW_OFLAG_COPIED | host, bitmap, sc,
              sc % 3 == 0 ? Q2_NORMAL : sc % 3 == 1 ? Q2_ZERO : Q2_UNALLOC,
              host);
      /* Each kind alone. */
      expect (&img, QCOW_OFLAG_COPIED | host, ALLOC (sc), sc, Q2_NORMAL,
              host);
      expect_copied (&img, QCOW_OFLAG_COPIED | host, ALLOC (sc), sc, true);
      expect_copied (&img, host, ALLOC (sc), sc, false);
      expect (&img, host, ALLOC (sc), sc, Q2_NORMAL, host);
      expect (&img, QCOW_OFLAG_COPIED | host, ZERO (sc), sc, Q2_ZERO, host);
      expect (&img, QCOW_OFLAG_COPIED | host, 0, sc, Q2_UNALLOC, host);
      /* The neighbours' bits do not affect sc. */
      expect (&img, QCOW_OFLAG_COPIED | host,
              0xffffffffULL & ~ALLOC (sc), sc, Q2_UNALLOC, host);
      expect (&img, QCOW_OFLAG_COPIED | host,
              0xffffffff00000000ULL & ~ZERO (sc), sc, Q2_UNALLOC, host);
      expect (&img, QCOW_OFLAG_COPIED | host, 0xffffffffULL, sc, Q2_NORMAL,
              host);
      expect (&img, QCOW_OFLAG_COPIED | host, 0xffffffff00000000ULL, sc,
              Q2_ZERO, host);

      /* Unallocated cluster: zero bits are fine, alloc bits are not. */
      unit_context ("cluster_bits %u unallocated, sc %u", cb, sc);
      expect (&img, 0, ZERO (sc), sc, Q2_ZERO, 0);
      expect (&img, 0, 0, sc, Q2_UNALLOC, 0);
      expect (&img, 0, 0xffffffff00000000ULL & ~ZERO (sc), sc, Q2_UNALLOC, 0);
      expect (&img, 0, bitmap & 0xffffffff00000000ULL, sc,
              sc % 3 == 1 ? Q2_ZERO : Q2_UNALLOC, 0);
      for (k = 0; k < 32; k += 7)
        expect_eio (&img, 0, ALLOC (k), sc, "allocated");
      expect_eio (&img, 0, bitmap, sc, "allocated");

      /* Invalid: allocated and zero at once, whichever sc is asked. */
      unit_context ("cluster_bits %u invalid, sc %u", cb, sc);
      for (k = 0; k < 32; k += 5)
        expect_eio (&img, QCOW_OFLAG_COPIED | host, ALLOC (k) | ZERO (k), sc,
                    "both");
      expect_eio (&img, QCOW_OFLAG_COPIED | host, bitmap | ALLOC (1) | ZERO (0),
                  sc, "both");
    }

    /* Bit 0 means nothing with extended L2: ignored, as QEMU does
     * (iotest 271); the bitmap alone decides. */
    unit_context ("cluster_bits %u bit 0", cb);
    expect (&img, QCOW_OFLAG_ZERO, 0, 0, Q2_UNALLOC, 0);
    expect (&img, QCOW_OFLAG_ZERO, ZERO (0), 0, Q2_ZERO, 0);
    expect (&img, QCOW_OFLAG_ZERO | QCOW_OFLAG_COPIED | host, ALLOC (0),
            0, Q2_NORMAL, host);
    expect (&img, QCOW_OFLAG_ZERO | QCOW_OFLAG_COPIED | host, ALLOC (0),
            1, Q2_UNALLOC, host);
    /* Unaligned host offset. */
    expect_eio (&img, QCOW_OFLAG_COPIED | (host + cs / 32), ALLOC (1), 1,
                "aligned");
    /* Compressed: the bitmap is not looked at. */
    unit_context ("cluster_bits %u compressed", cb);
    expect (&img, QCOW_OFLAG_COMPRESSED | 0x12345, 0, 0, Q2_COMPRESSED,
            0x12345);
  }
  unit_context (NULL);
}

/* ---- external data file ---- */

static void
test_data_file (void)
{
  struct q2_image img;
  unsigned sc;

  img_setup (&img, 16, DATA_FILE);
  unit_context ("data file");
  /* Guest cluster 0 lives at data-file offset 0: COPIED says so. */
  expect (&img, QCOW_OFLAG_COPIED, 0, 0, Q2_NORMAL, 0);
  expect_copied (&img, QCOW_OFLAG_COPIED, 0, 0, true);
  expect (&img, 0, 0, 0, Q2_UNALLOC, 0);
  expect_copied (&img, 0, 0, 0, false);
  expect (&img, QCOW_OFLAG_COPIED | 0x30000, 0, 0, Q2_NORMAL, 0x30000);
  expect (&img, QCOW_OFLAG_ZERO | QCOW_OFLAG_COPIED, 0, 0, Q2_ZERO, 0);
  expect_copied (&img, QCOW_OFLAG_ZERO | QCOW_OFLAG_COPIED, 0, 0, false);
  expect (&img, QCOW_OFLAG_ZERO, 0, 0, Q2_ZERO, 0);
  expect_eio (&img, QCOW_OFLAG_COPIED | 0x30200, 0, 0, "aligned");
  /* Another guest cluster's offset: refused, as QEMU does. */
  guest_delta = 0x10000;
  expect_eio (&img, QCOW_OFLAG_COPIED | 0x30000, 0, 0, "same offset");
  expect_eio (&img, QCOW_OFLAG_COPIED, 0, 0, "same offset");
  expect_eio (&img, QCOW_OFLAG_ZERO | QCOW_OFLAG_COPIED | 0x30000, 0, 0,
              "same offset");
  expect (&img, QCOW_OFLAG_ZERO, 0, 0, Q2_ZERO, 0);    /* nothing mapped */
  /* Zero flag and offset 0: a plain zero cluster, COPIED or not, so no
   * offset to compare (QEMU reads zeros). */
  expect (&img, QCOW_OFLAG_ZERO | QCOW_OFLAG_COPIED, 0, 0, Q2_ZERO, 0);
  expect (&img, 0, 0, 0, Q2_UNALLOC, 0);
  guest_delta = 0;

  /* With extended L2 too: offset 0 + COPIED is an allocated cluster, so
   * the alloc bits are valid. */
  img_setup (&img, 16, DATA_FILE | EXTL2);
  for (sc = 0; sc < 32; sc++) {
    unit_context ("data file + extended L2, sc %u", sc);
    expect (&img, QCOW_OFLAG_COPIED, ALLOC (sc), sc, Q2_NORMAL, 0);
    expect (&img, QCOW_OFLAG_COPIED, ZERO (sc), sc, Q2_ZERO, 0);
    expect (&img, QCOW_OFLAG_COPIED, 0, sc, Q2_UNALLOC, 0);
    expect_eio (&img, 0, ALLOC (sc), sc, "allocated");
    expect (&img, 0, ZERO (sc), sc, Q2_ZERO, 0);
  }
  unit_context (NULL);
}

int
main (void)
{
  RUN (test_standard);
  RUN (test_standard_every_cluster_size);
  RUN (test_compressed_every_cluster_size);
  RUN (test_compressed_worked);
  RUN (test_extended);
  RUN (test_data_file);
  return unit_done ();
}
