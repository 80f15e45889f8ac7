/* The internal snapshot table: parsed at open with every count, size
 * and offset checked, unknown extra data kept for rewriting. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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
  q2_snapshot_ranges_rebuild (img);
}

struct q2_range
q2_snapshot_l1_range (const struct q2_image *img, const struct q2_snapshot *s)
{
  return (struct q2_range) {
    s->l1_offset, Q2_ROUND_UP ((uint64_t) s->l1_size * 8, img->cluster_size)
  };
}

void
q2_snapshot_ranges_rebuild (struct q2_image *img)
{
  struct q2_range *r = NULL;
  size_t n = 0, i;
  uint32_t k;

  free (img->snap_l1);
  img->snap_l1 = NULL;
  img->nb_snap_l1 = 0;
  img->snap_l1_ok = true;
  if (img->nb_snapshots == 0)
    return;
  r = malloc (img->nb_snapshots * sizeof *r);
  if (r == NULL) {
    img->snap_l1_ok = false;
    return;
  }
  for (k = 0; k < img->nb_snapshots; k++) {
    const struct q2_snapshot *s = &img->snapshots[k];
    if (!s->broken && s->l1_size)
      r[n++] = q2_snapshot_l1_range (img, s);
  }
  qsort (r, n, sizeof *r, q2_compare_ranges);
  /* Merged, the ends are sorted too, which the binary search needs. */
  for (i = 1, k = 0; i < n; i++) {
    struct q2_range *last = &r[k];
    if (r[i].offset <= last->offset + last->length) {
      uint64_t end = Q2_MAX (last->offset + last->length,
                             r[i].offset + r[i].length);
      last->length = end - last->offset;
    }
    else
      r[++k] = r[i];
  }
  img->snap_l1 = r;
  img->nb_snap_l1 = n ? k + 1 : 0;
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
  s->id = q2_dup_string (p + SNAP_HEADER_LEN + extra, id_len);
  s->name = q2_dup_string (p + SNAP_HEADER_LEN + extra + id_len, name_len);
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

  /* An invalid L1 table is kept in the list (the active image is still
   * usable, and check reports it), marked so that nothing follows it. */
  s->broken = s->l1_size > QCOW2_MAX_L1_BYTES / 8 ||
    !Q2_IS_ALIGNED (s->l1_offset, img->cluster_size) ||
    (s->l1_size && (s->l1_offset >= img->file_size ||
                    (uint64_t) s->l1_size * 8 >
                    img->file_size - s->l1_offset));
  /* The last entry's padding may be missing at the end of the file. */
  *len = Q2_MIN (Q2_ROUND_UP (need, 8), avail);
  return 0;
}

int
q2_snapshot_l1_valid (const struct q2_image *img, const struct q2_snapshot *s)
{
  if (s->broken)
    return q2_err (EIO, "snapshot %s: L1 table at %#llx (%u entries) is "
                   "unaligned, too large or past the end of the file", s->id,
                   (unsigned long long) s->l1_offset, s->l1_size);
  return 0;
}

int
q2_check_snapshots_usable (const struct q2_image *img)
{
  uint32_t i;

  /* An allocation could land where such an L1 table points, and the
   * snapshot would then follow whatever was written there. */
  for (i = 0; i < img->nb_snapshots; i++)
    if (img->snapshots[i].broken)
      return q2_err (EROFS, "snapshot %s has an invalid L1 table offset "
                     "%#llx; the image is read-only until it is repaired "
                     "(check -r all)", img->snapshots[i].id,
                     (unsigned long long) img->snapshots[i].l1_offset);
  return 0;
}

int
q2_snapshot_read_l1 (struct q2_image *img, const struct q2_snapshot *s,
                     uint64_t **l1)
{
  int r = q2_snapshot_l1_valid (img, s);

  if (r == 0 &&
      (r = q2_read_table (img, s->l1_offset, s->l1_size, "snapshot L1 table",
                          l1)) < 0)
    return q2_err_prefix (r, "snapshot %s", s->id);
  return r;
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
  q2_snapshot_ranges_rebuild (img);
  return 0;
}

/* ---- public view of the table ---- */

int
q2_snapshot_count (const struct q2_image *img)
{
  return img->nb_snapshots;
}

int
q2_snapshot_get (const struct q2_image *img, int index,
                 struct q2_snapshot_info *info)
{
  const struct q2_snapshot *s;

  if (index < 0 || (uint32_t) index >= img->nb_snapshots)
    return q2_err (ENOENT, "no snapshot number %d", index);
  s = &img->snapshots[index];
  info->id = s->id;
  info->name = s->name;
  info->date_sec = s->date_sec;
  info->date_nsec = s->date_nsec;
  info->vm_clock_nsec = s->vm_clock_nsec;
  info->vm_state_size = s->vm_state_size;
  info->disk_size = s->disk_size;
  info->icount = s->icount;
  return 0;
}

int
q2_snapshot_find (const struct q2_image *img, const char *name_or_id)
{
  uint32_t i;

  /* An ID match wins, as in QEMU. */
  for (i = 0; i < img->nb_snapshots; i++)
    if (strcmp (img->snapshots[i].id, name_or_id) == 0)
      return i;
  for (i = 0; i < img->nb_snapshots; i++)
    if (strcmp (img->snapshots[i].name, name_or_id) == 0)
      return i;
  return q2_err (ENOENT, "no snapshot with ID or name '%s'", name_or_id);
}

int
q2_snapshot_load_tmp (struct q2_image *img, const char *name_or_id)
{
  const struct q2_snapshot *s;
  uint64_t *l1;
  int i, r;

  if (!img->readonly)
    return q2_err (EINVAL, "a snapshot view needs a read-only image");
  if ((i = q2_snapshot_find (img, name_or_id)) < 0)
    return i;
  s = &img->snapshots[i];
  if ((r = q2_snapshot_read_l1 (img, s, &l1)) < 0)
    return r;
  free (img->l1);
  img->l1 = l1;
  img->l1_size = s->l1_size;
  /* Only the disk is served; VM state past it is not. */
  img->virtual_size = Q2_ROUND_DOWN (s->disk_size, 512);
  if (img->virtual_size >
      (uint64_t) s->l1_size << (img->cluster_bits + img->l2_bits))
    img->virtual_size = (uint64_t) s->l1_size <<
      (img->cluster_bits + img->l2_bits);
  q2_cache_discard (img->l2_cache, 0, UINT64_MAX);
  return 0;
}

/* ---- changing the table ---- */

static uint64_t
entry_len (const struct q2_snapshot *s)
{
  return Q2_ROUND_UP (40 + (uint64_t) s->extra_size + strlen (s->id) +
                      strlen (s->name), 8);
}

static void
serialize_entry (const struct q2_snapshot *s, uint8_t *p)
{
  size_t id_len = strlen (s->id), name_len = strlen (s->name);

  memset (p, 0, entry_len (s));
  q2_put_be64 (p, s->l1_offset);
  q2_put_be32 (p + 8, s->l1_size);
  q2_put_be16 (p + 12, id_len);
  q2_put_be16 (p + 14, name_len);
  q2_put_be32 (p + 16, s->date_sec);
  q2_put_be32 (p + 20, s->date_nsec);
  q2_put_be64 (p + 24, s->vm_clock_nsec);
  q2_put_be32 (p + 32, s->vm_state_size > UINT32_MAX ? 0 : s->vm_state_size);
  q2_put_be32 (p + 36, s->extra_size);
  memcpy (p + 40, s->extra, s->extra_size);
  memcpy (p + 40 + s->extra_size, s->id, id_len);
  memcpy (p + 40 + s->extra_size + id_len, s->name, name_len);
}

/* Writes the table to fresh clusters and switches the header to it with
 * one synced write; then releases the old table.  The in-memory list
 * becomes snaps/n. */
static int
write_table (struct q2_image *img, struct q2_snapshot *snaps, uint32_t n)
{
  uint64_t len = 0, off = 0, old_off = img->hdr.snapshots_offset;
  uint64_t old_len = img->snapshot_table_len;
  uint8_t *buf, hdr[12];
  uint32_t i;
  bool fresh;
  int r;

  for (i = 0; i < n; i++)
    len += entry_len (&snaps[i]);
  if (len > MAX_TABLE)
    return q2_err (ENOSPC, "the snapshot table would exceed 64 MiB");
  if (len) {
    buf = calloc (1, Q2_ROUND_UP (len, img->cluster_size));
    if (buf == NULL)
      return q2_err (ENOMEM, "out of memory for the snapshot table");
    for (i = 0, off = 0; i < n; i++) {
      serialize_entry (&snaps[i], buf + off);
      off += entry_len (&snaps[i]);
    }
    r = q2_alloc_clusters (img, Q2_ROUND_UP (len, img->cluster_size) /
                           img->cluster_size, &off, &fresh);
    if (r == 0)
      r = q2_check_overlap (img, off, Q2_ROUND_UP (len, img->cluster_size),
                            "snapshot table", Q2_OVERLAP_ALL);
    if (r == 0)
      r = q2_io_pwrite (img->fd, buf, Q2_ROUND_UP (len, img->cluster_size),
                        off, "snapshot table");
    free (buf);
    /* The table and the refcounts that cover it come first. */
    if (r == 0)
      r = q2_flush_locked (img);
    if (r < 0)
      return r;
  }
  q2_put_be32 (hdr, n);
  q2_put_be64 (hdr + 4, off);
  if ((r = q2_write_header_field (img, 60, hdr, 12)) < 0)
    return r;
  img->hdr.nb_snapshots = n;
  img->hdr.snapshots_offset = off;
  img->snapshot_table_len = len;
  if (old_len && (r = q2_free_later (img, old_off, old_len)) < 0)
    return r;
  return 0;
}

/* Calls fn for every cluster range a tree references: each L2 table,
 * each data cluster, each compressed cluster's byte range. */
typedef int (*tree_fn) (struct q2_image *img, uint64_t first, uint64_t last,
                        void *opaque);

static int
walk_tree (struct q2_image *img, const uint64_t *l1, uint32_t l1_size,
           tree_fn fn, void *opaque)
{
  uint64_t cs = img->cluster_size, n = 1ULL << img->l2_bits, j;
  bool data_file = img->data_fd != img->fd;
  uint8_t *buf = malloc (cs);
  uint32_t i;
  int r = 0;

  if (buf == NULL)
    return q2_err (ENOMEM, "out of memory");
  for (i = 0; r == 0 && i < l1_size; i++) {
    uint64_t l2 = l1[i] & L1E_OFFSET_MASK;
    if (l2 == 0)
      continue;
    if (!Q2_IS_ALIGNED (l2, cs) || l2 >= img->file_size) {
      r = q2_mark_corrupt (img, "L1 entry %u: invalid L2 table offset %#llx",
                           i, (unsigned long long) l2);
      break;
    }
    r = q2_io_pread (img->fd, buf, cs, l2, false, "L2 table");
    for (j = 0; r == 0 && j < n; j++) {
      uint64_t e = q2_be64 (buf + j * img->l2_entry_size);
      if (e & QCOW_OFLAG_COMPRESSED) {
        uint64_t off = e & img->coffset_mask;
        uint64_t nb = ((e >> img->csize_shift) & img->csize_mask) + 1;
        r = fn (img, off / cs, (off + nb * 512 - (off & 511) - 1) / cs,
                opaque);
      }
      else if ((e & L2E_OFFSET_MASK) && !data_file)
        r = fn (img, (e & L2E_OFFSET_MASK) / cs, (e & L2E_OFFSET_MASK) / cs,
                opaque);
    }
    if (r == 0)
      r = fn (img, l2 / cs, l2 / cs, opaque);
  }
  free (buf);
  return r;
}

static int
add_reference (struct q2_image *img, uint64_t first, uint64_t last,
               void *opaque)
{
  uint64_t c;
  int r = 0;

  for (c = first; r == 0 && c <= last; c++)
    r = q2_refcount_update (img, c, 1, NULL);
  return r;
}

/* Decrements go through the free queue, which also punches clusters
 * that become free. */
static int
drop_reference (struct q2_image *img, uint64_t first, uint64_t last,
                void *opaque)
{
  return q2_free_later (img, first * img->cluster_size,
                        (last - first + 1) * img->cluster_size);
}

/* References one tree adds, per cluster of the file (a cluster can hold
 * several compressed clusters, so counts go past 1). */
struct headroom {
  uint16_t *adds;
  uint64_t nb;
};

static int
count_reference (struct q2_image *img, uint64_t first, uint64_t last,
                 void *opaque)
{
  struct headroom *h = opaque;
  uint64_t c;

  if (last >= h->nb)
    return q2_mark_corrupt (img, "a reference to host cluster %llu is past "
                            "the end of the file", (unsigned long long) last);
  for (c = first; c <= last; c++)
    if (h->adds[c] < UINT16_MAX)
      h->adds[c]++;
  return 0;
}

/* Would one more reference to the tree overflow a refcount?  Checked
 * before anything changes, so that a refused operation leaves no trace
 * (with 1-bit refcounts no cluster can ever be shared). */
static int
check_headroom (struct q2_image *img, const uint64_t *l1, uint32_t l1_size)
{
  uint64_t max = q2_max_refcount (img);
  struct headroom h;
  uint64_t c;
  int r;

  if ((r = q2_counted_clusters (img, &h.nb)) < 0)
    return r;
  h.adds = calloc (h.nb ? h.nb : 1, sizeof *h.adds);
  if (h.adds == NULL)
    return q2_err (ENOMEM, "out of memory counting references");
  r = walk_tree (img, l1, l1_size, count_reference, &h);
  for (c = 0; r == 0 && c < h.nb; c++) {
    uint64_t rc;
    if (h.adds[c] == 0)
      continue;
    if ((r = q2_refcount_get_writing (img, c, &rc)) < 0)
      break;
    if (rc > max - h.adds[c])
      r = q2_err (EOVERFLOW, "host cluster %llu would need more references "
                  "than %u-bit refcounts can hold", (unsigned long long) c,
                  img->refcount_bits);
  }
  free (h.adds);
  return r;
}

/* Frees what dropped to refcount zero and makes everything durable. */
static int
finish (struct q2_image *img)
{
  /* The flush applies queued decrements, so COPIED sees final counts. */
  int r = q2_flush_locked (img);

  if (r == 0)
    r = q2_fix_copied_flags (img, q2_refcount_of, img);
  if (r == 0)
    r = q2_flush_locked (img);
  return r;
}

int
q2_snapshot_drop_invalid (struct q2_image *img, uint32_t *dropped)
{
  struct q2_snapshot *keep;
  uint32_t i, n = 0;
  int r;

  *dropped = 0;
  keep = calloc (img->nb_snapshots ? img->nb_snapshots : 1, sizeof *keep);
  if (keep == NULL)
    return q2_err (ENOMEM, "out of memory");
  for (i = 0; i < img->nb_snapshots; i++)
    if (!img->snapshots[i].broken)
      keep[n++] = img->snapshots[i];
  if (n == img->nb_snapshots) {
    free (keep);
    return 0;
  }
  if ((r = write_table (img, keep, n)) < 0) {
    free (keep);
    return r;
  }
  for (i = 0; i < img->nb_snapshots; i++)
    if (img->snapshots[i].broken) {
      free (img->snapshots[i].id);
      free (img->snapshots[i].name);
      free (img->snapshots[i].extra);
      (*dropped)++;
    }
  free (img->snapshots);
  img->snapshots = keep;
  img->nb_snapshots = n;
  q2_snapshot_ranges_rebuild (img);
  return q2_flush_locked (img);
}

/* What every operation needs; snapshot create and delete leave the
 * guest's data alone, so persistent bitmaps stay valid through them. */
static int
check_allowed (struct q2_image *img, bool data_changes)
{
  int r = data_changes ? q2_prepare_write (img) : q2_prepare_meta_write (img);

  if (r < 0)
    return r;
  if (img->data_fd != img->fd)
    return q2_err (ENOTSUP, "images with an external data file cannot have "
                   "internal snapshots");
  return 0;
}

/* Delete looks a name up first, as 'qemu-img snapshot -d' does (it
 * knows names only); an ID is accepted when no name matches. */
static int
find_for_delete (const struct q2_image *img, const char *name_or_id)
{
  uint32_t i;

  for (i = 0; i < img->nb_snapshots; i++)
    if (strcmp (img->snapshots[i].name, name_or_id) == 0)
      return i;
  return q2_snapshot_find (img, name_or_id);
}

/* The checks before each operation change nothing on disk but the
 * autoclear bits we do not maintain (cleared by check_allowed, as on
 * any write): a refused operation leaves the image otherwise as it
 * was. */
static int
check_create (struct q2_image *img, const char *name)
{
  int r = check_allowed (img, false);

  if (r < 0)
    return r;
  if (img->nb_snapshots >= QCOW2_MAX_SNAPSHOTS)
    return q2_err (ENOSPC, "too many snapshots (at most %d)",
                   QCOW2_MAX_SNAPSHOTS);
  if (strlen (name) > UINT16_MAX)
    return q2_err (EINVAL, "snapshot name is longer than %d bytes",
                   UINT16_MAX);
  return check_headroom (img, img->l1, img->l1_size);
}

static int
check_delete (struct q2_image *img, const char *name_or_id)
{
  int i, r = check_allowed (img, false);

  if (r < 0 || (i = find_for_delete (img, name_or_id)) < 0)
    return r < 0 ? r : i;
  /* An unusable tree cannot be released (check -r all discards it). */
  return q2_snapshot_l1_valid (img, &img->snapshots[i]);
}

static int
check_apply (struct q2_image *img, const char *name_or_id)
{
  const struct q2_snapshot *s;
  uint64_t *sl1;
  int idx, r;

  if (img->hdr.has_bitmaps_ext &&
      (img->hdr.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
    return q2_err (EBUSY, "the image has persistent dirty bitmaps, which "
                   "reverting would make wrong (remove them first, as "
                   "qemu-img requires)");
  if ((r = check_allowed (img, true)) < 0)
    return r;
  if ((idx = q2_snapshot_find (img, name_or_id)) < 0)
    return idx;
  s = &img->snapshots[idx];
  if ((r = q2_snapshot_read_l1 (img, s, &sl1)) < 0)
    return r;
  r = check_headroom (img, sl1, s->l1_size);
  free (sl1);
  return r;
}

static int
next_id (const struct q2_image *img, char *buf, size_t len)
{
  unsigned long long max = 0;
  uint32_t i;

  for (i = 0; i < img->nb_snapshots; i++) {
    char *end;
    unsigned long long v = strtoull (img->snapshots[i].id, &end, 10);
    if (*end == '\0' && v > max)
      max = v;
  }
  return snprintf (buf, len, "%llu", max + 1);
}

static int
create_locked (struct q2_image *img, const char *name)
{
  uint64_t cs = img->cluster_size, l1_bytes, off;
  struct q2_snapshot *snaps, *s;
  struct timespec now;
  uint8_t *buf;
  char id[32];
  bool fresh;
  uint32_t i;
  int r;

  /* 1. A copy of the active L1 in new clusters. */
  l1_bytes = (uint64_t) img->l1_size * 8;
  off = 0;
  if (l1_bytes) {
    buf = calloc (1, Q2_ROUND_UP (l1_bytes, cs));
    if (buf == NULL)
      return q2_err (ENOMEM, "out of memory");
    for (i = 0; i < img->l1_size; i++)
      q2_put_be64 (buf + i * 8, img->l1[i] & ~QCOW_OFLAG_COPIED);
    r = q2_alloc_clusters (img, Q2_ROUND_UP (l1_bytes, cs) / cs, &off, &fresh);
    if (r == 0)
      r = q2_check_overlap (img, off, Q2_ROUND_UP (l1_bytes, cs),
                            "snapshot L1 table", Q2_OVERLAP_ALL);
    if (r == 0)
      r = q2_io_pwrite (img->fd, buf, Q2_ROUND_UP (l1_bytes, cs), off,
                        "snapshot L1 table");
    free (buf);
    if (r < 0)
      return r;
  }
  /* 2. The tree gains a reference; COPIED goes from the active tree. */
  if ((r = walk_tree (img, img->l1, img->l1_size, add_reference, NULL)) < 0 ||
      (r = finish (img)) < 0)
    return r;

  /* 3. The new table, switched in by one header write. */
  snaps = calloc (img->nb_snapshots + 1, sizeof *snaps);
  if (snaps == NULL)
    return q2_err (ENOMEM, "out of memory");
  if (img->nb_snapshots)
    memcpy (snaps, img->snapshots, img->nb_snapshots * sizeof *snaps);
  s = &snaps[img->nb_snapshots];
  next_id (img, id, sizeof id);
  clock_gettime (CLOCK_REALTIME, &now);
  s->l1_offset = off;
  s->l1_size = img->l1_size;
  s->id = strdup (id);
  s->name = strdup (name);
  s->date_sec = now.tv_sec;
  s->date_nsec = now.tv_nsec;
  s->disk_size = img->hdr.size;
  s->icount = 0;               /* as qemu-img records it */
  s->extra_size = 24;
  s->extra = calloc (1, 24);
  if (s->id == NULL || s->name == NULL || s->extra == NULL) {
    free (s->id); free (s->name); free (s->extra); free (snaps);
    return q2_err (ENOMEM, "out of memory");
  }
  q2_put_be64 (s->extra + 8, s->disk_size);
  q2_put_be64 (s->extra + 16, s->icount);
  r = write_table (img, snaps, img->nb_snapshots + 1);
  if (r < 0) {
    free (s->id); free (s->name); free (s->extra); free (snaps);
    return r;
  }
  free (img->snapshots);
  img->snapshots = snaps;
  img->nb_snapshots++;
  q2_snapshot_ranges_rebuild (img);
  return q2_flush_locked (img);
}

static int
delete_locked (struct q2_image *img, const char *name_or_id)
{
  struct q2_snapshot gone, *snaps;
  uint64_t *l1;
  int i, r;

  if ((i = find_for_delete (img, name_or_id)) < 0)
    return i;
  gone = img->snapshots[i];
  if ((r = q2_snapshot_read_l1 (img, &gone, &l1)) < 0)
    return r;

  /* 1. The table without it: from here on a crash only leaks. */
  snaps = calloc (img->nb_snapshots, sizeof *snaps);
  if (snaps == NULL) {
    free (l1);
    return q2_err (ENOMEM, "out of memory");
  }
  if (i > 0)
    memcpy (snaps, img->snapshots, i * sizeof *snaps);
  if ((uint32_t) i + 1 < img->nb_snapshots)
    memcpy (snaps + i, img->snapshots + i + 1,
            (img->nb_snapshots - i - 1) * sizeof *snaps);
  if ((r = write_table (img, snaps, img->nb_snapshots - 1)) < 0) {
    free (snaps);
    free (l1);
    return r;
  }
  free (img->snapshots);
  img->snapshots = snaps;
  img->nb_snapshots--;
  q2_snapshot_ranges_rebuild (img);

  /* 2. Its tree and L1 lose a reference (nothing on disk points there
   * any more, so the decrements need not wait). */
  r = walk_tree (img, l1, gone.l1_size, drop_reference, NULL);
  free (l1);
  if (r == 0 && gone.l1_size)
    r = q2_free_later (img, gone.l1_offset, (uint64_t) gone.l1_size * 8);
  free (gone.id);
  free (gone.name);
  free (gone.extra);
  if (r < 0)
    return r;
  return finish (img);
}

/* Replaces the active L1 by a bigger one (a snapshot with a bigger L1
 * is being applied). */
static int
grow_l1 (struct q2_image *img, uint32_t new_size)
{
  uint64_t cs = img->cluster_size, bytes = (uint64_t) new_size * 8, off;
  uint64_t old_off = img->hdr.l1_table_offset;
  uint64_t old_bytes = (uint64_t) img->l1_size * 8;
  uint64_t *l1 = calloc (new_size, sizeof *l1);
  uint8_t hdr[12];
  bool fresh;
  int r;

  if (l1 == NULL)
    return q2_err (ENOMEM, "out of memory");
  memcpy (l1, img->l1, old_bytes);
  if ((r = q2_alloc_clusters (img, Q2_ROUND_UP (bytes, cs) / cs, &off,
                              &fresh)) < 0 ||
      (r = q2_check_overlap (img, off, Q2_ROUND_UP (bytes, cs), "L1 table",
                             Q2_OVERLAP_ALL)) < 0) {
    free (l1);
    return r;
  }
  free (img->l1);
  img->l1 = l1;
  img->l1_size = new_size;
  img->meta_stale = true;
  img->hdr.l1_table_offset = off;
  img->hdr.l1_size = new_size;
  q2_l1_mark_dirty (img, 0, img->l1_size);
  if ((r = q2_flush_locked (img)) < 0)
    return r;
  /* Size and offset in one write: a crash must not pair them wrongly. */
  q2_put_be32 (hdr, new_size);
  q2_put_be64 (hdr + 4, off);
  if ((r = q2_write_header_field (img, 36, hdr, 12)) < 0)
    return r;
  return old_bytes ? q2_free_later (img, old_off, old_bytes) : 0;
}

static int
apply_locked (struct q2_image *img, const char *name_or_id)
{
  const struct q2_snapshot *s;
  uint64_t *sl1, *old;
  uint32_t i;
  int idx, r;

  if ((idx = q2_snapshot_find (img, name_or_id)) < 0)
    return idx;
  s = &img->snapshots[idx];
  if ((r = q2_snapshot_read_l1 (img, s, &sl1)) < 0)
    return r;
  if (s->l1_size > img->l1_size && (r = grow_l1 (img, s->l1_size)) < 0)
    goto out;

  /* 1. The snapshot's tree gains the active reference first. */
  if ((r = walk_tree (img, sl1, s->l1_size, add_reference, NULL)) < 0 ||
      (r = q2_flush_locked (img)) < 0)
    goto out;
  /* 2. The active L1 becomes the snapshot's, in place and synced. */
  old = malloc ((uint64_t) img->l1_size * 8 + 8);
  if (old == NULL) {
    r = q2_err (ENOMEM, "out of memory");
    goto out;
  }
  memcpy (old, img->l1, (uint64_t) img->l1_size * 8);
  for (i = 0; i < img->l1_size; i++)
    img->l1[i] = i < s->l1_size ? sl1[i] & ~QCOW_OFLAG_COPIED : 0;
  img->meta_stale = true;
  q2_l1_mark_dirty (img, 0, img->l1_size);
  q2_cache_discard (img->l2_cache, 0, UINT64_MAX);
  if ((r = q2_flush_locked (img)) < 0) {
    free (old);
    goto out;
  }
  if (s->disk_size != img->hdr.size) {
    uint8_t b[8];
    q2_put_be64 (b, s->disk_size);
    if ((r = q2_write_header_field (img, 24, b, 8)) < 0) {
      free (old);
      goto out;
    }
    img->hdr.size = s->disk_size;
    img->virtual_size = Q2_ROUND_DOWN (s->disk_size, 512);
  }
  /* 3. The old tree loses its reference; 4. COPIED is recomputed. */
  r = walk_tree (img, old, img->l1_size, drop_reference, NULL);
  free (old);
  if (r == 0)
    r = finish (img);
 out:
  free (sl1);
  return r;
}

/* Sharing or unsharing a tree changes refcounts and COPIED flags in
 * different clusters, and no order of those writes is consistent at
 * every step.  So the image is marked dirty for the duration (v3): a
 * crash leaves it dirty, and the next read-write open (ours or QEMU's)
 * rebuilds refcounts and COPIED flags from the tables. */
static int
locked (struct q2_image *img, int (*check) (struct q2_image *, const char *),
        int (*fn) (struct q2_image *, const char *), const char *arg)
{
  int r;

  pthread_rwlock_wrlock (&img->io_lock);
  q2_wait_no_inflight_locked (img);
  r = check (img, arg);
  if (r >= 0)
    r = q2_flush_locked (img);
  if (r == 0)
    r = q2_set_dirty (img, true);
  if (r == 0) {
    r = fn (img, arg);
    if (r == 0)
      r = q2_set_dirty (img, false);
    else
      img->corrupt = true;      /* reopen to repair; the image is dirty */
  }
  pthread_rwlock_unlock (&img->io_lock);
  return r;
}

int
q2_snapshot_create (struct q2_image *img, const char *name)
{
  return locked (img, check_create, create_locked, name);
}

int
q2_snapshot_delete (struct q2_image *img, const char *name_or_id)
{
  return locked (img, check_delete, delete_locked, name_or_id);
}

int
q2_snapshot_apply (struct q2_image *img, const char *name_or_id)
{
  return locked (img, check_apply, apply_locked, name_or_id);
}
