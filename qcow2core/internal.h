/* qcow2core internals shared between the core's source files. */
#ifndef QCOW2CORE_INTERNAL_H
#define QCOW2CORE_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "qcow2.h"

/* ---- small helpers ---- */
#define Q2_MIN(a, b) ((a) < (b) ? (a) : (b))
#define Q2_MAX(a, b) ((a) > (b) ? (a) : (b))
#define Q2_ROUND_DOWN(x, a) ((x) & ~((uint64_t) (a) - 1))
#define Q2_ROUND_UP(x, a) (((x) + (a) - 1) & ~((uint64_t) (a) - 1))
#define Q2_IS_ALIGNED(x, a) (((x) & ((uint64_t) (a) - 1)) == 0)

static inline uint16_t q2_be16 (const void *p)
{
  const uint8_t *b = p;
  return (uint16_t) (b[0] << 8 | b[1]);
}
static inline uint32_t q2_be32 (const void *p)
{
  const uint8_t *b = p;
  return (uint32_t) b[0] << 24 | (uint32_t) b[1] << 16 |
         (uint32_t) b[2] << 8 | b[3];
}
static inline uint64_t q2_be64 (const void *p)
{
  return (uint64_t) q2_be32 (p) << 32 | q2_be32 ((const uint8_t *) p + 4);
}
static inline void q2_put_be16 (void *p, uint16_t v)
{
  uint8_t *b = p;
  b[0] = v >> 8; b[1] = v;
}
static inline void q2_put_be32 (void *p, uint32_t v)
{
  uint8_t *b = p;
  b[0] = v >> 24; b[1] = v >> 16; b[2] = v >> 8; b[3] = v;
}
static inline void q2_put_be64 (void *p, uint64_t v)
{
  q2_put_be32 (p, v >> 32);
  q2_put_be32 ((uint8_t *) p + 4, v);
}

/* A NUL-terminated copy of len bytes (names read from the image). */
char *q2_dup_string (const uint8_t *p, size_t len);

/* ---- error.c ---- */
/* Records a message for q2_last_error() and returns -errnum. */
int q2_err (int errnum, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
/* Prefixes the current message with more context; returns r. */
int q2_err_prefix (int r, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

/* ---- io.c: whole-buffer I/O on a file descriptor ---- */
/* Reads exactly count bytes; bytes past end of file read as zeros when
 * zero_past_eof, else a short read is -EIO. */
int q2_io_pread (int fd, void *buf, size_t count, uint64_t offset,
                 bool zero_past_eof, const char *what);
int q2_io_pwrite (int fd, const void *buf, size_t count, uint64_t offset,
                  const char *what);
int q2_io_file_size (int fd, uint64_t *size);
struct iovec;
/* Moves count bytes from a pipe to fd at offset: 1 done, 0 when the
 * file system cannot splice (nothing was written), or -errno. */
int q2_io_splice_out (int pipe_fd, int fd, uint64_t count, uint64_t offset,
                      const char *what);
int q2_io_pwritev (int fd, const struct iovec *iov, int n, uint64_t offset,
                   const char *what);
int q2_io_sync (int fd, const char *what);
/* Unit tests only (io.c built with Q2_FAULT_INJECTION): make the
 * write_n-th write, the sync_n-th sync or the read_n-th read from now
 * fail with EIO (0 = never), and count them. */
void q2_fault_arm (uint64_t write_n, uint64_t sync_n, uint64_t read_n);
void q2_fault_counts (uint64_t *writes, uint64_t *syncs, uint64_t *reads);

/* ---- lock.c ---- */
/* Takes QEMU-compatible locks for a reader or a writer and fails with
 * -EBUSY if another process holds conflicting ones.  Messages start
 * with path, unless it is "". */
int q2_lock_image (int fd, const char *path, bool write);
void q2_unlock_image (int fd);

/* ---- on-disk constants ---- */
#define QCOW2_MAGIC 0x514649fbU
#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_MAX_L1_BYTES (32u << 20)
#define QCOW2_MAX_REFTABLE_BYTES (8u << 20)
#define QCOW2_MAX_BACKING_NAME 1023
#define QCOW2_MAX_SNAPSHOTS 65536
#define QCOW2_MAX_HOST_OFFSET ((1ULL << 56) - 1)
#define QCOW2_INCOMPAT_DIRTY (1ULL << 0)
#define QCOW2_INCOMPAT_CORRUPT (1ULL << 1)
#define QCOW2_INCOMPAT_DATA_FILE (1ULL << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ULL << 3)
#define QCOW2_INCOMPAT_EXTL2 (1ULL << 4)
#define QCOW2_INCOMPAT_KNOWN 0x1fULL
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ULL << 0)
#define QCOW2_AUTOCLEAR_BITMAPS (1ULL << 0)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW (1ULL << 1)

#define QCOW2_EXT_END 0x00000000U
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acaU
#define QCOW2_EXT_FEATURE_TABLE 0x6803f857U
#define QCOW2_EXT_BITMAPS 0x23852875U
#define QCOW2_EXT_CRYPTO 0x0537be77U
#define QCOW2_EXT_DATA_FILE 0x44415441U

#define L1E_OFFSET_MASK 0x00fffffffffffe00ULL
#define L1E_RESERVED_MASK 0x7f000000000001ffULL
#define L2E_OFFSET_MASK 0x00fffffffffffe00ULL
#define QCOW_OFLAG_COPIED (1ULL << 63)
#define QCOW_OFLAG_COMPRESSED (1ULL << 62)
#define QCOW_OFLAG_ZERO 1ULL
#define REFT_OFFSET_MASK 0xfffffffffffffe00ULL

/* ---- header.c ---- */
struct q2_feature_name {
  uint8_t type, bit;
  char name[47];
};

struct q2_unknown_ext {
  uint32_t type, len;
  uint8_t *data;
};

struct q2_header {
  uint32_t version;
  uint64_t backing_file_offset;
  uint32_t backing_file_size;
  uint32_t cluster_bits;
  uint64_t size;
  uint32_t crypt_method;
  uint32_t l1_size;
  uint64_t l1_table_offset;
  uint64_t refcount_table_offset;
  uint32_t refcount_table_clusters;
  uint32_t nb_snapshots;
  uint64_t snapshots_offset;
  uint64_t incompatible_features;
  uint64_t compatible_features;
  uint64_t autoclear_features;
  uint32_t refcount_order;
  uint32_t header_length;
  uint8_t compression_type;

  /* Bytes of unknown additional header fields (offset 112 on), kept. */
  uint8_t *unknown_fields;
  uint32_t unknown_fields_len;

  /* Extensions. */
  char *backing_file;           /* NULL if none */
  char *backing_format;         /* NULL if no extension */
  char *data_file;              /* NULL if no extension */
  struct q2_feature_name *features;
  uint32_t nb_features;
  bool has_crypto_ext;
  uint64_t crypto_offset, crypto_length;
  bool has_bitmaps_ext;
  uint32_t nb_bitmaps;
  uint64_t bitmap_dir_size, bitmap_dir_offset;
  struct q2_unknown_ext *unknown_exts;
  uint32_t nb_unknown_exts;
};

/* Parses and validates the header in buf (the first cluster, or less if
 * the file is shorter; len is the number of valid bytes) against
 * file_size.  On error the header is cleared.  With
 * Q2_HDR_REFTABLE_UNUSABLE, a missing refcount table or one past the end
 * of the file is accepted (check reads it as empty and rebuilds it, as
 * QEMU can). */
#define Q2_HDR_REFTABLE_UNUSABLE 1u
int q2_header_parse (const uint8_t *buf, size_t len, uint64_t file_size,
                     unsigned flags, struct q2_header *h);
/* Is there no refcount table, or does it end past file_size? */
bool q2_reftable_unusable (const struct q2_header *h, uint64_t cluster_size,
                           uint64_t file_size);
void q2_header_free (struct q2_header *h);
/* Name of an incompatible feature bit from the feature-name table. */
const char *q2_header_feature_name (const struct q2_header *h,
                                    uint8_t type, uint8_t bit);

/* ---- cache.c: bounded LRU cache of fixed-size metadata slices ---- */
struct q2_cache;
/* Writes a dirty slice back (called on eviction and flush). */
typedef int (*q2_cache_writeback_fn) (void *opaque, uint64_t offset,
                                      const uint8_t *data, uint32_t len);
struct q2_cache *q2_cache_new (uint32_t slice_size, uint32_t nb_slots,
                               q2_cache_writeback_fn writeback, void *opaque);
void q2_cache_free (struct q2_cache *c);
void q2_cache_set_writeback (struct q2_cache *c, q2_cache_writeback_fn fn,
                             void *opaque);
/* Returns the slice at host offset 'offset' (slice-aligned), reading it
 * from fd on a miss.  The pointer stays valid until the next call on the
 * cache; the caller holds the lock that guards the cache. */
int q2_cache_get (struct q2_cache *c, int fd, uint64_t offset,
                  const char *what, uint8_t **data);
/* Like q2_cache_get for a newly allocated slice: zeroed and dirty. */
int q2_cache_get_empty (struct q2_cache *c, uint64_t offset, uint8_t **data);
void q2_cache_mark_dirty (struct q2_cache *c, uint64_t offset);
bool q2_cache_has_dirty (const struct q2_cache *c);
int q2_cache_flush (struct q2_cache *c);
/* Drops (without writing) every slice in [offset, offset+length). */
void q2_cache_discard (struct q2_cache *c, uint64_t offset, uint64_t length);
uint32_t q2_cache_slice_size (const struct q2_cache *c);

/* ---- snapshot.c ---- */
struct q2_snapshot {
  uint64_t l1_offset;
  uint32_t l1_size;
  char *id, *name;
  uint32_t date_sec, date_nsec;
  uint64_t vm_clock_nsec;
  uint64_t vm_state_size;
  uint64_t disk_size;
  uint64_t icount;
  uint32_t extra_size;
  uint8_t *extra;               /* all extra data, known and unknown */
  /* The L1 table was invalid at open: never followed, even if the file
   * later grows over its offset. */
  bool broken;
};

/* Is the snapshot's L1 table inside the file and of a sane size?  An
 * invalid one is kept in the list but never followed. */
int q2_snapshot_l1_valid (const struct q2_image *img,
                          const struct q2_snapshot *s);
/* -EROFS while some snapshot's L1 table is invalid: writes could land
 * where it points.  Only check -r all may change such an image. */
int q2_check_snapshots_usable (const struct q2_image *img);
/* Validates and reads the snapshot's L1 table (host order). */
int q2_snapshot_read_l1 (struct q2_image *img, const struct q2_snapshot *s,
                         uint64_t **l1);
/* check -r all: removes snapshots whose L1 table is invalid from the
 * table (refcounts must be sound). */
int q2_snapshot_drop_invalid (struct q2_image *img, uint32_t *dropped);

/* ---- the image ---- */
enum q2_format { Q2_FMT_RAW, Q2_FMT_QCOW2 };

struct q2_image {
  enum q2_format fmt;
  char *path;
  char *dir;                    /* directory of path, for relative names */
  int fd;
  bool readonly;
  uint64_t file_size;
  uint64_t virtual_size;

  /* qcow2 only from here. */
  struct q2_header hdr;
  uint32_t cluster_bits;
  uint64_t cluster_size;
  bool extended_l2;
  uint32_t l2_entry_size;       /* 8 or 16 */
  uint32_t l2_bits;             /* log2 (entries per L2 table) */
  uint32_t subcluster_bits;     /* log2 (subcluster size) */
  uint32_t csize_shift;
  uint64_t csize_mask, coffset_mask;
  uint32_t refcount_bits;

  uint64_t *l1;                 /* host endian */
  uint32_t l1_size;
  uint64_t *reftable;           /* host endian */
  uint64_t reftable_entries;

  struct q2_snapshot *snapshots;
  uint32_t nb_snapshots;
  uint64_t snapshot_table_len;  /* bytes */
  /* The snapshots' L1 tables as sorted, merged host ranges, for the
   * overlap check of every write; without memory for it (!snap_l1_ok),
   * the check scans the list. */
  struct q2_range *snap_l1;
  size_t nb_snap_l1;
  bool snap_l1_ok;

  /* Guards the caches below and the lazily computed fields. */
  pthread_mutex_t lock;
  struct q2_cache *l2_cache;
  struct q2_cache *rb_cache;
  int prealloc_state;           /* -1 unknown, 0 no, 1 metadata prealloc */

  int data_fd;                  /* external data file, or == fd */
  char *data_path;
  uint64_t data_file_size;

  struct q2_image *backing;     /* NULL if none */
  int depth;                    /* 0 = top of chain */
  bool locking;                 /* take QEMU-compatible locks */

  /* Write state.  Public entry points hold io_lock: shared for reads and
   * in-place writes, exclusive for anything that changes metadata, so
   * metadata writers never race with each other or with readers. */
  pthread_rwlock_t io_lock;
  /* Set: refuse every further write (atomic where io_lock is shared). */
  bool corrupt;
  /* errno of a failed fdatasync: every later sync fails (atomic). */
  int sync_error;
  /* Opened for check with no refcount table or one past the end of the file:
   * every refcount reads 0 until q2_rebuild_refcounts. */
  bool refcounts_lost;
  bool header_touched;          /* autoclear bits cleared already */
  /* L1 entries [l1_dirty_lo, l1_dirty_hi) changed since the last flush
   * (q2_l1_mark_dirty). */
  uint64_t l1_dirty_lo, l1_dirty_hi;
  bool reftable_dirty;
  /* What was written since the last ordered sync (Q2_UNSYNCED_*): each
   * must be on disk before whatever points at it is written. */
  unsigned unsynced;
  uint64_t reftable_used;       /* 1 + highest non-zero reftable index */
  uint64_t free_hint;           /* no free cluster below this index */
  /* Refcount decrements wait until the L2/L1 changes that dropped the
   * references are on disk (at flush), so a crash can only leak. */
  struct q2_range *pending_free;
  size_t nb_pending_free, cap_pending_free;
  uint64_t pending_free_bytes;  /* about: bounds disk use between flushes */
  uint8_t *zero_buf;            /* one cluster of zeros, never written */
  /* Hash set of the clusters of active L2 tables and refcount blocks,
   * for overlap checks (meta.c); updated as tables move, rebuilt when
   * meta_stale. */
  uint64_t *meta_index;
  size_t meta_count, meta_used;
  bool meta_stale;
  /* Guest clusters whose new host cluster is being written outside the
   * exclusive lock; changed under io_lock exclusive and inflight_lock. */
  pthread_mutex_t inflight_lock;
  pthread_cond_t inflight_cond;
  uint64_t *inflight;
  size_t nb_inflight, cap_inflight;
  /* Held around writing a newly allocated cluster.  Buffered writes to
   * one file serialize on its inode lock in the kernel anyway; waiting
   * here sleeps instead of spinning on that lock while another thread
   * copies a whole cluster under it. */
  pthread_mutex_t fill_lock;

  /* Encryption (crypt_method 1 or 2); NULL when not encrypted. */
  struct q2_crypto *crypto;
  bool crypt_guest_sectors;     /* AES: IVs from guest, not host, offsets */
};

struct q2_range {
  uint64_t offset, length;
};

/* ---- open.c ---- */
int q2_open_layer (const char *path, const char *format,
                   const struct q2_open_opts *opts, int depth,
                   const char *const *chain, struct q2_image **out);
void q2_free_layer (struct q2_image *img);
/* Joins a file name found in an image with the image's directory (an
 * absolute name stays as it is); malloc'd, NULL when out of memory. */
char *q2_resolve_name (const char *dir, const char *name);
/* Are the two descriptors the same file? */
bool q2_same_file (int a, int b);
/* Derives cluster, L2 and compressed-descriptor geometry from hdr. */
void q2_set_geometry (struct q2_image *img);
/* Reads a table of entries big-endian u64s into host order (malloc'd). */
int q2_read_table (struct q2_image *img, uint64_t offset, uint64_t entries,
                   const char *what, uint64_t **out);
/* Reopens the files read-write and arms the write path, without the
 * policy checks of q2_make_writable (for repairs). */
int q2_switch_to_rw (struct q2_image *img);

int q2_snapshots_load (struct q2_image *img);
void q2_snapshots_free (struct q2_image *img);
/* Recomputes snap_l1 from the list; after every change of the list. */
void q2_snapshot_ranges_rebuild (struct q2_image *img);
/* The whole clusters a snapshot's L1 table occupies. */
struct q2_range q2_snapshot_l1_range (const struct q2_image *img,
                                      const struct q2_snapshot *s);

/* ---- check.c: reference walk and refcount rebuild ---- */
/* Walks that count per cluster of the file stop at this many clusters,
 * to bound their memory. */
#define MAX_COUNTED_CLUSTERS (256u << 20)
/* The number of clusters of the file, or -EFBIG past that bound. */
int q2_counted_clusters (const struct q2_image *img, uint64_t *nb);
/* Counts every reference to every host cluster: header, L1/L2 tables of
 * the active image and all snapshots, data clusters, the snapshot table,
 * encryption header and bitmaps; not the refcount structures.  *refs
 * has *nb entries (clusters of the file) and is malloc'd.  Returns -EIO
 * naming the first broken reference. */
int q2_count_references (struct q2_image *img, uint32_t **refs,
                         uint64_t *nb);
typedef int (*q2_refcount_fn) (void *opaque, uint64_t cluster,
                               uint64_t *refcount);
typedef int (*q2_range_fn) (void *opaque, uint64_t offset, uint64_t length,
                            const char *what);
/* Calls fn for the directory, tables and data of valid persistent
 * bitmaps. */
int q2_bitmap_clusters (struct q2_image *img, q2_range_fn fn, void *opaque);
/* A q2_refcount_fn reading the image's own refcounts (opaque: img). */
int q2_refcount_of (void *img, uint64_t cluster, uint64_t *refcount);
/* Sets COPIED in the active L1 and every L2 entry it reaches exactly
 * where the refcount (as the callback reports it) is 1. */
int q2_fix_copied_flags (struct q2_image *img, q2_refcount_fn refcount,
                         void *opaque);
/* Writes new refcount structures matching the references and fixes the
 * COPIED flags (repair of a dirty image; check -r all). */
int q2_rebuild_refcounts (struct q2_image *img);

/* ---- map.c: guest to host mapping ---- */
enum q2_type {
  Q2_UNALLOC,            /* read from the backing file, or zeros */
  Q2_ZERO,               /* reads as zeros; host_offset set if allocated */
  Q2_NORMAL,             /* data at host_offset */
  Q2_COMPRESSED,         /* compressed cluster at host_offset, csize bytes */
};

struct q2_map {
  enum q2_type type;
  bool copied;           /* NORMAL: refcount 1, writable in place */
  uint64_t host_offset;  /* of the guest offset itself (NORMAL, ZERO) */
  uint64_t csize;        /* COMPRESSED only */
  uint64_t length;       /* bytes from the guest offset with this mapping */
};

/* Maps guest offset (< virtual size) for at most max_len bytes.  Takes
 * img->lock itself. */
int q2_map (struct q2_image *img, uint64_t offset, uint64_t max_len,
            struct q2_map *m);

/* Validates L1 entry l1_index and returns its L2 table offset (0 when
 * unallocated). */
int q2_l1_entry_l2 (const struct q2_image *img, uint64_t l1_index,
                    uint64_t *l2_offset);
/* The same for entry l1e of any L1 table (a snapshot's). */
int q2_check_l1_entry (const struct q2_image *img, uint64_t l1_index,
                       uint64_t l1e, uint64_t *l2_offset);
/* Does the range overlap the header cluster, L1 or refcount table? */
bool q2_overlaps_fixed_metadata (const struct q2_image *img, uint64_t off,
                                 uint64_t len);

/* L2 entry decoding, exposed for unit tests. */
struct q2_l2_decoded {
  enum q2_type type;
  bool copied;           /* the COPIED flag of a standard entry */
  uint64_t host_offset;  /* cluster-aligned, or compressed byte offset */
  uint64_t csize;
};
/* Decodes subcluster sc (0 when !extended_l2) of the entry of guest
 * cluster gc.  Returns -EIO with a message for an invalid entry. */
int q2_decode_l2 (const struct q2_image *img, uint64_t entry,
                  uint64_t bitmap, unsigned sc, uint64_t gc,
                  struct q2_l2_decoded *d);
/* An L2 entry with an unaligned host offset that holds no data (the
 * zero flag, or with extended L2 no allocated subcluster): QEMU's
 * repair drops the offset, so it references nothing. */
bool q2_unaligned_without_data (const struct q2_image *img, uint64_t entry,
                                uint64_t bitmap);

/* ---- refcount.c ---- */
int q2_refcount_get (struct q2_image *img, uint64_t cluster_index,
                     uint64_t *refcount);
/* The same for writers: a bad refcount table entry marks the image
 * corrupt. */
int q2_refcount_get_writing (struct q2_image *img, uint64_t cluster_index,
                             uint64_t *refcount);
/* The first cluster from c on, below limit, whose refcount is 0 (limit
 * when there is none); fast over long runs of clusters in use.  For
 * writers, like q2_refcount_get_writing. */
int q2_refcount_next_free (struct q2_image *img, uint64_t c, uint64_t limit,
                           uint64_t *found);
/* The same from c on, for allocation.  Past the end of the file, a crash
 * between a refcount update and the cluster's first write leaves leaked
 * refcounts, and a crafted block can claim many clusters (iotest 220:
 * 512 TiB in 32 MiB of 1-bit refcounts); past this many bits of them
 * the table is damaged: the image is marked corrupt, rather than
 * scanning for minutes. */
#define MAX_LEAKED_PAST_EOF_BITS (1ULL << 29)
int q2_refcount_skip_used (struct q2_image *img, uint64_t c,
                           uint64_t *found);
/* The largest refcount refcount_bits can hold. */
uint64_t q2_max_refcount (const struct q2_image *img);
/* Unpacks entry i of a refcount block. */
uint64_t q2_refblock_entry (const uint8_t *block, uint32_t refcount_order,
                            uint64_t i);

/* ---- compress.c ---- */
/* Decompresses src (format per compression_type) into exactly out_len
 * bytes of out. */
int q2_decompress (uint8_t compression_type, const uint8_t *src,
                   size_t src_len, uint8_t *out, size_t out_len);

/* ---- scratch.c: per-thread buffers, freed at thread exit ---- */
/* Each slot has one user, so nested calls never share a buffer: the
 * read path's slots are used while the write path's are live. */
enum {
  Q2_SCRATCH_COMPRESSED,        /* read: compressed input */
  Q2_SCRATCH_CLUSTER,           /* read: decompressed cluster */
  Q2_SCRATCH_CRYPT,             /* read: sector-aligned bounce buffer */
  Q2_SCRATCH_WRITE,             /* write: assembled host data */
  Q2_SCRATCH_COW_TAIL,          /* write: copy-on-write tail */
  Q2_SCRATCH_L2COPY,            /* write: copy of a shared L2 table */
  Q2_SCRATCH_SLOTS
};
/* A buffer of at least len bytes for this thread; NULL if out of memory.
 * Each slot is independent and valid until the next call for it or to
 * q2_scratch_trim. */
uint8_t *q2_scratch (unsigned slot, size_t len);
/* Releases this thread's large buffers: called when a request is done. */
void q2_scratch_trim (void);
void *q2_scratch_zstd_dctx (void);
/* This thread's raw-deflate z_stream, reset; NULL if out of memory. */
void *q2_scratch_inflate (void);
/* This thread's non-blocking pipe, empty, holding at least bytes
 * (fds[0] reads, fds[1] writes); -1 if none can be had. */
int q2_scratch_pipe (size_t bytes, int fds[2]);
/* Closes this thread's pipe (its content is unknown after an error). */
void q2_scratch_pipe_discard (void);

/* ---- cowsplice.c ---- */
/* Writes [ra, rb) of new host cluster host for guest cluster gc: the
 * layer below's data around the guest data [a, b), spliced without a
 * bounce buffer.  1: written; 0: not possible here, nothing written;
 * or -errno. */
int q2_cow_splice (struct q2_image *img, const uint8_t *data, uint64_t gc,
                   uint64_t ra, uint64_t a, uint64_t b, uint64_t rb,
                   uint64_t host);

/* ---- read.c ---- */
int q2_layer_pread (struct q2_image *img, uint8_t *buf, uint64_t count,
                    uint64_t offset);
/* What an unallocated range of img reads: its backing file's data, or
 * zeros.  Uses none of img's own metadata, so needs no io_lock. */
int q2_read_below (struct q2_image *img, uint8_t *buf, uint64_t count,
                   uint64_t offset);
/* Data or hole at off in a host file (SEEK_DATA/SEEK_HOLE): *run bytes
 * (<= len) of the same kind.  Past file_size is a hole. */
void q2_host_status (int fd, uint64_t file_size, uint64_t off, uint64_t len,
                     bool *is_data, uint64_t *run);
/* 1 when the image looks preallocated (more clusters with a refcount
 * than the file has blocks): then, as in QEMU, data clusters that are
 * holes in the file read as zeros in block status; 0 if not; -errno. */
int q2_prealloc_state (struct q2_image *img);

/* ---- alloc.c: refcounts and cluster allocation (io_lock exclusive) ---- */
/* Adds delta to a refcount; *refcount (may be NULL) gets the new value. */
int q2_refcount_update (struct q2_image *img, uint64_t cluster_index,
                        int64_t delta, uint64_t *refcount);
/* Allocates n contiguous clusters; returns the host offset, and whether
 * they lie past the old end of the file (so already read as zeros). */
int q2_alloc_clusters (struct q2_image *img, uint64_t n, uint64_t *offset,
                       bool *fresh);
/* Queues a refcount decrement of every cluster touched by the range. */
int q2_free_later (struct q2_image *img, uint64_t offset, uint64_t length);
/* Applies queued decrements; the references are already gone on disk. */
int q2_apply_pending_frees (struct q2_image *img);
/* Appends to a growing array of ranges. */
int q2_push_range (struct q2_range **v, size_t *n, size_t *cap,
                   uint64_t offset, uint64_t length);
/* qsort comparison of struct q2_range by offset. */
int q2_compare_ranges (const void *x, const void *y);
/* Writes dirty refcount blocks and the refcount table, durably. */
int q2_flush_refcounts (struct q2_image *img);
int q2_l2_writeback (void *opaque, uint64_t offset, const uint8_t *data,
                     uint32_t len);
int q2_rb_writeback (void *opaque, uint64_t offset, const uint8_t *data,
                     uint32_t len);

/* ---- write.c ---- */
/* The L2 table for guest_offset, allocated or copied from a shared one
 * so that it can be modified. */
int q2_l2_table_for_write (struct q2_image *img, uint64_t guest_offset,
                           uint64_t *l2_offset);
int q2_l2_entry_ref (struct q2_image *img, uint64_t l2_offset,
                     uint64_t guest_offset, uint8_t **entry,
                     uint64_t *slice_off);
/* Reads the entry (and bitmap) for guest_offset; *l2_offset is 0 when
 * the L1 entry is empty (and !for_write). */
int q2_get_l2_entry (struct q2_image *img, uint64_t guest_offset,
                     bool for_write, uint64_t *entry, uint64_t *bitmap,
                     uint64_t *l2_offset);
int q2_set_l2_entry (struct q2_image *img, uint64_t l2_offset,
                     uint64_t guest_offset, uint64_t entry, uint64_t bitmap);
int q2_release_entry (struct q2_image *img, uint64_t entry);
/* An allocated L2 entry for guest cluster gc, met while writing, whose
 * host offset lies past the end of the file: marks the image corrupt
 * and returns -EIO; 0 when the offset is fine. */
int q2_check_entry_in_file (struct q2_image *img, uint64_t gc, uint64_t host);
#define Q2_HOST_PUNCH_OK 1u     /* a hole is fine (the raw data file) */
#define Q2_HOST_FAST      2u     /* fail with ENOTSUP rather than write */
int q2_zero_host (struct q2_image *img, int fd, uint64_t offset,
                  uint64_t len, unsigned flags);
int q2_write_locked (struct q2_image *img, const uint8_t *buf,
                     uint64_t count, uint64_t offset);
/* Called with io_lock exclusive: returns (still holding it) once no
 * cluster is being written outside the lock. */
void q2_wait_no_inflight_locked (struct q2_image *img);
/* A cluster of zeros, allocated on first use and never written to.
 * Callers hold io_lock exclusively, which makes the lazy allocation safe. */
const uint8_t *q2_zero_buffer (struct q2_image *img);

/* ---- meta.c: header updates, corruption, overlap checks, flush ---- */
int q2_sync (struct q2_image *img);
/* Written but not yet synced, for q2_image.unsynced: */
#define Q2_UNSYNCED_DATA 1      /* data that an L2 entry now exposes */
#define Q2_UNSYNCED_REFS 2      /* refcount blocks */
#define Q2_UNSYNCED_L2 4        /* L2 tables */
/* q2_sync that also clears q2_image.unsynced.  Only where nobody else
 * can set a flag meanwhile (io_lock exclusive, or shared together with
 * img->lock, which the cache writebacks of readers hold): a concurrent
 * writer's flag could otherwise be cleared before its write is synced. */
int q2_sync_ordered (struct q2_image *img);
/* Marks the image corrupt on disk and refuses further writes; returns
 * -EIO with the message. */
int q2_mark_corrupt (struct q2_image *img, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
/* Refuses a write to [off, off+len) that would hit metadata of the
 * given kinds, marking the image corrupt. */
#define Q2_OVERLAP_FIXED 1      /* header, L1 table, refcount table */
#define Q2_OVERLAP_L2 2         /* active L2 tables */
#define Q2_OVERLAP_REFBLOCKS 4
#define Q2_OVERLAP_SNAPSHOTS 8  /* snapshot table, snapshot L1 tables */
#define Q2_OVERLAP_ALL 15
int q2_check_overlap (struct q2_image *img, uint64_t off, uint64_t len,
                      const char *what, unsigned kinds);
/* The same test without consequences: *hit names the metadata that
 * [off, off+len) overlaps, or is NULL. */
int q2_find_overlap (struct q2_image *img, uint64_t off, uint64_t len,
                     unsigned kinds, const char **hit);
/* Writers (io_lock exclusive): rebuild the overlap index if stale. */
int q2_meta_index_refresh (struct q2_image *img);
/* An L2 table or refcount block moved from old_off to new_off (either
 * may be 0). */
void q2_meta_index_update (struct q2_image *img, uint64_t old_off,
                           uint64_t new_off, bool refblock);
int q2_write_reftable (struct q2_image *img, const uint64_t *table,
                       uint64_t entries, uint64_t offset);
/* Writes nb_blocks new refcount blocks after a new table at cluster
 * start, the table, syncs, points the header at it, and takes over
 * table (malloc'd) as the in-memory refcount table. */
int q2_install_reftable (struct q2_image *img, uint64_t *table,
                         uint64_t entries, uint64_t start,
                         uint64_t table_clusters, const uint8_t *blocks,
                         uint64_t nb_blocks);
/* Before the first change: clears autoclear bits on disk. */
int q2_prepare_write (struct q2_image *img);
/* The same before a change that leaves the guest's data alone:
 * persistent bitmaps are kept. */
int q2_prepare_meta_write (struct q2_image *img);
int q2_flush_locked (struct q2_image *img);
/* L1 entries [lo, hi) changed: the next flush writes their sectors. */
void q2_l1_mark_dirty (struct q2_image *img, uint64_t lo, uint64_t hi);
int q2_write_header_field (struct q2_image *img, uint64_t offset,
                           const void *data, size_t len);
/* Sets or clears the dirty bit on disk, synced (v3 only). */
int q2_set_dirty (struct q2_image *img, bool dirty);
/* Writes the incompatible feature bits (offset 72, v3 only). */
int q2_write_incompatible (struct q2_image *img, uint64_t features);

#endif /* QCOW2CORE_INTERNAL_H */
