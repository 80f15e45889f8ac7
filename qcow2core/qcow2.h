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
  /* Take QEMU-compatible image locks (refuse images QEMU is writing). */
  bool locking;
  /* Backing file policy: ignore the header's name and use this file
   * (probed: qcow2 or raw), or use no backing file at all. */
  const char *backing_override;
  bool no_backing;
  /* Password of encrypted images (legacy AES or LUKS), or NULL. */
  const char *password;
  /* Read-only: open an encrypted image without its password, for its
   * metadata only; reading its data then fails with -EPERM. */
  bool no_key;
  /* For check and repair: a refcount table past the end of the file is
   * read as empty (every refcount 0), so that the check reports it and
   * -r all rebuilds the refcounts.  Writes need that rebuild first. */
  bool for_check;
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

/* ---- persistent dirty bitmaps (listed only; bitmaps.c) ---- */
struct q2_bitmap_info {
  char name[1024];
  uint64_t granularity;         /* bytes */
  bool in_use, auto_enabled;    /* flags bit 0 and bit 1 */
};
/* The bitmaps of the directory, in its order; none when the autoclear
 * bit says they are stale.  *out is malloc'd. */
int q2_bitmap_list (struct q2_image *img, struct q2_bitmap_info **out,
                    uint32_t *n);

/* ---- internal snapshots ---- */
struct q2_snapshot_info {
  const char *id;               /* valid until the table changes */
  const char *name;
  uint32_t date_sec, date_nsec;
  uint64_t vm_clock_nsec;
  uint64_t vm_state_size;
  uint64_t disk_size;           /* virtual size when taken */
  uint64_t icount;              /* UINT64_MAX: not recorded */
};
int q2_snapshot_count (const struct q2_image *img);
int q2_snapshot_get (const struct q2_image *img, int index,
                     struct q2_snapshot_info *info);
/* Index of the snapshot whose ID, or else name, is name_or_id (as
 * QEMU looks them up), or -ENOENT. */
int q2_snapshot_find (const struct q2_image *img, const char *name_or_id);
/* These need a writable image; each is crash-safe (leaks at worst). */
int q2_snapshot_create (struct q2_image *img, const char *name);
int q2_snapshot_delete (struct q2_image *img, const char *name_or_id);
int q2_snapshot_apply (struct q2_image *img, const char *name_or_id);
/* Turns a read-only image into a view of the snapshot (for exports). */
int q2_snapshot_load_tmp (struct q2_image *img, const char *name_or_id);

/* "luks aes-256 xts-plain64 sha256" or similar; NULL if not encrypted. */
const char *q2_encryption (const struct q2_image *img);

/* Compiled-in features, for --dump-plugin. */
bool q2_have_zstd (void);

/* ---- image tool support: create, check, map (create.c, checkimg.c,
 * mapinfo.c) ---- */
enum q2_prealloc {
  Q2_PREALLOC_OFF,
  Q2_PREALLOC_METADATA,         /* L2 tables and data clusters allocated */
  Q2_PREALLOC_FALLOC,           /* ... and posix_fallocate'd */
  Q2_PREALLOC_FULL,             /* ... and written with zeros */
};

struct q2_create_opts {
  int version;                  /* 2 (compat=0.10) or 3 (compat=1.1) */
  uint32_t cluster_size;        /* power of two, 512 .. 2 MiB */
  uint32_t refcount_bits;       /* power of two, 1 .. 64 */
  bool extended_l2;
  uint8_t compression_type;     /* 0 zlib, 1 zstd */
  bool lazy_refcounts;
  enum q2_prealloc preallocation;
  const char *backing_file;     /* stored as given; NULL for none */
  const char *backing_format;   /* NULL: no backing format extension */
  bool unsafe;                  /* do not check that the backing opens */
  /* An external data file (v3 only), named in the header as given and
   * created (truncated if it exists) relative to the image's directory,
   * where the plugin looks for it.  With data_file_raw the guest data
   * is at the same offsets there, so metadata is preallocated. */
  const char *data_file;
  bool data_file_raw;
  bool nocow;                   /* FS_NOCOW_FL on the new files (btrfs) */
  /* Encryption (Q2_ENCRYPT_*).  LUKS puts its area in the clusters after
   * the L1 table, as QEMU does.  NULL strings take QEMU's defaults. */
  int encrypt_format;
  const char *password;         /* required with encryption */
  const char *cipher_alg;       /* LUKS: aes-128, aes-192, aes-256 */
  const char *cipher_mode;      /* LUKS: xts, cbc */
  const char *ivgen_alg;        /* LUKS: plain64, plain, essiv */
  const char *ivgen_hash_alg;   /* LUKS with essiv: sha256 */
  const char *hash_alg;         /* LUKS: sha1, sha256, sha384, sha512 */
  uint32_t iter_time_ms;        /* LUKS PBKDF2 time; 0: 2000 ms */
  uint32_t iterations;          /* LUKS PBKDF2 iterations (overrides
                                 * iter_time_ms when not 0) */
};
#define Q2_ENCRYPT_NONE 0
#define Q2_ENCRYPT_AES 1        /* legacy, crypt_method 1 */
#define Q2_ENCRYPT_LUKS 2       /* crypt_method 2 */
/* Fills in QEMU's defaults: compat 1.1, 64 KiB clusters, 16-bit
 * refcounts, zlib, no preallocation. */
void q2_create_opts_init (struct q2_create_opts *o);
/* Creates (or truncates) a qcow2 image of size bytes (rounded up to
 * 512) at path; size UINT64_MAX takes the backing file's size.  Invalid
 * combinations are refused as qemu-img does. */
int q2_create (const char *path, uint64_t size,
               const struct q2_create_opts *o);

/* Encryption parameters for display (create.c): never key material. */
struct q2_encrypt_info {
  int format;                   /* Q2_ENCRYPT_* */
  /* LUKS only, from the LUKS header, in QEMU's names: */
  uint64_t area_offset, area_length;    /* the FDE header extension */
  char cipher_alg[48];          /* "aes-256" */
  char cipher_mode[33];         /* "xts" */
  char ivgen_alg[33];           /* "plain64", "essiv" */
  char ivgen_hash_alg[33];      /* "" when there is none */
  char hash_alg[33];            /* "sha256" */
  char uuid[41];
  uint64_t payload_offset;      /* bytes */
  uint32_t master_key_iters;
  struct {
    bool active;
    uint32_t iters, stripes;
    uint64_t key_offset;        /* bytes from the start of the area */
  } slots[8];
};
/* Reads the encryption parameters from the header and the LUKS header
 * (no password needed). */
int q2_encrypt_info_get (const struct q2_image *img,
                         struct q2_encrypt_info *info);

#define Q2_REPAIR_NONE 0
#define Q2_REPAIR_LEAKS 1
#define Q2_REPAIR_ALL 2

/* One line of the check report ("Leaked cluster ...", "ERROR ..."). */
typedef void (*q2_check_report_fn) (void *opaque, const char *msg);

struct q2_check_result {
  /* Input: where each finding is reported (may be NULL). */
  q2_check_report_fn report;
  void *opaque;
  /* Output: what remains after any repair. */
  uint64_t leaks, corruptions;
  uint64_t check_errors;        /* the check could not complete */
  uint64_t leaks_fixed, corruptions_fixed;
  uint64_t image_end_offset;    /* end of the last referenced cluster */
  uint64_t total_clusters;      /* guest clusters of the virtual size */
  uint64_t allocated_clusters;  /* guest clusters allocated in this layer */
  uint64_t fragmented_clusters, compressed_clusters;
  bool rebuilt;                 /* the refcount structures were rebuilt */
};
/* Compares the refcounts with the references and checks the COPIED
 * flags of the active tables; with a repair mode other than NONE, first
 * fixes what it may (the image may be open read-only: it is reopened
 * read-write for the repair, even if it is marked corrupt or dirty).
 * Returns 0 when the check completed, whatever it found. */
int q2_check (struct q2_image *img, int repair_mode,
              struct q2_check_result *res);

/* Where a guest range comes from, as 'qemu-img map' reports it. */
struct q2_map_info {
  uint64_t length;              /* bytes from offset with this mapping */
  int depth;                    /* layer of the chain (0 = top) */
  bool present;                 /* allocated in some layer */
  bool zero;                    /* reads as zeros */
  bool data;
  bool compressed;
  bool has_offset;
  uint64_t offset;              /* host offset in filename */
  const char *filename;         /* the layer's file (valid while open) */
};
/* Maps guest offset (< virtual size) for at most len bytes. */
int q2_map_range (struct q2_image *img, uint64_t offset, uint64_t len,
                  struct q2_map_info *out);

/* Read-only access to the header for 'info'. */
struct q2_image_info {
  uint32_t version;
  uint32_t cluster_size;
  uint32_t refcount_bits;
  uint64_t virtual_size;
  uint64_t file_size;
  bool lazy_refcounts, extended_l2, corrupt, dirty;
  bool bitmaps;                 /* autoclear bitmaps bit */
  uint8_t compression_type;
  const char *backing_file;     /* as stored, or NULL */
  const char *backing_format;   /* or NULL */
  const char *data_file;        /* as stored, or NULL */
  bool data_file_raw;           /* autoclear bit 1 */
  const char *path;             /* the resolved path of this layer */
  const char *data_path;        /* the resolved data file path, or NULL */
  const char *format;           /* "qcow2" or "raw" */
  uint64_t data_file_size;
  struct q2_image *backing;     /* next layer, or NULL */
};
void q2_image_get_info (const struct q2_image *img,
                        struct q2_image_info *info);

#endif /* QCOW2CORE_QCOW2_H */
