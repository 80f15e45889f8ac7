/* nbdkit-qcow2-plugin: nbdkit glue over qcow2core.  No qcow2 logic
 * lives here: each callback translates to one core call and turns the
 * core's -errno and message into an nbdkit error. */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "plugin.h"

/* to enable: -D qcow2.extents=1 */
NBDKIT_DLL_PUBLIC int qcow2_debug_extents;

char *filename;
uint64_t l2_cache_size;
struct q2_image *image;
const char *snapshot;                   /* snapshot=, serve it read-only */
static char *backing;                   /* backing=PATH, absolute */
static bool no_backing;                 /* backing=none */
static bool locking = true;             /* locking= */
static char *password;                  /* password=, wiped at unload */
struct q2_open_opts open_opts;

#define PLUGIN_VERSION "0.1"

static void
qcow2_unload (void)
{
  exports_close_all ();
  if (image && q2_close (image) < 0)
    nbdkit_error ("%s", q2_last_error ());
  image = NULL;
  free (filename);
  free (backing);
  if (password) {
    explicit_bzero (password, strlen (password));
    free (password);
  }
}

static int
qcow2_config (const char *key, const char *value)
{
  if (strcmp (key, "file") == 0) {
    free (filename);
    /* Resolve now: a daemonized nbdkit changes directory to /. */
    filename = nbdkit_realpath (value);
    if (filename == NULL)
      return -1;
  }
  else if (strcmp (key, "l2-cache-size") == 0) {
    int64_t r = nbdkit_parse_size (value);
    if (r == -1)
      return -1;
    l2_cache_size = r;
  }
  else if (strcmp (key, "snapshot") == 0)
    snapshot = value;
  else if (strcmp (key, "backing") == 0) {
    free (backing);
    backing = NULL;
    no_backing = strcmp (value, "none") == 0;
    if (!no_backing && (backing = nbdkit_realpath (value)) == NULL)
      return -1;
  }
  else if (strcmp (key, "password") == 0) {
    if (password) {
      explicit_bzero (password, strlen (password));
      free (password);
      password = NULL;
    }
    /* SECRET, "-" (prompt), "+FILE" or "-FD", as nbdkit does it. */
    if (nbdkit_read_password (value, &password) == -1)
      return -1;
  }
  else if (strcmp (key, "locking") == 0) {
    int r = nbdkit_parse_bool (value);
    if (r == -1)
      return -1;
    locking = r;
  }
  else {
    nbdkit_error ("unknown parameter '%s'", key);
    return -1;
  }
  return 0;
}

static int
qcow2_config_complete (void)
{
  if (filename == NULL) {
    nbdkit_error ("you must supply the file=<FILENAME> parameter");
    return -1;
  }
  return 0;
}

#define qcow2_config_help \
  "[file=]<FILENAME>     (required) The qcow2 image to serve.\n" \
  "l2-cache-size=<SIZE>  Bytes of L2 table cache (default: enough for\n" \
  "                      the whole image, at most 32M).\n" \
  "snapshot=<NAME|ID>    Serve this internal snapshot, read-only.\n" \
  "backing=<PATH>|none   Use this backing file instead of the image's,\n" \
  "                      or none at all.\n" \
  "locking=on|off        Take QEMU-compatible image locks (default on).\n" \
  "password=<PASSWORD>   Password of an encrypted image (AES or LUKS):\n" \
  "                      the secret, - to prompt, +FILE or -FD."

static void
qcow2_dump_plugin (void)
{
  printf ("qcow2_version=%s\n", PLUGIN_VERSION);
  printf ("qcow2_zlib=yes\n");
  printf ("qcow2_zstd=%s\n", q2_have_zstd () ? "yes" : "no");
  printf ("qcow2_extended_l2=yes\n");
  printf ("qcow2_backing_files=yes\n");
  printf ("qcow2_external_data_file=yes\n");
  printf ("qcow2_write=yes\n");
  printf ("qcow2_encryption=aes,luks\n");
  printf ("qcow2_snapshots=yes\n");
}

/* Open and check the image before forking, where errors are visible to
 * the user and nbdkit exits non-zero. */
static int
qcow2_get_ready (void)
{
  int r;

  open_opts.readonly = true;
  open_opts.l2_cache_size = l2_cache_size;
  open_opts.locking = locking;
  open_opts.backing_override = backing;
  open_opts.no_backing = no_backing;
  open_opts.password = password;
  r = q2_open (filename, &open_opts, &image);

  if (r < 0) {
    /* The core's messages do not know our parameter names. */
    nbdkit_error ("%s%s", q2_last_error (),
                  r == -EBUSY ? " (locking=off overrides)" :
                  r == -ENOKEY ? " (password=)" : "");
    return -1;
  }
  nbdkit_debug ("qcow2: %s: virtual size %" PRIu64 ", cluster size %u%s%s",
                filename, q2_virtual_size (image), q2_cluster_size (image),
                q2_encryption (image) ? ", encryption " : "",
                q2_encryption (image) ? q2_encryption (image) : "");
  if (snapshot && q2_snapshot_find (image, snapshot) < 0) {
    nbdkit_error ("snapshot=%s: %s", snapshot, q2_last_error ());
    return -1;
  }
  return 0;
}

static int
qcow2_list_exports (int readonly, int is_tls, struct nbdkit_exports *exports)
{
  return exports_list (exports);
}

static const char *
qcow2_default_export (int readonly, int is_tls)
{
  return "";
}

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

/* Per connection: the image or snapshot view it reads, and whether it
 * may write. */
struct handle {
  struct q2_image *img;
  bool readonly;
  int view;                     /* for exports_release */
};

/* The image is opened read-only in get_ready (nbdkit -r is not known
 * there) and made writable by the first connection that wants to write. */
static pthread_mutex_t writable_lock = PTHREAD_MUTEX_INITIALIZER;

static void *
qcow2_open (int readonly)
{
  struct handle *h = calloc (1, sizeof *h);

  if (h == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  h->readonly = readonly;
  {
    const char *name = nbdkit_export_name ();
    h->img = exports_image_for (name ? name : "", &h->readonly, &h->view);
    if (h->img == NULL) {
      free (h);
      return NULL;
    }
  }
  if (!h->readonly) {
    int r;
    pthread_mutex_lock (&writable_lock);
    r = q2_make_writable (image);
    pthread_mutex_unlock (&writable_lock);
    if (r == -EACCES || r == -EPERM || r == -EROFS) {
      /* Like the file plugin: serve a file we may not write (or an
       * image marked corrupt) read-only. */
      nbdkit_debug ("%s; serving read-only", q2_last_error ());
      h->readonly = true;
    }
    else if (r < 0) {
      nbdkit_error ("%s", q2_last_error ());
      free (h);
      return NULL;
    }
  }
  return h;
}

static void
qcow2_close (void *handle)
{
  struct handle *h = handle;

  exports_release (h->view);
  free (h);
}

/* Reports a core failure to nbdkit and the client. */
static int
core_error (int r)
{
  nbdkit_error ("%s", q2_last_error ());
  nbdkit_set_error (-r);
  return -1;
}

static int64_t
qcow2_get_size (void *handle)
{
  struct handle *h = handle;

  return q2_virtual_size (h->img);
}

static int
qcow2_block_size (void *handle, uint32_t *minimum, uint32_t *preferred,
                  uint32_t *maximum)
{
  struct handle *h = handle;
  uint32_t cs = q2_cluster_size (h->img);

  *minimum = 1;
  /* nbdkit wants the preferred size in 512..32M. */
  *preferred = cs < 512 ? 512 : cs;
  /* nbdkit 1.32 refuses data requests over 64 MiB; stay below it, at
   * qemu-nbd's 32 MiB. */
  *maximum = 32 * 1024 * 1024;
  return 0;
}

static int
qcow2_can_write (void *handle)
{
  struct handle *h = handle;

  return !h->readonly;
}

static int
qcow2_can_flush (void *handle)
{
  return 1;
}

static int
qcow2_can_trim (void *handle)
{
  return 1;
}

static int
qcow2_can_zero (void *handle)
{
  return 1;
}

static int
qcow2_can_fast_zero (void *handle)
{
  /* Zeroing is metadata-only where possible; elsewhere FAST_ZERO fails
   * at once with ENOTSUP. */
  return 1;
}

static int
qcow2_can_fua (void *handle)
{
  return NBDKIT_FUA_NATIVE;
}

static int
qcow2_can_multi_conn (void *handle)
{
  /* Every connection shares one image state. */
  return 1;
}

static int
qcow2_is_rotational (void *handle)
{
  return 0;
}

static int
qcow2_can_cache (void *handle)
{
  return NBDKIT_CACHE_NATIVE;
}

static int
qcow2_can_extents (void *handle)
{
  return 1;
}

static int
qcow2_pread (void *handle, void *buf, uint32_t count, uint64_t offset,
             uint32_t flags)
{
  struct handle *h = handle;
  int r = q2_pread (h->img, buf, count, offset);

  return r < 0 ? core_error (r) : 0;
}

static int
qcow2_pwrite (void *handle, const void *buf, uint32_t count, uint64_t offset,
              uint32_t flags)
{
  struct handle *h = handle;
  int r = q2_pwrite (h->img, buf, count, offset,
                     flags & NBDKIT_FLAG_FUA);

  return r < 0 ? core_error (r) : 0;
}

static int
qcow2_zero (void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  int r = q2_zero (h->img, count, offset,
                   flags & NBDKIT_FLAG_MAY_TRIM,
                   flags & NBDKIT_FLAG_FAST_ZERO, flags & NBDKIT_FLAG_FUA);

  if (r == -ENOTSUP) {
    /* Not an error worth logging: the client asked for fast zero. */
    nbdkit_set_error (ENOTSUP);
    return -1;
  }
  return r < 0 ? core_error (r) : 0;
}

static int
qcow2_trim (void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  int r = q2_trim (h->img, count, offset, flags & NBDKIT_FLAG_FUA);

  return r < 0 ? core_error (r) : 0;
}

static int
qcow2_flush (void *handle, uint32_t flags)
{
  struct handle *h = handle;
  int r = q2_flush (h->img);

  return r < 0 ? core_error (r) : 0;
}

/* nbdkit keeps at most 1M extents per reply and drops the rest, so a
 * walk over a badly fragmented range stops well before that (as
 * qemu-nbd does at 128K): the client asks again where the reply ends. */
#define MAX_EXTENT_CALLS (128 * 1024)

struct extents_walk {
  struct nbdkit_extents *extents;
  uint32_t calls;
};

static int
add_extent (void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
  struct extents_walk *w = opaque;

  if (qcow2_debug_extents)
    nbdkit_debug ("extent %" PRIu64 "+%" PRIu64 " flags %u",
                  offset, length, flags);
  /* A positive value stops the walk and cannot be mistaken for -errno. */
  if (nbdkit_add_extent (w->extents, offset, length, flags) == -1)
    return 1;
  return ++w->calls >= MAX_EXTENT_CALLS ? 2 : 0;
}

static int
qcow2_extents (void *handle, uint32_t count, uint64_t offset, uint32_t flags,
               struct nbdkit_extents *extents)
{
  struct handle *h = handle;
  struct extents_walk w = { .extents = extents };
  int r = q2_extents (h->img, offset, count,
                      flags & NBDKIT_FLAG_REQ_ONE,
                      add_extent, &w);

  if (r == 1)
    return -1;                  /* nbdkit_add_extent already reported it */
  return r < 0 ? core_error (r) : 0;
}

static int
qcow2_cache (void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  int r;

  if (flags != 0) {
    nbdkit_error ("cache: unexpected flags %#" PRIx32, flags);
    nbdkit_set_error (EINVAL);
    return -1;
  }
  r = q2_cache (h->img, offset, count);
  return r < 0 ? core_error (r) : 0;
}

static struct nbdkit_plugin plugin = {
  .name              = "qcow2",
  .longname          = "nbdkit qcow2 plugin",
  .version           = PLUGIN_VERSION,
  .description       = "Serve qcow2 disk images",
  .unload            = qcow2_unload,
  .config            = qcow2_config,
  .config_complete   = qcow2_config_complete,
  .config_help       = qcow2_config_help,
  .magic_config_key  = "file",
  .dump_plugin       = qcow2_dump_plugin,
  .get_ready         = qcow2_get_ready,
  .list_exports      = qcow2_list_exports,
  .default_export    = qcow2_default_export,
  .open              = qcow2_open,
  .close             = qcow2_close,
  .get_size          = qcow2_get_size,
  .block_size        = qcow2_block_size,
  .can_write         = qcow2_can_write,
  .can_flush         = qcow2_can_flush,
  .can_trim          = qcow2_can_trim,
  .can_zero          = qcow2_can_zero,
  .can_fast_zero     = qcow2_can_fast_zero,
  .can_fua           = qcow2_can_fua,
  .can_multi_conn    = qcow2_can_multi_conn,
  .is_rotational     = qcow2_is_rotational,
  .can_cache         = qcow2_can_cache,
  .can_extents       = qcow2_can_extents,
  .pread             = qcow2_pread,
  .pwrite            = qcow2_pwrite,
  .zero              = qcow2_zero,
  .trim              = qcow2_trim,
  .flush             = qcow2_flush,
  .extents           = qcow2_extents,
  .cache             = qcow2_cache,
  .errno_is_preserved = 1,
};

NBDKIT_REGISTER_PLUGIN (plugin)
