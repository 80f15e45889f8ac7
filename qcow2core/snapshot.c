/* The internal snapshot table: parsed at open with every count, size
 * and offset checked, unknown extra data kept for rewriting. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define SNAP_HEADER_LEN 40
#define MAX_EXTRA 1024
#define MAX_TABLE (64u << 20)

void
q2_snapshots_free (struct q2_image *img)
{
  uint32_t i;

  for (i = 0; i < img->nb_snapshots; i++) {
    free (img->snapshots[i].id);
    free (img->snapshots[i].name);
    free (img->snapshots[i].extra);
  }
  free (img->snapshots);
  img->snapshots = NULL;
  img->nb_snapshots = 0;
  img->snapshot_table_len = 0;
}

static char *
dup_bytes (const uint8_t *p, size_t len)
{
  char *s = malloc (len + 1);

  if (s) {
    memcpy (s, p, len);
    s[len] = '\0';
  }
  return s;
}

static int
parse_one (struct q2_image *img, const uint8_t *p, uint64_t avail,
           uint32_t index, struct q2_snapshot *s, uint64_t *len)
{
  uint32_t id_len, name_len, extra;
  uint64_t need;

  if (avail < SNAP_HEADER_LEN)
    return q2_err (EINVAL, "snapshot %u: entry runs past the end of the "
                   "snapshot table", index);
  s->l1_offset = q2_be64 (p);
  s->l1_size = q2_be32 (p + 8);
  id_len = q2_be16 (p + 12);
  name_len = q2_be16 (p + 14);
  s->date_sec = q2_be32 (p + 16);
  s->date_nsec = q2_be32 (p + 20);
  s->vm_clock_nsec = q2_be64 (p + 24);
  s->vm_state_size = q2_be32 (p + 32);
  extra = q2_be32 (p + 36);
  if (extra > MAX_EXTRA)
    return q2_err (EINVAL, "snapshot %u: extra_data_size %u is too large "
                   "(at most %d)", index, extra, MAX_EXTRA);
  if (img->hdr.version >= 3 && extra < 16)
    return q2_err (EINVAL, "snapshot %u: extra_data_size %u is too small for "
                   "a version 3 image (at least 16)", index, extra);
  need = SNAP_HEADER_LEN + (uint64_t) extra + id_len + name_len;
  if (need > avail)
    return q2_err (EINVAL, "snapshot %u: entry runs past the end of the "
                   "snapshot table", index);
  s->extra_size = extra;
  s->extra = malloc (extra ? extra : 1);
  s->id = dup_bytes (p + SNAP_HEADER_LEN + extra, id_len);
  s->name = dup_bytes (p + SNAP_HEADER_LEN + extra + id_len, name_len);
  if (s->extra == NULL || s->id == NULL || s->name == NULL)
    return q2_err (ENOMEM, "out of memory");
  memcpy (s->extra, p + SNAP_HEADER_LEN, extra);
  s->disk_size = img->hdr.size;
  s->icount = UINT64_MAX;
  if (extra >= 8)
    s->vm_state_size = q2_be64 (s->extra);
  if (extra >= 16)
    s->disk_size = q2_be64 (s->extra + 8);
  if (extra >= 24)
    s->icount = q2_be64 (s->extra + 16);

  if (s->l1_size > QCOW2_MAX_L1_BYTES / 8)
    return q2_err (EINVAL, "snapshot %u: l1_size %u is too large", index,
                   s->l1_size);
  if (!Q2_IS_ALIGNED (s->l1_offset, img->cluster_size) ||
      (s->l1_size && (s->l1_offset >= img->file_size ||
                      (uint64_t) s->l1_size * 8 >
                      img->file_size - s->l1_offset)))
    return q2_err (EINVAL, "snapshot %u: L1 table offset %#llx is unaligned "
                   "or past the end of the file", index,
                   (unsigned long long) s->l1_offset);
  *len = Q2_ROUND_UP (need, 8);
  return 0;
}

int
q2_snapshots_load (struct q2_image *img)
{
  uint32_t n = img->hdr.nb_snapshots, i;
  uint64_t avail, pos = 0;
  uint8_t *buf;
  int r = 0;

  if (n == 0)
    return 0;
  /* The header check put the table start inside the file. */
  avail = Q2_MIN (img->file_size - img->hdr.snapshots_offset, MAX_TABLE);
  buf = malloc (avail);
  img->snapshots = calloc (n, sizeof *img->snapshots);
  if (buf == NULL || img->snapshots == NULL) {
    free (buf);
    return q2_err (ENOMEM, "out of memory for the snapshot table");
  }
  r = q2_io_pread (img->fd, buf, avail, img->hdr.snapshots_offset, false,
                   "snapshot table");
  for (i = 0; r == 0 && i < n; i++) {
    uint64_t len = 0;
    img->nb_snapshots = i + 1;
    r = parse_one (img, buf + pos, avail - pos, i, &img->snapshots[i], &len);
    pos += len;
  }
  free (buf);
  if (r < 0) {
    q2_snapshots_free (img);
    return r;
  }
  img->snapshot_table_len = pos;
  return 0;
}
