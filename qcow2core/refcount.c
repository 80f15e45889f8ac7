/* Reading refcounts: the refcount table in memory, refcount blocks
 * through the cache, entries of 1 to 64 bits. */
#include <errno.h>

#include "internal.h"

uint64_t
q2_refblock_entry (const uint8_t *block, uint32_t order, uint64_t i)
{
  switch (order) {
  case 0: case 1: case 2: {
    /* Sub-byte entries are packed starting at the least significant bit. */
    unsigned bits = 1u << order;
    unsigned per_byte = 8 / bits;
    unsigned shift = (i % per_byte) * bits;
    return (block[i / per_byte] >> shift) & ((1u << bits) - 1);
  }
  case 3: return block[i];
  case 4: return q2_be16 (block + i * 2);
  case 5: return q2_be32 (block + i * 4);
  default: return q2_be64 (block + i * 8);
  }
}

/* Caller holds img->lock. */
int
q2_refcount_get (struct q2_image *img, uint64_t cluster_index,
                 uint64_t *refcount)
{
  uint32_t entry_bits_log = img->hdr.refcount_order;
  uint64_t per_block_log = img->cluster_bits + 3 - entry_bits_log;
  uint64_t rt_index = cluster_index >> per_block_log;
  uint64_t rb_index = cluster_index & ((1ULL << per_block_log) - 1);
  uint64_t rb_off, byte, slice_size;
  uint8_t *slice;
  int r;

  *refcount = 0;
  if (rt_index >= img->reftable_entries)
    return 0;
  rb_off = img->reftable[rt_index] & REFT_OFFSET_MASK;
  if (rb_off == 0)
    return 0;
  if (!Q2_IS_ALIGNED (rb_off, img->cluster_size) ||
      rb_off >= img->file_size)
    return q2_err (EIO, "refcount table entry %llu: refcount block offset "
                   "%#llx is unaligned or past the end of the file",
                   (unsigned long long) rt_index,
                   (unsigned long long) rb_off);
  slice_size = q2_cache_slice_size (img->rb_cache);
  byte = (rb_index << entry_bits_log) / 8;
  r = q2_cache_get (img->rb_cache, img->fd,
                    rb_off + Q2_ROUND_DOWN (byte, slice_size),
                    "refcount block", &slice);
  if (r < 0)
    return r;
  /* Index of the entry within its slice. */
  rb_index -= (Q2_ROUND_DOWN (byte, slice_size) * 8) >> entry_bits_log;
  *refcount = q2_refblock_entry (slice, entry_bits_log, rb_index);
  return 0;
}
