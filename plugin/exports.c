/* Internal snapshots as exports: each one is a separate read-only view
 * of the image (its own L1 and caches), opened by the first connection
 * to that export, shared by the others and closed with the last one, so
 * that listing thousands of snapshots does not keep thousands open.
 * Writes to the active image never
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

struct view {
  struct q2_image *img;                 /* NULL: not open */
  unsigned users;                       /* connections using it */
};

static pthread_mutex_t views_lock = PTHREAD_MUTEX_INITIALIZER;
static struct view *views;              /* by snapshot index */
static int nb_views;

/* The export name of each snapshot (NULL: not exported), computed once
 * under views_lock: the snapshot table does not change while served. */
static const char **names;
static int nb_names = -1;

static const char *
snap_name (int i)
{
  struct q2_snapshot_info info;

  return q2_snapshot_get (image, i, &info) == 0 ? info.name : "";
}

static const char *
snap_id (int i)
{
  struct q2_snapshot_info info;

  return q2_snapshot_get (image, i, &info) == 0 ? info.id : "";
}

static int
by_name (const void *a, const void *b)
{
  return strcmp (snap_name (*(const int *) a), snap_name (*(const int *) b));
}

static int
name_in (const int *sorted, int n, const char *s)
{
  int lo = 0, hi = n;

  while (lo < hi) {
    int mid = lo + (hi - lo) / 2, c = strcmp (snap_name (sorted[mid]), s);
    if (c == 0)
      return 1;
    if (c < 0)
      lo = mid + 1;
    else
      hi = mid;
  }
  return 0;
}

/* A snapshot is exported under its name when that name is unique and
 * not empty, else under its ID, unless some snapshot exported by name
 * is called like that ID (then it is not listed).  So every listed name
 * is unique and reaches the snapshot it was listed for.  Sorting keeps
 * this O(n log n) for a table of up to 65536 snapshots. */
static int
compute_names (void)
{
  int n = q2_snapshot_count (image), i, j, k, nb_unique = 0;
  int *sorted, *unique;

  names = calloc (n ? n : 1, sizeof *names);
  sorted = malloc ((n ? n : 1) * sizeof *sorted);
  unique = malloc ((n ? n : 1) * sizeof *unique);
  if (names == NULL || sorted == NULL || unique == NULL) {
    free (names); free (sorted); free (unique);
    names = NULL;
    nbdkit_error ("out of memory listing snapshots");
    return -1;
  }
  for (i = 0; i < n; i++)
    sorted[i] = i;
  qsort (sorted, n, sizeof *sorted, by_name);
  for (i = 0; i < n; i = j) {
    for (j = i + 1; j < n && by_name (&sorted[i], &sorted[j]) == 0; j++)
      ;
    if (j == i + 1 && snap_name (sorted[i])[0] != '\0') {
      names[sorted[i]] = snap_name (sorted[i]);
      unique[nb_unique++] = sorted[i];   /* still in name order */
    }
  }
  for (k = 0; k < n; k++)
    if (names[k] == NULL && !name_in (unique, nb_unique, snap_id (k)))
      names[k] = snap_id (k);
  free (sorted);
  free (unique);
  nb_names = n;
  return 0;
}

/* The snapshot a client's export name means: the one listed under that
 * name, else (for names never listed) the ID or name as QEMU finds it. */
static int
find_export (const char *name)
{
  int i;

  pthread_mutex_lock (&views_lock);
  if (nb_names < 0 && compute_names () < 0) {
    pthread_mutex_unlock (&views_lock);
    return -1;
  }
  for (i = 0; i < nb_names; i++)
    if (names[i] && strcmp (names[i], name) == 0)
      break;
  pthread_mutex_unlock (&views_lock);
  return i < nb_names ? i : q2_snapshot_find (image, name);
}

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
    nbdkit_error ("%s", q2_last_error ());      /* names the snapshot */
    q2_close (v);
    return NULL;
  }
  return v;
}

struct q2_image *
exports_image_for (const char *name, bool *readonly, int *view)
{
  struct q2_image *v;
  int i;

  *view = -1;
  /* snapshot= replaces the active image as the default export, found
   * the way QEMU finds it (ID first).  Other export names are untrusted:
   * only exact snapshot names or IDs. */
  if (name[0] == '\0' && snapshot == NULL)
    return image;
  i = name[0] == '\0' ? q2_snapshot_find (image, snapshot) :
    find_export (name);
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
    struct view *n = realloc (views, (i + 1) * sizeof *n);
    if (n == NULL) {
      pthread_mutex_unlock (&views_lock);
      nbdkit_error ("realloc: %m");
      return NULL;
    }
    memset (n + nb_views, 0, (i + 1 - nb_views) * sizeof *n);
    views = n;
    nb_views = i + 1;
  }
  if (views[i].img == NULL)
    views[i].img = open_view (i);
  v = views[i].img;
  if (v) {
    views[i].users++;
    *view = i;
  }
  pthread_mutex_unlock (&views_lock);
  return v;
}

void
exports_release (int view)
{
  struct q2_image *v = NULL;

  if (view < 0)
    return;                     /* the active image */
  pthread_mutex_lock (&views_lock);
  if (view < nb_views && views[view].users > 0 &&
      --views[view].users == 0) {
    v = views[view].img;
    views[view].img = NULL;
  }
  pthread_mutex_unlock (&views_lock);
  q2_close (v);
}

int
exports_list (struct nbdkit_exports *exports)
{
  int i, n;
  char desc[300];

  if (snapshot)
    snprintf (desc, sizeof desc, "snapshot %.200s (snapshot=, read-only)",
              snapshot);
  if (nbdkit_add_export (exports, "", snapshot ? desc : "active image") == -1)
    return -1;
  pthread_mutex_lock (&views_lock);
  n = nb_names < 0 && compute_names () < 0 ? -1 : nb_names;
  pthread_mutex_unlock (&views_lock);
  for (i = 0; i < n; i++) {
    struct q2_snapshot_info info;
    char date[64];
    time_t t;

    if (names[i] == NULL || q2_snapshot_get (image, i, &info) < 0)
      continue;
    t = info.date_sec;
    strftime (date, sizeof date, "%Y-%m-%d %H:%M:%S", gmtime (&t));
    snprintf (desc, sizeof desc, "snapshot ID %.32s, taken %s UTC, disk "
              "size %" PRIu64 " bytes (read-only)", info.id, date,
              info.disk_size);
    if (nbdkit_add_export (exports, names[i], desc) == -1)
      return -1;
  }
  return n < 0 ? -1 : 0;
}

void
exports_close_all (void)
{
  int i;

  for (i = 0; i < nb_views; i++)
    q2_close (views[i].img);
  free (views);
  views = NULL;
  nb_views = 0;
  free (names);
  names = NULL;
  nb_names = -1;
}
