/* Per-thread scratch state (buffers, decompression contexts), reused
 * across requests instead of allocated per request, and released when
 * the thread exits. */
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <zlib.h>
#include <zstd.h>

#include "internal.h"

struct scratch {
  uint8_t *buf[Q2_SCRATCH_SLOTS];
  size_t len[Q2_SCRATCH_SLOTS];
  ZSTD_DCtx *zstd;
  z_stream *zlib;               /* raw inflate, reset for each cluster */
  int pipe[2];                  /* -1 when none; see q2_scratch_pipe */
  size_t pipe_size;
  size_t pipe_refused;          /* smallest size the kernel refused */
};

static pthread_key_t key;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void
close_pipe (struct scratch *s)
{
  if (s->pipe[0] >= 0) {
    close (s->pipe[0]);
    close (s->pipe[1]);
    s->pipe[0] = s->pipe[1] = -1;
    s->pipe_size = 0;
  }
}

/* Buffers up to this size stay with their thread.  Bigger ones (images
 * with large clusters) are lent for one request: q2_scratch_trim gives
 * them back to a small process-wide pool, so that memory is bounded by
 * the requests in flight plus the pool, not by the number of threads. */
#define KEEP_MAX (256 * 1024)
#define POOL_MAX 4

static struct { void *p; size_t len; } pool[POOL_MAX];
/* Large buffers this thread holds: q2_scratch_trim, called after every
 * request, has nothing to do (and looks nothing up) while it is 0. */
static __thread unsigned nb_large;
static unsigned pool_n;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;

static void *
large_get (size_t len)
{
  void *p = NULL;
  unsigned i;

  pthread_mutex_lock (&pool_lock);
  for (i = 0; i < pool_n; i++)
    if (pool[i].len == len) {
      p = pool[i].p;
      pool[i] = pool[--pool_n];
      break;
    }
  pthread_mutex_unlock (&pool_lock);
  if (p == NULL) {
    p = mmap (NULL, len, PROT_READ | PROT_WRITE,
              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      p = NULL;
  }
  return p;
}

static void
large_put (void *p, size_t len)
{
  pthread_mutex_lock (&pool_lock);
  if (pool_n < POOL_MAX) {
    pool[pool_n].p = p;
    pool[pool_n++].len = len;
    p = NULL;
  }
  pthread_mutex_unlock (&pool_lock);
  if (p)
    munmap (p, len);
}

static void
free_slot (struct scratch *s, unsigned slot)
{
  if (s->len[slot] > KEEP_MAX) {
    large_put (s->buf[slot], s->len[slot]);
    nb_large--;
  }
  else
    free (s->buf[slot]);
  s->buf[slot] = NULL;
  s->len[slot] = 0;
}

static void
destroy (void *p)
{
  struct scratch *s = p;
  int i;

  for (i = 0; i < Q2_SCRATCH_SLOTS; i++)
    free_slot (s, i);
  ZSTD_freeDCtx (s->zstd);
  if (s->zlib) {
    inflateEnd (s->zlib);
    free (s->zlib);
  }
  close_pipe (s);
  free (s);
}

static void
make_key (void)
{
  pthread_key_create (&key, destroy);
}

static struct scratch *
get (void)
{
  struct scratch *s;

  pthread_once (&once, make_key);
  s = pthread_getspecific (key);
  if (s == NULL) {
    s = calloc (1, sizeof *s);
    if (s)
      s->pipe[0] = s->pipe[1] = -1;
    if (s && pthread_setspecific (key, s) != 0) {
      free (s);
      s = NULL;
    }
  }
  return s;
}

uint8_t *
q2_scratch (unsigned slot, size_t len)
{
  struct scratch *s = get ();
  void *p;

  if (s == NULL || slot >= Q2_SCRATCH_SLOTS)
    return NULL;
  if (s->len[slot] < len) {
    free_slot (s, slot);
    if (len > KEEP_MAX) {
      /* Whole multiples of KEEP_MAX, so that pooled buffers fit the next
       * request of about the same size. */
      if (len > SIZE_MAX - KEEP_MAX)
        return NULL;
      len = Q2_ROUND_UP (len, KEEP_MAX);
      if ((p = large_get (len)) != NULL)
        nb_large++;
    }
    else
      p = malloc (len);
    if (p == NULL)
      return NULL;
    s->buf[slot] = p;
    s->len[slot] = len;
  }
  return s->buf[slot];
}

void
q2_scratch_trim (void)
{
  struct scratch *s;
  unsigned i;

  if (nb_large == 0)
    return;
  s = pthread_getspecific (key);
  for (i = 0; i < Q2_SCRATCH_SLOTS; i++)
    if (s->len[i] > KEEP_MAX)
      free_slot (s, i);
}

void *
q2_scratch_zstd_dctx (void)
{
  struct scratch *s = get ();

  if (s == NULL)
    return NULL;
  if (s->zstd == NULL)
    s->zstd = ZSTD_createDCtx ();
  return s->zstd;
}

void *
q2_scratch_inflate (void)
{
  struct scratch *s = get ();

  if (s == NULL)
    return NULL;
  if (s->zlib == NULL) {
    z_stream *z = calloc (1, sizeof *z);
    /* -15: raw deflate with the largest window, a superset of QEMU's -12. */
    if (z == NULL || inflateInit2 (z, -15) != Z_OK) {
      free (z);
      return NULL;
    }
    s->zlib = z;
  }
  else if (inflateReset (s->zlib) != Z_OK)
    return NULL;
  return s->zlib;
}

void
q2_scratch_pipe_discard (void)
{
  struct scratch *s = get ();

  if (s)
    close_pipe (s);
}

#define PIPE_MAX (512 * 1024)

int
q2_scratch_pipe (size_t bytes, int fds[2])
{
  struct scratch *s = get ();
  int r;

  if (s == NULL)
    return -1;
  if (s->pipe[0] < 0) {
    if (pipe2 (s->pipe, O_NONBLOCK | O_CLOEXEC) == -1) {
      s->pipe[0] = s->pipe[1] = -1;
      return -1;
    }
    r = fcntl (s->pipe[0], F_GETPIPE_SZ);
    s->pipe_size = r > 0 ? r : 0;
  }
  if (s->pipe_size < bytes) {
    /* Unprivileged pipes stop at /proc/sys/fs/pipe-max-size (1 MiB by
     * default), and all of a user's pipes share a page budget: keep
     * them small, and do not ask again for a size once refused. */
    if (bytes > PIPE_MAX || (s->pipe_refused && bytes >= s->pipe_refused))
      return -1;
    if ((r = fcntl (s->pipe[0], F_SETPIPE_SZ, (int) bytes)) == -1) {
      s->pipe_refused = bytes;
      return -1;
    }
    s->pipe_size = r;
  }
  fds[0] = s->pipe[0];
  fds[1] = s->pipe[1];
  return 0;
}
