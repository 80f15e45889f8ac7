/* The persistent dirty bitmap directory: its entries for 'info', and
 * the clusters the bitmaps occupy for check and for freeing them.  We
 * never change bitmaps; the plugin drops them on the first write. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define BITMAP_ENTRY_OFFSET_MASK 0x00fffffffffffe00ULL
#define BME_FLAG_IN_USE (1u << 0)
#define BME_FLAG_AUTO (1u << 1)
#define BME_MAX_NAME_SIZE 1023
#define DIR_ENTRY_LEN 24
#define TABLE_CHUNK 65536

struct bitmap_entry {
  uint64_t table_offset;
  uint32_t table_size;          /* entries */
  uint32_t flags;
  uint8_t granularity_bits;
  const uint8_t *name;
  uint16_t name_size;
};

typedef int (*entry_fn) (void *opaque, uint32_t i,
                         const struct bitmap_entry *e);

/* Calls fn for each entry of the directory of valid bitmaps (none when
 * the autoclear bit says they are stale). */
static int
walk_directory (struct q2_image *img, q2_range_fn dir_fn, entry_fn fn,
                void *opaque)
{
  const struct q2_header *h = &img->hdr;
  uint64_t pos = 0, size = h->bitmap_dir_size;
  uint8_t *dir;
  uint32_t i;
  int r;

  if (!h->has_bitmaps_ext || !(h->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
    return 0;
  if (dir_fn && (r = dir_fn (opaque, h->bitmap_dir_offset, size,
                             "bitmap directory")) < 0)
    return r;
  dir = malloc (size ? size : 1);
  if (dir == NULL)
    return q2_err (ENOMEM, "out of memory");
  r = q2_io_pread (img->fd, dir, size, h->bitmap_dir_offset, false,
                   "bitmap directory");
  for (i = 0; r == 0 && i < h->nb_bitmaps; i++) {
    const uint8_t *p = dir + pos;
    struct bitmap_entry e;
    uint64_t len;
    if (size - pos < DIR_ENTRY_LEN) {
      r = q2_err (EIO, "bitmap directory entry %u is truncated", i);
      break;
    }
    e.table_offset = q2_be64 (p);
    e.table_size = q2_be32 (p + 8);
    e.flags = q2_be32 (p + 12);
    e.granularity_bits = p[17];
    e.name_size = q2_be16 (p + 18);
    len = DIR_ENTRY_LEN + (uint64_t) q2_be32 (p + 20) + e.name_size;
    if (len > size - pos) {
      r = q2_err (EIO, "bitmap directory entry %u (%llu bytes) overruns "
                  "the directory", i, (unsigned long long) len);
      break;
    }
    e.name = p + len - e.name_size;
    r = fn (opaque, i, &e);
    /* The last entry's padding may be cut off. */
    pos += Q2_MIN (Q2_ROUND_UP (len, 8), size - pos);
  }
  free (dir);
  return r;
}

struct clusters_walk {
  struct q2_image *img;
  q2_range_fn fn;
  void *opaque;
};

static int
dir_range (void *opaque, uint64_t offset, uint64_t length, const char *what)
{
  struct clusters_walk *w = opaque;

  return w->fn (w->opaque, offset, length, what);
}

static int
entry_clusters (void *opaque, uint32_t i, const struct bitmap_entry *e)
{
  struct clusters_walk *w = opaque;
  struct q2_image *img = w->img;
  uint64_t toff = e->table_offset, tbytes = (uint64_t) e->table_size * 8, j;
  uint8_t *chunk;
  int r;

  if (toff >= img->file_size || tbytes > img->file_size - toff)
    return q2_err (EIO, "bitmap %u: table at %#llx is past the end of the "
                   "file", i, (unsigned long long) toff);
  if ((r = w->fn (w->opaque, toff, tbytes, "bitmap table")) < 0)
    return r;
  /* In pieces: the table's size comes from the file. */
  chunk = malloc (TABLE_CHUNK);
  if (chunk == NULL)
    return q2_err (ENOMEM, "out of memory");
  for (j = 0; r == 0 && j < e->table_size; j++) {
    uint64_t off;
    if (j % (TABLE_CHUNK / 8) == 0 &&
        (r = q2_io_pread (img->fd, chunk,
                          Q2_MIN (TABLE_CHUNK, tbytes - j * 8), toff + j * 8,
                          false, "bitmap table")) < 0)
      break;
    off = q2_be64 (chunk + (j % (TABLE_CHUNK / 8)) * 8) &
      BITMAP_ENTRY_OFFSET_MASK;
    if (off)
      r = w->fn (w->opaque, off, img->cluster_size, "bitmap data");
  }
  free (chunk);
  return r;
}

int
q2_bitmap_clusters (struct q2_image *img, q2_range_fn fn, void *opaque)
{
  struct clusters_walk w = { img, fn, opaque };

  return walk_directory (img, dir_range, entry_clusters, &w);
}

struct list_walk {
  struct q2_bitmap_info *list;
};

static int
entry_info (void *opaque, uint32_t i, const struct bitmap_entry *e)
{
  struct list_walk *w = opaque;
  struct q2_bitmap_info *b = &w->list[i];

  if (e->name_size == 0 || e->name_size > BME_MAX_NAME_SIZE)
    return q2_err (EIO, "bitmap %u: name size %u is out of range (1..%u)",
                   i, e->name_size, BME_MAX_NAME_SIZE);
  memcpy (b->name, e->name, e->name_size);
  b->name[e->name_size] = '\0';
  b->granularity = e->granularity_bits < 64 ?
    1ULL << e->granularity_bits : 0;
  b->in_use = e->flags & BME_FLAG_IN_USE;
  b->auto_enabled = e->flags & BME_FLAG_AUTO;
  return 0;
}

int
q2_bitmap_list (struct q2_image *img, struct q2_bitmap_info **out,
                uint32_t *n)
{
  const struct q2_header *h = &img->hdr;
  struct list_walk w = { NULL };
  int r;

  *out = NULL;
  *n = 0;
  if (!h->has_bitmaps_ext || !(h->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
    return 0;
  w.list = calloc (h->nb_bitmaps, sizeof *w.list);
  if (w.list == NULL)
    return q2_err (ENOMEM, "out of memory");
  if ((r = walk_directory (img, NULL, entry_info, &w)) < 0) {
    free (w.list);
    return r;
  }
  *out = w.list;
  *n = h->nb_bitmaps;
  return 0;
}
