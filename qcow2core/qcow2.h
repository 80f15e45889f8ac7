/* qcow2core: a self-contained qcow2 engine.
 *
 * Every function returning int returns 0 (or a count) on success and a
 * negative errno on failure; the reason is then available from
 * q2_last_error() in the same thread.  Nothing here depends on nbdkit.
 */
#ifndef QCOW2CORE_QCOW2_H
#define QCOW2CORE_QCOW2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct q2_image;

/* Backing chains deeper than this are refused. */
#define Q2_MAX_CHAIN_DEPTH 16

struct q2_open_opts {
  bool readonly;
  /* Bytes of L2 cache; 0 = enough for the whole image, at most 32 MiB. */
  uint64_t l2_cache_size;
};

/* Open a qcow2 image and its whole backing chain (qcow2 or raw). */
int q2_open (const char *path, const struct q2_open_opts *opts,
             struct q2_image **out);
/* Close the image and its chain.  Returns -errno if writing back
 * dirty state failed; the image is freed in every case. */
int q2_close (struct q2_image *img);

/* The message describing the last failure in this thread. */
const char *q2_last_error (void);

uint64_t q2_virtual_size (const struct q2_image *img);
uint32_t q2_cluster_size (const struct q2_image *img);
bool q2_is_readonly (const struct q2_image *img);
/* "qcow2" or "raw". */
const char *q2_format_name (const struct q2_image *img);

/* Reads count bytes at offset of the guest view.  The range must lie
 * inside the virtual size.  Corruption found gives -EIO. */
int q2_pread (struct q2_image *img, void *buf, uint64_t count,
              uint64_t offset);

/* Make a read-only image writable (reopening the files read-write).
 * Refuses images marked corrupt; a dirty image is refused too. */
int q2_make_writable (struct q2_image *img);

/* Writes count bytes at offset; with fua, durable before returning. */
int q2_pwrite (struct q2_image *img, const void *buf, uint64_t count,
               uint64_t offset, bool fua);
/* Makes the range read as zeros.  may_trim allows freeing host clusters;
 * with fast, fails with -ENOTSUP before changing anything if data would
 * have to be written. */
int q2_zero (struct q2_image *img, uint64_t count, uint64_t offset,
             bool may_trim, bool fast, bool fua);
/* Frees whole clusters in the range (advisory). */
int q2_trim (struct q2_image *img, uint64_t count, uint64_t offset, bool fua);
/* Makes every completed write durable. */
int q2_flush (struct q2_image *img);

/* Extent flags, the same values as NBD and nbdkit use. */
#define Q2_EXTENT_HOLE 1
#define Q2_EXTENT_ZERO 2

/* Called for consecutive extents starting at or before the requested
 * offset.  Returning non-zero stops the walk and is passed back. */
typedef int (*q2_extent_fn) (void *opaque, uint64_t offset, uint64_t length,
                             uint32_t flags);

/* Reports allocation status from offset for at least one extent and at
 * most up to offset + count, as QEMU's block status would. */
int q2_extents (struct q2_image *img, uint64_t offset, uint64_t count,
                bool req_one, q2_extent_fn fn, void *opaque);

/* Warm metadata caches and advise the kernel to read ahead the data. */
int q2_cache (struct q2_image *img, uint64_t offset, uint64_t count);

/* Compiled-in features, for --dump-plugin. */
bool q2_have_zstd (void);

#endif /* QCOW2CORE_QCOW2_H */
