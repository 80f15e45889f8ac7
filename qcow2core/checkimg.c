/* Checking an image as 'qemu-img check' does: the refcount of every
 * cluster of the file against the references found by walking the
 * image, and the COPIED flags of the active L1 and L2 tables.  Repair
 * either drops leaked refcounts (-r leaks) or rebuilds the refcount
 * structures, which also fixes the COPIED flags (-r all). */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

/* What one pass over the image found. */
struct pass {
  struct q2_image *img;
  const struct q2_check_result *out;   /* for the report callback */
  bool quiet;                   /* report only repairs */
  bool fix_leaks;
  bool refs_ok;                 /* the reference walk completed */
  bool rebuild;                 /* refcount structures are broken */
  /* What QEMU repairs only by a rebuild (its "rebuild" flag): -r leaks
   * then gives up, as qemu-img check -r leaks does. */
  bool rebuild_only;
  uint64_t leaks, corruptions, leaks_fixed;
  uint64_t copied_errors;       /* part of corruptions */
  uint64_t broken_snapshots;    /* snapshots with an invalid L1 table */
  uint64_t image_end_offset;
  uint64_t allocated, fragmented, compressed;
};

static void
report (const struct pass *p, bool always, const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));

static void
report (const struct pass *p, bool always, const char *fmt, ...)
{
  char msg[1024];
  va_list ap;

  if ((p->quiet && !always) || p->out->report == NULL)
    return;
  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  p->out->report (p->out->opaque, msg);
}

/* Counts the refcount table and blocks.  A block must be a valid
 * cluster that nothing else uses; otherwise fixing leaks would write
 * into whatever shares it, and only a rebuild can repair. */
static void
count_refcount_structures (struct pass *p, uint32_t *refs, uint64_t nb)
{
  struct q2_image *img = p->img;
  uint64_t cs = img->cluster_size, i, c;
  uint64_t first = img->hdr.refcount_table_offset / cs;

  for (c = first; c < first + img->hdr.refcount_table_clusters && c < nb; c++)
    if (refs[c] != UINT32_MAX)
      refs[c]++;
  for (i = 0; i < img->reftable_entries; i++) {
    uint64_t e = img->reftable[i], off = e & REFT_OFFSET_MASK;
    const char *bad = NULL;
    if (e & ~REFT_OFFSET_MASK) {
      p->corruptions++;
      p->rebuild = p->rebuild_only = true;
      report (p, false, "ERROR refcount table entry %llu has reserved bits "
              "set", (unsigned long long) i);
    }
    if (off == 0)
      continue;
    if (!Q2_IS_ALIGNED (off, cs))
      bad = "is not cluster aligned";
    else if (off / cs >= nb)
      bad = "is outside the image";
    if (bad) {
      p->corruptions++;
      p->rebuild = true;
      p->rebuild_only |= !Q2_IS_ALIGNED (off, cs);
      report (p, false, "ERROR refcount block %llu %s (offset %#llx)",
              (unsigned long long) i, bad, (unsigned long long) off);
    }
    else if (refs[off / cs] != UINT32_MAX)
      refs[off / cs]++;
  }
  for (i = 0; i < img->reftable_entries; i++) {
    uint64_t off = img->reftable[i] & REFT_OFFSET_MASK;
    if (off && Q2_IS_ALIGNED (off, cs) && off / cs < nb &&
        refs[off / cs] != 1) {
      p->corruptions++;
      p->rebuild = p->rebuild_only = true;
      report (p, false, "ERROR refcount block %llu refcount=%u",
              (unsigned long long) i, refs[off / cs]);
    }
  }
}

/* Compares every refcount with the references; leaks are dropped to
 * the reference count when fix_leaks. */
static int
compare_refcounts (struct pass *p, const uint32_t *refs, uint64_t nb)
{
  struct q2_image *img = p->img;
  uint64_t per_block = 1ULL << (img->cluster_bits + 3 -
                                img->hdr.refcount_order);
  uint64_t c, highest = 0;
  bool any = false;
  int r;

  for (c = 0; c < nb; c++) {
    uint64_t rc, rc_now;
    if (refs[c]) {
      highest = c;
      any = true;
    }
    r = q2_refcount_get (img, c, &rc);
    if (r < 0) {
      /* A broken refcount table entry: the whole block is unusable. */
      p->corruptions++;
      report (p, false, "ERROR refcount block %llu: %s",
              (unsigned long long) (c / per_block), q2_last_error ());
      c = Q2_ROUND_DOWN (c, per_block) + per_block - 1;
      continue;
    }
    rc_now = rc;
    if (rc > refs[c]) {
      p->leaks++;
      report (p, false, "Leaked cluster %llu refcount=%llu reference=%u",
              (unsigned long long) c, (unsigned long long) rc, refs[c]);
      if (p->fix_leaks) {
        r = q2_refcount_update (img, c, -(int64_t) (rc - refs[c]), NULL);
        if (r < 0)
          return q2_err_prefix (r, "repairing cluster %llu",
                                (unsigned long long) c);
        report (p, true, "Repairing cluster %llu refcount=%llu "
                "reference=%u", (unsigned long long) c,
                (unsigned long long) rc, refs[c]);
        p->leaks_fixed++;
        rc_now = refs[c];
      }
    }
    else if (rc < refs[c]) {
      p->corruptions++;
      p->rebuild_only |= rc == 0;
      report (p, false, "ERROR cluster %llu refcount=%llu reference=%u",
              (unsigned long long) c, (unsigned long long) rc, refs[c]);
    }
    /* As QEMU: the image ends after the last cluster still counted,
     * a leak that is not repaired too. */
    if (rc_now > 0) {
      highest = c;
      any = true;
    }
  }
  p->image_end_offset = any ? (highest + 1) << img->cluster_bits : 0;
  if (p->fix_leaks && p->leaks_fixed &&
      (r = q2_flush_locked (img)) < 0)
    return q2_err_prefix (r, "writing the repaired refcounts");
  return 0;
}

static void
refcount_of (struct pass *p, uint64_t host, uint64_t *rc)
{
  if (q2_refcount_get (p->img, host >> p->img->cluster_bits, rc) < 0)
    *rc = 0;                    /* already reported as a broken block */
}

/* COPIED must be set exactly where the refcount is 1. */
static bool
copied_wrong (struct pass *p, uint64_t host, uint64_t entry, uint64_t *rc)
{
  refcount_of (p, host, rc);
  if ((*rc == 1) == !!(entry & QCOW_OFLAG_COPIED))
    return false;
  p->corruptions++;
  p->copied_errors++;
  return true;
}

/* Checks one L2 table: valid entries; for the active tables (where is
 * "") also COPIED exactly where a cluster's refcount is 1, and the
 * allocation statistics. */
static int
check_l2 (struct pass *p, const char *where, uint64_t l1_index,
          uint64_t l2_off, uint8_t *buf)
{
  struct q2_image *img = p->img;
  bool data_file = img->data_fd != img->fd;
  /* Contiguity is counted within one L2 table, as qemu-img does. */
  uint64_t i, n = 1ULL << img->l2_bits, next_contiguous = 0;
  int r;

  r = q2_io_pread (img->fd, buf, img->cluster_size, l2_off, false,
                   "L2 table");
  if (r < 0) {
    p->corruptions++;
    report (p, false, "ERROR %sreading L2 table at %#llx (L1 index "
            "%llu): %s", where, (unsigned long long) l2_off,
            (unsigned long long) l1_index, q2_last_error ());
    return 0;
  }
  for (i = 0; i < n; i++) {
    const uint8_t *e = buf + i * img->l2_entry_size;
    uint64_t entry = q2_be64 (e);
    uint64_t bitmap = img->extended_l2 ? q2_be64 (e + 8) : 0;
    uint64_t guest = ((l1_index << img->l2_bits) + i) << img->cluster_bits;
    struct q2_l2_decoded d;
    uint64_t host, rc;

    if (entry == 0 && bitmap == 0)
      continue;
    /* A data file offset unlike the guest's fails reads, but qemu-img
     * check reports nothing and no repair could fix it: as there. */
    if (q2_decode_l2 (img, entry, bitmap, 0,
                      data_file ? entry & L2E_OFFSET_MASK : guest, &d) < 0) {
      p->corruptions++;
      report (p, false, "ERROR %sL2 table at %#llx, index %llu (guest "
              "offset %#llx): %s", where, (unsigned long long) l2_off,
              (unsigned long long) i, (unsigned long long) guest,
              q2_last_error ());
      continue;
    }
    if (*where)
      continue;
    if (entry & QCOW_OFLAG_COMPRESSED) {
      /* Fragmented by nature, as qemu-img counts them. */
      p->allocated++;
      p->compressed++;
      p->fragmented++;
      continue;
    }
    host = entry & L2E_OFFSET_MASK;
    if (host == 0 && !d.copied)          /* unallocated, as decoded */
      continue;
    p->allocated++;
    if (next_contiguous && host != next_contiguous)
      p->fragmented++;
    next_contiguous = host + img->cluster_size;
    if (data_file)
      continue;                 /* data clusters are not refcounted */
    if (host >= img->file_size) {
      p->corruptions++;
      report (p, false, "ERROR L2 table at %#llx, index %llu: data cluster "
              "offset %#llx is past the end of the file",
              (unsigned long long) l2_off, (unsigned long long) i,
              (unsigned long long) host);
      continue;
    }
    if (copied_wrong (p, host, entry, &rc))
      report (p, false, "ERROR OFLAG_COPIED data cluster: l2_entry=%llx "
              "refcount=%llu", (unsigned long long) entry,
              (unsigned long long) rc);
  }
  return 0;
}

/* The tables of one L1: the active one (where is "") or a snapshot's
 * (where is "snapshot ID: ", the prefix of its messages). */
static int
check_tables (struct pass *p, const char *where, const uint64_t *l1,
              uint64_t l1_size)
{
  struct q2_image *img = p->img;
  uint64_t i;
  uint8_t *buf = malloc (img->cluster_size);
  int r = 0;

  if (buf == NULL)
    return q2_err (ENOMEM, "out of memory");
  for (i = 0; i < l1_size; i++) {
    uint64_t l1e = l1[i], l2_off, rc;
    if ((l1e & L1E_OFFSET_MASK) == 0) {
      /* No L2 table: no flag or reserved bit may be set either. */
      if (l1e != 0) {
        p->corruptions++;
        report (p, false, "ERROR %sL1 entry %llu (%#llx) has reserved "
                "bits or COPIED set without an L2 table", where,
                (unsigned long long) i, (unsigned long long) l1e);
      }
      continue;
    }
    if (q2_check_l1_entry (img, i, l1e, &l2_off) < 0) {
      p->corruptions++;
      report (p, false, "ERROR %s%s", where, q2_last_error ());
      continue;
    }
    if (*where == '\0' && copied_wrong (p, l2_off, l1e, &rc))
      report (p, false, "ERROR OFLAG_COPIED L2 cluster: l1_index=%llu "
              "l1_entry=%llx refcount=%llu", (unsigned long long) i,
              (unsigned long long) l1e, (unsigned long long) rc);
    if ((r = check_l2 (p, where, i, l2_off, buf)) < 0)
      break;
  }
  free (buf);
  return r;
}

/* Snapshot trees hold no COPIED flags, but their entries must be valid
 * too: a revert would make them active. */
static int
check_snapshot_tables (struct pass *p)
{
  struct q2_image *img = p->img;
  uint32_t i;
  int r = 0;

  for (i = 0; r == 0 && i < img->nb_snapshots; i++) {
    const struct q2_snapshot *s = &img->snapshots[i];
    char where[64];
    uint64_t *l1;
    if (q2_snapshot_read_l1 (img, s, &l1) < 0) {
      p->corruptions++;
      p->broken_snapshots++;
      report (p, false, "ERROR %s; snapshot table entry corrupted",
              q2_last_error ());
      continue;
    }
    snprintf (where, sizeof where, "snapshot %.40s: ", s->id);
    r = check_tables (p, where, l1, s->l1_size);
    free (l1);
  }
  return r;
}

static int
run_pass (struct q2_image *img, const struct q2_check_result *out,
          bool quiet, bool fix_leaks, struct pass *p)
{
  uint32_t *refs = NULL;
  uint64_t nb = 0;
  int r;

  memset (p, 0, sizeof *p);
  p->img = img;
  p->out = out;
  p->quiet = quiet;
  p->fix_leaks = fix_leaks;
  r = q2_count_references (img, &refs, &nb);
  if (r == 0)
    count_refcount_structures (p, refs, nb);
  if (r < 0) {
    /* Nothing can be compared against an incomplete walk. */
    p->corruptions++;
    report (p, false, "ERROR %s", q2_last_error ());
    p->image_end_offset = Q2_ROUND_UP (img->file_size, img->cluster_size);
  }
  else {
    p->refs_ok = true;
    r = compare_refcounts (p, refs, nb);
    free (refs);
    if (r < 0)
      return r;
  }
  if ((r = check_tables (p, "", img->l1, img->l1_size)) < 0)
    return r;
  return check_snapshot_tables (p);
}

/* Reopens the files read-write for a repair.  Unlike q2_make_writable
 * this accepts images marked corrupt or dirty: fixing them is the
 * point. */
static int
open_for_repair (struct q2_image *img)
{
  int r = q2_switch_to_rw (img);

  if (r == 0)
    img->corrupt = false;
  return r;
}

/* -r all: an entry with an unaligned offset and no data in it loses
 * the offset, as QEMU repairs it: a plain zero cluster, or with
 * extended L2 an unallocated one whose zero bits stay (it reads the
 * same either way). */
static int
fix_unaligned_zero_entries (struct q2_image *img, uint64_t *fixed)
{
  uint64_t i, j, n = 1ULL << img->l2_bits;
  int r;

  if (img->hdr.version < 3)
    return 0;
  for (i = 0; i < img->l1_size; i++) {
    uint64_t l2;
    if (q2_l1_entry_l2 (img, i, &l2) < 0 || l2 == 0)
      continue;
    for (j = 0; j < n; j++) {
      uint64_t g = ((i << img->l2_bits) + j) << img->cluster_bits, so, e;
      uint8_t *p;
      if ((r = q2_l2_entry_ref (img, l2, g, &p, &so)) < 0)
        return r;
      e = q2_be64 (p);
      if (!q2_unaligned_without_data (img, e, img->extended_l2 ?
                                      q2_be64 (p + 8) : 0))
        continue;
      q2_put_be64 (p, img->extended_l2 ? 0 : QCOW_OFLAG_ZERO);
      q2_cache_mark_dirty (img->l2_cache, so);
      (*fixed)++;
    }
  }
  return 0;
}

/* After a repair that left no corruption, the image is clean again. */
static int
mark_consistent (struct q2_image *img)
{
  uint64_t clear = QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT;

  if (img->hdr.version < 3)
    return 0;
  return q2_write_incompatible (img, img->hdr.incompatible_features & ~clear);
}

static void
set_result (struct q2_check_result *res, const struct pass *p)
{
  uint64_t cs = p->img->cluster_size;

  res->leaks = p->leaks;
  res->corruptions = p->corruptions;
  res->image_end_offset = p->image_end_offset;
  res->total_clusters = (p->img->virtual_size + cs - 1) / cs;
  res->allocated_clusters = p->allocated;
  res->fragmented_clusters = p->fragmented;
  res->compressed_clusters = p->compressed;
}

static int
check_locked (struct q2_image *img, int mode, struct q2_check_result *res)
{
  bool dirty = img->hdr.incompatible_features &
    (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT);
  struct pass first, fix, last;
  int r;

  if ((r = run_pass (img, res, false, false, &first)) < 0)
    return r;
  set_result (res, &first);
  if (mode == Q2_REPAIR_NONE ||
      (first.leaks == 0 && first.corruptions == 0 && !dirty))
    return 0;

  if (mode == Q2_REPAIR_LEAKS && first.rebuild_only) {
    if (res->report)
      res->report (res->opaque, "ERROR need to rebuild refcount structures");
    return q2_err (EIO, "%s", strerror (EIO));
  }
  if ((r = open_for_repair (img)) < 0)
    return r;
  if (mode == Q2_REPAIR_ALL && first.corruptions && first.refs_ok) {
    uint64_t fixed = 0;
    if ((r = fix_unaligned_zero_entries (img, &fixed)) < 0)
      return q2_err_prefix (r, "repairing zero clusters");
    if (res->report)
      res->report (res->opaque, "Rebuilding refcount structure");
    if ((r = q2_rebuild_refcounts (img)) < 0)
      return q2_err_prefix (r, "rebuilding the refcount structures");
    /* Unusable snapshots go once refcounts can be trusted again, as
     * QEMU discards them. */
    if (first.broken_snapshots) {
      uint32_t dropped = 0;
      if ((r = q2_snapshot_drop_invalid (img, &dropped)) < 0)
        return q2_err_prefix (r, "discarding invalid snapshots");
      if (res->report && dropped)
        res->report (res->opaque, "Discarded snapshots with an invalid L1 "
                     "table");
    }
    res->rebuilt = true;
    res->leaks_fixed = first.leaks;
    res->corruptions_fixed = first.corruptions;
  }
  else {
    /* Leaks are dropped only from sound refcount blocks. */
    if (first.leaks && !first.rebuild) {
      if ((r = run_pass (img, res, true, true, &fix)) < 0)
        return r;
      res->leaks_fixed = fix.leaks_fixed;
    }
    /* COPIED flags follow the refcounts when nothing else is wrong, as
     * QEMU repairs them with -r leaks too. */
    if (first.copied_errors && first.corruptions == first.copied_errors) {
      if ((r = q2_fix_copied_flags (img, q2_refcount_of, img)) < 0 ||
          (r = q2_flush_locked (img)) < 0)
        return q2_err_prefix (r, "repairing COPIED flags");
      res->corruptions_fixed = first.copied_errors;
    }
  }

  /* Double check what the repair left; what it could not repair (an
   * invalid entry no rebuild changes) is not counted as fixed.  When
   * nothing was repaired the first pass stands, and its errors are not
   * reported twice. */
  if (!dirty && !res->rebuilt && res->leaks_fixed == 0 &&
      res->corruptions_fixed == 0)
    last = first;
  else if ((r = run_pass (img, res, false, false, &last)) < 0)
    return r;
  set_result (res, &last);
  if (res->rebuilt)
    res->corruptions_fixed = first.corruptions > last.corruptions ?
      first.corruptions - last.corruptions : 0;
  if (last.corruptions == 0 && (r = mark_consistent (img)) < 0)
    return r;
  return q2_flush_locked (img);
}

int
q2_check (struct q2_image *img, int repair_mode,
          struct q2_check_result *res)
{
  int r;

  res->leaks = res->corruptions = res->check_errors = 0;
  res->leaks_fixed = res->corruptions_fixed = 0;
  res->image_end_offset = res->total_clusters = 0;
  res->allocated_clusters = res->fragmented_clusters = 0;
  res->compressed_clusters = 0;
  res->rebuilt = false;
  if (img->fmt != Q2_FMT_QCOW2)
    return q2_err (ENOTSUP, "%s: only qcow2 images can be checked",
                   img->path);
  if (repair_mode < Q2_REPAIR_NONE || repair_mode > Q2_REPAIR_ALL)
    return q2_err (EINVAL, "unknown repair mode %d", repair_mode);
  pthread_rwlock_wrlock (&img->io_lock);
  r = check_locked (img, repair_mode, res);
  pthread_rwlock_unlock (&img->io_lock);
  if (r < 0)
    res->check_errors++;
  return r;
}
