/* q2_refblock_entry for refcount_order 0..6 on hand-packed blocks:
 * 1/2/4-bit entries packed LSB first, 8..64-bit entries big-endian. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "unit.h"

static uint64_t
value_for (uint64_t c, uint64_t max)
{
  return (c * 0x9e3779b97f4a7c15ULL + c) & max;
}

/* Packs v as entry i the way QEMU does: byte |= v << ((i % n) * bits)
 * for sub-byte widths, big-endian otherwise. */
static void
pack (uint8_t *block, uint32_t order, uint64_t i, uint64_t v)
{
  unsigned bits = 1u << order;

  if (bits < 8) {
    unsigned per_byte = 8 / bits;
    unsigned shift = (i % per_byte) * bits;
    block[i / per_byte] &= ~(((1u << bits) - 1) << shift);
    block[i / per_byte] |= (v & ((1u << bits) - 1)) << shift;
  }
  else {
    unsigned bytes = bits / 8, k;
    for (k = 0; k < bytes; k++)
      block[i * bytes + k] = v >> (8 * (bytes - 1 - k));
  }
}

/* Literal bytes, so the test does not just mirror the code. */
static void
test_hand_packed (void)
{
  uint8_t b[16];

  /* order 0, 1 bit: 0x05 = entries 0 and 2; 0x80 = entry 7. */
  memset (b, 0, sizeof b);
  b[0] = 0x05;
  b[1] = 0x80;
  CHECK_EQ_U64 (q2_refblock_entry (b, 0, 0), 1);
  CHECK_EQ_U64 (q2_refblock_entry (b, 0, 1), 0);
  CHECK_EQ_U64 (q2_refblock_entry (b, 0, 2), 1);
  CHECK_EQ_U64 (q2_refblock_entry (b, 0, 3), 0);
  CHECK_EQ_U64 (q2_refblock_entry (b, 0, 7), 0);
  CHECK_EQ_U64 (q2_refblock_entry (b, 0, 8), 0);
  CHECK_EQ_U64 (q2_refblock_entry (b, 0, 15), 1);

  /* order 1, 2 bits: 0xe4 = 0b11100100 -> entries 0,1,2,3 = 0,1,2,3. */
  memset (b, 0, sizeof b);
  b[0] = 0xe4;
  b[2] = 0x1b;                  /* 0b00011011 -> entries 8..11 = 3,2,1,0 */
  CHECK_EQ_U64 (q2_refblock_entry (b, 1, 0), 0);
  CHECK_EQ_U64 (q2_refblock_entry (b, 1, 1), 1);
  CHECK_EQ_U64 (q2_refblock_entry (b, 1, 2), 2);
  CHECK_EQ_U64 (q2_refblock_entry (b, 1, 3), 3);
  CHECK_EQ_U64 (q2_refblock_entry (b, 1, 4), 0);
  CHECK_EQ_U64 (q2_refblock_entry (b, 1, 8), 3);
  CHECK_EQ_U64 (q2_refblock_entry (b, 1, 9), 2);
  CHECK_EQ_U64 (q2_refblock_entry (b, 1, 10), 1);
  CHECK_EQ_U64 (q2_refblock_entry (b, 1, 11), 0);

  /* order 2, 4 bits: 0x21 -> entry 0 = 1, entry 1 = 2; 0xf0 -> 0, 15. */
  memset (b, 0, sizeof b);
  b[0] = 0x21;
  b[5] = 0xf0;
  CHECK_EQ_U64 (q2_refblock_entry (b, 2, 0), 1);
  CHECK_EQ_U64 (q2_refblock_entry (b, 2, 1), 2);
  CHECK_EQ_U64 (q2_refblock_entry (b, 2, 2), 0);
  CHECK_EQ_U64 (q2_refblock_entry (b, 2, 10), 0);
  CHECK_EQ_U64 (q2_refblock_entry (b, 2, 11), 15);

  /* order 3, bytes. */
  memset (b, 0, sizeof b);
  b[0] = 0x01;
  b[3] = 0xff;
  b[15] = 0x80;
  CHECK_EQ_U64 (q2_refblock_entry (b, 3, 0), 1);
  CHECK_EQ_U64 (q2_refblock_entry (b, 3, 1), 0);
  CHECK_EQ_U64 (q2_refblock_entry (b, 3, 3), 255);
  CHECK_EQ_U64 (q2_refblock_entry (b, 3, 15), 128);

  /* order 4, big-endian 16-bit. */
  memset (b, 0, sizeof b);
  b[0] = 0x00; b[1] = 0x01;
  b[2] = 0x12; b[3] = 0x34;
  b[14] = 0xff; b[15] = 0xff;
  CHECK_EQ_U64 (q2_refblock_entry (b, 4, 0), 1);
  CHECK_EQ_U64 (q2_refblock_entry (b, 4, 1), 0x1234);
  CHECK_EQ_U64 (q2_refblock_entry (b, 4, 2), 0);
  CHECK_EQ_U64 (q2_refblock_entry (b, 4, 7), 0xffff);

  /* order 5, big-endian 32-bit. */
  memset (b, 0, sizeof b);
  memcpy (b, "\x00\x00\x00\x01\x89\xab\xcd\xef", 8);
  memcpy (b + 12, "\xff\xff\xff\xfe", 4);
  CHECK_EQ_U64 (q2_refblock_entry (b, 5, 0), 1);
  CHECK_EQ_U64 (q2_refblock_entry (b, 5, 1), 0x89abcdef);
  CHECK_EQ_U64 (q2_refblock_entry (b, 5, 2), 0);
  CHECK_EQ_U64 (q2_refblock_entry (b, 5, 3), 0xfffffffe);

  /* order 6, big-endian 64-bit. */
  memset (b, 0, sizeof b);
  memcpy (b, "\x01\x23\x45\x67\x89\xab\xcd\xef", 8);
  memcpy (b + 8, "\xff\xff\xff\xff\xff\xff\xff\xff", 8);
  CHECK_EQ_U64 (q2_refblock_entry (b, 6, 0), 0x0123456789abcdefULL);
  CHECK_EQ_U64 (q2_refblock_entry (b, 6, 1), UINT64_MAX);
}

/* Whole blocks for every order: each entry gets its own value, packed
 * with the reference packer, and every entry reads back exactly. */
static void
test_whole_blocks (void)
{
  static uint8_t block[4096];
  uint32_t order;

  for (order = 0; order <= 6; order++) {
    unsigned bits = 1u << order;
    uint64_t n = sizeof block * 8 / bits, i;
    uint64_t max = bits == 64 ? UINT64_MAX : (1ULL << bits) - 1;
    uint64_t bad = 0;

    unit_context ("refcount_order %u", order);
    memset (block, 0, sizeof block);
    for (i = 0; i < n; i++)
      pack (block, order, i, value_for (i, max));
    for (i = 0; i < n; i++)
      if (q2_refblock_entry (block, order, i) != value_for (i, max))
        bad++;
    CHECK_EQ_U64 (bad, 0);
    /* First and last entries explicitly. */
    CHECK_EQ_U64 (q2_refblock_entry (block, order, 0), 0);
    CHECK_EQ_U64 (q2_refblock_entry (block, order, n - 1),
                  value_for (n - 1, max));

    /* A single maximum-value entry does not leak into its neighbours. */
    for (i = 0; i < 17 && i < n; i++) {
      uint64_t j;
      memset (block, 0, sizeof block);
      pack (block, order, i, max);
      for (j = 0; j < 17 && j < n; j++)
        CHECK_EQ_U64 (q2_refblock_entry (block, order, j), j == i ? max : 0);
    }
    /* ... and an all-ones block reads as maximum everywhere. */
    memset (block, 0xff, sizeof block);
    bad = 0;
    for (i = 0; i < n; i++)
      if (q2_refblock_entry (block, order, i) != max)
        bad++;
    CHECK_EQ_U64 (bad, 0);
  }
  unit_context (NULL);
}

/* q2_refcount_get through the refcount table and the slice cache, on a
 * temporary file: header at cluster 0, the refcount table's place at
 * cluster 1, refcount blocks for table entries 0 and 2 at clusters 2
 * and 3; entry 1 is empty, entry 3 is bad, and the table has 4 entries.
 * With 64 KiB clusters a block spans 16 cache slices of 4 KiB. */
static void
test_refcount_get (void)
{
  static const uint32_t cbs[] = { 12, 16 };
  char path[] = "/tmp/q2-test-refcount-XXXXXX";
  int fd = mkstemp (path);
  size_t ci;
  uint32_t order;

  CHECK (fd >= 0);
  if (fd < 0)
    return;
  unlink (path);
  for (ci = 0; ci < sizeof cbs / sizeof cbs[0]; ci++)
    for (order = 0; order <= 6; order++) {
      uint32_t cb = cbs[ci];
      uint64_t cs = 1ULL << cb;
      unsigned bits = 1u << order;
      uint64_t per_block = cs * 8 / bits;
      uint64_t max = bits == 64 ? UINT64_MAX : (1ULL << bits) - 1;
      uint64_t reftable[4] = { 2 * cs, 0, 3 * cs, 4 * cs + 512 };
      uint8_t *blocks = calloc (2, cs);
      struct q2_image img;
      uint64_t i, rc, bad = 0, stride = cb == 12 ? 1 : 5;
      int r;

      unit_context ("cluster_bits %u refcount_order %u", cb, order);
      if (blocks == NULL)
        abort ();
      for (i = 0; i < per_block; i++) {
        pack (blocks, order, i, value_for (i, max));
        pack (blocks + cs, order, i, value_for (2 * per_block + i, max));
      }
      if (ftruncate (fd, 0) != 0 ||
          pwrite (fd, blocks, 2 * cs, 2 * cs) != (ssize_t) (2 * cs) ||
          ftruncate (fd, 6 * cs) != 0)
        abort ();

      memset (&img, 0, sizeof img);
      img.fd = img.data_fd = fd;
      img.file_size = 6 * cs;
      img.cluster_bits = cb;
      img.cluster_size = cs;
      img.hdr.version = 3;
      img.hdr.cluster_bits = cb;
      img.hdr.refcount_order = order;
      img.hdr.refcount_table_offset = cs;
      img.hdr.refcount_table_clusters = 1;
      img.refcount_bits = bits;
      img.reftable = reftable;
      img.reftable_entries = 4;
      img.rb_cache = q2_cache_new (Q2_MIN (cs, 4096), 4, NULL, NULL);
      CHECK (img.rb_cache != NULL);
      if (img.rb_cache == NULL)
        abort ();

      /* Block 0, and block 2 (table entry 2). */
      for (i = 0; i < per_block; i += stride) {
        r = q2_refcount_get (&img, i, &rc);
        if (r != 0 || rc != value_for (i, max))
          bad++;
        r = q2_refcount_get (&img, 2 * per_block + i, &rc);
        if (r != 0 || rc != value_for (2 * per_block + i, max))
          bad++;
      }
      CHECK_EQ_U64 (bad, 0);
      /* The last entry of each block, explicitly. */
      CHECK_EQ_INT (q2_refcount_get (&img, per_block - 1, &rc), 0);
      CHECK_EQ_U64 (rc, value_for (per_block - 1, max));
      CHECK_EQ_INT (q2_refcount_get (&img, 3 * per_block - 1, &rc), 0);
      CHECK_EQ_U64 (rc, value_for (3 * per_block - 1, max));
      /* Empty table entry, and past the table: refcount 0. */
      rc = 99;
      CHECK_EQ_INT (q2_refcount_get (&img, per_block, &rc), 0);
      CHECK_EQ_U64 (rc, 0);
      rc = 99;
      CHECK_EQ_INT (q2_refcount_get (&img, 2 * per_block - 1, &rc), 0);
      CHECK_EQ_U64 (rc, 0);
      rc = 99;
      CHECK_EQ_INT (q2_refcount_get (&img, 4 * per_block, &rc), 0);
      CHECK_EQ_U64 (rc, 0);
      rc = 99;
      CHECK_EQ_INT (q2_refcount_get (&img, UINT64_MAX >> 9, &rc), 0);
      CHECK_EQ_U64 (rc, 0);
      /* An unaligned refcount block offset is corruption. */
      CHECK_EQ_INT (q2_refcount_get (&img, 3 * per_block, &rc), -EIO);
      CHECK_STR_CONTAINS (q2_last_error (), "refcount");
      /* So is one past the end of the file, or on the header or the
       * refcount table. */
      reftable[3] = 6 * cs;
      CHECK_EQ_INT (q2_refcount_get (&img, 3 * per_block, &rc), -EIO);
      reftable[3] = 1ULL << 50;
      CHECK_EQ_INT (q2_refcount_get (&img, 3 * per_block, &rc), -EIO);
      reftable[1] = cs;
      CHECK_EQ_INT (q2_refcount_get (&img, per_block, &rc), -EIO);

      q2_cache_free (img.rb_cache);
      free (blocks);
    }
  unit_context (NULL);
  close (fd);
}

/* q2_refcount_next_free against a plain scan, for every entry width: a
 * block of 4 KiB clusters at cluster 2 (table entry 0; entry 1 empty)
 * holding runs of used entries of every length around the 64-bit words
 * it is scanned in, with single free entries and free runs between. */
static void
test_next_free (void)
{
  char path[] = "/tmp/q2-test-refcount-XXXXXX";
  int fd = mkstemp (path);
  const uint64_t cs = 4096;
  uint32_t order;

  CHECK (fd >= 0);
  if (fd < 0)
    return;
  unlink (path);
  for (order = 0; order <= 6; order++) {
    unsigned bits = 1u << order;
    uint64_t per_block = cs * 8 / bits;
    uint64_t max = bits == 64 ? UINT64_MAX : (1ULL << bits) - 1;
    uint64_t reftable[2] = { 2 * cs, 0 };
    uint8_t *block = calloc (1, cs);
    uint8_t *used = calloc (per_block, 1);
    uint64_t i, c, limit, f, want, bad = 0, seed = 12345;
    struct q2_image img;

    unit_context ("refcount_order %u", order);
    if (block == NULL || used == NULL)
      abort ();
    for (i = 0; i < per_block; ) {
      uint64_t run, k;
      seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
      run = (seed >> 33) % 200;
      for (k = 0; k < run && i < per_block; k++, i++) {
        used[i] = 1;
        pack (block, order, i, 1 + (seed >> 20) % max);
      }
      i += 1 + (seed >> 40) % 3;        /* then 1 to 3 free entries */
    }
    for (i = per_block - 150; i < per_block; i++) {   /* a used tail */
      used[i] = 1;
      pack (block, order, i, max);
    }
    if (ftruncate (fd, 0) != 0 ||
        pwrite (fd, block, cs, 2 * cs) != (ssize_t) cs ||
        ftruncate (fd, 4 * cs) != 0)
      abort ();
    memset (&img, 0, sizeof img);
    img.fd = img.data_fd = fd;
    img.readonly = true;
    img.file_size = 4 * cs;
    img.cluster_bits = 12;
    img.cluster_size = cs;
    img.hdr.version = 3;
    img.hdr.cluster_bits = 12;
    img.hdr.refcount_order = order;
    img.hdr.refcount_table_offset = cs;
    img.hdr.refcount_table_clusters = 1;
    img.refcount_bits = bits;
    img.reftable = reftable;
    img.reftable_entries = 2;
    /* Slices smaller than the block: scans cross slice boundaries. */
    img.rb_cache = q2_cache_new (1024, 4, NULL, NULL);
    if (img.rb_cache == NULL)
      abort ();

    for (c = 0; c < per_block + 3; c++)
      for (limit = c; limit <= per_block + 10; limit += limit < c + 70 ? 1 : 997) {
        for (want = c; want < limit && want < per_block && used[want]; want++)
          ;
        if (q2_refcount_next_free (&img, c, limit, &f) != 0 ||
            f != Q2_MIN (want, limit)) {
          if (bad++ < 3)
            fprintf (stderr, "order %u from %llu limit %llu: got %llu, "
                     "want %llu\n", order, (unsigned long long) c,
                     (unsigned long long) limit, (unsigned long long) f,
                     (unsigned long long) want);
        }
        if (per_block > 4096 && limit >= c + 70)
          break;
      }
    CHECK_EQ_U64 (bad, 0);
    /* A run of used entries up to the end of the block continues into
     * the empty table entry after it: free there. */
    CHECK_EQ_INT (q2_refcount_next_free (&img, per_block - 150, UINT64_MAX,
                                         &f), 0);
    CHECK_EQ_U64 (f, per_block);

    q2_cache_free (img.rb_cache);
    free (block);
    free (used);
  }
  unit_context (NULL);
  close (fd);
}

int
main (void)
{
  RUN (test_hand_packed);
  RUN (test_whole_blocks);
  RUN (test_refcount_get);
  RUN (test_next_free);
  return unit_done ();
}
