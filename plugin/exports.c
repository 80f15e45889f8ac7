/* Internal snapshots as exports: each one is a separate read-only view
 * of the image (its own L1 and caches), opened on first use and shared
 * by every connection to that export.  Writes to the active image never
 * touch a snapshot's clusters (they are shared, so written by
 * copy-on-write), so the views stay valid while the image is written. */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "plugin.h"

static pthread_mutex_t views_lock = PTHREAD_MUTEX_INITIALIZER;
static struct q2_image **views;         /* by snapshot index */
static int nb_views;

static struct q2_image *
open_view (int index)
{
  struct q2_open_opts opts = open_opts;
  struct q2_snapshot_info info;
  struct q2_image *v;

  /* A second open of our own image: its locks would clash with ours. */
  opts.readonly = true;
  opts.locking = false;
  if (q2_snapshot_get (image, index, &info) < 0 ||
      q2_open (filename, &opts, &v) < 0) {
    nbdkit_error ("%s", q2_last_error ());
    return NULL;
  }
  /* Load by ID: it is unique, names need not be. */
  if (q2_snapshot_load_tmp (v, info.id) < 0) {
    nbdkit_error ("snapshot %s: %s", info.id, q2_last_error ());
    q2_close (v);
    return NULL;
  }
  return v;
}

struct q2_image *
exports_image_for (const char *name, bool *readonly)
{
  struct q2_image *v;
  int i;

  /* snapshot= replaces the active image as the default export, found
   * the way QEMU finds it (ID first).  Other export names are untrusted
   * and must be exactly what exports_list advertised: a snapshot's
   * name, or its ID. */
  if (name[0] == '\0' && snapshot == NULL)
    return image;
  i = name[0] == '\0' ? q2_snapshot_find (image, snapshot) :
    q2_snapshot_find_name (image, name);
  if (i < 0) {
    if (snapshot)
      nbdkit_error ("export '%.64s' is not a snapshot (with snapshot=, "
                    "\"\" is snapshot %s and the active image is not "
                    "exported)", name, snapshot);
    else
      nbdkit_error ("export '%.64s' is neither the active image (\"\") "
                    "nor a snapshot", name);
    nbdkit_set_error (ENOENT);
    return NULL;
  }
  *readonly = true;
  pthread_mutex_lock (&views_lock);
  if (i >= nb_views) {
    struct q2_image **n = realloc (views, (i + 1) * sizeof *n);
    if (n == NULL) {
      pthread_mutex_unlock (&views_lock);
      nbdkit_error ("realloc: %m");
      return NULL;
    }
    memset (n + nb_views, 0, (i + 1 - nb_views) * sizeof *n);
    views = n;
    nb_views = i + 1;
  }
  if (views[i] == NULL)
    views[i] = open_view (i);
  v = views[i];
  pthread_mutex_unlock (&views_lock);
  return v;
}

int
exports_list (struct nbdkit_exports *exports)
{
  int i, n = q2_snapshot_count (image);

  char desc[300];

  if (snapshot)
    snprintf (desc, sizeof desc, "snapshot %.200s (snapshot=, read-only)",
              snapshot);
  if (nbdkit_add_export (exports, "", snapshot ? desc : "active image") == -1)
    return -1;
  for (i = 0; i < n; i++) {
    struct q2_snapshot_info info;
    const char *name;
    char date[64];
    time_t t;

    if (q2_snapshot_get (image, i, &info) < 0)
      continue;
    /* An empty or repeated name could not reach this snapshot: use the
     * (unique) ID instead. */
    name = info.name;
    if (name[0] == '\0' || q2_snapshot_find_name (image, name) != i)
      name = info.id;
    t = info.date_sec;
    strftime (date, sizeof date, "%Y-%m-%d %H:%M:%S", gmtime (&t));
    snprintf (desc, sizeof desc, "snapshot ID %.32s, taken %s UTC, disk "
              "size %" PRIu64 " bytes (read-only)", info.id, date,
              info.disk_size);
    if (nbdkit_add_export (exports, name, desc) == -1)
      return -1;
  }
  return 0;
}

void
exports_close_all (void)
{
  int i;

  for (i = 0; i < nb_views; i++)
    if (views[i])
      q2_close (views[i]);
  free (views);
  views = NULL;
  nb_views = 0;
}
