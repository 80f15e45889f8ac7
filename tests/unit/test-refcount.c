/* q2_refblock_entry for refcount_order 0..6 on hand-packed blocks:
 * 1/2/4-bit entries packed LSB first, 8..64-bit entries big-endian. */
#include <stdint.h>
#include <string.h>

#include "internal.h"
#include "unit.h"

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
      pack (block, order, i, (i * 0x9e3779b97f4a7c15ULL + i) & max);
    for (i = 0; i < n; i++)
      if (q2_refblock_entry (block, order, i) !=
          ((i * 0x9e3779b97f4a7c15ULL + i) & max))
        bad++;
    CHECK_EQ_U64 (bad, 0);
    /* First and last entries explicitly. */
    CHECK_EQ_U64 (q2_refblock_entry (block, order, 0), 0);
    CHECK_EQ_U64 (q2_refblock_entry (block, order, n - 1),
                  ((n - 1) * 0x9e3779b97f4a7c15ULL + (n - 1)) & max);

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

int
main (void)
{
  RUN (test_hand_packed);
  RUN (test_whole_blocks);
  return unit_done ();
}
