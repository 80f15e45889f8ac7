/* Where guest data comes from, layer by layer, as 'qemu-img map'
 * reports it; and a read-only view of the header for 'info'. */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

/* A raw layer: data or hole, from the file system. */
static int
raw_map (struct q2_image *img, uint64_t offset, uint64_t len,
         struct q2_map_info *out)
{
  bool data;

  out->present = out->has_offset = true;
  out->offset = offset;
  q2_host_status (img->fd, img->file_size, offset, len, &data, &out->length);
  out->data = data;
  out->zero = !data;
  return 0;
}

static int layer_map (struct q2_image *img, uint64_t offset, uint64_t len,
                      struct q2_map_info *out);

static int
qcow2_layer_map (struct q2_image *img, uint64_t offset, uint64_t len,
                 struct q2_map_info *out)
{
  uint64_t cluster_end;
  struct q2_map m;
  int r;

  if ((r = q2_map (img, offset, len, &m)) < 0)
    return r;
  out->length = m.length;
  /* Runs of zero or unallocated clusters may mix clusters with and
   * without a host offset: take them one cluster at a time. */
  cluster_end = Q2_ROUND_DOWN (offset, img->cluster_size) + img->cluster_size;
  if (m.type == Q2_ZERO || (m.type == Q2_UNALLOC && img->extended_l2))
    out->length = Q2_MIN (out->length, cluster_end - offset);

  switch (m.type) {
  case Q2_NORMAL:
    out->present = out->data = out->has_offset = true;
    out->offset = m.host_offset;
    if (img->data_fd != img->fd)
      out->filename = img->data_path;
    /* Like block status: holes in a preallocated file read as zeros. */
    if (!img->crypto && (r = q2_prealloc_state (img)) != 0) {
      bool data;
      if (r < 0)
        return r;
      q2_host_status (img->data_fd, img->data_fd == img->fd ?
                      img->file_size : img->data_file_size, m.host_offset,
                      m.length, &data, &out->length);
      out->zero = !data;
    }
    return 0;
  case Q2_ZERO:
    out->present = out->zero = true;
    if (m.host_offset) {
      out->has_offset = true;
      out->offset = m.host_offset;
      if (img->data_fd != img->fd)
        out->filename = img->data_path;
    }
    return 0;
  case Q2_COMPRESSED:
    out->present = out->data = out->compressed = true;
    return 0;
  case Q2_UNALLOC:
    break;
  }

  if (img->backing && offset < img->backing->virtual_size)
    return layer_map (img->backing, offset,
                      Q2_MIN (out->length,
                              img->backing->virtual_size - offset), out);
  /* Unallocated in the whole chain (or past a shorter backing file). */
  out->zero = true;
  if (m.host_offset) {
    out->has_offset = true;
    out->offset = m.host_offset;
  }
  return 0;
}

static int
layer_map (struct q2_image *img, uint64_t offset, uint64_t len,
           struct q2_map_info *out)
{
  int r;

  memset (out, 0, sizeof *out);
  out->depth = img->depth;
  out->filename = img->path;
  if (img->fmt == Q2_FMT_RAW)
    return raw_map (img, offset, len, out);
  r = qcow2_layer_map (img, offset, len, out);
  /* As QEMU: the host offset of an encrypted layer's cluster holds
   * ciphertext, so it is not shown. */
  if (r == 0 && out->depth == img->depth && img->hdr.crypt_method) {
    out->has_offset = false;
    out->offset = 0;
  }
  return r;
}

int
q2_map_range (struct q2_image *img, uint64_t offset, uint64_t len,
              struct q2_map_info *out)
{
  if (offset >= img->virtual_size || len == 0)
    return q2_err (EINVAL, "map: offset %#llx length %llu is outside the "
                   "virtual size %llu", (unsigned long long) offset,
                   (unsigned long long) len,
                   (unsigned long long) img->virtual_size);
  len = Q2_MIN (len, img->virtual_size - offset);
  return layer_map (img, offset, len, out);
}

void
q2_image_get_info (const struct q2_image *img, struct q2_image_info *info)
{
  const struct q2_header *h = &img->hdr;

  memset (info, 0, sizeof *info);
  info->path = img->path;
  info->format = img->fmt == Q2_FMT_QCOW2 ? "qcow2" : "raw";
  info->virtual_size = img->virtual_size;
  info->file_size = img->file_size;
  info->backing = img->backing;
  if (img->fmt != Q2_FMT_QCOW2)
    return;
  info->version = h->version;
  info->cluster_size = img->cluster_size;
  info->refcount_bits = img->refcount_bits;
  info->lazy_refcounts = h->compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS;
  info->extended_l2 = img->extended_l2;
  info->corrupt = h->incompatible_features & QCOW2_INCOMPAT_CORRUPT;
  info->dirty = h->incompatible_features & QCOW2_INCOMPAT_DIRTY;
  info->bitmaps = h->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS;
  info->compression_type = h->compression_type;
  info->backing_file = h->backing_file;
  info->backing_format = h->backing_format;
  info->data_file = h->data_file;
  info->data_file_raw = h->autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW;
  info->data_path = h->data_file ? img->data_path : NULL;
  info->data_file_size = img->data_file_size;
}
